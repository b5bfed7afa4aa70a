"""postprocess.main on a tiny WORK_DIR: hand-made stage-1 files, a split as slice_idx.py writes it, and a tiny
saved Keras model (a 1x1 convolution: nodule where the network input is bright inside the lungs)."""
import csv
import json
import os

import numpy as np
import pytest

import ct_io
import metrics
import inference
import postprocess as pp
import report

# Keras's own get_weights/set_weights trip numpy 2's copy-keyword deprecation; not this project's code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHAPE = (10, 64, 64)
SPACING = (0.8, 0.8, 2.0)
FLIP = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)


def ellipse(shape, cy, cx, ry, rx):
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_scan(path, uid, direction=IDENTITY, nodules=((5, 30, 20, 8.0),), excluded=()):
    """A body with two lungs and soft-tissue balls (nodules) in the left lung; stage-1 file at ``path``."""
    origin = (-25.0, 40.0, -100.0)
    hu = np.full(SHAPE, -1000, np.int16)
    body = ellipse(SHAPE[1:], 32, 32, 28, 30)
    lungs = ellipse(SHAPE[1:], 32, 20, 18, 9) | ellipse(SHAPE[1:], 32, 44, 18, 9)
    hu[:, body] = 40
    hu[:, lungs] = -850
    lung_mask = np.zeros(SHAPE, np.uint8)
    lung_mask[:, lungs] = 1
    nodule_mask = np.zeros(SHAPE, np.uint8)
    zz, yy, xx = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    rows = []
    for k, (z, y, x, d) in enumerate(nodules, start=1):
        r = d / 2.0
        inside = (((zz - z) * SPACING[2] / r) ** 2 + ((yy - y) * SPACING[1] / r) ** 2
                  + ((xx - x) * SPACING[0] / r) ** 2 <= 1)
        hu[inside] = 30
        nodule_mask[inside] = k
        wx, wy, wz = ct_io.voxel_to_world((z, y, x), origin, SPACING, direction)
        rows.append((k, z, y, x, wx, wy, wz, d, 4, b"sphere", 0))
    for (z, y, x, d) in excluded:
        wx, wy, wz = ct_io.voxel_to_world((z, y, x), origin, SPACING, direction)
        rows.append((0, z, y, x, wx, wy, wz, d, 1, b"sphere", 1))
    scan = ct_io.Scan(hu=hu, origin=origin, spacing=SPACING, direction=direction, seriesuid=uid,
                      patient_id="p_" + uid, source="luna16", path=f"subset0/{uid}.mhd")
    ct_io.write_scan_h5(path, scan, lung_mask, nodule_mask, np.array(rows, dtype=ct_io.NODULE_DTYPE))


def tiny_model(path, input_hw=(None, None)):
    """(H, W, 1) -> (H, W, 2) softmax with p(nodule) = sigmoid(10 (x - 0.5)): bright lung voxels are nodule."""
    import keras
    inp = keras.Input((*input_hw, 1))
    out = keras.layers.Conv2D(2, 1, activation="softmax", name="logits")(inp)
    model = keras.Model(inp, out, name="tiny")
    model.get_layer("logits").set_weights([np.array([0.0, 10.0], np.float32).reshape(1, 1, 1, 2),
                                           np.array([0.0, -5.0], np.float32)])
    model.save(path)
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("work")
    pre = root / "1_preprocessed"
    pre.mkdir()
    make_scan(str(pre / "1.1.h5"), "1.1")
    make_scan(str(pre / "1.2.h5"), "1.2", direction=FLIP, nodules=((4, 34, 18, 8.0), (6, 24, 46, 10.0)))
    make_scan(str(pre / "1.3.h5"), "1.3", nodules=(), excluded=((5, 30, 44, -1.0),))
    make_scan(str(pre / "2.1.h5"), "2.1")                          # training part: not evaluated
    (pre / "1.9.h5").write_bytes(b"this is not an HDF5 file" * 10)  # corrupt, in the test part
    split = root / "3_split"
    split.mkdir()
    for part, n in (("train", 4), ("val", 0), ("test", 7)):
        np.save(split / f"{part}_idx.npy", np.arange(n, dtype=np.int64))
    test_series = ["1.1", "1.2", "1.3", "1.9"]
    info = {"mode": "random", "seed": 85,
            "train": {"patients": ["p_2.1"], "series": ["2.1"], "rows": 4, "nodule_rows": 2},
            "val": {"patients": [], "series": [], "rows": 0, "nodule_rows": 0},
            "test": {"patients": ["p_" + s for s in test_series], "series": test_series, "rows": 7, "nodule_rows": 3}}
    (split / "split.json").write_text(json.dumps(info))
    mdir = root / "4_model"
    mdir.mkdir()
    tiny_model(str(mdir / "best.keras"))
    (mdir / "config.json").write_text(json.dumps({"CROP": 0, "CONTEXT_SLICES": 1}))
    rc = pp.main([f"--WORK_DIR={root}", "--N_PICTURES=2"])
    return root, rc


