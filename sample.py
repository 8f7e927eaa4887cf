"""Generate from a trained GPT with a KV cache: the importable generate(model, prompts, ...) and the
command line, which prints text as it is generated.

    python sample.py --ckpt out/rope_shakespeare/ckpt.pt --start="ROMEO:" --num_samples=2
    python sample.py --out_dir=out/rope_shakespeare --start=FILE:prompts.txt --temperature=0.8
    python sample.py --ckpt out/rope_shakespeare/ckpt.pt --max_new_tokens=2000 --cache_policy=window

--start=FILE:path reads several prompts, one per line (blank lines skipped, \\n inside a line
stands for a newline), generated together as one left-padded batch. A single sample is printed
as it is generated, several once they are done. Works with nanoGPT checkpoints too.

How generation runs (generate): the prompts are prefilled into a KVCache, then each new token is fed
at its position. Past block_size, learned crops to the last block_size tokens (nanoGPT's way),
sinusoidal and none run on, and rope and alibi follow cache_policy: "full" (every token: for context
extension with rope_scaling), "window" (the last `window` tokens) or "sinks" (the first n_sink
tokens and the most recent ones: StreamingLLM's attention sinks, Xiao et al. 2023,
arXiv:2309.17453); by default sinks, or full for a model with sliding or chunked layers, whose ring
buffers hold their windows already (eviction would move their keys). Under window and sinks,
positions are taken within the window (the sinks keep 0..n_sink−1), so RoPE keys are cached
unrotated and turned as read; nothing changes until a row outgrows the window. A length-dependent
RoPE (dynamic NTK, LongRoPE) prefills the context again when its frequencies change with the length:
every layer's state of every earlier token depends on them, so only that keeps cached decoding equal
to a full forward (in a batch the longest row's length sets them), so past its original length it
decodes at the speed of cache=False. compile=True runs each decode step as one graph (torch.compile;
CUDA graphs on CUDA), gpt-fast's way: the step reads every slot of the cache under the mask, so
shapes do not change from step to step; prefills, learned's re-prefills and evictions stay eager. A
bfloat16 cache_dtype under a float32 model halves the bytes a step reads, and attention over it runs
in bf16.
"""

import os
import sys
from collections.abc import Iterator

import torch

from attention import KVCache
from configurator import ConfigError, check_device, configure
from data.tokenizer import load_tokenizer, tokenizer_spec
from model import GPT
from train import load_checkpoint

DEFAULTS = dict(
    ckpt="",  # path to a ckpt.pt; "" reads out_dir/ckpt.pt
    out_dir="out",  # where the checkpoint is when ckpt is ""
    start="\n",  # the prompt, or FILE:path with one prompt per line
    num_samples=1,  # samples per prompt
    max_new_tokens=500,  # tokens generated after each prompt
    temperature=0.8,  # 0 is greedy
    top_k=200,  # keep the k most likely tokens; 0 keeps all
    top_p=1.0,  # keep the smallest set of tokens whose probability reaches p (nucleus); 1.0 keeps all
    seed=1337,  # seeds the sampling generator
    device="cpu",  # cpu, cuda, cuda:N or mps
    rope_scaling=None,  # a context-extension variant applied at inference, e.g. {'rope_type': 'linear', 'factor': 2.0}
    cache=True,  # KV cache; False recomputes the whole context at every step (nanoGPT's way), same tokens
    cache_policy="",  # what rope and alibi keep past the window: full, window or sinks; "" the model's default
    window=0,  # tokens the window and sinks policies keep; 0 means block_size
    n_sink=4,  # first tokens the sinks policy keeps
    cache_dtype="",  # the KV cache's dtype: "" is the model's (exact); bfloat16 halves it (tokens may differ)
    compile=False,  # run each decode step as one torch.compile graph (CUDA graphs on CUDA); the first compiles
)
SEPARATOR = "\n---------------\n"
CACHE_POLICIES = ("full", "window", "sinks")
CACHE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from (B, vocab) logits, (B, 1); temperature 0 is greedy (argmax).

    top_k keeps the k most likely tokens; top_p keeps the smallest set whose probability reaches
    p (nucleus sampling, Holtzman et al. 2019), always at least the most likely token.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


