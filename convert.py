"""Hugging Face interop: export a ropegpt checkpoint to transformers, import GPT-NeoX (Pythia) and GPT-2.

    pip install "transformers>=5" safetensors tokenizers          # what this script needs; train.py does not
    python convert.py export --ckpt out/rope_shakespeare/ckpt.pt --out hf/rope_shakespeare
    python convert.py import path/to/pythia-70m --out out/pythia-70m  # a local directory: nothing is downloaded
    python sample.py --ckpt out/pythia-70m/ckpt.pt --start="The" --temperature=0

Export writes config.json, generation_config.json, model.safetensors and the tokenizer files, so that
AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR), and pipeline("text-generation", model=DIR), compute what
sample.py does. Each model becomes the transformers class that computes the same function:

    rope                        GPTNeoXForCausalLM     half layout (interleaved q/k rows are permuted into it), any
                                                       rope_fraction, parallel residual, rope_scaling as rope_parameters
    rope with n_kv_head < n_head, or every layer sliding_attention
                                Starcoder2ForCausalLM  GQA, sliding_window; whole-head rotary, sequential residual
    alibi                       MptForCausalLM         no biases, exact GELU; MPT's slopes are ours for any head count
    learned, sinusoidal, none   GPT2LMHeadModel        the sinusoidal table (over √n_embd), or zeros, as wpe

A model without biases (bias=False) is the HF model with zero biases. HF's GPT-2 and MPT hold block_size positions
(their wpe table, MPT's ALiBi table), so they stop there where ropegpt would run on. Anything no class computes
exactly is a one-line error naming the setting, before anything is written: static NTK (HF has no such rope_type),
a per-layer plan (mixed layer types or encodings, chunked attention, per-type rope_scaling, Llama 4's temperature
tuning), ALiBi with biases or the tanh GELU, GQA or a parallel residual outside RoPE, partial rotary or a parallel
residual with GQA or sliding windows. Dynamic NTK and LongRoPE: HF's cached generate keeps keys turned at earlier
lengths' frequencies where sample.py re-prefills, so past the original length their cached greedy text can part.

Import reads a GPT-NeoX (Pythia: parallel residual, untied head, partial rotary) or GPT-2 directory, such as one
saved by `huggingface-cli download`, into out/NAME/ckpt.pt with the model's own tokenizer (GPT-2's is stored as
ropegpt's {"kind": "gpt2"} when it is the shipped one); sample.py, eval_length.py and --rope_scaling then work on it
(eval_length.py's perplexity needs a dataset of the same tokenizer: data/shakespeare for GPT-2).

In memory: to_hf(model) is the transformers model of a GPT, from_hf(hf_model) the GPT of a transformers model.
"""

import os
import sys
from dataclasses import asdict

import torch
from torch import Tensor

import data
from data.tokenizer import GPT2_EOT, load_tokenizer, tokenizer_spec
from model import GPT, GPTConfig, Sinusoidal, is_per_layer_type
from rope import complete_rope_scaling, permute_qk_weights, rope_type_of, rot_dim_for
from train import load_checkpoint, save_checkpoint

