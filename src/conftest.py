"""For ``python -m pytest --doctest-modules src/difftime``: the docstring examples run on one thread.

Their tensors are tiny, and on a shared machine two OpenMP threads only stall each other. The
suite runs the same examples from tests/test_docs.py, with the same pinning (tests/conftest.py).
This file is not part of the package (only ``src/difftime`` is).
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)
