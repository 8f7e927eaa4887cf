"""sample.py: generate with the KV cache (its cache policies, compiled steps, left-padded batches,
stopping, errors), sample_next_token's filters, kept_context and context_limits, and the command line
end to end on tiny checkpoints.

Every generation check compares against an independent reference: a full forward without cache over
the sequence (or over the window a streaming policy keeps, built here by hand), generating each
prompt alone, or probabilities computed by hand. Tiny float32 models on the CPU. The model's side of
the cache (KVCache, a forward against it, its mask) is tested in test_model.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import BAD_CHECKPOINTS, assert_one_line_error, run_script, spy_on_attention

import model as model_module
import sample
from attention import KVCache
from data.tokenizer import tokenizer_spec
from model import GPT, GPTConfig
from rope import ROPE_LAYOUTS, ROPE_VARIANTS, variant_keys
from sample import context_limits, kept_context, sample_next_token
from train import load_checkpoint

BLOCK = 16  # the tiny models' training length, and the original length of every RoPE variant
VOCAB = 32
TOL = 1e-5
SEPARATOR = "\n---------------\n"


def tiny(pos_encoding: str = "rope", n_layer: int = 2, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        block_size=BLOCK,
        vocab_size=VOCAB,
        n_layer=n_layer,
        n_head=2,
        n_embd=16,
        bias=True,
        pos_encoding=pos_encoding,
        **kw,
    )
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
    pytest.param(
        dict(pos_encoding="rope", rope_layout=layout, rope_scaling=rope_scaling_for(variant)),
        id=f"rope-{variant}-{layout}",
    )
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
    """sample.generate with its logits: tokens (B, max_new_tokens) and one (B, V) per step, the
    logits each sample_next_token call received (generate has no way to return them: a spy wraps
    sample_next_token, which the loop looks up at every step). Greedy, or sampled at temperature 1
    from a generator seeded with seed (random tiny models soon repeat one token under greedy
    decoding; sampled sequences keep changing)."""
    sampling = dict(temperature=0.0) if seed is None else dict(generator=torch.Generator().manual_seed(seed))
    logits = []
    draw = sample.sample_next_token

    def spy(step_logits, *args, **options):
        logits.append(step_logits.clone())
        return draw(step_logits, *args, **options)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(sample, "sample_next_token", spy)
        tokens = list(sample.generate(model, prompts, max_new_tokens, **sampling, **kw))
    assert len(logits) == len(tokens)
    return torch.cat(tokens, dim=1), logits


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


def test_eager_decoding_reads_only_the_slots_up_to_the_last_position(monkeypatch):
    key_lengths = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda q, k, v, **kw: key_lengths.append(k.size(-2)) or sdpa(q, k, v, **kw)
    )
    model = tiny("rope", n_layer=1)
    generated(model, [[1, 2, 3]], 4, cache_policy="full")  # a cache of 3 + 4 slots (and the spare)
    assert key_lengths == [3, 4, 5, 6]  # the prefill, then three decode steps


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
    pytest.param(
        "sinks", 2, dict(pos_encoding="rope", rope_scaling=rope_scaling_for("dynamic")), id="sinks-rope-dynamic"
    ),
    pytest.param("window", 0, dict(pos_encoding="alibi"), id="window-alibi"),
    pytest.param("sinks", 2, dict(pos_encoding="alibi"), id="sinks-alibi"),
]


def recording_cache(monkeypatch) -> list:
    """Make generate build KVCaches (sample.KVCache) that record every slot a real token is written to."""
    caches = []

    class RecordingCache(KVCache):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.real_slots = []
            caches.append(self)

        def update(self, layer, slots, k, v, n_keys):
            self.real_slots += slots[slots < self.max_len].tolist()
            return super().update(layer, slots, k, v, n_keys)

    monkeypatch.setattr(sample, "KVCache", RecordingCache)
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
    tokens, logits = generated(
        model, [prompt], 3 * window, seed=0, cache_policy=policy, window=window, n_sink=n_sink, cache_dtype=cache_dtype
    )
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


def test_kept_context_is_the_sinks_and_the_most_recent_tokens():
    tokens = list(range(10))
    assert kept_context(tokens, 10, 4) == tokens  # everything fits
    assert kept_context(tokens, 6) == [4, 5, 6, 7, 8, 9]  # a sliding window
    assert kept_context(tokens, 6, 2) == [0, 1, 6, 7, 8, 9]  # the sinks, then the most recent
    for capacity, n_sink in ((8, 0), (8, 3), (3, 2)):
        assert kept_context(tokens, capacity, n_sink) == window_by_hand(tokens, capacity, n_sink)


@pytest.mark.parametrize(
    "kwargs, policy, limits",
    [
        (dict(pos_encoding="rope"), "sinks", (8, 2, "evict")),
        (dict(pos_encoding="rope"), "window", (8, 0, "evict")),  # a window has no sinks
        (dict(pos_encoding="rope"), "full", (30, 0, None)),
        (dict(pos_encoding="alibi"), "sinks", (8, 2, "evict")),
        (dict(pos_encoding="learned"), "sinks", (BLOCK, 0, "recompute")),  # its table's length, whatever the policy
        (dict(pos_encoding="sinusoidal"), "sinks", (30, 0, None)),  # absolute: no window keeps its meaning
        (dict(pos_encoding="none"), "window", (30, 0, None)),
    ],
)
def test_context_limits_follow_the_encoding_and_the_policy(kwargs, policy, limits):
    """30 tokens past a window of 8: relative encodings evict, learned crops, the others hold them all;
    rows that fit the window are never full."""
    model = tiny(**kwargs)
    assert context_limits(model, 30, policy, window=8, n_sink=2) == limits
    if limits[2] == "evict":
        assert context_limits(model, 8, policy, window=8, n_sink=2) == (8, 0, None)
    assert context_limits(model, 30, "full", window=8, n_sink=2)[2] != "evict"


# ---------------------------------------------------------------------------------------------
# generate(compile=True): the decode step compiled by inductor (its CPU code here).

COMPILED_CASES = [  # (pos_encoding, layers, generate's options, the context kept: (window, n_sink) or None)
    pytest.param("rope", 2, dict(cache_policy="full"), None, id="rope-full"),
    pytest.param("rope", 1, dict(cache_policy="sinks", window=8, n_sink=2), (8, 2), id="rope-sinks"),
    pytest.param(
        "rope",
        1,
        dict(cache_policy="sinks", window=8, n_sink=2, cache_dtype=torch.bfloat16),
        (8, 2),
        id="rope-sinks-bf16-cache",
    ),
    pytest.param("alibi", 2, dict(cache_policy="full"), None, id="alibi-full"),
    pytest.param("learned", 2, {}, (BLOCK, 0), id="learned-crop"),
]
WINDOW_LAYOUTS = [  # generate over ring-buffer layers, with windows far shorter than the generation
    dict(pos_encoding="rope,none", layer_types="sliding_attention,full_attention", sliding_window=5, n_kv_head=1),
    dict(layer_types="chunked_attention,full_attention", attention_chunk_size=6),
    dict(pos_encoding="learned", layer_types="sliding_attention", sliding_window=5),  # crops, so rings restart
]


def check_compiled_generation(
    model: GPT, options: dict, kept: tuple | None, compiled_steps: int, monkeypatch, reference=uncached_last_logits
) -> None:
    """Two left-padded prompts, 2·BLOCK sampled tokens with compile=True: every step's logits
    equal reference(model, tokens), an uncached forward, over what the row keeps ((window, n_sink),
    None: every token), to 1e-5 (1% of the logits' scale with a bf16 cache), and
    compiled_steps decode steps ran the compiled module (sample.compiled_decode_step's). A second
    generate of the same shapes reuses the compiled code (no recompilation)."""
    torch._dynamo.reset()
    compiled_calls = []
    compiled_decode_step = sample.compiled_decode_step  # read now: a test may have replaced it

    def counting(model):
        step = compiled_decode_step(model)
        return lambda *args, **kw: compiled_calls.append(1) or step(*args, **kw)

    monkeypatch.setattr(sample, "compiled_decode_step", counting)
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


@pytest.mark.parametrize("layout", WINDOW_LAYOUTS, ids=["rnope-swa-gqa", "chunked-global", "learned-sliding"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_window_layouts_generate_as_a_full_forward(layout, compile, monkeypatch):
    """Two left-padded prompts, 2·BLOCK tokens: every step equals an uncached forward over what the row keeps
    (learned: its crop, which prefills the rings again from empty), eager and compiled."""
    model = tiny(**layout)
    kept = (BLOCK, 0) if layout.get("pos_encoding") == "learned" else None
    if compile:
        compiled_steps = BLOCK - 3 if kept else 2 * BLOCK - 1
        return check_compiled_generation(model, {}, kept, compiled_steps, monkeypatch)
    prompts = [[5, 7, 11, 2, 9, 4, 8, 1], [3]]
    tokens, logits = generated(model, prompts, 2 * BLOCK, seed=0)
    for b, prompt in enumerate(prompts):
        sequence = prompt + tokens[b].tolist()
        for step, step_logits in enumerate(logits):
            context = window_by_hand(sequence[: len(prompt) + step], *(kept or (10**9, 0)))
            torch.testing.assert_close(step_logits[b], uncached_last_logits(model, context), atol=TOL, rtol=0)


def test_eviction_is_refused_for_ring_buffer_layers():
    """sinks and window move keys in the full cache; sliding and chunked layers keep rings: one-line error."""
    model = tiny(layer_types="sliding_attention,full_attention", sliding_window=4)
    for policy in ("sinks", "window"):
        with pytest.raises(ValueError, match=f"cache_policy '{policy}' evicts keys of sliding or chunked layers"):
            sample.generate(model, [[1, 2]], 2 * BLOCK, cache_policy=policy)
    assert len(list(sample.generate(model, [[1, 2]], 2 * BLOCK, cache_policy="full"))) == 2 * BLOCK


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
    the CPU here (ALiBi.flex_devices), under aot_eager: inductor has no CPU kernel for this decode
    shape, and its CUDA one needs a GPU."""
    model = tiny("alibi")
    monkeypatch.setattr(model_module.ALiBi, "flex_devices", ("cuda", "cpu"))
    monkeypatch.setattr(
        sample, "compiled_decode_step", lambda model: torch.compile(model, fullgraph=True, backend="aot_eager")
    )
    assert model.transformer.wpe.on_flex(torch.device("cpu"))

    def dense(model, tokens):
        with monkeypatch.context() as m:
            m.setattr(model_module.ALiBi, "flex_devices", ())
            assert not model.transformer.wpe.on_flex(torch.device("cpu"))
            return uncached_last_logits(model, tokens)

    check_compiled_generation(model, dict(cache_policy="full"), None, 2 * BLOCK - 1, monkeypatch, dense)


# ---------------------------------------------------------------------------------------------
# Sampling, stopping, errors.


def test_sampling_is_seeded_and_equal_with_and_without_cache():
    model = tiny("rope")
    prompts = [[1, 2, 3], [4]]

    def draw(cache: bool, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        steps = sample.generate(model, prompts, 12, temperature=0.8, top_k=10, top_p=0.9, generator=g, cache=cache)
        return torch.cat(list(steps), dim=1)

    assert torch.equal(draw(True, 0), draw(True, 0))
    assert torch.equal(draw(True, 0), draw(False, 0))
    assert not torch.equal(draw(True, 0), draw(True, 1))


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
        sample.generate(model, [[1, 2]], 5, **kwargs)  # no iteration: raised before any work
    with pytest.raises(ValueError, match="empty prompt"):
        sample.generate(model, [[1], []], 5)
    with pytest.raises(
        ValueError, match=f"prompt token {VOCAB} is outside the vocabulary; valid: ids from 0 to {VOCAB - 1}"
    ):
        sample.generate(model, [[1], [2, VOCAB]], 5)
    with pytest.raises(ValueError, match="prompt token -1 is outside"):
        sample.generate(model, torch.tensor([[-1, 2]]), 5)
    dynamic = tiny("rope", rope_scaling=rope_scaling_for("dynamic"))
    with pytest.raises(
        ValueError, match="compile=True with rope_scaling .*'dynamic'.* depend on the length; valid: compile=False"
    ):
        sample.generate(dynamic, [[1, 2]], 5, compile=True)


# ---------------------------------------------------------------------------------------------
# sample_next_token against hand computations.

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


# ---------------------------------------------------------------------------------------------
# The command line, on a tiny character checkpoint made here.


@pytest.fixture
def char_checkpoint(tmp_path):
    chars = "\nabcdefghijklmnopqrstuvwxyz ,.!?"
    assert len(chars) == VOCAB
    model = tiny("rope")
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "model_args": dataclasses.asdict(model.config),
            "tokenizer": {"kind": "char", "chars": chars},
        },
        path,
    )
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
    assert str(exit_info.value) == (
        "error: cache_dtype='bf16' is not valid; valid: '' (the model's) or one of float64, float32, bfloat16, float16"
    )


def test_sample_passes_cache_dtype_and_compile(char_checkpoint, capsys, monkeypatch):
    """--cache_dtype=bfloat16 and --compile=True reach generate, whose bf16 and compiled
    decoding the tests above check."""
    seen = []
    generate = sample.generate

    def spy(model, *args, **kw):
        seen.append((kw["cache_dtype"], kw["compile"]))
        return generate(model, *args, **kw)

    monkeypatch.setattr(sample, "generate", spy)
    common = [f"--ckpt={char_checkpoint}", "--start=to be", "--max_new_tokens=10"]
    sample.main(common + ["--cache_dtype=bfloat16"])
    sample.main(common + ["--compile=True"])
    sample.main(common)
    assert seen == [(torch.bfloat16, False), (None, True), (None, False)]
    assert capsys.readouterr().out.count("to be") == 3


# ---------------------------------------------------------------------------------------------
# The command line end to end on a trained checkpoint: the prompt and its continuation, seeds,
# FILE: prompts, num_samples, greedy decoding against a full forward by hand, top_k / top_p
# limits, nanoGPT checkpoints, and one-line errors for bad checkpoints and prompts.


def sample_here(capsys, ckpt, *argv: str) -> list[str]:
    """sample.main in this process; returns the printed samples."""
    sample.main([f"--ckpt={ckpt}", *argv])
    out = capsys.readouterr().out
    assert out.endswith(SEPARATOR)
    return out.split(SEPARATOR)[:-1]


def greedy_by_hand(ckpt, prompt: str, n: int, chars: str | None = None) -> str:
    """n argmax tokens after prompt, each from a full forward over the whole context (no cache).
    chars: the vocabulary, by default the checkpoint's tokenizer's."""
    model, checkpoint = load_checkpoint(str(ckpt))
    chars = chars or checkpoint["tokenizer"]["chars"]
    ids = [chars.index(c) for c in prompt]
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return "".join(chars[i] for i in ids)


def test_end_to_end_prints_the_prompt_and_its_continuation_by_seed(trained, capsys):
    argv = [f"--ckpt={trained['ckpt']}", "--start=ROMEO:", "--max_new_tokens=30", "--seed=7"]
    result = run_script("sample.py", *argv)
    assert result.stderr == "" and result.stdout.endswith(SEPARATOR)
    text = result.stdout[: -len(SEPARATOR)]
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30  # one character a token
    chars = torch.load(trained["ckpt"], weights_only=True)["tokenizer"]["chars"]
    assert set(text) <= set(chars)
    assert sample_here(capsys, trained["ckpt"], *argv[1:]) == [text]  # same seed, same text
    assert sample_here(capsys, trained["ckpt"], *argv[1:3], "--seed=8") != [text]


def test_out_dir_and_file_prompt(trained, tmp_path, capsys):
    argv = ["--max_new_tokens=12", "--seed=3"]
    direct = sample_here(capsys, trained["ckpt"], "--start=First Citizen:", *argv)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("First Citizen:\n")
    sample.main([f"--out_dir={trained['out_dir']}", f"--start=FILE:{prompt_file}", *argv])
    assert capsys.readouterr().out.split(SEPARATOR)[:-1] == direct


def test_num_samples(trained, capsys):
    samples = sample_here(capsys, trained["ckpt"], "--start=KING:", "--max_new_tokens=20", "--num_samples=3")
    assert len(samples) == 3 and all(s.startswith("KING:") and len(s) == 25 for s in samples)
    assert len(set(samples)) > 1  # drawn, not copied


@pytest.mark.parametrize(
    "limits",
    [["--temperature=0"], ["--temperature=1.0", "--top_k=1"], ["--temperature=1.5", "--top_k=0", "--top_p=0.01"]],
)
def test_greedy_and_tightest_limits_follow_the_argmax_of_a_full_forward(trained, capsys, limits):
    expected = greedy_by_hand(trained["ckpt"], "ROMEO:", 10)  # 16 tokens: the whole context fits the block
    for seed in (1, 2):
        argv = ["--start=ROMEO:", "--max_new_tokens=10", f"--seed={seed}", *limits]
        assert sample_here(capsys, trained["ckpt"], *argv) == [expected]


def test_a_nanogpt_checkpoint_samples(nanogpt_ckpt, char_data, capsys):
    """nanoGPT checkpoints carry no tokenizer: sample.py takes their dataset's meta.pkl."""
    samples = sample_here(capsys, nanogpt_ckpt["path"], "--start=ROMEO:", "--max_new_tokens=10", "--temperature=0")
    chars = tokenizer_spec("shakespeare_char")["chars"]
    assert samples == [greedy_by_hand(nanogpt_ckpt["path"], "ROMEO:", 10, chars)]


def test_prompt_outside_the_vocabulary(trained):
    result = run_script("sample.py", f"--ckpt={trained['ckpt']}", "--start=Œdipus {}", check=False)
    assert_one_line_error(result, "'{}Œ'", "valid: any of")
    assert result.stdout == ""


@pytest.mark.parametrize("kind,fragment", BAD_CHECKPOINTS)
def test_bad_checkpoint(kind, fragment, trained, tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    if kind == "truncated":
        data = trained["ckpt"].read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "text":
        path.write_text("iter 0: loss 4.18\n")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(SystemExit) as e:
        sample.main([f"--ckpt={path}"])
    message = e.value.code
    assert message.startswith(f"error: checkpoint {str(path)!r}") and fragment in message and "\n" not in message
    assert "valid: " in message
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--device=gpu"], ["device='gpu'", "valid: cpu, cuda, cuda:N, mps"]),
        (["--num_samples=0"], ["num_samples=0", "at least 1"]),
        (["--temperature=-1"], ["temperature=-1.0", "temperature ≥ 0"]),
        (["--top_p=1.5"], ["top_p=1.5", "0 < top_p ≤ 1"]),
        (["--start=FILE:/no/such/prompt.txt"], ["/no/such/prompt.txt"]),
        (["--seeds=2"], ["'seeds'", "did you mean 'seed'?"]),
    ],
)
def test_bad_setting(argv, fragments, trained, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main([f"--ckpt={trained['ckpt']}", *argv])
    message = e.value.code
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert capsys.readouterr().out == ""
