"""data/: both Shakespeare preparations written into a temporary folder and checked against the
text itself, GPT-2's published token ids, the tokenizers and their vocabulary sizes, the batches
read from the token files, and train.py's data on first use."""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_TRAIN

import data
import eval_length
import train
from configurator import ConfigError
from data.dataset import data_paths, get_batch, sample_starts
from data.shakespeare.prepare import prepare as prepare_bpe
from data.shakespeare_char.prepare import prepare as prepare_char
from data.tokenizer import GPT2_EOT, gpt2_encoding, load_tokenizer, tokenizer_spec, vocab_size

TEXT = (REPO / "data" / "shakespeare_char" / "input.txt").read_text(encoding="utf-8")


def test_char_preparation(tmp_path):
    counts = prepare_char(out_dir=str(tmp_path))
    n = int(0.9 * len(TEXT))
    assert counts == {"vocab_size": 65, "train_tokens": n, "val_tokens": len(TEXT) - n}
    assert sorted(os.listdir(tmp_path)) == ["meta.pkl", "train.bin", "val.bin"]
    with open(tmp_path / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta["vocab_size"] == 65 and len(meta["itos"]) == 65
    assert "".join(meta["itos"][i] for i in range(65)) == "".join(sorted(set(TEXT)))
    assert all(meta["stoi"][c] == i for i, c in meta["itos"].items())
    for split, text in (("train", TEXT[:n]), ("val", TEXT[n:])):
        ids = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16)  # 2 bytes a token
        assert (tmp_path / f"{split}.bin").stat().st_size == 2 * len(text)
        assert "".join(meta["itos"][i] for i in ids.tolist()) == text


def test_gpt2_encoding_is_offline_and_gives_the_published_ids():
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("First Citizen:") == [5962, 22307, 25]
    assert enc.decode(enc.encode_ordinary(TEXT[:2000])) == TEXT[:2000]
    encode, decode, eot = load_tokenizer({"kind": "gpt2"})
    assert eot == GPT2_EOT == 50256 and encode("<|endoftext|>") == [50256]


def test_bpe_preparation_gives_nanogpts_counts(tmp_path):
    counts = prepare_bpe(out_dir=str(tmp_path))
    assert counts == {"vocab_size": 50257, "train_tokens": 301966, "val_tokens": 36059}
    train_ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val_ids = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert len(train_ids) == 301966 and len(val_ids) == 36059
    assert train_ids[:3].tolist() == [5962, 22307, 25]  # "First Citizen:"
    n = int(0.9 * len(TEXT))
    assert gpt2_encoding().decode(val_ids.tolist()) == TEXT[n:]


def test_char_tokenizer_round_trip_and_bad_characters():
    spec = {"kind": "char", "chars": "".join(sorted(set(TEXT)))}
    encode, decode, eot = load_tokenizer(spec)
    assert eot is None and decode(encode(TEXT[:500])) == TEXT[:500]
    with pytest.raises(ValueError) as e:
        encode("ROMEO: ¿qué? 1")
    message = str(e.value)
    assert "\n" not in message and "'1¿é'" in message and "valid: any of" in message


def test_tokenizer_spec_follows_the_dataset(char_data):
    spec = tokenizer_spec("shakespeare_char")
    assert spec == {"kind": "char", "chars": "".join(sorted(set(TEXT)))}
    assert tokenizer_spec("shakespeare") == {"kind": "gpt2"}  # no meta.pkl: GPT-2's BPE


def test_vocab_size_of_each_tokenizer():
    assert vocab_size({"kind": "char", "chars": "".join(sorted(set(TEXT)))}) == 65
    assert vocab_size({"kind": "gpt2"}) == 50304  # GPT-2's 50,257, padded up to a multiple of 64 as nanoGPT does


def test_batches_are_windows_and_their_next_tokens(tmp_path):
    path = str(tmp_path / "tokens.bin")
    np.arange(1000, dtype=np.uint16).tofile(path)  # token i is i: a window shows where it was read
    ix = torch.tensor([0, 7, 989])  # 989: the last window whose targets are all in the file
    x, y = get_batch(path, ix, 10, "cpu")
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, 10)
    assert torch.equal(x, ix[:, None] + torch.arange(10)) and torch.equal(y, x + 1)
    starts = sample_starts(path, 5000, 10, torch.Generator().manual_seed(0))
    assert starts.min() >= 0 and starts.max() <= 989  # every window has its next tokens
    again = sample_starts(path, 5000, 10, torch.Generator().manual_seed(0))
    assert torch.equal(starts, again)


def test_one_data_dir_for_every_reader():
    assert data.DATA_DIR == str(REPO / "data")
    for script in ("train.py", "eval_length.py", "bench.py", "data/tokenizer.py", "data/dataset.py"):
        assert "DATA_DIR =" not in (REPO / script).read_text(), script
    assert eval_length.data_paths is data_paths and train.data_paths is data_paths


@pytest.fixture
def unprepared_data(tmp_path, monkeypatch):
    """A copy of data/ with shakespeare_char's text and prepare.py but no .bin or meta.pkl,
    which train.py and the tokenizer read instead of the repository's."""
    folder = tmp_path / "data" / "shakespeare_char"
    folder.mkdir(parents=True)
    for name in ("input.txt", "prepare.py"):
        shutil.copy(REPO / "data" / "shakespeare_char" / name, folder / name)
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    return folder


def test_train_prepares_missing_data_on_first_use(unprepared_data, tmp_path):
    out_dir = tmp_path / "out"
    train.main(TINY_TRAIN + ["--max_iters=1", "--eval_interval=1", f"--out_dir={out_dir}"])
    assert sorted(os.listdir(unprepared_data)) == ["input.txt", "meta.pkl", "prepare.py", "train.bin", "val.bin"]
    n = int(0.9 * len(TEXT))
    assert (unprepared_data / "train.bin").stat().st_size == 2 * n
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert checkpoint["tokenizer"] == {"kind": "char", "chars": "".join(sorted(set(TEXT)))}
    assert checkpoint["model_args"]["vocab_size"] == 65


def test_missing_dataset_is_a_one_line_error(unprepared_data):
    with pytest.raises(ConfigError) as e:
        data_paths("shakespear_char")
    message = str(e.value)
    assert "\n" not in message and "'shakespear_char'" in message and "valid: shakespeare_char" in message
    (unprepared_data / "prepare.py").unlink()  # the data file is missing and nothing can make it
    with pytest.raises(ConfigError) as e:
        data_paths("shakespeare_char")
    assert "'shakespeare_char' has no train.bin/val.bin nor prepare.py" in str(e.value)


def test_data_shorter_than_a_block_is_a_one_line_error(unprepared_data):
    np.arange(100, dtype=np.uint16).tofile(unprepared_data / "train.bin")
    np.arange(10, dtype=np.uint16).tofile(unprepared_data / "val.bin")
    assert data_paths("shakespeare_char", block_size=9)
    with pytest.raises(ConfigError) as e:
        data_paths("shakespeare_char", block_size=10)
    message = str(e.value)
    assert "\n" not in message and "val.bin has 10 tokens" in message and "block_size=10" in message
    assert "valid: block_size below 10" in message