def kept_context(tokens: list[int], capacity: int, n_sink: int = 0) -> list[int]:
    """The tokens a context of `capacity` tokens keeps: all of them while they fit, else the
    first n_sink and the most recent capacity − n_sink (n_sink = 0: a sliding window)."""
    if len(tokens) <= capacity:
        return tokens
    return tokens[:n_sink] + tokens[len(tokens) - capacity + n_sink :]


def context_limits(
    model: GPT, longest: int, cache_policy: str = "", window: int | None = None, n_sink: int = 4
) -> tuple[int, int, str | None]:
    """(capacity, n_sink, on_full) of the context for rows of at most `longest` tokens: how many
    tokens it holds, how many first tokens are kept as sinks, and what happens once a row has
    filled it: "evict" (window, sinks), "recompute" (learned's crop) or None (never full)."""
    encoding = model.transformer.wpe
    rings = any(model.config.span(layer_type) for _, layer_type in model.config.layers())
    cache_policy = cache_policy or ("full" if rings else "sinks")
    if cache_policy not in CACHE_POLICIES:
        raise ValueError(f"unknown cache_policy {cache_policy!r}; valid: {', '.join(CACHE_POLICIES)}")
    window = model.config.block_size if window is None else window
    n_sink = n_sink if cache_policy == "sinks" else 0
    if not 0 <= n_sink < window:
        raise ValueError(f"window={window} with n_sink={n_sink}; valid: 0 ≤ n_sink < window")
    if encoding.max_positions is not None:
        return encoding.max_positions, 0, "recompute"
    if encoding.relative and cache_policy != "full" and longest > window:
        if rings:
            valid = "cache_policy='full': their ring buffers already hold only the window"
            raise ValueError(f"cache_policy {cache_policy!r} evicts keys of sliding or chunked layers; valid: {valid}")
        return window, n_sink, "evict"
    return longest, 0, None


