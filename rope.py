"""Rotary position embedding (RoPE), Su et al. 2021, "RoFormer" (arXiv:2104.09864), and its
context-extension variants.

RoPE splits each query and key head of rotary width d into d/2 pairs (x_a, x_b) and turns
pair i at position m by the angle m·θ_i, with

    θ_i = base^(−2i/d),  i = 0 .. d/2 − 1

    [x'_a]   [cos mθ_i  −sin mθ_i] [x_a]
    [x'_b] = [sin mθ_i   cos mθ_i] [x_b]

A rotation by mθ of the query and by nθ of the key leaves q·k depending on m − n alone, which
is what makes the encoding relative. Pair i has wavelength λ_i = 2π/θ_i tokens: from 2π for
i = 0 up to almost 2π·base for the last pair.

Which two coordinates form pair i is the layout:
- "half": (x_i, x_{i+d/2}), GPT-NeoX and Hugging Face's rotate_half;
- "interleaved": (x_2i, x_2i+1), GPT-J and Meta's complex-number pairs.
The two are the same model once the q/k projection rows are permuted (permute_qk_weights).

Context extension: a model trained on L tokens has never seen the angles of pairs whose
wavelength exceeds L turn further than they did in training. The variants below change θ_i
(and possibly the attention temperature) so that a longer context stays in familiar territory.
They are chosen by a Hugging Face-style `rope_scaling` dict (rope_type plus its keys, as in a
Llama or Qwen config.json), see rope_frequencies. Each variant is one function below whose
docstring gives its formula and its paper. Where a variant needs the original length L
(original_max_position_embeddings) and the dict leaves it out, the model supplies its training
context, GPTConfig.block_size (complete_rope_scaling).

The attention factor (YaRN, LongRoPE) multiplies cos and sin, so q·k is scaled by its square:
that is Hugging Face's convention and the one place it is applied. The softmax scale stays
1/√head_size. Channels past the rotary width (partial rotary) are neither rotated nor scaled.

Precision policy: angles m·θ_i are formed in float64 (float32 angles drift by ~1e-3 past 32k
positions), cos/sin are returned as float32, and the rotation itself runs in float32 and is cast
back to the input dtype. Casting a model to bf16 rebuilds the float64 frequencies rather than
casting them. Nothing on the model's path uses a complex dtype, so torch.compile takes it whole.
On CUDA, apply_rope runs one fused Triton kernel (in its own section), which reads the same
float32 tables.

    python rope.py --plot assets     # draws assets/rope_wavelengths.png and assets/rope_decay.png
"""

from __future__ import annotations

import inspect
import math
import sys

import torch
import torch.nn as nn

ROPE_LAYOUTS = ("half", "interleaved")


# ---------------------------------------------------------------------------------------------
# The scaling variants. Each takes the rotary width d (dim), the base and its rope_scaling keys,
# and returns (inverse frequencies θ'_i in float64, attention factor).


def default_frequencies(dim: int, base: float) -> tuple[torch.Tensor, float]:
    """Plain RoPE (Su et al. 2021, arXiv:2104.09864): θ_i = base^(−2i/d), attention factor 1."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return 1.0 / base**exponents, 1.0


def linear_frequencies(dim: int, base: float, factor: float) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al. 2023, arXiv:2306.15595; kaiokendev's SuperHOT):
    positions divided by s = factor, i.e. θ'_i = θ_i / s for every pair.

    Every wavelength grows s-fold, so s·L positions map into the trained range [0, L), at the
    cost of crowding neighbouring tokens s times closer. Usually needs a little fine-tuning.
    """
    inv_freq, _ = default_frequencies(dim, base)
    return inv_freq / factor, 1.0


def ntk_frequencies(dim: int, base: float, factor: float) -> tuple[torch.Tensor, float]:
    """NTK-aware scaling (bloc97, r/LocalLLaMA 2023; YaRN paper §3.1, arXiv:2309.00071):
    the base raised to base' = base · s^(d/(d−2)), then θ'_i = base'^(−2i/d).

    The exponent makes the lowest frequency exactly θ_{d/2−1}/s (interpolated like PI) while
    the highest, θ_0 = 1, is untouched (extrapolated): in between, the change spreads smoothly.
    Works without fine-tuning for modest s.
    """
    return default_frequencies(dim, base * factor ** (dim / (dim - 2)))


