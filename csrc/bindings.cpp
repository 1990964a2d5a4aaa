// The native ops' schemas (TORCH_LIBRARY) and the extension module. The ops themselves are one
// template per op (op_args.h), registered per dispatch key by csrc/cpu/ops.cpp (CPU) and, in a CUDA
// build, csrc/cuda/bindings_cuda.cpp (CUDA); fake (meta) implementations live in
// ropekern/backends/native.py.
//
//   fwd          q [B, Sq, Hq, D] / varlen [Tq, Hq, D], k, v [B, Sk, Hkv, D] / [Tk, Hkv, D]
//                -> out like q, lse float32 [B, Hq, Sq] / [Hq, Tq]
//   fwd_kvcache  appends k_new/v_new into the caches in place, then attends (docs/design.md §2)
//   apply_rope   x [B, S, H, D] / [T, H, D] -> rotated copy
// `freqs` is the fp32 turn-split table [nT, 4, rotary_dim / 2] (nT = 1 or B) from RopeConfig.tables;
// positions are int32; rotary_dim == 0 runs without rotation.
#include <Python.h>
#include <torch/library.h>

#include "cpu/ops.h"
#include "schemas.h"

TORCH_LIBRARY(ropekern, m) { ropekern::define_schemas(m); }

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(ropekern::cpu::active_isa());
  } catch (const std::exception& exc) {
    PyErr_SetString(PyExc_ValueError, exc.what());
    return nullptr;
  }
}

PyMethodDef kMethods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "Kernel unit the CPU ops use now: 'avx2' or 'generic' (environment variable ROPEKERN_CPU_ISA overrides)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "ropekern native CPU kernels (ops in torch.ops.ropekern)", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
