"""cross_validate.py end to end on a tiny synthetic cohort of 3 LUNA16 folds: every fold's stages 3-6 run, the
pooled candidates are the folds' stage-6 candidates one after another, pooled.json's CPM is what metrics.py gives
on the pooled file, a second run (its folds as tasks on a dask cluster) skips every fold, and a fold made to fail
is reported with its log while the others finish and the pooled result names it missing. Also VAL_FOLDS, the
option of slice_idx.py the folds use."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDS = (0, 1, 2)
pytestmark = pytest.mark.xdist_group("cross_validate")     # its own folders; one worker for the file
# the smallest settings of each stage: a U-Net of 4 filters (the figure-3 network 31 s; eager: no graph traced) for one
# step on 64 px crops, stage 5 without pictures, stage 6 a tiny 3D network on 20 mm patches with 4 image blobs
CV_ARGS = ["--FOLDS=(0,1,2)", "--MODEL_FILE=last.keras", "--BOOTSTRAP=200",
           "--TRAIN_ARGS=--VARIANT=unet --UNET_BASE_FILTERS=4 --UNET_DEPTH=2 --EPOCHS=1 --STEPS_PER_EPOCH=1 --BATCH_SIZE=2 --BN_REESTIMATE_BATCHES=1 "
           "--VAL_MAX_BATCHES=1 --WORKERS=0 --TRAIN_CROP=64 --RUN_EAGERLY=1",
           "--POST_ARGS=--N_PICTURES=0 --WRITE_MIP=0 --WRITE_NIFTI=0",
           "--FP_ARGS=--PATCH_MM=20 --VOXEL_MM=2.5 --WIDTH=4 --BLOCKS=2 --DENSE=8 --EPOCHS=1 --STEPS_PER_EPOCH=2 "
           "--BATCH_SIZE=8 --TTA=1 --BLOB_CANDIDATES=4 --FINDINGS=0 --RANDOM_NEG_PER_SCAN=4 --DENSE_NEG_PER_SCAN=4"]


def cross_validate(work, *args, env=None):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "cross_validate.py"), f"--WORK_DIR={work}", *CV_ARGS,
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})))
    return p.returncode, p.stdout + p.stderr


def rows(path):
    with open(path) as f:
        lines = f.read().splitlines()
    return lines[0], lines[1:]


def test_cross_validation_end_to_end(tmp_path):
    """Stages 0-2 on 3 scans of 128 px (2.5 mm pixels), one per LUNA16 fold; cross_validate.py run three times:
    all folds (2 at once), again (each fold a task on a dask LocalCluster: every fold skipped), and with fold 1's
    stage-5 candidates corrupted (fold 1 fails in stage 6, folds 0 and 2 are pooled)."""
    distributed = pytest.importorskip("distributed")
    work, t_start = str(tmp_path), time.time()
    run_stage("synthetic_ct.py", "--N_SCANS=3", "--N_SUBSETS=3", "--N_LIDC_SCANS=0", "--SEED=5", "--IMAGE_SIZE=128",
              "--N_SLICES=(24,24)", "--PIXEL_SPACING_MM=(2.4,2.8)", "--SLICE_SPACINGS_MM=(2.5,)",
              "--SHAPE_LIBRARY_SCANS=4", "--NODULE_DIAMETER_MM=(8.0,25.0)", "--EMPTY_EVERY=0", "--N_WORKERS=2",
              work=work)
    run_stage("preprocess.py", "--N_WORKERS=2", work=work)
    run_stage("table.py", "--PIXEL_MM=2.5", "--CROP_MM=240", "--NEG_PER_SCAN=4", "--CONTEXT_SLICES=3", work=work)
    print(f"seconds: stages 0-2 {time.time() - t_start:.1f}")
    t0 = time.time()
    rc, text = cross_validate(work, "--N_PARALLEL=2")
    first_seconds = time.time() - t0
    assert rc == 0, text[-3000:]
    first = check_every_fold_and_the_pooled_froc(work, text)

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster:
        t0 = time.time()
        rc, text = cross_validate(work, f"--DASK_SCHEDULER={cluster.scheduler_address}")
        again_seconds = time.time() - t0
    assert rc == 0, text[-3000:]
    assert all(f"fold {k}: skipped" in text for k in FOLDS) and "each a task on tcp://" in text
    assert again_seconds < first_seconds / 3, (again_seconds, first_seconds)
    again = json.load(open(os.path.join(work, "cv", "pooled.json")))
    assert again["after_stage6"]["cpm"] == first["after_stage6"]["cpm"]

    cvdir = os.path.join(work, "cv")
    os.remove(os.path.join(cvdir, "fold1", "6_fp_reduction", "candidates.csv"))
    with open(os.path.join(cvdir, "fold1", "5_report", "candidates.csv"), "w") as f:
        f.write("seriesuid,coordX\nnot a candidate,x\n")
    t0 = time.time()
    rc, text = cross_validate(work)
    print(f"seconds: first run {first_seconds:.1f}, again {again_seconds:.1f}, failing fold {time.time() - t0:.1f}")
    check_the_failed_fold(work, rc, text)

    for bad, says in (("--TRAIN_ARGS=--EPOCH=1", "nasnet_v2_train.py has no setting --EPOCH"),
                      ("--FP_ARGS=--OUT_DIR=/tmp/x", "--OUT_DIR is set by cross_validate.py"),
                      ("--FOLDS=(0,1,5)", "fold(s) [5]"), ("--FOLDS=(0,1)", "at least 3")):
        p = subprocess.run([sys.executable, "cross_validate.py", f"--WORK_DIR={work}", "--FOLDS=(0,1,2)", bad],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and says in p.stderr and "Traceback" not in p.stderr, (bad, p.stderr[-2000:])
    shutil.rmtree(cvdir)


def check_every_fold_and_the_pooled_froc(work, text):
    """Every fold's outputs; the pooled candidates = the folds' one after another; pooled.json's figures =
    metrics.py's on the pooled file; per fold = each fold's own stage-6 report; models.txt, pooled.md."""
    cvdir = os.path.join(work, "cv")
    files = {n: open(os.path.join(cvdir, n)).read() for n in ("pooled.json", "pooled.md", "models.txt")}
    pooled = json.loads(files["pooled.json"])
    assert pooled["folds_pooled"] == list(FOLDS) and pooled["folds_missing"] == [] and pooled["failed"] == []
    splits = {}
    for i, k in enumerate(FOLDS):
        fold = os.path.join(cvdir, f"fold{k}")
        for f in ("3_split/split.json", "4_model/last.keras", "5_report/candidates.csv", "5_predictions",
                  "6_fp_reduction/candidates.csv", "6_fp_reduction/model.keras", "cross_validate.log"):
            assert os.path.exists(os.path.join(fold, f)), f"fold {k}: no {f}"
        assert f"fold {k}: done" in text
        splits[k] = json.load(open(os.path.join(fold, "3_split", "split.json")))
        assert splits[k]["test_folds"] == [k] and splits[k]["val_folds"] == [FOLDS[(i + 1) % 3]]
        record = json.load(open(os.path.join(fold, "cross_validate.json")))
        assert all(s["done"] for s in record["stages"].values()) and len(record["stages"]) == 4
    test_uids = [set(splits[k]["test"]["series"]) for k in FOLDS]
    assert all(len(u) == 1 for u in test_uids) and len(set.union(*test_uids)) == 3      # each scan tested once
    for k in FOLDS:                                        # training and validation never see the test fold
        assert not set(splits[k]["train"]["series"] + splits[k]["val"]["series"]) & set(splits[k]["test"]["series"])

    header, pooled_rows = rows(os.path.join(cvdir, "candidates.csv"))
    folds_rows = [rows(os.path.join(cvdir, f"fold{k}", "6_fp_reduction", "candidates.csv")) for k in FOLDS]
    assert header == "seriesuid,coordX,coordY,coordZ,probability" and all(h == header for h, _ in folds_rows)
    assert pooled_rows == [r for _, fr in folds_rows for r in fr] and len(pooled_rows) > 0

    m = os.path.join(work, "metrics_out.json")
    p = subprocess.run([sys.executable, "metrics.py", f"--ANNOTATIONS={cvdir}/annotations.csv",
                        f"--CANDIDATES={cvdir}/candidates.csv", f"--EXCLUDED={cvdir}/annotations_excluded.csv",
                        f"--SCANS={cvdir}/seriesuids.csv", "--BOOTSTRAP=200", f"--OUT={m}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ref = json.load(open(m))
    after = pooled["after_stage6"]
    assert after["cpm"]["value"] == ref["cpm"]["value"] and after["cpm"]["ci95"] == ref["cpm"]["ci95"]
    assert after["froc"]["sensitivities"] == ref["froc"]["sensitivities"]
    assert after["counts"] == ref["counts"] and ref["counts"]["scans"] == 3
    truth = sum(1 for _ in open(os.path.join(cvdir, "annotations.csv"))) - 1      # the stage-1 files' nodules
    assert ref["counts"]["nodules"] == truth == sum(f["n_nodules"] for f in pooled["per_fold"]) > 0

    for f in pooled["per_fold"]:                           # each fold's CPM: its own stage-6 report's
        own = json.load(open(os.path.join(cvdir, f"fold{f['test_fold']}", "6_fp_reduction", "metrics.json")))
        assert np.isclose(f["cpm_after_stage6"], own["after"]["cpm"]["value"]), (f, own["after"]["cpm"])
        stage5 = json.load(open(os.path.join(cvdir, f"fold{f['test_fold']}", "5_report", "metrics.json")))
        assert np.isclose(f["cpm_stage5"], stage5["cpm"]["value"]), (f, stage5["cpm"])
        assert f["n_nodules"] == own["after"]["n_nodules"]
    lines = files["models.txt"].splitlines()
    assert lines == [",".join(f"{cvdir}/fold{k}/4_model/last.keras" for k in FOLDS),
                     ",".join(f"{cvdir}/fold{k}/6_fp_reduction/model.keras" for k in FOLDS)]
    md = files["pooled.md"]
    assert f"{after['cpm']['value']:.3f} ({after['cpm']['ci95'][0]:.3f}-{after['cpm']['ci95'][1]:.3f})" in md
    assert "| after stage 6 |" in md and "| stage 5 |" in md and "10-20" in md and "last.keras" in md
    assert f"CPM {after['cpm']['value']:.3f}" in text
    return pooled


def check_the_failed_fold(work, rc, text):
    """Fold 1 fails in stage 6 (its input corrupted): one line with its log; folds 0 and 2 pooled, 1 missing."""
    log = os.path.join(work, "cv", "fold1", "cross_validate.log")
    assert rc == 1
    line = next(ln for ln in text.splitlines() if ln.startswith("fold 1: FAILED"))
    assert "6_fp_reduction (fp_reduction.py) exited" in line and line.endswith(f"log: {log}"), line
    assert "fold 0: skipped" in text and "fold 2: skipped" in text and "missing" in text
    pooled = json.load(open(os.path.join(work, "cv", "pooled.json")))
    assert pooled["folds_pooled"] == [0, 2] and pooled["folds_missing"] == [1]
    assert pooled["failed"][0]["fold"] == 1 and pooled["failed"][0]["log"] == log
    assert pooled["after_stage6"]["counts"]["scans"] == 2
    record = json.load(open(os.path.join(work, "cv", "fold1", "cross_validate.json")))
    assert record["stages"]["6_fp_reduction"]["done"] is False and record["stages"]["5_report"]["done"]


def test_no_table_no_run(tmp_path):
    rc, text = cross_validate(str(tmp_path))
    assert rc != 0 and "no slice table (run table.py first)" in text and not os.path.exists(tmp_path / "cv")


def test_val_folds_make_the_validation_part():
    """slice_idx.make_split with VAL_FOLDS: validation = those folds' patients, test = TEST_FOLDS', training the
    rest; without it the split is what it was (VAL_FRACTION)."""
    import slice_idx
    dt = np.dtype([("patient_id", "S8"), ("seriesuid", "S8"), ("subset", np.int8), ("n_nodule_pixels", np.int32)])
    slices = np.array([(f"p{i}".encode(), f"s{i}".encode(), i % 4, 5 * (i % 2)) for i in range(16)], dt)
    idx, info = slice_idx.make_split(slices, test_folds=(1,), val_folds=(2,))
    part = {k: {int(slices["subset"][r]) for r in v} for k, v in idx.items()}
    assert part == {"test": {1}, "val": {2}, "train": {0, 3}} and info["val_folds"] == [2]
    plain, plain_info = slice_idx.make_split(slices, test_folds=(1,))
    again, _ = slice_idx.make_split(slices, test_folds=(1,), val_folds=())
    assert all(np.array_equal(plain[k], again[k]) for k in plain) and plain_info["val_fraction"] == 0.1
    assert "val_folds" not in plain_info and len(plain["val"]) == 2          # 10 % of each group of 6, rounded up
    with pytest.raises(SystemExit, match="also in TEST_FOLDS"):
        slice_idx.make_split(slices, test_folds=(1,), val_folds=(1,))
    with pytest.raises(SystemExit, match="no scan of the table"):
        slice_idx.make_split(slices, test_folds=(1,), val_folds=(7,))
