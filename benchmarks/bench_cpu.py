"""Benchmark of the native CPU backend against the plain-PyTorch ways to do the same work, and
against llama.cpp's CPU flash attention (ggml) when its driver is built.

Prefill (causal, Hq/Hkv = 16/4, D = 128): ``rk.rope_attention(backend="cpu")``, once per kernel
unit this CPU runs (``cpu[amx]``, ``cpu[avx512]``, ``cpu[avx2]``; ``cpu[generic]`` with --generic), against
  * baseline: eager Hugging Face-style RoPE (fp32 angles, cos/sin cast to the dtype) on q and k,
    then ``scaled_dot_product_attention`` with ``enable_gqa=True`` or with repeated K/V,
    whichever is faster in this run;
  * SDPA alone on the same (un-rotated) inputs: no RoPE at all, the bar's "1.1x SDPA";
  * ggml (optional): ``ggml_rope_ext`` (NEOX, i.e. the half-split pairs (i, i + D/2)) on f32 q and
    k, k cast to the cache type, ``ggml_flash_attn_ext`` with a causal mask: ``ggml[f32]`` for
    float32 rows, ``ggml[bf16]`` and ``ggml[f16]`` (llama.cpp's default cache type) for bfloat16,
    ``ggml[f16]`` for float16 (--ggml-kv overrides).
Decode (1 query, GQA 32/8, D = 128, a cache of N un-rotated keys): ``rk.rope_attention_with_kvcache``
(rotates every key on read) against eager RoPE of q plus SDPA, or a grouped einsum, over a cache
of *pre-rotated* keys (the faster of the two), and ggml over a cache of pre-rotated keys (as
llama.cpp keeps it); K/V read in GB/s, as a share of the read bandwidth and of the memcpy
bandwidth measured in the same run (STREAM convention: bytes read + written per second).
Memory: peak resident memory of a 32K-token prefill (in a subprocess) against the bytes of
q, k, v and out.

Ceilings: benchmarks/tools/cpu_roofline.c, compiled (gcc) and run once at the start, or read from
--ceilings FILE.json (its --json output). Each ropekern unit's GFLOP/s is given as a share of the
fp32 FMA peak of its vector width (amx and avx512: zmm, avx2: ymm; ropekern computes in fp32 for
bf16 and fp16 inputs too), except the amx unit's bf16 rows (its tiles: the AMX-BF16 peak); the
other candidates' as a share of the widest fp32 peak. The bf16 dot-product peak (vdpbf16ps) is
printed for reference. Decode: K/V bytes/s against the read bandwidth.

Candidates run interleaved (A B C A B C ...) after a warm-up; medians are compared as ratios, so
a loaded machine slows all of them alike. The kernel unit is switched by setting
ROPEKERN_CPU_ISA around each call (the extension reads it per call). ggml runs in its own process
(one per case, graph and inputs built once) and is interleaved too: in its turn it is asked over a
pipe for one run and reports the time of ``ggml_graph_compute`` by its own clock. FLOPs:
4 B Hq Sq Sk D, halved for causal (docs/design.md §6).

    PYTHONPATH=. python benchmarks/bench_cpu.py                      # the full table
    PYTHONPATH=. python benchmarks/bench_cpu.py --quick              # 1K-4K prefill, 4K-16K decode
    PYTHONPATH=. python benchmarks/bench_cpu.py --json results.json
    PYTHONPATH=. python benchmarks/bench_cpu.py --threads 1     # per-core efficiency (robust on a busy host)
    bash benchmarks/tools/build_ggml_peer.sh                    # the ggml peer (once; /work/peers/ggml)
    PYTHONPATH=. python benchmarks/bench_cpu.py --ggml /work/peers/ggml   # or ROPEKERN_GGML_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ropekern as rk
from ropekern import reference
from ropekern.reference import cos_sin, rotate

HQ, HKV, HEAD_DIM = 16, 4, 128
DEC_HQ, DEC_HKV = 32, 8

ISA_ENV = "ROPEKERN_CPU_ISA"  # read by the extension on every call
UNITS = ("amx", "avx512", "avx2", "generic")
# The fp32 FMA ceiling of each unit's vector width (cpu_roofline.c's keys); generic: none measured.
# The amx unit is the avx512 one plus AMX-BF16 tiles for bf16 prefill (AMX_PEAK applies there).
UNIT_PEAK = {"amx": ("fma_zmm_gflops", "zmm"), "avx512": ("fma_zmm_gflops", "zmm"), "avx2": ("fma_ymm_gflops", "ymm")}
AMX_PEAK = ("amx_bf16_gflops", "AMX-BF16")
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_fp16")
CPU_FLAGS += ("amx_tile", "amx_bf16", "amx_int8")

REPO = Path(__file__).resolve().parent.parent
ROOFLINE_SRC = REPO / "benchmarks" / "tools" / "cpu_roofline.c"
GGML_ENV, GGML_DEFAULT_DIR = "ROPEKERN_GGML_DIR", "/work/peers/ggml"
# ggml's K/V cache types for each dtype of ropekern's inputs (f16: llama.cpp's default cache type).
GGML_KV = {"float32": ["f32"], "bfloat16": ["bf16", "f16"], "float16": ["f16"]}
GGML_ESIZE = {"f32": 4, "f16": 2, "bf16": 2}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# Read before every timed call when set (--sweep-mb): evicts the caches without leaving dirty
# lines, so that no candidate pays for the write-backs of the one before it.
_SWEEP: torch.Tensor | None = None


def interleaved(candidates: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each candidate, run A B C A B C ... after `warmup` rounds. A candidate
    whose ``self_timed`` attribute is true returns its own seconds (the ggml peer's clock)."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if _SWEEP is not None:
                _SWEEP.sum()
            times[name].append(fn() if getattr(fn, "self_timed", False) else _timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------------------- kernel units
def on_unit(isa: str, fn):
    """fn run with ROPEKERN_CPU_ISA=isa, the variable restored afterwards."""

    def run():
        old = os.environ.get(ISA_ENV)
        os.environ[ISA_ENV] = isa
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[ISA_ENV]
            else:
                os.environ[ISA_ENV] = old

    return run


def kernel_units(generic: bool) -> tuple[list[str], dict[str, str]]:
    """The kernel units this CPU and this build of the extension run, widest first, and why each
    other one is left out."""
    from ropekern.backends.native import cpu_isa

    units, skipped = [], {}
    for isa in UNITS:
        if isa == "generic" and not generic:
            skipped[isa] = "not asked for (--generic; ~10x slower)"
            continue
        try:
            got = on_unit(isa, cpu_isa)()
        except (RuntimeError, ValueError) as exc:  # the CPU, the OS or the build lacks it
            skipped[isa] = str(exc).splitlines()[0]
            continue
        if got == isa:
            units.append(isa)
        else:
            skipped[isa] = f"runs as {got}"
    return units, skipped


def cand(isa: str) -> str:
    return f"cpu[{isa}]"


# ---------------------------------------------------------------------------------- ceilings
def roofline_binary() -> tuple[Path | None, str]:
    """benchmarks/tools/cpu_roofline.c compiled once per version of its source (build/tools/)."""
    cc = shutil.which("gcc")
    if cc is None:
        return None, "gcc not found"
    tag = hashlib.sha256(ROOFLINE_SRC.read_bytes()).hexdigest()[:12]
    for folder in (REPO / "build" / "tools", Path(tempfile.gettempdir())):
        binary = folder / f"cpu_roofline-{tag}"
        if binary.exists():
            return binary, ""
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        tmp = folder / f".{binary.name}.{os.getpid()}"
        res = subprocess.run([cc, "-O3", "-fopenmp", str(ROOFLINE_SRC), "-o", str(tmp)], capture_output=True, text=True)
        if res.returncode:
            return None, "gcc failed: " + (res.stderr.strip().splitlines() or ["?"])[-1]
        tmp.replace(binary)
        return binary, ""
    return None, "no writable folder for the binary"


def measure_ceilings(threads: int, mib: int) -> tuple[dict | None, str]:
    binary, why = roofline_binary()
    if binary is None:
        return None, why
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([str(binary), str(mib), "--json"], capture_output=True, text=True, env=env, timeout=900)
    if res.returncode:
        return None, f"{binary} exited with {res.returncode}: {res.stderr.strip()[-300:]}"
    ceilings = json.loads(res.stdout.strip().splitlines()[-1])
    ceilings["source"] = (
        f"measured at the start by {binary.relative_to(REPO) if binary.is_relative_to(REPO) else binary}"
    )
    return ceilings, ""


def load_ceilings(arg: str | None, threads: int, mib: int) -> dict | None:
    """The machine's ceilings (cpu_roofline.c's JSON): from the file given, or measured now."""
    if arg == "none":
        print("ceilings: skipped (--ceilings none)")
        return None
    if arg:
        with open(arg) as f:
            ceilings = json.load(f)
        ceilings["source"] = arg
    else:
        print(f"ceilings: running cpu_roofline.c ({threads} threads, {mib} MiB) ...", flush=True)
        ceilings, why = measure_ceilings(threads, mib)
        if ceilings is None:
            print(f"ceilings: skipped ({why}); no % of peak in this run")
            return None
    if ceilings.get("threads") not in (None, threads):
        print(f"ceilings: WARNING measured with {ceilings['threads']} threads, this run uses {threads}")
    print(
        f"ceilings ({ceilings.get('threads')} threads, {ceilings['source']}): fp32 FMA peak"
        f" {ceilings.get('fma_zmm_gflops', 0):.1f} GFLOP/s (zmm) | {ceilings.get('fma_ymm_gflops', 0):.1f} (ymm)"
        f" | bf16 dot (vdpbf16ps, for reference) {ceilings.get('dot_bf16_gflops', 0):.1f}"
        f" | AMX-BF16 tiles {ceilings.get('amx_bf16_gflops', 0):.1f}"
        f" | read {ceilings.get('read_gbs', 0):.1f} GB/s | memcpy {ceilings.get('memcpy_gbs', 0):.1f} GB/s"
        " (read + write)  (0 = not on this CPU)",
        flush=True,
    )
    return ceilings


def flops_peak(ceilings: dict | None, name: str, dtype: torch.dtype | None = None) -> tuple[float | None, str]:
    """The ceiling that applies to a candidate: its unit's fp32 FMA width for ropekern (which
    computes in fp32 for every input dtype, except the amx unit's bf16 tiles: the AMX-BF16 peak),
    the widest fp32 one for the others."""
    if not ceilings:
        return None, ""
    if name == cand("amx") and dtype == torch.bfloat16:
        return ceilings.get(AMX_PEAK[0]) or None, AMX_PEAK[1]
    for isa, (key, width) in UNIT_PEAK.items():
        if name == cand(isa):
            return ceilings.get(key) or None, width
    if name.startswith("cpu["):
        return None, ""
    key, width = max(UNIT_PEAK.values(), key=lambda kw: ceilings.get(kw[0]) or 0)
    return ceilings.get(key) or None, width


def pct(value: float, ceiling: float | None) -> float | None:
    return 100 * value / ceiling if ceiling else None


def _of(p: float | None, what: str) -> str:
    return f" ({p:.0f}% of {what})" if p is not None else ""


# ---------------------------------------------------------------------------------- ggml peer
class GgmlPeer:
    """llama.cpp's CPU flash attention: benchmarks/tools/ggml_peer.c, built with ggml outside the
    repository by benchmarks/tools/build_ggml_peer.sh. One process per case (graph and inputs
    built once), asked over a pipe for each timed run.

    Two processes share the cores, and an OpenMP pool keeps its threads spinning for a few ms
    after each parallel region (libgomp's default): so a turn waits settle_s before asking (this
    process's threads go to sleep) and after the answer (the driver's do), then wakes torch's
    threads with a small parallel op; the driver wakes its own pool untimed before the timed run.
    Each candidate thus starts with its threads awake and no other process spinning."""

    def __init__(self, folder: Path, threads: int, settle_s: float = 0.03, max_len: int | None = None):
        self.binary, self.threads, self.settle_s, self.max_len = folder / "ggml_peer", threads, settle_s, max_len
        self._wake = torch.zeros(1 << 18)  # more than one grain of at::parallel_for: a parallel add
        res = subprocess.run([str(self.binary), "--info"], capture_output=True, text=True, check=True, timeout=60)
        self.info = json.loads(res.stdout.strip().splitlines()[-1])
        with contextlib.suppress(OSError, ValueError):
            self.info["build"] = json.loads((folder / "version.json").read_text())

    @classmethod
    def find(cls, arg: str | None, threads: int, **kwargs) -> tuple[GgmlPeer | None, str]:
        folder = Path(arg or os.environ.get(GGML_ENV) or GGML_DEFAULT_DIR)
        if not (folder / "ggml_peer").is_file():
            return None, f"no driver at {folder}/ggml_peer (build it: bash benchmarks/tools/build_ggml_peer.sh)"
        try:
            return cls(folder, threads, **kwargs), ""
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            return None, f"{folder}/ggml_peer --info failed: {exc}"

    def command(self, op: str, length: int, kv: str, *extra: str) -> list[str]:
        return [str(self.binary), op, str(length), "--kv", kv, "--threads", str(self.threads), *extra]

    @contextlib.contextmanager
    def serve(self, op: str, length: int, kv: str):
        """A callable that runs the case once in the driver and returns the driver's seconds."""
        proc = subprocess.Popen(
            self.command(op, length, kv, "--warmup", "0", "--serve"),  # interleaved() warms up
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        try:
            if not proc.stdout.readline():
                raise RuntimeError(f"ggml_peer {op} {length} --kv {kv} exited with {proc.wait()} before ready")

            def run() -> float:
                time.sleep(self.settle_s)  # this process's OpenMP threads stop spinning first
                proc.stdin.write("run\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                try:
                    seconds = float(line)
                except ValueError:
                    raise RuntimeError(f"ggml_peer {op} {length} --kv {kv}: {line.strip() or 'no answer'}") from None
                time.sleep(self.settle_s)  # and the driver's, before the next candidate
                self._wake.add_(1.0)  # wakes torch's threads, as any in-process candidate leaves them
                return seconds

            run.self_timed = True
            yield run
        finally:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.write("quit\n")
                proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def numerics(self, units: list[str], kv_types: list[str]) -> list[dict]:
        """Max |ggml - ropekern| of the outputs on one small prefill and one small decode shape
        per cache type, both fed the same inputs (rounded to the cache type's dtype), and each one's
        distance to ropekern's float64 reference on those inputs."""
        import numpy as np

        dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
        rope = rk.RopeConfig(HEAD_DIM)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for op, n, hq, hkv in (("prefill", 256, HQ, HKV), ("decode", 1024, DEC_HQ, DEC_HKV)):
                gen = torch.Generator().manual_seed(1)
                nq = n if op == "prefill" else 1
                q = torch.randn(1, nq, hq, HEAD_DIM, generator=gen)
                k = torch.randn(1, n, hkv, HEAD_DIM, generator=gen)
                v = torch.randn(1, n, hkv, HEAD_DIM, generator=gen)
                lens = torch.tensor([n], dtype=torch.int32)
                for kv in kv_types:
                    qd, kd, vd = (x.to(dtypes[kv]) for x in (q, k, v))
                    for name, x in (("q", qd), ("k", kd), ("v", vd)):
                        x.float().contiguous().numpy().tofile(os.path.join(tmp, f"{name}.f32"))
                    out_file = os.path.join(tmp, "out.f32")
                    extra = ("--hq", str(hq), "--hkv", str(hkv), "--repeats", "1", "--warmup", "0")
                    cmd = self.command(op, n, kv, *extra, "--in", tmp, "--out", out_file)
                    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
                    got = torch.from_numpy(np.fromfile(out_file, dtype=np.float32))
                    got = got.reshape(1, nq, hq, HEAD_DIM).double()
                    if op == "prefill":
                        ref = reference.rope_attention(qd.double(), kd.double(), vd.double(), rope, causal=True)

                        def ours(qd=qd, kd=kd, vd=vd):
                            return rk.rope_attention(qd, kd, vd, rope, causal=True, backend="cpu")
                    else:
                        ref = reference.rope_attention_with_kvcache(
                            qd.double(), kd.double(), vd.double(), rope, cache_seqlens=lens
                        )

                        def ours(qd=qd, kd=kd, vd=vd, lens=lens):
                            return rk.rope_attention_with_kvcache(qd, kd, vd, rope, cache_seqlens=lens, backend="cpu")

                    row = {"op": op, "len": n, "kv": kv, "ggml_vs_ref64": (got - ref).abs().max().item()}
                    for isa in units:
                        mine = on_unit(isa, ours)().double()
                        row[f"ggml_vs_{cand(isa)}"] = (got - mine).abs().max().item()
                        row[f"{cand(isa)}_vs_ref64"] = (mine - ref).abs().max().item()
                    rows.append(row)
                    print(
                        f"ggml numerics {op:>7} {'S' if op == 'prefill' else 'N'}={n} kv {kv:>4}: max |out difference|"
                        + "".join(f" ggml vs {cand(u)} {row[f'ggml_vs_{cand(u)}']:.2e} |" for u in units)
                        + f" ggml vs fp64 ref {row['ggml_vs_ref64']:.2e}"
                        + "".join(f" | {cand(u)} vs fp64 ref {row[f'{cand(u)}_vs_ref64']:.2e}" for u in units[:1]),
                        flush=True,
                    )
        return rows


def ggml_kv_types(dtype: torch.dtype, override: list[str] | None) -> list[str]:
    return override if override is not None else GGML_KV.get(str(dtype).replace("torch.", ""), [])


@contextlib.contextmanager
def with_ggml(cands: dict, ggml: GgmlPeer | None, op: str, length: int, kv_types: list[str], skipped: dict):
    """cands plus one ggml[kv] candidate per cache type (processes ended on exit)."""
    with contextlib.ExitStack() as stack:
        if ggml and ggml.max_len is not None and length > ggml.max_len:
            for kv in kv_types:
                skipped[f"ggml[{kv}] {op} {length}"] = f"above --ggml-max-len {ggml.max_len}"
            print(f"ggml {op} {length}: skipped (above --ggml-max-len {ggml.max_len})", flush=True)
            kv_types = []
        for kv in kv_types if ggml else []:
            try:
                cands[f"ggml[{kv}]"] = stack.enter_context(ggml.serve(op, length, kv))
            except (OSError, RuntimeError) as exc:
                skipped[f"ggml[{kv}] {op} {length}"] = str(exc)
                print(f"ggml[{kv}] {op} {length}: skipped ({exc})", flush=True)
        yield cands


def hf_cos_sin(rope: rk.RopeConfig, positions: torch.Tensor, dtype: torch.dtype):
    """What HF's RotaryEmbedding does: fp32 angles, cos/sin of cat(freqs, freqs), cast to the dtype."""
    inv_freq = rope.inv_freq()
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * rope.attention_factor).to(dtype), (emb.sin() * rope.attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; cos/sin [S, D]."""
    return x * cos + rotate_half(x) * sin


def memcpy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy (STREAM 'Copy' convention)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / best


def prefill_candidates(rope: rk.RopeConfig, s: int, dtype: torch.dtype, units: list[str]) -> dict:
    """The prefill candidates on one set of inputs (q [1, s, HQ, D], k/v [1, s, HKV, D], un-rotated)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, s, HQ, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(1, s, HKV, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(1, s, HKV, HEAD_DIM, generator=gen).to(dtype)
    pos = torch.arange(s)
    g = HQ // HKV

    def ours():
        return rk.rope_attention(q, k, v, rope, causal=True, backend="cpu")

    def base_gqa():
        cos, sin = hf_cos_sin(rope, pos, dtype)
        qr, kr = hf_rope(q.transpose(1, 2), cos, sin), hf_rope(k.transpose(1, 2), cos, sin)
        return F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2), is_causal=True, enable_gqa=True)

    def base_repeat():
        cos, sin = hf_cos_sin(rope, pos, dtype)
        qr, kr = hf_rope(q.transpose(1, 2), cos, sin), hf_rope(k.transpose(1, 2), cos, sin)
        kr, vr = kr.repeat_interleave(g, dim=1), v.transpose(1, 2).repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)

    def sdpa_only():
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )

    cands = {cand(isa): on_unit(isa, ours) for isa in units}
    return cands | {"rope+sdpa(gqa)": base_gqa, "rope+sdpa(repeat)": base_repeat, "sdpa": sdpa_only}


