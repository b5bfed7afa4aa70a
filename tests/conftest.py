"""Shared fixtures: the repository root on sys.path, and one synthetic cohort run through stage 1 per session."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

@pytest.hookimpl(wrapper=True)                 # before every other plugin: xdist's hook turns groups into node ids
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``) the tests that share a session or
    module fixture of this suite, directly or through another fixture, run on one worker, so the fixture is
    built once, not once per worker: tests sharing any such fixture are joined into one group."""
    parent, costly = {}, {}

    def root(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        keys = []
        for name in getattr(item, "fixturenames", ()):
            defs = info.name2fixturedefs.get(name) if info else None
            d = defs[-1] if defs else None
            if d is not None and d.scope in ("session", "module") and str(d.baseid).startswith("tests"):
                keys.append(name if d.scope == "session" else f"{d.baseid}::{name}")
        for k in keys[1:]:
            parent[root(k)] = root(keys[0])
        costly[item] = keys
    for item, keys in costly.items():
        if keys:
            item.add_marker(pytest.mark.xdist_group(root(keys[0])))
    return (yield)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """8 full-size LUNA16-format phantoms (every third one flipped, one without nodules) and 1 LIDC DICOM
    series, run through preprocess.py: LUNA16 with the default wand labels, LIDC with consensus labels.
    Returns a dict of folders: data (synthetic_ct output), luna (stage-1 work dir), lidc (stage-1 work dir)."""
    import preprocess
    import synthetic_ct
    base = tmp_path_factory.mktemp("cohort")
    data = str(base / "data")
    index, failures = synthetic_ct.generate_cohort(data, N_SCANS=8, N_LIDC_SCANS=1, SEED=3, LIDC_MAX_SLICES=130)
    assert not failures, failures
    luna, lidc = str(base / "luna"), str(base / "lidc")
    assert preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={data}/luna16", f"--WORK_DIR={luna}",
                            "--N_WORKERS=2"]) == 0
    assert preprocess.main(["--DATASET=lidc", f"--INPUT_DIR={data}/lidc", f"--WORK_DIR={lidc}",
                            "--N_WORKERS=1", "--LABELS=consensus"]) == 0
    return dict(data=data, luna=luna, lidc=lidc, index=index)


_KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
name, n = os.environ["KILL_AT"].split(":") if os.environ.get("KILL_AT") else ("", "0")
seen, real = [0], os.replace
def replace(a, b):                 # SIGKILL just before the n-th rename of a file named *name
    if name and str(a).endswith(name):
        seen[0] += 1
        if seen[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
    return real(a, b)
os.replace = replace
{setup}
import {module}
sys.exit({module}.main(sys.argv[1:]))
"""


def run_killable(module, args, kill_at="", setup=""):
    """Run stage ``module`` with ``args`` in its own process, SIGKILLed just before the n-th rename of a file
    whose name ends in NAME (``kill_at`` = "NAME:n"; "" = not killed); ``setup``: Python lines run first."""
    import subprocess
    env = dict(os.environ, KILL_AT=kill_at, TF_CPP_MIN_LOG_LEVEL="2")
    code = _KILLER.format(root=ROOT, module=module, setup=setup)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def run_stage(script, *args, work):
    """Run a stage script as a user does (its own process); fail with its output if it fails."""
    import subprocess
    cmd = [sys.executable, os.path.join(ROOT, script), f"--WORK_DIR={work}", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """The whole pipeline, stages 0-5, on a tiny cohort (6 scans of 128 px) with the real figure-3 network
    at 96 px (2.5 mm pixels), one short epoch run eagerly. Returns (work dir, {stage: output})."""
    work = str(tmp_path_factory.mktemp("pipeline"))
    out = {}
    out["synthetic"] = run_stage("synthetic_ct.py", "--N_SCANS=6", "--N_LIDC_SCANS=0", "--SEED=5", "--IMAGE_SIZE=128",
                                 "--N_SLICES=(30,40)", "--PIXEL_SPACING_MM=(2.4,2.8)", "--SLICE_SPACINGS_MM=(2.5,)",
                                 "--SHAPE_LIBRARY_SCANS=4", "--NODULE_DIAMETER_MM=(8.0,25.0)", "--EMPTY_EVERY=0",
                                 work=work)
    out["preprocess"] = run_stage("preprocess.py", "--N_WORKERS=2", work=work)
    out["table"] = run_stage("table.py", "--PIXEL_MM=2.5", "--CROP_MM=240", "--NEG_PER_SCAN=4", "--CONTEXT_SLICES=3",
                             work=work)                                   # 96 px inputs of 2.5 mm pixels
    out["split"] = run_stage("slice_idx.py", "--TEST_FOLDS=()", "--VAL_FRACTION=0.2", "--TEST_FRACTION=0.2", work=work)
    out["train"] = run_stage("nasnet_v2_train.py", "--EPOCHS=1", "--STEPS_PER_EPOCH=3", "--BATCH_SIZE=4",
                             "--BN_REESTIMATE_BATCHES=2", "--VAL_MAX_BATCHES=2", "--RUN_EAGERLY=True",
                             work=work)                           # eager: 3 steps cost less than tracing the graph
    out["postprocess"] = run_stage("postprocess.py", "--SCANS=test", "--N_PICTURES=2", work=work)
    return work, out
