"""Every attention path of attention.attention equals attention written out by hand: float64 scores
q·kᵀ/√hs, ALiBi's bias slope_h·(n − m), an explicit causal mask by position, a float64 softmax.
Forward and backward, float32 within 1e-5, head counts that are not powers of two and lengths
that are not multiples of 128 (FlexAttention's block).

FlexAttention (ALiBi on CUDA): its compiled forward runs here on the CPU (inductor's fused CPU
kernel). Its backward exists only on GPUs: the backward tests run the eager, unfused
implementation with PyTorch's CPU check lifted, which differentiates through our score_mod and
block mask. The compiled GPU kernels themselves are not run here."""

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

import attention as attention_module
import model as model_module
import sample
from attention import LocalWindow, alibi_bias, alibi_slopes, attention, flex_alibi, local_block_mask, visible
from model import GPT, GPTConfig

TOL = 1e-5


def reference_attention(q, k, v, q_pos, k_pos, slopes=None, window=None, chunk=None):
    """softmax(q·kᵀ/√hs + slope_h·(n − m), keys with n > m removed)·v in float64, for queries at
    positions m = q_pos ((Tq,) or (B, Tq)) and keys at n = k_pos ((Tk,) or (B, Tk)). A window also
    removes keys with m − n ≥ window, a chunk those with ⌊n/chunk⌋ ≠ ⌊m/chunk⌋. k and v with fewer
    heads serve groups of nh/n_kv consecutive query heads (GQA), repeated here."""
    k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, nh, Tq, Tk)
    m, n = q_pos.double().unsqueeze(-1), k_pos.double().unsqueeze(-2)  # (..., Tq, 1), (..., 1, Tk)
    m, n = (p.unsqueeze(1) if p.dim() == 3 else p for p in (m, n))  # per-row: (B, 1, ...), every head alike
    if slopes is not None:
        scores = scores + slopes.double().view(-1, 1, 1) * (n - m)
    removed = n > m
    if window is not None:
        removed = removed | (m - n >= window)
    if chunk is not None:
        removed = removed | (torch.floor(n / chunk) != torch.floor(m / chunk))
    return scores.masked_fill(removed, float("-inf")).softmax(dim=-1) @ v


def qkv(B, nh, Tq, Tk, hs=8, seed=0, n_kv=None):
    gen = torch.Generator().manual_seed(seed)
    heads = (nh, n_kv or nh, n_kv or nh)
    return [torch.randn(B, h, T, hs, generator=gen).requires_grad_() for h, T in zip(heads, (Tq, Tk, Tk))]


def check(out, q, k, v, *reference_args):
    """out = attention(q, k, v, ...) against reference_attention(q, k, v, *reference_args) on
    float64 copies, and the gradients of both for a random upstream gradient."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, *reference_args)
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=0, atol=TOL)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    want = torch.autograd.grad((ref * grad.double()).sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=TOL)


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention uncompiled, with PyTorch's 'no backward on CPU' check lifted (see the module docstring)."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(attention_module, "compiled_flex_attention", flex_module.flex_attention)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.mark.parametrize("nh, T", [(3, 37), (6, 130), (12, 200)])
def test_causal_sdpa_path(nh, T):
    """learned, sinusoidal, none and rope: SDPA with is_causal."""
    q, k, v = qkv(2, nh, T, T)
    positions = torch.arange(T)
    check(attention(q, k, v), q, k, v, positions, positions)


@pytest.mark.parametrize("nh, T, per_row", [(3, 37, False), (6, 130, True), (12, 200, False)])
def test_alibi_dense_bias_path(nh, T, per_row):
    """ALiBi with a dense bias (the CPU's path), at an offset or with per-row positions."""
    q, k, v = qkv(2, nh, T, T)
    positions = torch.stack((torch.arange(T), torch.arange(T) + 1000)) if per_row else torch.arange(T) + 50
    slopes = alibi_slopes(nh)
    check(attention(q, k, v, alibi_bias(slopes, positions, positions)), q, k, v, positions, positions, slopes)


def test_alibi_flex_compiled_forward():
    """FlexAttention compiled (inductor's CPU kernel): one compile, 6 heads, 130 tokens (two
    query blocks of 128, the second partial), positions at an offset."""
    q, k, v = (t.detach() for t in qkv(2, 6, 130, 130))
    positions = torch.arange(130) + 7
    slopes = alibi_slopes(6)
    with torch.no_grad():
        out = attention(q, k, v, flex_alibi(slopes, positions, positions))
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, positions, positions, slopes), rtol=0, atol=TOL
    )


