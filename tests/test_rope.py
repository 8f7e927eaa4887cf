"""RoPE and its scaling variants (rope.py), checked against independent references: float64
formulas written out here, Hugging Face transformers' rope init functions, a complex-number
rotation, and a GPT forward written out by hand."""

from __future__ import annotations

import contextlib
import math
import runpy
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_script

from model import GPT, GPTConfig
from rope import (
    LENGTH_DEPENDENT,
    ROPE_VARIANTS,
    RotaryEmbedding,
    apply_rope,
    merge_pairs,
    permute_qk_weights,
    rope_cos_sin,
    rope_frequencies,
    rot_dim_for,
    split_pairs,
)
from train import load_checkpoint

L = 4096  # the original (training) length in the frequency tests


def apply_rope_complex(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, layout: str = "half"):
    """RoPE as complex multiplication (Meta's form), a reference: pair i read as z_i = a_i + i·b_i becomes
    z_i · e^{i·m·θ_i} at position m, in complex128. x: (..., T, hs); positions: (T,); returns float64 (..., T, hs)."""
    rot_dim = 2 * inv_freq.size(-1)
    a, b = split_pairs(x[..., :rot_dim].double(), layout)
    angles = positions.double().unsqueeze(-1) * inv_freq  # (T, rot_dim/2)
    z = torch.complex(a, b) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((merge_pairs(z.real, z.imag, layout), x[..., rot_dim:].double()), dim=-1)


