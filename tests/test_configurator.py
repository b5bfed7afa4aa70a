"""configurator: --NAME=value overrides of a script's top constants, read into a read-only Config; --help."""
import json
import os

import pytest

import configurator


def namespace():
    return dict(WORK_DIR="work", N_WORKERS=2, LR=1e-3, OVERWRITE=False, CROP=(400, 400), MODEL="", helper=len,
                _KINDS=("a", "b"))


def test_overrides_are_typed_and_saved(tmp_path):
    ns = namespace()
    cfg = configurator.configure(ns, ["--N_WORKERS=4", "--LR=1", "--OVERWRITE=1", "--CROP=(256, 256)",
                                      "--WORK_DIR=/data/run1", "--MODEL=123"])
    assert cfg["N_WORKERS"] == 4 and cfg.LR == 1.0 and isinstance(cfg.LR, float)
    assert cfg.OVERWRITE is True and cfg.CROP == (256, 256) and cfg.WORK_DIR == "/data/run1"
    assert cfg.MODEL == "123"                      # a string constant stays a string
    assert "helper" not in cfg and "_KINDS" not in cfg
    assert ns == namespace()                       # the module's constants are never changed
    path = configurator.save_config(cfg, str(tmp_path / "out"))
    assert json.load(open(path))["CROP"] == [256, 256]


@pytest.mark.parametrize("arg, message", [
    ("--N_WORKRS=4", "unknown setting --N_WORKRS"),
    ("--N_WORKERS=two", "expected int"),
    ("--OVERWRITE=yes", "expected a bool"),
    ("N_WORKERS=4", "expected --NAME=value"),
    ("--_KINDS=('c',)", "unknown setting --_KINDS"),
])
def test_bad_arguments_refused(arg, message):
    with pytest.raises(SystemExit, match=message):
        configurator.configure(namespace(), [arg])


def test_choices_refused_before_any_work():
    choices = {"N_WORKERS": (1, 2, 4)}
    with pytest.raises(SystemExit, match="--N_WORKERS=3: expected one of 1, 2, 4"):
        configurator.configure(namespace(), ["--N_WORKERS=3"], choices=choices)
    assert configurator.configure(namespace(), ["--N_WORKERS=4"], choices=choices).N_WORKERS == 4


def test_each_call_starts_from_the_file_defaults():
    ns = namespace()
    first = configurator.configure(ns, ["--N_WORKERS=7", "--LR=0.5"])
    cfg = configurator.configure(ns, ["--LR=0.25"])
    assert first.N_WORKERS == 7 and first.LR == 0.5
    assert cfg.N_WORKERS == 2 and cfg.LR == 0.25
    assert ns["N_WORKERS"] == 2 and ns["LR"] == 1e-3


def test_config_is_read_only_and_replace_gives_a_copy():
    cfg = configurator.configure(namespace(), [])
    for change in (lambda: cfg.__setitem__("LR", 1.0), lambda: cfg.update(LR=1.0), lambda: cfg.pop("LR")):
        with pytest.raises(TypeError, match="read-only"):
            change()
    other = cfg.replace(LR=0.5)
    assert other.LR == 0.5 and cfg.LR == 1e-3 and isinstance(other, configurator.Config)
    with pytest.raises(AttributeError):
        cfg.NO_SUCH_SETTING
    import pickle
    again = pickle.loads(pickle.dumps(cfg))        # what a process pool or a Dask worker receives
    assert again == cfg and isinstance(again, configurator.Config)


SCRIPT = '''"""A stage that does one thing.

Reads  IN_DIR/*.h5.
Writes OUT_DIR/out.h5.

Run
    python stage.py --N=3
    python stage.py --NAME=x

Details after the usage part: not printed by --help.
"""
N = 2                       # how many things
NAME = "a"                  # what they are called,
                            # over two lines
RATE = (0.5, 1.0)
_INTERNAL = 7               # for the program only
'''


def test_help_prints_the_usage_and_every_setting(tmp_path, capsys):
    path = tmp_path / "stage.py"
    path.write_text(SCRIPT)
    ns = {"__file__": str(path), "__doc__": SCRIPT.split('"""')[1]}
    exec(compile(SCRIPT, str(path), "exec"), ns)
    with pytest.raises(SystemExit) as stop:
        configurator.configure(ns, ["--N=5", "--help"], choices={"NAME": ("a", "b")})
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("A stage that does one thing.")
    assert "python stage.py --NAME=x" in out and "Details after the usage part" not in out
    assert "Settings (python stage.py --NAME=value ...):" in out
    assert "--N=2\n      how many things" in out                       # the default, not the override
    assert "--NAME='a'\n      what they are called, over two lines [one of: a, b]" in out
    assert "--RATE=(0.5, 1.0)" in out
    assert "_INTERNAL" not in out and "__file__" not in out
    assert ns["N"] == 2


def test_help_of_a_real_script_exits_0():
    """A stage's own --help, in process (each script's in a subprocess: tests/test_docs.py)."""
    import slice_idx
    with pytest.raises(SystemExit) as stop:
        configurator.configure(vars(slice_idx), ["-h"])
    assert stop.value.code == 0
    text = configurator.help_text(vars(slice_idx))
    assert text.startswith("Stage 3") and "--TEST_FOLDS=" in text
    assert os.path.basename(slice_idx.__file__) in text
