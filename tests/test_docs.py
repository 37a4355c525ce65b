"""The docstring examples run, and the public API has them.

Every module of ``src/difftime`` is run under doctest with the flags that
``python -m pytest --doctest-modules src/difftime`` uses (pyproject.toml), one test per module so a
failure names it; every public name of the package root carries an example of its own.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import difftime

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
MODULES = ["difftime", *sorted(name for _, name, _ in pkgutil.walk_packages(difftime.__path__, "difftime."))]
# The examples found today number 184; a drop below this means examples were lost.
MIN_EXAMPLES = 180
# Root names whose example lives elsewhere: a Run is what load_run's example builds and reads.
ELSEWHERE = {"__version__", "Run"}
# Beyond the root: the EDM wrapper and the training time draw.
ALSO_DOCUMENTED = ("difftime.nets.precond.EDMPreconditioned", "difftime.training.loss.sample_time")


def _tests(name: str) -> list[doctest.DocTest]:
    return doctest.DocTestFinder().find(importlib.import_module(name))


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_of_every_module_pass(name):
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in _tests(name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_the_package_has_its_examples():
    assert len(MODULES) > 50  # the walk found the package
    total = sum(len(test.examples) for name in MODULES for test in _tests(name))
    assert total >= MIN_EXAMPLES, f"{total} docstring examples, expected at least {MIN_EXAMPLES}"


def _has_example(obj) -> bool:
    return ">>>" in (inspect.getdoc(obj) or "")


def test_every_public_name_has_an_example():
    sources = "\n".join(example.source for name in MODULES for test in _tests(name) for example in test.examples)
    missing = []
    for name in difftime.__all__:
        if name in ELSEWHERE:
            continue
        obj = getattr(difftime, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            ok = _has_example(obj)
        else:  # a table (SAMPLERS, SPACINGS, PRIOR_FAMILIES): some example shows it
            ok = name in sources
        if not ok:
            missing.append(name)
    for path in ALSO_DOCUMENTED:
        module, _, attr = path.rpartition(".")
        if not _has_example(getattr(importlib.import_module(module), attr)):
            missing.append(path)
    assert not missing, f"no docstring example for {missing}"
