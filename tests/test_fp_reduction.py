"""Stage 6 (fp_reduction.py, with fp_patches.py and fp_net.py): patches at world coordinates (flipped scans too),
edge padding, a tiny end-to-end run (training a few steps, then the score-only contract on a run it did not train
on, and --RESUME=1, also after a kill in the middle of a checkpoint), LUNA16's candidates_V2.csv format, a failing
scan, the blob candidates (candidates.detect_blobs: a ball found at its world position, nothing outside the lung
mask, merging), scoring on a dask LocalCluster (DASK_SCHEDULER) and a run folder of the earlier layout. Hand-made
stage-1 files (small, fast), no stage 2-5 needed: the stage-5 report is a candidates.csv and config.json written
here."""
import csv
import glob
import json
import os
import shutil
import sys

import numpy as np
import pytest

import candidates
import ct_io
from conftest import run_killable
import fp_net
import fp_patches
import fp_reduction
from ct_io import NODULE_DTYPE, Scan, write_scan_h5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
FLIPPED = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)


def world_grid(shape, origin, spacing, direction):
    """World (x, y, z) of every voxel of a (Z, Y, X) volume -> (Z, Y, X, 3)."""
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    return ct_io.voxel_to_world(zyx.astype(float), origin, spacing, direction).reshape(*shape, 3)


def ball_volume(shape, origin, spacing, direction, balls, background=-850.0, noise=0.0, seed=0):
    """HU volume with bright balls at world centres: balls = [(x, y, z, radius_mm, hu)]."""
    rng = np.random.default_rng(seed)
    w = world_grid(shape, origin, spacing, direction)
    hu = np.full(shape, background) + (rng.normal(0, noise, shape) if noise else 0)
    for x, y, z, r, v in balls:
        hu[((w - np.array([x, y, z])) ** 2).sum(-1) <= r * r] = v
    return np.clip(hu, -1024, 3071).astype(np.int16), w


@pytest.mark.parametrize("direction", [IDENTITY, FLIPPED], ids=["identity", "flipped"])
def test_patch_centre_at_world_coordinates(direction):
    origin = (40.0, 30.0, -200.0) if direction == FLIPPED else (-40.0, -30.0, -200.0)
    spacing = (0.7, 0.8, 2.0)
    shape = (40, 110, 120)
    centre = ct_io.voxel_to_world(np.array([20.3, 55.2, 60.7]), origin, spacing, direction)
    marker = centre + np.array([9.0, 0.0, 0.0])            # +9 mm along world x: at patch x + 9
    hu, _ = ball_volume(shape, origin, spacing, direction,
                        [(*centre, 4.0, 100.0), (*marker, 2.0, 600.0)])
    side = 25
    patch = fp_patches.extract_patches(hu, origin, spacing, direction, centre[None], side, 1.0)[0]
    assert patch.shape == (side, side, side)
    c = (side - 1) / 2
    from scipy import ndimage
    labels, _ = ndimage.label(patch > -300)
    nodule = labels == labels[int(c), int(c), int(c)]          # the component at the centre (not the marker)
    com = np.array(np.nonzero(nodule)).mean(axis=1)
    assert np.allclose(com, c, atol=0.6), com                # the nodule at the patch centre (z, y, x)
    assert patch[int(c), int(c), int(c)] > 0
    bright = np.array(np.nonzero(patch > 350)).mean(axis=1)
    assert np.allclose(bright, [c, c, c + 9], atol=0.8), bright   # world +x = patch +x, flipped or not


def test_candidate_at_edge_is_padded():
    origin, spacing = (10.0, 20.0, -100.0), (0.9, 0.9, 2.5)
    shape = (12, 30, 30)
    hu, _ = ball_volume(shape, origin, spacing, FLIPPED, [], background=-700, noise=30, seed=1)
    corner = ct_io.voxel_to_world(np.array([0.0, 0.0, 0.0]), origin, spacing, FLIPPED)
    beyond = ct_io.voxel_to_world(np.array([-20.0, 40.0, 45.0]), origin, spacing, FLIPPED)
    patches = fp_patches.extract_patches(hu, origin, spacing, FLIPPED, np.stack([corner, beyond]), 16, 1.0)
    assert patches.shape == (2, 16, 16, 16)
    assert np.isfinite(patches).all()
    assert patches.min() >= hu.min() - 1e-3 and patches.max() <= hu.max() + 1e-3   # edge voxels repeated
    c = 7.5
    assert abs(patches[0][8, 8, 8] - hu[0, 0, 0]) < 80          # near the corner voxel's value
    x = fp_patches.uint8_to_input(fp_patches.to_uint8(patches, fp_reduction.HU_WINDOW))
    assert x.min() >= -1 and x.max() <= 1 and c