@pytest.mark.parametrize("nh, T, positions", [(3, 37, "per row"), (12, 130, "offset"), (6, 200, "default")])
def test_alibi_flex_forward_and_backward(eager_flex, nh, T, positions):
    """Positions per row, at an offset, or the default 0..T−1 passed as the length T."""
    q, k, v = qkv(2, nh, T, T)
    if positions == "per row":
        given = expected = torch.stack((torch.arange(T), torch.arange(T) + 300))
    elif positions == "offset":
        given = expected = torch.arange(T) + 60
    else:
        given, expected = T, torch.arange(T)
    slopes = alibi_slopes(nh)
    check(attention(q, k, v, flex_alibi(slopes, given, given)), q, k, v, expected, expected, slopes)


@pytest.mark.parametrize("path", ["bool mask", "alibi dense", "alibi flex"])
def test_cached_step_masks(eager_flex, path):
    """A chunk of 3 queries per row against a cache of 9 slots (slot = position), as
    GPT.locate builds it: row 0 at positions 2..4, row 1 at 5..7, and a padding query at the
    spare slot 8, which sees every slot (the cache's rule against fully masked rows)."""
    slots = torch.tensor([[2, 3, 4], [8, 6, 7]])  # (B, T)
    key_slots = torch.arange(9)  # (S,)
    q, k, v = qkv(2, 3, 3, 9)
    slopes = alibi_slopes(3)
    if path == "bool mask":
        mask, slopes = key_slots <= slots[:, None, :, None], None  # GPT.locate's (B, 1, T, S)
    elif path == "alibi dense":
        mask = alibi_bias(slopes, slots, key_slots)
    else:
        mask = flex_alibi(slopes, slots, 9)  # as GPT.forward passes it: a key's position is its slot
    check(attention(q, k, v, mask), q, k, v, slots, key_slots, slopes)


@pytest.mark.parametrize("path", ["alibi dense", "alibi flex"])
def test_alibi_penalises_distance(eager_flex, path):
    """With q = 0 the weights are softmax of the bias alone, and v = the key's position makes
    the output the mean attended position: ALiBi pulls it towards the query (a flipped sign, as
    in attention-gym#86, would push it towards position 0)."""
    T, nh = 40, 3
    positions = torch.arange(T)
    q = torch.zeros(1, nh, T, 4)
    k = torch.randn(1, nh, T, 4)
    v = positions.float().view(1, 1, T, 1).expand(1, nh, T, 4)
    slopes = alibi_slopes(nh)
    mask = alibi_bias(slopes, positions, positions) if path == "alibi dense" else flex_alibi(slopes, T, T)
    mean_position = attention(q, k, v, mask)[0, :, -1, 0]  # the last query, at position 39
    assert (mean_position > 39 - 1 / slopes.float()).all() and (mean_position < 39).all()
    score_mod, _ = flex_alibi(slopes, positions, positions)
    h = torch.tensor(1)
    assert score_mod(torch.tensor(0.0), 0, h, torch.tensor(9), torch.tensor(9)) == 0
    assert score_mod(torch.tensor(0.0), 0, h, torch.tensor(9), torch.tensor(4)) == -5 * slopes[1].float()


def spy_on_masks(monkeypatch) -> list:
    """Record the mask of every model.attention call the model makes."""
    masks = []

    def spy(q, k, v, mask=None, dropout_p=0.0):
        masks.append(mask)
        return attention(q, k, v, mask, dropout_p)

    monkeypatch.setattr(model_module, "attention", spy)
    return masks


def test_model_alibi_on_flex_equals_dense(eager_flex, monkeypatch):
    """GPT.forward builds the same ALiBi for FlexAttention as the dense bias, without and with a
    KV cache (greedy generation of left-padded prompts), on ALiBi.flex_devices only."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=32, n_layer=2, n_head=6, n_embd=48, pos_encoding="alibi")).eval()
    idx = torch.randint(0, 32, (2, 30))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert not model.transformer.wpe.on_flex(torch.device("cpu"))
    per_row = torch.stack((torch.arange(30), torch.arange(30) + 9))
    masks = spy_on_masks(monkeypatch)

    def run(flex: bool):
        masks.clear()
        with torch.no_grad():
            tokens = torch.cat(list(sample.generate(model, prompts, 5, temperature=0.0)), dim=1)
            out = model(idx)[0], model(idx, positions=per_row)[0], tokens
        assert masks and all(isinstance(mask, tuple) == flex for mask in masks)  # the path it says it runs
        return out

    dense = run(flex=False)
    monkeypatch.setattr(model_module.ALiBi, "flex_devices", ("cuda", "cpu"))
    assert model.transformer.wpe.on_flex(torch.device("cpu"))
    flex = run(flex=True)
    torch.testing.assert_close(flex[0], dense[0], rtol=0, atol=TOL)
    torch.testing.assert_close(flex[1], dense[1], rtol=0, atol=TOL)
    assert torch.equal(flex[2], dense[2])


def test_training_alibi_with_dropout_on_a_flex_device_uses_the_dense_bias(eager_flex, monkeypatch):
    """FlexAttention has no dropout: on a flex device (the CPU added to ALiBi.flex_devices) a model
    training with dropout attends with the dense bias, forward and backward; in eval mode, or
    without dropout, the same model uses FlexAttention."""
    monkeypatch.setattr(model_module.ALiBi, "flex_devices", ("cuda", "cpu"))
    masks = spy_on_masks(monkeypatch)
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=3, n_embd=24, pos_encoding="alibi", dropout=0.1)
    model = GPT(config).train()
    cpu = torch.device("cpu")
    assert not model.transformer.wpe.on_flex(cpu)
    idx = torch.randint(0, 32, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert len(masks) == 2 and all(torch.is_tensor(mask) and mask.dtype == torch.float32 for mask in masks)
    assert all(p.grad is not None for p in model.parameters())
    assert model.eval().transformer.wpe.on_flex(cpu)
    assert GPT(dataclasses.replace(config, dropout=0.0)).train().transformer.wpe.on_flex(cpu)
    masks.clear()
    with torch.no_grad():
        model(idx)
    assert len(masks) == 2 and all(isinstance(mask, tuple) for mask in masks)


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "none"])
def test_attention_output_stays_in_the_autocast_dtype(pos_encoding):
    """Under bf16 autocast the residual stream is float32 while q, k and v are bf16: attention's
    output must reach c_proj in bf16, not be cast up to x's float32 and back (two copies per
    layer, forward and backward)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16, pos_encoding=pos_encoding))
    seen = []
    model.transformer.h[0].attn.c_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].dtype))
    idx = torch.randint(0, 32, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx)
    assert seen == [torch.bfloat16]


