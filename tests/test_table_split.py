"""Stage 2 (table.py) and stage 3 (slice_idx.py) on small stage-1 files made here with ct_io.write_scan_h5.

- a row of the table equals the source scan's slice after network_input; /slices says where it came from;
- volume_inputs (inference) gives the same numbers as network_input (training);
- the thesis slice rule; a bad scan is reported and skipped, the run exits non-zero, no temporary file left;
- no patient in two parts (random and LUNA16-fold splits); the leakage guard removes exactly the LUNA16
  test series (and, by patient, their sibling series);
- memory of table.py does not grow with the number of scans (10 vs 50 scans).
"""
import importlib
import json
import os
import sys
import tracemalloc

import numpy as np
import pytest
import tables

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import network_input  # noqa: E402
from ct_io import NODULE_DTYPE, Scan, read_scan_h5, write_scan_h5  # noqa: E402


# ----------------------------------------------------------------------------- helpers

def make_stage1_scan(path, uid, patient_id, size=64, n_z=16, seed=0, subset=None, nodules=((8, 32, 30, 6.0),),
                     source="luna16"):
    """A small stage-1 file: noisy lung-like HU, a box lung mask, bright spherical nodules labelled 1, 2, ...
    ``nodules``: (center z, y, x, radius px); a radius of 0 lists an excluded nodule (not drawn)."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(-850, 40, (n_z, size, size))
    hu[:, :, : size // 8] = 20                                     # body wall: not lung, changes the slice stats
    lung = np.zeros((n_z, size, size), np.uint8)
    lung[:, size // 5: 4 * size // 5, size // 6: 5 * size // 6] = 1
    mask = np.zeros((n_z, size, size), np.uint8)
    table = np.zeros(len(nodules), NODULE_DTYPE)
    zz, yy, xx = np.mgrid[:n_z, :size, :size]
    for k, (cz, cy, cx, r) in enumerate(nodules, start=1):
        row = table[k - 1]
        row["index"], row["center_z"], row["center_y"], row["center_x"] = k, cz, cy, cx
        row["diameter_mm"], row["n_readers"], row["label_source"] = 2 * r if r else 4.0, -1, b"sphere"
        if r == 0:
            row["excluded"] = 1
            continue
        ball = ((zz - cz) / 0.7) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mask[ball] = k
        hu[ball] = rng.normal(40, 20, int(ball.sum()))
    src = f"/data/luna16/subset{subset}/{uid}.mhd" if subset is not None else f"/data/lidc/{patient_id}/{uid}"
    scan = Scan(hu=np.clip(hu, -1024, 3071).astype(np.int16), origin=(-100.0, -120.0, -300.0),
                spacing=(0.7, 0.7, 1.25), direction=tuple(np.eye(3).ravel()), seriesuid=uid,
                patient_id=patient_id, source=source, path=src)
    write_scan_h5(path, scan, lung, mask, table)
    return path


def fresh(module_name):
    """The module re-imported: each run starts from a freshly imported module."""
    return importlib.reload(importlib.import_module(module_name))


def run_table(work, *args):
    return fresh("table").main([f"--WORK_DIR={work}", *args])


@pytest.fixture
def small_cohort(tmp_path):
    """4 scans of 3 patients (one with two series), LUNA16 folds 0..3, one excluded annotation."""
    d = tmp_path / "1_preprocessed"
    d.mkdir()
    specs = [("1.3.6.1.1", "P1", 0, ((8, 32, 30, 6.0),)),
             ("1.3.6.1.2", "P1", 1, ((5, 25, 40, 4.0), (11, 40, 22, 5.0))),
             ("1.3.6.1.3", "P2", 2, ((8, 32, 30, 6.0), (3, 30, 30, 0))),     # + an excluded annotation
             ("1.3.6.1.4", "P3", 3, ())]                                      # no nodule
    for i, (uid, pid, sub, nods) in enumerate(specs):
        make_stage1_scan(str(d / f"{uid}.h5"), uid, pid, seed=i, subset=sub, nodules=nods)
    return tmp_path


# ----------------------------------------------------------------------------- the network input

def test_crop_box_thesis_numbers():
    assert network_input.crop_box((512, 512)) == (57, 57, 400, 400)
    assert network_input.crop_box((300, 512, 512), crop=400) == (57, 57, 400, 400)
    assert network_input.crop_box((64, 64)) == (7, 7, 50, 50)
    y0, x0, h, w = network_input.crop_box((128, 96), crop=80)
    assert (h, w, x0) == (80, 80, 8) and y0 == 24        # centre 257/512 of each side


def test_network_input_is_zscored_slice_times_lung_mask():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 400, (3, 64, 64)).astype(np.int16)
    lung = (rng.random((3, 64, 64)) > 0.5).astype(np.uint8)
    x = network_input.network_input(hu, lung, 1)
    y0, x0, h, w = network_input.crop_box(hu.shape)
    s = hu[1].astype(np.float64)
    ref = (s - s.mean()) / s.std() * (lung[1] > 0)
    assert x.shape == (h, w, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], ref[y0:y0 + h, x0:x0 + w], atol=1e-5)
    x3 = network_input.network_input(hu, lung, 0, context_slices=3)       # neighbours clamped at the volume ends
    np.testing.assert_array_equal(x3[..., 0], network_input.network_input(hu, lung, 0)[..., 0])
    np.testing.assert_array_equal(x3[..., 2], network_input.network_input(hu, lung, 1)[..., 0])
    for c in (1, 3):                                                 # inference path == training path
        got = np.concatenate([v for _, v in network_input.volume_inputs(hu, lung, context_slices=c, batch_size=2)])
        want = np.stack([network_input.network_input(hu, lung, z, context_slices=c) for z in range(3)])
        np.testing.assert_array_equal(got, want)
    assert not np.any(np.isnan(network_input.network_input(np.zeros_like(hu), lung, 0)))


# ----------------------------------------------------------------------------- the table

@pytest.mark.parametrize("context", [1, 3])
def test_rows_equal_source_slices(small_cohort, context):
    assert run_table(small_cohort, "--NEG_PER_SCAN=3", f"--CONTEXT_SLICES={context}", "--PIXEL_MM=0") == 0
    path = small_cohort / "2_table" / "slices.h5"
    assert not os.path.exists(str(path) + ".tmp")
    assert json.load(open(small_cohort / "2_table" / "config.json"))["CONTEXT_SLICES"] == context
    with tables.open_file(str(path)) as h5:
        data, truth, slices = h5.root.data, h5.root.truth, h5.root.slices.read()
        assert data.chunkshape[0] == 1 and truth.chunkshape[0] == 1
        assert "blosc" in data.filters.complib
        assert int(h5.root._v_attrs.CONTEXT_SLICES) == context
        assert data.shape == ((len(slices), 50, 50) + ((3,) if context > 1 else ()))
        scans = {}
        for i, row in enumerate(slices):
            uid = row["seriesuid"].decode()
            if uid not in scans:
                scans[uid] = read_scan_h5(str(small_cohort / "1_preprocessed" / f"{uid}.h5"))
            s = scans[uid]
            z = int(row["z"])
            assert row["patient_id"].decode() == s["attrs"]["patient_id"]
            assert (row["y0"], row["x0"], row["height"], row["width"]) == (7, 7, 50, 50)
            want = network_input.network_input(s["hu"], s["lung_mask"], z, context_slices=context)
            got = data[i] if context > 1 else data[i][..., None]
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(truth[i], s["nodule_mask"][z, 7:57, 7:57] > 0)
            assert row["n_nodule_pixels"] == truth[i].sum()
            assert row["subset"] == int(uid[-1]) - 1
        for uid, s in scans.items():                                  # every labelled slice is in the table
            rows = slices[slices["seriesuid"] == uid.encode()]
            labelled = set(np.nonzero(s["nodule_mask"].reshape(len(s["hu"]), -1).max(1))[0])
            assert labelled == {int(r["z"]) for r in rows if r["reason"] == b"nodule"}
            assert sum(r["reason"] == b"negative" for r in rows) == 3
            assert all(r["n_nodule_pixels"] == 0 for r in rows if r["reason"] == b"negative")
        assert len(scans) == 4


def test_negatives_reproducible_and_thesis_rule(small_cohort):
    assert run_table(small_cohort, "--NEG_PER_SCAN=4") == 0
    with tables.open_file(str(small_cohort / "2_table" / "slices.h5")) as h5:
        first = h5.root.slices.read()
    assert run_table(small_cohort, "--NEG_PER_SCAN=4") == 0
    with tables.open_file(str(small_cohort / "2_table" / "slices.h5")) as h5:
        np.testing.assert_array_equal(first, h5.root.slices.read())
    assert run_table(small_cohort, "--NEG_PER_SCAN=0", "--THESIS_SLICES=True") == 0
    with tables.open_file(str(small_cohort / "2_table" / "slices.h5")) as h5:
        s = h5.root.slices.read()
    got = {(r["seriesuid"].decode(), int(r["z"])) for r in s}
    # nodules > 5 mm: 6 px radius -> 12 "mm", 4 px -> 8, 5 px -> 10; the excluded one is left out
    want = {("1.3.6.1.1", z) for z in (7, 8, 9)} | {("1.3.6.1.2", z) for z in (4, 5, 6, 10, 11, 12)} \
        | {("1.3.6.1.3", z) for z in (7, 8, 9)}
    assert got == want and set(s["reason"]) == {b"center"}


def test_bad_scan_reported_and_skipped(small_cohort, capsys):
    (small_cohort / "1_preprocessed" / "broken.h5").write_bytes(b"not an hdf5 file")
    assert run_table(small_cohort, "--NEG_PER_SCAN=2", "--N_WORKERS=2") == 1
    err = capsys.readouterr().err
    assert "broken.h5" in err and "skipped" in err
    with tables.open_file(str(small_cohort / "2_table" / "slices.h5")) as h5:
        assert len({r for r in h5.root.slices.col("seriesuid")}) == 4
    assert not os.path.exists(str(small_cohort / "2_table" / "slices.h5.tmp"))


# ----------------------------------------------------------------------------- the split

def fake_slices(series):
    """A /slices array: ``series`` = [(uid, patient, subset, n rows, n nodule rows)]."""
    import table
    dtype = tables.description.dtype_from_descr(table._slice_description())
    rows = []
    for uid, pid, sub, n, n_nod in series:
        for z in range(n):
            r = np.zeros((), dtype)
            r["seriesuid"], r["patient_id"], r["subset"], r["z"] = uid, pid, sub, z
            r["n_nodule_pixels"] = 30 if z < n_nod else 0
            rows.append(r)
    return np.array(rows, dtype)


def _parts_of(idx, slices, column):
    return {k: set(slices[column][v]) for k, v in idx.items()}


def test_split_by_patient_random_and_folds():
    import slice_idx
    rng = np.random.default_rng(3)
    series = []
    for p in range(40):
        for s in range(1 + p % 3):                                     # 1 to 3 series per patient
            series.append((f"1.2.{p}.{s}", f"LIDC-IDRI-{p:04d}", -1, int(rng.integers(2, 6)), p % 2))
    slices = fake_slices(series)
    idx, info = slice_idx.make_split(slices, 0.15, 0.15, seed=1, test_folds=(9,))
    assert info["mode"] == "random"
    pats = _parts_of(idx, slices, "patient_id")
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    assert sorted(np.concatenate(list(idx.values()))) == list(range(len(slices)))   # every row, once
    assert all(info[k]["nodule_rows"] > 0 for k in idx)                              # stratified
    assert len(info["test"]["patients"]) == 6 and len(info["val"]["patients"]) == 6
    idx2, _ = slice_idx.make_split(slices, 0.15, 0.15, seed=1)
    assert all(np.array_equal(idx[k], idx2[k]) for k in idx)                          # same seed, same split
    # LUNA16: folds from the subset folders; patient = series
    series = [(f"1.3.{i}", f"1.3.{i}", i % 10, 4, 1) for i in range(50)]
    slices = fake_slices(series)
    idx, info = slice_idx.make_split(slices, 0.2, 0.5, seed=0, test_folds=(8, 9))
    assert info["mode"] == "folds"
    assert set(slices["subset"][idx["test"]]) == {8, 9} and len(idx["test"]) == 10 * 4
    assert 8 not in set(slices["subset"][idx["train"]]) | set(slices["subset"][idx["val"]])
    assert len(info["val"]["patients"]) == 8                                          # 20 % of the 40 others
    # TEST_FROM: another run's test patients are the test part, whatever the folds say
    fixed = ["1.3.3", "1.3.17", "1.3.99"]                                            # 1.3.99 is not in this table
    idx, info = slice_idx.make_split(slices, 0.2, 0.5, seed=0, test_folds=(8, 9), test_patients=fixed)
    assert info["mode"] == "fixed" and set(slices["patient_id"][idx["test"]]) == {b"1.3.3", b"1.3.17"}
    pats = _parts_of(idx, slices, "patient_id")
    assert not ({b"1.3.3", b"1.3.17"} & (pats["train"] | pats["val"])) and len(pats["train"] | pats["val"]) == 48


def test_leakage_guard_removes_exactly_the_luna16_test_series(tmp_path):
    import slice_idx
    luna = tmp_path / "luna16"
    test_uids = set()
    for fold in range(10):
        (luna / f"subset{fold}").mkdir(parents=True)
        for j in range(3):
            uid = f"1.3.6.{fold}.{j}"
            (luna / f"subset{fold}" / f"{uid}.mhd").write_text("")
            if fold == 9:
                test_uids.add(uid)
    assert slice_idx.guard_series(str(luna), (9,)) == test_uids
    assert len(slice_idx.guard_series(str(luna), ())) == 30
    # LIDC table: 30 LUNA16 series (one per patient, some patients with a second, non-LUNA16 series) + 10 others
    series = []
    for fold in range(10):
        for j in range(3):
            pid = f"LIDC-IDRI-{fold}{j}"
            series.append((f"1.3.6.{fold}.{j}", pid, -1, 3, 1))
            if j == 0:
                series.append((f"1.9.{fold}", pid, -1, 2, 0))            # same patient, not in LUNA16
    series += [(f"1.8.{k}", f"LIDC-IDRI-X{k}", -1, 3, 1) for k in range(10)]
    slices = fake_slices(series)
    uid = slices["seriesuid"].astype(str)
    plain, _ = slice_idx.make_split(slices, 0.2, 0.2, seed=5, test_folds=())
    guarded, info = slice_idx.make_split(slices, 0.2, 0.2, seed=5, test_folds=(), guard=test_uids,
                                         guard_by_patient=False)
    before = set(uid[np.concatenate([plain["train"], plain["val"]])])
    after = set(uid[np.concatenate([guarded["train"], guarded["val"]])])
    assert before - after == before & test_uids                        # exactly the guarded series go
    assert not after & test_uids
    assert set(info["guard"]["removed_series"]) == before & test_uids
    assert info["guard"]["removed_rows"] == 3 * len(before & test_uids)
    assert np.array_equal(plain["test"], guarded["test"])
    # by patient: the sibling series of a guarded series' patient go too
    guarded_p, info_p = slice_idx.make_split(slices, 0.2, 0.2, seed=5, test_folds=(), guard=test_uids)
    pid = slices["patient_id"].astype(str)
    hit = set(pid[np.isin(uid, list(test_uids))])
    assert not set(pid[np.concatenate([guarded_p["train"], guarded_p["val"]])]) & hit
    siblings = {u for u in before if u.startswith("1.9.") and u.split(".")[2] == "9"}
    assert set(info_p["guard"]["removed_sibling_series"]) == siblings


def test_slice_idx_main_writes_split(small_cohort, tmp_path):
    assert run_table(small_cohort, "--NEG_PER_SCAN=2") == 0
    guard = tmp_path / "annotations.csv"
    guard.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.3.6.1.3,0,0,0,5\n1.3.6.1.3,1,1,1,6\n")
    rc = fresh("slice_idx").main([f"--WORK_DIR={small_cohort}", "--TEST_FOLDS=(1,)", f"--TEST_LUNA16_DIR={guard}",
                                  "--VAL_FRACTION=0.5"])
    out = small_cohort / "3_split"
    info = json.load(open(out / "split.json"))
    idx = {k: np.load(out / f"{k}_idx.npy") for k in ("train", "val", "test")}
    assert info["mode"] == "folds" and info["test"]["patients"] == ["P1"]             # fold 1 -> all of P1
    assert "1.3.6.1.3" not in info["train"]["series"] + info["val"]["series"]
    assert info["guard"]["removed_series"] == ["1.3.6.1.3"]
    pats = [set(info[k]["patients"]) for k in idx]
    assert sum(len(p) for p in pats) == len(set().union(*pats))
    assert rc == 0 and all(v.dtype == np.int64 for v in idx.values())


# ----------------------------------------------------------------------------- memory

def _table_peak(work, n_scans, size=128, n_z=40):
    d = work / "1_preprocessed"
    d.mkdir(parents=True)
    for i in range(n_scans):
        make_stage1_scan(str(d / f"1.2.{i:03d}.h5"), f"1.2.{i:03d}", f"P{i}", size=size, n_z=n_z, seed=i,
                         nodules=((n_z // 2, size // 2, size // 2, 8.0), (n_z // 3, size // 3, size // 2, 5.0)))
    mod = fresh("table")
    tracemalloc.start()
    try:
        assert mod.main([f"--WORK_DIR={work}", "--NEG_PER_SCAN=10"]) == 0
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_flat_in_number_of_scans(tmp_path):
    small = _table_peak(tmp_path / "w10", 10)
    large = _table_peak(tmp_path / "w50", 50)
    print(f"table.py peak traced memory: 10 scans {small / 2**20:.2f} MiB, 50 scans {large / 2**20:.2f} MiB")
    assert large <= 1.2 * small
