"""``ropekern check``: every available backend against the fp64 reference over a sweep.

Each case compares a backend's output (and LSE) with the oracle under the docs/design.md §5 error-ratio
rule. Prints a pass/fail table and exits non-zero when any case fails.
"""

from __future__ import annotations

import itertools
import time

import torch

from .laws import LAWS

HELP = "check every available backend against the fp64 reference (pass/fail table; exit 1 on failure)"

# The sweep's laws take every path through the kernels: a shared table (default, llama3's bands),
# per-sequence tables (dynamic, longrope) and a magnitude factor (yarn, longrope); linear, ntk and
# proportional change only the shared table's values. Each is its law's canonical example for the
# sweep's 32 rotated channels, switching at 64 tokens.
KINDS = ("default", "dynamic", "yarn", "longrope", "llama3")
ROPES = {kind: LAWS[kind].example(32, 64) for kind in KINDS}


def add_arguments(parser) -> None:
    parser.add_argument("--backend", action="append", help="backend(s) to check (default: every available one)")
    parser.add_argument("--device", default=None, help="device for the inputs (default: cuda if present, else cpu)")
    parser.add_argument("--quick", action="store_true", help="a smaller sweep")


def _cases(quick: bool):
    dtypes = [torch.float32, torch.bfloat16] if not quick else [torch.float32]
    shapes = [(1, 17, 17), (2, 1, 129), (2, 113, 40)] if not quick else [(1, 17, 17), (2, 1, 40)]
    for dtype, (b, sq, sk), causal, kind, interleaved in itertools.product(
        dtypes, shapes, (False, True), ROPES, (False, True)
    ):
        if quick and interleaved:
            continue
        yield dict(dtype=dtype, b=b, sq=sq, sk=sk, causal=causal, kind=kind, interleaved=interleaved)


def _run_case(backend: str, case: dict, device: str):
    import ropekern as rk
    from ropekern.testing import baseline_attention, error_check, oracle_attention, random_qkv

    rope = rk.RopeConfig(64, base=10000.0, rotary_dim=32, interleaved=case["interleaved"], **ROPES[case["kind"]])
    q, k, v, _ = random_qkv(case["b"], case["sq"], case["sk"], 8, 2, 64, case["dtype"], device=device)
    kw = dict(causal=case["causal"])
    out, lse = rk.rope_attention(q, k, v, rope, return_lse=True, backend=backend, **kw)
    ref_out, ref_lse = oracle_attention(q, k, v, rope, **kw)
    base_out, base_lse = baseline_attention(q, k, v, rope, **kw)
    a = error_check(out, ref_out, base_out, case["dtype"])
    b = error_check(lse, ref_lse, base_lse, torch.float32)
    return a.ok and b.ok, a.max_err, a.max_bound


def run(args) -> int:
    import ropekern as rk

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    available = {n: s for n, s in rk.available_backends().items() if s is True}
    backends = args.backend or list(available)
    missing = [b for b in backends if b not in available]
    for name in missing:
        print(f"{name}: not available ({rk.available_backends().get(name, 'unknown backend')})")
    backends = [b for b in backends if b in available]
    rows, failures = [], 0
    start = time.time()
    for backend in backends:
        for case in _cases(args.quick):
            label = (
                f"{backend:<7} {str(case['dtype']).replace('torch.', ''):<8} {case['kind']:<8} "
                f"b={case['b']} sq={case['sq']:<3} sk={case['sk']:<3} causal={int(case['causal'])} "
                f"il={int(case['interleaved'])}"
            )
            try:
                ok, err, bound = _run_case(backend, case, device)
                verdict = f"{'pass' if ok else 'FAIL'}  err {err:.2e} <= {bound:.2e}"
            except ValueError as exc:  # the backend declined this call: report, not a failure
                ok, verdict = True, f"skip  ({exc})"
            except Exception as exc:
                ok, verdict = False, f"FAIL  {type(exc).__name__}: {exc}"
            failures += not ok
            rows.append(f"{label}  {verdict}")
            print(rows[-1], flush=True)
    print(f"\n{len(rows) - failures}/{len(rows)} cases passed on {device} in {time.time() - start:.1f} s")
    return 1 if failures or missing or not rows else 0
