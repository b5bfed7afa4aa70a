"""Command-line overrides of a script's top constants, in the spirit of nanoGPT's configurator.py.

Every stage script keeps its settings as UPPERCASE constants at the top of the file. Calling

    cfg = configure(globals(), sys.argv[1:])

inside the script's main() turns each ``--NAME=value`` argument into an override of constant NAME:
the value is parsed as a Python literal when it can be (``--N_WORKERS=2``, ``--CROP=(400, 400)``),
otherwise it is kept as a string (``--DATASET=lidc``), and it must have the type of the default
(an int is accepted where a float is expected). Unknown names, bad types and arguments that are not
``--NAME=value`` are refused with one clear line (SystemExit), and so is a value outside the constant's
declared choices (``configure(globals(), argv, choices={"LUNG_MASK": ("refined", "thesis")})``), before the
script does any work. The effective constants are returned as a dict; ``save_config(cfg, folder)`` writes them beside a stage's output as ``config.json``.
"""
import ast
import json
import os
import sys


def constants(namespace):
    """The UPPERCASE constants of a module namespace (its settings), in definition order."""
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, list, type(None)))}


def _parse(name, text, default):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise SystemExit(f"--{name}: expected a bool (0/1/True/False), got {text!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        return text  # e.g. --SCANS=123 for a string constant
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if type(value) is not type(default):
        raise SystemExit(f"--{name}: expected {type(default).__name__}, got {text!r}")
    return value


_DEFAULTS = {}   # id(namespace) -> the constants as the file defines them (captured at the first call)


def configure(namespace, argv=None, choices=None):
    """Apply ``--NAME=value`` overrides to ``namespace`` (a script's globals()); return the effective constants.
    ``choices``: {NAME: allowed values} for constants that take one of a few values (checked after the overrides).

    Every call starts from the file's own values, so calling a script's main() twice in one process (tests,
    notebooks) never carries the first call's overrides into the second."""
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults = _DEFAULTS.setdefault(id(namespace), dict(constants(namespace)))
    namespace.update(defaults)
    known = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"argument {arg!r}: expected --NAME=value (NAME one of: {', '.join(known)})")
        name, text = arg[2:].split("=", 1)
        if name not in known:
            raise SystemExit(f"unknown setting --{name}; known: {', '.join(known)}")
        namespace[name] = _parse(name, text, known[name])
    for name, allowed in (choices or {}).items():
        if namespace[name] not in allowed:
            raise SystemExit(f"--{name}={namespace[name]}: expected one of {', '.join(map(str, allowed))}")
    return constants(namespace)


def save_config(cfg, folder, name="config.json"):
    """Write the effective constants as JSON into ``folder`` (created if needed); return the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    return path
