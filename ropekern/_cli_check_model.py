"""``ropekern check-model PATH``: is patching this checkpoint safe?

Loads a local transformers checkpoint (no network) twice: in the test dtype (stock, then patched in
place) and in float64 as the oracle, ``hf.exact_reference``: the stock transformers forward with
exact (fp64-angle) RoPE tables, independent of the patched code path. Random prompts, batched with
left padding, give two checks under the docs/design.md §5 error-ratio rule (baseline: the stock model's own
full forward in the test dtype):

* prefill: the patched model's logits at every real token;
* cached decode: the last ``--decode`` tokens fed one at a time through a ``DynamicCache`` of the
  patched model (un-rotated keys), each against the oracle's full forward of that prefix.

Prints the RoPE layout it found (half-split or interleaved pairs, rotary dim), the errors, top-1
agreement with the oracle, and a verdict; exits 1 on failure or an unsupported model, 2 on bad input.
"""

from __future__ import annotations

from pathlib import Path

import torch

HELP = "patch a local transformers checkpoint and compare its logits with the stock model (exit 1 on failure)"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser) -> None:
    parser.add_argument("path", help="local checkpoint directory (config.json + weights); nothing is downloaded")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="test dtype (default float32)")
    parser.add_argument("--device", default=None, help="device (default: cuda if present, else cpu)")
    parser.add_argument("--backend", default="auto", help="ropekern backend for the patched model (default auto)")
    parser.add_argument("--prompts", type=int, default=3, help="random prompts, batched with left padding")
    parser.add_argument("--length", type=int, default=48, help="tokens in the longest prompt")
    parser.add_argument("--decode", type=int, default=8, help="last tokens decoded one at a time through the cache")
    parser.add_argument("--seed", type=int, default=0)


def _prompts(n: int, length: int, vocab: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded random prompts: ids, mask and generate()'s positions ``cumsum(mask) - 1``, each ``[n, length]``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        real = length - (length // 2) * i // max(1, n - 1)  # from `length` down to length // 2
        mask[i, : length - real] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), pos.to(device)


@torch.no_grad()
def _decode_logits(model, ids, mask, pos, steps: int) -> torch.Tensor:
    """Logits ``[B, steps, V]`` at the last ``steps`` positions, each from a one-token cached step."""
    from transformers import DynamicCache

    from ropekern.integrations.hf import cache_keyword

    cache = {cache_keyword(model): DynamicCache(config=model.config)}
    start = ids.shape[1] - steps
    model(ids[:, :start], attention_mask=mask[:, :start], position_ids=pos[:, :start], **cache)
    out = []
    for t in range(start, ids.shape[1]):
        step = model(
            ids[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            position_ids=pos[:, t : t + 1],
            **cache,
            use_cache=True,
        )
        out.append(step.logits[:, -1])
    return torch.stack(out, dim=1)


@torch.no_grad()
def _prefix_logits(model, ids, mask, pos, steps: int) -> torch.Tensor:
    """Logits ``[B, steps, V]`` at the last ``steps`` positions, each from a full forward of its prefix
    (for dynamic NTK / LongRoPE the table depends on the prefix length)."""
    out = []
    for t in range(ids.shape[1] - steps, ids.shape[1]):
        n = t + 1
        out.append(
            model(ids[:, :n], attention_mask=mask[:, :n], position_ids=pos[:, :n], use_cache=False).logits[:, -1]
        )
    return torch.stack(out, dim=1)


def _line(name: str, check, patched_top1: float, stock_top1: float) -> str:
    return (
        f"{name:<14} max err {check.max_err:.3g} <= {check.max_bound:.3g}, mean err {check.mean_err:.3g} <= "
        f"{check.mean_bound:.3g}; top-1 = fp64: patched {patched_top1:.1%}, stock {stock_top1:.1%}  "
        f"{'PASS' if check.ok else 'FAIL'}"
    )


def run(args) -> int:
    path = Path(args.path)
    if not (path / "config.json").is_file():
        print(f"check-model: {path} is not a checkpoint directory (no config.json)")
        return 2
    if args.prompts < 1 or args.decode < 1 or args.length < 2 * args.decode + 2:
        print("check-model: need --prompts >= 1, --decode >= 1 and --length >= 2 * decode + 2")
        return 2
    from transformers import AutoModelForCausalLM

    import ropekern as rk

    from .integrations import hf
    from .testing import error_check

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype]

    def load(dt):
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dt, attn_implementation="eager")
        return model.to(device).eval()

    model, oracle = load(dtype), load(torch.float64)
    try:
        hf.exact_reference(oracle)
        rope = hf.rope_config(hf.patch(model, backend=args.backend))
    except ValueError as exc:
        print(f"{type(model).__name__}: ropekern cannot patch this model: {exc}")
        print("verdict: FAIL")
        return 1
    hf.unpatch(model)
    layout = "interleaved pairs (2i, 2i+1)" if rope.interleaved else "half-split pairs (i, i+R/2)"
    print(f"model   {type(model).__name__} from {path}")
    print(f"rope    {rope}")
    print(f"layout  {layout}, rotary_dim {rope.rotary_dim} of head_dim {rope.head_dim}")
    print(f"backend {args.backend} (available: {[n for n, ok in rk.available_backends().items() if ok is True]})")

    ids, mask, pos = _prompts(args.prompts, args.length, model.config.vocab_size, args.seed, device)
    print(f"inputs  {args.prompts} prompts of {int(mask.sum(1).min())}..{args.length} tokens (left-padded), "
          f"{args.decode} cached decode steps, {args.dtype} on {device}")  # fmt: skip
    steps = args.decode
    with torch.no_grad():
        kw = dict(attention_mask=mask, position_ids=pos, use_cache=False)
        stock, stock_tail = model(ids, **kw).logits, _prefix_logits(model, ids, mask, pos, steps)
        reference, reference_tail = oracle(ids, **kw).logits, _prefix_logits(oracle, ids, mask, pos, steps)
        hf.patch(model, backend=args.backend)
        patched = model(ids, **kw).logits
    decoded = _decode_logits(model, ids, mask, pos, steps)
    hf.unpatch(model)

    def top1(x, ref):
        return float((x.argmax(-1) == ref.argmax(-1)).double().mean())

    real = mask.bool()
    prefill = error_check(patched[real], reference[real], stock[real], dtype)
    decode = error_check(decoded, reference_tail, stock_tail, dtype)
    print(_line("prefill", prefill, top1(patched[real], reference[real]), top1(stock[real], reference[real])))
    print(_line("cached decode", decode, top1(decoded, reference_tail), top1(stock_tail, reference_tail)))
    ok = prefill.ok and decode.ok
    print(f"verdict: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1
