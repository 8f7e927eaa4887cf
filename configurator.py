"""Settings from plain-Python config files and --key=value overrides, nanoGPT's way, but strict.

    python train.py config/rope_shakespeare.py --batch_size=32 --compile=False

Each config file is executed as Python and may set any of the script's settings; each
--key=value is parsed as a Python literal when it is one, else taken as a string. A key the
script does not have, or a value whose type differs from the default's, is an error that names
the key and what would be valid, raised before any work starts.
"""

from __future__ import annotations

import difflib
import os
from ast import literal_eval


class ConfigError(ValueError):
    """A bad setting: the message is one line, fit to show the user as it is."""


def _check_type(key: str, value, default):
    if default is None:  # a setting that is off by default (rope_scaling): its user validates it
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    if type(value) is type(default):
        return value
    raise ConfigError(f"{key}={value!r} is of type {type(value).__name__}; valid: a value of type {type(default).__name__}, like the default {default!r}")


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
        have = ["auto"] * auto + [k for k, ok in present.items() if ok] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        raise ConfigError(f"device={device!r} is not available on this machine; valid: {', '.join(have)}")


def _unknown(key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown setting {key!r}{hint}; valid: {', '.join(sorted(valid))}")


def configure(defaults: dict, argv: list[str]) -> dict:
    """Apply config files and --key=value (or --key value) overrides in argv, in order, to a copy of defaults."""
    config = dict(defaults)
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if arg.startswith("--") and "=" not in arg and argv and not argv[0].startswith("--"):
            arg = f"{arg}={argv.pop(0)}"  # --key value, as argparse users type it
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} does not exist; valid: a path such as config/rope_shakespeare.py")
            namespace = dict(config)
            with open(arg) as f:
                source = f.read()
            try:
                # __file__ lets one config build on another: exec(open(os.path.join(os.path.dirname(__file__), ...)).read())
                exec(compile(source, arg, "exec"), {"__file__": arg}, namespace)
            except Exception as e:  # a config file is a user's Python: report its error, not a traceback
                message = (str(e).strip().splitlines() or [""])[0]
                raise ConfigError(f"config file {arg!r} failed: {type(e).__name__}: {message}; valid: plain Python that sets settings") from None
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