def unit_summary(t: dict[str, float], units: list[str]) -> tuple[str, dict]:
    """The fastest unit, and the avx512 and amx units' speed-ups over avx2 when they ran."""
    best = min(units, key=lambda isa: t[cand(isa)])
    extra = {"best_unit": best}
    for isa in ("avx512", "amx"):
        if isa in units and "avx2" in units:
            extra[f"speedup_{isa}_vs_avx2"] = t[cand("avx2")] / t[cand(isa)]
    return best, extra


def _ratio_line(row: dict) -> str:
    return "".join(
        f" | {isa} vs avx2 x{row[f'speedup_{isa}_vs_avx2']:.2f}"
        for isa in ("avx512", "amx")
        if f"speedup_{isa}_vs_avx2" in row
    )


def bench_prefill(
    seqlens: list[int],
    dtypes: list[torch.dtype],
    repeats: int,
    units: list[str],
    ceilings: dict | None = None,
    ggml: GgmlPeer | None = None,
    ggml_kv: list[str] | None = None,
    skipped: dict | None = None,
) -> list[dict]:
    rope = rk.RopeConfig(HEAD_DIM)
    skipped = {} if skipped is None else skipped
    rows = []
    for dtype in dtypes:
        for s in seqlens:
            cands = prefill_candidates(rope, s, dtype, units)
            with with_ggml(cands, ggml, "prefill", s, ggml_kv_types(dtype, ggml_kv), skipped) as cands:
                t = interleaved(cands, repeats)
            best, extra = unit_summary(t, units)
            tb = t[cand(best)]
            base = min(t["rope+sdpa(gqa)"], t["rope+sdpa(repeat)"])
            flops = 4 * HQ * s * s * HEAD_DIM / 2
            gflops = {name: flops / sec / 1e9 for name, sec in t.items()}
            peaks = {name: flops_peak(ceilings, name, dtype) for name in t}
            row = {
                "op": "prefill",
                "dtype": str(dtype).replace("torch.", ""),
                "seqlen": s,
                "ms": {name: 1e3 * sec for name, sec in t.items()},
                "gflops": gflops,
                "pct_of_fma_peak": {name: pct(gflops[name], peaks[name][0]) for name in t},
                "fma_peak_width": {name: peaks[name][1] for name in t if peaks[name][0]},
                **extra,
                "gflops_cpu": gflops[cand(best)],
                "gflops_sdpa": gflops["sdpa"],
                "speedup_vs_baseline": base / tb,
                "speedup_vs_sdpa": t["sdpa"] / tb,
                "speedup_vs_ggml": {name[5:-1]: sec / tb for name, sec in t.items() if name.startswith("ggml[")},
            }
            rows.append(row)
            p = row["pct_of_fma_peak"]
            units_txt = " | ".join(
                f"{isa} {row['ms'][cand(isa)]:8.1f} ms {gflops[cand(isa)]:6.1f} GFLOP/s"
                + _of(p[cand(isa)], peaks[cand(isa)][1] + " peak")
                for isa in units
            )
            others = [f"baseline {1e3 * base:8.1f} ms x{row['speedup_vs_baseline']:.2f}"]
            others.append(f"sdpa {row['ms']['sdpa']:8.1f} ms x{row['speedup_vs_sdpa']:.2f}")
            others += [
                f"{name} {row['ms'][name]:8.1f} ms {gflops[name]:6.1f} GFLOP/s{_of(p[name], 'peak')}"
                f" x{t[name] / tb:.2f}"
                for name in t
                if name.startswith("ggml[")
            ]
            print(
                f"prefill {row['dtype']:>8} S={s:>6}: {units_txt}{_ratio_line(row)}\n"
                f"{'':>26}vs {best}: " + " | ".join(others),
                flush=True,
            )
    return rows


