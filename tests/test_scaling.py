"""RopeConfig against transformers' ROPE_INIT_FUNCTIONS, the accurate-angle scheme, validation."""

import contextlib
import logging
import math
import random

import pytest
import torch

import ropekern as rk
from ropekern import RopeConfig, laws
from ropekern.laws import LAWS, ScalingLaw
from ropekern.scaling import ROPE_TYPES, angle_turns_fp32, split_turns
from ropekern.testing import PI_FRACTION, exact_angle

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)

HEAD_DIMS = [32, 64, 80, 96, 128, 256]


def _hf_default_inv_freq(config):
    """Default RoPE lives in each model; Phi-3's honours partial_rotary_factor."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    phi = Phi3Config(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        rope_parameters=dict(config.rope_parameters),
    )
    return Phi3RotaryEmbedding.compute_default_rope_parameters(phi, "cpu")


def _random_params(rng: random.Random, rope_type: str, head_dim: int, prf: float):
    rotary = int(head_dim * prf)
    half = rotary // 2
    original = rng.choice([512, 2048, 4096, 8192, 32768])
    p = {"rope_type": rope_type, "rope_theta": rng.choice([10000.0, 500000.0, 1e6, rng.uniform(100.0, 2e6)])}
    if prf != 1.0:
        p["partial_rotary_factor"] = prf
    if rope_type in ("linear", "dynamic"):
        p["factor"] = rng.choice([1.0, 2.0, 4.0, rng.uniform(1.0, 32.0)])
    elif rope_type == "yarn":
        p["factor"] = rng.choice([2.0, 4.0, 8.0, 16.0, 32.0, 40.0, rng.uniform(1.0, 64.0)])
        p["original_max_position_embeddings"] = original
        if rng.random() < 0.4:
            p["beta_fast"] = rng.choice([16, 32, 64, rng.uniform(8, 64)])
            p["beta_slow"] = rng.choice([1, 2, rng.uniform(0.5, 4)])
        if rng.random() < 0.3:
            p["mscale"] = rng.choice([0.707, 1.0, rng.uniform(0.1, 2.0)])
            p["mscale_all_dim"] = rng.choice([0.707, 1.0, rng.uniform(0.1, 2.0), 0])
        if rng.random() < 0.2:
            p["attention_factor"] = rng.uniform(0.5, 2.0)
        if rng.random() < 0.3:
            p["truncate"] = rng.random() < 0.5
    elif rope_type == "longrope":
        p["original_max_position_embeddings"] = original
        p["short_factor"] = sorted(rng.uniform(1.0, 1.5) for _ in range(half))
        p["long_factor"] = sorted(rng.uniform(1.0, 60.0) for _ in range(half))
        if rng.random() < 0.5:
            p["factor"] = rng.uniform(1.0, 64.0)
        if rng.random() < 0.2:
            p["attention_factor"] = rng.uniform(0.5, 2.0)
    elif rope_type == "llama3":
        p["factor"] = rng.choice([8.0, 32.0, rng.uniform(1.0, 64.0)])
        low = rng.choice([1.0, rng.uniform(0.5, 2.0)])
        p["low_freq_factor"] = low
        p["high_freq_factor"] = low + rng.choice([3.0, rng.uniform(0.1, 8.0)])
        p["original_max_position_embeddings"] = original
    elif rope_type == "proportional":
        p["partial_rotary_factor"] = rng.choice([0.25, 0.5, 0.75, 1.0])
        if rng.random() < 0.5:
            p["factor"] = rng.uniform(1.0, 8.0)
    return p, original


@contextlib.contextmanager
def _hf_in_float64():
    """Run transformers' RoPE functions in float64: they spell fp32 as torch.float, torch.float32
    and Tensor.float(), all of which are rebound for the duration."""
    saved = torch.float, torch.float32, torch.Tensor.float
    torch.float = torch.float32 = torch.float64
    torch.Tensor.float = torch.Tensor.double
    try:
        yield
    finally:
        torch.float, torch.float32, torch.Tensor.float = saved


def _hf(rope_type, hf, seq_len):
    if rope_type == "default":
        return _hf_default_inv_freq(hf)
    return ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu", seq_len=seq_len)


CASES = []
_rng = random.Random(20261122)
for _rope_type in ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional"):
    for _i in range(60):
        _hd = _rng.choice(HEAD_DIMS)
        _prf = 1.0 if _rope_type == "proportional" or _rng.random() < 0.7 else _rng.choice([0.25, 0.5, 0.75])
        CASES.append((_rope_type, _i, _hd, _prf))


@pytest.mark.parametrize("rope_type,seed,head_dim,prf", CASES)
def test_matches_transformers(rope_type, seed, head_dim, prf):
    """inv_freq and attention_factor equal transformers at several seq_lens.

    Against transformers evaluated in float64 the formulas agree to 1e-12. Against transformers as
    shipped (fp32) they agree to rtol 1e-6, except where transformers' own fp32 rounding is
    amplified (llama3 bands with high - low ~ 0.1, YaRN ramps at large factors); there ropekern
    must be at least as close to the float64 value as transformers is.
    """
    rng = random.Random(seed * 1000 + head_dim)
    params, original = _random_params(rng, rope_type, head_dim, prf)
    max_pos = rng.choice([original, 2 * original, 4 * original]) if rope_type != "dynamic" else original
    hf = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=dict(params),
    )
    ours = RopeConfig.from_hf(hf)
    for seq_len in (None, 1, original - 1, original, original + 1, 3 * original + 7, 10 * original):
        ref, af = _hf(rope_type, hf, seq_len)
        with _hf_in_float64():
            ref64, _ = _hf(rope_type, hf, seq_len)
        assert ref64.dtype == torch.float64
        torch.testing.assert_close(ours.inv_freq64(seq_len), ref64, rtol=1e-12, atol=0)
        mine = ours.inv_freq(seq_len)
        assert mine.shape == ref.shape and mine.dtype == torch.float32
        rel = (mine.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-300)
        off = rel > 1e-6
        if off.any():
            ours_err = (mine.double() - ref64).abs()[off]
            hf_err = (ref.double() - ref64).abs()[off]
            assert (ours_err <= hf_err).all(), f"max rel diff {rel.max():.3g} not explained by fp32 rounding"
        assert ours.attention_factor == pytest.approx(af, rel=1e-12)


def test_ntk_static_formula():
    rope = RopeConfig(128, base=10000.0, scaling={"rope_type": "ntk", "factor": 4.0})
    base = 10000.0 * 4.0 ** (128 / 126)
    want = 1.0 / base ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    torch.testing.assert_close(rope.inv_freq64(), want, rtol=1e-14, atol=0)
    assert rope.inv_freq64(10**6).equal(rope.inv_freq64())  # not length dependent


def test_dynamic_every_seq_len():
    """Dynamic NTK equals the closed form b' = b (s l / L - (s-1))^(R/(R-2)), l = max(seq, L)."""
    rope = RopeConfig(64, base=10000.0, scaling={"rope_type": "dynamic", "factor": 3.0}, max_position_embeddings=100)
    exps = torch.arange(0, 64, 2, dtype=torch.float64) / 64
    for seq_len in range(0, 400, 7):
        ell = max(seq_len, 100)
        base = 10000.0 * (3.0 * ell / 100 - 2.0) ** (64 / 62)
        torch.testing.assert_close(rope.inv_freq64(seq_len), 1.0 / base**exps, rtol=1e-14, atol=0)
    seq = torch.arange(0, 400, 7)
    inv, split = rope.tables(seq)
    for row, seq_len in zip(inv, seq.tolist()):
        torch.testing.assert_close(row, rope.inv_freq64(seq_len), rtol=1e-14, atol=0)
    assert split.shape == (seq.numel(), 4, 32) and split.dtype == torch.float32