def test_outputs_and_grid(work):
    import SimpleITK as sitk
    import network_input
    root, rc = work
    assert rc != 0                                             # the corrupt scan failed
    pred = root / "5_predictions"
    assert sorted(os.listdir(pred)) == ["1.1.h5", "1.1.nii.gz", "1.2.h5", "1.2.nii.gz", "1.3.h5", "1.3.nii.gz"]
    y0, x0, h, w = network_input.crop_box(SHAPE)
    for uid in ("1.1", "1.2", "1.3"):
        prob, mask, attrs = report.read_prediction(str(pred / f"{uid}.h5"))
        assert prob.shape == SHAPE and mask.shape == SHAPE and mask.dtype == np.uint8
        assert prob.dtype == np.float16
        outside = np.ones(SHAPE[1:], bool)
        outside[y0:y0 + h, x0:x0 + w] = False
        assert (prob[:, outside] == 0).all() and prob.max() <= 1
        assert ((prob > 0.5) == (mask > 0)).all()
        scan = ct_io.read_scan_h5(str(root / "1_preprocessed" / f"{uid}.h5"), arrays=("nodule_mask",))
        img = sitk.ReadImage(str(pred / f"{uid}.nii.gz"))
        assert img.GetSize() == SHAPE[::-1]
        np.testing.assert_allclose(img.GetOrigin(), scan["attrs"]["origin"], atol=1e-4)
        np.testing.assert_allclose(img.GetSpacing(), scan["attrs"]["spacing"], atol=1e-5)
        np.testing.assert_allclose(img.GetDirection(), scan["attrs"]["direction"], atol=1e-6)
        assert (sitk.GetArrayFromImage(img) == mask).all()
    # the easy model finds every nodule, on the identity and on the flipped scan
    prob, mask, _ = report.read_prediction(str(pred / "1.2.h5"))
    truth = ct_io.read_scan_h5(str(root / "1_preprocessed" / "1.2.h5"), arrays=("nodule_mask",))["nodule_mask"]
    assert metrics.dice(*metrics.dice_counts(mask, truth > 0)) > 0.6


def test_report(work, capsys):
    root, rc = work
    rep = root / "5_report"
    for name in ("metrics.json", "nodules.csv", "candidates.csv", "candidates_detail.csv", "froc.png", "config.json"):
        assert (rep / name).is_file(), name
    m = json.loads((rep / "metrics.json").read_text())
    assert m["n_scans"] == 3 and m["n_nodules"] == 3 and m["n_excluded_annotations"] == 1
    assert len(m["failed_scans"]) == 1 and "1.9.h5" in m["failed_scans"][0]["path"] and m["n_scans_failed"] == 1
    assert m["fp_per_scan"]["n_scans"] == 4 and m["froc"]["n_scans"] == 4      # the failed scan counts in FP/scan
    assert m["sensitivity"]["value"] == 1.0 and m["fp_per_scan"]["value"] == 0.0
    assert m["cpm"]["value"] == 1.0 and m["froc"]["by_size"]["5-10"] == [1.0] * 7 and m["cpm"]["by_size"]["<5"] is None
    assert m["candidate_recall"]["value"] == 1.0 and m["candidate_recall"]["by_size"]["10-20"]["total"] == 1
    assert m["candidate_threshold"] == pp.CANDIDATE_THRESHOLD and m["max_candidates"] == pp.MAX_CANDIDATES
    assert m["tta"] == pp.TTA
    assert m["n_candidates"] == 3 and m["n_components"] == 3 and "two nodules" in m["froc"]["definition"]
    assert m["slice_dice"]["value"] > 0.6 and "definition" in m["slice_dice"]
    assert m["timing"]["scans_predicted"] == 3 and m["timing"]["seconds_per_scan"] > 0
    with open(rep / "nodules.csv") as f:
        nodules = list(csv.DictReader(f))
    assert len(nodules) == 3 and {r["seriesuid"] for r in nodules} == {"1.1", "1.2"}
    assert all(r["found"] == "True" and r["found_by_candidate"] == "True" for r in nodules)
    with open(rep / "candidates.csv") as f:
        reader = csv.reader(f)
        assert next(reader) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
        cands = list(reader)
    assert len(cands) == 3
    for r in nodules:                                          # each nodule's candidate is at its world center
        near = [c for c in cands if c[0] == r["seriesuid"] and np.linalg.norm(
            np.array(c[1:4], float) - [float(r["world_x"]), float(r["world_y"]), float(r["world_z"])]) < 1.0]
        assert len(near) == 1
    pics = os.listdir(rep / "pictures")
    assert "found_00.png" in pics and "found_01.png" in pics and "found_02.png" not in pics
    assert sorted(os.listdir(rep / "pictures" / "mip")) == ["1.1.png", "1.2.png", "1.3.png"]
    assert json.loads((rep / "config.json").read_text())["N_PICTURES"] == 2
    assert not [f for f in os.listdir(root / "5_predictions") if ".tmp" in f]
    report.print_table(m)                                          # the printed tables read metrics.json as written
    out = capsys.readouterr().out
    assert "1/8" in out and "recall" in out and out.count("100.0%") >= 7 + 3