def _bw(row: dict, name: str) -> str:
    read = row["pct_of_read"][name]
    read = f"{read:.0f}% of read, " if read is not None else ""
    return f"{row['kv_gbps'][name]:5.1f} GB/s ({read}{row['pct_of_memcpy_by_name'][name]:.0f}% of memcpy)"


def decode_candidates(rope: rk.RopeConfig, n: int, dtype: torch.dtype, units: list[str]) -> tuple[dict, int]:
    """The decode candidates for a cache of n keys, and the bytes of K and V they read."""
    g = DEC_HQ // DEC_HKV
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, DEC_HQ, HEAD_DIM, generator=gen).to(dtype)
    k_cache = torch.randn(1, n, DEC_HKV, HEAD_DIM, generator=gen).to(dtype)  # un-rotated, ours
    v_cache = torch.randn(1, n, DEC_HKV, HEAD_DIM, generator=gen).to(dtype)
    lens = torch.tensor([n], dtype=torch.int32)
    # The baseline's cache: HF layout [B, Hkv, S, D], keys rotated once when they were appended.
    inv64, _ = rope.tables()
    cos_all, sin_all = cos_sin(torch.arange(n), inv64[0], rope.attention_factor, torch.float32, angles="fp32")
    k_rot = rotate(k_cache[0].float(), cos_all[:, None], sin_all[:, None], HEAD_DIM, False)  # [n, Hkv, D]
    k_hf = k_rot.to(dtype).permute(1, 0, 2).unsqueeze(0).contiguous()
    v_hf = v_cache.permute(0, 2, 1, 3).contiguous()
    pos = torch.tensor([n - 1])

    def ours():
        return rk.rope_attention_with_kvcache(q, k_cache, v_cache, rope, cache_seqlens=lens, backend="cpu")

    def base_sdpa():
        cos, sin = hf_cos_sin(rope, pos, dtype)
        qr = hf_rope(q.transpose(1, 2), cos, sin)
        return F.scaled_dot_product_attention(qr, k_hf, v_hf, enable_gqa=True)

    def base_einsum():
        cos, sin = hf_cos_sin(rope, pos, dtype)
        qr = hf_rope(q.transpose(1, 2), cos, sin).reshape(1, DEC_HKV, g, HEAD_DIM)
        scores = torch.einsum("bhgd,bhsd->bhgs", qr, k_hf) * HEAD_DIM**-0.5
        return torch.einsum("bhgs,bhsd->bhgd", scores.softmax(-1), v_hf)

    kv_bytes = 2 * n * DEC_HKV * HEAD_DIM * k_cache.element_size()
    cands = {cand(isa): on_unit(isa, ours) for isa in units}
    return cands | {"rope+sdpa": base_sdpa, "rope+einsum": base_einsum}, kv_bytes