# --- grouped-query heads, sliding windows and chunks ----------------------------------------------


@pytest.mark.parametrize("n_kv", [1, 2])
def test_grouped_query_heads_equal_repeated_heads(n_kv):
    """k and v with n_kv heads serve 6 query heads in groups: the causal path, a bool mask, ALiBi's bias per head."""
    q, k, v = qkv(2, 6, 37, 37, n_kv=n_kv)
    positions = torch.arange(37)
    check(attention(q, k, v), q, k, v, positions, positions)
    q, k, v = qkv(2, 6, 5, 37, n_kv=n_kv)  # five queries at 32..36 against 37 keys
    mask = torch.arange(37) <= torch.arange(32, 37)[:, None]
    check(attention(q, k, v, mask), q, k, v, torch.arange(32, 37), positions)
    slopes = alibi_slopes(6)  # a bias per query head
    check(
        attention(q, k, v, alibi_bias(slopes, torch.arange(32, 37), positions)),
        q,
        k,
        v,
        torch.arange(32, 37),
        positions,
        slopes,
    )


def test_visible_equals_masks_written_out():
    """visible(q, k) against loops over positions: a window of 3 (the query and the 2 keys before it),
    chunks of 4, with 4 queries at 6..9 against 10 keys at 0..9 (query length ≠ key length)."""
    queries, keys = torch.arange(6, 10), torch.arange(10)
    window = [[n <= m and m - n < 3 for n in range(10)] for m in range(6, 10)]
    chunks = [[n <= m and n // 4 == m // 4 for n in range(10)] for m in range(6, 10)]
    for got, want in (
        (visible(queries[:, None], keys[None, :], 3, None), window),
        (visible(queries[:, None], keys[None, :], None, 4), chunks),
        (visible(queries[:, None], keys[None, :], None, None), [[n <= m for n in range(10)] for m in range(6, 10)]),
    ):
        assert got.tolist() == want
    assert window[0] == [False] * 4 + [True] * 3 + [False] * 3  # the query at 6 sees 4, 5, 6


@pytest.mark.parametrize("window, chunk", [(5, None), (16, None), (None, 8), (None, 16)])
@pytest.mark.parametrize("T, n_kv", [(37, 3), (64, 1), (3, 3)])
def test_local_attention_by_blocks(window, chunk, T, n_kv):
    """The CPU's block path (LocalWindow) forward and backward, lengths that are and are not multiples
    of the window, one shorter than it, and grouped heads."""
    q, k, v = qkv(2, 3, T, T, n_kv=n_kv)
    positions = torch.arange(T)
    out = attention(q, k, v, LocalWindow(window, chunk))
    check(out, q, k, v, positions, positions, None, window, chunk)


@pytest.mark.parametrize("window, chunk", [(5, None), (None, 8)])
def test_local_flex_block_mask_forward(window, chunk):
    """FlexAttention under local_block_mask (CUDA's path, its compiled forward on the CPU here): 130 tokens,
    two query blocks of 128, grouped heads."""
    q, k, v = (t.detach() for t in qkv(1, 4, 130, 130, n_kv=2))
    positions = torch.arange(130)
    with torch.no_grad():
        out = attention(q, k, v, (None, local_block_mask(window, chunk, 130, "cpu")))
    ref = reference_attention(q, k, v, positions, positions, None, window, chunk)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=TOL)