def dynamic_ntk_frequencies(
    dim: int, base: float, factor: float, original_max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Dynamic NTK (emozilla, r/LocalLLaMA 2023; YaRN paper §3.3, arXiv:2309.00071): NTK-aware
    scaling whose amount follows the current length n = seq_len past the original length L:

        base' = base · (s·n/L − (s − 1))^(d/(d−2))   for n > L,   plain RoPE for n ≤ L.

    The frequencies depend on the length, so they are recomputed at every call, and a KV cache
    must keep keys unrotated (RotaryEmbedding.length_dependent).
    """
    if seq_len is None or seq_len <= original_max_position_embeddings:
        return default_frequencies(dim, base)
    alpha = factor * seq_len / original_max_position_embeddings - (factor - 1)
    return default_frequencies(dim, base * alpha ** (dim / (dim - 2)))


def yarn_frequencies(
    dim: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    truncate: bool = True,
) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, arXiv:2309.00071): each pair blends interpolation and extrapolation
    by how many turns r_i = L/λ_i it makes over the original context L.

    Pairs that turn more than beta_fast times (high frequencies, short wavelengths) are kept,
    pairs that turn fewer than beta_slow times (low frequencies, long wavelengths) are
    interpolated like PI, and a linear ramp in the pair index blends those in between:

        i(β)  = d · ln(L / (2πβ)) / (2 ln base)              the pair that turns β times
        lo, hi = ⌊i(beta_fast)⌋, ⌈i(beta_slow)⌉              (no rounding if truncate=False)
        γ_i   = clamp((i − lo) / (hi − lo), 0, 1)            0: extrapolate, 1: interpolate
        θ'_i  = (1 − γ_i) · θ_i + γ_i · θ_i / s

    as the reference code and Hugging Face do (the paper writes γ linear in r instead; hi is
    capped at d − 1, as in the code). The attention temperature: cos and sin are multiplied by

        attention_factor = 0.1 · ln(s) + 1                   (the paper's √(1/t))

    unless attention_factor is given, or mscale and mscale_all_dim are (DeepSeek's form:
    (0.1·mscale·ln s + 1) / (0.1·mscale_all_dim·ln s + 1)). YaRN is the variant of choice for
    long extensions with a short fine-tune; at small scale (L of a few hundred tokens) the
    default betas interpolate almost every pair, and YaRN behaves nearly like PI.
    """

    def pair_turning(turns: float) -> float:
        return dim * math.log(original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # a step instead of a ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    inv_freq, _ = default_frequencies(dim, base)
    if attention_factor is None:
        if mscale is not None:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return torch.lerp(inv_freq, inv_freq / factor, ramp), attention_factor


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor 0.1·mscale·ln(s) + 1 (1 for s ≤ 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def llama3_frequencies(
    dim: int,
    base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> tuple[torch.Tensor, float]:
    """Llama 3.1's rule (Meta 2024, "The Llama 3 Herd of Models", arXiv:2407.21783, and its
    reference code): with wavelengths λ_i = 2π/θ_i and the original length L,

        λ_i < L / high_freq_factor:  θ'_i = θ_i                       (extrapolated)
        λ_i > L / low_freq_factor:   θ'_i = θ_i / s                   (interpolated)
        otherwise:                   θ'_i = (1 − g)·θ_i/s + g·θ_i,    g = (L/λ_i − low_freq_factor)
                                                                           / (high_freq_factor − low_freq_factor)

    g runs from 0 to 1 across the middle band and is clamped outside it, which gives the three
    cases at once. Like YaRN without its temperature, with the band set by wavelengths.
    """
    inv_freq, _ = default_frequencies(dim, base)
    wavelength = 2 * math.pi / inv_freq
    g = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return torch.lerp(inv_freq / factor, inv_freq, g.clamp(0, 1)), 1.0


def longrope_frequencies(
    dim: int,
    base: float,
    short_factor: list[float],
    long_factor: list[float],
    original_max_position_embeddings: int,
    factor: float | None = None,
    attention_factor: float | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Ding et al. 2024, arXiv:2402.13753; Phi-3): a searched rescale λ_i per pair,
    θ'_i = θ_i / λ_i, with λ = short_factor up to the original length L and long_factor past it
    (n = seq_len > L). Cos and sin are multiplied by

        attention_factor = √(1 + ln(s) / ln(L))     (1 for s ≤ 1)

    unless attention_factor is given. The factors come from a model's config (they are searched
    per model), so this variant is for loading such a config, not for picking by hand. The
    frequencies depend on the length: a KV cache must keep keys unrotated.
    """
    long = seq_len is not None and seq_len > original_max_position_embeddings
    rescale = torch.tensor(long_factor if long else short_factor, dtype=torch.float64)
    inv_freq, _ = default_frequencies(dim, base)
    if attention_factor is None:
        L = original_max_position_embeddings
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(L))
    return inv_freq / rescale, attention_factor


ROPE_VARIANTS = {
    "default": default_frequencies,
    "linear": linear_frequencies,
    "ntk": ntk_frequencies,
    "dynamic": dynamic_ntk_frequencies,
    "yarn": yarn_frequencies,
    "llama3": llama3_frequencies,
    "longrope": longrope_frequencies,
}


# ---------------------------------------------------------------------------------------------
# The functional core: a rope_scaling dict, checked strictly, to inverse frequencies.


def variant_keys(rope_type: str) -> tuple[set[str], set[str]]:
    """(required, optional) rope_scaling keys of a variant: its function's parameters."""
    params = list(inspect.signature(ROPE_VARIANTS[rope_type]).parameters.values())[2:]
    required = {p.name for p in params if p.default is inspect.Parameter.empty}
    return required, {p.name for p in params if p.default is not inspect.Parameter.empty} - {"seq_len"}


def is_length_dependent(rope_type: str) -> bool:
    """Whether a variant's frequencies change with the current sequence length."""
    return "seq_len" in inspect.signature(ROPE_VARIANTS[rope_type]).parameters


def rope_type_of(rope_scaling: dict | None) -> str:
    """The variant a rope_scaling dict names: its rope_type, or HF's legacy alias "type"."""
    if rope_scaling is None:
        return "default"
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, not {type(rope_scaling).__name__}; "
                         "valid: e.g. {'rope_type': 'yarn', 'factor': 4.0}")
    names = [rope_scaling[k] for k in ("rope_type", "type") if k in rope_scaling]
    if not names or names[0] != names[-1]:
        problem = f"names two types {names}" if names else "has no 'rope_type'"
        raise ValueError(f"rope_scaling {problem}; valid: one 'rope_type' (or 'type') of {', '.join(ROPE_VARIANTS)}")
    rope_type = names[0]
    if not isinstance(rope_type, str) or rope_type not in ROPE_VARIANTS:
        raise ValueError(f"rope_scaling rope_type {rope_type!r} is not supported; valid: {', '.join(ROPE_VARIANTS)}")
    return rope_type


def complete_rope_scaling(rope_scaling: dict | None, original_max_position_embeddings: int) -> dict | None:
    """rope_scaling with original_max_position_embeddings filled in when the variant reads it and
    the dict leaves it out. Hugging Face fills it with the model's max_position_embeddings; ours
    is the length the model was trained on, GPTConfig.block_size. Anything else is left as is
    (rope_frequencies judges it)."""
    if not isinstance(rope_scaling, dict):
        return rope_scaling
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_VARIANTS:
        return rope_scaling
    required, optional = variant_keys(rope_type)
    if "original_max_position_embeddings" not in required | optional:
        return rope_scaling
    return {"original_max_position_embeddings": original_max_position_embeddings, **rope_scaling}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_rope_scaling(rope_type: str, params: dict, dim: int) -> None:
    """Raise a one-line ValueError for a bad value among a variant's rope_scaling keys."""

    def bad(key, valid):
        return ValueError(f"rope_scaling {rope_type} {key}={params[key]!r} is not valid; valid: {valid}")

    for key, value in params.items():
        if key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
                   "mscale", "mscale_all_dim") and not (_is_number(value) and value > 0):
            raise bad(key, "a positive number")
        if key == "factor" and value < 1:
            raise bad(key, "a number of at least 1 (1 is plain RoPE)")
        if key == "original_max_position_embeddings" and not (type(value) is int and value > 0):
            raise bad(key, "a positive whole number of tokens")
        if key == "truncate" and not isinstance(value, bool):
            raise bad(key, "True or False")
        if key in ("short_factor", "long_factor") and not (
            isinstance(value, (list, tuple)) and len(value) == dim // 2 and all(_is_number(v) and v > 0 for v in value)
        ):
            raise bad(key, f"a list of {dim // 2} positive numbers, one per rotary pair")
    if params.get("beta_fast", 32.0) <= params.get("beta_slow", 1.0):
        raise bad("beta_fast", f"a number above beta_slow={params.get('beta_slow', 1.0)}")
    if "low_freq_factor" in params and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise bad("high_freq_factor", f"a number above low_freq_factor={params['low_freq_factor']}")
    if ("mscale" in params) != ("mscale_all_dim" in params) or ("mscale" in params and "attention_factor" in params):
        given = sorted(set(params) & {"mscale", "mscale_all_dim", "attention_factor"})
        raise ValueError(f"rope_scaling {rope_type} has {given}; "
                         "valid: attention_factor, or mscale with mscale_all_dim, or none of them")
    if rope_type == "longrope" and "factor" not in params and "attention_factor" not in params:
        raise ValueError("rope_scaling longrope needs 'factor' or 'attention_factor'; valid: e.g. factor = "
                         "max_position_embeddings / original_max_position_embeddings of the model's config")
    if rope_type in ("ntk", "dynamic") and dim < 4:
        raise ValueError(f"rope_scaling {rope_type} cannot scale a rotary width of {dim}; valid: at least 4 (s^(d/(d−2)))")


def rope_frequencies(
    head_dim: int, base: float, rope_scaling: dict | None = None, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies θ'_i for a rotary width d = head_dim, in float64, and the attention factor.

    Returns (inv_freq of shape (d/2,), attention_factor). The attention factor multiplies cos and
    sin (so q·k by its square); it is 1 for plain RoPE. seq_len is the current sequence length,
    which only the length-dependent variants (dynamic, longrope) read; None means at most the
    original length.

    rope_scaling follows Hugging Face's rope_scaling / rope_parameters: {"rope_type": NAME, ...}
    with NAME one of ROPE_VARIANTS and the keys of that variant's function ("type" is accepted
    for "rope_type", and "rope_theta" when it equals base). Every key is checked: an unknown or
    missing key, a factor below 1 or an odd head_dim raises a one-line ValueError.
    """
    if not (isinstance(head_dim, int) and head_dim >= 2 and head_dim % 2 == 0):
        raise ValueError(f"RoPE rotary dimension {head_dim!r} is not valid; valid: an even number of at least 2")
    if not (_is_number(base) and base > 1):
        raise ValueError(f"rope_base {base!r} is not valid; valid: a number above 1, such as 10000.0")
    rope_type = rope_type_of(rope_scaling)
    params = {k: v for k, v in (rope_scaling or {}).items() if k not in ("rope_type", "type", "rope_theta")}
    if rope_scaling is not None and rope_scaling.get("rope_theta", base) != base:
        raise ValueError(f"rope_scaling rope_theta {rope_scaling['rope_theta']!r} differs from rope_base {base!r}; "
                         f"valid: set rope_base={rope_scaling['rope_theta']!r}, or leave rope_theta out")
    required, optional = variant_keys(rope_type)
    unknown, missing = sorted(set(params) - required - optional), sorted(required - set(params))
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        valid = ", ".join(["rope_type"] + sorted(required) + sorted(f"{k} (optional)" for k in optional))
        raise ValueError(f"rope_scaling {rope_type} has {problem}; valid: {valid}")
    check_rope_scaling(rope_type, params, head_dim)
    if is_length_dependent(rope_type):
        params["seq_len"] = seq_len
    return ROPE_VARIANTS[rope_type](head_dim, float(base), **params)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_factor · cos(m·θ_i) and · sin(m·θ_i) for every position m, angles in float64,
    results in float32.

    positions: integer tensor of any shape (...); inv_freq: (d/2,) float64.
    Returns two float32 tensors of shape (..., d/2).
    """
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (..., d/2)
    cos = (angles.cos() * attention_factor).to(torch.float32)
    sin = (angles.sin() * attention_factor).to(torch.float32)
    return cos, sin


# ---------------------------------------------------------------------------------------------
# The rotation, its two layouts, and the complex-number view.


def split_pairs(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two coordinates (a_i, b_i) of every pair of x's last dimension, each (..., d/2)."""
    if layout == "half":
        return x.chunk(2, dim=-1)
    if layout == "interleaved":
        return x[..., 0::2], x[..., 1::2]
    raise ValueError(f"unknown rope_layout {layout!r}; valid: {', '.join(ROPE_LAYOUTS)}")


def merge_pairs(a: torch.Tensor, b: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of split_pairs: (..., d/2) twice to (..., d)."""
    if layout == "half":
        return torch.cat((a, b), dim=-1)
    if layout == "interleaved":
        return torch.stack((a, b), dim=-1).flatten(-2)
    raise ValueError(f"unknown rope_layout {layout!r}; valid: {', '.join(ROPE_LAYOUTS)}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half",
               fused: bool | None = None) -> torch.Tensor:
    """Rotate the first 2·(d/2) channels of x by the angles behind cos/sin; pass the rest through.

    x: (B, H, T, hs) in any float dtype and any strides, such as the model's queries and keys
    as one (B, 2·nh, T, hs) view of its qkv projection; cos, sin: float32, broadcastable to
    (B, 1, T, d/2), the same for every head. The rotation runs in float32 and the result has x's
    dtype. Channels past the rotary width (partial rotary) are returned unchanged.
    fused: the Triton kernel (one launch, forward and backward); None picks it for CUDA tensors
    when triton is installed, else rotate_pairs. Differentiable in x only: cos and sin are
    tables of fixed angles.
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"unknown rope_layout {layout!r}; valid: {', '.join(ROPE_LAYOUTS)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope got cos/sin that require grad; valid: tables of fixed angles (rope_cos_sin), detached")
    if fused is None:
        fused = uses_fused_rope(x.device)
    elif fused and triton_rope_kernel() is None:
        raise ValueError("apply_rope fused=True needs triton, which is not installed; "
                         "valid: fused=None or False, or pip install triton")
    if torch.is_grad_enabled() and x.requires_grad:
        return RotaryFunction.apply(x, cos, sin, layout, fused)
    return rotate(x, cos, sin, layout, fused)  # no graph to record: skip autograd.Function's overhead (decoding)


def uses_fused_rope(device: torch.device) -> bool:
    """Whether apply_rope runs the Triton kernel on this device by default: CUDA, with triton."""
    return device.type == "cuda" and triton_rope_kernel() is not None


class RotaryFunction(torch.autograd.Function):
    """RoPE with its own backward: a rotation is orthogonal, R_θᵀ = R_−θ, so the gradient of
    x ↦ R_θ x is the incoming gradient rotated by −θ, i.e. the same rotation with sin negated."""

    @staticmethod
    def forward(ctx, x, cos, sin, layout, fused):
        ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.fused = layout, fused
        return rotate(x, cos, sin, layout, fused)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, -sin, ctx.layout, ctx.fused), None, None, None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, fused: bool) -> torch.Tensor:
    """x rotated, outside autograd: by the Triton kernel, or by rotate_pairs."""
    return triton_rope(x, cos, sin, layout) if fused else rotate_pairs(x, cos, sin, layout)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """apply_rope's arithmetic in PyTorch, outside autograd: a' = a·cos − b·sin, b' = b·cos + a·sin.

    One product into a fresh float32 buffer, then the cross terms added in place: at small
    shapes these elementwise passes, not the matrix products, are what RoPE costs a training
    step on the CPU, so there are as few as possible (and no copy when the whole head turns).
    """
    rot = 2 * cos.size(-1)
    turned = x if rot == x.size(-1) else x[..., :rot]  # partial rotary: the first rot channels
    a, b = split_pairs(turned, layout)
    out = turned * merge_pairs(cos, cos, layout)  # (a·cos, b·cos), float32 even for bf16 x
    out_a, out_b = split_pairs(out, layout)
    out_a.addcmul_(b, sin, value=-1)
    out_b.addcmul_(a, sin)
    if turned is not x:  # the other channels pass through
        out = torch.cat((out, x[..., rot:]), dim=-1)
    return out.to(x.dtype)


