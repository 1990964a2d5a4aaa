// The native ops' schemas (TORCH_LIBRARY) and the extension module. The ops themselves are one
// template per op (op_args.h), registered per dispatch key by csrc/cpu/ops.cpp (CPU) and, in a CUDA
// build, csrc/cuda/bindings_cuda.cpp (CUDA); fake (meta) implementations live in
// ropekern/backends/native.py.
//
//   fwd          q [B, Sq, Hq, D] / varlen [Tq, Hq, D], k, v [B, Sk, Hkv, D] / [Tk, Hkv, D]
//                -> out like q, lse float32 [B, Hq, Sq] / [Hq, Tq]
//   fwd_kvcache  appends k_new/v_new into the caches in place, then attends (docs/design.md §2)
//   apply_rope   x [B, S, H, D] / [T, H, D] -> rotated copy
//   apply_rope_  the same rotation written into x (any strides: views of a packed qkv buffer)
// `freqs` is the fp32 turn-split table [nT, 4, rotary_dim / 2] (nT = 1 or B) from RopeConfig.tables,
// or with table_positions P > 0 a caller's cos/sin table [P, 2, rotary_dim / 2] (RopeTable.tables);
// positions are int32; rotary_dim == 0 runs without rotation.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/ops.h"
#include "schemas.h"

TORCH_LIBRARY(ropekern, m) { ropekern::define_schemas(m); }

namespace {

// A bad ROPEKERN_CPU_ISA raises ValueError, a unit this CPU cannot run RuntimeError (as torch maps
// the c10 errors of the ops), with the message only, not the C++ backtrace.
template <class F>
PyObject* isa_string(const F& f) {
  try {
    return PyUnicode_FromString(std::string(f()).c_str());
  } catch (const c10::ValueError& exc) {
    PyErr_SetString(PyExc_ValueError, exc.what_without_backtrace());
  } catch (const c10::Error& exc) {
    PyErr_SetString(PyExc_RuntimeError, exc.what_without_backtrace());
  } catch (const std::exception& exc) {
    PyErr_SetString(PyExc_RuntimeError, exc.what());
  }
  return nullptr;
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  return isa_string([] { return ropekern::cpu::active_isa(); });
}

PyObject* cpu_isa_reason(PyObject*, PyObject*) {
  return isa_string([] { return ropekern::cpu::isa_reason(); });
}

PyMethodDef kMethods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "Kernel unit the CPU ops use now: 'avx512', 'avx2' or 'generic' (environment variable ROPEKERN_CPU_ISA "
     "overrides)."},
    {"cpu_isa_reason", cpu_isa_reason, METH_NOARGS, "Why cpu_isa() is that unit: the CPU's and OS's support, or the override."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "ropekern native CPU kernels (ops in torch.ops.ropekern)", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
