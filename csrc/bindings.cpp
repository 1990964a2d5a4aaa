// The one dispatch layer of ropekern's native ops: schemas (TORCH_LIBRARY) and the CPU kernels
// (TORCH_LIBRARY_IMPL for the CPU key). The CUDA extension registers its kernels for the same
// schemas under the CUDA key; fake (meta) implementations live in ropekern/_native.py.
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

TORCH_LIBRARY(ropekern, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor freqs, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int rotary_dim, bool interleaved, "
      "float attention_factor, bool causal, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, "
      "Tensor? v_new, Tensor? block_table, Tensor freqs, int rotary_dim, bool interleaved, float attention_factor, "
      "bool causal, float softmax_scale, int num_splits) -> (Tensor out, Tensor lse)");
  m.def(
      "apply_rope(Tensor x, Tensor positions, Tensor freqs, int rotary_dim, bool interleaved, "
      "float attention_factor) -> Tensor");
}

TORCH_LIBRARY_IMPL(ropekern, CPU, m) {
  m.impl("fwd", &ropekern::cpu::fwd);
  m.impl("fwd_kvcache", &ropekern::cpu::fwd_kvcache);
  m.impl("apply_rope", &ropekern::cpu::apply_rope);
}

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
