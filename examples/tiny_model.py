"""A tiny RoPE decoder-only transformer whose attention is ``rk.rope_attention``.

The rotary embedding is a swappable ``RopeConfig`` (``model.rope``), so one set of weights can be
run with plain extrapolation, Position Interpolation (``linear``), NTK, dynamic NTK, YaRN or
LongRoPE scaling, and fine-tuned through ``rk.rope_attention``'s backward. The task is passkey
retrieval in the Position Interpolation paper's format (``ropekern.eval``) over a word-level
vocabulary of 55 tokens. Everything is deterministic for a seed (CPU, fixed thread count).

    model = TinyLM(TinyConfig(vocab_size=len(tok)))
    train(model, tok, steps=500, length=128, seed=0)
    model.rope = scaled_rope(model.config, "linear", factor=4)   # PI at 4x the trained length
    evaluate(model, tok, lengths=[512], depths=[0.1, 0.5, 0.9], n=64)

Used by ``examples/extend_context.py``; run this file directly to train one model at 128 tokens
(``--steps``, ``--save PATH``) and print its passkey accuracy.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ropekern as rk
from ropekern.eval import PasskeySample, PasskeyTemplate, passkey_samples, passkey_scores

__all__ = [
    "WordTokenizer",
    "TinyConfig",
    "TinyLM",
    "scaled_rope",
    "SCALINGS",
    "training_batch",
    "train",
    "evaluate",
    "save",
    "load",
]

_WORD = re.compile(r"\d|[A-Za-z]+|[^\sA-Za-z\d]")


class WordTokenizer:
    """Word-level tokenizer: one token per word, digit and punctuation mark.

    ``encode(text) -> list[int]``, ``decode(ids) -> str``; unknown words map to ``<unk>`` (id 1).
    Digits are single tokens, so a 5-digit passkey is 5 tokens.
    """

    def __init__(self, words: list[str]):
        specials = ["<pad>", "<unk>"]
        digits = [str(d) for d in range(10)]
        rest = sorted({w for w in words if w not in specials and w not in digits})
        self.vocab = specials + digits + rest
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def for_template(cls, template: PasskeyTemplate | None = None) -> WordTokenizer:
        """The vocabulary of a passkey template (the PI paper's wording by default)."""
        t = template or PasskeyTemplate()
        text = " ".join([t.prefix, t.filler, t.needle, t.question, t.answer]).replace("{passkey}", "0")
        return cls(_WORD.findall(text))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, 1) for w in _WORD.findall(text)]

    def decode(self, ids: list[int]) -> str:
        out = ""
        for i in ids:
            w = self.vocab[int(i)]
            glue = not out or (w.isdigit() and out[-1].isdigit()) or not w[0].isalnum()
            out += w if glue else " " + w
        return out


@dataclass
class TinyConfig:
    """Shape of the model. ``train_len`` is the context the model is trained at (the scaling
    laws' original length); ``rope_base`` its rotary base."""

    vocab_size: int
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 2
    n_kv_heads: int = 2
    head_dim: int = 32
    mlp_mult: int = 4
    rope_base: float = 10000.0
    train_len: int = 128

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_mult", "train_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyConfig: `{name}` must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"TinyConfig: `n_heads` ({self.n_heads}) must be a multiple of `n_kv_heads`")


# Methods of extending the context; each maps (config, factor) to a RoPE scaling dict.
SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn")