GPT2_RANKS = os.path.join(data.DATA_DIR, "gpt2.tiktoken")  # GPT-2's merge ranks, shipped (data/tokenizer.py)
PIP_LINE = 'pip install "transformers>=5" safetensors tokenizers'
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
# ACT2FN names, shared by every HF class
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu2": "relu2"}
FROM_HF_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu2": "relu2"}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Our module names -> the HF class's ({i}: the layer); Starcoder2 splits c_attn into three projections.
LAYER = "transformer.h.{i}."
MODULE_NAMES = {
    "GPTNeoXForCausalLM": {
        "transformer.wte": "gpt_neox.embed_in",
        LAYER + "ln_1": "gpt_neox.layers.{i}.input_layernorm",
        LAYER + "attn.c_attn": "gpt_neox.layers.{i}.attention.query_key_value",
        LAYER + "attn.c_proj": "gpt_neox.layers.{i}.attention.dense",
        LAYER + "ln_2": "gpt_neox.layers.{i}.post_attention_layernorm",
        LAYER + "mlp.c_fc": "gpt_neox.layers.{i}.mlp.dense_h_to_4h",
        LAYER + "mlp.c_proj": "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
        "transformer.ln_f": "gpt_neox.final_layer_norm",
        "lm_head": "lm_head",
    },
    "Starcoder2ForCausalLM": {
        "transformer.wte": "model.embed_tokens",
        LAYER + "ln_1": "model.layers.{i}.input_layernorm",
        LAYER + "attn.c_attn": tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv"),
        LAYER + "attn.c_proj": "model.layers.{i}.self_attn.o_proj",
        LAYER + "ln_2": "model.layers.{i}.post_attention_layernorm",
        LAYER + "mlp.c_fc": "model.layers.{i}.mlp.c_fc",
        LAYER + "mlp.c_proj": "model.layers.{i}.mlp.c_proj",
        "transformer.ln_f": "model.norm",
        "lm_head": "lm_head",
    },
    "MptForCausalLM": {
        "transformer.wte": "transformer.wte",
        LAYER + "ln_1": "transformer.blocks.{i}.norm_1",
        LAYER + "attn.c_attn": "transformer.blocks.{i}.attn.Wqkv",
        LAYER + "attn.c_proj": "transformer.blocks.{i}.attn.out_proj",
        LAYER + "ln_2": "transformer.blocks.{i}.norm_2",
        LAYER + "mlp.c_fc": "transformer.blocks.{i}.ffn.up_proj",
        LAYER + "mlp.c_proj": "transformer.blocks.{i}.ffn.down_proj",
        "transformer.ln_f": "transformer.norm_f",
        "lm_head": "lm_head",
    },
    "GPT2LMHeadModel": {  # nanoGPT took GPT-2's names
        name: name
        for name in ["transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"]
        + [LAYER + m for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")]
    },
}
IMPORTABLE = {"gpt_neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel"}  # HF model_type -> class


def hf_libraries():
    """The transformers module, once safetensors and tokenizers are importable too; else a one-line ValueError."""
    try:
        import safetensors  # noqa: F401  (save_pretrained's format)
        import tokenizers  # noqa: F401
        import transformers
    except ImportError as e:
        raise ValueError(f"convert.py needs {e.name}, which is not installed; valid: {PIP_LINE}") from None
    return transformers


# --- ropegpt -> transformers
def refuse(config: GPTConfig, setting: str, why: str, valid: str) -> ValueError:
    value = getattr(config, setting)
    return ValueError(f"{setting}={value!r} has no exact Hugging Face equivalent ({why}); valid: {valid}")


def hf_architecture(config: GPTConfig) -> str:
    """The transformers class that computes what a GPT of this config does; a one-line ValueError naming the first
    setting that none does."""
    c = config
    types = {layer_type for _, layer_type in c.layers()}
    sliding = types == {"sliding_attention"} and c.pos_encoding == "rope"  # Starcoder2's sliding_window
    if types != {"full_attention"} and not sliding:
        raise refuse(c, "layer_types", "no HF class here takes a per-layer plan", "'full_attention', or all sliding")
    if "," in c.pos_encoding:
        raise refuse(c, "pos_encoding", "no HF class here takes a per-layer plan", "one encoding for every layer")
    if c.attn_temperature_tuning:
        raise refuse(c, "attn_temperature_tuning", "no HF class here has Llama 4's query scale", "False")
    if c.pos_encoding == "rope":
        if is_per_layer_type(c.rope_scaling):
            raise refuse(c, "rope_scaling", "no HF class here takes one per layer type", "one rope_scaling dict")
        if rope_type_of(c.rope_scaling) == "ntk":
            raise refuse(c, "rope_scaling", "HF has no static NTK", "'dynamic', 'yarn' or another HF rope_type")
        if c.n_kv_head == c.n_head and not sliding:
            return "GPTNeoXForCausalLM"
        why = "Starcoder2, HF's GQA and sliding-window model, rotates whole heads, in sequence"
        if c.rope_fraction != 1.0:
            raise refuse(c, "rope_fraction", why, "1.0 with GQA or sliding windows")
        if c.parallel_residual:
            raise refuse(c, "parallel_residual", why, "False with GQA or sliding windows")
        return "Starcoder2ForCausalLM"
    if c.n_kv_head != c.n_head:
        raise refuse(c, "n_kv_head", f"HF's {c.pos_encoding} class has no GQA", f"{c.n_head} (n_head), or rope")
    if c.parallel_residual:
        raise refuse(c, "parallel_residual", f"HF's {c.pos_encoding} class has none", "False, or rope")
    if c.pos_encoding != "alibi":
        return "GPT2LMHeadModel"
    if c.bias:
        raise refuse(c, "bias", "MPT, HF's ALiBi model, has no biases", "False")
    if c.activation != "gelu":
        raise refuse(c, "activation", "MPT, HF's ALiBi model, has the exact GELU", "'gelu'")
    return "MptForCausalLM"


def hf_rope_parameters(config: GPTConfig) -> dict:
    """HF's rope_parameters: rope_scaling with its original length filled in, theta and the rotary share. HF's
    dynamic NTK reads its L from max_position_embeddings (hf_max_positions), not from this dict."""
    scaling = complete_rope_scaling(config.rope_scaling, config.block_size) or {}
    params = {k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}
    rope_type = rope_type_of(config.rope_scaling)
    if rope_type == "dynamic":
        params.pop("original_max_position_embeddings")
    rotary = {"rope_theta": config.rope_base, "partial_rotary_factor": config.rope_fraction}
    return {"rope_type": rope_type, **rotary, **params}


def hf_max_positions(config: GPTConfig) -> int:
    """max_position_embeddings: the training length; for a RoPE extension, the original length L stretched by its
    factor (what HF's Llama 3 and YaRN configs say), except dynamic NTK, which HF scales from this length: L."""
    scaling = complete_rope_scaling(config.rope_scaling, config.block_size) or {}
    L = scaling.get("original_max_position_embeddings", config.block_size)
    return L if rope_type_of(config.rope_scaling) == "dynamic" else int(L * scaling.get("factor", 1))


def hf_config(config: GPTConfig, architecture: str, eos_token_id: int | None):
    """The transformers config of a GPT, for the class hf_architecture chose."""
    transformers = hf_libraries()
    c = config
    common = dict(vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings)
    common.update(bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    if architecture == "GPT2LMHeadModel":
        return transformers.GPT2Config(
            n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            activation_function=TO_HF_ACTIVATION[c.activation], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=LAYER_NORM_EPS, **common,
        )  # fmt: skip
    if architecture == "MptForCausalLM":
        return transformers.MptConfig(
            d_model=c.n_embd, n_heads=c.n_head, n_layers=c.n_layer, expansion_ratio=4, max_seq_len=c.block_size,
            no_bias=True, learned_pos_emb=False, layer_norm_epsilon=LAYER_NORM_EPS,
            attn_config={"alibi": True, "alibi_bias_max": 8}, **common,
        )  # fmt: skip
    rope = dict(
        hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        intermediate_size=4 * c.n_embd, hidden_act=TO_HF_ACTIVATION[c.activation],
        max_position_embeddings=hf_max_positions(c), rope_parameters=hf_rope_parameters(c), attention_dropout=0.0,
    )  # fmt: skip
    if architecture == "Starcoder2ForCausalLM":
        window = c.sliding_window if "sliding_attention" in c.layer_types else None  # every layer's, or none
        return transformers.Starcoder2Config(
            num_key_value_heads=c.n_kv_head, norm_epsilon=LAYER_NORM_EPS, use_bias=c.bias, sliding_window=window,
            residual_dropout=0.0, embedding_dropout=0.0, **rope, **common,
        )  # fmt: skip
    return transformers.GPTNeoXConfig(
        use_parallel_residual=c.parallel_residual, layer_norm_eps=LAYER_NORM_EPS, attention_bias=c.bias,
        hidden_dropout=0.0, **rope, **common,
    )  # fmt: skip


def half_layout(qkv: Tensor, config: GPTConfig) -> Tensor:
    """c_attn's weight or bias with its q and k heads in the half layout, HF's rotate_half (v untouched)."""
    if config.rope_layout == "half":
        return qkv
    rot_dim = rot_dim_for(config.n_embd // config.n_head, config.rope_fraction)
    return permute_qk_weights(qkv, config.n_head, config.n_kv_head, rot_dim, "interleaved", "half")


def neox_qkv(qkv: Tensor, n_head: int) -> Tensor:
    """Rows q, k, v (each n_head heads) -> GPT-NeoX's q, k, v of head 0, then of head 1, ..."""
    return qkv.unflatten(0, (3, n_head, -1)).transpose(0, 1).flatten(0, 2)


def qkv_from_neox(qkv: Tensor, n_head: int) -> Tensor:
    """The inverse of neox_qkv."""
    return qkv.unflatten(0, (n_head, 3, -1)).transpose(0, 1).flatten(0, 2)


def formatted(names: str | tuple, i: int | None) -> str | tuple:
    return tuple(n.format(i=i) for n in names) if isinstance(names, tuple) else names.format(i=i)


def module_names(architecture: str, n_layer: int) -> dict:
    """{our module: HF module (or Starcoder2's three)} for every layer."""
    names = {}
    for ours, theirs in MODULE_NAMES[architecture].items():
        for i in range(n_layer) if "{i}" in ours else [None]:
            names[ours.format(i=i)] = formatted(theirs, i)
    return names


def is_conv1d(architecture: str, module: str) -> bool:
    """GPT-2's layers hold their Linear weights transposed (its Conv1D is x @ W + b)."""
    return architecture == "GPT2LMHeadModel" and (".attn." in module or ".mlp." in module)


def position_table(config: GPTConfig) -> Tensor:
    """What a sinusoidal or NoPE GPT adds at positions 0..block_size−1, as GPT-2's wpe."""
    if config.pos_encoding == "none":
        return torch.zeros(config.block_size, config.n_embd)
    return Sinusoidal.table(torch.arange(config.block_size), config.n_embd) / config.n_embd**0.5


def hf_state_dict(model: GPT, architecture: str) -> dict[str, Tensor]:
    """The HF class's state dict of a GPT's weights (its zero biases aside, for bias=False)."""
    c, names, out = model.config, module_names(architecture, model.config.n_layer), {}
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        if module.endswith("attn.c_attn"):
            tensor = half_layout(tensor, c) if c.pos_encoding == "rope" else tensor
            tensor = neox_qkv(tensor, c.n_head) if architecture == "GPTNeoXForCausalLM" else tensor
        if is_conv1d(architecture, module) and kind == "weight":
            tensor = tensor.t()
        theirs = names[module]
        if isinstance(theirs, tuple):  # Starcoder2's q_proj, k_proj, v_proj
            hs = c.n_embd // c.n_head
            parts = tensor.split([c.n_head * hs, c.n_kv_head * hs, c.n_kv_head * hs])
            out.update({f"{t}.{kind}": part for t, part in zip(theirs, parts)})
        else:
            out[f"{theirs}.{kind}"] = tensor
    if architecture == "GPT2LMHeadModel" and c.pos_encoding != "learned":
        out["transformer.wpe.weight"] = position_table(c)
    return {k: v.contiguous() for k, v in out.items()}


def to_hf(model: GPT, eos_token_id: int | None = None):
    """The transformers model (a PreTrainedModel, float32, eval mode) that computes what `model` does: same
    logits from the same token ids at positions 0, 1, ...; eos_token_id is its config's end of text (and begin).
    A GPT that no HF class computes exactly is a one-line ValueError naming the setting (hf_architecture)."""
    transformers = hf_libraries()
    architecture = hf_architecture(model.config)
    hf_model = getattr(transformers, architecture)(hf_config(model.config, architecture, eos_token_id))
    weights = hf_state_dict(model, architecture)
    if not model.config.bias:  # bias=False: the HF class's biases, zero
        zeros = {k: torch.zeros_like(v) for k, v in hf_model.state_dict().items() if k.endswith(".bias")}
        weights = zeros | weights
    hf_model.load_state_dict(weights, strict=True)
    return hf_model.eval()


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocab.json and merges.txt, from the shipped ranks: a token's merge is the last step of BPE over its
    bytes with the lower ranks alone (50,000 merges, one per multi-byte token); bytes as GPT-2's printable chars."""
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_tiktoken_bpe(GPT2_RANKS)
    printable = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(printable[byte] for byte in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the lowest-ranked pair below rank until two parts remain
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], rank))
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(token): rank for token, rank in ranks.items()} | {"<|endoftext|>": GPT2_EOT}
    return vocab, merges


