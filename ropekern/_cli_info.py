"""``ropekern info``: versions, devices and every backend (with the reason when it is missing)."""

from __future__ import annotations

import platform

HELP = "print versions, devices and which backends are available (and why not)"


def add_arguments(parser) -> None:
    del parser  # no options


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:  # report, never fail: this command is for diagnosing installs
        return f"not importable ({type(exc).__name__})"
    return getattr(module, "__version__", "unknown")


def run(args) -> int:
    import torch

    import ropekern

    print(f"ropekern     {ropekern.__version__}")
    print(f"python       {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    for name in ("triton", "transformers"):
        print(f"{name:<12} {_version(name)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device {i}     {torch.cuda.get_device_name(i)}")
    else:
        print(f"device       CPU only ({torch.get_num_threads()} threads)")
    print("backends:")
    for name, status in ropekern.available_backends().items():
        print(f"  {name:<8} {'available' if status is True else 'missing: ' + status}")
    return 0
