"""The fused RoPE kernel (rope_triton.triton_rope, one Triton launch for the queries and keys as one
(B, nh + n_kv, T, hs) view, as the model passes them) against a float64 rotation written from the definition and
against apply_rope's PyTorch arithmetic, forward and backward. On a CUDA machine the kernel runs compiled on the
GPU; elsewhere conftest.py sets TRITON_INTERPRET=1 before rope_triton is imported, and Triton's interpreter runs
it on the CPU (numpy), so CI covers it without a GPU. Its speed is bench.py's rope section."""

import pytest
import torch

import rope as rope_module
from model import GPT, GPTConfig
from rope import apply_rope, rope_cos_sin, rope_frequencies, uses_fused_rope

# requirements-dev.txt installs triton: this skips only a bare environment, where rope_triton cannot import
triton_rope = pytest.importorskip("rope_triton", reason="triton is not installed").triton_rope

TOL = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter takes CPU tensors, compiled Triton CUDA ones


def rope_forced(monkeypatch, fused: bool, *args) -> torch.Tensor:
    """apply_rope(*args) on the Triton kernel (fused) or on the PyTorch rotation, whatever the device says."""
    with monkeypatch.context() as patch:
        patch.setattr(rope_module, "uses_fused_rope", lambda device: fused)
        return apply_rope(*args)


def rotate_float64(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, layout: str) -> torch.Tensor:
    """R_m x in float64, pair by pair from the definition: pair i of the rotary width is
    (x_i, x_{i+d/2}) ("half") or (x_2i, x_2i+1) ("interleaved"), turned by m·θ_i; the other
    channels pass through. x: (B, nh, T, hs); positions: (T,) or (B, T)."""
    angles = positions.double().unsqueeze(-1) * inv_freq  # (..., T, d/2)
    if positions.dim() == 2:
        angles = angles.unsqueeze(1)  # (B, 1, T, d/2): the same for every head
    i = torch.arange(inv_freq.numel())
    ia, ib = (i, i + inv_freq.numel()) if layout == "half" else (2 * i, 2 * i + 1)
    x = x.double()
    a, b = x[..., ia], x[..., ib]
    out = x.clone()
    out[..., ia] = a * angles.cos() - b * angles.sin()
    out[..., ib] = b * angles.cos() + a * angles.sin()
    return out


def qk_view(qkv: torch.Tensor, heads: int, D: int) -> torch.Tensor:
    """q and k as the model makes them: one strided (B, nh + n_kv, T, hs) view of a (B, T, (nh + 2·n_kv)·hs) buffer."""
    B, T, _ = qkv.shape
    return qkv[..., : heads * D].view(B, T, heads, D).transpose(1, 2)


def per_row(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, 65_537, (B, T))