def test_longrope_switch_is_strict():
    half = 16
    rope = RopeConfig(
        32,
        scaling={
            "rope_type": "longrope",
            "short_factor": [1.0] * half,
            "long_factor": [4.0] * half,
            "original_max_position_embeddings": 1000,
        },
    )
    short, long = rope.inv_freq64(None), rope.inv_freq64(2000)
    torch.testing.assert_close(long * 4.0, short)
    assert rope.inv_freq64(1000).equal(short)  # seq_len == L0 stays short
    assert rope.inv_freq64(1001).equal(long)  # strictly greater switches
    inv, _ = rope.tables(torch.tensor([999, 1000, 1001, 5000]))
    assert inv[0].equal(short) and inv[1].equal(short) and inv[2].equal(long) and inv[3].equal(long)


def _length_dependent(kind: str, half: int) -> RopeConfig:
    """Dynamic NTK or LongRoPE, head dim 32 (``half`` = 16 pairs), trained length 100."""
    scaling = (
        {"rope_type": "dynamic", "factor": 2.0}
        if kind == "dynamic"
        else {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [3.0] * half,
              "original_max_position_embeddings": 100}
    )  # fmt: skip
    return RopeConfig(2 * half, scaling=scaling, max_position_embeddings=100)


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_length_dependent_tables_copy_constants_once(kind):
    """Per-call tables of length-dependent types are built with device ops from constants that
    reach the device once (a GPU decode step must not pay a host-to-device copy for them)."""
    half = 16
    rope = _length_dependent(kind, half)
    lens = torch.tensor([50, 100, 101, 4000], device="meta")
    copies = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "meta":
            copies.append(tuple(self.shape))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", counting_to)
        rope.tables(lens, device="meta")
        first = len(copies)
        for _ in range(3):
            inv, split = rope.tables(lens, device="meta")
    assert first > 0 and len(copies) == first, copies
    assert inv.shape == (4, half) and split.shape == (4, 4, half)
    # the values are unchanged by the caching (CPU: against the per-length tables)
    inv, _ = rope.tables(torch.tensor([50, 100, 101, 4000]))
    for row, n in zip(inv, (50, 100, 101, 4000)):
        torch.testing.assert_close(row, rope.inv_freq64(n), rtol=1e-14, atol=0)


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_host_length_tables_built_once_per_lengths(kind):
    """Lengths held on the host (a list or a CPU tensor): every layer of a step asks for the same
    ones, so their per-sequence tables are built once (the last 8 sets) and equal a fresh build."""
    half = 16
    rope = _length_dependent(kind, half)
    inv, split = rope.tables(torch.tensor([50, 300]))
    again = rope.tables([50, 300])
    assert again[0] is inv and again[1] is split
    other, _ = rope.tables(torch.tensor([50, 90]))
    assert other is not inv and not torch.equal(other[1], inv[1])  # 90 is inside the trained length
    fresh = rope._inv_freq_per_sequence(torch.tensor([50, 300]))
    assert torch.equal(inv, fresh) and torch.equal(split, split_turns(fresh))
    for n in range(20):
        rope.tables([1000 + n])
    assert len(rope._length_cache) == 8


