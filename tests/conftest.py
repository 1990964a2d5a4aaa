"""Shared test setup.

Triton kernels run through the interpreter when no GPU is present: TRITON_INTERPRET must be set
before triton is imported anywhere (DESIGN §5), so it is set here, at collection start.
"""

import os

# The Triton interpreter's tl.dot is a numpy matmul; multithreaded OpenBLAS on tiny matrices on a
# shared 2-core machine made one 16x16x4096 dot take 54 ms instead of 0.2 ms (measured, load ~10).
# Must be set before numpy is first imported (torch imports it).
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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
