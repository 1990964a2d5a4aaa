"""Compile the Triton kernels for a GPU architecture on a machine without a GPU.

The interpreter (CI) executes kernels but never runs the GPU compiler, which rejects things the
interpreter accepts (non-constexpr globals, dot operands < 16, type mismatches across constexpr
branches). This module compiles through Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin with the ptxas bundled in the triton wheel) and reads the cubin's resource usage::

    python -m ropekern._triton.aot --arch 90 --dtype bf16 --head-dim 128 --block 128 64 8 3

prints ``registers``, ``local``, ``spill_stores`` / ``spill_loads`` (bytes per thread, from
``ptxas -v``: spills go to the stack frame, which cuobjdump's ``LOCAL`` does not count) and
``shared`` (bytes per block).
It must run without ``TRITON_INTERPRET=1`` (under the interpreter kernels are not compiled).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import attention, backward, rope
from .host import INTERPRET, head_constants, pow2


def _require_compiler() -> None:
    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: under the interpreter kernels are not compiled")


def _usage(kernel) -> dict[str, int]:
    """Registers, spills and shared memory of a compiled kernel.

    Register spills go to the per-thread stack frame: cuobjdump's ``LOCAL`` stays 0 for a kernel
    that spills kilobytes. ``spill_stores`` / ``spill_loads`` (bytes per thread) come from running
    the bundled ptxas with ``-v`` on the kernel's PTX, with the flags Triton itself passes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    capability = kernel.metadata.target.arch
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        text = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        cmd += [f"--gpu-name={sm_arch_from_capability(capability)}", ptx, "-o", os.path.join(tmp, "v.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True).stderr
    regs, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    stores, loads = re.search(r"(\d+) bytes spill stores", log), re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "local": int(local.group(1)) if local else -1,
        "spill_stores": int(stores.group(1)) if stores else -1,
        "spill_loads": int(loads.group(1)) if loads else -1,
        "shared": kernel.metadata.shared,
    }


def compile_attention(
    arch: int,
    dtype: str = "bf16",
    head_dim: int = 128,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    causal: bool = True,
    varlen: bool = False,
    group: int = 1,
    block: tuple[int, int, int, int] = (128, 64, 4, 3),
    rotate: bool = True,
    table: bool = False,
    window: bool = False,
) -> dict[str, int]:
    """Compile the fused forward for ``sm_<arch>``; ``dtype`` in fp16/bf16/fp32; ``block`` is
    ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``; ``table``: the caller's-table variant (cos/sin
    rows looked up by position); ``window``: the sliding-window variant. Returns registers / local /
    shared."""
    r = head_dim if rotary_dim is None else rotary_dim
    bm, bn, warps, stages = block
    constexprs = dict(
        GROUP=group, **head_constants(head_dim, r), INTERLEAVED=interleaved, ROTATE=rotate, ROPE_TABLE=table,
        CAUSAL=causal, WINDOW=window, VARLEN=varlen, DOT_PREC="ieee" if dtype == "fp32" else "tf32",
        UPCAST=False, BLOCK_M=bm, BLOCK_N=bn,
    )  # fmt: skip
    fn = attention._rope_attn_fwd.fn
    pointers = {"Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "Lse": "fp32", "QPos": "i32", "KPos": "i32"}
    pointers.update({"Split": "fp32", "CuQ": "i32", "CuK": "i32"})
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in ("qk_scale", "attention_factor") else "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": warps, "num_stages": stages, "maxnreg": attention.MAXNREG}  # as the autotuner's configs
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return _usage(kernel)


def compile_backward(
    arch: int,
    dtype: str = "bf16",
    head_dim: int = 128,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    causal: bool = True,
    varlen: bool = False,
    group: int = 1,
    block: tuple[int, int, int, int] | None = None,
    rotate: bool = True,
    kernel: str = "dkdv",
    table: bool = False,
    window: bool = False,
) -> dict[str, int]:
    """Compile a backward kernel (``kernel`` in dkdv / dq / preprocess / table) for ``sm_<arch>``;
    ``block`` is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, default the first config of the
    kernel's list (preprocess, table: the block ``backward.preprocess`` / ``rope_table`` pick).
    ``table``: the table kernel's variant that gathers a caller's table (the others read its output
    either way); ``window``: the sliding-window variant of dkdv / dq."""
    _require_compiler()
    r = head_dim if rotary_dim is None else rotary_dim
    pointers = {"DLse": "fp32", "Delta": "fp32", "Lse": "fp32", "CSQ": "fp32", "CSK": "fp32", "CuQ": "i32"}
    pointers.update({"CuK": "i32", "Pos": "i32", "Split": "fp32", "Table": "fp32", "Cu": "i32"})
    for name in ("Q", "K", "V", "DO", "DK", "DV", "DQ", "Out"):
        pointers[name] = dtype
    if kernel == "preprocess":
        d_p = pow2(head_dim)
        constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_P=d_p, HAS_DLSE=True, BLOCK=max(16, min(128, 8192 // d_p)))
        fn, warps, stages = backward._bwd_preprocess, 4, 1
    elif kernel == "table":
        half_p = pow2(r // 2)
        constexprs = dict(
            HALF=r // 2, HALF_P=half_p, VARLEN=varlen, ROPE_TABLE=table, BLOCK=backward.table_block(half_p)
        )  # fmt: skip
        fn, warps, stages = backward._rope_table, 4, 1
    else:
        bm, bn, warps, stages = block or (backward._DKDV if kernel == "dkdv" else backward._DQ)[0]
        constexprs = dict(
            GROUP=group, **head_constants(head_dim, r), INTERLEAVED=interleaved, ROTATE=rotate, CAUSAL=causal,
            WINDOW=window, VARLEN=varlen, DOT_PREC="ieee" if dtype == "fp32" else "tf32",
            UPCAST=False, BLOCK_M=bm, BLOCK_N=bn,
        )  # fmt: skip
        fn = (backward._bwd_dkdv if kernel == "dkdv" else backward._bwd_dq).fn
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in ("qk_scale", "softmax_scale", "attention_factor") else "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel_ = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    return _usage(kernel_)


def compile_rope(
    arch: int,
    dtype: str = "bf16",
    head_dim: int = 128,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    table: bool = False,
) -> dict[str, int]:
    """Compile the standalone apply_rope kernel for ``sm_<arch>`` (block as ``rope.forward`` picks on
    GPUs); ``table``: the caller's-table variant."""
    _require_compiler()
    r = head_dim if rotary_dim is None else rotary_dim
    head = head_constants(head_dim, r)
    constexprs = dict(
        HALF=head["HALF"], HALF_P=head["HALF_P"], PASS=head["PASS"], PASS_P=head["PASS_P"],
        INTERLEAVED=interleaved, ROPE_TABLE=table, BLOCK_S=rope.gpu_block_s(head["HALF_P"]),
    )  # fmt: skip
    fn = rope._apply_rope_kernel
    pointers = {"X": dtype, "Out": dtype, "Pos": "i32", "Split": "fp32"}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name == "attention_factor" else "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return _usage(triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100)")
    p.add_argument("--dtype", default="bf16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rotary-dim", type=int, default=None)
    p.add_argument("--interleaved", action="store_true")
    p.add_argument("--group", type=int, default=1, help="query heads per key/value head")
    p.add_argument("--block", type=int, nargs=4, default=(128, 64, 4, 3), metavar=("M", "N", "WARPS", "STAGES"))
    p.add_argument("--no-rotate", action="store_true", help="the RoPE-off variant")
    p.add_argument("--table", action="store_true", help="the caller's-table variant (ropekern.RopeTable)")
    p.add_argument("--rope", action="store_true", help="compile the apply_rope kernel instead")
    p.add_argument(
        "--backward",
        choices=("dkdv", "dq", "preprocess", "table"),
        help="compile a backward kernel instead (--block optional)",
    )
    p.add_argument("--varlen", action="store_true")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--window", action="store_true", help="the sliding-window variant (forward, dkdv, dq)")
    a = p.parse_args(argv)
    if a.rope:
        usage = compile_rope(a.arch, a.dtype, a.head_dim, a.rotary_dim, a.interleaved, a.table)
    elif a.backward:
        block = tuple(a.block) if "--block" in (argv if argv is not None else sys.argv) else None
        usage = compile_backward(
            a.arch, a.dtype, a.head_dim, a.rotary_dim, a.interleaved, not a.no_causal, a.varlen, a.group, block,
            not a.no_rotate, a.backward, a.table, a.window,
        )  # fmt: skip
    else:
        usage = compile_attention(
            a.arch, a.dtype, a.head_dim, a.rotary_dim, a.interleaved, not a.no_causal, a.varlen, a.group,
            tuple(a.block), not a.no_rotate, a.table, a.window,
        )  # fmt: skip
    print(" ".join(f"{k}={v}" for k, v in usage.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