def test_cos_sin_accuracy_and_factor():
    rope = RopeConfig(64, scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096})
    pos = torch.tensor([0, 1, 4095, 2**20 + 3, 2**24 - 1])
    cos, sin = rope.cos_sin(pos)
    assert cos.dtype == torch.float32 and cos.shape == (5, 32)
    angle = pos.double()[:, None] * rope.inv_freq64()
    af = rope.attention_factor
    assert (cos.double() - torch.cos(angle) * af).abs().max() <= 2e-6
    assert (sin.double() - torch.sin(angle) * af).abs().max() <= 2e-6
    assert torch.allclose(cos[0], torch.full((32,), af))


def test_exact_angle_helper():
    """The test oracle against exact rational arithmetic at the largest positions."""
    from fractions import Fraction

    pi = PI_FRACTION
    pos = torch.tensor([2**31 - 1, 2**30 + 5, 12345])
    inv = torch.tensor([1.0, 0.7853981633974483, 1e-4], dtype=torch.float64)
    got = exact_angle(pos, inv)
    for i, p in enumerate(pos.tolist()):
        for j, f in enumerate(inv.tolist()):
            t = Fraction(p) * Fraction(f) / (2 * pi)
            t -= round(t)
            assert abs(got[i, j].item() - float(t * 2 * pi)) < 1e-13


def test_kernel_angle_scheme_within_2e6():
    """The fp32 split scheme every kernel reproduces keeps cos/sin within 2e-6 of exact at every int32
    position (the chunk ends, the ends of the range, random positions over all of it and below 2**24)
    and every frequency up to 1. The previous two-chunk scheme was exact below 2**24 only (0.79 rad
    off at 2**25, π from 2**28); a plain fp32 product is 0.06 rad off at 2**20."""
    gen = torch.Generator().manual_seed(0)
    edges = [2**k + d for k in (12, 20, 24, 25, 27, 28, 30) for d in (-1, 0, 1, 3)]
    pos = torch.cat(
        [
            torch.randint(0, 2**24, (8000,), generator=gen),
            torch.randint(0, 2**31, (12000,), generator=gen),
            torch.arange(2**24 - 64, 2**24),
            torch.arange(2**31 - 64, 2**31),
            torch.arange(0, 64),
            torch.tensor(edges),
        ]
    )
    inv = torch.cat(
        [torch.logspace(0, -7, 61, dtype=torch.float64), torch.tensor([1.0, 0.5, 1 / 3, 0.0], dtype=torch.float64)]
    )
    turns = angle_turns_fp32(pos, split_turns(inv))
    angle = turns * torch.tensor(2 * math.pi, dtype=torch.float32)
    exact = exact_angle(pos, inv)
    err = (torch.cos(angle).double() - torch.cos(exact)).abs()
    err = torch.maximum(err, (torch.sin(angle).double() - torch.sin(exact)).abs())
    assert err.max().item() <= 2e-6, err.max().item()
    assert err[pos >= 2**24].max().item() <= 2e-6
    plain = pos.float()[:, None] * inv.float()
    assert (torch.cos(plain).double() - torch.cos(exact)).abs().max() > 0.1  # the test can fail