def bench_decode(
    cache_lens: list[int],
    dtypes: list[torch.dtype],
    repeats: int,
    memcpy_bps: float,
    units: list[str],
    ceilings: dict | None = None,
    ggml: GgmlPeer | None = None,
    ggml_kv: list[str] | None = None,
    skipped: dict | None = None,
) -> list[dict]:
    rope = rk.RopeConfig(HEAD_DIM)
    skipped = {} if skipped is None else skipped
    read_bps = 1e9 * ceilings["read_gbs"] if ceilings and ceilings.get("read_gbs") else None
    rows = []
    for dtype in dtypes:
        for n in cache_lens:
            cands, kv_bytes = decode_candidates(rope, n, dtype, units)
            with with_ggml(cands, ggml, "decode", n, ggml_kv_types(dtype, ggml_kv), skipped) as cands:
                t = interleaved(cands, repeats)
            best, extra = unit_summary(t, units)
            tb = t[cand(best)]
            base = min(t["rope+sdpa"], t["rope+einsum"])
            nbytes = {name: kv_bytes for name in t}
            nbytes |= {
                name: 2 * n * DEC_HKV * HEAD_DIM * GGML_ESIZE[name[5:-1]] for name in t if name.startswith("ggml[")
            }
            gbps = {name: nbytes[name] / sec / 1e9 for name, sec in t.items()}
            row = {
                "op": "decode",
                "dtype": str(dtype).replace("torch.", ""),
                "cache_len": n,
                "ms": {name: 1e3 * sec for name, sec in t.items()},
                "kv_gbps": gbps,
                "pct_of_read": {name: pct(1e9 * gbps[name], read_bps) for name in t},
                "pct_of_memcpy_by_name": {name: 100 * 1e9 * gbps[name] / memcpy_bps for name in t},
                **extra,
                "kv_gbps_cpu": gbps[cand(best)],
                "kv_gbps_baseline": kv_bytes / base / 1e9,
                "pct_of_memcpy": 100 * kv_bytes / tb / memcpy_bps,
                "speedup_vs_baseline": base / tb,
                "speedup_vs_ggml": {name[5:-1]: sec / tb for name, sec in t.items() if name.startswith("ggml[")},
            }
            rows.append(row)
            units_txt = " | ".join(f"{isa} {row['ms'][cand(isa)]:8.2f} ms {_bw(row, cand(isa))}" for isa in units)
            others = [f"baseline {1e3 * base:8.2f} ms {row['kv_gbps_baseline']:5.1f} GB/s x{base / tb:.2f}"]
            others += [
                f"{name} {row['ms'][name]:8.2f} ms {_bw(row, name)} x{t[name] / tb:.2f}"
                for name in t
                if name.startswith("ggml[")
            ]
            print(
                f"decode  {row['dtype']:>8} N={n:>6}: {units_txt}{_ratio_line(row)}\n"
                f"{'':>26}vs {best}: " + " | ".join(others),
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------- forward + backward
def backward_candidates(rope: rk.RopeConfig, s: int, heads: tuple[int, int], dtype: torch.dtype) -> dict:
    """Forward + backward (through autograd, causal) on one set of leaves: ropekern's cpu backend
    with its native backward (``ropekern::bwd``, the default) and with the PyTorch recompute it
    replaced, eager RoPE + SDPA (torch's fused SDPA backward) and SDPA without RoPE."""
    from ropekern.backends import native

    hq, hkv = heads
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, s, hq, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(1, s, hkv, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(1, s, hkv, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(1, s, hq, HEAD_DIM, generator=gen).to(dtype)
    pos = torch.arange(s)

    def step(forward):
        def run():
            for t in (q, k, v):
                t.grad = None
            forward().backward(dout)

        return run

    def ours():
        return rk.rope_attention(q, k, v, rope, causal=True, backend="cpu")

    def ours_recompute():
        check = native.cpu_backend.check_backward
        native.cpu_backend.check_backward = lambda call: "the recompute, for comparison"
        try:
            step(ours)()
        finally:
            native.cpu_backend.check_backward = check

    def base_gqa():
        cos, sin = hf_cos_sin(rope, pos, dtype)
        qr, kr = hf_rope(q.transpose(1, 2), cos, sin), hf_rope(k.transpose(1, 2), cos, sin)
        out = F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2), is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)

    def sdpa_only():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2)

    return {
        "rk-cpu": step(ours),
        "rk-cpu(recompute)": ours_recompute,
        "rope+sdpa": step(base_gqa),
        "sdpa": step(sdpa_only),
    }


