"""Shared test setup.

Triton kernels run through the interpreter when no GPU is present: TRITON_INTERPRET must be set
before triton is imported anywhere (docs/design.md §5), so it is set here, at collection start.
"""

import os

# The Triton interpreter runs tl.dot as numpy matmul; OpenBLAS threads on a shared 2-core machine
# turn a 64x64 @ 64x128 product from 0.02 ms into ~55 ms. Must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny models: with 2 threads on a shared 2-core machine each matmul waits on the other
    thread (a 2-layer forward measured 40x slower); one thread keeps such files fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
