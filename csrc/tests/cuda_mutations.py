"""Mutation check of the CUDA emulation harness: each mutation breaks the kernel source in one way
(an index, a barrier, a cp.async wait, the mask, the accurate angle, a caller's cos/sin table,
split-K, paging, append, ...) and the harness (csrc/tests/test_cuda_emulated.cpp) must fail. Run
from the repository root:

    python csrc/tests/cuda_mutations.py [substring ...]   # all mutations, or those whose name matches

Every file is restored after each mutation (also on Ctrl-C). Needs g++; about 10 s per mutation.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
ATTN = "csrc/cuda/attention.h"
PARAMS = "csrc/cuda/cuda_params.h"
MUTATIONS = [
    (
        "K ldmatrix column swapped",
        "csrc/cuda/layout.h",
        "int bk_ldm_col(int lane) { return ((lane >> 3) & 1) * 8; }",
        "int bk_ldm_col(int lane) { return (lane >> 4) * 8; }",
    ),
    (
        "no barrier after K rotation",
        ATTN,
        "return prob.k_position(j0 + r); });\n        syncthreads();",
        "return prob.k_position(j0 + r); });",
    ),
    ("Q not waited before its rotation", ATTN, "    cp_async_wait<1>();  // Q landed (K may still be in flight)", ""),
    ("V not waited before P V", ATTN, "      cp_async_wait<0>();  // V_nb landed", ""),
    (
        "no barrier at the loop top",
        ATTN,
        "      syncthreads();       // ... for every thread; and every warp is done with V_{nb-1} and Q's rotation\n",
        "",
    ),
    (
        "next K issued before the barrier (WAR race)",
        ATTN,
        "      syncthreads();       // ... for every thread; and every warp is done reading K_nb\n"
        "      if (nb + 1 < nb_end) load_kv(sK, false, nb + 1);",
        "      if (nb + 1 < nb_end) load_kv(sK, false, nb + 1);\n      syncthreads();",
    ),
    ("mask never applied", ATTN, "const bool need_mask = j0", "const bool need_mask = false && j0"),
    ("softmax rescale dropped", ATTN, "          acc_o[t][2 * rr] *= alpha;", "          acc_o[t][2 * rr] *= 1.0f;"),
    (
        "plain fp32 angle",
        ATTN,
        "      rope_cos_sin(position(r), slot.freq, 1, 0, slot.factor, &c, &s);",
        "      { const float a = static_cast<float>(position(r)) * ((slot.freq[0] + slot.freq[1] + slot.freq[2]) * "
        "6.2831853f); c = cosf(a) * slot.factor; s = sinf(a) * slot.factor; }",
    ),
    (
        "cache query position off by one",
        ATTN,
        "return causal_offset + r / group; }",
        "return causal_offset + r / group + 1; }",
    ),
    ("split merge weights swapped", ATTN, "&w_acc, &w_part, &lse_new);", "&w_part, &w_acc, &lse_new);"),
    (
        "split ranges overlap",
        ATTN,
        "nb_end = imin(n_blocks, nb_begin + per_split);",
        "nb_end = imin(n_blocks, nb_begin + per_split + 1);",
    ),
    (
        "paged block stride wrong",
        ATTN,
        "return k + static_cast<int64_t>(block_table[j / block_size]) * k_block_stride",
        "return k + static_cast<int64_t>(block_table[j / block_size]) * k_row_stride",
    ),
    (
        "append slot off by one",
        ATTN,
        "const int t = p.cache_seqlens[b] + s;",
        "const int t = p.cache_seqlens[b] + s + (s == 0);",
    ),
    (
        "interleaved layout ignored",
        ATTN,
        "s.c1 = pair_first(slot, rope.interleaved);",
        "s.c1 = pair_first(slot, false);",
    ),
    ("varlen LSE offset", ATTN, "      lse_off = q0;", "      lse_off = 0;"),
    ("GQA head map", ATTN, "const int hk = h / (p.num_heads / p.num_heads_k);", "const int hk = h % p.num_heads_k;"),
    (
        "per-sequence table ignored",
        PARAMS,
        "return rope.freqs + b * rope.freqs_batch_stride;",
        "return rope.freqs;",
    ),
    (
        "attention ignores a caller's table",
        ATTN,
        "    if (rope.table_positions > 0) {\n      const int pair",
        "    if (false) {\n      const int pair",
    ),
    (
        "apply_rope ignores a caller's table",
        "csrc/cuda/rope_apply.h",
        "if (p.rope.table_positions > 0) {",
        "if (false) {",
    ),
    ("table position not clamped", PARAMS, "table + table_row(pos, rows) * rotary_dim", "table + pos * rotary_dim"),
    (
        "table row stride wrong",
        PARAMS,
        "table + table_row(pos, rows) * rotary_dim",
        "table + table_row(pos, rows) * (rotary_dim / 2)",
    ),
    (
        "table cos and sin swapped",
        PARAMS,
        "*cos_out = row[0];\n  *sin_out = row[rotary_dim / 2];",
        "*cos_out = row[rotary_dim / 2];\n  *sin_out = row[0];",
    ),
]


def main(selected: list[str]) -> int:
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        binary = pathlib.Path(tmp) / "mutant"
        build = (
            f"g++ -std=c++17 -O1 -DRK_EMULATE -Icsrc/include -Icsrc/cuda csrc/tests/test_cuda_emulated.cpp -o {binary}"
        )
        for name, rel, old, new in MUTATIONS:
            if selected and not any(s in name for s in selected):
                continue
            path = ROOT / rel
            source = path.read_text()
            if source.count(old) != 1:
                print(f"STALE  {name}: the mutated text no longer occurs exactly once in {rel}")
                missed += 1
                continue
            try:
                path.write_text(source.replace(old, new))
                built = subprocess.run(build, shell=True, cwd=ROOT, capture_output=True, text=True)
                if built.returncode:
                    print(f"BUILD  {name}: the mutant does not compile\n{built.stderr[:400]}")
                    missed += 1
                    continue
                run = subprocess.run([str(binary)], cwd=ROOT, capture_output=True, text=True, timeout=600)
            finally:
                path.write_text(source)
            failing = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
            caught = run.returncode != 0
            missed += not caught
            print(f"{'caught' if caught else 'MISSED'} {name}: {len(failing)} failing checks")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
