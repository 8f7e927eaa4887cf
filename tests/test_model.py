"""model.py: shapes and loss for every encoding, explicit positions, the learned table's limit,
config errors, the positional modules' contract (and that a new encoding is one class and one
registry entry), ALiBi against its authors' code, the sinusoidal table against its formula,
nanoGPT checkpoint parity against a forward written out by hand, checkpoint loading and its errors,
and the forward against a KVCache (prefill, chunks, compiled static shapes, the cache's mask, ALiBi
at decode, left padding) against a full forward without cache or attention written out by hand.
Generation itself (sample.py) is tested in test_sample.py."""

import math
from dataclasses import replace

import pytest
import torch
from conftest import spy_on_attention

from attention import KVCache, alibi_bias, alibi_slopes, attention
from model import (
    GPT,
    POS_ENCODINGS,
    ALiBi,
    GPTConfig,
    Learned,
    NoPE,
    PositionalEncoding,
    RoPE,
    Sinusoidal,
)
from train import load_checkpoint

VOCAB = 65
CACHE_VOCAB = 32  # the cache tests' models (decoder)
TOL = 1e-5


def tiny(pos_encoding: str, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    args = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, pos_encoding=pos_encoding)
    return GPT(GPTConfig(**{**args, **kw}))


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# --- shapes, loss, positions ---------------------------------------------------------------------


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_shapes_and_loss_at_init_is_ln_vocab(pos_encoding):
    model = tiny(pos_encoding)
    idx, targets = tokens(3, 16), tokens(3, 16, seed=2)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, VOCAB) and logits.dtype == torch.float32
    assert loss.shape == () and abs(loss.item() - math.log(VOCAB)) < 0.05  # near-uniform predictions at init
    assert model(idx)[1] is None
    loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters that get no gradient: {dead}"


def test_targets_of_minus_one_are_ignored():
    model = tiny("rope").eval()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    masked = targets.clone()
    masked[:, ::2] = -1
    logits, loss = model(idx, masked)
    kept = masked != -1
    log_probs = logits.double().log_softmax(-1)
    by_hand = -log_probs[kept].gather(-1, targets[kept][:, None]).mean()
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_positions_default_and_per_row(pos_encoding):
    model = tiny(pos_encoding).eval()
    idx = tokens(3, 8)
    default = model(idx)[0]
    torch.testing.assert_close(model(idx, positions=torch.arange(8))[0], default, rtol=0, atol=0)
    offsets = torch.tensor([0, 3, 8])
    per_row = model(idx, positions=offsets[:, None] + torch.arange(8))[0]  # (B, T) positions
    for b, offset in enumerate(offsets.tolist()):
        alone = model(idx[b : b + 1], positions=torch.arange(offset, offset + 8))[0]
        torch.testing.assert_close(per_row[b : b + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "pos_encoding,relative",
    [("learned", False), ("sinusoidal", False), ("rope", True), ("alibi", True), ("none", True)],
)
def test_a_shift_of_every_position_changes_only_absolute_encodings(pos_encoding, relative):
    """RoPE and ALiBi see only m − n and NoPE sees no position: a common shift changes nothing."""
    model = tiny(pos_encoding).eval()
    idx = tokens(2, 8)
    shifted = model(idx, positions=torch.arange(5, 13))[0]
    difference = (shifted - model(idx)[0]).abs().max().item()
    if relative:
        assert difference < 1e-4
    else:
        assert difference > 1e-3


def test_learned_table_rejects_a_longer_sequence():
    model = tiny("learned")
    with pytest.raises(ValueError) as e:
        model(tokens(1, 17))  # 17 tokens: the last at position 16
    assert str(e.value) == "position 16 is past the learned table; valid: below block_size 16"
    with pytest.raises(ValueError) as e:
        model(tokens(1, 4), positions=torch.arange(14, 18))  # T fits, but positions run past the table
    assert str(e.value) == "position 17 is past the learned table; valid: below block_size 16"
    model(tokens(1, 4), positions=torch.arange(12, 16))  # the table's last rows are fine


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "rope", "alibi", "none"])
def test_other_encodings_have_no_length_limit(pos_encoding):
    model = tiny(pos_encoding).eval()
    logits, _ = model(tokens(1, 40))  # block_size 16
    assert logits.shape == (1, 40, VOCAB) and torch.isfinite(logits).all()
    far = model(tokens(1, 8), positions=torch.arange(5000, 5008))[0]
    assert torch.isfinite(far).all()