def scaled_rope(config: TinyConfig, method: str | dict | None = "none", factor: float = 4.0) -> rk.RopeConfig:
    """The model's ``RopeConfig`` with a context-extension method applied.

    ``method``: ``"none"`` (plain extrapolation), ``"linear"`` (Position Interpolation), ``"ntk"``,
    ``"dynamic"``, ``"yarn"``, or a full scaling dict (e.g. a searched ``longrope`` one).
    ``factor``: the extension ratio (target length / ``config.train_len``).
    """
    if isinstance(method, dict) or method is None:
        scaling = method
    elif method == "none":
        scaling = None
    elif method in ("linear", "ntk"):
        scaling = {"rope_type": method, "factor": factor}
    elif method in ("dynamic", "yarn"):
        scaling = {"rope_type": method, "factor": factor, "original_max_position_embeddings": config.train_len}
    else:
        raise ValueError(f"scaled_rope: `method` must be one of {SCALINGS} or a scaling dict, got {method!r}")
    return rk.RopeConfig(
        config.head_dim, base=config.rope_base, scaling=scaling, max_position_embeddings=config.train_len
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Causal GQA self-attention; RoPE is applied inside ``rk.rope_attention``."""

    def __init__(self, c: TinyConfig):
        super().__init__()
        self.c = c
        self.wq = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: rk.RopeConfig, positions: torch.Tensor, backend: str) -> torch.Tensor:
        b, s, _ = x.shape
        c = self.c
        q = self.wq(x).view(b, s, c.n_heads, c.head_dim)
        k = self.wk(x).view(b, s, c.n_kv_heads, c.head_dim)
        v = self.wv(x).view(b, s, c.n_kv_heads, c.head_dim)
        if positions.shape[0] == 1 and b > 1:
            # Every row sits at the same positions: fold the batch into the heads (query head
            # (row, h) reads kv head (row, h // group), which is exactly GQA's h // group rule over
            # b * n_heads heads). One call instead of b: the torch reference loops over sequences
            # in Python, and this is 2.5x faster for a training step at b=32, S=128.
            def fold(t: torch.Tensor) -> torch.Tensor:
                return t.transpose(0, 1).reshape(1, s, b * t.shape[2], c.head_dim)

            o = rk.rope_attention(
                fold(q), fold(k), fold(v), rope, causal=True, q_positions=positions, k_positions=positions,
                backend=backend,
            )  # fmt: skip
            o = o.view(s, b, c.n_heads, c.head_dim).transpose(0, 1)
        else:
            o = rk.rope_attention(
                q, k, v, rope, causal=True, q_positions=positions.expand(b, s), k_positions=positions.expand(b, s),
                backend=backend,
            )  # fmt: skip
        return self.wo(o.reshape(b, s, c.n_heads * c.head_dim))


class Block(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(c.d_model), RMSNorm(c.d_model)
        self.attn = Attention(c)
        self.mlp = nn.Sequential(
            nn.Linear(c.d_model, c.mlp_mult * c.d_model, bias=False),
            nn.GELU(),
            nn.Linear(c.mlp_mult * c.d_model, c.d_model, bias=False),
        )

    def forward(self, x: torch.Tensor, rope: rk.RopeConfig, positions: torch.Tensor, backend: str) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, positions, backend)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Pre-norm decoder-only transformer with tied embeddings.

    ``forward(input_ids int [B, S], positions=None) -> logits float32 [B, S, vocab]``; positions
    default to ``0..S-1`` (int ``[S]`` shared by all rows, or ``[B, S]``). ``rope`` (a
    ``RopeConfig`` with ``head_dim == config.head_dim``) may be swapped at any time; ``backend``
    is passed to ``rk.rope_attention``.
    """

    def __init__(self, config: TinyConfig, rope: rk.RopeConfig | None = None, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.rope = rope if rope is not None else scaled_rope(config, "none")
        self.backend = backend
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's depth scaling of the residual projections
            for out_proj in (block.attn.wo, block.mlp[2]):
                nn.init.normal_(out_proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def rope(self) -> rk.RopeConfig:
        return self._rope

    @rope.setter
    def rope(self, rope: rk.RopeConfig) -> None:
        if not isinstance(rope, rk.RopeConfig):
            raise TypeError(f"TinyLM.rope must be a ropekern.RopeConfig, got {type(rope).__name__}")
        if rope.head_dim != self.config.head_dim:
            raise ValueError(f"TinyLM.rope: head_dim {rope.head_dim} differs from the model's {self.config.head_dim}")
        self._rope = rope

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"TinyLM: `input_ids` must be [B, S], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if positions is None:
            positions = torch.arange(s, device=input_ids.device)
        if positions.dim() == 1:
            positions = positions[None]
        if positions.shape[-1] != s or positions.shape[0] not in (1, b):
            raise ValueError(f"TinyLM: `positions` must be [S] or [B, S], got {tuple(positions.shape)}")
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, self.rope, positions, self.backend)
        return F.linear(self.norm(x), self.embed.weight)

    def forward_windows(self, windows: list[torch.Tensor], task_ids: torch.Tensor) -> torch.Tensor:
        """Parallel Context Windows (Ratner et al. 2023): logits ``[S_t, vocab]`` of the task tokens.

        Each window (int ``[S_w]``) is encoded on its own at positions ``0..S_w-1`` (one varlen
        ``rk.rope_attention`` call per layer for all windows); the task tokens (int ``[S_t]``) sit at
        positions ``max(S_w) + i`` and attend causally among themselves and to every window token,
        in one call per layer with explicit positions and no dense mask: ``causal=True`` is
        bottom-right aligned, so with the windows' keys first every task token sees all of them.
        With a single window this is the ordinary forward of ``window + task``.
        """
        if not windows or any(w.dim() != 1 or w.numel() == 0 for w in windows) or task_ids.dim() != 1:
            raise ValueError("forward_windows: `windows` must be non-empty 1-D id tensors and `task_ids` 1-D")
        c, rope, dev = self.config, self.rope, task_ids.device
        lens = [w.numel() for w in windows]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        pos_w = torch.cat([torch.arange(n, device=dev) for n in lens])
        pos_t = torch.arange(max(lens), max(lens) + task_ids.numel(), device=dev)
        pos_k = torch.cat([pos_w, pos_t])
        xw, xt = self.embed(torch.cat(windows)), self.embed(task_ids)

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(t.shape[0], n, c.head_dim)

        for block in self.blocks:
            a = block.attn
            hw, ht = block.norm1(xw), block.norm1(xt)
            qw, kw, vw = heads(a.wq(hw), c.n_heads), heads(a.wk(hw), c.n_kv_heads), heads(a.wv(hw), c.n_kv_heads)
            qt, kt, vt = heads(a.wq(ht), c.n_heads), heads(a.wk(ht), c.n_kv_heads), heads(a.wv(ht), c.n_kv_heads)
            ow = rk.rope_attention(
                qw, kw, vw, rope, causal=True, q_positions=pos_w, k_positions=pos_w, cu_seqlens_q=cu, cu_seqlens_k=cu,
                backend=self.backend,
            )  # fmt: skip
            ot = rk.rope_attention(
                qt[None], torch.cat([kw, kt])[None], torch.cat([vw, vt])[None], rope, causal=True,
                q_positions=pos_t[None], k_positions=pos_k[None], backend=self.backend,
            )[0]  # fmt: skip
            xw = xw + a.wo(ow.reshape(xw.shape[0], -1))
            xt = xt + a.wo(ot.reshape(xt.shape[0], -1))
            xw = xw + block.mlp(block.norm2(xw))
            xt = xt + block.mlp(block.norm2(xt))
        return F.linear(self.norm(xt), self.embed.weight)


def training_batch(
    tokenizer: WordTokenizer, batch_size: int, length: int, rng: random.Random, digits: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of passkey prompts at random depths: ``(ids int64 [B, L], loss_mask bool [B, L-1])``.

    The mask selects the next-token targets to learn: everything except the needle's first
    statement of the passkey, whose digits are random and cannot be predicted (ln 10 nats each).
    """
    depths = [rng.random() for _ in range(batch_size)]
    samples = passkey_samples(tokenizer, length, depths, 1, digits=digits, seed=rng.getrandbits(63))
    ids = torch.tensor([s.full_ids for s in samples], dtype=torch.int64)
    mask = torch.ones(batch_size, length - 1, dtype=torch.bool)
    skip = len(tokenizer.encode(" The pass key is"))  # the needle's words before the passkey
    for row, s in enumerate(samples):
        first = s.needle_start + skip  # index of the first passkey digit
        mask[row, first - 1 : first - 1 + digits] = False  # targets first..first+digits-1
    return ids, mask


def train(
    model: TinyLM,
    tokenizer: WordTokenizer,
    *,
    steps: int,
    length: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 50,
    seed: int = 0,
    log_every: int = 0,
    answer_weight: float = 1.0,
    digits: int = 5,
    callback: Callable[[int, TinyLM], None] | None = None,
) -> list[float]:
    """Train on passkey prompts of ``length`` tokens with AdamW and a cosine schedule.

    Gradients flow through ``rk.rope_attention``'s backward with whatever ``model.rope`` is set.
    ``answer_weight`` multiplies the loss on the answer tokens relative to the other targets.
    ``callback(step, model)`` runs after every optimizer step (e.g. to evaluate along the way; the
    model is in train mode, which for this model changes nothing). Returns the loss of every step.
    Deterministic for a seed on a fixed thread count.
    """
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        scale = min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        ids, mask = training_batch(tokenizer, batch_size, length, rng, digits)
        logits = model(ids[:, :-1])
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        weight = mask.float()
        weight[:, -digits:] *= answer_weight
        loss = (per_token.view_as(weight) * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            with torch.no_grad():
                callback(step + 1, model)
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"  step {step + 1:5d}  loss {recent:.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
    model.eval()
    return losses


def evaluate(
    model: TinyLM,
    tokenizer: WordTokenizer,
    *,
    lengths: list[int],
    depths: list[float],
    n: int,
    seed: int = 1234,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Teacher-forced passkey accuracy of ``model`` with its current ``rope``.

    Returns ``{"accuracy": {length: fraction}, "by_depth": {(length, depth): fraction},
    "token_accuracy": {length: fraction}, "needle_ppl": {length: perplexity of the answers}}``
    over ``n`` samples per (length, depth) cell.
    """
    samples: list[PasskeySample] = passkey_samples(tokenizer, lengths, depths, n, seed=seed)
    scores = passkey_scores(model, samples, batch_size=batch_size)
    cells: dict[tuple[int, float], list[bool]] = {}
    per_len: dict[int, list] = {}
    for s, sc in zip(samples, scores):
        cells.setdefault((s.length, s.depth), []).append(sc.correct)
        per_len.setdefault(s.length, []).append(sc)
    return {
        "accuracy": {k: sum(x.correct for x in v) / len(v) for k, v in per_len.items()},
        "by_depth": {k: sum(v) / len(v) for k, v in cells.items()},
        "token_accuracy": {k: sum(x.token_accuracy for x in v) / len(v) for k, v in per_len.items()},
        "needle_ppl": {k: math.exp(sum(x.nll for x in v) / sum(x.n_tokens for x in v)) for k, v in per_len.items()},
    }


def save(model: TinyLM, tokenizer: WordTokenizer, path: str | Path) -> None:
    """Write the weights, shape, RoPE config and vocabulary to ``path`` (torch.save)."""
    torch.save(
        {
            "config": asdict(model.config),
            "rope": model.rope.to_dict(),
            "vocab": tokenizer.vocab,
            "state_dict": model.state_dict(),
        },
        path,
    )


def load(path: str | Path, backend: str = "auto") -> tuple[TinyLM, WordTokenizer]:
    """Inverse of ``save`` (loads with ``weights_only=True``); the model is in eval mode."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    tokenizer = WordTokenizer([])
    tokenizer.vocab = list(blob["vocab"])
    tokenizer.index = {w: i for i, w in enumerate(tokenizer.vocab)}
    model = TinyLM(TinyConfig(**blob["config"]), rk.RopeConfig(**blob["rope"]), backend=backend)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="write the trained weights here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = WordTokenizer.for_template()
    model = TinyLM(TinyConfig(vocab_size=len(tok), train_len=args.length))
    train(model, tok, steps=args.steps, length=args.length, seed=args.seed, log_every=50)
    result = evaluate(model, tok, lengths=[args.length], depths=[0.0, 0.5, 1.0], n=32)
    print(f"passkey accuracy at {args.length}: {result['accuracy'][args.length]:.3f}")
    if args.save:
        save(model, tok, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
