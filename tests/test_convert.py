"""convert.py against Hugging Face transformers, the independent reference.

Every encoding exported and loaded back with AutoModelForCausalLM / AutoTokenizer gives our logits (float32, within
1e-4) and our greedy text; GPT-NeoX (Pythia's shape) and GPT-2 models built with transformers import to their logits
and greedy text; export then import gives back the same weights; every refusal is one line. All on tiny random
models in temporary directories: nothing is downloaded.
"""

import json
import re
import sys
from dataclasses import asdict

import pytest
import torch
from conftest import assert_one_line_error, run_script

import convert
from data.tokenizer import load_tokenizer, tokenizer_spec
from model import GPT, GPTConfig
from sample import generate
from train import load_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # the tiny configs' warnings (ids past a tiny vocab and the like)

# the main job's 65 characters, as data/shakespeare_char/prepare.py finds them (a fresh clone has no meta.pkl yet)
CHAR_SPEC = {"kind": "char", "chars": "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"}
PROMPT = "ROMEO:\nWhat"
YARN = {"rope_type": "yarn", "factor": 4.0}
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2, 3], "long_factor": [1, 2, 4, 8.0], "factor": 4.0}
# settings over the base: 2 layers, 4 heads of 16, block 16, no biases
EXPORTS = {
    "rope": {},
    "rope interleaved": dict(rope_layout="interleaved"),
    "rope_fraction 0.25": dict(rope_fraction=0.25),
    "Pythia's shape, interleaved": dict(
        rope_layout="interleaved", rope_fraction=0.5, parallel_residual=True, tie_embeddings=False, bias=True
    ),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "yarn": dict(rope_scaling=YARN, rope_fraction=0.5),
    "llama3": dict(rope_scaling=LLAMA3),
    "longrope": dict(rope_scaling=LONGROPE, rope_fraction=0.5),
    "GQA": dict(n_kv_head=2, activation="gelu_tanh"),
    "relu2": dict(activation="relu2"),
    "GQA interleaved, biases, yarn": dict(n_kv_head=1, rope_layout="interleaved", bias=True, rope_scaling=YARN),
    "sliding window": dict(layer_types="sliding_attention", sliding_window=5, n_kv_head=2),
    "alibi": dict(pos_encoding="alibi"),
    "alibi, 6 heads, untied": dict(pos_encoding="alibi", n_head=6, n_embd=48, tie_embeddings=False),
    "alibi, 3 heads": dict(pos_encoding="alibi", n_head=3, n_embd=48),
    "learned": dict(pos_encoding="learned"),
    "learned, untied, tanh GELU, biases": dict(
        pos_encoding="learned", tie_embeddings=False, activation="gelu_tanh", bias=True
    ),
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "none": dict(pos_encoding="none"),
}


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight redrawn at a scale where a wrong sign, row or bias shows in the logits (norm gains near 1)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = "norm" in name or "ln_" in name
            p.copy_(0.3 * torch.randn(p.shape, generator=generator) + (1.0 if gain and name.endswith("weight") else 0))
    return model.eval()


def tiny_gpt(**settings) -> GPT:
    base = dict(block_size=16, vocab_size=len(CHAR_SPEC["chars"]), n_layer=2, n_head=4, n_embd=64, bias=False)
    return randomized(GPT(GPTConfig(**{**base, **settings})))


