"""Build ropekern and, where possible, its native extensions.

* ``ropekern._C``: the CPU kernels (csrc/cpu, csrc/bindings.cpp), built on every machine with a
  C++ compiler. Without one the package still installs (the ``torch`` backend remains), unless
  ``ROPEKERN_REQUIRE_EXT=1`` (CI) turns a failed build into an error.
* With nvcc and a CUDA-enabled torch (or ``ROPEKERN_BUILD_CUDA=1``; ``=0`` turns it off),
  ``ropekern._C`` is built as a CUDA extension that also holds the CUDA kernels (csrc/cuda);
  ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0".
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
    if _build_cuda():
        ext = _cuda_extension(ext)
    return [ext], {"build_ext": _optional(BuildExtension)}


def _build_cuda():
    """ROPEKERN_BUILD_CUDA=1 / 0 forces the CUDA kernels on / off; by default they are built when
    torch is a CUDA build and the CUDA toolkit (nvcc) is found."""
    flag = os.environ.get("ROPEKERN_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _cuda_extension(cpu_ext):
    """``cpu_ext`` as a CUDAExtension that adds csrc/cuda: the kernels, their dispatch and the
    CUDA registrations of the ops (bindings_cuda.cpp), for sm_80 and sm_90 unless
    TORCH_CUDA_ARCH_LIST says otherwise. No --use_fast_math: it would replace sincosf by the
    approximate __sincosf in the accurate-angle path."""
    from torch.utils.cpp_extension import CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return CUDAExtension(
        cpu_ext.name,
        cpu_ext.sources + _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp"),
        include_dirs=cpu_ext.include_dirs + [os.path.join(HERE, "csrc", "cuda")],
        extra_compile_args={"cxx": cpu_ext.extra_compile_args["cxx"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=cpu_ext.extra_link_args,
    )


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