def hf_tokenizer(spec: dict, eos_token_id: int | None):
    """A transformers tokenizer that encodes and decodes as load_tokenizer(spec) does."""
    transformers = hf_libraries()
    from tokenizers import Tokenizer, decoders, models

    if spec["kind"] == "gpt2":
        vocab, merges = gpt2_vocab_and_merges()
        return transformers.GPT2Tokenizer(vocab=vocab, merges=merges, clean_up_tokenization_spaces=False)
    if spec["kind"] == "char":  # BPE without merges and without a pre-tokenizer: one token a character
        tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(spec["chars"])}, merges=[]))
        tokenizer.decoder = decoders.Fuse()  # joined back without spaces
    else:
        tokenizer = Tokenizer.from_str(spec["json"])
    eos = None if eos_token_id is None else tokenizer.id_to_token(eos_token_id)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos, bos_token=eos, clean_up_tokenization_spaces=False
    )


def checkpoint_tokenizer(checkpoint: dict) -> dict:
    """The tokenizer spec a checkpoint carries, or its dataset's (as sample.py reads it)."""
    return checkpoint.get("tokenizer") or tokenizer_spec(checkpoint.get("config", {}).get("dataset", ""))


def export(ckpt: str, out: str) -> None:
    """Write a ropegpt checkpoint as a transformers directory; every check runs before anything is written."""
    hf_libraries()
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; valid: a directory, new or to overwrite")
    model, checkpoint = load_checkpoint(ckpt, "cpu")
    spec = checkpoint_tokenizer(checkpoint)
    eot = load_tokenizer(spec)[2]
    hf_model = to_hf(model, eot)
    tokenizer = hf_tokenizer(spec, eot)
    hf_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if spec["kind"] == "gpt2":  # GPT-2's vocab.json and merges.txt too, as its Hub directory has them
        tokenizer.backend_tokenizer.model.save(out)