CASES = {  # layout, B, query heads, key/value heads, T, head size, rotary width, positions
    "half, offset 60,000": ("half", 2, 3, 3, 37, 16, 16, lambda B, T: 60_000 + torch.arange(T)),
    "half, partial, per-row, 300 tokens": ("half", 2, 6, 6, 300, 20, 12, per_row),
    "interleaved, partial, per-row": ("interleaved", 3, 3, 3, 45, 12, 8, per_row),
    "interleaved, 1 token": ("interleaved", 2, 6, 6, 1, 16, 16, lambda B, T: torch.tensor([65_536])),
    "half, grouped: 6 query heads, 2 key heads": ("half", 2, 6, 2, 50, 16, 16, per_row),
    "interleaved, partial, 1 key head": ("interleaved", 2, 4, 1, 33, 16, 8, lambda B, T: 500 + torch.arange(T)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_forward_and_backward_match_float64_and_pytorch(case, monkeypatch):
    """Non-power-of-two head counts, lengths not multiples of the token block, offsets and
    per-row positions up to 65,536, partial rotary; gradients for random upstream gradients."""
    layout, B, H, n_kv, T, D, rot_dim, make_positions = CASES[case]
    torch.manual_seed(0)
    positions = make_positions(B, T).to(DEVICE)
    inv_freq, _ = rope_frequencies(rot_dim, 10000.0)
    inv_freq = inv_freq.to(DEVICE)
    cos, sin = rope_cos_sin(positions, inv_freq)
    if positions.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d/2), as the model passes them
    qkv = torch.randn(B, T, (H + 2 * n_kv) * D, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    qkv.requires_grad_()
    qk = qk_view(qkv, H + n_kv, D)
    grad = torch.randn(B, H + n_kv, T, D).to(DEVICE)

    fused = rope_forced(monkeypatch, True, qk, cos, sin, layout)
    plain = rope_forced(monkeypatch, False, qk, cos, sin, layout)
    assert fused.dtype == torch.float32 and fused.shape == (B, H + n_kv, T, D) and fused.is_contiguous()
    (fused_grad,) = torch.autograd.grad((fused * grad).sum(), qkv)
    (plain_grad,) = torch.autograd.grad((plain * grad).sum(), qkv)

    qkv64 = qkv.detach().double().requires_grad_()
    ref = rotate_float64(qk_view(qkv64, H + n_kv, D), positions, inv_freq, layout)
    (ref_grad,) = torch.autograd.grad((ref * grad.double()).sum(), qkv64)

    for out, exact, plain_out in ((fused, ref, plain), (fused_grad, ref_grad, plain_grad)):
        torch.testing.assert_close(out.detach().double(), exact.detach(), rtol=0, atol=TOL)
        torch.testing.assert_close(out.detach(), plain_out.detach(), rtol=0, atol=TOL)
    assert torch.equal(fused[..., rot_dim:], qk[..., rot_dim:])  # pass-through channels are copied exactly


def test_tables_keep_float64_accuracy_where_float32_angles_would_not(monkeypatch):
    """The kernel reads cos/sin tables built from float64 angles. At positions near 65,536 that
    is within 1e-5 of the exact rotation; the same rotation with float32 angles (m·θ formed in
    float32, as a kernel computing its own angles would) is not, so this tolerance would catch it."""
    B, H, T, D = 1, 2, 64, 64
    positions = (65_536 - torch.arange(T)).to(DEVICE)
    inv_freq = rope_frequencies(D, 10000.0)[0].to(DEVICE)
    x = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    exact = rotate_float64(x, positions, inv_freq, "half")
    fused = rope_forced(monkeypatch, True, x, *rope_cos_sin(positions, inv_freq), "half")
    assert (fused.double() - exact).abs().max() <= TOL
    angles32 = positions.float().unsqueeze(-1) * inv_freq.float()
    float32_angles = rope_forced(monkeypatch, False, x, angles32.cos(), angles32.sin(), "half")
    assert (float32_angles.double() - exact).abs().max() > 10 * TOL


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_bf16_is_within_one_ulp_of_the_exact_rotation(layout, monkeypatch):
    """bf16 in, bf16 out, float32 arithmetic inside: one rounding of the exact rotation."""
    x = (torch.randn(2, 3, 20, 16, generator=torch.Generator().manual_seed(0)) * 4).to(DEVICE, torch.bfloat16)
    positions = torch.arange(70_000, 70_020, device=DEVICE)
    inv_freq = rope_frequencies(16, 10000.0)[0].to(DEVICE)
    out = rope_forced(monkeypatch, True, x, *rope_cos_sin(positions, inv_freq), layout)
    assert out.dtype == torch.bfloat16
    exact = rotate_float64(x, positions, inv_freq, layout)
    _, exponent = torch.frexp(exact.abs())
    ulp = torch.ldexp(torch.ones_like(exact), exponent - 8)  # bfloat16 keeps 8 significant bits
    assert ((out.double() - exact).abs() <= ulp).all()


def test_model_on_the_fused_kernel_matches_the_pytorch_rotation(monkeypatch):
    """The model's use of it: strided q and k from c_attn, per-row positions (tables of shape
    (B, 1, T, d/2)), loss and every gradient."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=32, n_layer=2, n_head=3, n_embd=36, rope_fraction=2 / 3)).to(DEVICE)
    idx = torch.randint(0, 32, (2, 19)).to(DEVICE)
    positions = torch.stack((torch.arange(19), torch.arange(19) + 40_000)).to(DEVICE)

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(idx, idx, positions=positions)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    launches = []

    def counted_kernel(*args):
        launches.append(tuple(args[0].shape))
        return triton_rope(*args)

    monkeypatch.setattr(rope_module, "triton_rope", counted_kernel)
    monkeypatch.setattr(rope_module, "uses_fused_rope", lambda device: False)  # the PyTorch rotation, even on CUDA
    loss, grads = loss_and_grads()
    assert launches == []
    monkeypatch.setattr(rope_module, "uses_fused_rope", lambda device: True)  # the kernel, even on the CPU
    fused_loss, fused_grads = loss_and_grads()
    assert launches == [(2, 6, 19, 12)] * 4  # queries and keys (2·3 heads) in one launch, per layer and pass
    torch.testing.assert_close(fused_loss, loss, rtol=0, atol=TOL)
    for fused_grad, grad in zip(fused_grads, grads):
        torch.testing.assert_close(fused_grad, grad, rtol=0, atol=TOL)


def test_dispatch_and_errors(monkeypatch):
    assert not uses_fused_rope(torch.device("cpu"))  # the CPU runs rope.rotate_pairs
    assert uses_fused_rope(torch.device("cuda"))  # triton is installed (else this file is skipped)
    x = torch.randn(1, 2, 4, 8, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(4, device=DEVICE), rope_frequencies(8, 10000.0)[0].to(DEVICE))
    monkeypatch.setattr(rope_module, "uses_fused_rope", lambda device: True)
    for call, message in (
        (lambda: apply_rope(x, cos.requires_grad_(), sin), "require grad"),
        (lambda: apply_rope(x, cos.detach(), sin, "gptj"), "'gptj'"),
        (lambda: apply_rope(x, cos.detach().expand(2, 2, 4, 4), sin.expand(2, 2, 4, 4)), "every head"),
    ):
        with pytest.raises(ValueError, match="valid:") as error:
            call()
        assert message in str(error.value) and "\n" not in str(error.value)