def test_split_turns_reconstructs():
    inv = torch.logspace(0, -9, 100, dtype=torch.float64)
    s = split_turns(inv).double()
    torch.testing.assert_close(s.sum(-2), inv / (2 * math.pi), rtol=1e-14, atol=0)
    for row in (s[0], s[1], s[2]):  # 12 significant bits each
        m, _ = torch.frexp(row)
        assert torch.equal(m * 4096, torch.round(m * 4096))


# ------------------------------------------------------------------ from_hf forms
def test_from_hf_v4_dict_forms():
    v4 = {
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    rope = RopeConfig.from_hf(v4)
    assert rope.rope_type == "llama3" and rope.head_dim == 128 and rope.base == 500000.0
    v5 = {
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    assert RopeConfig.from_hf(v5) == rope


def test_from_hf_partial_and_interleaved():
    neox = {
        "model_type": "gpt_neox",
        "hidden_size": 512,
        "num_attention_heads": 8,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "max_position_embeddings": 2048,
    }
    rope = RopeConfig.from_hf(neox)
    assert rope.rotary_dim == 16 and not rope.interleaved
    gptj = {
        "model_type": "gptj",
        "n_embd": 256,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "rotary_dim": 16,
        "n_positions": 2048,
    }
    rope = RopeConfig.from_hf(gptj)
    assert rope.rotary_dim == 16 and rope.interleaved and rope.head_dim == 64
    phi = {
        "hidden_size": 3072,
        "num_attention_heads": 32,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 24, "long_factor": [2.0] * 24},
    }
    rope = RopeConfig.from_hf(phi)
    assert rope.rotary_dim == 48 and rope.scaling["original_max_position_embeddings"] == 4096
    assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))


def test_from_hf_gptj_config_json_and_errors():
    """A GPT-J ``config.json`` as saved (``n_embd`` / ``n_head`` / ``rotary_dim``, no ``hidden_size``)
    reads like the config object; bad sizes give a ValueError naming the config key."""
    gptj_json = {"model_type": "gptj", "n_embd": 4096, "n_head": 16, "rotary_dim": 64, "n_positions": 2048}
    rope = RopeConfig.from_hf(gptj_json)
    assert (rope.head_dim, rope.rotary_dim, rope.interleaved, rope.max_position_embeddings) == (256, 64, True, 2048)
    base = {"hidden_size": 4096, "num_attention_heads": 32}
    for change, match in [
        ({"num_attention_heads": 0}, "`num_attention_heads` must be a positive integer, got 0"),
        ({"hidden_size": "4096"}, "`hidden_size` must be a positive integer, got '4096'"),
        (
            {"hidden_size": 100, "num_attention_heads": 3},
            r"`hidden_size` \(100\) is not a multiple of `num_attention_heads` \(3\)",
        ),
        ({"head_dim": -64}, "`head_dim` must be a positive integer, got -64"),
        ({"num_attention_heads": 2.5}, "`num_attention_heads` must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            RopeConfig.from_hf({**base, **change})


def test_from_hf_config_object_phi3():
    from transformers import Phi3Config

    cfg = Phi3Config(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        original_max_position_embeddings=1024,
        partial_rotary_factor=0.5,
        rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [3.0] * 16},
    )
    rope = RopeConfig.from_hf(cfg)
    ref, af = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=5000)
    torch.testing.assert_close(rope.inv_freq(5000), ref)
    assert rope.attention_factor == pytest.approx(af)


def test_roundtrip_to_dict():
    for scaling in (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
        {"rope_type": "dynamic", "factor": 2.0},
        None,
        {"rope_type": "proportional", "partial_rotary_factor": 0.25},
    ):
        rope = RopeConfig(64, base=5e5, scaling=scaling, max_position_embeddings=4096)
        assert RopeConfig(**rope.to_dict()) == rope


