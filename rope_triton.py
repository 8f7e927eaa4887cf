"""The fused RoPE apply: one Triton kernel, forward and backward, for the model's queries and keys
at once (one (B, 2·nh, T, hs) tensor). rope.apply_rope runs it on CUDA when triton is installed;
its backward is the same launch with sin negated (rope.RotaryFunction).

Angles: the kernel reads the float32 cos/sin tables of rope.rope_cos_sin (angles formed in float64)
rather than forming m·θ_i itself. A float32 angle is off by up to m·θ_i·2^-24 radians, which grows
with the position m, and float64 arithmetic is slow on most GPUs. The tables also carry every
scaling variant and the attention factor, and cost little bandwidth: (T, rot_dim/2) twice, shared
by all heads, against 4·nh·T·hs values of q and k read and written. Offsets and per-row positions
are only other tables. Speed against a copy of the same bytes: bench.py's rope section, BENCHMARKS.md.

With TRITON_INTERPRET=1 in the environment when this module is imported, Triton's interpreter runs
the kernel on CPU tensors (tests/test_rope_triton.py).
"""

import torch
import triton
import triton.language as tl


def triton_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Launch the kernel once for x: a rotated copy in x's dtype, contiguous (B, H, T, hs).

    x: (B, H, T, hs), any strides with a unit one on the last dimension (else it is copied);
    cos, sin: float32, broadcastable to (B, 1, T, rot_dim/2); layout: "half" or "interleaved".
    """
    B, H, T, D = x.shape
    half = cos.size(-1)
    try:
        cos, sin = (torch.broadcast_to(t.float().contiguous(), (B, 1, T, half)) for t in (cos, sin))
    except RuntimeError:
        raise ValueError(
            f"fused RoPE got cos/sin of shape {tuple(cos.shape)} for x {tuple(x.shape)}; "
            f"valid: broadcastable to (B, 1, T, rot_dim/2), the same for every head"
        ) from None
    x_in = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    block_half = 1 << (half - 1).bit_length()  # tl.arange takes powers of two
    block_t = max(1, 2048 // block_half)  # about 2048 pairs per program (untuned)
    rope_kernel[(H * B * -(-T // block_t),)](
        x_in, out, cos, sin, T, H, *x_in.stride()[:3], cos.stride(0), cos.stride(2),
        HALF=half, HEAD=D, INTERLEAVED=layout == "interleaved",
        BLOCK_T=block_t, BLOCK_HALF=block_half, BLOCK_PASS=1 << max(0, D - 2 * half - 1).bit_length(),
    )  # fmt: skip
    return out


@triton.jit
def rope_kernel(
    x, out, cos, sin, T, H, x_sb, x_sh, x_st, c_sb, c_st,
    HALF: tl.constexpr, HEAD: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    """One program turns one head over BLOCK_T tokens of one row, in float32. Programs run head by
    head, so those that share a block of cos/sin run together and read it from cache. x has any
    strides but a unit one on the last dimension; out is contiguous (B, H, T, HEAD). Offsets are
    int64: B·H·T·HEAD may pass 2^31."""
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
    else:  # pair i is (i, i + rot_dim/2)
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