# --- transformers -> ropegpt
def hf_check(hf_config, name: str, ok: bool, valid: str) -> None:
    if not ok:
        value = getattr(hf_config, name, None)
        raise ValueError(f"HF config {name}={value!r} has no ropegpt equivalent; valid: {valid}")


def gpt_config_from_hf(hf_config) -> GPTConfig:
    """The GPTConfig of a GPT-NeoX or GPT-2 config; a one-line ValueError for a setting ropegpt lacks."""
    h = hf_config
    if h.model_type not in IMPORTABLE:
        raise ValueError(f"HF model_type {h.model_type!r} cannot be imported; valid: {', '.join(IMPORTABLE)}")
    act = "hidden_act" if h.model_type == "gpt_neox" else "activation_function"
    hf_check(h, act, getattr(h, act) in FROM_HF_ACTIVATION, ", ".join(FROM_HF_ACTIVATION))
    eps = "layer_norm_eps" if h.model_type == "gpt_neox" else "layer_norm_epsilon"
    hf_check(h, eps, getattr(h, eps) == LAYER_NORM_EPS, f"{LAYER_NORM_EPS} (ropegpt's LayerNorm)")
    common = dict(
        vocab_size=h.vocab_size, n_layer=h.num_hidden_layers, n_head=h.num_attention_heads, n_embd=h.hidden_size,
        bias=True, activation=FROM_HF_ACTIVATION[getattr(h, act)], tie_embeddings=h.tie_word_embeddings,
    )  # fmt: skip
    if h.model_type == "gpt2":
        hf_check(h, "n_inner", h.n_inner in (None, 4 * h.n_embd), f"None or {4 * h.n_embd} (4 n_embd)")
        hf_check(h, "scale_attn_weights", h.scale_attn_weights, "True (1/√head_size)")
        hf_check(h, "scale_attn_by_inverse_layer_idx", not h.scale_attn_by_inverse_layer_idx, "False")
        return GPTConfig(block_size=h.n_positions, pos_encoding="learned", **common)
    hf_check(h, "intermediate_size", h.intermediate_size == 4 * h.hidden_size, f"{4 * h.hidden_size} (4 hidden_size)")
    hf_check(h, "attention_bias", h.attention_bias, "True")
    rope = dict(h.rope_parameters)
    rope_type, base = rope.pop("rope_type"), rope.pop("rope_theta")
    fraction = rope.pop("partial_rotary_factor", 1.0)
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}  # dynamic's L: block_size, as HF's
    return GPTConfig(
        block_size=h.max_position_embeddings, parallel_residual=h.use_parallel_residual, pos_encoding="rope",
        rope_base=base, rope_fraction=fraction, rope_scaling=scaling, **common,
    )  # fmt: skip


