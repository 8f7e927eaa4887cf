"""configurator.py: config files and --key=value overrides applied in order, literal parsing,
every bad setting a one-line ConfigError naming the value and what would be valid, and --help
built from the scripts' own DEFAULTS, every setting with its default and its description."""

import importlib

import pytest
import torch
from conftest import run_script

from configurator import (
    ConfigError,
    check_device,
    configure,
    describe_settings,
    format_default,
    help_text,
    wants_help,
)

DEFAULTS = dict(out_dir="out", batch_size=12, learning_rate=1e-3, compile=False, dtype="auto", rope_scaling=None)


def config_file(tmp_path, text: str, name: str = "cfg.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def one_line_error(argv: list[str], *fragments: str) -> str:
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, argv)
    message = str(e.value)
    assert "\n" not in message and "valid" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_files_and_overrides_apply_in_order(tmp_path):
    path = config_file(
        tmp_path,
        "import math\nbatch_size = 2 ** 5\nout_dir = 'out/' + dtype\n_scratch = 1\ndef helper():\n    return 1\n",
    )
    assert configure(DEFAULTS, [path]) == {**DEFAULTS, "batch_size": 32, "out_dir": "out/auto"}
    assert configure(DEFAULTS, [path, "--batch_size=8"])["batch_size"] == 8
    assert configure(DEFAULTS, ["--batch_size=8", path])["batch_size"] == 32
    assert DEFAULTS["batch_size"] == 12  # the defaults are copied, never changed


def test_a_config_file_can_build_on_another(tmp_path):
    config_file(tmp_path, "batch_size = 20\nlearning_rate = 3e-4\n", "base.py")
    path = config_file(
        tmp_path, "import os\nexec(open(os.path.join(os.path.dirname(__file__), 'base.py')).read())\nbatch_size = 40\n"
    )
    cfg = configure(DEFAULTS, [path])
    assert cfg["batch_size"] == 40 and cfg["learning_rate"] == 3e-4


def test_override_values_are_parsed_as_literals():
    cfg = configure(
        DEFAULTS,
        [
            "--batch_size=32",
            "--learning_rate=1",
            "--compile=True",
            "--dtype=float32",
            "--out_dir=123",
            "--rope_scaling={'rope_type': 'linear', 'factor': 2.0}",
        ],
    )
    assert cfg["batch_size"] == 32 and type(cfg["batch_size"]) is int
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float  # an int where a float is due
    assert cfg["compile"] is True and cfg["dtype"] == "float32"
    assert cfg["out_dir"] == "123"  # a string setting keeps the text
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_unknown_setting_on_the_command_line():
    message = one_line_error(["--batchsize=8"], "'batchsize'", "did you mean 'batch_size'?")
    assert message.endswith("valid: batch_size, compile, dtype, learning_rate, out_dir, rope_scaling")


def test_unknown_setting_in_a_config_file(tmp_path):
    one_line_error(
        [config_file(tmp_path, "learning_rat = 0.1\n")],
        "'learning_rat'",
        "did you mean 'learning_rate'?",
        "valid: batch_size, compile",
    )


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--batch_size=1.5"], ["batch_size=1.5", "float", "valid: a value of type int", "12"]),
        (["--batch_size=big"], ["batch_size='big'", "str", "int"]),
        (["--compile=1"], ["compile=1", "int", "bool", "False"]),
        (["--learning_rate=fast"], ["learning_rate='fast'", "str", "float"]),
        (["--batch_size=None"], ["batch_size=None", "NoneType", "int"]),
    ],
)
def test_wrong_type_on_the_command_line(argv, fragments):
    one_line_error(argv, *fragments)


def test_wrong_type_in_a_config_file(tmp_path):
    one_line_error([config_file(tmp_path, "batch_size = '12'\n")], "batch_size='12'", "str", "int")
    one_line_error([config_file(tmp_path, "compile = None\n")], "compile=None", "bool")


def test_argument_without_value_and_missing_file(tmp_path):
    one_line_error(["--batch_size"], "'--batch_size'", "--batch_size=VALUE")
    missing = str(tmp_path / "nope.py")
    one_line_error([missing], missing, "does not exist")


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("x = (\n", ["SyntaxError", "never closed"]),
        ("batch_size = undefined_name\n", ["NameError", "undefined_name"]),
        ("raise RuntimeError('bad\\nconfig')\n", ["RuntimeError: bad"]),
    ],
)
def test_a_config_file_that_fails_is_a_one_line_error(tmp_path, text, fragments):
    path = config_file(tmp_path, text)
    one_line_error([path], path, *fragments)


def test_check_device():
    check_device("cpu")
    check_device("auto", auto=True)
    for bad, valid in [
        ("auto", "valid: cpu, cuda, cuda:N, mps"),
        ("tpu", "valid: cpu"),
        ("cuda:x", "cuda:N"),
        ("cpu:0", "cuda:N"),
    ]:
        with pytest.raises(ConfigError) as e:
            check_device(bad)
        assert f"device={bad!r} is not valid" in str(e.value) and valid in str(e.value)
    absent = f"cuda:{torch.cuda.device_count() + 7}"
    with pytest.raises(ConfigError) as e:
        check_device(absent, auto=True)
    assert f"device={absent!r} is not available" in str(e.value) and "valid: auto, cpu" in str(e.value)