def apply_rope_complex(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, layout: str = "half"
) -> torch.Tensor:
    """RoPE as complex multiplication, a reference (not the model's path): read pair i as
    z_i = a_i + i·b_i; at position m it becomes z_i · e^{i·m·θ_i}. In complex128.

    x: (..., T, hs); positions: (T,); inv_freq: (d/2,) float64. Returns float64 (..., T, hs).
    """
    rot = 2 * inv_freq.size(-1)
    a, b = split_pairs(x[..., :rot].double(), layout)
    angles = positions.double().unsqueeze(-1) * inv_freq  # (T, d/2)
    z = torch.complex(a, b) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((merge_pairs(z.real, z.imag, layout), x[..., rot:].double()), dim=-1)


def layout_permutation(head_size: int, rot_dim: int, src: str, dst: str) -> torch.Tensor:
    """Channel order that turns a head in layout src into layout dst: x_dst = x_src[..., perm].

    half -> interleaved: 0, d/2, 1, d/2+1, ...; interleaved -> half: the evens, then the odds.
    Channels past rot_dim keep their place.
    """
    a, b = split_pairs(torch.arange(rot_dim), src)  # where each pair's coordinates live in src
    return torch.cat((merge_pairs(a, b, dst), torch.arange(rot_dim, head_size)))