def from_hf(hf_model) -> GPT:
    """The GPT (eval mode) that computes what a transformers GPTNeoXForCausalLM or GPT2LMHeadModel does."""
    config = gpt_config_from_hf(hf_model.config)
    architecture = IMPORTABLE[hf_model.config.model_type]
    theirs = hf_model.state_dict()
    weights = {}
    for module, hf_module in module_names(architecture, config.n_layer).items():
        for kind in ("weight", "bias"):
            if f"{hf_module}.{kind}" not in theirs:
                continue
            tensor = theirs[f"{hf_module}.{kind}"]
            if is_conv1d(architecture, module) and kind == "weight":
                tensor = tensor.t()
            if module.endswith("attn.c_attn") and architecture == "GPTNeoXForCausalLM":
                tensor = qkv_from_neox(tensor, config.n_head)
            weights[f"{module}.{kind}"] = tensor.float().contiguous()
    model = GPT(config)
    model.load_state_dict(weights)
    return model.eval()


def tokenizer_spec_from_hf(hf_dir: str, eos_token_id: int | None) -> dict:
    """The ropegpt tokenizer spec of a directory's tokenizer: {"kind": "gpt2"} for GPT-2's own (the shipped ranks,
    so GPT-2 BPE datasets in data/ match it), else its tokenizer.json with the end-of-text id."""
    transformers = hf_libraries()
    valid = "valid: a directory with tokenizer.json, or GPT-2's vocab.json and merges.txt"
    if not any(os.path.isfile(os.path.join(hf_dir, name)) for name in ("tokenizer.json", "vocab.json")):
        raise ValueError(f"{hf_dir!r} holds no tokenizer; {valid}")  # AutoTokenizer would build an empty one
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir).backend_tokenizer
    except Exception as e:  # the tokenizers library raises plain Exceptions for a malformed file
        raise ValueError(f"the tokenizer in {hf_dir!r} does not load ({type(e).__name__}); {valid}") from None
    if eos_token_id == GPT2_EOT and tokenizer.get_vocab() == gpt2_vocab_and_merges()[0]:
        return {"kind": "gpt2"}
    return {"kind": "hf", "json": tokenizer.to_str(), "eot": eos_token_id}