def generate(
    model: GPT,
    prompts: torch.Tensor | list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
    cache: bool = True,
    cache_policy: str = "",
    window: int | None = None,
    n_sink: int = 4,
    cache_dtype: torch.dtype | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Sample up to max_new_tokens tokens after each prompt, yielding every row's next token, (B, 1).

    prompts: a (B, T) tensor, or B lists of token ids of any lengths (left-padded together, each
    row then equal to generating its prompt alone). temperature (0: greedy), top_k, top_p and
    generator as in sample_next_token. A row ends at stop_token: it yields stop_token from then
    on, and generation ends once every row has ended. cache=False runs a full forward over each
    row's kept context at every step and draws the same tokens; once a row has outgrown a window
    the two part (StreamingLLM's "sliding window with re-computation" against the cache, whose
    deeper layers still carry evicted tokens). cache_dtype: the KVCache's, by default the model's.
    Every setting is checked here, before the first step. What it yields are inference tensors
    (clone() them outside it to use them in autograd).
    """
    rows = prompts.tolist() if torch.is_tensor(prompts) else [list(map(int, p)) for p in prompts]
    if not rows or not all(rows):
        raise ValueError("generate got an empty prompt; valid: one or more prompts of at least one token each")
    vocab = model.config.vocab_size
    outside = next((t for row in rows for t in row if not 0 <= t < vocab), None)
    if outside is not None:
        raise ValueError(f"prompt token {outside} is outside the vocabulary; valid: ids from 0 to {vocab - 1}")
    if (
        max_new_tokens < 0
        or temperature < 0
        or (top_k is not None and top_k < 1)
        or not (top_p is None or 0 < top_p <= 1)
    ):
        raise ValueError(
            f"max_new_tokens={max_new_tokens}, temperature={temperature}, top_k={top_k}, top_p={top_p}; "
            "valid: max_new_tokens ≥ 0, temperature ≥ 0, top_k ≥ 1 or None, 0 < top_p ≤ 1 or None"
        )
    context = context_limits(model, max(map(len, rows)) + max_new_tokens, cache_policy, window, n_sink)
    cache_dtype = model.lm_head.weight.dtype if cache_dtype is None else cache_dtype
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype {cache_dtype} is not valid; valid: None (the model's) or one of {CACHE_DTYPES}")
    if compile and not cache:
        raise ValueError("compile=True compiles the cached decode step, but cache=False; valid: cache=True")
    if compile and model.transformer.wpe.length_dependent:
        raise ValueError(
            f"compile=True with rope_scaling {model.config.rope_scaling}, whose frequencies depend on the length; "
            "valid: compile=False, or a variant that does not (linear, ntk, yarn, llama3)"
        )
    sampling = (temperature, top_k, top_p, generator)
    return generated_tokens(model, rows, max_new_tokens, sampling, stop_token, cache, context, cache_dtype, compile)


@torch.inference_mode()  # no_grad that also skips version counters and view tracking (BENCHMARKS.md)
def generated_tokens(model, rows, max_new_tokens, sampling, stop_token, cache, context, cache_dtype, compile):
    """generate's loop, once its settings are checked: rows grow by the tokens drawn."""
    capacity, n_sink, on_full = context
    device = model.lm_head.weight.device
    done = torch.zeros(len(rows), 1, dtype=torch.bool, device=device)
    if cache:
        kv = KVCache(model.config, len(rows), capacity, cache_dtype, device, keys_rotated=on_full != "evict")
        logits, lengths = prefill(model, kv, rows, capacity, n_sink)
        step = compiled_decode_step(model) if compile else model
    for i in range(max_new_tokens):
        if not cache:  # a full forward over each row's kept context
            contexts = (torch.tensor([kept_context(row, capacity, n_sink)], device=device) for row in rows)
            logits = torch.cat([model(idx)[0][:, -1] for idx in contexts])
        token = sample_next_token(logits, *sampling)  # (B, 1)
        if stop_token is not None:
            token = token.masked_fill(done, stop_token)
            done |= token == stop_token
        yield token
        if i == max_new_tokens - 1 or (stop_token is not None and bool(done.all())):  # a host read only if rows end
            return
        for row, t in zip(rows, token.flatten().tolist()):
            row.append(t)
        if cache:
            logits, lengths = decode(model, kv, rows, lengths, token, context, step)


def prefill(model: GPT, kv: KVCache, rows: list[list[int]], capacity: int, n_sink: int) -> tuple[torch.Tensor, list]:
    """Fill kv with every row's kept context, left-padded: (last logits (B, V), context lengths)."""
    kv.reset()
    contexts = [kept_context(row, capacity, n_sink) for row in rows]
    T = max(map(len, contexts))
    device = kv.rows.device
    idx = torch.tensor([[0] * (T - len(c)) + c for c in contexts], device=device)
    positions = torch.tensor([list(range(len(c) - T, len(c))) for c in contexts], device=device)  # < 0: padding
    return model(idx, positions=positions, cache=kv)[0][:, -1], [len(c) for c in contexts]


def decode(model: GPT, kv: KVCache, rows, lengths: list[int], token: torch.Tensor, context: tuple, step):
    """Feed every row's newest token (B, 1) at its position through step (the model, or
    compiled_decode_step's): (logits (B, V), context lengths). A full row first evicts (sinks,
    window); learned's crop and a length-dependent RoPE whose frequencies change prefill again."""
    capacity, n_sink, on_full = context
    new_lengths = [min(n + 1, capacity) for n in lengths]
    cropped = on_full == "recompute" and max(lengths) == capacity
    if cropped or model.transformer.wpe.changes_between(max(lengths), max(new_lengths)):
        return prefill(model, kv, rows, capacity, n_sink)
    full = [b for b, n in enumerate(lengths) if n == capacity]
    if full:
        evict(kv, torch.tensor(full, device=token.device), n_sink)
    positions = torch.tensor(new_lengths, device=token.device).unsqueeze(1) - 1  # (B, 1)
    logits = step(token, positions=positions, cache=kv)[0][:, -1]
    # a CUDA graph's outputs are overwritten by its next replay: keep a copy of what is sampled from
    return (logits if step is model else logits.clone()), new_lengths


def evict(kv: KVCache, rows: torch.Tensor, n_sink: int) -> None:
    """StreamingLLM's step once a row is full: drop its oldest key after the n_sink sinks and move
    the later ones down a slot, which frees slot max_len − 1. rows: (R,) long."""
    for buf in kv.k + kv.v:
        # buf[rows] is a copy (advanced indexing), so the overlapping move needs no clone
        buf[rows, :, n_sink : kv.max_len - 1] = buf[rows, :, n_sink + 1 : kv.max_len]


def compiled_decode_step(model: GPT) -> torch.nn.Module:
    """The model under torch.compile for one-token steps against a KVCache: one graph (fullgraph),
    on CUDA with mode="reduce-overhead" (CUDA graphs: one launch per step). Compiled code is cached
    with the forward's, so later calls reuse it. Shapes are static at first; another cache length or
    batch compiles once more with those sizes symbolic (automatic dynamic shapes), a graph that
    serves every size after it, where dynamic=False would compile each length anew and fail past
    torch._dynamo's recompile limit."""
    mode = "reduce-overhead" if model.lm_head.weight.device.type == "cuda" else None
    return torch.compile(model, fullgraph=True, mode=mode)


def read_prompts(start: str) -> list[str]:
    """The prompts of --start: the text itself, or each non-blank line of FILE:path."""
    if not start.startswith("FILE:"):
        return [start]
    with open(start[5:], encoding="utf-8") as f:
        prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{start[5:]!r} holds no prompt; valid: a file with one prompt per line")
    return prompts


def parse_cache_dtype(name: str) -> torch.dtype | None:
    """--cache_dtype: "" for the model's dtype (None), else a dtype name such as bfloat16."""
    names = {str(dtype).removeprefix("torch."): dtype for dtype in CACHE_DTYPES}
    if name and name not in names:
        raise ConfigError(f"cache_dtype={name!r} is not valid; valid: '' (the model's) or one of {', '.join(names)}")
    return names.get(name)


def main(argv: list[str]) -> None:
    try:
        cfg = configure(DEFAULTS, argv, __file__)
        check_device(cfg["device"])
        if cfg["num_samples"] < 1:
            raise ConfigError(f"num_samples={cfg['num_samples']} is not valid; valid: a whole number of at least 1")
        cache_dtype = parse_cache_dtype(cfg["cache_dtype"])
        path = cfg["ckpt"] or os.path.join(cfg["out_dir"], "ckpt.pt")
        model, checkpoint = load_checkpoint(path, cfg["device"], cfg["rope_scaling"])
        spec = checkpoint.get("tokenizer") or tokenizer_spec(checkpoint.get("config", {}).get("dataset", ""))
        encode, decode_tokens, eot = load_tokenizer(spec)
        prompts = [encode(text) for text in read_prompts(cfg["start"])]
        if not all(prompts):
            raise ValueError("a prompt is empty; valid: at least one character")
        rows = [prompt for prompt in prompts for _ in range(cfg["num_samples"])]
        generator = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"])
        steps = generate(
            model,
            rows,
            cfg["max_new_tokens"],
            cfg["temperature"],
            cfg["top_k"] or None,
            cfg["top_p"],
            generator,
            stop_token=eot,
            cache=cfg["cache"],
            cache_policy=cfg["cache_policy"],
            window=cfg["window"] or None,
            n_sink=cfg["n_sink"],
            cache_dtype=cache_dtype,
            compile=cfg["compile"],
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    texts = [list(row) for row in rows]
    live = len(rows) == 1  # a single sample is printed as it grows
    shown = decode_tokens(texts[0]) if live else ""
    print(shown, end="", flush=True)
    for step in steps:
        for tokens, token in zip(texts, step.flatten().tolist()):
            if token != eot:  # once a row has ended, generate yields eot for it
                tokens.append(token)
        if live:
            text = decode_tokens(texts[0])
            print(text[len(shown) :], end="", flush=True)  # whole-text decode: BPE tokens can split a character
            shown = text
    if live:
        print(end=SEPARATOR)
    else:
        for tokens in texts:
            print(decode_tokens(tokens), end=SEPARATOR)


if __name__ == "__main__":
    main(sys.argv[1:])
