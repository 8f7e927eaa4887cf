"""Rotary position embedding (RoPE), Su et al. 2021, "RoFormer" (arXiv:2104.09864), and its context-extension
variants: the reference math, one function per variant.

RoPE splits the first rot_dim channels of each query and key head (the rotary width; d = rot_dim in the formulas)
into d/2 pairs (x_a, x_b) and turns pair i at position m by the angle m·θ_i:

    θ_i = base^(−2i/d),  i = 0 .. d/2 − 1,        [x'_a]   [cos mθ_i  −sin mθ_i] [x_a]
                                                  [x'_b] = [sin mθ_i   cos mθ_i] [x_b]

Turning the query by mθ and the key by nθ leaves q·k depending on m − n alone: the encoding is relative. Pair i
has wavelength λ_i = 2π/θ_i tokens, from 2π for i = 0 up to almost 2π·base. The layout says which coordinates
pair up: "half", (x_i, x_{i+d/2}), as GPT-NeoX and Hugging Face's rotate_half; "interleaved", (x_2i, x_2i+1), as
GPT-J and Meta's complex-number pairs; permuting the q/k projection rows turns one into the other.

Context extension: a model trained on L tokens has never seen pairs whose wavelength exceeds L turn further than
in training. The variants change θ_i (and possibly the attention temperature) so that a longer context stays in
familiar territory; a Hugging Face-style `rope_scaling` dict picks one (rope_frequencies). The attention factor (YaRN,
LongRoPE) multiplies cos and sin, so q·k is scaled by its square (Hugging Face's convention, applied there only);
the softmax scale stays 1/√head_size. Channels past the rotary width (partial rotary) are neither rotated nor scaled.

Precision: angles m·θ_i are formed in float64 (float32 angles drift by ~1e-3 past 32k positions), cos/sin are
float32 tables, and the rotation runs in float32, cast back to the input dtype. No complex dtype is on the model's
path, so torch.compile takes it whole. On CUDA with triton installed, the rotation is one fused kernel
(rope_triton.py) reading the same tables; elsewhere rotate_pairs. Figures: assets/plot_rope.py.
"""

import inspect
import math

import torch
from torch import Tensor, nn

try:
    from rope_triton import triton_rope
except ImportError:  # no triton (CPU-only installs): the PyTorch rotation serves every device
    triton_rope = None

ROPE_LAYOUTS = ("half", "interleaved")


# --- The scaling variants: (rot_dim, base, rope_scaling keys) -> (inverse frequencies θ'_i, float64; attention factor)
def default_frequencies(rot_dim: int, base: float) -> tuple[Tensor, float]:
    """Plain RoPE (Su et al. 2021, arXiv:2104.09864): θ_i = base^(−2i/d), attention factor 1."""
    return 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim), 1.0


def linear_frequencies(rot_dim: int, base: float, factor: float) -> tuple[Tensor, float]:
    """Position interpolation (Chen et al. 2023, arXiv:2306.15595; kaiokendev's SuperHOT): positions divided by
    s = factor, i.e. θ'_i = θ_i / s for every pair. Every wavelength grows s-fold, so s·L positions map into the
    trained range [0, L), crowding neighbouring tokens s times closer. Usually needs a little fine-tuning."""
    return default_frequencies(rot_dim, base)[0] / factor, 1.0


def ntk_frequencies(rot_dim: int, base: float, factor: float) -> tuple[Tensor, float]:
    """NTK-aware scaling (bloc97, r/LocalLLaMA 2023; YaRN paper §3.1, arXiv:2309.00071): the base raised to
    base' = base · s^(d/(d−2)), then θ'_i = base'^(−2i/d). The exponent makes the lowest frequency exactly
    θ_{d/2−1}/s (interpolated like PI) while the highest, θ_0 = 1, is untouched (extrapolated); in between, the
    change spreads smoothly. Works without fine-tuning for modest s."""
    return default_frequencies(rot_dim, base * factor ** (rot_dim / (rot_dim - 2)))


def dynamic_ntk_frequencies(
    rot_dim: int, base: float, factor: float, original_max_position_embeddings: int, seq_len: int | None = None
) -> tuple[Tensor, float]:
    """Dynamic NTK (emozilla, r/LocalLLaMA 2023; YaRN paper §3.3, arXiv:2309.00071): NTK-aware scaling whose
    amount follows the current length n = seq_len past the original length L:

        base' = base · (s·n/L − (s − 1))^(d/(d−2))   for n > L,   plain RoPE for n ≤ L."""
    if seq_len is None or seq_len <= original_max_position_embeddings:
        return default_frequencies(rot_dim, base)
    alpha = factor * seq_len / original_max_position_embeddings - (factor - 1)
    return default_frequencies(rot_dim, base * alpha ** (rot_dim / (rot_dim - 2)))


