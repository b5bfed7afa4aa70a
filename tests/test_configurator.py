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


@pytest.mark.parametrize("script, arg, allowed", [
    ("table", "--PIXEL_MM=-1", ">= 0"),
    ("table", "--CROP_MM=0", "> 0"),
    ("table", "--CONTEXT_SLICES=2", "odd >= 1"),
    ("preprocess", "--LIMIT=-2", ">= 0"),
    ("fp_reduction", "--PATCH_MM=-16", "> 0"),
    ("fp_reduction", "--STEPS_PER_EPOCH=0", ">= 1"),
    ("fp_reduction", "--VOXEL_MM=0", "> 0"),
    ("fp_reduction", "--BATCH_SIZE=0", ">= 1"),
    ("postprocess", "--TTA=3", "one of"),
    ("postprocess", "--BATCH_SIZE=0", ">= 1"),
    ("nasnet_v2_train", "--BATCH_SIZE=0", ">= 1"),
    ("slice_idx", "--TEST_FRACTION=1.5", "0 .. 1"),
])
def test_a_setting_outside_what_it_accepts_is_one_line_and_exit_2(tmp_path, capsys, script, arg, allowed):
    """Each stage's settings are checked at start-up against what their constants declare: one line naming the
    setting, the value and what is allowed (also on stderr), exit status 2, and nothing written."""
    import importlib
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        module.main([f"--WORK_DIR={tmp_path / 'run'}", arg])
    name = arg[2:].split("=")[0]
    assert e.value.code == 2 and str(e.value).startswith(f"--{name}=") and allowed in str(e.value)
    assert capsys.readouterr().err.strip() == str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_rules_in_comments_are_listed_by_help_and_checked():
    ns = {"__doc__": "Usage:\n  python s.py", "__file__": __file__, "LIMIT": 0}
    assert configurator._accepts("odd >= 1", 3) and not configurator._accepts("odd >= 1", 4)
    assert configurator._accepts("0 .. 1", (0.0, 1.0)) and not configurator._accepts("0 .. 1", (0.5, 1.5))
    assert configurator._accepts("one of: 1, 2, 4", 2) and not configurator._accepts("one of: 1, 2, 4", 3)
    assert configurator._accepts("> 0", "text")          # a numeric rule says nothing about a string
    assert "LIMIT" in configurator.help_text(ns)


@pytest.mark.parametrize("script", ["synthetic_ct", "preprocess", "table", "slice_idx", "nasnet_v2_train",
                                    "postprocess", "fp_reduction", "metrics", "nasnet_v2"])
def test_every_default_meets_its_own_rule(script):
    import importlib
    module = importlib.import_module(script)
    rules = configurator._rules(vars(module))
    for name, value in configurator.constants(vars(module)).items():
        if name in rules:
            assert configurator._accepts(rules[name], value), (script, name, value, rules[name])