def test_key_space_value_equals_key_equals_value(tmp_path):
    path = config_file(tmp_path, "batch_size = 20\n")
    spaced = configure(DEFAULTS, ["--out_dir", "out/x", path, "--batch_size", "8", "--compile", "True"])
    assert spaced == configure(DEFAULTS, ["--out_dir=out/x", path, "--batch_size=8", "--compile=True"])
    assert spaced["batch_size"] == 8 and spaced["compile"] is True and spaced["out_dir"] == "out/x"
    one_line_error(["--out_dir"], "'--out_dir' has no value", "--out_dir=VALUE")
    one_line_error(["--out_dir", "--batch_size=3"], "'--out_dir' has no value")


# --- --help ---------------------------------------------------------------------------------------

SCRIPT = """\"\"\"Do a thing.

    python thing.py --batch_size=3

More words, not shown by --help.
\"\"\"

DEFAULTS = dict(
    # I/O
    out_dir="out",  # where things go
    batch_size=12,  # rows per batch
    scalings=(
        {"rope_type": "linear"},
    ),  # tried in turn
    # the model: a long section heading
    # on two lines
    learning_rate=1e-3,  # the peak rate
    compile=False,
    tag="a b",  # first-line comment
)
"""


def test_help_flags_anywhere_but_as_a_value():
    assert wants_help(["--help"]) and wants_help(["-h"]) and wants_help(["cfg.py", "--batch_size=3", "-h"])
    assert wants_help(["--batch_size", "3", "--help"]) and wants_help(["--out_dir", "--help"])
    assert not wants_help(["--start", "-h"])  # the value of --start
    assert not wants_help(["--batch_size=3", "cfg.py", "--helpful=1"])


def test_descriptions_and_headings_come_from_the_scripts_defaults(tmp_path):
    path = config_file(tmp_path, SCRIPT, "thing.py")
    assert describe_settings(path) == [
        ("out_dir", "I/O", "where things go"),
        ("batch_size", "", "rows per batch"),
        ("scalings", "", "tried in turn"),  # a value over several lines: the comment on its last line
        ("learning_rate", "the model: a long section heading on two lines", "the peak rate"),
        ("compile", "", ""),
        ("tag", "", "first-line comment"),
    ]


def test_help_text_lists_every_setting_with_its_default(tmp_path, capsys):
    path = config_file(tmp_path, SCRIPT, "thing.py")
    defaults = dict(
        out_dir="out",
        batch_size=12,
        scalings=({"rope_type": "linear"},),
        learning_rate=1e-3,
        compile=False,
        tag="a b",
        extra="",
    )
    with pytest.raises(SystemExit) as e:
        configure(defaults, ["--batch_size=3", "--help"], script=path)
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text == help_text(defaults, path) + "\n"
    lines = text.splitlines()
    assert lines[:3] == ["Do a thing.", "", "    python thing.py --batch_size=3"] and "More words" not in text
    assert "I/O" in lines and "the model: a long section heading on two lines" in lines
    assert [line for line in lines if line.startswith("  --batch_size=12 ")][0].endswith("  rows per batch")
    for shown in (
        "--out_dir=out ",
        "--learning_rate=0.001 ",
        "--compile=False",
        "--tag='a b' ",
        "--extra=''",
        "--scalings=({'rope_type': 'linear'},)",
    ):
        assert any(line.startswith("  " + shown) for line in lines), shown
    assert format_default("out") == "out" and format_default("") == "''" and format_default(None) == "None"


SCRIPTS = ("train", "sample", "eval_length")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_setting_of_every_script_has_a_description(name):
    module = importlib.import_module(name)
    described = describe_settings(module.__file__)
    assert [key for key, _, _ in described] == list(module.DEFAULTS)
    assert not [key for key, _, text in described if not text], f"{name}.py: settings without a description"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_0_and_names_every_setting_with_its_default(name):
    module = importlib.import_module(name)
    result = run_script(f"{name}.py", "--help")
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == module.__doc__.splitlines()[0]  # the script's docstring opens the help
    descriptions = {key: text for key, _, text in describe_settings(module.__file__)}
    for key, value in module.DEFAULTS.items():
        shown = f"  --{key}={format_default(value)}"
        at = [i for i, line in enumerate(lines) if line == shown or line.startswith(shown + " ")]
        assert at, shown
        assert descriptions[key] in " ".join(lines[at[0] : at[0] + 2]), key  # the description beside or below
    if name == "train":
        assert run_script("train.py", "-h", "config/rope_shakespeare.py").stdout == result.stdout
        assert "--batch_size=12 " in result.stdout and "--out_dir=out " in result.stdout