def test_rerun_reuses_predictions_and_all_scans(work):
    root, _ = work
    before = os.path.getmtime(root / "5_predictions" / "1.1.h5")
    stale = root / "5_predictions" / ".1.1.tmp4242.h5"                  # what a kill -9 mid-write leaves
    stale.write_bytes(b"half")
    rc = pp.main([f"--WORK_DIR={root}", "--SCANS=all", "--N_PICTURES=0", "--WRITE_MIP=0"])
    assert rc != 0 and not stale.exists()
    m = json.loads((root / "5_report" / "metrics.json").read_text())
    assert m["n_scans"] == 4 and m["timing"]["scans_predicted"] == 1      # only 2.1 was new
    assert os.path.getmtime(root / "5_predictions" / "1.1.h5") == before
    assert pp.N_PICTURES == 8                                            # main never changes the file's constants


def test_model_with_fixed_input_size_is_rebuilt(tmp_path):
    """A nasnet_v2 network trained at one size predicts slices of another size with the same weights."""
    import nasnet_v2
    model = nasnet_v2.get_model((32, 32, 1), variant="unet", base_filters=2, depth=2)
    big = inference.rebuild_model(model, (50, 50, 1))
    assert big.input_shape == (None, 50, 50, 1) and big.output_shape == (None, 50, 50, 2)
    for a, b in zip(model.get_weights(), big.get_weights()):
        np.testing.assert_array_equal(a, b)
    path = str(tmp_path / "fixed.keras")
    model.save(path)
    pr = inference.Predictor(path)
    hu = np.full((3, 64, 64), -800, np.int16)
    prob, box = pr.predict(hu, np.ones(hu.shape, np.uint8), batch_size=2)
    assert prob.shape == hu.shape and (box[0].stop - box[0].start, box[1].stop - box[1].start) == (50, 50)


def test_newer_stage1_file_invalidates_the_cache(work):
    """A preprocess rerun writes a new stage-1 file: the prediction made from the old one is not reused (the
    cache key holds the stage-1 file's path, size and modification time), the other scans' predictions are."""
    root, _ = work
    stage1, pred = root / "1_preprocessed" / "1.3.h5", root / "5_predictions" / "1.3.h5"
    old_key = json.loads(report.read_prediction(str(pred))[2]["key"])
    st = os.stat(stage1)
    os.utime(stage1, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))     # as rewritten one second later
    rc = pp.main([f"--WORK_DIR={root}", "--N_PICTURES=0", "--WRITE_MIP=0"])
    assert rc != 0                                                        # 1.9 still fails
    m = json.loads((root / "5_report" / "metrics.json").read_text())
    assert m["timing"]["scans_predicted"] == 1                            # 1.3 only; 1.1 and 1.2 reused
    new_key = json.loads(report.read_prediction(str(pred))[2]["key"])
    assert new_key["stage1"]["mtime_ns"] == old_key["stage1"]["mtime_ns"] + 10 ** 9
    assert new_key["stage1"]["path"] == os.path.abspath(stage1) and new_key["stage1"]["bytes"] == st.st_size