@pytest.mark.parametrize(
    "kwargs,fragments",
    [
        (dict(pos_encoding="rotary"), ["'rotary'", "learned, sinusoidal, rope, alibi, none"]),
        (dict(pos_encoding="rope", rope_fraction=0.5625), ["head size 16", "0.5625", "9 rotary channels", "even"]),
        (dict(pos_encoding="rope", n_embd=36, n_head=4), ["head size 9", "9 rotary channels", "even"]),
        (dict(n_embd=30, n_head=4), ["n_embd 30", "n_head 4", "multiple"]),
        (dict(n_head=0), ["n_head 0", "at least 1"]),
        (dict(n_layer=0), ["n_layer 0", "at least 1"]),
        (dict(dropout=1.5), ["dropout 1.5", "[0, 1)"]),
        (dict(rope_layout="zigzag"), ["'zigzag'", "half", "interleaved"]),
        (dict(pos_encoding="rope", rope_fraction=1.5), ["rope_fraction 1.5", "(0, 1]"]),
        (dict(pos_encoding="rope", rope_fraction=0.0), ["rope_fraction 0.0", "(0, 1]"]),
        (dict(pos_encoding="rope", rope_fraction=-0.5), ["rope_fraction -0.5", "(0, 1]"]),
    ],
)
def test_bad_model_config_is_a_one_line_error(kwargs, fragments):
    args = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, pos_encoding="learned")
    with pytest.raises(ValueError) as e:
        GPTConfig(**{**args, **kwargs})
    message = str(e.value)
    assert "\n" not in message and "valid" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# --- the positional modules' contract ------------------------------------------------------------


@pytest.mark.parametrize(
    "pos_encoding, cls, max_positions, relative",
    [
        ("learned", Learned, 16, False),
        ("sinusoidal", Sinusoidal, None, False),
        ("rope", RoPE, None, True),
        ("alibi", ALiBi, None, True),
        ("none", NoPE, None, False),
    ],
)
def test_every_encoding_is_its_registry_class_and_states_its_contract(pos_encoding, cls, max_positions, relative):
    """model.transformer.wpe is the positional module of every encoding, POS_ENCODINGS' class; what
    sample.py reads of it: learned's table length, which see distances only, and that none of them
    (but a length-dependent RoPE, below) changes with the length."""
    wpe = tiny(pos_encoding).transformer.wpe
    assert POS_ENCODINGS[pos_encoding] is cls and type(wpe) is cls
    assert (wpe.max_positions, wpe.relative, wpe.length_dependent) == (max_positions, relative, False)
    assert not any(wpe.changes_between(old, new) for old, new in ((8, 9), (15, 16), (16, 17), (40, 41)))


