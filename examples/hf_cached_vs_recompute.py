"""Cached decoding vs full recomputation across the dynamic-NTK / LongRoPE switch point.

For a tiny random 2-layer model (no downloads), generates 20 tokens from a left-padded batch
(prompts of 6 and 12 real tokens; the switch is at 16) twice, with and without the KV cache, and
prints max |logit difference| per step for: stock transformers, the patched model with
rescale="rotate" (un-rotated keys re-rotated on read, no recompute) and the default
rescale="recompute". Stock is run on the unpadded row only (its table is per batch).

    PYTHONPATH=. python examples/hf_cached_vs_recompute.py
"""

from __future__ import annotations

import copy

import torch
import transformers as T

from ropekern.integrations import hf

COMMON = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
              initializer_range=0.2)  # fmt: skip
CASES = {
    "llama dynamic NTK (L=16)": (T.LlamaConfig, {"rope_type": "dynamic", "factor": 2.0}, 16),
    "qwen3 LongRoPE (original 16)": (
        T.Qwen3Config,
        {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(8)],
            "long_factor": [1.0 + 1.5 * i for i in range(8)],
            "original_max_position_embeddings": 16,
        },
        64,
    ),
}


def step_logits(model, ids, mask, use_cache):
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, use_cache=use_cache, return_dict_in_generate=True, **kw)
    return torch.stack(out.logits, 1)


def drift(model, ids, mask):
    return float((step_logits(model, ids, mask, True) - step_logits(model, ids, mask, False)).abs().max())


def main():
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    for name, (cls, scaling, max_pos) in CASES.items():
        config = cls(**COMMON, head_dim=16)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(config).eval()
        hf.unpatch(hf.extend_context(model, scaling, max_position_embeddings=max_pos))
        stock = drift(model, ids[1:], mask[1:])
        rotate = drift(hf.patch(copy.deepcopy(model), rescale="rotate"), ids, mask)
        recompute = drift(hf.patch(copy.deepcopy(model)), ids, mask)
        print(f"{name:<30} max |cached - recomputed| logit: stock {stock:.3g}, rotate {rotate:.3g}, "
              f"recompute {recompute:.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