def import_hf(hf_dir: str, out: str) -> str:
    """Write a local transformers directory as out/ckpt.pt (atomically); returns its path. Every check (the
    architecture, its settings, the files, the shapes) runs before the checkpoint is written."""
    transformers = hf_libraries()
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ValueError(f"{hf_dir!r} holds no config.json; valid: a local Hugging Face model directory")
    hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
    gpt_config_from_hf(hf_config)
    if not any(os.path.isfile(os.path.join(hf_dir, name)) for name in WEIGHT_FILES):
        raise ValueError(f"{hf_dir!r} holds no weights; valid: a directory with one of {', '.join(WEIGHT_FILES)}")
    spec = tokenizer_spec_from_hf(hf_dir, hf_config.eos_token_id)
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir,
        dtype=torch.float32,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported here, in a line
    )
    valid = "valid: the weights saved with its config.json"
    if info["missing_keys"]:
        raise ValueError(f"the weights in {hf_dir!r} lack {sorted(info['missing_keys'])[0]}; {valid}")
    if info["mismatched_keys"]:
        name, saved, wanted = sorted(info["mismatched_keys"])[0]
        raise ValueError(f"{name} in {hf_dir!r} has shape {list(saved)}, its config.json {list(wanted)}; {valid}")
    model = from_hf(hf_model)
    checkpoint = {
        "model": model.state_dict(),
        "model_args": asdict(model.config),
        "iter_num": 0,
        "config": {"init_from": hf_dir, "dataset": ""},
        "tokenizer": spec,
    }
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ckpt.pt")
    save_checkpoint(path, checkpoint)
    return path


USAGE = "python convert.py export --ckpt CKPT --out DIR, or python convert.py import DIR --out OUT_DIR"


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """(command, {option: value}) of `export --ckpt CKPT --out DIR` or `import DIR --out OUT_DIR`."""
    if not argv or argv[0] not in ("export", "import"):
        raise ValueError(f"unknown command {argv[:1]}; valid: {USAGE}")
    command, rest, options = argv[0], argv[1:], {}
    if command == "import" and rest and not rest[0].startswith("--"):
        options["dir"], rest = rest[0], rest[1:]
    while rest:
        key, _, value = rest[0].removeprefix("--").partition("=")
        if not value and len(rest) > 1:
            value, rest = rest[1], rest[1:]
        options[key], rest = value, rest[1:]
    wanted = {"export": {"ckpt", "out"}, "import": {"dir", "out"}}[command]
    if set(options) != wanted or not all(options.values()):
        raise ValueError(f"{command} got {sorted(options)}; valid: {USAGE}")
    return command, options


def main(argv: list[str]) -> None:
    try:
        command, options = parse_args(argv)
        if command == "export":
            export(options["ckpt"], options["out"])
            print(f"wrote {options['out']}: config.json, model.safetensors, tokenizer files")
        else:
            print(f"wrote {import_hf(options['dir'], options['out'])}")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