def yarn_frequencies(
    rot_dim: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    truncate: bool = True,
) -> tuple[Tensor, float]:
    """YaRN (Peng et al. 2023, arXiv:2309.00071): each pair blends interpolation and extrapolation by how many
    turns r_i = L/λ_i it makes over the original context L.

    Pairs that turn more than beta_fast times (high frequencies, short wavelengths) are kept, pairs that turn
    fewer than beta_slow times (low frequencies, long wavelengths) are interpolated like PI, and a linear ramp in
    the pair index blends those in between:

        i(β)  = d · ln(L / (2πβ)) / (2 ln base)              the pair that turns β times
        lo, hi = ⌊i(beta_fast)⌋, ⌈i(beta_slow)⌉              (no rounding if truncate=False)
        γ_i   = clamp((i − lo) / (hi − lo), 0, 1)            0: extrapolate, 1: interpolate
        θ'_i  = (1 − γ_i) · θ_i + γ_i · θ_i / s

    as the reference code and Hugging Face do (the paper writes γ linear in r instead; hi is capped at d − 1, as
    in the code). The attention temperature: cos and sin are multiplied by

        attention_factor = 0.1 · ln(s) + 1                   (the paper's √(1/t))

    unless attention_factor is given, or mscale and mscale_all_dim are (DeepSeek's form:
    (0.1·mscale·ln s + 1) / (0.1·mscale_all_dim·ln s + 1)). The variant of choice for long extensions with a short
    fine-tune; at small scale (L of a few hundred tokens) the default betas interpolate almost every pair, as PI:
    rot_dim 64 at L = 256 keeps 1 of 32 pairs and blends 12. Both betas scaled by L/4096 (2 and 0.0625 there: 11
    kept, 12 blended, 9 interpolated) give the shares of rot_dim 128 at L = 4096 (21, 25 and 18 of 64 pairs).
    """
    L = original_max_position_embeddings
    lo, hi = (rot_dim * math.log(L / (beta * 2 * math.pi)) / (2 * math.log(base)) for beta in (beta_fast, beta_slow))
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, rot_dim - 1)
    hi += 0.001 if lo == hi else 0  # a step instead of a ramp
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    inv_freq, _ = default_frequencies(rot_dim, base)
    if attention_factor is None:  # DeepSeek's form; by default mscale = 1 and mscale_all_dim = 0
        log_s = math.log(factor) if factor > 1 else 0.0
        attention_factor = (0.1 * (mscale or 1.0) * log_s + 1) / (0.1 * (mscale_all_dim or 0.0) * log_s + 1)
    return torch.lerp(inv_freq, inv_freq / factor, ramp), attention_factor