# ----------------------------------------------------------------------------- blob candidates

@pytest.mark.parametrize("direction", [IDENTITY, FLIPPED], ids=["identity", "flipped"])
def test_blob_detector_finds_sphere_at_world_position(direction):
    """A 6 mm ball in the lung is found at its world position (anisotropic voxels, flipped axes too); a brighter
    ball outside the lung mask (beyond its dilation) is not; vessels (tubes) rank below the ball."""
    blob = candidates.BlobSettings()                    # stage 6's defaults
    origin = (60.0, 50.0, -120.0) if direction == FLIPPED else (-60.0, -50.0, -120.0)
    spacing = (0.8, 0.7, 2.0)
    shape = (40, 140, 150)
    vox = lambda zyx: ct_io.voxel_to_world(np.asarray(zyx, float), origin, spacing, direction)
    inside, outside = vox((18.3, 60.4, 70.2)), vox((20.0, 70.0, 135.0))
    hu, w = ball_volume(shape, origin, spacing, direction, [(*inside, 3.0, 40.0), (*outside, 4.0, 60.0)],
                        noise=25, seed=3)
    axis = vox((0.0, 100.0, 40.0))[:2]
    tube = ((w[..., :2] - axis) ** 2).sum(-1) <= 1.5 ** 2                     # a vessel along z
    hu[tube] = 30
    lung = np.zeros(shape, np.uint8)
    lung[2:38, 10:130, 10:110] = 1                      # the outside ball sits 25 voxels (20 mm) beyond it
    xyz, resp = candidates.detect_blobs(hu, lung, origin, spacing, direction, 5, blob=blob)
    assert 1 <= len(xyz) <= 5 and np.all(np.diff(resp) <= 0)
    assert np.linalg.norm(xyz[0] - inside) < 1.5, (xyz[0], inside)         # the strongest blob: the ball
    assert (np.linalg.norm(xyz - outside, axis=1) > 8.0).all()
    assert (np.linalg.norm(xyz[:, None] - xyz[None], axis=2)[np.triu_indices(len(xyz), 1)] > blob.merge_mm).all()
    # a stage-5 candidate 2 mm from the ball: the blob there is dropped, not duplicated
    near = inside + np.array([2.0, 0.0, 0.0])
    xyz2, _ = candidates.detect_blobs(hu, lung, origin, spacing, direction, 5, existing_xyz=near[None], blob=blob)
    assert (np.linalg.norm(xyz2 - inside, axis=1) > blob.merge_mm - 1.0).all()
    assert candidates.detect_blobs(hu, np.zeros_like(lung), origin, spacing, direction, 5, blob=blob)[0].shape == (0, 3)
    # ranking: the Laplacian of Gaussian sees the vessel as a blob of 2/3 the ball's strength; the Hessian's
    # weakest curvature (BLOB_RANK="hessian", the default) all but ignores it
    on_tube = lambda p: np.linalg.norm(p[:, :2] - axis, axis=1) < 1.5
    for rank, most in (("hessian", 0.05), ("log", 1.0)):
        xyz, resp = candidates.detect_blobs(hu, lung, origin, spacing, direction, 10,
                                            blob=candidates.BlobSettings(rank=rank))
        assert np.linalg.norm(xyz[0] - inside) < 1.5 and on_tube(xyz[1:]).all()
        assert resp[1] < most * resp[0] and (rank == "hessian" or resp[1] > 0.5 * resp[0])


def test_merge_far_drops_points_near_existing_and_stronger():
    pts = np.array([[0.0, 0, 0], [3.0, 0, 0], [20.0, 0, 0], [40.0, 0, 0], [60.0, 0, 0]])
    merge_far = candidates.merge_far
    assert merge_far(pts, None, 10, merge_mm=5.0).tolist() == [0, 2, 3, 4]     # [3, 0, 0] next to [0, 0, 0]
    assert merge_far(pts, np.array([[19.0, 1, 0]]), 10, merge_mm=5.0).tolist() == [0, 3, 4]
    assert merge_far(pts, None, 2, merge_mm=5.0).tolist() == [0, 2]             # at most n


