"""sample.py end to end on tiny checkpoints: the prompt and its continuation, seeds, FILE: prompts,
num_samples, greedy decoding against a full forward by hand, top_k / top_p limits, nanoGPT
checkpoints, and one-line errors for bad checkpoints and prompts."""

import pytest
import torch

import sample
from conftest import assert_one_line_error, run_script
from data.tokenizer import tokenizer_spec
from model import load_checkpoint

SEPARATOR = "\n---------------\n"


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


@pytest.mark.parametrize("limits", [["--temperature=0"], ["--temperature=1.0", "--top_k=1"],
                                    ["--temperature=1.5", "--top_k=0", "--top_p=0.01"]])
def test_greedy_and_tightest_limits_follow_the_argmax_of_a_full_forward(trained, capsys, limits):
    expected = greedy_by_hand(trained["ckpt"], "ROMEO:", 10)  # 16 tokens: the whole context fits the block
    for seed in (1, 2):
        assert sample_here(capsys, trained["ckpt"], "--start=ROMEO:", "--max_new_tokens=10", f"--seed={seed}", *limits) == [expected]


def test_a_nanogpt_checkpoint_samples(nanogpt_ckpt, char_data, capsys):
    """nanoGPT checkpoints carry no tokenizer: sample.py takes their dataset's meta.pkl."""
    samples = sample_here(capsys, nanogpt_ckpt["path"], "--start=ROMEO:", "--max_new_tokens=10", "--temperature=0")
    chars = tokenizer_spec("shakespeare_char")["chars"]
    assert samples == [greedy_by_hand(nanogpt_ckpt["path"], "ROMEO:", 10, chars)]


# --- one-line errors -----------------------------------------------------------------------------


def test_prompt_outside_the_vocabulary(trained):
    result = run_script("sample.py", f"--ckpt={trained['ckpt']}", "--start=Œdipus {}", check=False)
    assert_one_line_error(result, "'{}Œ'", "valid: any of")
    assert result.stdout == ""


@pytest.mark.parametrize("kind,fragment", [("truncated", "not a readable torch checkpoint"),
                                           ("text", "not a readable torch checkpoint"),
                                           ("foreign", "holds no 'model' and 'model_args'"),
                                           ("missing", "does not exist")])
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


@pytest.mark.parametrize("argv,fragments", [
    (["--device=gpu"], ["device='gpu'", "valid: cpu, cuda, cuda:N, mps"]),
    (["--num_samples=0"], ["num_samples=0", "at least 1"]),
    (["--temperature=-1"], ["temperature=-1.0", "temperature ≥ 0"]),
    (["--top_p=1.5"], ["top_p=1.5", "0 < top_p ≤ 1"]),
    (["--start=FILE:/no/such/prompt.txt"], ["/no/such/prompt.txt"]),
    (["--seeds=2"], ["'seeds'", "did you mean 'seed'?"]),
])
def test_bad_setting(argv, fragments, trained, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main([f"--ckpt={trained['ckpt']}", *argv])
    message = e.value.code
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert capsys.readouterr().out == ""
