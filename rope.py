"""Rotary position embedding (RoPE), Su et al. 2021, "RoFormer" (arXiv:2104.09864).

RoPE splits each query and key head of rotary width d into d/2 pairs (x_2i, x_2i+1) and turns
pair i at position m by the angle m·θ_i, with

    θ_i = base^(−2i/d),  i = 0 .. d/2 − 1

    [x'_a]   [cos mθ_i  −sin mθ_i] [x_a]
    [x'_b] = [sin mθ_i   cos mθ_i] [x_b]

A rotation by mθ of the query and by nθ of the key leaves q·k depending on m − n alone, which
is what makes the encoding relative.

Which two coordinates form pair i is the layout:
- "half": (x_i, x_{i+d/2}), GPT-NeoX and Hugging Face's rotate_half;
- "interleaved": (x_2i, x_2i+1), GPT-J and Meta's complex-number pairs.

Precision policy: angles m·θ_i are formed in float64 (float32 angles drift by ~1e-3 past 32k
positions), cos/sin are returned as float32, and the rotation itself runs in float32 and is cast
back to the input dtype. Nothing here uses a complex dtype, so torch.compile takes it whole.
"""

from __future__ import annotations

import torch
import torch.nn as nn

ROPE_LAYOUTS = ("half", "interleaved")


def rope_frequencies(
    head_dim: int, base: float, rope_scaling: dict | None = None, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies θ_i = base^(−2i/d) for a rotary width d = head_dim, in float64.

    Returns (inv_freq of shape (d/2,), attention_factor). The attention factor multiplies cos and
    sin (so q·k by its square); it is 1 for plain RoPE. rope_scaling selects a context-extension
    variant; seq_len is the current sequence length, which only length-dependent variants read.
    """
    if rope_scaling is not None and rope_scaling.get("rope_type", "default") != "default":
        raise ValueError(f"rope_scaling rope_type {rope_scaling['rope_type']!r} is not supported; valid: 'default'")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return 1.0 / (base**exponents), 1.0


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(m·θ_i) and sin(m·θ_i) for every position m, angles in float64, results in float32.

    positions: integer tensor of any shape (...); inv_freq: (d/2,) float64.
    Returns two float32 tensors of shape (..., d/2).
    """
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (..., d/2)
    cos = (angles.cos() * attention_factor).to(torch.float32)
    sin = (angles.sin() * attention_factor).to(torch.float32)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotate the first 2·(d/2) channels of x by the angles behind cos/sin; pass the rest through.

    x: (B, nh, T, hs) in any float dtype; cos, sin: float32, broadcastable to (B, nh, T, d/2).
    The rotation runs in float32 and the result has x's dtype. Channels past the rotary width
    (partial rotary) are returned unchanged.
    """
    rot = 2 * cos.size(-1)
    xr, xp = x[..., :rot].float(), x[..., rot:]
    if layout == "half":
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out.to(x.dtype), xp), dim=-1)


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

    The inverse frequencies live in a non-persistent float64 buffer that is rebuilt (never cast)
    whenever the module is moved or cast, so model.to(torch.bfloat16) or .half() leaves them exact.
    """

    def __init__(self, dim: int, base: float, rope_scaling: dict | None = None):
        super().__init__()
        self.dim, self.base, self.rope_scaling = dim, base, rope_scaling
        inv_freq, self.attention_factor = rope_frequencies(dim, base, rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # fn may have cast the buffer (model.half()); rebuild it exactly on its new device
        device = self.inv_freq.device
        self.inv_freq = rope_frequencies(self.dim, self.base, self.rope_scaling)[0].to(device)
        return self

    def forward(self, positions: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.inv_freq, self.attention_factor)