def longrope_factors(rot_dim: int, long: bool) -> list[float]:
    """Made-up but LongRoPE-shaped rescale factors: 1 for high frequencies, growing for low ones."""
    return [1.0 + (3.0 if long else 0.2) * (i / (rot_dim // 2 - 1)) ** 2 for i in range(rot_dim // 2)]


def scaling(rope_type: str, rot_dim: int, factor: float) -> dict | None:
    """A representative rope_scaling dict of each variant."""
    return {
        "default": None,
        "linear": {"rope_type": "linear", "factor": factor},
        "ntk": {"rope_type": "ntk", "factor": factor},
        "dynamic": {"rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": L},
        "yarn": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": L},
        "llama3": {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": L,
        },
        "longrope": {
            "rope_type": "longrope",
            "short_factor": longrope_factors(rot_dim, False),
            "long_factor": longrope_factors(rot_dim, True),
            "original_max_position_embeddings": L,
            "factor": factor,
        },
        "proportional": {"rope_type": "proportional", "partial_rotary_factor": min(1.0, 2 / factor), "factor": factor},
    }[rope_type]


def reference_frequencies(rot_dim: int, base: float, rope_scaling: dict | None, seq_len: int | None = None):
    """Each variant's definition, pair by pair, in plain Python float64 (no torch, no rope.py)."""
    p = dict(rope_scaling or {"rope_type": "default"})
    kind, s = p["rope_type"], p.get("factor", 1.0)
    theta = [base ** (-2 * i / rot_dim) for i in range(rot_dim // 2)]
    factor = 1.0
    if kind == "linear":
        theta = [t / s for t in theta]
    elif kind == "ntk":
        theta = [(base * s ** (rot_dim / (rot_dim - 2))) ** (-2 * i / rot_dim) for i in range(rot_dim // 2)]
    elif kind == "dynamic":
        n, orig = max(seq_len or 0, p["original_max_position_embeddings"]), p["original_max_position_embeddings"]
        new_base = base * (s * n / orig - (s - 1)) ** (rot_dim / (rot_dim - 2))
        theta = [new_base ** (-2 * i / rot_dim) for i in range(rot_dim // 2)]
    elif kind == "yarn":
        orig, fast, slow = p["original_max_position_embeddings"], p.get("beta_fast", 32.0), p.get("beta_slow", 1.0)

        def index_turning(turns):  # the pair whose wavelength 2π·base^(2i/d) fits `turns` times into orig
            return rot_dim * math.log(orig / (2 * math.pi * turns)) / (2 * math.log(base))

        lo, hi = index_turning(fast), index_turning(slow)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, rot_dim - 1)
        gammas = [min(max((i - lo) / (hi - lo), 0.0), 1.0) for i in range(rot_dim // 2)]
        theta = [(1 - g) * t + g * t / s for g, t in zip(gammas, theta)]
        if "attention_factor" in p:
            factor = p["attention_factor"]
        elif "mscale" in p:
            factor = (0.1 * p["mscale"] * math.log(s) + 1) / (0.1 * p["mscale_all_dim"] * math.log(s) + 1)
        else:
            factor = 0.1 * math.log(s) + 1
    elif kind == "llama3":
        orig, low, high = p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"]
        out = []
        for t in theta:
            wavelength = 2 * math.pi / t
            if wavelength < orig / high:
                out.append(t)
            elif wavelength > orig / low:
                out.append(t / s)
            else:
                smooth = (orig / wavelength - low) / (high - low)
                out.append((1 - smooth) * t / s + smooth * t)
        theta = out
    elif kind == "longrope":
        orig = p["original_max_position_embeddings"]
        rescale = p["long_factor"] if seq_len is not None and seq_len > orig else p["short_factor"]
        theta = [t / r for t, r in zip(theta, rescale)]
        factor = p.get("attention_factor", math.sqrt(1 + math.log(s) / math.log(orig)) if s > 1 else 1.0)
    elif kind == "proportional":  # the first p·d/2 pairs turn as in plain RoPE over the whole head, the rest not
        theta = [t / s if i < int(p["partial_rotary_factor"] * rot_dim / 2) else 0.0 for i, t in enumerate(theta)]
    return torch.tensor(theta, dtype=torch.float64), factor


VARIANTS = list(ROPE_VARIANTS)
SCALED = [v for v in VARIANTS if v != "default"]


# --------------------------------------------------------------------------------------------
# Frequencies: Hugging Face, float64 formulas, factor 1, YaRN's ramp and temperature


def hugging_face_frequencies(rot_dim: int, base: float, rope_scaling: dict | None, seq_len: int | None):
    """transformers' ROPE_INIT_FUNCTIONS (float32) on a LlamaConfig carrying rope_parameters.

    transformers 5 has no "default" or static "ntk" init function: plain RoPE is its "linear" at
    factor 1, and NTK-aware scaling by s is its "dynamic" at factor 1 and seq_len = s·L.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.utils import logging

    logging.set_verbosity_error()  # its consistency warnings (e.g. factor vs max_position_embeddings)
    params = dict(rope_scaling or {"rope_type": "linear", "factor": 1.0})
    max_position_embeddings = L
    if params["rope_type"] == "ntk":
        params = {"rope_type": "dynamic", "factor": 1.0}
        seq_len = round(rope_scaling["factor"] * L)
    if params["rope_type"] == "dynamic":
        max_position_embeddings = params.pop("original_max_position_embeddings", L)
    config = LlamaConfig(
        hidden_size=4 * rot_dim,
        num_attention_heads=4,
        head_dim=rot_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(params, rope_theta=base),
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](
        config, "cpu", seq_len=seq_len
    )
    return inv_freq.double(), attention_factor


CASES = [
    (rot_dim, base, factor) for rot_dim in (32, 64, 128) for base in (10000.0, 500000.0) for factor in (1.5, 4.0, 16.0)
]


@pytest.mark.parametrize("rope_type", VARIANTS)
def test_frequencies_match_hugging_face_and_float64_formula(rope_type):
    for rot_dim, base, factor in CASES:
        rope_scaling = scaling(rope_type, rot_dim, factor)
        for seq_len in (None, 3 * L) if rope_type in ("dynamic", "longrope") else (None,):
            inv_freq, attention_factor = rope_frequencies(rot_dim, base, rope_scaling, seq_len)
            assert inv_freq.dtype == torch.float64 and inv_freq.shape == (rot_dim // 2,)
            hf_inv_freq, hf_factor = hugging_face_frequencies(rot_dim, base, rope_scaling, seq_len)
            ref_inv_freq, ref_factor = reference_frequencies(rot_dim, base, rope_scaling, seq_len)
            where = f"{rope_type} rot_dim={rot_dim} base={base} factor={factor} seq_len={seq_len}"
            # HF computes in float32: a few float32 ulps apart; the float64 formula: to rounding
            torch.testing.assert_close(inv_freq, hf_inv_freq, rtol=1e-6, atol=0, msg=where)
            torch.testing.assert_close(inv_freq, ref_inv_freq, rtol=1e-13, atol=0, msg=where)
            assert attention_factor == pytest.approx(hf_factor, rel=1e-12), where
            assert attention_factor == pytest.approx(ref_factor, rel=1e-12), where


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": L,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
        },
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": L, "truncate": False},
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": L,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": L,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "attention_factor": 1.5},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 8192,
        },
        {
            "rope_type": "longrope",
            "short_factor": longrope_factors(64, False),
            "long_factor": longrope_factors(64, True),
            "original_max_position_embeddings": L,
            "attention_factor": 1.2,
        },
    ],
)
def test_optional_keys_match_hugging_face_and_float64_formula(rope_scaling):
    inv_freq, attention_factor = rope_frequencies(64, 10000.0, rope_scaling)
    hf_inv_freq, hf_factor = hugging_face_frequencies(64, 10000.0, rope_scaling, None)
    ref_inv_freq, ref_factor = reference_frequencies(64, 10000.0, rope_scaling)
    torch.testing.assert_close(inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_freq, ref_inv_freq, rtol=1e-13, atol=0)
    assert attention_factor == pytest.approx(hf_factor, rel=1e-12) == pytest.approx(ref_factor, rel=1e-12)


@pytest.mark.parametrize("rope_type", SCALED)
def test_factor_one_is_exactly_plain_rope(rope_type):
    plain, _ = rope_frequencies(64, 10000.0)
    rope_scaling = scaling(rope_type, 64, 1.0)
    if rope_type == "longrope":
        rope_scaling.update(short_factor=[1.0] * 32, long_factor=[1.0] * 32)
    # dynamic NTK grows its base with the length even at factor 1 (the formula's s·n/L term):
    # at factor 1 it is plain RoPE up to the original length, which is what None means
    inv_freq, attention_factor = rope_frequencies(64, 10000.0, rope_scaling)
    assert torch.equal(inv_freq, plain) and attention_factor == 1.0


def test_yarn_interpolates_low_frequencies_and_keeps_high_ones():
    """The paper's rule, stated with turns r = L/λ over the original length L: pairs turning
    fewer than beta_slow times are interpolated (wavelength × s), pairs turning more than
    beta_fast times are kept, and the ones between are blended, more interpolated the longer
    their wavelength. A ramp used the wrong way round fails every line."""
    for rot_dim, orig, factor in ((128, 4096, 4.0), (64, 2048, 16.0), (64, 256, 4.0)):
        rope_scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
        inv_freq, _ = rope_frequencies(rot_dim, 10000.0, rope_scaling)
        plain, _ = rope_frequencies(rot_dim, 10000.0)
        turns = orig * plain / (2 * math.pi)
        stretch = plain / inv_freq  # λ'/λ: 1 kept, s interpolated
        assert (turns < 1).any() and (turns > 32).any()
        torch.testing.assert_close(stretch[turns < 1], torch.full_like(stretch[turns < 1], factor), rtol=1e-14, atol=0)
        torch.testing.assert_close(stretch[turns > 32], torch.ones_like(stretch[turns > 32]), rtol=1e-14, atol=0)
        assert (stretch >= 1 - 1e-14).all() and (stretch <= factor + 1e-12).all()
        assert (stretch.diff() >= -1e-12).all(), "longer wavelengths must be interpolated at least as much"


def test_yarn_at_small_scale_interpolates_almost_every_pair():
    """PITFALLS "YaRN at small scale": head size 64, L = 256, default betas: only pair 0 turns
    more than 32 times over 256 tokens, so YaRN keeps one pair and interpolates or blends the
    other 31 (19 of them fully), close to plain PI. Documented in yarn_frequencies, not hidden."""
    rope_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    inv_freq, _ = rope_frequencies(64, 10000.0, rope_scaling)
    stretch = rope_frequencies(64, 10000.0)[0] / inv_freq
    kept, interpolated = (stretch == 1).sum().item(), (stretch == 4).sum().item()
    assert (kept, interpolated) == (1, 19)


def test_ntk_keeps_the_highest_and_interpolates_the_lowest_frequency():
    for rot_dim, factor in ((32, 4.0), (128, 8.0)):
        plain, _ = rope_frequencies(rot_dim, 10000.0)
        inv_freq, _ = rope_frequencies(rot_dim, 10000.0, {"rope_type": "ntk", "factor": factor})
        assert inv_freq[0] == plain[0] == 1.0
        assert inv_freq[-1].item() == pytest.approx(plain[-1].item() / factor, rel=1e-13)


def reference_logits(model: GPT, idx: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float) -> torch.Tensor:
    """A GPT forward written out from the model's weights in float64, half layout, with YaRN's
    temperature applied exactly once: scores = (R_m q)·(R_n k) · attention_factor² / √hs."""
    cfg = model.config
    p = {k: v.double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    hs, half = C // nh, inv_freq.numel()
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # (T, d/2)
    cos, sin = angles.cos(), angles.sin()

    def rotate(t):  # (B, nh, T, hs), pairs (i, i + d/2)
        a, b, rest = t[..., :half], t[..., half : 2 * half], t[..., 2 * half :]
        return torch.cat((a * cos - b * sin, b * cos + a * sin, rest), dim=-1)

    def norm(x, name):
        return F.layer_norm(x, (C,), p[name + ".weight"], p.get(name + ".bias"), 1e-5)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = p["transformer.wte.weight"][idx]
    for layer in range(cfg.n_layer):
        pre = f"transformer.h.{layer}."
        q, k, v = (norm(x, pre + "ln_1") @ p[pre + "attn.c_attn.weight"].T).split(C, dim=-1)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
        scores = rotate(q) @ rotate(k).transpose(-1, -2) * attention_factor**2 / math.sqrt(hs)
        y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + y.transpose(1, 2).reshape(B, T, C) @ p[pre + "attn.c_proj.weight"].T
        h = F.gelu(norm(x, pre + "ln_2") @ p[pre + "mlp.c_fc.weight"].T)
        x = x + h @ p[pre + "mlp.c_proj.weight"].T
    return norm(x, "transformer.ln_f") @ p["transformer.wte.weight"].T


def peaky_model(**overrides) -> GPT:
    """A tiny GPT whose q/k weights are large enough for attention to be far from uniform, so
    that a wrong scale on the scores shows in the logits."""
    torch.manual_seed(0)
    config = {"block_size": 32, "vocab_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64, "bias": False}
    model = GPT(GPTConfig(**dict(config, **overrides))).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * 64] *= 6.0
    return model


def test_yarn_attention_factor_applied_exactly_once():
    rope_scaling = {"rope_type": "yarn", "factor": 8.0}  # L defaults to block_size = 32
    model = peaky_model(rope_scaling=rope_scaling)
    idx = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(1))
    ref_inv_freq, mscale = reference_frequencies(16, 10000.0, dict(rope_scaling, original_max_position_embeddings=32))
    assert mscale == pytest.approx(0.1 * math.log(8.0) + 1)
    with torch.no_grad():
        logits, _ = model(idx)
    once = reference_logits(model, idx, ref_inv_freq, mscale)
    torch.testing.assert_close(logits.double(), once, rtol=0, atol=2e-5)
    for wrong in (1.0, mscale**2):  # temperature left out, or applied twice
        assert (reference_logits(model, idx, ref_inv_freq, wrong) - once).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# Validation


BAD_SCALINGS = [
    ({"rope_type": "yarnn", "factor": 4.0}, "'yarnn' is not supported"),
    ({"factor": 4.0}, "no 'rope_type'"),
    ("yarn", "must be a dict"),
    ({"rope_type": "yarn", "type": "linear", "factor": 4.0}, "names two types"),
    ({"rope_type": "linear"}, "no 'factor'"),
    ({"rope_type": "linear", "factor": 4.0, "beta_fast": 32.0}, "unknown key 'beta_fast'"),
    ({"rope_type": "linear", "factor": 0.5}, "factor=0.5"),
    ({"rope_type": "ntk", "factor": True}, "factor=True"),
    ({"rope_type": "dynamic", "factor": float("nan")}, "factor=nan"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "no 'high_freq_factor'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "high_freq_factor"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 1.0, "beta_slow": 32.0}, "beta_fast=1.0"),
    ({"rope_type": "yarn", "factor": 4.0, "mscale": 1.0}, "mscale"),
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.2, "mscale": 1.0, "mscale_all_dim": 1.0}, "mscale"),
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0}, "attention_factor=-1.0"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, "truncate='yes'"),
    (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64.5},
        "original_max_position_embeddings=64.5",
    ),
    ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [2.0] * 8, "factor": 2.0}, "short_factor"),
    (
        {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
        "needs 'factor' or 'attention_factor'",
    ),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}, "rope_theta 500000.0 differs from rope_base"),
]


@pytest.mark.parametrize("rope_scaling, message", BAD_SCALINGS)
def test_bad_rope_scaling_is_a_one_line_error_when_the_model_is_built(rope_scaling, message):
    with pytest.raises(ValueError, match="valid:") as error:
        GPTConfig(n_embd=64, n_head=4, rope_scaling=rope_scaling)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_other_bad_rope_settings_are_one_line_errors():
    for build, message in (
        (lambda: rope_frequencies(63, 10000.0), "rotary dimension 63"),
        (lambda: GPTConfig(n_embd=64, n_head=4, rope_fraction=0.2), "gives 3 rotary channels"),
        (lambda: rot_dim_for(16, 0.5625), "head size 16 with rope_fraction 0.5625: it gives 9 rotary channels"),
        (lambda: GPTConfig(n_embd=64, n_head=4, rope_base=1.0), "rope_base 1.0"),
        (lambda: GPTConfig(n_embd=64, n_head=4, rope_layout="neox"), "'neox'"),
        (
            lambda: GPTConfig(n_embd=64, n_head=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
            "rotary width of 2",
        ),
        (
            lambda: GPTConfig(pos_encoding="alibi", rope_scaling={"rope_type": "linear", "factor": 2.0}),
            "pos_encoding is 'alibi'",
        ),
        (lambda: apply_rope(torch.ones(1, 1, 2, 4), torch.ones(2, 2), torch.ones(2, 2), "gptj"), "'gptj'"),
    ):
        with pytest.raises(ValueError, match="valid:") as error:
            build()
        assert message in str(error.value) and "\n" not in str(error.value)


def test_pasted_hugging_face_configs_are_accepted():
    # Llama 3.1's rope_scaling and Qwen2.5's YaRN recipe (legacy "type"), as in their config files
    llama = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    qwen = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
    assert GPTConfig(rope_base=500000.0, rope_scaling=llama).rope_scaling == llama
    inv_freq, mscale = rope_frequencies(128, 1e6, dict(qwen, rope_theta=1e6))  # rope_parameters style
    ref, ref_mscale = reference_frequencies(
        128, 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    )
    torch.testing.assert_close(inv_freq, ref, rtol=1e-13, atol=0)
    assert mscale == pytest.approx(ref_mscale)


def test_original_length_defaults_to_block_size():
    for rope_type in ("dynamic", "yarn", "llama3", "longrope"):
        rope_scaling = {k: v for k, v in scaling(rope_type, 16, 4.0).items() if k != "original_max_position_embeddings"}
        model = GPT(GPTConfig(block_size=48, vocab_size=16, n_layer=1, n_head=2, n_embd=32, rope_scaling=rope_scaling))
        explicit = RotaryEmbedding(16, 10000.0, dict(rope_scaling, original_max_position_embeddings=48))
        assert model.config.rope_scaling == rope_scaling  # the user's dict is kept as given
        for seq_len in (48, 200):
            positions = torch.arange(seq_len)
            assert torch.equal(model.transformer.wpe.rotary(positions, seq_len)[0], explicit(positions, seq_len)[0])
        with pytest.raises(ValueError, match="no 'original_max_position_embeddings'"):
            rope_frequencies(16, 10000.0, rope_scaling)  # the core itself never guesses it


# --------------------------------------------------------------------------------------------
# Tables and precision


@pytest.mark.parametrize("rope_type", VARIANTS)
def test_float32_tables_match_float64_to_1e6_up_to_65536(rope_type):
    positions = torch.arange(65_537)
    for rot_dim, base in ((128, 10000.0), (64, 500000.0)):
        rope_scaling = scaling(rope_type, rot_dim, 4.0)
        rotary = RotaryEmbedding(rot_dim, base, rope_scaling)
        cos, sin = rotary(positions, len(positions))
        assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (len(positions), rot_dim // 2)
        inv_freq, attention_factor = reference_frequencies(rot_dim, base, rope_scaling, len(positions))
        angles = positions.double()[:, None] * inv_freq
        assert (cos.double() - angles.cos() * attention_factor).abs().max() <= 1e-6
        assert (sin.double() - angles.sin() * attention_factor).abs().max() <= 1e-6


def test_tables_unchanged_by_casts_and_autocast():
    yarn = {"rope_type": "yarn", "factor": 4.0}
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=64, rope_scaling=yarn))
    positions = torch.arange(0, 65_536, 7)
    rotary = model.transformer.wpe.rotary
    inv_freq = rotary.inv_freq.clone()
    cos, sin = rotary(positions, 65_536)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(model)
        assert rotary.inv_freq.dtype == torch.float64 and torch.equal(rotary.inv_freq, inv_freq)
        for context in (torch.autocast("cpu", dtype=torch.bfloat16), contextlib.nullcontext()):
            with context:
                new_cos, new_sin = rotary(positions, 65_536)
            assert new_cos.dtype == torch.float32 and torch.equal(new_cos, cos) and torch.equal(new_sin, sin)
    model.to(torch.bfloat16)
    with torch.no_grad():
        logits, _ = model(torch.randint(0, 64, (1, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers (8 significant bits) at |x|."""
    _, exponent = torch.frexp(x.abs().double())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 8)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotation_keeps_dtype_and_bf16_is_within_one_ulp(layout):
    """Eager and under torch.compile (inductor), as generate(compile=True) and train.py --compile
    run it: inductor once fused away the bf16→fp32 cast around a RoPE, so compiled and eager
    rotations differed (pytorch/torchtitan#2575). Ours computes in float32 and rounds once at the
    end, so both stay within one bf16 ulp of the exact rotation."""
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(2, 3, 50, 64, generator=gen) * 4
    positions = torch.arange(70_000, 70_050)
    inv_freq, _ = rope_frequencies(64, 10000.0)
    cos, sin = rope_cos_sin(positions, inv_freq)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert apply_rope(x32.to(dtype), cos, sin, layout).dtype == dtype
    x16 = x32.to(torch.bfloat16)
    ref = apply_rope_complex(x16.double(), positions, inv_freq, layout)  # exact rotation of the bf16 input
    torch._dynamo.reset()
    for rotate in (apply_rope, torch.compile(apply_rope, fullgraph=True)):
        out = rotate(x16, cos, sin, layout)
        assert out.dtype == torch.bfloat16
        assert ((out.double() - ref).abs() <= bf16_ulp(ref)).all()


# --------------------------------------------------------------------------------------------
# Rotation: definitions, complex view, layouts


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotation_matches_its_definition_and_the_complex_view(layout):
    """Pair i is (x_i, x_{i+d/2}) in "half" and (x_2i, x_2i+1) in "interleaved"; each is turned
    by m·θ_i. Checked with a rotary width of 12 of 16 channels (partial rotary)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 16, generator=gen)
    positions = torch.arange(1000, 1040)
    inv_freq, _ = rope_frequencies(12, 10000.0)
    out = apply_rope(x, *rope_cos_sin(positions, inv_freq), layout)
    ref = x.double().clone()
    angles = positions.double()[:, None] * inv_freq
    for i in range(6):
        ia, ib = (i, i + 6) if layout == "half" else (2 * i, 2 * i + 1)
        c, s = angles[:, i].cos(), angles[:, i].sin()
        ref[..., ia] = x[..., ia].double() * c - x[..., ib].double() * s
        ref[..., ib] = x[..., ib].double() * c + x[..., ia].double() * s
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope_complex(x, positions, inv_freq, layout), ref, rtol=0, atol=1e-12)
    assert torch.equal(out[..., 12:], x[..., 12:])


@pytest.mark.parametrize("rope_fraction, n_kv_head", [(1.0, 4), (0.5, 4), (0.5, 1)])
def test_interleaved_model_with_permuted_weights_equals_half_model(rope_fraction, n_kv_head):
    settings = {
        "n_kv_head": n_kv_head,
        "block_size": 32,
        "vocab_size": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_embd": 64,
        "bias": True,
        "rope_fraction": rope_fraction,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    }
    torch.manual_seed(0)
    half = GPT(GPTConfig(**settings, rope_layout="half")).eval()
    with torch.no_grad():
        for block in half.transformer.h:
            block.attn.c_attn.weight[: 64 + 16 * n_kv_head] *= 6.0  # the q and k rows
            block.attn.c_attn.bias.normal_(0, 0.5)
    interleaved = GPT(GPTConfig(**settings, rope_layout="interleaved")).eval()
    state = half.state_dict()
    interleaved.load_state_dict(state)  # same weights, wrong pairing: different logits
    idx = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = half(idx)
        assert (interleaved(idx)[0] - expected).abs().max() > 1e-3
        rot_dim = int(16 * rope_fraction)
        for name in [k for k in state if ".attn.c_attn." in k]:
            state[name] = permute_qk_weights(state[name], 4, n_kv_head, rot_dim, "half", "interleaved")
            back = permute_qk_weights(state[name], 4, n_kv_head, rot_dim, "interleaved", "half")
            assert torch.equal(back, half.state_dict()[name])
        interleaved.load_state_dict(state)
        torch.testing.assert_close(interleaved(idx)[0], expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The relative property and norm preservation


@pytest.mark.parametrize("rope_type", ["default", "linear", "ntk", "yarn", "llama3"])
def test_relative_property_at_large_positions(rope_type):
    """(R_m q)·(R_n k) = (R_{m+s} q)·(R_{n+s} k) = af² · q·R_{n−m} k for shifts s up to 1e5.

    Tolerance 1e-5·|q||k| in float32, from a rounding bound: cos and sin are within 2^-24 of
    their float64 values, each rotated coordinate picks up at most ~4·2^-24·|x| more, and a
    64-term float32 dot product at most 64·2^-24·|q||k|: about (2·4·√2 + 64)·6e-8 ≈ 4.5e-6
    per dot product (times af², the attention factor squared). Float32 angles would be off by
    ~m·2^-24 ≈ 1e-2 radians at m = 170k.
    """
    rot_dim = 64
    inv_freq, attention_factor = rope_frequencies(rot_dim, 10000.0, scaling(rope_type, rot_dim, 4.0))
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, rot_dim, generator=gen).unbind(0)  # 8 query/key pairs
    scale = q.norm(dim=-1) * k.norm(dim=-1) * attention_factor**2
    for m, n in ((0, 0), (5, 1234), (70_000, 3), (12, 65_000)):
        exact = (apply_rope_complex(q, torch.tensor([m - n]), inv_freq) * k.double()).sum(-1) * attention_factor**2
        for s in (0, 1, 999, 31_415, 99_999, 100_000):
            cos_m, sin_m = rope_cos_sin(torch.full((8,), m + s), inv_freq, attention_factor)
            cos_n, sin_n = rope_cos_sin(torch.full((8,), n + s), inv_freq, attention_factor)
            dot = (apply_rope(q, cos_m, sin_m) * apply_rope(k, cos_n, sin_n)).sum(-1)
            assert ((dot.double() - exact).abs() <= 5e-6 * scale).all(), (m, n, s)
            if s == 0:
                first = dot
            assert ((dot - first).abs() <= 1e-5 * scale).all(), (m, n, s)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotation_preserves_norms(layout):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 1000, 64, generator=gen)
    positions = torch.randint(0, 200_000, (1000,), generator=gen)
    inv_freq, _ = rope_frequencies(64, 10000.0)
    out = apply_rope(x, *rope_cos_sin(positions, inv_freq), layout)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)
    a, b = out[..., :32], out[..., 32:]  # each pair keeps its own length too (half layout)
    if layout == "half":
        torch.testing.assert_close(a**2 + b**2, x[..., :32] ** 2 + x[..., 32:] ** 2, rtol=1e-5, atol=1e-6)
    # YaRN's attention factor scales every rotated vector by the same factor, once
    inv_freq, mscale = rope_frequencies(
        64, 10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    )
    out = apply_rope(x, *rope_cos_sin(positions, inv_freq, mscale), layout)
    torch.testing.assert_close(out.norm(dim=-1), mscale * x.norm(dim=-1), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Length-dependent variants: dynamic NTK and LongRoPE


def test_length_dependent_flag():
    assert LENGTH_DEPENDENT == {"dynamic", "longrope"}
    for rope_type in VARIANTS:
        rotary = RotaryEmbedding(16, 10000.0, scaling(rope_type, 16, 2.0))
        assert rotary.length_dependent == (rope_type in ("dynamic", "longrope"))


def test_changes_between_lengths():
    """Dynamic NTK is plain RoPE up to the original length L, so its frequencies change only on crossing L (and
    again at every longer length); LongRoPE switches factor lists at L; the other variants never change."""
    dynamic = RotaryEmbedding(16, 10000.0, scaling("dynamic", 16, 4.0))
    assert not dynamic.changes_between(10, L) and not dynamic.changes_between(L, 1)
    assert (
        dynamic.changes_between(L, L + 1)
        and dynamic.changes_between(L + 1, 1)
        and dynamic.changes_between(L + 1, 2 * L)
    )
    assert not dynamic.changes_between(3 * L, 3 * L)
    longrope = RotaryEmbedding(16, 10000.0, scaling("longrope", 16, 4.0))
    assert not longrope.changes_between(1, L) and longrope.changes_between(L, L + 1)
    assert not longrope.changes_between(L + 1, 3 * L)  # the long factors, at any length past L
    for rope_type in set(VARIANTS) - LENGTH_DEPENDENT:
        rotary = RotaryEmbedding(16, 10000.0, scaling(rope_type, 16, 4.0))
        assert not rotary.changes_between(1, L) and not rotary.changes_between(L, 4 * L), rope_type


def test_dynamic_ntk_is_plain_rope_up_to_the_original_length():
    plain, _ = rope_frequencies(64, 10000.0)
    rope_scaling = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": L}
    for seq_len in (None, 1, 100, L - 1, L):
        assert torch.equal(rope_frequencies(64, 10000.0, rope_scaling, seq_len)[0], plain)
    assert not torch.equal(rope_frequencies(64, 10000.0, rope_scaling, L + 1)[0], plain)
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    scaling = {"rope_type": "dynamic", "factor": 4.0}
    dynamic = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32, rope_scaling=scaling)).eval()
    dynamic.load_state_dict(base.state_dict())
    idx = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for T in (1, 17, 32):
            assert torch.equal(dynamic(idx[:, :T])[0], base(idx[:, :T])[0])
        assert (dynamic(idx)[0] - base(idx)[0]).abs().max() > 1e-4  # past L it does scale


def test_dynamic_ntk_at_an_offset_scales_to_the_last_position():
    """Positions 20..27 of a model trained on L = 16 belong to a sequence of 28 tokens, not 8: the
    dynamic base must be base·(s·28/L − (s − 1))^(d/(d−2)). Reference: plain RoPE with that base."""
    s, L, d, n = 4.0, 16, 16, 28
    settings = {"block_size": L, "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}
    torch.manual_seed(0)
    dynamic = GPT(GPTConfig(**settings, rope_scaling={"rope_type": "dynamic", "factor": s})).eval()
    plain = GPT(GPTConfig(**settings, rope_base=10000.0 * (s * n / L - (s - 1)) ** (d / (d - 2)))).eval()
    plain.load_state_dict(dynamic.state_dict())
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(n - 8, n)
    with torch.no_grad():
        torch.testing.assert_close(
            dynamic(idx, positions=positions)[0], plain(idx, positions=positions)[0], rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_calls_share_no_state(rope_type):
    """A long call, then a short one, gives what a fresh model gives (transformers#25306)."""
    settings = {
        "block_size": 32,
        "vocab_size": 64,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "rope_scaling": {
            k: v for k, v in scaling(rope_type, 16, 4.0).items() if k != "original_max_position_embeddings"
        },
    }
    torch.manual_seed(0)
    used = GPT(GPTConfig(**settings)).eval()
    fresh = GPT(GPTConfig(**settings)).eval()
    fresh.load_state_dict(used.state_dict())
    idx = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        long_logits = used(idx)[0]
        short = used(idx[:, :20])[0]
        assert torch.equal(short, fresh(idx[:, :20])[0])
        assert torch.equal(used(idx)[0], long_logits)
        cos, _ = used.transformer.wpe.rotary(torch.arange(20), None)  # seq_len None: the positions' own length
        assert torch.equal(cos, fresh.transformer.wpe.rotary(torch.arange(20), 20)[0])


# --------------------------------------------------------------------------------------------
# torch.compile, checkpoints, figures


def test_compile_fullgraph_every_variant_matches_eager():
    """torch.compile(model, fullgraph=True) captures every variant whole, past the original
    length (so dynamic NTK and LongRoPE take their long branch inside the graph).

    One variant, dynamic NTK (the most code in the graph: its frequencies are recomputed at every
    call), goes through the default inductor backend, which costs ~20 s of C++ compilation on
    the CPU; the others use the "aot_eager" backend, which runs the same Dynamo capture (where
    fullgraph=True fails on any graph break) and AOTAutograd tracing without code generation.
    """
    idx = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    for rope_type in VARIANTS:
        rope_scaling = scaling(rope_type, 16, 2.0)
        if rope_scaling is not None:
            rope_scaling.pop("original_max_position_embeddings", None)  # block_size = 32 then
        torch.manual_seed(0)
        model = GPT(
            GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32, rope_scaling=rope_scaling)
        ).eval()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="inductor" if rope_type == "dynamic" else "aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(idx)[0], model(idx)[0], rtol=0, atol=1e-5, msg=rope_type)


def test_rope_scaling_round_trips_through_a_checkpoint(tmp_path):
    """model_args with a rope_scaling dict stay plain Python (loadable with weights_only=True),
    and a variant applied at inference to a model trained without it loads the same weights."""
    torch.manual_seed(0)
    rope_scaling = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0}
    model = GPT(
        GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32, rope_scaling=rope_scaling)
    ).eval()
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config)}, path)
    assert torch.load(path, weights_only=True)["model_args"]["rope_scaling"] == rope_scaling
    loaded, checkpoint = load_checkpoint(path)
    assert loaded.config == model.config
    idx = torch.randint(0, 64, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
        override = {"rope_type": "linear", "factor": 2.0}  # what sample.py and train.py resume do
        scaled = GPT(GPTConfig(**dict(checkpoint["model_args"], rope_scaling=override))).eval()
        scaled.load_state_dict(checkpoint["model"])
        assert scaled.config.rope_scaling == override
        assert (scaled(idx)[0] - model(idx)[0]).abs().max() > 1e-4


def test_decay_bound_and_figures(tmp_path):
    decay_bound = runpy.run_path(str(REPO / "assets" / "plot_rope.py"))["decay_bound"]
    # at distance 0 every partial sum S_j = j, so the bound is the mean of 1 .. d/2
    assert decay_bound(torch.tensor([0]), 128, 10000.0).item() == pytest.approx(32.5, rel=1e-12)
    far = decay_bound(torch.tensor([1000, 100_000]), 128, 10000.0)
    assert (far < 32.5 / 4).all()
    run_script("assets/plot_rope.py", "--out", str(tmp_path))
    for name in ("rope_wavelengths.png", "rope_decay.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rope_works_without_triton():
    """triton is optional: without it (CPU-only installs) rope imports, never picks the kernel, and rotates."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, rope\n"
        "assert rope.triton_rope is None and not rope.uses_fused_rope(torch.device('cuda'))\n"
        "cos, sin = rope.rope_cos_sin(torch.arange(3), rope.rope_frequencies(4, 10000.0)[0])\n"
        "x = torch.randn(1, 1, 3, 4, requires_grad=True)\n"
        "rope.apply_rope(x, cos, sin).sum().backward()\n"
        "print('ok', x.grad.shape)"
    )
    assert run_script("-c", code).stdout.strip() == "ok torch.Size([1, 1, 3, 4])"