def llama3_frequencies(
    rot_dim: int,
    base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> tuple[Tensor, float]:
    """Llama 3.1's rule (Meta 2024, "The Llama 3 Herd of Models", arXiv:2407.21783, and its reference code): with
    wavelengths λ_i = 2π/θ_i and the original length L,

        λ_i < L / high_freq_factor:  θ'_i = θ_i                       (extrapolated)
        λ_i > L / low_freq_factor:   θ'_i = θ_i / s                   (interpolated)
        otherwise:                   θ'_i = (1 − g)·θ_i/s + g·θ_i,    g = (L/λ_i − low_freq_factor)
                                                                           / (high_freq_factor − low_freq_factor)

    g runs from 0 to 1 across the middle band and is clamped outside it, which gives the three cases at once:
    like YaRN without its temperature, with the band set by wavelengths."""
    inv_freq, _ = default_frequencies(rot_dim, base)
    wavelength = 2 * math.pi / inv_freq
    g = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return torch.lerp(inv_freq / factor, inv_freq, g.clamp(0, 1)), 1.0


def longrope_frequencies(
    rot_dim: int,
    base: float,
    short_factor: list[float],
    long_factor: list[float],
    original_max_position_embeddings: int,
    factor: float | None = None,
    attention_factor: float | None = None,
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """LongRoPE (Ding et al. 2024, arXiv:2402.13753; Phi-3): a searched rescale λ_i per pair, θ'_i = θ_i / λ_i,
    with λ = short_factor up to the original length L and long_factor past it (n = seq_len > L). Cos and sin are
    multiplied by

        attention_factor = √(1 + ln(s) / ln(L))     (1 for s ≤ 1)

    unless attention_factor is given. The factors are searched per model: this variant is for loading a config
    that has them, not for picking by hand."""
    long = seq_len is not None and seq_len > original_max_position_embeddings
    rescale = torch.tensor(long_factor if long else short_factor, dtype=torch.float64)
    if attention_factor is None:
        L = original_max_position_embeddings
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(L))
    return default_frequencies(rot_dim, base)[0] / rescale, attention_factor


def proportional_frequencies(
    rot_dim: int, base: float, partial_rotary_factor: float = 1.0, factor: float = 1.0
) -> tuple[Tensor, float]:
    """p-RoPE (Barbero et al. 2024, "Round and Round We Go!", arXiv:2410.06205; Gemma 4's global layers): the first
    p·d/2 pairs keep plain RoPE's θ_i = base^(−2i/d) over the whole width d; the rest, the lowest frequencies, get
    θ_i = 0 and never turn: channels for content alone. All are divided by factor (Hugging Face's "proportional")."""
    inv_freq, kept = default_frequencies(rot_dim, base)[0], int(partial_rotary_factor * rot_dim // 2)  # HF's rounding
    return torch.where(torch.arange(rot_dim // 2) < kept, inv_freq, 0.0) / factor, 1.0


ROPE_VARIANTS = {
    "default": default_frequencies,
    "linear": linear_frequencies,
    "ntk": ntk_frequencies,
    "dynamic": dynamic_ntk_frequencies,
    "yarn": yarn_frequencies,
    "llama3": llama3_frequencies,
    "longrope": longrope_frequencies,
    "proportional": proportional_frequencies,
}
LENGTH_DEPENDENT = frozenset({"dynamic", "longrope"})  # variants whose frequencies follow the current length (seq_len)


# --- The functional core: a rope_scaling dict, checked strictly, to inverse frequencies and cos/sin tables
def variant_keys(rope_type: str) -> tuple[set[str], set[str]]:
    """(required, optional) rope_scaling keys of a variant: its function's parameters after rot_dim and base,
    less seq_len for a length-dependent variant (the current length, not a key)."""
    params = list(inspect.signature(ROPE_VARIANTS[rope_type]).parameters.values())[2:]
    if rope_type in LENGTH_DEPENDENT:
        params = [p for p in params if p.name != "seq_len"]
    required = {p.name for p in params if p.default is inspect.Parameter.empty}
    return required, {p.name for p in params} - required


def rope_type_of(rope_scaling: dict | None) -> str:
    """The variant a rope_scaling dict names: its rope_type, or HF's legacy alias "type"."""
    if rope_scaling is None:
        return "default"
    if not isinstance(rope_scaling, dict):
        valid = "e.g. {'rope_type': 'yarn', 'factor': 4.0}"
        raise ValueError(f"rope_scaling must be a dict or None, not {type(rope_scaling).__name__}; valid: {valid}")
    names = [rope_scaling[k] for k in ("rope_type", "type") if k in rope_scaling]
    if not names or names[0] != names[-1]:
        problem = f"names two types {names}" if names else "has no 'rope_type'"
        raise ValueError(f"rope_scaling {problem}; valid: one 'rope_type' (or 'type') of {', '.join(ROPE_VARIANTS)}")
    if not isinstance(names[0], str) or names[0] not in ROPE_VARIANTS:
        raise ValueError(f"rope_scaling rope_type {names[0]!r} is not supported; valid: {', '.join(ROPE_VARIANTS)}")
    return names[0]


def complete_rope_scaling(rope_scaling: dict | None, original_max_position_embeddings: int) -> dict | None:
    """rope_scaling with original_max_position_embeddings (our training length, GPTConfig.block_size, where Hugging
    Face uses max_position_embeddings) filled in where the variant reads it; anything else is left as is."""
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type")) if isinstance(rope_scaling, dict) else None
    keys = set.union(*variant_keys(rope_type)) if isinstance(rope_type, str) and rope_type in ROPE_VARIANTS else ()
    if "original_max_position_embeddings" not in keys:
        return rope_scaling
    return {"original_max_position_embeddings": original_max_position_embeddings, **rope_scaling}


def _is_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_rope_scaling(rope_type: str, params: dict, rot_dim: int) -> None:
    """Raise a one-line ValueError for a bad value among a variant's rope_scaling keys."""

    def bad(key: str, valid: str) -> ValueError:
        return ValueError(f"rope_scaling {rope_type} {key}={params[key]!r} is not valid; valid: {valid}")

    positive = "factor low_freq_factor high_freq_factor beta_fast beta_slow attention_factor mscale mscale_all_dim"
    for key, value in params.items():
        if key in positive.split() and not _is_positive(value):
            raise bad(key, "a positive number")
        if key == "factor" and value < 1:
            raise bad(key, "a number of at least 1 (1 is plain RoPE)")
        if key == "partial_rotary_factor" and not (_is_positive(value) and value <= 1):
            raise bad(key, "the share of the pairs that turn, in (0, 1]")
        if key == "original_max_position_embeddings" and not (type(value) is int and value > 0):
            raise bad(key, "a positive whole number of tokens")
        if key == "truncate" and not isinstance(value, bool):
            raise bad(key, "True or False")
        per_pair = isinstance(value, (list, tuple)) and len(value) == rot_dim // 2 and all(map(_is_positive, value))
        if key in ("short_factor", "long_factor") and not per_pair:
            raise bad(key, f"a list of {rot_dim // 2} positive numbers, one per rotary pair")
    if params.get("beta_fast", 32.0) <= params.get("beta_slow", 1.0):
        raise bad("beta_fast", f"a number above beta_slow={params.get('beta_slow', 1.0)}")
    if "low_freq_factor" in params and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise bad("high_freq_factor", f"a number above low_freq_factor={params['low_freq_factor']}")
    if ("mscale" in params) != ("mscale_all_dim" in params) or ("mscale" in params and "attention_factor" in params):
        given = sorted(set(params) & {"mscale", "mscale_all_dim", "attention_factor"})
        valid = "attention_factor, or mscale with mscale_all_dim, or none of them"
        raise ValueError(f"rope_scaling {rope_type} has {given}; valid: {valid}")
    if rope_type == "longrope" and "factor" not in params and "attention_factor" not in params:
        valid = "e.g. factor = max_position_embeddings / original_max_position_embeddings of the model's config"
        raise ValueError(f"rope_scaling longrope needs 'factor' or 'attention_factor'; valid: {valid}")
    if rope_type in ("ntk", "dynamic") and rot_dim < 4:
        valid = "at least 4 (s^(d/(d−2)))"
        raise ValueError(f"rope_scaling {rope_type} cannot scale a rotary width of {rot_dim}; valid: {valid}")


def rope_frequencies(
    rot_dim: int, base: float, rope_scaling: dict | None = None, seq_len: int | None = None
) -> tuple[Tensor, float]:
    """(inverse frequencies θ'_i (rot_dim/2,) in float64, attention factor) for the rotary width rot_dim; the factor
    multiplies cos and sin (1 for plain RoPE). seq_len, the current length, is read by LENGTH_DEPENDENT variants
    only (None: at most the original). rope_scaling is Hugging Face's rope_scaling / rope_parameters,
    {"rope_type": NAME, ...} with NAME in ROPE_VARIANTS and the keys of its function ("type" is accepted for
    "rope_type", "rope_theta" if it equals base). Every key is checked: an unknown or missing key, a factor below 1
    or an odd rot_dim is a one-line ValueError."""
    if not (isinstance(rot_dim, int) and rot_dim >= 2 and rot_dim % 2 == 0):
        raise ValueError(f"RoPE rotary dimension {rot_dim!r} is not valid; valid: an even number of at least 2")
    if not (_is_positive(base) and base > 1):
        raise ValueError(f"rope_base {base!r} is not valid; valid: a number above 1, such as 10000.0")
    rope_type = rope_type_of(rope_scaling)
    params = {k: v for k, v in (rope_scaling or {}).items() if k not in ("rope_type", "type", "rope_theta")}
    if (theta := (rope_scaling or {}).get("rope_theta", base)) != base:
        valid = f"set rope_base={theta!r}, or leave rope_theta out"
        raise ValueError(f"rope_scaling rope_theta {theta!r} differs from rope_base {base!r}; valid: {valid}")
    required, optional = variant_keys(rope_type)
    unknown, missing = sorted(set(params) - required - optional), sorted(required - set(params))
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        valid = ", ".join(["rope_type"] + sorted(required) + sorted(f"{k} (optional)" for k in optional))
        raise ValueError(f"rope_scaling {rope_type} has {problem}; valid: {valid}")
    check_rope_scaling(rope_type, params, rot_dim)
    if rope_type in LENGTH_DEPENDENT:
        params["seq_len"] = seq_len
    return ROPE_VARIANTS[rope_type](rot_dim, float(base), **params)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, attention_factor: float = 1.0) -> tuple[Tensor, Tensor]:
    """attention_factor · cos(m·θ_i) and · sin(m·θ_i), float32 (..., rot_dim/2), for integer positions m of any
    shape (...) and inv_freq θ (rot_dim/2,) in float64; the angles m·θ_i are formed in float64."""
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (..., rot_dim/2)
    return (angles.cos() * attention_factor).to(torch.float32), (angles.sin() * attention_factor).to(torch.float32)


def rot_dim_for(head_size: int, fraction: float) -> int:
    """The rotary width rot_dim: the head_size · fraction channels of each head that RoPE turns, an even number."""
    rot_dim = int(head_size * fraction)
    if rot_dim < 2 or rot_dim % 2:
        raise ValueError(
            f"RoPE cannot rotate head size {head_size} with rope_fraction {fraction}: "
            f"it gives {rot_dim} rotary channels; valid: an even number of at least 2"
        )
    return rot_dim


# --- The rotation, its two layouts and the weight permutation between them
def split_pairs(x: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """The two coordinates (a_i, b_i) of every pair of x's last dimension, each (..., rot_dim/2)."""
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"unknown rope_layout {layout!r}; valid: {', '.join(ROPE_LAYOUTS)}")
    return x.chunk(2, dim=-1) if layout == "half" else (x[..., 0::2], x[..., 1::2])


def merge_pairs(a: Tensor, b: Tensor, layout: str) -> Tensor:
    """The inverse of split_pairs: (..., rot_dim/2) twice to (..., rot_dim)."""
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"unknown rope_layout {layout!r}; valid: {', '.join(ROPE_LAYOUTS)}")
    return torch.cat((a, b), dim=-1) if layout == "half" else torch.stack((a, b), dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, layout: str = "half") -> Tensor:
    """Rotate the first rot_dim channels of x by the angles behind cos/sin; pass the rest through.

    x: (B, H, T, hs) in any float dtype and strides, such as the model's queries and keys as one (B, nh + n_kv, T, hs)
    view of its qkv projection; cos, sin: float32, broadcastable to (B, 1, T, rot_dim/2). In float32, returning x's
    dtype: by the Triton kernel where uses_fused_rope(x.device), else by rotate_pairs; differentiable in x only."""
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"unknown rope_layout {layout!r}; valid: {', '.join(ROPE_LAYOUTS)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope got cos/sin that require grad; valid: detached tables (rope_cos_sin)")
    fused = uses_fused_rope(x.device)  # looked up at every call, so a test may force either path
    if torch.is_grad_enabled() and x.requires_grad:
        return RotaryFunction.apply(x, cos, sin, layout, fused)
    return rotate(x, cos, sin, layout, fused)  # no graph to record: skip autograd.Function's overhead (decoding)


def uses_fused_rope(device: torch.device) -> bool:  # CUDA with triton installed: apply_rope's Triton kernel
    return device.type == "cuda" and triton_rope is not None


class RotaryFunction(torch.autograd.Function):
    """RoPE with its own backward: a rotation is orthogonal, R_θᵀ = R_−θ, so the gradient of x ↦ R_θ x is the
    incoming gradient rotated by −θ, i.e. the same rotation with sin negated."""

    @staticmethod
    def forward(ctx, x, cos, sin, layout, fused):
        ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.fused = layout, fused
        return rotate(x, cos, sin, layout, fused)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, -sin, ctx.layout, ctx.fused), None, None, None, None