def permute_qk_weights(qkv: torch.Tensor, n_head: int, rot_dim: int, src: str, dst: str) -> torch.Tensor:
    """c_attn's weight (3C, C) or bias (3C,), rows q, k, v, permuted from layout src to dst.

    The q and k rows of every head are reordered by layout_permutation; v is untouched. Since
    q·k sums over channels, a dst-layout model with these weights computes what the src-layout
    model does.
    """
    C = qkv.size(0) // 3
    perm = layout_permutation(C // n_head, rot_dim, src, dst)
    rows = torch.arange(C).view(n_head, -1)[:, perm].flatten()  # q rows, head by head
    return qkv[torch.cat((rows, C + rows, torch.arange(2 * C, 3 * C)))]


def rotary_dim(head_dim: int, fraction: float) -> int:
    """The number of channels of each head that RoPE rotates: head_dim · fraction, which must be even."""
    dim = int(head_dim * fraction)
    if dim < 2 or dim % 2:
        raise ValueError(
            f"RoPE cannot rotate head size {head_dim} with rope_fraction {fraction}: "
            f"it gives {dim} rotary channels; valid: an even number of at least 2"
        )
    return dim


class RotaryEmbedding(nn.Module):
    """cos/sin for explicit positions: forward(positions, seq_len) -> (cos, sin), float32.

    original_max_position_embeddings (the training context, GPTConfig.block_size) fills that key
    of rope_scaling when the variant reads it and the dict leaves it out.

    Stateless between calls: the one buffer holds the frequencies at the original length, fixed
    at construction. A length-dependent variant (length_dependent: dynamic, longrope) recomputes
    its frequencies from seq_len at every call, so a KV cache must store keys unrotated. The
    float64 buffer is non-persistent and rebuilt (never cast) whenever the module is moved or
    cast, so model.to(torch.bfloat16) or .half() leaves it exact.
    """

    def __init__(self, dim: int, base: float, rope_scaling: dict | None = None,
                 original_max_position_embeddings: int | None = None):
        super().__init__()
        if original_max_position_embeddings is not None:
            rope_scaling = complete_rope_scaling(rope_scaling, original_max_position_embeddings)
        self.dim, self.base, self.rope_scaling = dim, base, rope_scaling
        inv_freq, self.attention_factor = rope_frequencies(dim, base, rope_scaling)
        self.length_dependent = is_length_dependent(rope_type_of(rope_scaling))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # fn may have cast the buffer (model.half()); rebuild it exactly on its new device
        device = self.inv_freq.device
        self.inv_freq = rope_frequencies(self.dim, self.base, self.rope_scaling)[0].to(device)
        uses_fused_rope(device)  # builds the Triton kernel now, outside any torch.compile trace
        return self

    def forward(self, positions: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: integer (T,) or (B, T); seq_len: the length of the sequence they belong to,
        read by length-dependent variants only (None there means max(positions) + 1).
        Returns cos, sin: float32 (..., T, d/2)."""
        if not self.length_dependent:
            return rope_cos_sin(positions, self.inv_freq, self.attention_factor)
        if seq_len is None:
            seq_len = int(positions.max()) + 1
        inv_freq, attention_factor = rope_frequencies(self.dim, self.base, self.rope_scaling, seq_len)
        return rope_cos_sin(positions, inv_freq.to(self.inv_freq.device), attention_factor)


# ---------------------------------------------------------------------------------------------
# The fused apply: one Triton kernel on CUDA, forward and backward, for the model's queries and
# keys at once (one (B, 2·nh, T, hs) tensor).
#
# Angles: the kernel reads the float32 cos/sin tables of rope_cos_sin (angles formed in float64)
# rather than forming m·θ_i itself. A float32 angle is off by up to m·θ_i·2^-24, about 4e-3
# radians at m = 65,536 (PITFALLS.md, Precision), and float64 arithmetic is slow on most GPUs.
# The tables also carry every scaling variant and the attention factor, and cost little
# bandwidth: (T, d/2) twice, shared by all heads, against 4·nh·T·hs values of q and k read and
# written. Offsets and per-row positions are only other tables.
# triton is imported on first use, so this file works without it (CPU machines): on the CPU the
# same autograd function runs rotate_pairs.


def triton_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Launch the kernel once for x: a rotated copy in x's dtype, contiguous (B, H, T, hs)."""
    B, H, T, D = x.shape
    half = cos.size(-1)
    try:
        cos, sin = (torch.broadcast_to(t.float().contiguous(), (B, 1, T, half)) for t in (cos, sin))
    except RuntimeError:
        raise ValueError(f"fused RoPE got cos/sin of shape {tuple(cos.shape)} for x {tuple(x.shape)}; "
                         f"valid: broadcastable to (B, 1, T, d/2), the same for every head") from None
    x_in = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    block_half = 1 << (half - 1).bit_length()  # tl.arange takes powers of two
    block_t = max(1, 2048 // block_half)  # about 2048 pairs per program (untuned)
    triton_rope_kernel()[(H * B * -(-T // block_t),)](
        x_in, out, cos, sin, T, H, *x_in.stride()[:3], cos.stride(0), cos.stride(2),
        HALF=half, HEAD=D, INTERLEAVED=layout == "interleaved",
        BLOCK_T=block_t, BLOCK_HALF=block_half, BLOCK_PASS=1 << max(0, D - 2 * half - 1).bit_length(),
    )
    return out


TRITON_ROPE = {}  # {"kernel": rope_kernel jitted by Triton, or None without triton}, filled on first use


def triton_rope_kernel():
    """rope_kernel for Triton, built on first use (TRITON_INTERPRET=1 is read then), or None
    without triton. Triton looks the kernel's names up in this module, hence the global tl.
    A plain dict rather than functools.cache: torch.compile reads it, and never traces the build
    once RotaryEmbedding has built it on moving to CUDA."""
    global tl
    if "kernel" not in TRITON_ROPE:
        try:
            import triton
            import triton.language as tl

            TRITON_ROPE["kernel"] = triton.jit(rope_kernel)
        except ImportError:
            TRITON_ROPE["kernel"] = None
    return TRITON_ROPE["kernel"]


def rope_kernel(x, out, cos, sin, T, H, x_sb, x_sh, x_st, c_sb, c_st,
                HALF: tl.constexpr, HEAD: tl.constexpr, INTERLEAVED: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """The Triton kernel (compiled by triton_rope_kernel): one program turns one head over
    BLOCK_T tokens of one row, in float32. Programs run head by head, so those that share a
    block of cos/sin run together and read it from cache. x has any strides but a unit one on
    the last dimension; out is contiguous (B, H, T, HEAD). Offsets are int64: B·H·T·HEAD may
    pass 2^31."""
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(T, BLOCK_T)
    head, row, block = pid % H, pid // H // blocks, pid // H % blocks
    src = x + row * x_sb + head * x_sh
    dst = out + (row * H + head) * T * HEAD
    t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_HALF)
    mask = (t < T)[:, None] & (i < HALF)[None, :]
    table = row * c_sb + t[:, None] * c_st + i[None, :]
    c = tl.load(cos + table, mask=mask)
    s = tl.load(sin + table, mask=mask)
    if INTERLEAVED:  # pair i is (2i, 2i + 1)
        col_a = 2 * i
        col_b = 2 * i + 1
    else:  # pair i is (i, i + d/2)
        col_a = i
        col_b = i + HALF
    row_in = src + t[:, None] * x_st
    row_out = dst + t[:, None] * HEAD
    a = tl.load(row_in + col_a[None, :], mask=mask).to(tl.float32)
    b = tl.load(row_in + col_b[None, :], mask=mask).to(tl.float32)
    tl.store(row_out + col_a[None, :], (a * c - b * s).to(out.dtype.element_ty), mask=mask)
    tl.store(row_out + col_b[None, :], (b * c + a * s).to(out.dtype.element_ty), mask=mask)
    if 2 * HALF < HEAD:  # partial rotary: the other channels pass through
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        keep = (t < T)[:, None] & (p < HEAD)[None, :]
        tl.store(row_out + p[None, :], tl.load(row_in + p[None, :], mask=keep), mask=keep)


# ---------------------------------------------------------------------------------------------
# Figures: python rope.py --plot DIR


def plot_wavelengths(path: str, factor: float = 4.0) -> None:
    """Each pair's wavelength under every variant (head dim 128, L = 4096, s = 4), and the
    wavelength ratio λ'/λ at that scale and at ropegpt's GPU scale (head dim 64, L = 256)."""
    import matplotlib.pyplot as plt

    def variants(L: int) -> dict:
        return {
            "default": None,
            "linear (PI)": {"rope_type": "linear", "factor": factor},
            "ntk": {"rope_type": "ntk", "factor": factor},
            f"dynamic NTK at n = {factor:g}·L": {"rope_type": "dynamic", "factor": factor,
                                                "original_max_position_embeddings": L},
            "yarn": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": L},
            "llama3 (low 1, high 4)": {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": L},
        }

    def wavelengths(dim: int, L: int) -> dict:
        out = {}
        for name, scaling in variants(L).items():
            inv_freq, _ = rope_frequencies(dim, 10000.0, scaling, seq_len=int(factor * L))
            out[name] = (2 * math.pi / inv_freq).numpy()
        return out

    styles = ["-", "--", "-.", ":", "-", "--"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 13), constrained_layout=True)
    big = wavelengths(128, 4096)
    for (name, lam), style in zip(big.items(), styles):
        axes[0].plot(lam, style, lw=2, label=name)
        axes[1].plot(lam / big["default"], style, lw=2, label=name)
    small = wavelengths(64, 256)
    for (name, lam), style in zip(small.items(), styles):
        axes[2].plot(lam / small["default"], style, lw=2, label=name)
    for length, label in ((4096, "L = 4096"), (factor * 4096, f"{factor:g}·L")):
        axes[0].axhline(length, color="grey", lw=1, ls="--")
        axes[0].text(0, length * 1.25, label, color="grey")
    axes[0].set(yscale="log", ylabel="wavelength λ'_i = 2π/θ'_i (tokens)",
                title=f"Wavelength of each pair, head dim 128, base 10000, L = 4096, s = {factor:g}")
    for ax, title in ((axes[1], f"Stretch λ'/λ, head dim 128, L = 4096: 1 extrapolates, {factor:g} interpolates"),
                      (axes[2], "The same at ropegpt's GPU scale, head dim 64, L = 256: YaRN is nearly PI")):
        ax.axhline(1, color="grey", lw=1)
        ax.axhline(factor, color="grey", lw=1)
        ax.text(0, 0.93, "extrapolated (unchanged)", color="grey", va="top")
        ax.text(0, factor * 0.93, f"interpolated (×{factor:g})", color="grey", va="top")
        ax.set(yscale="log", ylim=(0.75, 20), ylabel="stretch λ'_i / λ_i", title=title)
        ax.set_yticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    for ax in axes:
        ax.set_xlabel("pair i (0 = highest frequency)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=9)
    axes[1].legend(loc="upper left", fontsize=9, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def decay_bound(distance: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """RoFormer's long-term decay (Su et al. 2021, §3.4.3): for q·k = Re Σ_i h_i e^{i(m−n)θ_i},
    |q·k| ≤ max_i |h_{i+1} − h_i| · Σ_j |S_j| with S_j = Σ_{k<j} e^{i(m−n)θ_k}; returns the
    relative bound (1/(d/2)) · Σ_{j=1}^{d/2} |S_j| at each relative distance m − n, in float64."""
    inv_freq, _ = default_frequencies(dim, base)
    angles = distance.double().unsqueeze(-1) * inv_freq  # (N, d/2)
    partial_sums = torch.polar(torch.ones_like(angles), angles).cumsum(-1)  # S_1 .. S_{d/2}
    return partial_sums.abs().mean(-1)


def plot_decay(path: str, dim: int = 128) -> None:
    """The RoFormer decay bound against relative distance for a few bases: at every distance up
    to 512 (the paper's view), and averaged over log-spaced windows up to 10^6 (the trend)."""
    import matplotlib.pyplot as plt

    bases = (100.0, 1e4, 5e5, 1e7)
    fig, (near, far) = plt.subplots(1, 2, figsize=(13, 5.5), constrained_layout=True)
    distance = torch.arange(513)
    edges = torch.logspace(0, 6, 61)
    window = torch.linspace(0, 1, 64)
    samples = (edges[:-1, None] + (edges[1:] - edges[:-1])[:, None] * window).round()  # (60, 64)
    for base in bases:
        near.plot(distance.numpy(), decay_bound(distance, dim, base).numpy(), lw=1.2, label=f"base {base:g}")
        mean = decay_bound(samples.flatten(), dim, base).view(samples.shape).mean(-1)
        far.plot(edges[:-1].sqrt().mul(edges[1:].sqrt()).numpy(), mean.numpy(), lw=2, marker=".", label=f"base {base:g}")
    near.set(xlabel="relative distance m − n (tokens)", ylabel="relative upper bound (1/(d/2))·Σ_j |S_j|",
             title=f"Every distance up to 512 (as in RoFormer's Figure 2), head dim {dim}")
    far.set(xscale="log", xlabel="relative distance m − n (tokens)", ylabel="mean over a log-spaced window",
            title="The trend up to 10^6: a larger base decays later and slower")
    for ax in (near, far):
        ax.set_ylim(0, (dim // 2 + 1) / 2 * 1.05)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("RoPE's long-term decay: the RoFormer bound on |q·k| (§3.4.3)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    import argparse
    import os

    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(description="Draw RoPE's figures.")
    parser.add_argument("--plot", metavar="DIR", required=True, help="folder for rope_wavelengths.png and rope_decay.png")
    args = parser.parse_args(argv)
    os.makedirs(args.plot, exist_ok=True)
    for name, draw in (("rope_wavelengths.png", plot_wavelengths), ("rope_decay.png", plot_decay)):
        draw(os.path.join(args.plot, name))
        print(f"wrote {os.path.join(args.plot, name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