def bench_backward(
    seqlens: list[int], heads: list[tuple[int, int]], dtypes: list[torch.dtype], repeats: int
) -> list[dict]:
    """Forward + backward rows: median ms of each candidate, interleaved, and ropekern's speed-ups."""
    rope = rk.RopeConfig(HEAD_DIM)
    rows = []
    for dtype in dtypes:
        for hq, hkv in heads:
            for s in seqlens:
                t = interleaved(backward_candidates(rope, s, (hq, hkv), dtype), repeats)
                ours = t["rk-cpu"]
                row = {
                    "op": "forward+backward",
                    "dtype": str(dtype).replace("torch.", ""),
                    "heads": f"{hq}/{hkv}",
                    "seqlen": s,
                    "unit": native_isa(),
                    "ms": {name: 1e3 * sec for name, sec in t.items()},
                    "speedup_vs_baseline": t["rope+sdpa"] / ours,
                    "speedup_vs_sdpa": t["sdpa"] / ours,
                    "speedup_vs_recompute": t["rk-cpu(recompute)"] / ours,
                }
                rows.append(row)
                print(
                    f"fwd+bwd {row['dtype']:>8} {hq}/{hkv} S={s:>6}: rk-cpu {1e3 * ours:8.1f} ms | "
                    f"rope+sdpa {row['ms']['rope+sdpa']:8.1f} ms x{row['speedup_vs_baseline']:.2f} | "
                    f"sdpa {row['ms']['sdpa']:8.1f} ms x{row['speedup_vs_sdpa']:.2f} | "
                    f"recompute {row['ms']['rk-cpu(recompute)']:8.1f} ms x{row['speedup_vs_recompute']:.2f}",
                    flush=True,
                )
    return rows