# ----------------------------------------------------------------------------- a tiny cohort of stage-1 files

def make_scan(path, uid, seed, flipped):
    """A 24 x 64 x 64 stage-1 file: lung-like noise, a box lung mask, 2 nodules (balls), 1 excluded annotation,
    and 2 vessels (long bright tubes along z: the false positives). Returns (nodule rows, vessel points)."""
    rng = np.random.default_rng(seed)
    direction = FLIPPED if flipped else IDENTITY
    spacing = (1.4, 1.4, 2.5)
    shape = (24, 64, 64)
    origin = (45.0, 45.0, -150.0) if flipped else (-45.0, -45.0, -150.0)
    vox = lambda zyx: ct_io.voxel_to_world(np.asarray(zyx, float), origin, spacing, direction)
    nod = [vox((rng.uniform(7, 17), rng.uniform(18, 46), rng.uniform(18, 46))) for _ in range(2)]
    radii = rng.uniform(3.5, 6.0, 2)
    hu, w = ball_volume(shape, origin, spacing, direction, [(*c, r, 30.0) for c, r in zip(nod, radii)],
                        noise=40, seed=seed)
    vessels = []
    for _ in range(2):
        y, x = rng.uniform(15, 49, 2)
        p = vox((12.0, y, x))
        tube = ((w[..., :2] - p[:2]) ** 2).sum(-1) <= 2.0 ** 2
        hu[tube] = 20
        vessels.append(p)
    lung = np.zeros(shape, np.uint8)
    lung[:, 6:58, 6:58] = 1
    mask = np.zeros(shape, np.uint8)
    rows = np.zeros(3, NODULE_DTYPE)
    excl = vox((12.0, 10.0, 10.0))
    for k, (c, r) in enumerate(list(zip(nod, radii)) + [(excl, 2.0)], start=1):
        z, y, x = ct_io.world_to_voxel(c, origin, spacing, direction)
        rows[k - 1] = (k, z, y, x, c[0], c[1], c[2], 2 * r, -1, b"sphere", int(k == 3))
        if k < 3:
            mask[((w - c) ** 2).sum(-1) <= r * r] = k
    scan = Scan(hu=hu, origin=origin, spacing=spacing, direction=direction, seriesuid=uid, patient_id=uid,
                source="luna16", path=f"/data/luna16/subset0/{uid}.mhd")
    write_scan_h5(path, scan, lung, mask, rows)
    return rows, vessels


