"""Generation with the KV cache (model.py: KVCache, GPT.forward's cache path, GPT.generate; sample.py).

Every check compares against an independent reference: a full forward without cache over the
sequence (or over the window a streaming policy keeps, built here by hand), attention written
out by hand, or generating each prompt alone. Tiny float32 models on the CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import model as model_module
import sample
from model import GPT, GPTConfig, KVCache, alibi_slopes, causal_mask
from rope import ROPE_LAYOUTS, ROPE_VARIANTS, variant_keys

BLOCK = 16  # the tiny models' training length, and the original length of every RoPE variant
VOCAB = 32
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread. On busy shared cores, OpenMP threads waiting for each other make
    each small op milliseconds long (this file: ~5 s on one thread, minutes on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(pos_encoding: str = "rope", n_layer: int = 2, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=n_layer, n_head=2, n_embd=16, bias=True,
                    pos_encoding=pos_encoding, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # weights larger than GPT-2's init, so attention is far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def rope_scaling_for(rope_type: str, rotary_dim: int = 8) -> dict | None:
    """A valid rope_scaling for every variant rope.py offers; the original length is BLOCK
    (filled from block_size), so sequences of more than BLOCK tokens cross it."""
    if rope_type == "default":
        return None
    values = {
        "factor": 2.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "short_factor": [1.0 + 0.1 * i for i in range(rotary_dim // 2)],
        "long_factor": [1.5 + 0.5 * i for i in range(rotary_dim // 2)],
    }
    required, optional = variant_keys(rope_type)
    missing = sorted(required - set(values) - {"original_max_position_embeddings"})
    if missing:
        pytest.fail(f"no test value for rope_scaling {rope_type} keys {missing}: add them to rope_scaling_for")
    keys = (required | optional) & set(values)
    return {"rope_type": rope_type, **{k: values[k] for k in keys if k in required or k == "factor"}}


ENCODING_CASES = [
    pytest.param(dict(pos_encoding="rope", rope_layout=layout, rope_scaling=rope_scaling_for(variant)),
                 id=f"rope-{variant}-{layout}")
    for variant in ROPE_VARIANTS
    for layout in ROPE_LAYOUTS
] + [
    pytest.param(dict(pos_encoding="rope", rope_fraction=0.5), id="rope-partial"),
    pytest.param(dict(pos_encoding="alibi"), id="alibi"),
    pytest.param(dict(pos_encoding="learned"), id="learned"),
    pytest.param(dict(pos_encoding="sinusoidal"), id="sinusoidal"),
    pytest.param(dict(pos_encoding="none"), id="none"),
]


def uncached_last_logits(model: GPT, tokens: list[int]) -> torch.Tensor:
    """The reference: a forward without cache over tokens at positions 0.., last position's logits."""
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0, -1]


def generated(model: GPT, prompts, max_new_tokens: int, seed: int | None = None, **kw):
    """Generation with its logits: tokens (B, max_new_tokens) and one (B, V) per step. Greedy,
    or sampled at temperature 1 from a generator seeded with seed (random tiny models soon
    repeat one token under greedy decoding; sampled sequences keep changing)."""
    sampling = dict(temperature=0.0) if seed is None else dict(generator=torch.Generator().manual_seed(seed))
    steps = list(model.generate(prompts, max_new_tokens, with_logits=True, **sampling, **kw))
    return torch.cat([t for t, _ in steps], dim=1), [logits for _, logits in steps]


