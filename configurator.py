"""Settings from plain-Python config files and --key=value overrides, nanoGPT's way, but strict.

    python train.py config/rope_shakespeare.py --batch_size=32 --compile=False

Each config file is executed as Python and may set any of the script's settings; each
--key=value is parsed as a Python literal when it is one, else taken as a string. A key the
script does not have, or a value whose type differs from the default's, is an error that names
the key and what would be valid, raised before any work starts.

--help (or -h) prints the script's usage and every setting with its default and description, then
exits. The descriptions come from the script itself: the comment that ends each setting's line in
its `DEFAULTS = dict(...)`, and the comment lines between settings as section headings.
"""

from __future__ import annotations

import ast
import difflib
import io
import os
import textwrap
import tokenize
from ast import literal_eval

HELP_FLAGS = ("--help", "-h")


class ConfigError(ValueError):
    """A bad setting: the message is one line, fit to show the user as it is."""


def _check_type(key: str, value, default):
    if default is None:  # a setting that is off by default (rope_scaling): its user validates it
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    if type(value) is type(default):
        return value
    raise ConfigError(
        f"{key}={value!r} is of type {type(value).__name__}; "
        f"valid: a value of type {type(default).__name__}, like the default {default!r}"
    )


def check_device(device: str, auto: bool = False) -> None:
    """Raise a ConfigError unless device is cpu, cuda, cuda:N or mps (or auto, where the script
    picks one) and this machine has it: torch's own errors for these are tracebacks."""
    import torch

    valid = ("auto, " if auto else "") + "cpu, cuda, cuda:N, mps"
    if auto and device == "auto":
        return
    kind, colon, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (colon and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"device={device!r} is not valid; valid: {valid}")
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not present[kind] or (colon and int(index) >= torch.cuda.device_count()):
        have = (
            ["auto"] * auto
            + [k for k, ok in present.items() if ok]
            + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        )
        raise ConfigError(f"device={device!r} is not available on this machine; valid: {', '.join(have)}")


def _unknown(key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown setting {key!r}{hint}; valid: {', '.join(sorted(valid))}")


def takes_value(arg: str, rest: list[str]) -> bool:
    """Whether the word after arg is its value: `--key value`, as argparse users type it."""
    return arg.startswith("--") and "=" not in arg and bool(rest) and not rest[0].startswith("--")


def wants_help(argv: list[str]) -> bool:
    """Whether argv asks for --help or -h (other than as the value of a `--key value` pair)."""
    i = 0
    while i < len(argv):
        if argv[i] in HELP_FLAGS:
            return True
        i += 2 if takes_value(argv[i], argv[i + 1 :]) else 1
    return False


def _defaults_call(tree: ast.Module) -> ast.Call | None:
    """The `DEFAULTS = dict(...)` call at the top level of a module, if any."""
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "DEFAULTS" for t in node.targets)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "dict"
        ):
            return node.value
    return None


def describe_settings(script: str) -> list[tuple[str, str, str]]:
    """(key, heading, description) for each setting of the script's `DEFAULTS = dict(...)`, in order.

    description: the comment that ends the setting's last line, else its first line ("" if none);
    heading: the comment lines just above the setting, joined ("" if none), such as "I/O" from "# I/O".
    """
    with open(script, encoding="utf-8") as f:
        source = f.read()
    call = _defaults_call(ast.parse(source))
    if call is None:
        return []
    trailing, whole = {}, {}  # line number -> comment text, for comments after code and on their own line
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            own_line = not token.line[: token.start[1]].strip()
            (whole if own_line else trailing)[token.start[0]] = token.string.lstrip("#").strip()
    out, previous_end = [], call.lineno
    for keyword in call.keywords:
        if keyword.arg is None:  # **other: no settings of its own to describe
            continue
        first, last = keyword.lineno, keyword.value.end_lineno
        heading = " ".join(whole[n] for n in range(previous_end + 1, first) if n in whole)
        out.append((keyword.arg, heading, trailing.get(last) or trailing.get(first, "")))
        previous_end = last
    return out


def _usage(script: str) -> str:
    """The head of the script's docstring: its paragraphs up to and including the first indented
    (usage) block, or only the first paragraph where there is none."""
    with open(script, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    paragraphs = [p for p in doc.split("\n\n") if p.strip()]
    for i, paragraph in enumerate(paragraphs):
        if all(line.startswith(" ") for line in paragraph.splitlines()):
            return "\n\n".join(paragraphs[: i + 1])
    return paragraphs[0] if paragraphs else ""


def format_default(value) -> str:
    """A value as one would type it after --key=: a string without spaces bare, anything else as a literal."""
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    return repr(value)


def help_text(defaults: dict, script: str | None = None) -> str:
    """The --help text: the script's usage, then one line per setting, `  --key=DEFAULT  description`,
    under the section headings of the script's DEFAULTS."""
    described = describe_settings(script) if script else []
    rows = [(key, heading, text) for key, heading, text in described if key in defaults]
    rows += [(key, "", "") for key in defaults if key not in {r[0] for r in rows}]
    lefts = {key: f"  --{key}={format_default(defaults[key])}" for key, _, _ in rows}
    column = min(max(map(len, lefts.values()), default=0), 36) + 2
    lines = [_usage(script), ""] if script else []
    lines.append("Settings, with their defaults; set them as --key=value or in a config file (plain Python):")
    for key, heading, text in rows:
        if heading:
            lines += ["", *textwrap.wrap(heading, 100)]
        left = lefts[key]
        if len(left) + 2 > column and text:
            lines += [left, " " * column + text]
        else:
            lines.append(f"{left.ljust(column)}{text}".rstrip())
    return "\n".join(lines)


def configure(defaults: dict, argv: list[str], script: str | None = None) -> dict:
    """Apply config files and --key=value (or --key value) overrides in argv, in order, to a copy of defaults.

    With --help or -h in argv: print help_text(defaults, script) and exit 0. script is the path of
    the file holding `DEFAULTS = dict(...)` (its __file__), where the descriptions are read.
    """
    if wants_help(argv):
        print(help_text(defaults, script))
        raise SystemExit(0)
    config = dict(defaults)
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if takes_value(arg, argv):
            arg = f"{arg}={argv.pop(0)}"
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(
                    f"config file {arg!r} does not exist; valid: a path such as config/rope_shakespeare.py"
                )
            namespace = dict(config)
            with open(arg) as f:
                source = f.read()
            try:
                # __file__ lets one config build on another:
                # exec(open(os.path.join(os.path.dirname(__file__), ...)).read())
                exec(compile(source, arg, "exec"), {"__file__": arg}, namespace)
            except Exception as e:  # a config file is a user's Python: report its error, not a traceback
                message = (str(e).strip().splitlines() or [""])[0]
                raise ConfigError(
                    f"config file {arg!r} failed: {type(e).__name__}: {message}; valid: plain Python that sets settings"
                ) from None
            for key, value in namespace.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                if key not in defaults:
                    raise _unknown(key, defaults)
                config[key] = _check_type(key, value, defaults[key])
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"argument {arg!r} has no value; valid: --{key}=VALUE or --{key} VALUE")
            if key not in defaults:
                raise _unknown(key, defaults)
            try:
                value = literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = text  # --out_dir=123 is the string "123"
            config[key] = _check_type(key, value, defaults[key])
    return config
