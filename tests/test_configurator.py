"""configurator: --NAME=value overrides of a script's top constants."""
import json

import pytest

import configurator


def namespace():
    return dict(WORK_DIR="work", N_WORKERS=2, LR=1e-3, OVERWRITE=False, CROP=(400, 400), MODEL="", helper=len)


def test_overrides_are_typed_and_saved(tmp_path):
    ns = namespace()
    cfg = configurator.configure(ns, ["--N_WORKERS=4", "--LR=1", "--OVERWRITE=1", "--CROP=(256, 256)",
                                      "--WORK_DIR=/data/run1", "--MODEL=123"])
    assert ns["N_WORKERS"] == 4 and ns["LR"] == 1.0 and isinstance(ns["LR"], float)
    assert ns["OVERWRITE"] is True and ns["CROP"] == (256, 256) and ns["WORK_DIR"] == "/data/run1"
    assert ns["MODEL"] == "123"                    # a string constant stays a string
    assert "helper" not in cfg and cfg["N_WORKERS"] == 4
    path = configurator.save_config(cfg, str(tmp_path / "out"))
    assert json.load(open(path))["CROP"] == [256, 256]


@pytest.mark.parametrize("arg, message", [
    ("--N_WORKRS=4", "unknown setting --N_WORKRS"),
    ("--N_WORKERS=two", "expected int"),
    ("--OVERWRITE=yes", "expected a bool"),
    ("N_WORKERS=4", "expected --NAME=value"),
])
def test_bad_arguments_refused(arg, message):
    with pytest.raises(SystemExit, match=message):
        configurator.configure(namespace(), [arg])


def test_each_call_starts_from_the_file_defaults():
    ns = namespace()
    configurator.configure(ns, ["--N_WORKERS=7", "--LR=0.5"])
    cfg = configurator.configure(ns, ["--LR=0.25"])
    assert ns["N_WORKERS"] == 2 and cfg["N_WORKERS"] == 2 and ns["LR"] == 0.25
