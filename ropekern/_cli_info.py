"""``ropekern info``: versions (and whether each is inside the range ropekern declares), devices and
every backend (with the reason when it is missing)."""

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


def declared_ranges() -> dict[str, str]:
    """Package name -> the version range ropekern's installed metadata declares (from pyproject.toml,
    the releases scripts/compat.sh passed on); empty when ropekern runs from a source tree without
    being installed."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requires = metadata.requires("ropekern") or []
    except metadata.PackageNotFoundError:
        return {}
    ranges: dict[str, str] = {}
    for line in requires:
        req = Requirement(line)
        if str(req.specifier):
            ranges.setdefault(req.name, str(req.specifier))
    return ranges


def _support(name: str, version: str, ranges: dict[str, str]) -> str:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    spec = ranges.get(name)
    if spec is None:
        return ""
    try:
        inside = Version(version.split("+")[0]) in SpecifierSet(spec)
    except InvalidVersion:
        return f"  (supported {spec})"
    return f"  (supported {spec}: {'yes' if inside else 'NO, outside the tested range'})"


def run(args) -> int:
    import torch

    import ropekern

    print(f"ropekern     {ropekern.__version__}")
    print(f"python       {platform.python_version()} ({platform.machine()}, {platform.system()})")
    ranges = declared_ranges()
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"
          f"{_support('torch', torch.__version__, ranges)}")  # fmt: skip
    for name in ("triton", "transformers", "numpy"):
        version = _version(name)
        print(f"{name:<12} {version}{_support(name, version, ranges)}")
    if not ranges:
        print("             (ropekern is not installed, so its declared version ranges are unknown)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device {i}     {torch.cuda.get_device_name(i)}")
    else:
        print(f"device       CPU only ({torch.get_num_threads()} threads)")
    print("backends:")
    for name, status in ropekern.available_backends().items():
        print(f"  {name:<8} {'available' if status is True else 'missing: ' + status}")
    print(f"cpu unit     {_cpu_unit()}")
    return 0


def _cpu_unit() -> str:
    """The native CPU kernel unit in use and why, or why there is none."""
    try:
        from ropekern.backends import native

        return f"{native.cpu_isa()} ({native.cpu_isa_reason()})"
    except Exception as exc:  # report, never fail
        return f"none ({type(exc).__name__}: {exc})"
