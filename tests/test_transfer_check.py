"""benchmarks/transfer_check.py: the cohorts' settings, and the scoring of cohorts one by one and pooled (metrics.py
on the stage-1 truth and the stages' candidate files), on hand-made stage-1 files with known hits."""
import json
import os

import numpy as np
import pytest

import ct_io
import metrics
from benchmarks import transfer_check as tc

# per cohort: scans -> nodules (x, y, z, diameter, excluded); candidates (x, y, z, p) of stage 5 and stage 6
COHORTS = {
    "a": {"s1": [(10.0, 10.0, 10.0, 4.0, 0), (40.0, 40.0, 20.0, 12.0, 0), (60.0, 10.0, 10.0, 2.0, 1)],
          "s2": [(20.0, 30.0, 5.0, 7.0, 0)]},
    "b": {"s3": [(15.0, 15.0, 15.0, 6.0, 0), (50.0, 50.0, 30.0, 8.0, 0)], "s4": []},
}
STAGE5 = {"s1": [(40.5, 40.0, 20.0, 0.9), (70.0, 70.0, 5.0, 0.8)], "s2": [], "s3": [(15.0, 15.5, 15.0, 0.4)],
          "s4": [(5.0, 5.0, 5.0, 0.7)]}
STAGE6 = {"s1": [(40.5, 40.0, 20.0, 0.95), (10.5, 10.0, 10.0, 0.6), (70.0, 70.0, 5.0, 0.1), (60.0, 10.0, 10.0, 0.9)],
          "s2": [(20.0, 30.0, 5.5, 0.3)], "s3": [(15.0, 15.5, 15.0, 0.8)], "s4": [(5.0, 5.0, 5.0, 0.05)]}


def write_cohort(work, scans):
    os.makedirs(os.path.join(work, "1_preprocessed"))
    for uid, nods in scans.items():
        nodules = np.zeros(len(nods), ct_io.NODULE_DTYPE)
        for i, (x, y, z, d, exc) in enumerate(nods):
            nodules[i] = (i + 1, z, y, x, x, y, z, d, -1, b"sphere", exc)
        scan = ct_io.Scan(hu=np.full((4, 8, 8), -800, np.int16), origin=(0.0, 0.0, 0.0), spacing=(10.0, 10.0, 10.0),
                          direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), seriesuid=uid)
        zeros = np.zeros((4, 8, 8), np.uint8)
        ct_io.write_scan_h5(os.path.join(work, "1_preprocessed", uid + ".h5"), scan, zeros, zeros, nodules)
    for sub, cands in (("5_report", STAGE5), ("6_fp_reduction", STAGE6)):
        os.makedirs(os.path.join(work, sub))
        with open(os.path.join(work, sub, "candidates.csv"), "w") as f:
            f.write("seriesuid,coordX,coordY,coordZ,probability\n")
            for uid in scans:
                f.writelines(f"{uid},{x},{y},{z},{p}\n" for x, y, z, p in cands[uid])


def hand_files(folder, uids):
    """The same files written here by hand: what metrics.py must be given for the scans ``uids``."""
    os.makedirs(folder)
    scans = {u: n for c in COHORTS.values() for u, n in c.items()}
    paths = {k: os.path.join(folder, k + ".csv") for k in ("ann", "exc", "scans", "c5", "c6")}
    with open(paths["ann"], "w") as a, open(paths["exc"], "w") as e:
        for f in (a, e):
            f.write("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
        for u in uids:
            for x, y, z, d, exc in scans[u]:
                (e if exc else a).write(f"{u},{x},{y},{z},{d}\n")
    with open(paths["scans"], "w") as f:
        f.write("seriesuid\n" + "".join(u + "\n" for u in uids))
    for key, cands in (("c5", STAGE5), ("c6", STAGE6)):
        with open(paths[key], "w") as f:
            f.write("seriesuid,coordX,coordY,coordZ,probability\n")
            f.writelines(f"{u},{x},{y},{z},{p}\n" for u in uids for x, y, z, p in cands[u])
    return paths


def test_cohorts_scored_alone_and_pooled_as_metrics_py_scores_them(tmp_path):
    works = {}
    for name, scans in COHORTS.items():
        works[name] = str(tmp_path / name)
        write_cohort(works[name], scans)
    bins = (5.0, 10.0)
    res = {n: tc.score([w], os.path.join(w, "scored"), 200, bins) for n, w in works.items()}
    res["pooled"] = tc.score(list(works.values()), str(tmp_path / "pooled"), 200, bins)
    for name, uids in (("a", ["s1", "s2"]), ("b", ["s3", "s4"]), ("pooled", ["s1", "s2", "s3", "s4"])):
        p = hand_files(str(tmp_path / f"hand_{name}"), uids)
        for key, cand in (("stage5", p["c5"]), ("stage6", p["c6"])):
            ref = metrics.evaluate_paths(p["ann"], cand, p["exc"], p["scans"], 200, bins)
            got = res[name][key]
            assert got["cpm"]["value"] == ref["cpm"]["value"] and got["cpm"]["ci95"] == ref["cpm"]["ci95"], name
            assert got["counts"] == ref["counts"], name
            assert json.dumps(got["candidate_recall"]) == json.dumps(ref["candidate_recall"]), name   # NaN: no nodule
    pooled = res["pooled"]["stage6"]
    assert pooled["counts"]["nodules"] == 5 and pooled["counts"]["excluded"] == 1 and res["pooled"]["scans"] == 4
    assert pooled["counts"]["ignored_on_excluded"] == 1                  # the candidate on s1's 2 mm finding
    rec = pooled["candidate_recall"]               # stage 6 holds 4 of the 5 (not s3's second); stage 5 two of them
    assert (rec["found"], rec["total"]) == (4, 5) and rec["by_size"]["<5"]["total"] == 1
    assert res["pooled"]["stage5"]["candidate_recall"]["found"] == 2
    assert res["a"]["stage6"]["counts"]["nodules"] == 3 and res["b"]["stage6"]["counts"]["nodules"] == 2

    met = {t: ok for t, _, ok in tc.targets(res["pooled"])}
    assert not met["candidate recall (all mm) >= 0.95"] and met["candidate recall (<5 mm) >= 0.90"]
    md = tc.markdown(res, "run", "m5.keras", "m6.keras", list(metrics.size_bin_names(bins)))
    assert "| pooled | 4 | 5 | 2 | 80 % (4/5) | 100 % (1/1) |" in md and "| a | 2 | 3 |" in md
    assert f"{pooled['cpm']['value']:.3f} ({pooled['cpm']['ci95'][0]:.2f}-" in md and "Targets (pooled)" in md


def test_cohort_settings_and_refusals(tmp_path):
    args = tc.cohort_args("small", 6, seed_offset=100)
    assert "--SEED=203" in args and "--N_SCANS=6" in args and "--IMAGE_SIZE=512" in args
    assert "--NODULE_DIAMETER_MM=(3.0,11.0)" in args
    assert tc.cohort_args("look", 2)[-len(tc.appearance_check.HELDOUT):] == list(tc.appearance_check.HELDOUT)
    assert len({a for n in tc._COHORTS for a in tc.cohort_args(n, 1) if a.startswith("--SEED=")}) == 3
    with pytest.raises(SystemExit, match="unknown cohort 'thin'"):
        tc.cohort_args("thin", 1)
    with pytest.raises(SystemExit, match="no trained model"):
        tc.main([f"--RUN={tmp_path}"])