def native_isa() -> str:
    from ropekern.backends import native

    return native.cpu_isa()


_MEMORY_CHILD = r"""
import sys, torch, ropekern as rk
import torch.nn.functional as F

def status(key):  # kB from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

s, which, dtype = int(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3])
q = torch.randn(1, s, {hq}, {d}).to(dtype); k = torch.randn(1, s, {hkv}, {d}).to(dtype); v = torch.randn_like(k)
rope = rk.RopeConfig({d})
rk.rope_attention(q[:, :64], k[:, :64], v[:, :64], rope, causal=True)  # load everything first
with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (VmHWM) to the current RSS
    f.write("5")
before = status("VmRSS:")
backward = which.endswith("+bwd")
if backward:
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    which = which[: -len("+bwd")]
if which == "cpu":
    out = rk.rope_attention(q, k, v, rope, causal=True, backend="cpu")
else:
    from bench_cpu import hf_cos_sin, hf_rope
    cos, sin = hf_cos_sin(rope, torch.arange(s), dtype)
    qr, kr = hf_rope(q.transpose(1, 2), cos, sin), hf_rope(k.transpose(1, 2), cos, sin)
    out = F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2), is_causal=True, enable_gqa=True)
if backward:
    out.backward(torch.ones_like(out))
print((status("VmHWM:") - before) * 1024)
"""