def test_every_law_example_round_trips():
    """Each built-in law is registered under its type and its canonical example builds a config
    of that type (for several rotary sizes) that round-trips through to_dict."""
    assert tuple(LAWS) == ROPE_TYPES and all(LAWS[t].rope_type == t for t in ROPE_TYPES)
    for t in ROPE_TYPES:
        for d in (8, 64, 128):
            rope = RopeConfig(d, **LAWS[t].example(d, 32))
            assert rope.rope_type == t and RopeConfig(**rope.to_dict()) == rope


# ------------------------------------------------------------------ a law defined outside the package
@pytest.fixture
def restore_laws():
    """A law registers itself when its class is defined: put the registry back after the test."""
    saved = dict(LAWS), dict(laws._TYPE_ALIASES)
    yield
    LAWS.clear()
    LAWS.update(saved[0])
    laws._TYPE_ALIASES.clear()
    laws._TYPE_ALIASES.update(saved[1])


def _rotate(x, pos, inv, magnitude, rotary_dim):
    """fp64 half-split rotation of x ``[B, S, H, D]`` at positions ``[B, S]`` by frequencies
    ``[B, R/2]`` (one row per sequence), cos/sin times ``magnitude``; channels >= R copied."""
    half = rotary_dim // 2
    angle = pos.double()[..., None] * inv[:, None, :]  # [B, S, R/2]
    cos, sin = (torch.cos(angle) * magnitude)[:, :, None], (torch.sin(angle) * magnitude)[:, :, None]
    x = x.double()
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]], -1)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_law_defined_outside_the_package(restore_laws, backend):
    """A new law is one ScalingLaw subclass and no kernel change: this one, defined here, halves
    every frequency, halves them again for sequences longer than `switch` tokens (so it is length
    dependent, through the base class's per-sequence tables) and scales cos/sin by `magnitude`.
    apply_rope and rope_attention on the backend match what those frequencies imply."""

    class Halved(ScalingLaw):
        rope_type = "toy"
        keys = frozenset({"switch", "magnitude"})
        required = frozenset({"switch"})
        is_length_dependent = True

        def validate(self, params):
            return {"switch": int(params["switch"]), "magnitude": float(params.get("magnitude", 1.0))}

        def state_key(self, seq_len):
            return bool(seq_len) and seq_len > self.scaling["switch"]

        def inv_freq(self, key):
            return self._rotary_inv_freq() / (4.0 if key else 2.0)

        def magnitude(self):
            return self.scaling["magnitude"]

        @classmethod
        def example(cls, rotary_dim=64, length=32):
            return {"scaling": {"rope_type": cls.rope_type, "switch": length, "magnitude": 0.8}}

    assert LAWS["toy"] is Halved
    d, r, switch = 32, 24, 20
    rope = RopeConfig(d, base=100.0, rotary_dim=r, **Halved.example(r, switch))
    assert rope.rope_type == "toy" and rope.attention_factor == 0.8 and rope.is_length_dependent
    assert RopeConfig(**rope.to_dict()) == rope
    with pytest.raises(ValueError, match="`scaling.swtch` is not a parameter of rope_type 'toy'"):
        RopeConfig(d, scaling={"rope_type": "toy", "swtch": 3})
    with pytest.raises(ValueError, match="`scaling.switch` is required for rope_type 'toy'"):
        RopeConfig(d, scaling={"rope_type": "toy"})

    plain = 100.0 ** -(torch.arange(0, r, 2, dtype=torch.float64) / r)  # the default frequencies
    short, long = plain / 2, plain / 4
    torch.testing.assert_close(rope.inv_freq64(switch), short, rtol=1e-15, atol=0)
    torch.testing.assert_close(rope.inv_freq64(switch + 1), long, rtol=1e-15, atol=0)
    inv, split = rope.tables([5, switch, switch + 1])
    torch.testing.assert_close(inv, torch.stack([short, short, long]), rtol=1e-15, atol=0)
    assert split.shape == (3, 4, r // 2)

    # sequence 0 stays within `switch` tokens, sequence 1 goes past it: one table each
    gen = torch.Generator().manual_seed(21)
    pos = torch.stack([torch.arange(9) + 4, torch.arange(9) + 37])
    inv = torch.stack([short, long])
    x = torch.randn(2, 9, 3, d, generator=gen)
    got = rk.apply_rope(x, rope, pos, backend=backend)
    torch.testing.assert_close(got.double(), _rotate(x, pos, inv, 0.8, r), rtol=0, atol=1e-5)

    q, k, v = (torch.randn(2, n, h, d, generator=gen) for n, h in ((5, 4), (9, 2), (9, 2)))
    out, lse = rk.rope_attention(
        q, k, v, rope, causal=True, q_positions=pos[:, -5:], k_positions=pos, return_lse=True, backend=backend
    )
    qr = _rotate(q, pos[:, -5:], inv, 0.8, r)
    kr = _rotate(k, pos, inv, 0.8, r).repeat_interleave(2, 2)
    s = torch.einsum("bihd,bjhd->bhij", qr, kr) * d**-0.5
    s = s.masked_fill(torch.arange(9)[None, :] > torch.arange(5)[:, None] + 4, -math.inf)  # bottom-right causal
    want = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v.double().repeat_interleave(2, 2))
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ validation
BAD = [
    (dict(head_dim=64, scaling={"rope_type": "warp"}), "rope_type"),
    (dict(head_dim=64, scaling={"rope_type": "linear"}), "factor"),
    (dict(head_dim=64, scaling={"rope_type": "linear", "factor": 0.5}), "factor"),
    (dict(head_dim=64, scaling={"rope_type": "linear", "factor": float("nan")}), "factor"),
    (dict(head_dim=64, scaling={"rope_type": "linear", "factor": "2"}), "factor"),
    (dict(head_dim=64, scaling={"rope_type": "linear", "factor": 2.0, "facter": 1}), "facter"),
    (
        dict(
            head_dim=64,
            scaling={
                "rope_type": "longrope",
                "short_factor": [1.0] * 31,
                "long_factor": [1.0] * 32,
                "original_max_position_embeddings": 10,
            },
        ),
        "short_factor",
    ),
    (
        dict(
            head_dim=64,
            scaling={
                "rope_type": "longrope",
                "short_factor": [1.0] * 32,
                "long_factor": [1.0] * 33,
                "original_max_position_embeddings": 10,
            },
        ),
        "long_factor",
    ),
    (
        dict(head_dim=64, scaling={"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 32}),
        "original_max_position_embeddings",
    ),
    (
        dict(
            head_dim=64,
            scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        "high_freq_factor",
    ),
    (
        dict(
            head_dim=64,
            scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "beta_fast": 1,
                "beta_slow": 32,
                "original_max_position_embeddings": 4096,
            },
        ),
        "beta_fast",
    ),
    (
        dict(
            head_dim=64,
            scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "attention_factor": -1.0,
                "original_max_position_embeddings": 4096,
            },
        ),
        "attention_factor",
    ),
    (
        dict(
            head_dim=64,
            scaling={
                "rope_type": "longrope",
                "short_factor": [1.0] * 32,
                "long_factor": [1.0] * 32,
                "original_max_position_embeddings": 10,
                "attention_factor": -2,
            },
        ),
        "attention_factor",
    ),
    (dict(head_dim=64, scaling={"rope_type": "dynamic", "factor": 2.0}), "max_position_embeddings"),
    (dict(head_dim=64, rotary_dim=33), "rotary_dim"),
    (dict(head_dim=64, rotary_dim=66), "rotary_dim"),
    (dict(head_dim=64, rotary_dim=0), "rotary_dim"),
    (dict(head_dim=64, base=0.0), "base"),
    (dict(head_dim=64, base=-10.0), "base"),
    (dict(head_dim=0), "head_dim"),
    (dict(head_dim=64, base=100.0, scaling={"rope_theta": 200.0}), "base"),
    (dict(head_dim=64, scaling={"rope_type": "default", "partial_rotary_factor": 1.5}), "partial_rotary_factor"),
    (dict(head_dim=64, rotary_dim=16, scaling={"partial_rotary_factor": 0.5}), "rotary_dim"),
    (dict(head_dim=64, rotary_dim=2, scaling={"rope_type": "ntk", "factor": 2.0}), "rotary_dim"),
]


@pytest.mark.parametrize("kwargs,field", BAD)
def test_invalid_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RopeConfig(**kwargs)


def test_type_errors():
    with pytest.raises(TypeError, match="scaling"):
        RopeConfig(64, scaling=[("rope_type", "linear")])
    with pytest.raises(TypeError, match="interleaved"):
        RopeConfig(64, interleaved="yes")
    with pytest.raises(TypeError, match="positions"):
        RopeConfig(64).cos_sin(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="positions"):
        RopeConfig(64).cos_sin(torch.tensor([-1]))
