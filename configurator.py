"""Command-line overrides of a script's top constants, in the spirit of nanoGPT's configurator.py.

Every stage script keeps its settings as UPPERCASE constants at the top of the file, each with a comment.
Calling

    cfg = configure(globals(), sys.argv[1:])

inside the script's main() reads them once into ``cfg``, a read-only ``Config`` (``cfg.WORK_DIR`` or
``cfg["WORK_DIR"]``) that the script passes down; the module's constants themselves are never changed. Each
``--NAME=value`` argument overrides constant NAME: the value is parsed as a Python literal when it can be
(``--N_WORKERS=2``, ``--CROP=(400, 400)``), otherwise it is kept as a string (``--DATASET=lidc``), and it must
have the type of the default (an int is accepted where a float is expected). Unknown names, bad types and
arguments that are not ``--NAME=value`` are refused with one clear line (SystemExit), and so is a value outside
the constant's declared choices (``configure(globals(), argv, choices={"LUNG_MASK": ("refined", "thesis")})``),
before the script does any work.

A constant declares what it accepts at the end of its comment, in brackets: ``[> 0]``, ``[>= 0]``, ``[0 .. 1]``
(inclusive), ``[odd >= 1]``, ``[one of: 1, 2, 4]``, ``[existing path]`` (when not empty); for a tuple every
element is checked. A value outside is refused with one line naming the setting, the value and what is allowed,
exit status 2, before any output is touched.

``--help`` (or ``-h``) prints the script's docstring up to its first blank line after "Run" / "Usage" (the
whole docstring when it has neither) and every user-facing constant with its default and its comment, then
exits 0. Constants meant for the program only are named with a leading underscore (``_KINDS``) and are
neither listed nor settable. ``save_config(cfg, folder)`` writes the settings beside a stage's output as
``config.json``.
"""
import ast
import os
import sys


def constants(namespace):
    """The UPPERCASE constants of a module namespace (its settings), in definition order."""
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, list, type(None)))}


class Config(dict):
    """A run's settings: a dict that is not changed after it is made, with attribute access (``cfg.LR``).
    ``cfg.replace(NAME=value)`` returns a new Config with some values changed."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _refuse(self, *args, **kwargs):
        raise TypeError("a Config is read-only: use cfg.replace(NAME=value)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse

    def replace(self, **changes):
        new = dict(self)
        new.update(changes)
        return Config(new)

    def __reduce__(self):                     # pickles (process pools, Dask) as a plain dict rebuilt as a Config
        return (Config, (dict(self),))


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


def configure(namespace, argv=None, choices=None):
    """The settings of a script: its constants (``namespace``, the script's globals()) with the ``--NAME=value``
    overrides of ``argv`` applied -> Config. ``choices``: {NAME: allowed values} for constants that take one of a
    few values (checked after the overrides). ``--help`` prints the usage and the constants and exits 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults = constants(namespace)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(namespace, choices))
        raise SystemExit(0)
    values = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"argument {arg!r}: expected --NAME=value (NAME one of: {', '.join(defaults)}; "
                             f"--help lists them)")
        name, text = arg[2:].split("=", 1)
        if name not in defaults:
            raise SystemExit(f"unknown setting --{name}; known: {', '.join(defaults)}")
        values[name] = _parse(name, text, defaults[name])
    for name, allowed in (choices or {}).items():
        if values[name] not in allowed:
            _refuse(f"--{name}={values[name]}: expected one of {', '.join(map(str, allowed))}")
    rules = _rules(namespace)
    for name, value in values.items():
        if name in rules and not _accepts(rules[name], value):
            _refuse(f"--{name}={value!r}: expected {rules[name]}")
    return Config(values)


class SettingError(SystemExit):
    """A setting refused: exit status 2; ``str()`` is the one-line reason (also printed to stderr)."""

    def __init__(self, line):
        super().__init__(2)
        self.line = line

    def __str__(self):
        return self.line


def _refuse(line):
    print(line, file=sys.stderr)
    raise SettingError(line)


def _rules(namespace):
    """{NAME: its rule} from the bracketed end of each constant's comment (see the module docstring)."""
    path = namespace.get("__file__") or ""
    out = {}
    for name, comment in (_comments(path).items() if path else ()):
        comment = comment.rstrip()
        if comment.endswith("]") and "[" in comment:
            out[name] = comment[comment.rindex("[") + 1:-1].strip()
    return out


def _accepts(rule, value):
    """Whether ``value`` satisfies ``rule`` (every element of a tuple / list does)."""
    if isinstance(value, (tuple, list)):
        return all(_accepts(rule, v) for v in value)
    if rule.startswith("one of:"):
        return str(value) in [c.strip() for c in rule[len("one of:"):].split(",")]
    if rule == "existing path":
        return value == "" or os.path.exists(str(value))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True                                   # a rule on numbers says nothing about other values
    if rule.startswith("odd"):
        return value % 2 == 1 and _accepts(rule[3:].strip() or ">= 1", value)
    if ".." in rule:
        lo, hi = (float(v) for v in rule.split(".."))
        return lo <= value <= hi
    for op in (">=", "<=", ">", "<"):
        if rule.startswith(op):
            bound = float(rule[len(op):])
            return {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound}[op]
    return True


# ----------------------------------------------------------------------------- --help

def _comments(path):
    """{NAME: its comment} for the top-level constants of the source file at ``path``: the comment on the
    constant's line and on the comment-only lines that continue it."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return {}
    out, name = {}, None
    for line in lines:
        head = line.split("#", 1)[0]
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        if head and not head[0].isspace() and "=" in head and head.split("=", 1)[0].strip().isupper():
            name = head.split("=", 1)[0].strip()
            out[name] = comment
        elif name and not head.strip() and comment and line.startswith(" "):
            out[name] = (out[name] + " " + comment).strip()
        elif head.strip():
            name = None
    return out


def _usage(doc):
    """The docstring up to and including its "Run" / "Usage" block (to the first blank line after it)."""
    lines = (doc or "").strip("\n").splitlines()
    for i, line in enumerate(lines):
        if line.strip().lower().rstrip(":").split(" ")[0] in ("run", "usage", "run:", "usage:"):
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].strip()), len(lines))
            return "\n".join(lines[:end])
    return "\n".join(lines)


def help_text(namespace, choices=None):
    """What ``--help`` prints: the usage part of the docstring, then each setting, its default and comment."""
    path = namespace.get("__file__") or ""
    comments = _comments(path) if path else {}
    script = os.path.basename(path) or "script"
    out = [_usage(namespace.get("__doc__")), "", f"Settings (python {script} --NAME=value ...):"]
    for name, value in constants(namespace).items():
        allowed = (choices or {}).get(name)
        note = comments.get(name, "")
        if allowed:
            note = f"{note} [one of: {', '.join(map(str, allowed))}]".strip()
        out.append(f"  --{name}={value!r}" + (f"\n      {note}" if note else ""))
    return "\n".join(out)


def save_config(cfg, folder, name="config.json"):
    """Write the settings as JSON into ``folder`` (created if needed), atomically; return the path."""
    import runfiles
    os.makedirs(folder, exist_ok=True)
    return runfiles.write_json(os.path.join(folder, name), dict(cfg))