def rotate(x: Tensor, cos: Tensor, sin: Tensor, layout: str, fused: bool) -> Tensor:
    """x rotated, outside autograd: by the Triton kernel (rope_triton.triton_rope), or by rotate_pairs."""
    return triton_rope(x, cos, sin, layout) if fused else rotate_pairs(x, cos, sin, layout)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor, layout: str) -> Tensor:
    """apply_rope's arithmetic in PyTorch, outside autograd: a' = a·cos − b·sin, b' = b·cos + a·sin. One product
    into a fresh float32 buffer, then the cross terms added in place: at small shapes these elementwise passes are
    what RoPE costs a CPU training step, so there are as few as possible (no copy if the whole head turns)."""
    rot_dim = 2 * cos.size(-1)
    turned = x if rot_dim == x.size(-1) else x[..., :rot_dim]  # partial rotary: the first rot_dim channels
    a, b = split_pairs(turned, layout)
    out = turned * merge_pairs(cos, cos, layout)  # (a·cos, b·cos), float32 even for bf16 x
    out_a, out_b = split_pairs(out, layout)
    out_a.addcmul_(b, sin, value=-1)
    out_b.addcmul_(a, sin)
    if turned is not x:  # the other channels pass through
        out = torch.cat((out, x[..., rot_dim:]), dim=-1)
    return out.to(x.dtype)