@pytest.mark.parametrize("variant", ["figure3", "figure3_stem", "thesis_code"])
def test_crop_trained_nasnet_is_rebuilt_for_whole_inputs(tmp_path, variant):
    """A NASNet network trained on crops (fixed 64 px input) predicts 96 px inputs with the same weights: the
    saved model is rebuilt by its variant name (a crop-trained model is usable at inference), and the rebuilt
    network gives the same output as one built directly at 96 px with those weights."""
    import nasnet_v2
    model = nasnet_v2.get_model((64, 64, 1), variant=variant)
    path = str(tmp_path / "crop.keras")
    model.save(path)
    (tmp_path / "config.json").write_text(json.dumps({"CROP": 96, "CONTEXT_SLICES": 1, "PIXEL_MM": 0}))
    pr = inference.Predictor(path)
    [rebuilt] = pr.model_for((96, 96))
    assert rebuilt.input_shape == (None, 96, 96, 1)
    rebuilt.run_eagerly = True                    # the predictor's batches without tracing a graph (test time only)
    hu = np.full((2, 128, 128), -800, np.int16)
    prob, box = pr.predict(hu, np.ones(hu.shape, np.uint8), batch_size=2)
    assert prob.shape == hu.shape and np.isfinite(prob).all()
    direct = nasnet_v2.get_model((96, 96, 1), variant=variant, bn_momentum=None)
    direct.set_weights(model.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 96, 96, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(rebuilt(x, training=False)), np.asarray(direct(x, training=False)), atol=1e-6)


def test_test_time_flips_average_the_flipped_scans(tmp_path):
    """TTA=2 / 4: the probability is the mean of the network's outputs on the scan as is, mirrored
    left-right, up-down and both, each flipped back: the same numbers as predicting flipped copies of the scan
    one by one. The stand-in network is not flip-symmetric, so the flips change what it says."""
    import keras
    inp = keras.Input((None, None, 1))
    model = keras.Model(inp, keras.layers.Conv2D(2, 5, padding="same", activation="softmax",
                                                 kernel_initializer=keras.initializers.RandomNormal(0, 1, seed=3))(inp))
    path = str(tmp_path / "asym.keras")
    model.save(path)
    (tmp_path / "config.json").write_text(json.dumps({"CROP": 64, "CONTEXT_SLICES": 1, "PIXEL_MM": 0}))
    hu = np.random.default_rng(0).integers(-1000, 200, (3, 64, 64)).astype(np.int16)
    lung = np.ones(hu.shape, np.uint8)

    def plain(axes):               # TTA=1 on the flipped scan, flipped back
        p, _ = inference.Predictor(path).predict(np.flip(hu, axes).copy(), lung, batch_size=2)
        return np.flip(p, axes)
    views = [plain(()), plain((2,)), plain((1,)), plain((1, 2))]
    assert np.abs(views[0] - views[1]).max() > 0.05                      # the flips matter for this network
    for n in (2, 4):
        pr = inference.Predictor(path, tta=n)
        prob, _ = pr.predict(hu, lung, batch_size=2)
        np.testing.assert_allclose(prob, np.mean(views[:n], axis=0), atol=1e-6)
        assert pr.signature()["tta"] == n                               # a TTA prediction is cached apart
    assert "tta" not in inference.Predictor(path).signature()                  # TTA=1 keeps the earlier cache keys
    with pytest.raises(ValueError, match="TTA"):
        inference.Predictor(path, tta=3)


