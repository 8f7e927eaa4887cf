"""model.py: shapes and loss for every encoding, explicit positions, the learned table's limit,
config errors, ALiBi against its authors' code, the sinusoidal table against its formula,
nanoGPT checkpoint parity against a forward written out by hand, checkpoint loading errors,
the optimizer's parameter groups and sample_next_token against hand computations."""

import math

import pytest
import torch

from model import (
    POS_ENCODINGS,
    GPT,
    GPTConfig,
    alibi_bias,
    alibi_slopes,
    clean_state_dict,
    load_checkpoint,
    sample_next_token,
    sinusoidal_embedding,
)

VOCAB = 65


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


@pytest.mark.parametrize("pos_encoding,relative", [("learned", False), ("sinusoidal", False), ("rope", True),
                                                    ("alibi", True), ("none", True)])
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
        model(tokens(1, 17))
    message = str(e.value)
    assert "\n" not in message and "17" in message and "block_size 16" in message and "at most 16" in message
    with pytest.raises(ValueError) as e:
        model(tokens(1, 4), positions=torch.arange(14, 18))  # T fits, but positions run past the table
    message = str(e.value)
    assert "\n" not in message and "position 17" in message and "below 16" in message
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
    return (get_slopes_power_of_2(closest_power_of_2)
            + alibi_authors_get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2])


@pytest.mark.parametrize("n_head", range(1, 65))
def test_alibi_slopes_equal_the_authors_recipe(n_head):
    slopes = alibi_slopes(n_head)
    assert slopes.dtype == torch.float64 and slopes.shape == (n_head,)
    torch.testing.assert_close(slopes, torch.tensor(alibi_authors_get_slopes(n_head), dtype=torch.float64),
                               rtol=1e-12, atol=0)


def test_alibi_slopes_published_values():
    assert alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    # 6 heads: the 4-head slopes, then every other one of the 8-head slopes (1/2, 1/8)
    assert alibi_slopes(6).tolist() == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rel=1e-12)


@pytest.mark.parametrize("kw", [dict(pos_encoding="rope", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                                dict(pos_encoding="alibi", n_head=4), dict(pos_encoding="sinusoidal")])
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
    assert model.alibi_slopes.dtype == torch.float64
    assert model.alibi_slopes.tolist() == pytest.approx(alibi_authors_get_slopes(20), rel=1e-12)


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
    table = sinusoidal_embedding(positions, dim)
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
        for block in model.transformer.h:
            x = block(x)
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


def test_clean_state_dict_strips_compile_and_ddp_prefixes():
    cleaned = clean_state_dict({"_orig_mod.module.lm_head.weight": 1, "module._orig_mod.transformer.wte.weight": 2,
                                "transformer.h.0.attn.bias": 3, "transformer.h.0.attn.c_attn.bias": 4})
    assert cleaned == {"lm_head.weight": 1, "transformer.wte.weight": 2, "transformer.h.0.attn.c_attn.bias": 4}


# --- checkpoint loading errors -------------------------------------------------------------------


def bad_checkpoints(tmp_path, good: str) -> dict:
    data = open(good, "rb").read()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("step 0: train loss 4.17\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    return {
        "truncated.pt": "not a readable torch checkpoint",
        "text.pt": "not a readable torch checkpoint",
        "foreign.pt": "holds no 'model' and 'model_args'",
        "missing.pt": "does not exist",
    }


def test_bad_checkpoint_files_are_one_line_errors(tmp_path, nanogpt_ckpt):
    for name, fragment in bad_checkpoints(tmp_path, str(nanogpt_ckpt["path"])).items():
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as e:
            load_checkpoint(path)
        message = str(e.value)
        assert "\n" not in message and path in message and fragment in message and "valid: " in message, message


def test_embeddings_are_tied_and_parameters_counted_by_hand():
    C, V, L = 32, VOCAB, 2
    per_block = 2 * C + 3 * C * C + C * C + 4 * C * C + 4 * C * C  # two LayerNorm weights, c_attn, c_proj, MLP (no biases)
    for pos_encoding in POS_ENCODINGS:
        model = tiny(pos_encoding, bias=False)
        assert model.transformer.wte.weight is model.lm_head.weight
        assert model.get_num_params() == V * C + L * per_block + C  # + ln_f; the learned table not counted
    assert tiny("learned", bias=False).get_num_params(non_embedding=False) == V * C + L * per_block + C + 16 * C


# --- optimizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_weight_decay_only_on_2d_weights_and_each_parameter_once(pos_encoding):
    model = tiny(pos_encoding, bias=True)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # the tied embedding once


# --- sample_next_token ---------------------------------------------------------------------------

PROBS = torch.tensor([0.15, 0.5, 0.1, 0.25])  # sorted: 0.5 (token 1), 0.25 (3), 0.15 (0), 0.1 (2)


def draw_frequencies(n: int = 40000, **kw) -> torch.Tensor:
    logits = PROBS.log().expand(n, -1)
    drawn = sample_next_token(logits, generator=torch.Generator().manual_seed(0), **kw)
    assert drawn.shape == (n, 1) and drawn.dtype == torch.long
    return torch.bincount(drawn.flatten(), minlength=4).double() / n


def test_greedy_and_top_k_one_are_argmax():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample_next_token(logits, temperature=0.0), argmax)
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next_token(logits, temperature=1.5, top_k=1, generator=generator), argmax)


@pytest.mark.parametrize(
    "kw,kept",
    [
        (dict(), [0, 1, 2, 3]),
        (dict(top_p=0.45), [1]),  # the most likely token alone reaches 0.45
        (dict(top_p=0.7), [1, 3]),  # 0.5 < 0.7 <= 0.75
        (dict(top_p=0.8), [1, 3, 0]),  # 0.75 < 0.8 <= 0.9
        (dict(top_p=0.95), [0, 1, 2, 3]),
        (dict(top_k=2), [1, 3]),
        (dict(top_k=3, top_p=0.7), [1, 3]),
    ],
)
def test_filters_keep_the_hand_computed_set_at_its_renormalised_probabilities(kw, kept):
    expected = torch.zeros(4, dtype=torch.float64)
    expected[kept] = PROBS[kept].double() / PROBS[kept].double().sum()
    torch.testing.assert_close(draw_frequencies(**kw), expected, rtol=0, atol=0.01)


def test_temperature_sharpens_the_distribution_by_hand():
    expected = PROBS.double() ** 2 / (PROBS.double() ** 2).sum()  # softmax(log p / 0.5)
    torch.testing.assert_close(draw_frequencies(temperature=0.5), expected, rtol=0, atol=0.01)


def test_sampling_is_reproducible_by_generator():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    first = sample_next_token(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    again = sample_next_token(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