def permute_qk_weights(qkv: Tensor, n_head: int, n_kv_head: int, rot_dim: int, src: str, dst: str) -> Tensor:
    """c_attn's weight or bias, rows q (n_head heads), k, v (n_kv_head heads each), from layout src to dst: every q
    and k head becomes x_dst = x_src[..., perm], perm = 0, d/2, 1, d/2+1, ... (half -> interleaved) or the evens,
    then the odds (interleaved -> half), channels past rot_dim in place; v is untouched. As q·k sums over channels,
    a dst-layout model with these weights computes what the src-layout model does; unpermuted, fluent garbage."""
    hs = qkv.size(0) // (n_head + 2 * n_kv_head)
    a, b = split_pairs(torch.arange(rot_dim), src)  # where each pair's coordinates live in src
    perm = torch.cat((merge_pairs(a, b, dst), torch.arange(rot_dim, hs)))
    qk = torch.arange((n_head + n_kv_head) * hs).view(-1, hs)[:, perm].flatten()  # q, then k rows, head by head
    return qkv[torch.cat((qk, torch.arange(len(qk), qkv.size(0))))]


class RotaryEmbedding(nn.Module):
    """cos/sin for explicit positions: forward(positions, seq_len) -> (cos, sin), float32.

    original_max_position_embeddings (the training context) fills that key of rope_scaling where the variant reads
    it. Stateless between calls (a long call never changes a later short one: transformers#25306): the buffer holds
    the frequencies at the original length, and a length_dependent variant recomputes them from seq_len per call.
    The float64 buffer is non-persistent and rebuilt, never cast, when the module is moved or cast (model.half())."""

    def __init__(
        self,
        rot_dim: int,
        base: float,
        rope_scaling: dict | None = None,
        original_max_position_embeddings: int | None = None,
    ):
        super().__init__()
        if original_max_position_embeddings is not None:
            rope_scaling = complete_rope_scaling(rope_scaling, original_max_position_embeddings)
        self.rot_dim, self.base, self.rope_scaling = rot_dim, base, rope_scaling
        inv_freq, self.attention_factor = rope_frequencies(rot_dim, base, rope_scaling)
        self.length_dependent = rope_type_of(rope_scaling) in LENGTH_DEPENDENT
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # which may have cast the buffer: rebuilt exactly, on its new device
        self.inv_freq = rope_frequencies(self.rot_dim, self.base, self.rope_scaling)[0].to(self.inv_freq.device)
        return self

    def forward(self, positions: Tensor, seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        """positions: integer (T,) or (B, T); seq_len: the length of the sequence they belong to, read by
        length-dependent variants only (None there means max(positions) + 1). Returns float32 (..., T, rot_dim/2)."""
        if not self.length_dependent:
            return rope_cos_sin(positions, self.inv_freq, self.attention_factor)
        seq_len = int(positions.max()) + 1 if seq_len is None else seq_len
        inv_freq, attention_factor = rope_frequencies(self.rot_dim, self.base, self.rope_scaling, seq_len)
        return rope_cos_sin(positions, inv_freq.to(self.inv_freq.device), attention_factor)

    def changes_between(self, old_len: int, new_len: int) -> bool:
        """Whether a length-dependent variant has other frequencies (or attention factor) at new_len than at old_len."""
        if not self.length_dependent or old_len == new_len:
            return False
        old, old_factor = rope_frequencies(self.rot_dim, self.base, self.rope_scaling, old_len)
        new, new_factor = rope_frequencies(self.rot_dim, self.base, self.rope_scaling, new_len)
        return old_factor != new_factor or not torch.equal(old, new)