def write_checkpoint(model: GPT, path, spec: dict = CHAR_SPEC) -> str:
    save_checkpoint(str(path), {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": spec})
    return str(path)


def exported(model: GPT, tmp_path, spec: dict = CHAR_SPEC):
    """(HF model, HF tokenizer) loaded back by the Auto classes from the directory convert.export wrote."""
    out = tmp_path / "hf"
    convert.export(write_checkpoint(model, tmp_path / "ckpt.pt", spec), str(out))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return hf_model, transformers.AutoTokenizer.from_pretrained(out)


def greedy_ours(model: GPT, ids: list[int], n: int, eot: int | None = None) -> list[int]:
    """sample.py's greedy tokens, the full cache kept (as HF's generate does), stopped at eot as sample.py does."""
    tokens = [t.item() for t in generate(model, [ids], n, temperature=0.0, cache_policy="full", stop_token=eot)]
    return tokens[: tokens.index(eot) + 1] if eot in tokens else tokens


def greedy_hf(hf_model, ids: list[int], n: int, use_cache: bool = True) -> list[int]:
    x = torch.tensor([ids])
    out = hf_model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("settings", EXPORTS.values(), ids=EXPORTS.keys())
def test_export_gives_our_logits_and_greedy_text(settings, tmp_path):
    model = tiny_gpt(**settings)
    hf_model, hf_tokenizer = exported(model, tmp_path)
    # RoPE runs past its training length, where the scalings act; HF's GPT-2 and MPT hold block_size positions
    length = 3 * model.config.block_size if model.config.pos_encoding == "rope" else model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_model(idx).logits) <= 1e-4
    encode, decode, _ = load_tokenizer(CHAR_SPEC)
    ids = encode(PROMPT)
    assert hf_tokenizer(PROMPT).input_ids == ids
    # HF's cached dynamic NTK and LongRoPE keep keys turned at the earlier lengths' frequencies; sample.py
    # re-prefills when they change, as a full forward at each step (HF without its cache) does
    use_cache = (model.config.rope_scaling or {}).get("rope_type") not in ("dynamic", "longrope")
    theirs = greedy_hf(hf_model, ids, length - len(ids), use_cache)
    ours = greedy_ours(model, ids, length - len(ids))
    assert ours == theirs
    assert decode(ids + ours) == hf_tokenizer.decode(ids + theirs)


def test_export_breaks_without_the_layout_permutation(tmp_path, monkeypatch):
    """The interleaved layout's weights must be permuted: without it the logits part (the test above can fail)."""
    monkeypatch.setattr(convert, "half_layout", lambda qkv, config: qkv)
    model = tiny_gpt(rope_layout="interleaved")
    idx = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(model(idx)[0], convert.to_hf(model)(idx).logits) > 1e-2


def test_mpt_alibi_slopes_are_ours_for_any_head_count():
    """MPT's slopes (its own formula, in transformers) equal attention.alibi_slopes, powers of two or not."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    from attention import alibi_slopes

    for n_head in (1, 2, 3, 4, 5, 6, 8, 12, 16, 20):
        mpt = build_mpt_alibi_tensor(n_head, 2)[:, 0, 0]  # the bias at distance 1: −slope
        assert torch.allclose(-mpt.double(), alibi_slopes(n_head), rtol=1e-6), n_head


def test_char_tokenizer_encodes_and_decodes_as_ours(tmp_path):
    text = open("data/shakespeare_char/input.txt").read()[:3000] + " ,.;:!?-'&$3\n\n  x"
    convert.hf_tokenizer(CHAR_SPEC, None).save_pretrained(tmp_path)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    encode, decode, _ = load_tokenizer(CHAR_SPEC)
    assert hf_tokenizer(text).input_ids == encode(text)
    assert hf_tokenizer.decode(encode(text)) == decode(encode(text)) == text


def test_gpt2_bpe_export_is_gpt2s_tokenizer(tmp_path):
    """GPT-2 BPE: the exported tokenizer (built from the shipped ranks) encodes and decodes as tiktoken does."""
    model = tiny_gpt(pos_encoding="learned", vocab_size=50304, n_embd=16, n_head=2, n_layer=1)
    hf_model, hf_tokenizer = exported(model, tmp_path, {"kind": "gpt2"})
    assert type(hf_tokenizer).__name__ == "GPT2Tokenizer"
    text = "Hello world! It's 2026; they'll've   spaces\n\n\tand Ünïcödé, 中文, 🙂 <|endoftext|> end"
    encode, decode, eot = load_tokenizer({"kind": "gpt2"})
    assert hf_tokenizer(text).input_ids == encode(text)
    assert hf_tokenizer.decode(encode(text)) == decode(encode(text)) == text
    files = transformers.GPT2Tokenizer(vocab=str(tmp_path / "hf/vocab.json"), merges=str(tmp_path / "hf/merges.txt"))
    assert files(text).input_ids == encode(text)
    assert hf_model.config.eos_token_id == hf_tokenizer.eos_token_id == eot
    idx = torch.tensor([encode(text)[:16]])
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_model(idx).logits) <= 1e-4


def tiny_bpe_tokenizer(vocab_size: int):
    """A byte-level BPE trained here on Tiny Shakespeare, <|endoftext|> as id 0 (Pythia's end of text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([open("data/shakespeare_char/input.txt").read()[:20000]], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def pythia_dir(tmp_path, **settings):
    """A tiny GPT-NeoX as Pythia's config.json has it (rotary_pct, rotary_emb_base), saved with a tokenizer."""
    config = transformers.GPTNeoXConfig(
        vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=24, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
        tie_word_embeddings=False, hidden_act="gelu", bos_token_id=0, eos_token_id=0, **settings,
    )  # fmt: skip
    return saved(transformers.GPTNeoXForCausalLM(config), tiny_bpe_tokenizer(300), tmp_path / "pythia")


def gpt2_dir(tmp_path):
    """A tiny GPT-2 with GPT-2's own tokenizer."""
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=24, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_new"
    )
    return saved(transformers.GPT2LMHeadModel(config), convert.hf_tokenizer({"kind": "gpt2"}, 50256), tmp_path / "gpt2")


def saved(hf_model, hf_tokenizer, path):
    randomized(hf_model).save_pretrained(path)
    hf_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("make_dir", [pythia_dir, gpt2_dir], ids=["GPT-NeoX (Pythia)", "GPT-2"])
def test_import_gives_hfs_logits_and_greedy_text(make_dir, tmp_path):
    hf_dir = make_dir(tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model, checkpoint = load_checkpoint(convert.import_hf(str(hf_dir), str(tmp_path / "out")))
    assert checkpoint["tokenizer"]["kind"] == ("hf" if "pythia" in str(hf_dir) else "gpt2")
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_model(idx).logits) <= 1e-4
    encode, decode, eot = load_tokenizer(checkpoint["tokenizer"])
    assert eot == hf_tokenizer.eos_token_id == hf_model.generation_config.eos_token_id  # sample.py stops where HF does
    ids = encode("ROMEO: Wherefore")
    assert ids == hf_tokenizer("ROMEO: Wherefore").input_ids
    theirs = greedy_hf(hf_model, ids, 24 - len(ids))
    assert greedy_ours(model, ids, 24 - len(ids), eot) == theirs
    assert decode(ids + theirs) == hf_tokenizer.decode(ids + theirs)


def test_imported_pythia_samples_and_takes_rope_scaling(tmp_path):
    """sample.py's command line on an imported checkpoint prints HF's greedy text; a rope_scaling override gives
    the logits of the HF model configured with the same rope_parameters."""
    hf_dir = pythia_dir(tmp_path)
    ckpt = convert.import_hf(str(hf_dir), str(tmp_path / "out"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = hf_tokenizer("ROMEO:").input_ids
    text = hf_tokenizer.decode(ids + greedy_hf(hf_model, ids, 12))
    args = ("--start=ROMEO:", "--temperature=0", "--max_new_tokens=12", "--cache_policy=full")
    printed = run_script("sample.py", f"--ckpt={ckpt}", *args).stdout
    assert printed.split("\n---------------\n")[0] == text

    linear = {"rope_type": "linear", "factor": 2.0}
    model, _ = load_checkpoint(ckpt, rope_scaling=linear)
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    config.rope_parameters = {**config.rope_parameters, **linear}
    scaled = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, config=config, dtype=torch.float32).eval()
    idx = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(model(idx)[0], scaled(idx).logits) <= 1e-4
        assert max_diff(model(idx)[0], hf_model(idx).logits) > 1e-2  # the override took


ROUND_TRIPS = {
    "GPT-NeoX": dict(bias=True, parallel_residual=True, tie_embeddings=False, rope_fraction=0.25),
    "GPT-NeoX, tied, tanh GELU": dict(bias=True, activation="gelu_tanh"),
    "GPT-2, relu2": dict(bias=True, pos_encoding="learned", activation="relu2"),
}


@pytest.mark.parametrize("settings", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_export_then_import_gives_back_the_state_dict(settings, tmp_path):
    model = tiny_gpt(block_size=24, **settings)
    convert.export(write_checkpoint(model, tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    back, checkpoint = load_checkpoint(convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "back")))
    assert asdict(back.config) == asdict(model.config)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    encode = load_tokenizer(checkpoint["tokenizer"])[0]  # the char vocabulary, now as its tokenizer.json
    assert encode(PROMPT) == load_tokenizer(CHAR_SPEC)[0](PROMPT)


REFUSALS = {
    "static NTK": (dict(rope_scaling={"rope_type": "ntk", "factor": 2.0}), "rope_scaling"),
    "per-layer rope_scaling": (
        dict(
            layer_types="sliding_attention",
            sliding_window=4,
            rope_scaling={"sliding_attention": {"rope_type": "default"}},
        ),
        "rope_scaling",
    ),
    "a per-layer plan": (dict(layer_types="sliding_attention,full_attention", sliding_window=4), "layer_types"),
    "chunked attention": (dict(layer_types="chunked_attention", attention_chunk_size=4), "layer_types"),
    "iRoPE": (dict(pos_encoding="rope,none"), "pos_encoding"),
    "temperature tuning": (dict(pos_encoding="none", attn_temperature_tuning=True), "attn_temperature_tuning"),
    "GQA partial rotary": (dict(n_kv_head=2, rope_fraction=0.5), "rope_fraction"),
    "sliding parallel residual": (
        dict(layer_types="sliding_attention", sliding_window=4, parallel_residual=True),
        "parallel_residual",
    ),
    "ALiBi biases": (dict(pos_encoding="alibi", bias=True), "bias"),
    "ALiBi tanh GELU": (dict(pos_encoding="alibi", activation="gelu_tanh"), "activation"),
    "ALiBi GQA": (dict(pos_encoding="alibi", n_kv_head=2), "n_kv_head"),
    "learned parallel residual": (dict(pos_encoding="learned", parallel_residual=True), "parallel_residual"),
}


@pytest.mark.parametrize("settings, setting", REFUSALS.values(), ids=REFUSALS.keys())
def test_export_refuses_what_hf_cannot_compute_in_one_line(settings, setting, tmp_path):
    ckpt = write_checkpoint(tiny_gpt(**settings), tmp_path / "ckpt.pt")
    with pytest.raises(ValueError) as e:
        convert.export(ckpt, str(tmp_path / "hf"))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{setting}=") and "valid: " in str(e.value)
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def edit_config(hf_dir, **changes) -> None:
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


IMPORT_REFUSALS = {
    "no directory": (lambda d: d / "missing", "holds no config.json"),
    "an unsupported architecture": (lambda d: edit_config(d, model_type="opt") or d, "model_type 'opt'"),
    "a setting ropegpt lacks": (lambda d: edit_config(d, hidden_act="relu") or d, "hidden_act='relu'"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink() or d, "holds no tokenizer"),
    "no weights": (lambda d: (d / "model.safetensors").unlink() or d, "holds no weights"),
    "a mismatched shape": (
        lambda d: edit_config(d, intermediate_size=512, hidden_size=128) or d,
        "has shape [320, 64], its config.json [320, 128]",
    ),
}


@pytest.mark.parametrize("damage, fragment", IMPORT_REFUSALS.values(), ids=IMPORT_REFUSALS.keys())
def test_import_refuses_in_one_line(damage, fragment, tmp_path):
    hf_dir = damage(pythia_dir(tmp_path))
    with pytest.raises(ValueError) as e:
        convert.import_hf(str(hf_dir), str(tmp_path / "out"))
    assert "\n" not in str(e.value) and fragment in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path):
    """export writes a directory the Auto classes load; a refusal is one line, and nothing is written."""
    model = tiny_gpt()
    run_script(
        "convert.py", "export", "--ckpt", write_checkpoint(model, tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")
    )
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    idx = torch.randint(0, 65, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_model(idx).logits) <= 1e-4

    ntk = write_checkpoint(tiny_gpt(rope_scaling={"rope_type": "ntk", "factor": 2.0}), tmp_path / "ntk.pt")
    refused = run_script("convert.py", "export", f"--ckpt={ntk}", f"--out={tmp_path / 'ntk'}", check=False)
    assert_one_line_error(refused, "rope_scaling=", "ntk", "valid: ")
    assert not (tmp_path / "ntk").exists()


@pytest.mark.parametrize("missing", ["transformers", "safetensors", "tokenizers"])
def test_a_missing_library_is_named_with_the_pip_line(missing, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # import then raises ImportError, as when not installed
    with pytest.raises(ValueError, match=f"convert.py needs {missing}, .*valid: {re.escape(convert.PIP_LINE)}$"):
        convert.export(write_checkpoint(tiny_gpt(), tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_the_char_spec_is_the_main_jobs(char_data):
    assert tokenizer_spec("shakespeare_char") == CHAR_SPEC