@pytest.mark.parametrize(
    "rope_scaling, changes",
    [
        ({"rope_type": "yarn", "factor": 2.0}, []),  # fixed frequencies: never
        ({"rope_type": "dynamic", "factor": 2.0}, [(16, 17), (17, 18), (40, 41), (8, 40)]),  # every length past 16
        (  # the short factors up to 16, the long ones past it: once, at the crossing
            {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
            [(16, 17), (8, 40)],
        ),
    ],
)
def test_a_length_dependent_rope_says_when_its_frequencies_change(rope_scaling, changes):
    wpe = tiny("rope", rope_scaling=rope_scaling).transformer.wpe
    assert wpe.length_dependent == bool(changes)
    for old, new in ((8, 9), (15, 16), (16, 16), (16, 17), (17, 18), (40, 41), (8, 40)):
        assert wpe.changes_between(old, new) == ((old, new) in changes), (old, new)


class Windowed(PositionalEncoding):
    """No position signal, and a sliding window of `width` keys by position (a bool mask), by query
    position without a cache, by slot against one: the contract's attend, written from outside."""

    relative = True
    width = 4

    def attend(self, pos):
        q, k = (pos.slots, pos.keys) if pos.slots is not None else (pos.query, pos.query)
        distance = q.unsqueeze(-1) - k.unsqueeze(-2)  # (T, T) or (B, T, S), m − n
        mask = (distance >= 0) & (distance < self.width)
        return replace(pos, mask=mask if mask.dim() == 2 else mask.unsqueeze(1))  # (T, T) or (B, 1, T, S)


def test_an_encoding_is_one_class_and_one_registry_entry(monkeypatch):
    """Windowed registered under a name: GPTConfig accepts it, the model builds it as transformer.wpe
    and runs it with and without a cache, and its mask holds: in one layer, changing token 0
    changes the logits at positions 0..3 only (NoPE's change everywhere)."""
    monkeypatch.setitem(POS_ENCODINGS, "windowed", Windowed)
    with pytest.raises(ValueError, match="valid: learned, sinusoidal, rope, alibi, none, windowed"):
        GPTConfig(pos_encoding="window")
    model, nope = decoder("windowed", n_layer=1), decoder("none", n_layer=1)
    assert type(model.transformer.wpe) is Windowed
    idx = torch.randint(0, CACHE_VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % CACHE_VOCAB
    with torch.no_grad():
        logits = model(idx)[0]
        cached = model(idx, cache=KVCache(model.config, 1, 16))[0]
        moved = (model(changed)[0] - logits).abs().amax(-1)[0]  # (T,): the change at each position
        nope_moved = (nope(changed)[0] - nope(idx)[0]).abs().amax(-1)[0]
    torch.testing.assert_close(cached, logits, atol=TOL, rtol=0)
    assert (moved[:4] > 1e-3).all() and (moved[4:] == 0).all(), moved
    assert (nope_moved > 1e-3).all()


# --- ALiBi ---------------------------------------------------------------------------------------


def alibi_authors_get_slopes(n):
    """ofirpress/attention_with_linear_biases, fairseq/models/transformer.py, as published."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + alibi_authors_get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


@pytest.mark.parametrize("n_head", range(1, 65))
def test_alibi_slopes_equal_the_authors_recipe(n_head):
    slopes = alibi_slopes(n_head)
    assert slopes.dtype == torch.float64 and slopes.shape == (n_head,)
    torch.testing.assert_close(
        slopes, torch.tensor(alibi_authors_get_slopes(n_head), dtype=torch.float64), rtol=1e-12, atol=0
    )


def test_alibi_slopes_published_values():
    assert alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    # 6 heads: the 4-head slopes, then every other one of the 8-head slopes (1/2, 1/8)
    assert alibi_slopes(6).tolist() == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rel=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        dict(pos_encoding="rope", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        dict(pos_encoding="alibi", n_head=4),
        dict(pos_encoding="sinusoidal"),
    ],
)
def test_a_model_built_on_the_meta_device_rebuilds_its_tables_when_materialised(kw):
    """Built on the meta device, then to_empty (how large checkpoints are loaded): the RoPE
    frequencies and ALiBi slopes are non-persistent buffers, so no state dict restores them
    (transformers#34234: NaN on resume). The model equals one built normally, bit for bit."""
    reference = tiny(**kw).eval()
    with torch.device("meta"):
        model = GPT(reference.config)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    idx = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0], reference(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
def test_casting_the_model_leaves_alibi_slopes_exact(cast):
    # 20 heads: slopes such as 2^(-8/16) that bf16 and fp16 would round
    model = GPT(GPTConfig(n_layer=1, n_head=20, n_embd=40, block_size=8, vocab_size=11, pos_encoding="alibi"))
    model.to(cast)
    assert model.transformer.wpe.slopes.dtype == torch.float64
    assert model.transformer.wpe.slopes.tolist() == pytest.approx(alibi_authors_get_slopes(20), rel=1e-12)


@pytest.mark.parametrize("q_offset", [0, 5])
def test_alibi_bias_is_the_distance_penalty(q_offset):
    slopes = alibi_slopes(4)
    k_pos = torch.arange(8)
    q_pos = torch.arange(q_offset, 8) if q_offset else k_pos
    bias = alibi_bias(slopes, q_pos, k_pos)
    assert bias.shape == (1, 4, len(q_pos), 8) and bias.dtype == torch.float32
    for h in range(4):
        for i, m in enumerate(q_pos.tolist()):
            for n in range(8):
                expected = slopes[h].item() * (n - m) if n <= m else -math.inf
                assert bias[0, h, i, n].item() == pytest.approx(expected, rel=1e-6), (h, m, n)
    square = alibi_bias(slopes, k_pos, k_pos)[0]  # (nh, T, T)
    ones = torch.ones(8, 8, dtype=torch.bool)
    assert (square.diagonal(dim1=-2, dim2=-1) == 0).all()
    assert (square[:, torch.tril(ones, diagonal=-1)] < 0).all()
    assert torch.isneginf(square[:, torch.triu(ones, diagonal=1)]).all()


# --- sinusoidal ----------------------------------------------------------------------------------


def sinusoid_by_formula(m: int, dim: int) -> list[float]:
    """PE(m, 2i) = sin(m / 10000^(2i/dim)), PE(m, 2i+1) = cos(m / 10000^(2i/dim)), Vaswani et al. 2017."""
    return [(math.sin if j % 2 == 0 else math.cos)(m / 10000 ** (2 * (j // 2) / dim)) for j in range(dim)]


@pytest.mark.parametrize("dim", [32, 33])
def test_sinusoidal_table_matches_its_formula_at_any_position(dim):
    positions = torch.tensor(list(range(20)) + [1023, 1024, 5000, 123456])  # no length limit
    table = Sinusoidal.table(positions, dim)
    assert table.shape == (len(positions), dim) and table.dtype == torch.float32
    expected = torch.tensor([sinusoid_by_formula(m, dim) for m in positions.tolist()], dtype=torch.float64)
    torch.testing.assert_close(table.double(), expected, rtol=0, atol=1e-7)


def test_sinusoidal_model_adds_the_table_at_the_given_positions():
    model = tiny("sinusoidal").eval()
    idx = tokens(1, 6)
    positions = torch.arange(100, 106)  # past block_size 16
    with torch.no_grad():  # the same blocks, fed token embeddings plus the formula's table over √d (Vaswani's ratio)
        table = torch.tensor([sinusoid_by_formula(m, 32) for m in positions.tolist()])
        x = model.transformer.wte(idx) + table / math.sqrt(32)
        pos = model.locate(idx, positions, None)  # the positions alone: causal attention, no mask
        assert pos.mask is None and pos.rotation is None
        for block in model.transformer.h:
            x = block(x, pos)
        by_hand = model.lm_head(model.transformer.ln_f(x))
        logits = model(idx, positions=positions)[0]
    torch.testing.assert_close(logits, by_hand, rtol=1e-5, atol=1e-5)


# --- nanoGPT checkpoint parity -------------------------------------------------------------------


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def nanogpt_forward(sd: dict, idx: torch.Tensor, n_layer: int, n_head: int) -> torch.Tensor:
    """nanoGPT's GPT written out in float64: token + position embeddings, pre-LN blocks of plain
    softmax attention under an explicit causal mask and a GELU MLP, final LN, tied head."""
    sd = {k: v.double() for k, v in sd.items()}
    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    C = x.shape[-1]
    hs = C // n_head
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        h = layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]).split(C, dim=-1)
        q, k, v = (t.view(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        weights = scores.masked_fill(~causal, -math.inf).softmax(-1)
        y = (weights @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T + sd[p + "attn.c_proj.bias"]
        h = layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU, nn.GELU()'s default
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = layer_norm(x, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])
    return x @ sd["lm_head.weight"].T


def test_nanogpt_checkpoint_loads_and_matches_a_forward_by_hand(nanogpt_ckpt):
    model, checkpoint = load_checkpoint(str(nanogpt_ckpt["path"]))
    assert model.config.pos_encoding == "learned" and model.config.bias and not model.training
    args = nanogpt_ckpt["model_args"]
    idx = tokens(2, args["block_size"], seed=3)
    with torch.no_grad():
        logits = model(idx)[0]
    expected = nanogpt_forward(nanogpt_ckpt["state_dict"], idx, args["n_layer"], args["n_head"])
    assert expected.abs().max() > 1.0  # random weights at a scale where a wrong piece shows
    torch.testing.assert_close(logits.double(), expected, rtol=0, atol=1e-5)


def test_embeddings_are_tied_and_parameters_counted_by_hand():
    C, V, L = 32, VOCAB, 2
    per_block = (
        2 * C + 3 * C * C + C * C + 4 * C * C + 4 * C * C
    )  # two LayerNorm weights, c_attn, c_proj, MLP (no biases)
    for pos_encoding in POS_ENCODINGS:
        model = tiny(pos_encoding, bias=False)
        assert model.transformer.wte.weight is model.lm_head.weight
        assert model.get_num_params() == V * C + L * per_block + C  # + ln_f; the learned table not counted
    assert tiny("learned", bias=False).get_num_params(non_embedding=False) == V * C + L * per_block + C + 16 * C


# --- the forward against a KVCache ---------------------------------------------------------------
# Tiny float32 models with weights larger than GPT-2's init; every check against a full forward
# without cache or attention written out by hand. Generation (sample.py) in test_sample.py.


def decoder(pos_encoding: str = "rope", n_layer: int = 2, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    args = dict(block_size=16, vocab_size=CACHE_VOCAB, n_layer=n_layer, n_head=2, n_embd=16, bias=True)
    model = GPT(GPTConfig(**{**args, **kw}, pos_encoding=pos_encoding)).eval()
    with torch.no_grad():  # weights larger than GPT-2's init, so attention is far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


LAYOUTS = {
    "gqa": dict(n_kv_head=1),
    "sliding, gqa": dict(layer_types="sliding_attention", sliding_window=5, n_kv_head=1),
    "local/global bases": dict(  # Gemma 3's shape: a base per layer type, pasted as Hugging Face has it
        layer_types="sliding_attention,full_attention",
        sliding_window=4,
        rope_scaling={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
    "irope": dict(  # Llama 4: chunked RoPE layers, a full NoPE layer with its temperature
        n_layer=3,
        pos_encoding="rope,rope,none",
        layer_types="chunked_attention,chunked_attention,full_attention",
        attention_chunk_size=6,
        attn_temperature_tuning=True,
        floor_scale=4,
    ),
    "rnope-swa": dict(
        n_layer=3, pos_encoding="rope,none", layer_types="sliding_attention,full_attention", sliding_window=3
    ),
    "p-rope": dict(rope_scaling={"rope_type": "proportional", "partial_rotary_factor": 0.5}),
}


def uncached_last_logits(model: GPT, tokens: list[int]) -> torch.Tensor:
    """The reference: a forward without cache over tokens at positions 0.., last position's logits."""
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_writes_each_token_at_its_slot(dtype):
    """KVCache(config, batch_size, max_len, dtype, device, keys_rotated): one (B, nh, max_len + 1, hs)
    tensor a layer for keys and one for values, the last slot spare; update writes (B, nh, T, hs)
    at (B, T) slots and returns the first n_keys slots."""
    config = decoder("rope", n_layer=3).config
    kv = KVCache(config, 2, 6, dtype, "cpu", keys_rotated=False)
    assert (kv.max_len, kv.keys_rotated, kv.dtype) == (6, False, dtype) and len(kv.k) == len(kv.v) == 3
    assert all(buf.shape == (2, 2, 7, 8) and buf.dtype == dtype and not buf.any() for buf in kv.k + kv.v)
    k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    slots = torch.tensor([[0, 1, 2], [6, 3, 4]])  # row 1: a padding token to the spare slot, then slots 3, 4
    keys, values = kv.update(1, slots, k, v, n_keys=5)
    assert keys.shape == values.shape == (2, 2, 5, 8)
    for b in range(2):
        for t, slot in enumerate(slots[b].tolist()):
            assert torch.equal(kv.k[1][b, :, slot], k[b, :, t].to(dtype))
            assert torch.equal(kv.v[1][b, :, slot], v[b, :, t].to(dtype))
    assert not kv.k[1][1, :, :3].any() and not kv.k[0].any() and not kv.v[2].any()  # nothing else written
    assert torch.equal(keys, kv.k[1][:, :, :5]) and torch.equal(values, kv.v[1][:, :, :5])


def test_prefill_logits_equal_full_forward_at_every_position():
    model = decoder("rope", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    seq = torch.randint(0, CACHE_VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cached, _ = model(seq, cache=KVCache(model.config, 2, 20))
        reference, _ = model(seq)
    torch.testing.assert_close(cached, reference, atol=TOL, rtol=0)


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi"])
def test_compiled_decoding_reads_the_whole_static_cache_and_equals_full_forward(pos_encoding):
    """Compiled, the cache path keeps static shapes: every slot is read, under the position mask
    (eager reads only the slots up to the last position). Both equal an uncached forward."""
    model = decoder(pos_encoding)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    kv = KVCache(model.config, 1, 16)
    sequence = torch.randint(0, CACHE_VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = compiled(sequence[:, :5], positions=torch.arange(5), cache=kv)[0][0, -1]
        for p in range(5, 16):
            reference = uncached_last_logits(model, sequence[0, :p].tolist())
            torch.testing.assert_close(logits, reference, atol=TOL, rtol=0, msg=f"position {p}")
            logits = compiled(sequence[:, p : p + 1], positions=torch.tensor([[p]]), cache=kv)[0][0, -1]


CHUNKED_CASES = [dict(pos_encoding=e) for e in ("rope", "alibi", "learned", "sinusoidal", "none")]
CHUNKED_CASES += [LAYOUTS["sliding, gqa"], LAYOUTS["irope"]]


@pytest.mark.parametrize(
    "settings", CHUNKED_CASES, ids=["rope", "alibi", "learned", "sinusoidal", "none", "sliding", "irope"]
)
def test_chunked_prefill_equals_single_prefill(settings):
    """Chunks of 5, 1, 3 and 7 tokens, each attending to the cache through the offset causal mask (or reading
    a ring of 5 or 6 keys as the previous chunk left it), give the logits of one uncached forward and the cache
    of one prefill of all 16 tokens."""
    kw = dict(settings)
    model = decoder(n_layer=kw.pop("n_layer", 2), **kw)
    seq = torch.randint(0, CACHE_VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    whole, chunked = KVCache(model.config, 1, 20), KVCache(model.config, 1, 20)
    with torch.no_grad():
        reference, _ = model(seq)
        model(seq, cache=whole)
        start, pieces = 0, []
        for size in (5, 1, 3, 7):
            positions = torch.arange(start, start + size)
            pieces.append(model(seq[:, start : start + size], positions=positions, cache=chunked)[0])
            start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, atol=TOL, rtol=0)
    for layer, n in enumerate(whole.spans):
        kept = slice(None, 16 if n is None else n)  # a ring's spare slot takes the tokens it does not keep
        for got, want in ((chunked.k, whole.k), (chunked.v, whole.v)):
            torch.testing.assert_close(got[layer][:, :, kept], want[layer][:, :, kept], atol=TOL, rtol=0)


def test_a_position_past_the_cache_is_an_error():
    model = decoder("rope")
    kv = KVCache(model.config, 1, 8)
    with pytest.raises(ValueError, match="past the KV cache's 8 slots"):
        model(torch.tensor([[1]]), positions=torch.tensor([8]), cache=kv)


def test_the_cache_mask_is_offset_by_the_cache_length():
    """4 queries at positions 5..8 against 10 keys (row 1, at 6..9, makes the last position 9): the
    mask the positional module builds lets query i see keys 0..5+i (hand-built), not the top-left 0..i that
    is_causal=True would give; attention under it equals attention written out by hand."""
    offset, T, S = 5, 4, 10
    model = decoder("rope", n_layer=1)
    positions = torch.arange(T) + torch.tensor([[offset], [offset + 1]])  # (2, T)
    pos = model.locate(torch.zeros(2, T, dtype=torch.long), positions, KVCache(model.config, 2, 12))
    mask = model.transformer.wpe.attend(pos).mask
    assert mask.shape == (2, 1, T, S) and mask.dtype == torch.bool
    for b in range(2):
        expected = torch.tensor([[j <= offset + b + i for j in range(S)] for i in range(T)])
        assert torch.equal(mask[b, 0], expected), b
    assert not torch.equal(mask[0, 0], torch.ones(T, S, dtype=torch.bool).tril())  # is_causal's alignment

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (T, S, S))
    by_hand = torch.empty(1, 2, T, 8, dtype=torch.float64)
    for i in range(T):
        visible = offset + i + 1
        weights = torch.softmax(q[:, :, i : i + 1] @ k[:, :, :visible].transpose(-1, -2) / 8**0.5, dim=-1)
        by_hand[:, :, i] = (weights @ v[:, :, :visible])[:, :, 0]
    torch.testing.assert_close(attention(q, k, v, mask[:1]), by_hand)
    assert not torch.allclose(attention(q, k, v), by_hand)  # mask None: is_causal


def test_alibi_bias_at_decode_is_the_distance_penalty(monkeypatch):
    """A decode step at position 9 attends to keys 0..9 with bias slope_h · (n − 9): not zero
    (the pitfall of computing it as slope × 0). Row 1, left-padded to 4 tokens, decodes at
    position 4 in the same step: −inf for its slots 5..9, which it has not written."""
    model = decoder("alibi", n_layer=1)
    seen = spy_on_attention(monkeypatch)
    kv = KVCache(model.config, 2, 12)
    prefill_positions = torch.stack((torch.arange(9), torch.arange(9) - 5))  # row 1: 5 padding, then 0..3
    with torch.no_grad():
        model(torch.randint(0, CACHE_VOCAB, (2, 9)), positions=prefill_positions, cache=kv)
        model(torch.tensor([[3], [5]]), positions=torch.tensor([[9], [4]]), cache=kv)
    bias = seen[-1]["mask"][:, :, 0]  # (B, nh, S) of the decode step
    assert bias.shape == (2, 2, 10)  # eager reads the slots up to the last position only
    slopes = torch.tensor([2.0**-4, 2.0**-8])  # the published slopes for 2 heads: 2^(−8/2), 2^(−16/2)
    torch.testing.assert_close(alibi_slopes(2).float(), slopes)
    torch.testing.assert_close(bias[0], slopes[:, None] * (torch.arange(10) - 9).float())
    assert (bias[0, :, :9] < 0).all()
    torch.testing.assert_close(bias[1, :, :5], slopes[:, None] * (torch.arange(5) - 4).float())
    assert torch.isneginf(bias[1, :, 5:]).all()


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned", "sinusoidal", "none"])
def test_padded_rows_have_no_nan(pos_encoding, monkeypatch):
    """The padding queries of a left-padded prefill (whose keys no real token sees) still see
    a key: no attention row is fully masked (a NaN on many backends; this CPU's SDPA returns
    zeros instead), and every logit is finite."""
    model = decoder(pos_encoding)
    calls = spy_on_attention(monkeypatch)
    idx = torch.randint(0, CACHE_VOCAB, (3, 7))
    positions = torch.arange(7) - torch.tensor([[0], [6], [3]])  # rows padded by 0, 6 and 3 tokens
    with torch.no_grad():
        logits, _ = model(idx, positions=positions, cache=KVCache(model.config, 3, 12))
    assert torch.isfinite(logits).all()
    assert calls
    for mask in (call["mask"] for call in calls):
        visible = mask if mask.dtype == torch.bool else torch.isfinite(mask)
        assert visible.any(dim=-1).all()
    torch.testing.assert_close(logits[1, -1], uncached_last_logits(model, idx[1, 6:].tolist()), atol=TOL, rtol=0)


# --- layouts per layer: grouped-query heads, windows, chunks, RoPE/NoPE plans --------------------


def cache_tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(CACHE_VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_decoding_of_every_layout_equals_an_uncached_forward(layout):
    """Two left-padded prompts (9 and 4 tokens, longer and shorter than the windows) prefilled together, then 6
    tokens decoded one by one: at every step each row's logits equal a forward without cache over that row
    alone, while the window layers' ring buffers wrap. A ring holds window + 1 slots (one spare for padding)
    and, per row, exactly the last `window` positions written."""
    kw = dict(LAYOUTS[layout])
    model = decoder(n_layer=kw.pop("n_layer", 2), **kw)
    rows = [torch.randint(0, CACHE_VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4)]
    kv = KVCache(model.config, 2, 16)
    idx = torch.tensor([rows[0], [0] * 5 + rows[1]])
    positions = torch.tensor([list(range(9)), list(range(-5, 4))])
    with torch.no_grad():
        logits = model(idx, positions=positions, cache=kv)[0][:, -1]
        for step in range(6):
            for b, row in enumerate(rows):
                torch.testing.assert_close(logits[b], uncached_last_logits(model, row), atol=TOL, rtol=0)
            token = logits.argmax(-1, keepdim=True)  # (2, 1)
            for row, t in zip(rows, token.flatten().tolist()):
                row.append(t)
            at = torch.tensor([[len(row) - 1] for row in rows])
            logits = model(token, positions=at, cache=kv)[0][:, -1]
    for layer, (_, layer_type) in enumerate(model.config.layers()):
        span = model.config.span(layer_type)
        assert kv.k[layer].size(2) == (17 if span is None else span + 1), layer
        if span is not None:
            for b, row in enumerate(rows):
                held = sorted(p for p in kv.held[span][b].tolist() if p >= 0)
                assert held == list(range(len(row) - span, len(row))), (layer, b)


def test_grouped_query_attention_equals_multi_head_with_repeated_key_value_weights():
    """n_kv_head = 1: one key/value head serves all four query heads. A multi-head model whose four k and
    v heads are that head's weights, repeated, computes the same logits."""
    gqa = decoder(n_head=4, n_embd=32, n_kv_head=1)
    mha = decoder(n_head=4, n_embd=32)
    state = gqa.state_dict()
    for name, value in state.items():
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            q, k, v = value.split([32, 8, 8])
            state[name] = torch.cat((q, k.repeat(4, *[1] * (k.dim() - 1)), v.repeat(4, *[1] * (v.dim() - 1))))
    mha.load_state_dict(state)
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (48, 32)
    idx = cache_tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "settings, reached",
    [
        (dict(layer_types="sliding_attention", sliding_window=4), [0, 1, 2, 3]),  # a query sees itself and 3 before
        (dict(layer_types="chunked_attention", attention_chunk_size=4), [5, 6, 7]),  # token 5's chunk is 4..7
        (dict(), list(range(5, 32))),
    ],
)
def test_a_window_or_chunk_bounds_what_a_token_reaches(settings, reached):
    """In one layer, a change to token 0 (window) or token 5 (chunk, full) moves the logits at exactly the
    positions that may see it: 32 tokens, BLOCKS_FROM windows, so by blocks of queries; by a dense mask (given
    positions); and with a cache."""
    model = decoder(n_layer=1, block_size=32, **settings)
    idx = cache_tokens(1, 32)
    changed = idx.clone()
    first = reached[0] if "attention_chunk_size" in settings or not settings else 0
    changed[0, first] = (idx[0, first] + 1) % CACHE_VOCAB
    runs = (
        lambda x: model(x)[0],
        lambda x: model(x, positions=torch.arange(32))[0],
        lambda x: model(x, cache=KVCache(model.config, 1, 32))[0],
    )
    with torch.no_grad():
        for run in runs:
            moved = (run(changed) - run(idx)).abs().amax(-1)[0]  # (T,)
            assert [t for t in range(32) if moved[t] > 1e-6] == reached
        torch.testing.assert_close(runs[0](idx), runs[1](idx), atol=TOL, rtol=0)


def test_a_plan_gives_each_layer_its_kind():
    """Gemma 3's pattern over 6 layers (5 local, 1 global) with their own bases, and iRoPE's NoPE layer:
    each layer's Positions carry its kind's rotation (θ_i = base^(−2i/d) of its type), window and temperature."""
    gemma = decoder(
        n_layer=6,
        layer_types="sliding_attention," * 5 + "full_attention",
        sliding_window=4,
        rope_scaling={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    )
    kinds = gemma.transformer.wpe.kinds
    assert gemma.transformer.wpe.plan == ["rope_sliding_attention"] * 5 + ["rope_full_attention"]
    for name, base in (("rope_sliding_attention", 10000.0), ("rope_full_attention", 1000000.0)):
        expected = torch.tensor([base ** (-2 * i / 8) for i in range(4)], dtype=torch.float64)
        torch.testing.assert_close(kinds[name].rotary.inv_freq, expected, rtol=1e-15, atol=0)
    layers = gemma.transformer.wpe.attend_layers(gemma.locate(cache_tokens(1, 32), None, None))
    assert [type(p.mask).__name__ for p in layers] == ["LocalWindow"] * 5 + ["NoneType"]  # 32 tokens: 8 windows
    short = gemma.transformer.wpe.attend_layers(gemma.locate(cache_tokens(1, 31), None, None))
    assert [type(p.mask).__name__ for p in short] == ["Tensor"] * 5 + ["NoneType"]  # fewer: one dense mask
    assert all(p.rotation is not None and p.query_scale is None for p in layers)

    irope = decoder(n_layer=4, pos_encoding="rope,rope,rope,none", attn_temperature_tuning=True, floor_scale=3)
    layers = irope.transformer.wpe.attend_layers(irope.locate(cache_tokens(1, 10), None, None))
    assert [p.rotation is None for p in layers] == [False, False, False, True]
    assert [p.query_scale is None for p in layers] == [True, True, True, False]


def test_llama4_temperature_follows_its_formula():
    """Llama 4's query scale on NoPE layers, written out: 1 + attn_scale · ln(⌊(m + 1)/floor_scale⌋ + 1)."""
    model = decoder(pos_encoding="none", attn_temperature_tuning=True, floor_scale=4, attn_scale=0.25)
    positions = torch.tensor([0, 2, 3, 4, 7, 11, 100, 9000])
    scale = model.transformer.wpe.attend(model.locate(cache_tokens(1, 8), positions, None)).query_scale
    expected = [1 + 0.25 * math.log(math.floor((m + 1) / 4) + 1) for m in positions.tolist()]
    torch.testing.assert_close(scale.flatten().double(), torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=0)
    plain = decoder(pos_encoding="none")
    with torch.no_grad():  # scale 1 up to position floor_scale − 2, then not
        assert torch.equal(model(cache_tokens(1, 3))[0], plain(cache_tokens(1, 3))[0])
        assert not torch.allclose(model(cache_tokens(1, 12))[0][:, -1], plain(cache_tokens(1, 12))[0][:, -1])


@pytest.mark.parametrize(
    "settings, fragment",
    [
        (dict(pos_encoding="rope,learned"), "valid: one encoding, or a pattern of rope, none and alibi"),
        (dict(pos_encoding="rope,nope"), "valid: learned, sinusoidal, rope, alibi, none, or a pattern of them"),
        (dict(pos_encoding=["rope"]), "valid: a comma-separated string"),
        (dict(layer_types="sliding"), "valid: full_attention, sliding_attention, chunked_attention"),
        (dict(layer_types="sliding_attention"), "sliding_window None is not valid"),
        (dict(layer_types="chunked_attention", attention_chunk_size=0), "attention_chunk_size 0 is not valid"),
        (dict(pos_encoding="alibi", layer_types="sliding_attention", sliding_window=4), "full_attention for alibi"),
        (dict(attn_temperature_tuning=True), "attn_temperature_tuning True is not valid; valid: False: no NoPE"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head 3 is not valid; valid: a divisor of n_head 4"),
        (dict(rope_scaling={"sliding_attention": {"rope_type": "default"}}), "among the layer_types full_attention"),
        (dict(activation="relu"), "activation 'relu' is not valid; valid: gelu, gelu_tanh, relu2"),
        (
            dict(pos_encoding="learned", layer_types="sliding_attention,full_attention", sliding_window=4),
            "valid: one type for 'learned'",
        ),
    ],
)
def test_layout_settings_are_checked_in_one_line(settings, fragment):
    with pytest.raises(ValueError) as e:
        GPTConfig(**{"n_head": 2, "n_embd": 16, **settings})
    assert "\n" not in str(e.value) and fragment in str(e.value), str(e.value)