def spy_on_attention(monkeypatch) -> list[dict]:
    """Record every F.scaled_dot_product_attention call: its attn_mask and the dtypes of q, k, v."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append(dict(mask=attn_mask, dtypes=(q.dtype, k.dtype, v.dtype)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


# ---------------------------------------------------------------------------------------------
# Cached decoding equals a full forward, at every step.


@pytest.mark.parametrize("kwargs", ENCODING_CASES)
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_cached_decoding_equals_full_forward(kwargs, prompt_len):
    """Prefill P tokens, decode one at a time: every step's logits equal an uncached forward of
    the same sequence. 24 tokens cross BLOCK (the original length of dynamic NTK, YaRN, LongRoPE)
    for every encoding but learned, whose table ends there (its crop: test_learned_crops...)."""
    model = tiny(**kwargs)
    total = BLOCK if kwargs["pos_encoding"] == "learned" else BLOCK + 8
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens, logits = generated(model, [prompt], total - prompt_len, seed=0, cache_policy="full")
    sequence = prompt + tokens[0].tolist()
    for step, step_logits in enumerate(logits):
        reference = uncached_last_logits(model, sequence[: prompt_len + step])
        torch.testing.assert_close(step_logits[0], reference, atol=TOL, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "none"])
def test_bfloat16_cache_decoding_stays_within_bf16_precision_of_a_full_forward(pos_encoding, monkeypatch):
    """cache_dtype=torch.bfloat16 under a float32 model: keys and values are stored, and
    attention runs, in bf16, and every step's logits stay within 1% of their scale (the issue's
    bf16 tolerance) of a float32 full forward, across the original length. Measured: 0.1-0.25%."""
    model = tiny(pos_encoding)
    calls = spy_on_attention(monkeypatch)
    prompt = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens, logits = generated(model, [prompt], BLOCK + 2, seed=0, cache_policy="full", cache_dtype=torch.bfloat16)
    assert calls and {call["dtypes"] for call in calls} == {(torch.bfloat16,) * 3}
    sequence = prompt + tokens[0].tolist()
    for step, step_logits in enumerate(logits):
        assert step_logits.dtype == torch.float32
        reference = uncached_last_logits(model, sequence[: len(prompt) + step])
        tolerance = 1e-2 * reference.abs().max().item()
        torch.testing.assert_close(step_logits[0], reference, atol=tolerance, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi"])
def test_compiled_decoding_reads_the_whole_static_cache_and_equals_full_forward(pos_encoding):
    """Compiled, the cache path keeps static shapes: every slot is read, under the position mask
    (eager reads only the slots up to the last position). Both equal an uncached forward."""
    model = tiny(pos_encoding)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    kv = KVCache(model.config, 1, BLOCK)
    sequence = torch.randint(0, VOCAB, (1, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = compiled(sequence[:, :5], positions=torch.arange(5), cache=kv)[0][0, -1]
        for p in range(5, BLOCK):
            torch.testing.assert_close(logits, uncached_last_logits(model, sequence[0, :p].tolist()), atol=TOL, rtol=0,
                                       msg=f"position {p}")
            logits = compiled(sequence[:, p : p + 1], positions=torch.tensor([[p]]), cache=kv)[0][0, -1]


def test_eager_decoding_reads_only_the_slots_up_to_the_last_position(monkeypatch):
    key_lengths = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: key_lengths.append(k.size(-2)) or sdpa(q, k, v, **kw))
    model = tiny("rope", n_layer=1)
    generated(model, [[1, 2, 3]], 4, cache_policy="full")  # a cache of 3 + 4 slots (and the spare)
    assert key_lengths == [3, 4, 5, 6]  # the prefill, then three decode steps


def test_prefill_logits_equal_full_forward_at_every_position():
    model = tiny("rope", rope_scaling=rope_scaling_for("yarn"))
    seq = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cached, _ = model(seq, cache=KVCache(model.config, 2, 20))
        reference, _ = model(seq)
    torch.testing.assert_close(cached, reference, atol=TOL, rtol=0)


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned", "sinusoidal", "none"])
def test_chunked_prefill_equals_single_prefill(pos_encoding):
    """Chunks of 5, 1, 3 and 7 tokens, each attending to the cache through the offset causal
    mask, give the logits and the cache of one prefill of all 16 tokens."""
    model = tiny(pos_encoding)
    seq = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    whole, chunked = KVCache(model.config, 1, 20), KVCache(model.config, 1, 20)
    with torch.no_grad():
        reference, _ = model(seq, cache=whole)
        start, pieces = 0, []
        for size in (5, 1, 3, 7):
            positions = torch.arange(start, start + size)
            pieces.append(model(seq[:, start : start + size], positions=positions, cache=chunked)[0])
            start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, atol=TOL, rtol=0)
    for layer in range(model.config.n_layer):
        for got, want in ((chunked.k, whole.k), (chunked.v, whole.v)):
            torch.testing.assert_close(got[layer][..., :16, :], want[layer][..., :16, :], atol=TOL, rtol=0)


def test_a_position_past_the_cache_is_an_error():
    model = tiny("rope")
    kv = KVCache(model.config, 1, 8)
    with pytest.raises(ValueError, match="past the KV cache's 8 slots"):
        model(torch.tensor([[1]]), positions=torch.tensor([8]), cache=kv)


# ---------------------------------------------------------------------------------------------
# The mask for query length ≠ key length, and ALiBi at decode.


def test_causal_mask_is_offset_by_the_cache_length():
    """4 queries at positions 5..8 against 10 keys: query i sees keys 0..5+i (hand-built), not
    the top-left 0..i that is_causal=True would give; attention under it equals attention
    written out by hand."""
    offset, T, S = 5, 4, 10
    mask = causal_mask(torch.arange(offset, offset + T)[:, None], torch.arange(S)[None, :])
    expected = torch.tensor([[j <= offset + i for j in range(S)] for i in range(T)])
    assert torch.equal(mask, expected)
    assert not torch.equal(mask, torch.ones(T, S, dtype=torch.bool).tril())  # is_causal's alignment

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (T, S, S))
    by_hand = torch.empty(1, 2, T, 8, dtype=torch.float64)
    for i in range(T):
        visible = offset + i + 1
        weights = torch.softmax(q[:, :, i : i + 1] @ k[:, :, :visible].transpose(-1, -2) / 8**0.5, dim=-1)
        by_hand[:, :, i] = (weights @ v[:, :, :visible])[:, :, 0]
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), by_hand)
    assert not torch.allclose(F.scaled_dot_product_attention(q, k, v, is_causal=True), by_hand)


def test_alibi_bias_at_decode_is_the_distance_penalty(monkeypatch):
    """A decode step at position 9 attends to keys 0..9 with bias slope_h · (n − 9): not zero
    (the pitfall of computing it as slope × 0), −inf for the slots not yet written."""
    model = tiny("alibi", n_layer=1)
    seen = spy_on_attention(monkeypatch)
    kv = KVCache(model.config, 1, 12)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 9)), cache=kv)
        model(torch.tensor([[3]]), positions=torch.tensor([9]), cache=kv)
    bias = seen[-1]["mask"][0, :, 0]  # (nh, S + 1) of the decode step
    slopes = torch.tensor([2.0**-4, 2.0**-8])  # the published slopes for 2 heads: 2^(−8/2), 2^(−16/2)
    torch.testing.assert_close(alibi_slopes(2).float(), slopes)
    expected = slopes[:, None] * (torch.arange(10) - 9).float()
    torch.testing.assert_close(bias[:, :10], expected)
    assert (bias[:, :9] < 0).all()
    assert torch.isinf(bias[:, 10:]).all()


# ---------------------------------------------------------------------------------------------
# Batches of prompts of different lengths: left padding.


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned", "sinusoidal", "none"])
def test_left_padded_batch_equals_each_prompt_alone(pos_encoding):
    model = tiny(pos_encoding)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 9, 4)]
    batch_tokens, batch_logits = generated(model, prompts, 10)
    for b, prompt in enumerate(prompts):
        alone_tokens, alone_logits = generated(model, [prompt], 10)
        assert torch.equal(batch_tokens[b], alone_tokens[0])
        torch.testing.assert_close(torch.stack([s[b] for s in batch_logits]), torch.cat(alone_logits), atol=TOL, rtol=0)
        uncached_tokens, _ = generated(model, [prompt], 10, cache=False)
        assert torch.equal(batch_tokens[b], uncached_tokens[0])


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned", "sinusoidal", "none"])
def test_padded_rows_have_no_nan(pos_encoding, monkeypatch):
    """The padding queries of a left-padded prefill (whose keys no real token sees) still see
    a key: no attention row is fully masked (a NaN on many backends; this CPU's SDPA returns
    zeros instead), and every logit is finite."""
    model = tiny(pos_encoding)
    calls = spy_on_attention(monkeypatch)
    idx = torch.randint(0, VOCAB, (3, 7))
    positions = torch.arange(7) - torch.tensor([[0], [6], [3]])  # rows padded by 0, 6 and 3 tokens
    with torch.no_grad():
        logits, _ = model(idx, positions=positions, cache=KVCache(model.config, 3, 12))
    assert torch.isfinite(logits).all()
    for mask in (call["mask"] for call in calls):
        visible = mask if mask.dtype == torch.bool else torch.isfinite(mask)
        assert visible.any(dim=-1).all()
    torch.testing.assert_close(logits[1, -1], uncached_last_logits(model, idx[1, 6:].tolist()), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Past block_size: rolling window and attention sinks (rope, alibi), crop (learned).


def window_by_hand(sequence: list[int], window: int, n_sink: int) -> list[int]:
    if len(sequence) <= window:
        return sequence
    return sequence[:n_sink] + sequence[len(sequence) - (window - n_sink) :]


STREAMING_CASES = [
    pytest.param("window", 0, dict(pos_encoding="rope"), id="window-rope"),
    pytest.param("sinks", 2, dict(pos_encoding="rope"), id="sinks-rope"),
    pytest.param("sinks", 2, dict(pos_encoding="rope", rope_layout="interleaved"), id="sinks-rope-interleaved"),
    pytest.param("sinks", 2, dict(pos_encoding="rope", rope_scaling=rope_scaling_for("dynamic")),
                 id="sinks-rope-dynamic"),
    pytest.param("window", 0, dict(pos_encoding="alibi"), id="window-alibi"),
    pytest.param("sinks", 2, dict(pos_encoding="alibi"), id="sinks-alibi"),
]


def recording_cache(monkeypatch) -> list:
    """Make generate build KVCaches that record every slot a real token is written to."""
    caches = []

    class RecordingCache(KVCache):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.real_slots = []
            caches.append(self)

        def update(self, layer, slots, k, v, n_keys):
            self.real_slots += slots[slots < self.max_len].tolist()
            return super().update(layer, slots, k, v, n_keys)

    monkeypatch.setattr(model_module, "KVCache", RecordingCache)
    return caches


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("policy, n_sink, kwargs", STREAMING_CASES)
def test_streaming_cache_equals_forward_over_its_window(policy, n_sink, kwargs, cache_dtype, monkeypatch):
    """A one-layer model (deeper layers' cached states carry what attention saw before an
    eviction, by StreamingLLM's design, so no forward over the window alone reproduces them)
    generates 3 windows' worth: at every step its logits equal an uncached forward over the
    tokens the policy keeps, at positions 0.. within the window (the sinks first); the cache
    holds at most `window` tokens. A bf16 cache (RoPE keys stored unrotated in bf16, rotated
    when read) stays within 1% of the logits' scale."""
    window = 8
    model = tiny(n_layer=1, **kwargs)
    caches = recording_cache(monkeypatch)
    prompt = [5, 7, 11]
    tokens, logits = generated(model, [prompt], 3 * window, seed=0, cache_policy=policy, window=window, n_sink=n_sink,
                               cache_dtype=cache_dtype)
    sequence = prompt + tokens[0].tolist()
    for step, step_logits in enumerate(logits):
        reference = uncached_last_logits(model, window_by_hand(sequence[: len(prompt) + step], window, n_sink))
        tolerance = TOL if cache_dtype == torch.float32 else 1e-2 * reference.abs().max().item()
        torch.testing.assert_close(step_logits[0], reference, atol=tolerance, rtol=0, msg=f"step {step}")
    (kv,) = caches
    assert all(buf.dtype == cache_dtype and buf.size(2) == window + 1 for buf in kv.k + kv.v)  # and the spare slot
    assert max(kv.real_slots) == window - 1


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi"])
def test_streaming_cache_is_exact_until_the_first_eviction(pos_encoding):
    """Keys cached unrotated and rotated when read: with several layers, every step before the
    window fills equals a full forward."""
    model = tiny(pos_encoding, n_layer=3)
    tokens, logits = generated(model, [[1, 2]], 20, seed=0, cache_policy="sinks", window=12, n_sink=2)
    sequence = [1, 2] + tokens[0].tolist()
    for step in range(12 - 2 + 1):
        reference = uncached_last_logits(model, sequence[: 2 + step])
        torch.testing.assert_close(logits[step][0], reference, atol=TOL, rtol=0, msg=f"step {step}")


def test_streaming_batch_equals_each_prompt_alone():
    model = tiny("rope")
    prompts = [[3], [4, 9, 1, 1, 2, 8, 6], [2, 2, 5]]
    options = dict(cache_policy="sinks", window=8, n_sink=2)
    batch_tokens, batch_logits = generated(model, prompts, 20, **options)
    for b, prompt in enumerate(prompts):
        alone_tokens, alone_logits = generated(model, [prompt], 20, **options)
        assert torch.equal(batch_tokens[b], alone_tokens[0])
        torch.testing.assert_close(torch.stack([s[b] for s in batch_logits]), torch.cat(alone_logits), atol=TOL, rtol=0)


def test_learned_crops_to_block_size_and_prefills_again():
    """Past its table, learned continues from the last block_size tokens at positions
    0..block_size−1 (nanoGPT's crop): every step equals a forward over that window."""
    model = tiny("learned")
    prompt = list(range(10))
    tokens, logits = generated(model, [prompt], 20, seed=0)
    sequence = prompt + tokens[0].tolist()
    for step, step_logits in enumerate(logits):
        kept = sequence[: len(prompt) + step][-BLOCK:]
        torch.testing.assert_close(step_logits[0], uncached_last_logits(model, kept), atol=TOL, rtol=0)
    uncached_tokens, _ = generated(model, [prompt], 20, seed=0, cache=False)
    assert torch.equal(tokens, uncached_tokens)


# ---------------------------------------------------------------------------------------------
# generate(compile=True): the decode step compiled by inductor (its CPU code here).

COMPILED_CASES = [  # (pos_encoding, layers, generate's options, the context kept: (window, n_sink) or None)
    pytest.param("rope", 2, dict(cache_policy="full"), None, id="rope-full"),
    pytest.param("rope", 1, dict(cache_policy="sinks", window=8, n_sink=2), (8, 2), id="rope-sinks"),
    pytest.param("rope", 1, dict(cache_policy="sinks", window=8, n_sink=2, cache_dtype=torch.bfloat16), (8, 2),
                 id="rope-sinks-bf16-cache"),
    pytest.param("alibi", 2, dict(cache_policy="full"), None, id="alibi-full"),
    pytest.param("learned", 2, {}, (BLOCK, 0), id="learned-crop"),
]


def check_compiled_generation(model: GPT, options: dict, kept: tuple | None, compiled_steps: int, monkeypatch,
                              reference=uncached_last_logits) -> None:
    """Two left-padded prompts, 2·BLOCK sampled tokens with compile=True: every step's logits
    equal reference(model, tokens), an uncached forward, over what the row keeps ((window, n_sink),
    None: every token), to 1e-5 (1% of the logits' scale with a bf16 cache), and
    compiled_steps decode steps ran the compiled module. A second generate of the same shapes
    reuses the compiled code (no recompilation)."""
    torch._dynamo.reset()
    compiled_calls = []
    compiled_decode_step = model.compiled_decode_step

    def counting():
        step = compiled_decode_step()
        return lambda *args, **kw: compiled_calls.append(1) or step(*args, **kw)

    monkeypatch.setattr(model, "compiled_decode_step", counting)
    prompts = [[5, 7, 11], [3]]
    tokens, logits = generated(model, prompts, 2 * BLOCK, seed=0, compile=True, **options)
    window, n_sink = kept or (10**9, 0)
    for b, prompt in enumerate(prompts):
        sequence = prompt + tokens[b].tolist()
        for step, step_logits in enumerate(logits):
            want = reference(model, window_by_hand(sequence[: len(prompt) + step], window, n_sink))
            tolerance = 1e-2 * want.abs().max().item() if options.get("cache_dtype") == torch.bfloat16 else TOL
            torch.testing.assert_close(step_logits[b], want, atol=tolerance, rtol=0, msg=f"row {b}, step {step}")
    assert len(compiled_calls) == compiled_steps
    with torch.compiler.set_stance("fail_on_recompile"):
        again, _ = generated(model, prompts, 2 * BLOCK, seed=0, compile=True, **options)
    assert torch.equal(again, tokens)


@pytest.mark.parametrize("pos_encoding, n_layer, options, kept", COMPILED_CASES)
def test_compiled_generation_equals_full_forward(pos_encoding, n_layer, options, kept, monkeypatch):
    """Past block_size, past the sinks' window (keys rotated when read), through learned's crop."""
    model = tiny(pos_encoding, n_layer=n_layer)
    # learned decodes until its longest row (3 tokens) fills the table, then prefills again at every step, eager
    compiled_steps = BLOCK - 3 if pos_encoding == "learned" else 2 * BLOCK - 1
    check_compiled_generation(model, options, kept, compiled_steps, monkeypatch)


def test_compiled_generation_compiles_at_most_twice_for_any_number_of_lengths():
    """Each generate call sizes its cache to the prompt and max_new_tokens. Ten lengths compile
    two graphs (static, then one with the length symbolic), where static shapes alone compiled
    one per length and failed at the ninth (torch._dynamo's recompile limit, under fullgraph)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny("rope", n_layer=1)
    for max_new_tokens in range(2, 12):
        tokens, _ = generated(model, [[5, 7, 11]], max_new_tokens, compile=True)
        assert tokens.shape == (1, max_new_tokens)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_compiled_generation_with_alibi_on_flexattention(monkeypatch):
    """ALiBi's CUDA path, FlexAttention with its score_mod and block mask built inside the step,
    traces whole into the one graph and equals a full forward with the dense bias. Forced onto
    the CPU here, under aot_eager: inductor has no CPU kernel for this decode shape, and its CUDA
    one needs a GPU."""
    model = tiny("alibi")
    monkeypatch.setattr(model_module, "FLEX_ALIBI_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(GPT, "compiled_decode_step",
                        lambda self: torch.compile(self, fullgraph=True, backend="aot_eager"))
    assert model.attention_backend().startswith("FlexAttention")

    def dense(model, tokens):
        with monkeypatch.context() as m:
            m.setattr(model_module, "FLEX_ALIBI_DEVICES", ())
            return uncached_last_logits(model, tokens)

    check_compiled_generation(model, dict(cache_policy="full"), None, 2 * BLOCK - 1, monkeypatch, dense)


# ---------------------------------------------------------------------------------------------
# Sampling, stopping, errors.


def test_sampling_is_seeded_and_equal_with_and_without_cache():
    model = tiny("rope")
    prompts = [[1, 2, 3], [4]]

    def sample(cache: bool, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        steps = model.generate(prompts, 12, temperature=0.8, top_k=10, top_p=0.9, generator=g, cache=cache)
        return torch.cat(list(steps), dim=1)

    assert torch.equal(sample(True, 0), sample(True, 0))
    assert torch.equal(sample(True, 0), sample(False, 0))
    assert not torch.equal(sample(True, 0), sample(True, 1))


def test_generation_stops_at_the_stop_token():
    """A row that draws the stop token yields it from then on; alone, generation ends there."""
    model = tiny("rope")
    prompts = [[1, 2, 3], [7]]
    tokens, _ = generated(model, prompts, 12, seed=0)
    stop = int(tokens[0, 3])
    first = int((tokens[0] == stop).nonzero()[0])
    assert (tokens[0, first:] != stop).any()  # without a stop token the row goes on to other tokens
    stopped, _ = generated(model, prompts, 12, seed=0, stop_token=stop)
    assert torch.equal(stopped[0, : first + 1], tokens[0, : first + 1])
    assert (stopped[0, first:] == stop).all()
    alone, _ = generated(model, prompts[:1], 12, seed=0, stop_token=stop)
    assert alone.size(1) == first + 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cache_policy="ring"), "cache_policy"),
        (dict(cache_policy="sinks", window=4, n_sink=4), "n_sink"),
        (dict(top_k=0), "top_k"),
        (dict(temperature=-1.0), "temperature"),
        (dict(cache_dtype=torch.int8), "cache_dtype torch.int8 .*valid: None"),
        (dict(compile=True, cache=False), "compile=True .* cache=False; valid: cache=True"),
    ],
)
def test_bad_settings_raise_at_call_time(kwargs, message):
    model = tiny("rope")
    with pytest.raises(ValueError, match=message):
        model.generate([[1, 2]], 5, **kwargs)  # no iteration: raised before any work
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate([[1], []], 5)
    with pytest.raises(ValueError, match=f"prompt token {VOCAB} is outside the vocabulary; valid: ids from 0 to {VOCAB - 1}"):
        model.generate([[1], [2, VOCAB]], 5)
    with pytest.raises(ValueError, match="prompt token -1 is outside"):
        model.generate(torch.tensor([[-1, 2]]), 5)
    dynamic = tiny("rope", rope_scaling=rope_scaling_for("dynamic"))
    with pytest.raises(ValueError, match="compile=True with rope_scaling .*'dynamic'.* depend on the length; valid: compile=False"):
        dynamic.generate([[1, 2]], 5, compile=True)


# ---------------------------------------------------------------------------------------------
# sample.py


@pytest.fixture
def char_checkpoint(tmp_path):
    chars = "\nabcdefghijklmnopqrstuvwxyz ,.!?"
    assert len(chars) == VOCAB
    model = tiny("rope")
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                "tokenizer": {"kind": "char", "chars": chars}}, path)
    return path


def test_sample_generates_one_sample_per_prompt_line(char_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("to be\n\nor not\\nto\n")  # a blank line is skipped; \n in a line is a newline
    common = [f"--ckpt={char_checkpoint}", f"--start=FILE:{prompts}", "--max_new_tokens=30", "--temperature=0.0"]
    sample.main(common)
    cached = capsys.readouterr().out
    sample.main(common + ["--cache=False"])
    assert capsys.readouterr().out == cached
    samples = cached.split(sample.SEPARATOR)[:-1]
    assert len(samples) == 2
    assert samples[0].startswith("to be") and samples[1].startswith("or not\nto")


def test_sample_reports_a_bad_setting_in_one_line(char_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([f"--ckpt={char_checkpoint}", "--cache_policy=ring"])
    assert str(exit_info.value).startswith("error: unknown cache_policy 'ring'")
    with pytest.raises(SystemExit) as exit_info:
        sample.main([f"--ckpt={char_checkpoint}", "--cache_dtype=bf16"])
    assert str(exit_info.value) == ("error: cache_dtype='bf16' is not valid; valid: '' (the model's) or one of "
                                    "float64, float32, bfloat16, float16")


def test_sample_passes_cache_dtype_and_compile(char_checkpoint, capsys, monkeypatch):
    """--cache_dtype=bfloat16 and --compile=True reach generate, whose bf16 and compiled
    decoding the tests above check."""
    seen = []
    generate = GPT.generate

    def spy(self, *args, **kw):
        seen.append((kw["cache_dtype"], kw["compile"]))
        return generate(self, *args, **kw)

    monkeypatch.setattr(GPT, "generate", spy)
    common = [f"--ckpt={char_checkpoint}", "--start=to be", "--max_new_tokens=10"]
    sample.main(common + ["--cache_dtype=bfloat16"])
    sample.main(common + ["--compile=True"])
    sample.main(common)
    assert seen == [(torch.bfloat16, False), (None, True), (None, False)]
    assert capsys.readouterr().out.count("to be") == 3