def make_run(work, seed, n_scans=6):
    """Stage-1 files, split.json (train 3, val 1, test 2 scans) and a stage-5 report (5_report/candidates.csv of
    the test part, config.json) with nodule hits, vessel false positives and random points. Returns
    {uid: (nodule rows, vessel points)}."""
    os.makedirs(os.path.join(work, "1_preprocessed"), exist_ok=True)
    rng = np.random.default_rng(seed)
    scans = {}
    for i in range(n_scans):
        uid = f"1.2.3.{seed}.{i}"
        scans[uid] = make_scan(os.path.join(work, "1_preprocessed", f"{uid}.h5"), uid, seed * 100 + i, i % 2 == 1)
    uids = sorted(scans)
    parts = {"train": uids[:n_scans - 3], "val": uids[n_scans - 3:n_scans - 2], "test": uids[n_scans - 2:]}
    os.makedirs(os.path.join(work, "3_split"), exist_ok=True)
    json.dump({k: {"patients": v, "series": v} for k, v in parts.items()},
              open(os.path.join(work, "3_split", "split.json"), "w"))
    for name, part in (("5_report", "test"), ("5_report_all", "all")):
        rows = []
        for uid in (uids if part == "all" else parts[part]):
            nod, vessels = scans[uid]
            for n in nod[:2]:
                c = np.array([n["world_x"], n["world_y"], n["world_z"]]) + rng.normal(0, 0.5, 3)
                rows.append((uid, *c, rng.uniform(0.3, 0.9)))
            for v in vessels:
                rows.append((uid, *v, rng.uniform(0.5, 1.0)))
            for _ in range(3):
                rows.append((uid, *(np.array([nod[0]["world_x"], nod[0]["world_y"], -120.0])
                                    + rng.uniform(-25, 25, 3)), rng.uniform(0.05, 0.5)))
        os.makedirs(os.path.join(work, name), exist_ok=True)
        with open(os.path.join(work, name, "candidates.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "probability"])
            w.writerows(rows)
        json.dump({"SCANS": part}, open(os.path.join(work, name, "config.json"), "w"))
    return scans


TINY = ["--PATCH_MM=16", "--VOXEL_MM=2.0", "--WIDTH=4", "--BLOCKS=2", "--DENSE=8", "--BATCH_SIZE=8",
        "--STEPS_PER_EPOCH=3", "--RANDOM_NEG_PER_SCAN=4", "--DENSE_NEG_PER_SCAN=4", "--MAX_SHIFT_MM=2.0",
        "--SHIFT_MM=1.0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("fp_train"))
    make_run(work, seed=1)
    rc = fp_reduction.main([f"--WORK_DIR={work}", "--EPOCHS=1", f"--TRAIN_CANDIDATES={work}/5_report_all/candidates.csv",
                       *TINY])
    assert rc == 0
    return work


def check_outputs(out, n_scans):
    for name in ("model.keras", "config.json", "candidates.csv", "candidates_detail.csv", "metrics.json", "froc.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["n_scans"] == n_scans
    after = m["after"]
    assert set(after["froc"]["by_size"]) == {"<5", "5-10", "10-20", ">=20"}
    assert len(after["froc"]["sensitivities"]) == 7
    assert after["operating_point"]["fp_per_scan"] >= 0
    assert after["evaluation"]["evaluation"].startswith("official-equivalent LUNA16 FROC")   # it says what it used
    assert "bootstrap over scans" in after["evaluation"]["interval"]
    assert m["timing"]["seconds_per_scan"] > 0
    rows = list(csv.DictReader(open(os.path.join(out, "candidates.csv"))))
    assert rows and list(rows[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
    return m, rows


def test_train_writes_every_output(trained):
    out = os.path.join(trained, "6_fp_reduction")
    m, rows = check_outputs(out, 2)
    assert m["before"]["cpm"]["value"] is not None and m["after"]["cpm"]["value"] is not None
    assert m["training"]["patches"]["hard_negatives"] == 3 * 5            # vessels and random marks of 3 scans
    assert m["training"]["patches"]["nodule_centres"] == 3 * 2            # excluded annotations are not positives
    assert len(rows) == 2 * 7                                             # every test candidate, rescored
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["PATCH_SIDE"] == 8 and cfg["COMBINE_USED"] in ("fp", "product", "mean")
    for name in ("last.keras", "state.json", "history.csv"):
        assert os.path.isfile(os.path.join(out, name))
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_prefetched_batches_equal_the_drawn_ones(trained):
    """The sampler's batches made ahead in a thread are the batches drawn in the training thread, in order."""
    import fp_patches
    cfg = json.load(open(os.path.join(trained, "6_fp_reduction", "config.json")))
    store = fp_patches.PatchStore(os.path.join(trained, "6_fp_reduction", "patches", "train"))
    assert store.load(str(np.load(store.meta_path)["key"]))
    sampler = fp_patches.Sampler(store, cfg["PATCH_SIDE"], cfg)
    ahead, inline = list(sampler.batches(3, 5, 8, prefetch=2)), list(sampler.batches(3, 5, 8, prefetch=0))
    assert len(ahead) == len(inline) == 5
    for (xa, ya), (xb, yb) in zip(ahead, inline):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_blob_candidates_end_to_end(tmp_path):
    """BLOB_CANDIDATES=4: blobs join every scan's list (training: hard negatives or positives; test: rescored),
    none within BLOB_MERGE_MM of a stage-5 candidate, at most 4 a scan."""
    work = str(tmp_path / "blobs")
    make_run(work, seed=5)
    rc = fp_reduction.main([f"--WORK_DIR={work}", "--EPOCHS=1", "--BLOB_CANDIDATES=4", "--THRESHOLD=0.7", *TINY])
    assert rc == 0
    out = os.path.join(work, "6_fp_reduction")
    m, rows = check_outputs(out, 2)
    detail = list(csv.DictReader(open(os.path.join(out, "candidates_detail.csv"))))
    blobs = [r for r in detail if r["source"] == "blob"]
    stage5 = [r for r in detail if r["source"] == "stage5"]
    assert len(stage5) == 2 * 7 and 1 <= len(blobs) <= 2 * 4 and len(rows) == len(detail)
    assert m["timing"]["n_blob_candidates"] == len(blobs) and m["timing"]["blob_seconds_per_scan"] > 0
    assert all(float(r["stage5_probability"]) == 0.0 for r in blobs)
    xyz = lambda r: np.array([float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])])
    for b in blobs:
        assert min(np.linalg.norm(xyz(b) - xyz(c)) for c in stage5 if c["seriesuid"] == b["seriesuid"]) > 5.0
    # training: no stage-5 candidates on the training scans (5_report covers the test part): blobs are the
    # candidate patches there, hard negatives (vessels, noise) and positives (on the balls)
    patches = m["training"]["patches"]
    assert patches["positive_candidates"] == 3 * 2            # a blob on each training ball
    assert patches["hard_negatives"] <= 3 * 4
    # scoring only with this model repeats its blob candidates and operating point (its config.json), unless the
    # command line says otherwise
    model = os.path.join(out, "model.keras")
    for name, extra, n_blobs, threshold in (("again", [], len(blobs), 0.7),
                                             ("no_blobs", ["--BLOB_CANDIDATES=0", "--THRESHOLD=0.5"], 0, 0.5)):
        assert fp_reduction.main([f"--WORK_DIR={work}", f"--MODEL={model}", f"--OUT_DIR={tmp_path / name}", *extra]) == 0
        ms = json.load(open(tmp_path / name / "metrics.json"))
        assert ms["timing"]["n_blob_candidates"] == n_blobs
        assert ms["after"]["operating_point"]["threshold"] == threshold


def test_resume_continues(trained):
    out = os.path.join(trained, "6_fp_reduction")
    rc = fp_reduction.main([f"--WORK_DIR={trained}", "--EPOCHS=2", "--RESUME=1",
                       f"--TRAIN_CANDIDATES={trained}/5_report_all/candidates.csv", *TINY])
    assert rc == 0
    state = json.load(open(os.path.join(out, "state.json")))
    assert state["epoch"] == 1 and len(state["history"]) == 2
    assert state["iterations"] == 2 * 3


def test_score_only_on_another_run(trained, tmp_path):
    work = str(tmp_path / "other")
    make_run(work, seed=2)
    model = os.path.join(trained, "6_fp_reduction", "model.keras")
    rc = fp_reduction.main([f"--WORK_DIR={work}", "--SCANS=all", f"--MODEL={model}"])   # geometry from the model's config
    assert rc == 0
    out = os.path.join(work, "6_fp_reduction")
    m, rows = check_outputs(out, 2)               # stage 5 evaluated the 2 test scans: those are scored
    assert m["training"] is None
    assert not os.path.exists(os.path.join(out, "patches"))
    assert json.load(open(os.path.join(out, "config.json")))["PATCH_SIDE"] == 8


def test_an_ensemble_scores_the_mean_of_its_models(trained, tmp_path):
    """MODEL=a.keras,b.keras scores each candidate by the mean of the models' probabilities (fp_net.predict over
    a list); end to end, an ensemble of the trained model with a copy of itself gives the single model's scores."""
    import keras
    import fp_net
    model = os.path.join(trained, "6_fp_reduction", "model.keras")
    other = fp_net.build_model(8, 4, 2, 8, 0.0, 1e-3)
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 8, 1)).astype(np.float32)
    net = keras.saving.load_model(model, compile=False)
    one, two = fp_net.predict(net, x, 2, 4), fp_net.predict(other, x, 2, 4)
    np.testing.assert_allclose(fp_net.predict([net, other], x, 2, 4), (one + two) / 2, atol=1e-6)
    copy = str(tmp_path / "copy" / "model.keras")
    os.makedirs(os.path.dirname(copy))
    shutil.copyfile(model, copy)
    shutil.copyfile(os.path.join(trained, "6_fp_reduction", "config.json"), os.path.join(tmp_path, "copy", "config.json"))
    runs = {}
    for name, given in (("single", model), ("ensemble", f"{model},{copy}")):
        out = str(tmp_path / name)
        assert fp_reduction.main([f"--WORK_DIR={trained}", f"--MODEL={given}", f"--OUT_DIR={out}"]) == 0
        runs[name] = list(csv.DictReader(open(os.path.join(out, "candidates_detail.csv"))))
    assert [r["stage6_probability"] for r in runs["ensemble"]] == [r["stage6_probability"] for r in runs["single"]]


def test_candidates_v2_format(trained, tmp_path):
    """LUNA16's false-positive-reduction track file: seriesuid, coordX, coordY, coordZ, class (no probability)."""
    work = str(tmp_path / "v2")
    scans = make_run(work, seed=3)
    path = os.path.join(work, "candidates_V2.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
        for uid, (nod, vessels) in scans.items():
            for n in nod[:2]:
                w.writerow([uid, n["world_x"] + 0.5, n["world_y"], n["world_z"], 1])
            for v in vessels:
                w.writerow([uid, *v, 0])
    # training on the file's candidates, then the test part scored
    rc = fp_reduction.main([f"--WORK_DIR={work}", f"--CANDIDATES={path}", "--EPOCHS=1", *TINY])
    assert rc == 0
    m, rows = check_outputs(os.path.join(work, "6_fp_reduction"), 2)
    assert m["before"] is None                   # no probability in the file: nothing to compare before
    assert m["training"]["patches"]["positive_candidates"] == 3 * 2
    assert m["after"]["candidate_recall"]["value"] == 1.0
    assert len(rows) == 2 * 4


def test_failing_scan_is_reported_and_skipped(trained, tmp_path, capsys):
    work = str(tmp_path / "bad")
    scans = make_run(work, seed=4)
    test_uid = sorted(scans)[-1]
    with open(os.path.join(work, "1_preprocessed", f"{test_uid}.h5"), "wb") as f:
        f.write(b"not hdf5")
    model = os.path.join(trained, "6_fp_reduction", "model.keras")
    rc = fp_reduction.main([f"--WORK_DIR={work}", f"--MODEL={model}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"{test_uid}.h5: not an HDF5 file" in err
    m = json.load(open(os.path.join(work, "6_fp_reduction", "metrics.json")))
    assert m["n_scans"] == 2 and m["n_scans_failed"] == 1        # the failed scan counts in FP/scan
    assert m["timing"]["scans_scored"] == 1


def test_auc_ranks_with_ties():
    assert fp_net.auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert fp_net.auc([1, 0], [0.5, 0.5]) == 0.5
    assert fp_net.auc([0, 0], [0.1, 0.2]) is None


def test_scoring_on_dask_matches_the_local_run(trained, tmp_path):
    """--DASK_SCHEDULER=<LocalCluster, 2 workers>: each scan scored on a worker (its cached model, blobs found
    there) gives the local run's candidates.csv, candidates_detail.csv and metrics; a failing scan is reported."""
    distributed = pytest.importorskip("distributed")
    work = str(tmp_path / "dask")
    scans = make_run(work, seed=6)
    model = os.path.join(trained, "6_fp_reduction", "model.keras")
    common = [f"--WORK_DIR={work}", "--SCANS=all", f"--MODEL={model}", "--BLOB_CANDIDATES=3", "--TTA=2",
              f"--CANDIDATES={work}/5_report_all/candidates.csv"]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster:
        outs = {}
        for name, extra in (("local", []), ("dask", [f"--DASK_SCHEDULER={cluster.scheduler_address}"])):
            outs[name] = str(tmp_path / name)
            assert fp_reduction.main(common + [f"--OUT_DIR={outs[name]}"] + extra) == 0
        with distributed.Client(cluster) as client:         # the scans ran on the workers: their cached models
            cached = client.run(lambda: len(getattr(sys.modules.get("fp_net"), "_WORKER_MODELS", {})))
        assert sorted(cached.values()) in ([0, 1], [1, 1]) and len(cached) == 2
        bad = sorted(scans)[1]
        with open(os.path.join(work, "1_preprocessed", f"{bad}.h5"), "wb") as f:
            f.write(b"not hdf5")
        assert fp_reduction.main(common + [f"--OUT_DIR={tmp_path / 'bad'}",
                                      f"--DASK_SCHEDULER={cluster.scheduler_address}"]) == 1
    for name in ("candidates.csv", "candidates_detail.csv"):
        a, b = (list(csv.reader(open(os.path.join(outs[k], name)))) for k in ("local", "dask"))
        assert a == b and len(a) > 6 * 7, name
    ml, md = (json.load(open(os.path.join(outs[k], "metrics.json"))) for k in ("local", "dask"))
    assert ml["after"] == md["after"] and ml["before"] == md["before"] and md["n_scans"] == 6
    assert md["timing"]["n_blob_candidates"] == ml["timing"]["n_blob_candidates"] > 0
    mb = json.load(open(tmp_path / "bad" / "metrics.json"))
    assert mb["n_scans"] == 6 and mb["n_scans_failed"] == 1
    assert f"{bad}.h5: not an HDF5 file" in mb["failed_scans"][0]["error"]


# ----------------------------------------------------------------------------- a kill in the middle of a checkpoint

KILL_ARGS = ["--EPOCHS=3", *TINY]


def _run_killable(args, kill_at=""):
    return run_killable("fp_reduction", args, kill_at)


def _training_record(out):
    """What a training run leaves, without its times: history rows, state, both networks' weights, the scores."""
    import keras
    untimed = lambda row: {k: v for k, v in row.items() if "seconds" not in k and k != "patches_per_s"}
    hist = [untimed(r) for r in csv.DictReader(open(os.path.join(out, "history.csv")))]
    state = json.load(open(os.path.join(out, "state.json")))
    state.pop("train_seconds")
    state["history"] = [untimed(r) for r in state["history"]]
    weights = {n: keras.saving.load_model(os.path.join(out, n), compile=False).get_weights()
               for n in ("model.keras", "last.keras")}
    scores = open(os.path.join(out, "candidates_detail.csv")).read()
    return hist, state, weights, scores


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An uninterrupted 3-epoch training (in its own process, as the killed runs below)."""
    work = str(tmp_path_factory.mktemp("fp_whole"))
    make_run(work, seed=7)
    p = _run_killable([f"--WORK_DIR={work}", *KILL_ARGS])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return os.path.join(work, "6_fp_reduction")


@pytest.mark.parametrize("kill_at", ["state.json.tmp:2", "last.keras.tmp.keras:2"])
def test_training_killed_in_a_checkpoint_resumes_to_the_same_model(uninterrupted, tmp_path, kill_at):
    """SIGKILL in epoch 2's checkpoint (between last.keras's rename and state.json's, or before last.keras's),
    then --RESUME=1: the same history, state, networks (best and last) and scores as the uninterrupted run;
    epoch 2 is replayed only when its checkpoint was not complete."""
    work = str(tmp_path / "work")
    make_run(work, seed=7)
    p = _run_killable([f"--WORK_DIR={work}", *KILL_ARGS], kill_at=kill_at)
    assert p.returncode == -9, p.stdout[-2000:] + p.stderr[-2000:]
    out = os.path.join(work, "6_fp_reduction")
    assert glob.glob(os.path.join(out, "*.tmp*"))                 # the kill left temporary files
    p = _run_killable([f"--WORK_DIR={work}", "--RESUME=1", *KILL_ARGS])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "resuming from" in p.stdout and "epoch 3:" in p.stdout
    assert ("epoch 2:" in p.stdout) == kill_at.startswith("last.keras")
    assert not glob.glob(os.path.join(out, "*.tmp*"))
    h0, s0, w0, c0 = _training_record(uninterrupted)
    h1, s1, w1, c1 = _training_record(out)
    assert [r["epoch"] for r in h1] == ["0", "1", "2"] and h0 == h1 and s0 == s1
    for name in w0:
        for a, b in zip(w0[name], w1[name]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert c0 == c1


def test_a_run_folder_of_the_earlier_layout_is_refused(tmp_path):
    """A run folder whose stage-6 output is still named 7_fp_reduction/ is refused with how to rename it."""
    work = tmp_path / "old"
    (work / "7_fp_reduction").mkdir(parents=True)
    with pytest.raises(SystemExit, match="7_fp_reduction.*6_fp_reduction"):
        fp_reduction.main([f"--WORK_DIR={work}"])


@pytest.mark.parametrize("kind", ["corrupt", "stage4", "wrong_geometry"])
def test_a_given_model_is_checked_before_anything_is_written(trained, tmp_path, kind):
    """--MODEL=<a corrupt file, a 2D (stage-4-like) network, or patches of another size>: one line naming the
    model and what is wrong, exit 2-style SystemExit; the run's trained model.keras, config.json and report stay
    as they were (byte for byte)."""
    import keras
    out = os.path.join(trained, "6_fp_reduction")
    before = {n: open(os.path.join(out, n), "rb").read() for n in ("model.keras", "config.json", "metrics.json")}
    bad = str(tmp_path / "given" / "model.keras")
    os.makedirs(os.path.dirname(bad))
    if kind == "corrupt":
        open(bad, "wb").write(b"PK\x03\x04 not a keras file")
        expected = "not a stage-6 model"
    elif kind == "stage4":
        inp = keras.Input((32, 32, 3))
        keras.Model(inp, keras.layers.Conv2D(2, 3, padding="same")(inp)).save(bad)
        expected = "not a stage-6 model"
    else:
        inp = keras.Input((12, 12, 12, 1))
        keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(inp))).save(bad)
        expected = "takes patches of"
    with pytest.raises(SystemExit, match=f"^{bad}: .*{expected}"):
        fp_reduction.main([f"--WORK_DIR={trained}", f"--MODEL={bad}", f"--OUT_DIR={out}"])
    assert {n: open(os.path.join(out, n), "rb").read() for n in before} == before


def test_a_given_model_never_replaces_a_model_trained_in_the_folder(trained, tmp_path):
    """Scoring with another run's model into the folder of a trained one is refused; into its own folder (the
    same file) or a new folder it scores."""
    out = os.path.join(trained, "6_fp_reduction")
    other = str(tmp_path / "other.keras")
    import shutil
    shutil.copyfile(os.path.join(out, "model.keras"), other)
    shutil.copyfile(os.path.join(out, "config.json"), str(tmp_path / "config.json"))
    before = open(os.path.join(out, "model.keras"), "rb").read()
    with pytest.raises(SystemExit, match="holds the stage-6 model trained there"):
        fp_reduction.main([f"--WORK_DIR={trained}", f"--MODEL={other}", f"--OUT_DIR={out}"])
    assert open(os.path.join(out, "model.keras"), "rb").read() == before
    assert fp_reduction.main([f"--WORK_DIR={trained}", f"--MODEL={other}", f"--OUT_DIR={tmp_path / 'scored'}"]) == 0


def test_scoring_where_every_scan_fails_leaves_the_earlier_files(trained, tmp_path):
    work = str(tmp_path / "allbad")
    make_run(work, seed=5)
    model = os.path.join(trained, "6_fp_reduction", "model.keras")
    out = str(tmp_path / "scored")
    assert fp_reduction.main([f"--WORK_DIR={work}", f"--MODEL={model}", f"--OUT_DIR={out}"]) == 0
    before = {n: open(os.path.join(out, n), "rb").read() for n in ("candidates.csv", "candidates_detail.csv")}
    for p in glob.glob(os.path.join(work, "1_preprocessed", "*.h5")):
        open(p, "wb").write(b"damaged")
    with pytest.raises(SystemExit, match="every scan failed"):
        fp_reduction.main([f"--WORK_DIR={work}", f"--MODEL={model}", f"--OUT_DIR={out}"])
    assert {n: open(os.path.join(out, n), "rb").read() for n in before} == before


def test_candidate_files_with_nan_scores_or_points_outside_the_scan(trained, tmp_path, capsys):
    """A probability that is NaN is refused in one line naming the file and line (it would change how the scores
    combine); a candidate outside its scan's volume is scored but said, one line per scan."""
    work = str(tmp_path / "edge")
    make_run(work, seed=8)
    path = os.path.join(work, "5_report", "candidates.csv")
    rows = list(csv.reader(open(path)))
    uid = rows[1][0]
    bad = str(tmp_path / "nan.csv")
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows(rows[:2] + [[uid, "1.0", "2.0", "3.0", "nan"]])
    with pytest.raises(SystemExit, match=f"^{bad}: line 3: probability 'nan' is not a finite number"):
        candidates.CandidateTable([bad])
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow([uid, "900.0", "900.0", "900.0", "0.5"])        # far outside the scan
    model = os.path.join(trained, "6_fp_reduction", "model.keras")
    assert fp_reduction.main([f"--WORK_DIR={work}", f"--MODEL={model}", f"--OUT_DIR={tmp_path / 'out'}"]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "outside the scan volume" in ln]
    assert warned == [f"warning: {uid}: 1 candidate(s) outside the scan volume (scored on patches of the repeated "
                      f"edge voxels)"]
