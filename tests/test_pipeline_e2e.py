"""The stages fit together: stages 0-5 run from the shell on a tiny cohort with the real network and
every contract file of DESIGN.md is there, in the stated shapes and grids."""
import json
import os

import numpy as np
import pytest
import tables

import ct_io


def test_every_stage_output_exists_and_fits(pipeline_run):
    work, out = pipeline_run
    pre = sorted(os.listdir(os.path.join(work, "1_preprocessed")))
    assert len([p for p in pre if p.endswith(".h5")]) == 6 and "config.json" in pre
    with tables.open_file(os.path.join(work, "2_table", "slices.h5")) as h5:
        n = h5.root.data.shape[0]
        assert h5.root.data.shape[1:] == (96, 96, 3) and h5.root.truth.shape == (n, 96, 96)
        assert h5.root.slices.nrows == n and h5.root.data.filters.complib.startswith("blosc")
    split = json.load(open(os.path.join(work, "3_split", "split.json")))
    patients = {p: set(split[p]["patients"]) for p in ("train", "val", "test")}
    assert not (patients["train"] & patients["test"] or patients["train"] & patients["val"]
                or patients["val"] & patients["test"])
    idx = {p: np.load(os.path.join(work, "3_split", f"{p}_idx.npy")) for p in ("train", "val", "test")}
    assert sum(len(v) for v in idx.values()) == n and min(len(v) for v in idx.values()) > 0
    model_dir = os.path.join(work, "4_model")
    for f in ("best.keras", "last.keras", "history.csv", "config.json", "state.json"):
        assert os.path.isfile(os.path.join(model_dir, f)), f
    assert json.load(open(os.path.join(model_dir, "config.json")))["CONTEXT_SLICES"] == 3
    preds = [p for p in os.listdir(os.path.join(work, "5_predictions")) if p.endswith(".h5")]
    assert preds
    for p in preds:
        stage1 = ct_io.read_scan_h5(os.path.join(work, "1_preprocessed", p), arrays=("hu",))
        with tables.open_file(os.path.join(work, "5_predictions", p)) as h5:
            assert h5.root.prob.shape == h5.root.mask.shape == stage1["hu"].shape   # uncropped scan grid
    report = os.path.join(work, "6_report")
    for f in ("metrics.json", "nodules.csv", "candidates.csv", "froc.png"):
        assert os.path.isfile(os.path.join(report, f)), f
    m = json.load(open(os.path.join(report, "metrics.json")))
    assert m["n_scans"] == len(preds) and 0.0 <= m["slice_dice"]["value"] <= 1.0 and "definition" in m["cpm"]
    assert "sensitivity" in out["postprocess"]


def test_resume_continues_from_last_checkpoint(pipeline_run, tmp_path):
    """--RESUME=1 on a copy of the run: training goes on at epoch 2 from last.keras (optimiser state included),
    history.csv gains one row, state.json counts the epochs."""
    import csv
    import shutil
    from conftest import run_stage
    work, _ = pipeline_run
    copy = str(tmp_path / "run")
    for part in ("2_table", "3_split", "4_model"):
        shutil.copytree(os.path.join(work, part), os.path.join(copy, part))
    before = json.load(open(os.path.join(copy, "4_model", "state.json")))
    assert before["epoch"] == 0
    out = run_stage("nasnet_v2_train.py", "--RESUME=1", "--EPOCHS=2", "--STEPS_PER_EPOCH=2", "--BATCH_SIZE=4",
                    "--BN_REESTIMATE_BATCHES=1", "--VAL_MAX_BATCHES=1", work=copy)
    assert "resuming from" in out and "epoch 2:" in out
    after = json.load(open(os.path.join(copy, "4_model", "state.json")))
    assert after["epoch"] == 1 and after["best_val_dice"] >= before["best_val_dice"]
    rows = list(csv.DictReader(open(os.path.join(copy, "4_model", "history.csv"))))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert "nothing to do" in run_stage("nasnet_v2_train.py", "--RESUME=1", "--EPOCHS=2", work=copy)


def test_compare_runs_tabulates_the_stage_outputs(pipeline_run, tmp_path):
    """benchmarks/compare_runs.py reads a run's report and training record as the stages wrote them."""
    from benchmarks import compare_runs
    work, _ = pipeline_run
    report = os.path.join(work, "6_report")
    row = compare_runs.run_row("tiny", report)
    m = json.load(open(os.path.join(report, "metrics.json")))
    assert row["steps"] == 3 and row["input"] == "96x96x3" and row["variant"] == "figure3"
    assert row["fp_per_scan"] == m["fp_per_scan"]["value"] and row["cpm"] == m["cpm"]["value"]
    assert row["big_bin"] == ">=20" and set(row["sens_by_size"]) == set(m["size_bins_mm"])
    out = tmp_path / "compare.md"
    assert compare_runs.main([f"--RUNS=('a={report}','b={report}')", f"--OUT={out}"]) == 0
    text = out.read_text()
    assert text.count("| a |") == 1 and text.count("| b |") == 1 and f"{m['n_scans']} / {m['n_nodules']}" in text
    missing = tmp_path / "none"
    with pytest.raises(SystemExit, match="no metrics.json"):
        compare_runs.main([f"--RUNS=('c={missing}',)"])
