"""The stages fit together: stages 0-5 run from the shell on a tiny cohort with the real network and
every stage output of the documented layout is there, in the stated shapes and grids."""
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
    report = os.path.join(work, "5_report")
    for f in ("metrics.json", "nodules.csv", "candidates.csv", "froc.png"):
        assert os.path.isfile(os.path.join(report, f)), f
    m = json.load(open(os.path.join(report, "metrics.json")))
    # the report's counts, recomputed from the stage files: the test scans' truth nodules and voxels, and the
    # predicted masks of 5_predictions
    test_series = split["test"]["series"]
    assert m["n_scans"] == len(preds) == len(test_series) and sorted(preds) == sorted(u + ".h5" for u in test_series)
    assert m["evaluation"]["evaluation"].startswith("official-equivalent") and m["evaluation"]["interval"] != "none"
    n_nodules = truth_voxels = pred_voxels = inter = 0
    for u in test_series:
        s1 = ct_io.read_scan_h5(os.path.join(work, "1_preprocessed", u + ".h5"), arrays=("nodule_mask",))
        n_nodules += int(np.sum(s1["nodules"]["excluded"] == 0))
        truth = s1["nodule_mask"] > 0
        with tables.open_file(os.path.join(work, "5_predictions", u + ".h5")) as h5:
            pred = h5.root.mask.read() > 0
        truth_voxels, pred_voxels, inter = truth_voxels + truth.sum(), pred_voxels + pred.sum(), inter + (pred & truth).sum()
    sd = m["slice_dice"]
    assert m["n_nodules"] == n_nodules > 0 and sd["truth_voxels"] == truth_voxels > 0
    assert sd["pred_voxels"] == pred_voxels and sd["intersection"] == inter
    assert sd["value"] == pytest.approx(2 * inter / (pred_voxels + truth_voxels))


def test_short_training_learned_where_the_nodules_are(pipeline_run):
    """Three training steps already move the figure-3 network: on the test slices of the table its nodule
    probability is higher inside the nodules than outside them, by far more than an untrained network's
    (measured: trained 0.54 inside vs 0.38 outside, untrained 0.37 vs 0.44), and its pooled Dice is above
    the untrained one's (which marks no nodule pixel)."""
    import keras
    import nasnet_v2
    from metrics import dice, dice_counts
    work, _ = pipeline_run
    idx = np.sort(np.load(os.path.join(work, "3_split", "test_idx.npy")))
    with tables.open_file(os.path.join(work, "2_table", "slices.h5")) as h5:
        x = np.stack([h5.root.data[i] for i in idx])
        t = np.stack([h5.root.truth[i] for i in idx]) > 0
    assert t.any()
    trained = keras.saving.load_model(os.path.join(work, "4_model", "best.keras"), compile=False)
    keras.utils.set_random_seed(85)                  # the training's SEED: the same initial weights
    untrained = nasnet_v2.get_model(x.shape[1:], variant="figure3", bn_momentum=0.99)
    contrast, dices = {}, {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        p = np.asarray(model.predict(x, verbose=0))[..., 1]
        contrast[name] = p[t].mean() - p[~t].mean()
        dices[name] = dice(*dice_counts(p > 0.5, t))
    assert contrast["trained"] > 0.05 and contrast["trained"] > contrast["untrained"] + 0.1, contrast
    assert dices["trained"] > dices["untrained"] + 0.01, dices


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
                    "--BN_REESTIMATE_BATCHES=1", "--VAL_MAX_BATCHES=1", "--RUN_EAGERLY=True", work=copy)
    assert "resuming from" in out and "epoch 2:" in out
    after = json.load(open(os.path.join(copy, "4_model", "state.json")))
    rows = list(csv.DictReader(open(os.path.join(copy, "4_model", "history.csv"))))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and after["epoch"] == 1
    val = [float(r["val_dice"]) for r in rows]
    assert val[0] == pytest.approx(before["best_val_dice"])          # epoch 1's row kept from the first run
    assert after["best_val_dice"] == pytest.approx(max(val)) and after["best_epoch"] == int(np.argmax(val))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert "nothing to do" in run_stage("nasnet_v2_train.py", "--RESUME=1", "--EPOCHS=2", work=copy)


def test_compare_runs_tabulates_the_stage_outputs(pipeline_run, tmp_path):
    """benchmarks/compare_runs.py reads a run's report and training record as the stages wrote them."""
    from benchmarks import compare_runs
    work, _ = pipeline_run
    report = os.path.join(work, "5_report")
    row = compare_runs.run_row("tiny", report)
    m = json.load(open(os.path.join(report, "metrics.json")))
    assert row["steps"] == 3 and row["input"] == "96x96x3" and row["variant"] == "figure3"
    assert row["fp_per_scan"] == m["fp_per_scan"]["value"] and row["cpm"] == m["cpm"]["value"]
    assert row["big_bin"] == ">=20" and set(row["sens_by_size"]) == set(m["size_bins_mm"])
    out = tmp_path / "compare.md"
    assert compare_runs.main([f"--RUNS=('a={report}','b={report}')", f"--OUT={out}"]) == 0
    text = out.read_text()
    rows = 1 + len(m["size_bins_mm"]) + 1             # the summary row, then the FROC table's: each size bin and all
    assert text.count("| a |") == rows and text.count("| b |") == rows
    assert f"{m['n_scans']} / {m['n_nodules']}" in text and "sens. @ 8 FP/scan" in text
    missing = tmp_path / "none"
    with pytest.raises(SystemExit, match="no metrics.json"):
        compare_runs.main([f"--RUNS=('c={missing}',)"])


def test_appearance_check_tabulates_a_report_by_size(pipeline_run):
    """benchmarks/appearance_check.py's table: one row per size bin and 'all', the found counts, Dice on found,
    FP/scan and CPM of the report as postprocess.py wrote them (no stage-6 folder: its columns are '-')."""
    from benchmarks import appearance_check
    work, _ = pipeline_run
    report = os.path.join(work, "5_report")
    rows, m = appearance_check.part_rows("held-out", report, os.path.join(work, "6_fp_reduction"))
    assert [r["size"] for r in rows] == list(m["size_bins_mm"]) + ["all"]
    for r in rows:
        s = m["sensitivity"] if r["size"] == "all" else m["sensitivity"]["by_size"][r["size"]]
        assert r["found"] == f"{s['found']} / {s['total']}" and r["fp"] == m["fp_per_scan"]["value"]
        assert r["cpm6"] is None and r["froc6"] is None
    assert rows[-1]["cpm5"] == m["cpm"]["value"] and rows[-1]["dice"] == m["nodule_dice_found"]["value"]
    text = appearance_check.table(rows)
    assert text.count("| held-out |") == len(rows) and "sens. @ 8 FP/scan (stage 6)" in text