def bench_memory(seqlen: int, dtype: torch.dtype, which: str) -> dict:
    """Peak memory of one prefill in a fresh process: the inputs plus the growth of the resident set
    during the call (Linux VmHWM, reset just before it), which includes the output. ``which`` is
    ``cpu`` or ``baseline`` (eager RoPE + SDPA), ``+bwd`` appended for forward + backward (the
    growth then includes the gradients)."""
    code = _MEMORY_CHILD.format(hq=HQ, hkv=HKV, d=HEAD_DIM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.getcwd()]))
    res = subprocess.run(
        [sys.executable, "-c", code, str(seqlen), which, str(dtype).replace("torch.", "")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    growth = int(res.stdout.strip().splitlines()[-1])
    esize = torch.empty(0, dtype=dtype).element_size()
    qkvo = (2 * seqlen * HQ + 2 * seqlen * HKV) * HEAD_DIM * esize
    inputs = (seqlen * HQ + 2 * seqlen * HKV) * HEAD_DIM * esize
    peak = inputs + growth
    row = {
        "op": "memory",
        "which": which,
        "dtype": str(dtype).replace("torch.", ""),
        "seqlen": seqlen,
        "bytes_qkvo": qkvo,
        "peak_bytes": peak,
        "ratio": peak / qkvo,
    }
    print(
        f"memory  {which:>12} {row['dtype']} S={seqlen}: peak {peak / 2**20:8.0f} MiB = {row['ratio']:.2f} x "
        f"bytes(q, k, v, out) ({qkvo / 2**20:.0f} MiB)",
        flush=True,
    )
    return row


def cpu_info() -> dict:
    """The CPU model and the flags that decide the kernel units and the ceilings (/proc/cpuinfo)."""
    model, flags = platform.processor(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {"cpu": model, "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS}}


def environment(units: list[str], units_skipped: dict[str, str]) -> dict:
    from ropekern.backends.native import cpu_isa

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        **cpu_info(),
        "threads": torch.get_num_threads(),
        "isa": cpu_isa(),
        "units": units,
        "units_skipped": units_skipped,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1min_at_start": load,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short sweep (1K-4K prefill, 4K-16K decode)")
    parser.add_argument("--prefill", type=int, nargs="*", help="prefill lengths (default 1K..16K)")
    parser.add_argument("--decode", type=int, nargs="*", help="decode cache lengths (default 4K..64K)")
    parser.add_argument(
        "--backward", type=int, nargs="*", default=[], help="forward + backward lengths (default none: not timed)"
    )
    parser.add_argument(
        "--backward-heads", nargs="*", default=["8/2", "16/4"], help="query/kv heads of the backward rows"
    )
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 5, 3 above 4K)")
    parser.add_argument("--memory-seqlen", type=int, default=32768, help="0 skips the memory measurement")
    parser.add_argument("--memory-baseline", action="store_true", help="also measure the baseline's peak memory")
    parser.add_argument(
        "--memory-backward", action="store_true", help="measure forward + backward peak memory (ours and baseline)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for every candidate (default: torch's)")
    parser.add_argument(
        "--sweep-mb", type=int, default=0, help="read this many MB before every timed call (default 0: none)"
    )
    parser.add_argument("--generic", action="store_true", help="also time the generic kernel unit (~10x slower)")
    parser.add_argument(
        "--ceilings",
        metavar="FILE.json",
        help="cpu_roofline.c's --json output to use instead of running it at the start; 'none' skips the ceilings",
    )
    parser.add_argument("--roofline-mib", type=int, default=512, help="buffer of the read/memcpy ceilings (MiB)")
    parser.add_argument(
        "--ggml",
        metavar="DIR",
        help=f"folder of the built ggml peer (default ${GGML_ENV} or {GGML_DEFAULT_DIR}); 'none' skips it",
    )
    parser.add_argument(
        "--ggml-kv", nargs="*", choices=sorted(GGML_ESIZE), help="ggml cache types for every dtype (default by dtype)"
    )
    parser.add_argument(
        "--ggml-max-len",
        type=int,
        help="no ggml above this prefill length or decode cache length (its bf16 prefill is the slow one)",
    )
    parser.add_argument(
        "--ggml-settle-ms",
        type=float,
        default=30.0,
        help="pause before and after each ggml run, for the other process's OpenMP threads to stop spinning",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    global _SWEEP
    _SWEEP = torch.ones(args.sweep_mb << 18) if args.sweep_mb > 0 else None

    prefill = args.prefill if args.prefill is not None else ([1024, 2048, 4096] if args.quick else [1024, 4096, 16384])
    decode = args.decode if args.decode is not None else ([4096, 16384] if args.quick else [4096, 16384, 65536])
    dtypes = [getattr(torch, d) for d in args.dtypes]
    units, units_skipped = kernel_units(args.generic)
    if not units:
        print(f"no ropekern kernel unit runs here: {units_skipped}", file=sys.stderr)
        return 1
    env = environment(units, units_skipped)
    print(json.dumps(env))
    print(
        f"kernel units: {', '.join(units)}" + "".join(f"; {isa} skipped: {why}" for isa, why in units_skipped.items())
    )
    ceilings = load_ceilings(args.ceilings, threads, args.roofline_mib)
    bw = memcpy_bandwidth()
    print(f"memcpy bandwidth (torch copy): {bw / 1e9:.1f} GB/s (read + write)")

    skipped: dict[str, str] = {}
    settle = args.ggml_settle_ms / 1e3
    ggml, why = (
        (None, "--ggml none")
        if args.ggml == "none"
        else GgmlPeer.find(args.ggml, threads, settle_s=settle, max_len=args.ggml_max_len)
    )
    ggml_record: dict = {"skipped": why} if ggml is None else {"info": ggml.info}
    if ggml is None:
        print(f"ggml peer: skipped ({why})")
    else:
        build = ggml.info.get("build", {})
        print(
            f"ggml peer: {ggml.binary} (ggml {ggml.info.get('ggml')}"
            + (f" from llama-cpp-python {build['llama_cpp_python']}" if "llama_cpp_python" in build else "")
            + f", {threads} threads; avx512 {ggml.info.get('avx512')}, avx512_bf16 {ggml.info.get('avx512_bf16')})."
            " Its own process, interleaved per run, timed by its own clock around ggml_graph_compute.",
            flush=True,
        )
        kv_types = (
            args.ggml_kv if args.ggml_kv is not None else sorted({kv for d in dtypes for kv in ggml_kv_types(d, None)})
        )
        try:
            ggml_record["numerics"] = ggml.numerics(units, kv_types)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            ggml, ggml_record = None, {"skipped": f"numerics check failed: {exc}"}
            print(f"ggml peer: skipped (numerics check failed: {exc})")

    results = {
        "environment": env,
        "ceilings": ceilings,
        "memcpy_gbps": bw / 1e9,
        "sweep_mb": args.sweep_mb,
        "ggml": ggml_record,
        "rows": [],
    }
    for s in prefill:
        reps = args.repeats or (5 if s <= 4096 else 3)
        results["rows"] += bench_prefill([s], dtypes, reps, units, ceilings, ggml, args.ggml_kv, skipped)
    for n in decode:
        results["rows"] += bench_decode(
            [n], dtypes, args.repeats or 15, bw, units, ceilings, ggml, args.ggml_kv, skipped
        )
    if args.backward:
        heads = [tuple(int(x) for x in h.split("/")) for h in args.backward_heads]
        results["rows"] += bench_backward(args.backward, heads, dtypes, args.repeats or 3)
    if args.memory_seqlen:
        whiches = ["cpu", "baseline"] if args.memory_baseline else ["cpu"]
        if args.memory_backward:
            whiches += ["cpu+bwd", "baseline+bwd"]
        for which in whiches:
            results["rows"].append(bench_memory(args.memory_seqlen, dtypes[0], which))
    if skipped:
        results["skipped"] = skipped
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