def test_an_ensemble_averages_its_models(tmp_path):
    """MODEL=a.keras,b.keras: the probability is the mean of each model's (with TTA too); the signature names
    both files; models of another input geometry are refused in one line."""
    import keras
    paths = []
    for k in range(2):
        inp = keras.Input((None, None, 1))
        init = keras.initializers.RandomNormal(0, 1, seed=10 + k)
        model = keras.Model(inp, keras.layers.Conv2D(2, 3, padding="same", activation="softmax",
                                                     kernel_initializer=init)(inp))
        (tmp_path / f"m{k}").mkdir()
        paths.append(str(tmp_path / f"m{k}" / "model.keras"))
        model.save(paths[-1])
        (tmp_path / f"m{k}" / "config.json").write_text(json.dumps({"CROP": 64, "CONTEXT_SLICES": 1, "PIXEL_MM": 0}))
    hu = np.random.default_rng(1).integers(-1000, 200, (3, 64, 64)).astype(np.int16)
    lung = np.ones(hu.shape, np.uint8)
    for tta in (1, 2):
        one = [inference.Predictor(p, tta=tta).predict(hu, lung, batch_size=2)[0] for p in paths]
        both = inference.Predictor(",".join(paths), tta=tta)
        prob, _ = both.predict(hu, lung, batch_size=2)
        assert np.abs(one[0] - one[1]).max() > 0.05
        np.testing.assert_allclose(prob, (one[0] + one[1]) / 2, atol=1e-6)
    assert both.signature()["model"] == [os.path.abspath(p) for p in paths]
    (tmp_path / "m1" / "config.json").write_text(json.dumps({"CROP": 32, "CONTEXT_SLICES": 1, "PIXEL_MM": 0}))
    with pytest.raises(SystemExit, match="same input geometry"):
        inference.Predictor(",".join(paths))


def test_a_model_without_its_input_geometry_is_refused_not_guessed(tmp_path, capsys):
    """A stage-4 model copied without its config.json, applied to a run without a slice table: one line saying
    what is missing (it would otherwise run in raw pixels at the wrong geometry); with the run's table, its
    geometry is used and that is said."""
    model = tmp_path / "copied" / "best.keras"
    model.parent.mkdir()
    model.write_bytes(b"not read before the check")
    with pytest.raises(SystemExit, match=f"^{model}: no config.json beside it .*--MODEL_CONFIG="):
        pp.main([f"--WORK_DIR={tmp_path / 'run'}", f"--MODEL={model}", "--SCANS=all"])
    table = tmp_path / "run" / "2_table" / "slices.h5"
    table.parent.mkdir(parents=True)
    table.write_bytes(b"")
    with pytest.raises(SystemExit, match="no stage-1 folder"):
        pp.main([f"--WORK_DIR={tmp_path / 'run'}", f"--MODEL={model}", "--SCANS=all"])
    assert f"the input geometry of {table} is used" in capsys.readouterr().err


def test_a_run_where_every_scan_fails_leaves_the_earlier_report(tmp_path, capsys):
    """Stage 5 whose every scan fails (here: every stage-1 file damaged) exits 1 and leaves the report of the
    run before byte for byte, instead of replacing it with an empty one."""
    import keras
    work = tmp_path / "run"
    (work / "1_preprocessed").mkdir(parents=True)
    for k in range(2):
        (work / "1_preprocessed" / f"1.2.{k}.h5").write_bytes(b"damaged")
    mdir = work / "4_model"
    mdir.mkdir()
    inp = keras.Input((None, None, 1))
    keras.Model(inp, keras.layers.Conv2D(2, 1, activation="softmax")(inp)).save(mdir / "best.keras")
    (mdir / "config.json").write_text(json.dumps({"CROP": 0, "CONTEXT_SLICES": 1}))
    report_dir = work / "5_report"
    report_dir.mkdir()
    (report_dir / "metrics.json").write_text('{"earlier": "run"}')
    assert pp.main([f"--WORK_DIR={work}", "--SCANS=all"]) == 1
    assert "every scan failed (2)" in capsys.readouterr().err
    assert (report_dir / "metrics.json").read_text() == '{"earlier": "run"}'


def test_a_config_that_disagrees_with_its_model_stops_before_any_scan(tmp_path):
    """config.json says one input channel, the model takes three: one line before any scan is read, and the
    earlier report stays (it used to fail every scan and replace the report with an empty one)."""
    import keras
    work = tmp_path / "run"
    (work / "1_preprocessed").mkdir(parents=True)
    (work / "1_preprocessed" / "1.2.3.h5").write_bytes(b"never read")
    mdir = work / "4_model"
    mdir.mkdir()
    inp = keras.Input((None, None, 3))
    keras.Model(inp, keras.layers.Conv2D(2, 1, activation="softmax")(inp)).save(mdir / "best.keras")
    (mdir / "config.json").write_text(json.dumps({"CROP": 0, "CONTEXT_SLICES": 1}))
    (work / "5_report").mkdir()
    (work / "5_report" / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="takes 3 channel\\(s\\), its settings say CONTEXT_SLICES=1"):
        pp.main([f"--WORK_DIR={work}", "--SCANS=all"])
    assert (work / "5_report" / "metrics.json").read_text() == "{}"
    assert not list((work / "5_predictions").glob("*.h5"))
