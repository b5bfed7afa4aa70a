"""runfiles: atomic writes, stale temporaries, and one run at a time in an output folder."""
import json
import os
import subprocess
import sys

import pytest

import runfiles


def test_atomic_write_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    path = str(tmp_path / "model.keras")
    with runfiles.atomic(path) as tmp:
        assert tmp.endswith(".keras") and os.path.dirname(tmp) == str(tmp_path)   # writers that want the ending
        open(tmp, "w").write("new")
    assert open(path).read() == "new"
    with pytest.raises(RuntimeError):
        with runfiles.atomic(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed mid-write")
    assert open(path).read() == "new" and os.listdir(tmp_path) == ["model.keras"]


def test_json_and_csv_writers(tmp_path):
    import numpy as np
    p = runfiles.write_json(str(tmp_path / "m.json"), {"a": np.float32(0.5), "b": float("nan"), "_private": [1],
                                                       "c": (1, np.int64(2))})
    assert json.load(open(p)) == {"a": 0.5, "b": None, "c": [1, 2]}
    p = runfiles.write_csv(str(tmp_path / "t.csv"), [{"x": 1, "y": 2, "z": 3}], ["x", "y"])
    assert open(p).read().splitlines() == ["x,y", "1,2"]


def test_stale_temporaries_are_recognised_and_removed(tmp_path):
    keep = ["scan.h5", "model.keras", ".lock"]
    stale = ["scan.h5.tmp", "last.keras.tmp.keras", ".1.2.tmp4242.h5"]
    for name in keep + stale:
        (tmp_path / name).write_text("x")
    lines = []
    removed = runfiles.clean_stale(str(tmp_path), lines.append)
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(keep) and "removed 3 temporary file(s)" in lines[0]


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
import runfiles
with runfiles.hold({folder!r}, "a test holder"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held(tmp_path):
    """A folder held by another live process (killed at the end)."""
    folder = str(tmp_path / "2_table")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=root, folder=folder)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    yield folder, p.pid
    p.kill()
    p.wait()


def test_a_second_run_into_a_held_folder_is_refused_in_one_line(held, tmp_path, capsys):
    folder, pid = held
    with pytest.raises(SystemExit, match=f"in use by a test holder \\(pid {pid} on "):
        with runfiles.hold(folder, "second"):
            pass
    import table                                        # a stage: one line on stderr, exit status 2, nothing written
    os.makedirs(tmp_path / "1_preprocessed")
    (tmp_path / "1_preprocessed" / "x.h5").write_text("")
    assert table.main([f"--WORK_DIR={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{folder}: in use by a test holder (pid {pid}") and os.listdir(folder) == [".lock"]


def test_a_lock_left_by_a_dead_run_is_taken_over_and_released(tmp_path):
    folder = str(tmp_path / "out")
    os.makedirs(folder)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()                                            # a pid that no longer exists
    import socket
    json.dump({"host": socket.gethostname(), "pid": p.pid, "what": "a killed run", "since": "earlier"},
              open(os.path.join(folder, ".lock"), "w"))
    with runfiles.hold(folder, "this run"):
        assert json.load(open(os.path.join(folder, ".lock")))["pid"] == os.getpid()
    assert not os.path.exists(os.path.join(folder, ".lock"))
    with runfiles.hold(folder, "again"):                # and the folder is free again
        assert json.load(open(os.path.join(folder, ".lock")))["what"] == "again"


def test_a_second_preprocess_into_a_held_folder_is_refused_before_touching_it(tmp_path):
    """Two preprocess.py runs into one WORK_DIR: the second is refused in one line before it writes anything
    (it used to fail with a misleading disk-full message and leave config.json disagreeing with the files)."""
    import preprocess
    folder = str(tmp_path / "1_preprocessed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=root, folder=folder)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        (tmp_path / "scans").mkdir()
        with pytest.raises(SystemExit, match=f"^{folder}: in use by a test holder"):
            preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={tmp_path / 'scans'}", f"--WORK_DIR={tmp_path}"])
        assert os.listdir(folder) == [".lock"]
    finally:
        p.kill()
        p.wait()
