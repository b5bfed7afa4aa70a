"""The Keras data source (data_generator_sequence_table.py) on a small table built from stage-1 files.

- augmentation keeps each nodule under its label: label area within 3 % of the unaugmented one at random
  angles, and the bright nodule pixels stay inside the label (image and label moved by the same matrix);
  the thesis's truncated label shrinks it (kept only as an option);
- the same seed gives the same batches (per epoch), another seed or epoch other batches;
- 2 worker processes (and 2 threads) give exactly the batches of 0 workers; a tiny model trains with them;
- random crops hold a nodule with the requested probability; shapes, one-hot labels, dropped last batch.
"""
import importlib
import os
import sys

import numpy as np
import pytest
import scipy.ndimage as ndi

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_table_split import make_stage1_scan  # noqa: E402

keras = pytest.importorskip("keras")
from data_generator_sequence_table import SliceTableDataset  # noqa: E402


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    work = tmp_path_factory.mktemp("gen")
    d = work / "1_preprocessed"
    d.mkdir()
    for i in range(5):
        make_stage1_scan(str(d / f"1.4.{i}.h5"), f"1.4.{i}", f"P{i}", size=128, n_z=12, seed=i,
                         nodules=((6, 60 + 3 * i, 55, 11.0), (4, 40, 85, 6.0)))
    table = importlib.reload(importlib.import_module("table"))
    assert table.main([f"--WORK_DIR={work}", "--NEG_PER_SCAN=3", "--PIXEL_MM=0"]) == 0     # raw 100 px crops
    return str(work / "2_table" / "slices.h5")


def _nodule_rows(path):
    import tables
    with tables.open_file(path) as h5:
        return np.nonzero(h5.root.slices.col("n_nodule_pixels") > 150)[0]


def test_shapes_one_hot_and_drop_last(table_path):
    import tables
    with tables.open_file(table_path) as h5:
        n = len(h5.root.slices)
    ds = SliceTableDataset(table_path, np.arange(n), batch_size=4)
    assert len(ds) == n // 4 and ds.image_shape == (100, 100, 1)
    x, y = ds[0]
    assert x.shape == (4, 100, 100, 1) and x.dtype == np.float32
    assert y.shape == (4, 100, 100, 2) and y.dtype == np.float32
    np.testing.assert_array_equal(y.sum(-1), 1.0)
    assert set(np.unique(y)) <= {0.0, 1.0}
    val = SliceTableDataset(table_path, np.arange(n), batch_size=4, augment=False, shuffle=False, drop_last=False)
    assert len(val) == -(-n // 4) and val[len(val) - 1][0].shape[0] == n - 4 * (len(val) - 1)
    xr, yr = val.read_rows([0, 1, 2, 3])                     # unaugmented, unshuffled = the table's rows
    np.testing.assert_array_equal(val[0][0], xr)
    np.testing.assert_array_equal(val[0][1][..., 1], yr)
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("mode", ["nearest", "threshold"])
def test_augmentation_keeps_nodule_under_label(table_path, mode):
    rows = _nodule_rows(table_path)
    plain = SliceTableDataset(table_path, rows, batch_size=1, augment=False, shuffle=False)
    aug = SliceTableDataset(table_path, rows, batch_size=1, rot_deg=6.0, label_interp=mode, shuffle=False)
    images, labels = plain.read_rows(rows)
    worst_area, worst_out = 0.0, 0.0
    for epoch in range(8):                                    # 8 random angles / flips per slice
        aug.set_epoch(epoch)
        for i in range(len(rows)):
            x, y = aug[i]
            lab = y[0, ..., 1] > 0.5
            img = x[0, ..., 0]
            area0 = labels[i].sum()
            worst_area = max(worst_area, abs(lab.sum() - area0) / area0)
            # bright = nodule (z-score of ~40 HU among lung at ~ -850 HU); threshold halfway
            inside = images[i, ..., 0][labels[i] > 0]
            lung = images[i, ..., 0][(labels[i] == 0) & (images[i, ..., 0] != 0)]
            t = (np.median(inside) + np.median(lung)) / 2
            bright = img > t
            assert not np.any(bright & ~ndi.binary_dilation(lab)), "bright pixels off the label"
            worst_out = max(worst_out, (bright & ~lab).sum() / bright.sum())
            assert (lab & bright).sum() >= 0.9 * lab.sum()
    print(f"{mode}: worst label area change {100 * worst_area:.2f} %, bright pixels outside {100 * worst_out:.2f} %")
    assert worst_area <= 0.03
    assert worst_out <= 0.05


def test_thesis_truncation_shrinks_labels(table_path):
    rows = _nodule_rows(table_path)
    ds = SliceTableDataset(table_path, rows, batch_size=len(rows), flip=False, rot_deg=6.0, label_interp="truncate")
    _, labels = ds.read_rows(ds.batch_rows(0))
    _, y = ds[0]
    ratio = y[..., 1].sum() / labels.sum()
    assert ratio < 0.97                                        # the bug the default fixes


def test_same_seed_same_batches(table_path):
    rows = np.arange(30)
    a = SliceTableDataset(table_path, rows, batch_size=4, seed=7, zoom=0.1)
    b = SliceTableDataset(table_path, rows, batch_size=4, seed=7, zoom=0.1)
    c = SliceTableDataset(table_path, rows, batch_size=4, seed=8, zoom=0.1)
    first = [a[i] for i in range(len(a))]
    for i in reversed(range(len(b))):                          # order of requests does not matter
        np.testing.assert_array_equal(first[i][0], b[i][0])
        np.testing.assert_array_equal(first[i][1], b[i][1])
    assert any(not np.array_equal(first[i][0], c[i][0]) for i in range(len(c)))
    a.on_epoch_end()
    b.set_epoch(1)
    assert not np.array_equal(a.order, np.arange(30)) and not np.array_equal(a.order, c.order)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i][0], b[i][0])
    assert any(not np.array_equal(a[i][0], first[i][0]) for i in range(len(a)))
    covered = np.sort(np.concatenate([a.batch_rows(i) for i in range(len(a))]))
    assert len(np.unique(covered)) == len(covered) == 4 * len(a)


def _epochs(ds, n_epochs):
    """Batches as Keras's fit loop gets them (the PyDataset adapter, its enqueuer for workers)."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
    adapter = PyDatasetAdapter(ds, shuffle=False)
    out = []
    for _ in range(n_epochs):
        adapter.on_epoch_begin()
        out.append([tuple(np.asarray(t) for t in b) for b in adapter.get_numpy_iterator()])
        adapter.on_epoch_end()
    return out


@pytest.mark.parametrize("multiprocessing", [True, False])
def test_workers_give_the_same_batches(table_path, multiprocessing):
    rows = np.arange(24)
    kw = dict(batch_size=4, seed=3, crop=48, crop_nodule_p=0.7)
    ref = _epochs(SliceTableDataset(table_path, rows, workers=0, **kw), 2)
    par = _epochs(SliceTableDataset(table_path, rows, workers=2, use_multiprocessing=multiprocessing, **kw), 2)
    assert len(ref) == len(par) == 2 and len(ref[0]) == 6
    for e in range(2):
        for (x0, y0), (x1, y1) in zip(ref[e], par[e]):
            np.testing.assert_array_equal(x0, x1)
            np.testing.assert_array_equal(y0, y1)
    assert not np.array_equal(ref[0][0][0], ref[1][0][0])      # a new epoch: other batches


def test_fit_with_worker_processes(table_path):
    rows = np.arange(16)
    ds = SliceTableDataset(table_path, rows, batch_size=4, crop=32, workers=2, use_multiprocessing=True)
    model = keras.Sequential([keras.Input(ds.image_shape), keras.layers.Conv2D(2, 3, padding="same",
                                                                               activation="softmax")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    hist = model.fit(ds, epochs=2, verbose=0)
    assert len(hist.history["loss"]) == 2 and np.all(np.isfinite(hist.history["loss"]))


def test_random_crops_hold_nodules(table_path):
    rows = _nodule_rows(table_path)
    on = SliceTableDataset(table_path, rows, batch_size=len(rows), crop=24, crop_nodule_p=1.0)
    off = SliceTableDataset(table_path, rows, batch_size=len(rows), crop=24, crop_nodule_p=0.0)
    hits_on = hits_off = 0
    for e in range(3):
        on.set_epoch(e)
        off.set_epoch(e)
        x, y = on[0]
        assert x.shape == (len(rows), 24, 24, 1) and y.shape == (len(rows), 24, 24, 2)
        hits_on += int((y[..., 1].reshape(len(rows), -1).max(1) > 0).sum())
        hits_off += int((off[0][1][..., 1].reshape(len(rows), -1).max(1) > 0).sum())
    assert hits_on == 3 * len(rows)
    assert hits_off < hits_on


def test_context_channels(table_path, tmp_path):
    work = os.path.dirname(os.path.dirname(table_path))
    table = importlib.reload(importlib.import_module("table"))
    assert table.main([f"--WORK_DIR={work}", f"--OUT_DIR={tmp_path}", "--NEG_PER_SCAN=1", "--CONTEXT_SLICES=3",
                       "--PIXEL_MM=0"]) == 0
    ds = SliceTableDataset(str(tmp_path / "slices.h5"), np.arange(8), batch_size=4)
    x, y = ds[1]
    assert ds.image_shape == (100, 100, 3) and x.shape == (4, 100, 100, 3) and y.shape == (4, 100, 100, 2)


def test_short_epochs_take_the_start_of_each_epochs_order(table_path):
    """max_batches: an epoch is the first batches of that epoch's permutation (Keras's steps_per_epoch would
    carry one iterator across epochs and run dry); over epochs the rows are still all used."""
    import tables
    with tables.open_file(table_path) as h5:
        n = h5.root.data.shape[0]
    ds = SliceTableDataset(table_path, np.arange(n), batch_size=2, augment=False, max_batches=3, seed=4)
    assert len(ds) == 3 and len(SliceTableDataset(table_path, np.arange(n), batch_size=2)) == n // 2 > 3
    seen, firsts = set(), []
    for epoch in range(40):
        ds.set_epoch(epoch)
        firsts.append(tuple(ds.batch_rows(0)))
        for b in range(len(ds)):
            seen.update(int(r) for r in ds.batch_rows(b))
    assert len(set(firsts)) > 1 and len(seen) >= 0.9 * n


@pytest.fixture(scope="module")
def big_small_table(tmp_path_factory):
    """Scans with one large nodule (15 slices) and one small one (3 slices) each, on different slices."""
    work = tmp_path_factory.mktemp("bigsmall")
    d = work / "1_preprocessed"
    d.mkdir()
    for i in range(3):
        make_stage1_scan(str(d / f"1.5.{i}.h5"), f"1.5.{i}", f"P{i}", size=96, n_z=24, seed=i,
                         nodules=((8, 48, 40, 10.0), (20, 40, 60, 2.0)))
    table = importlib.reload(importlib.import_module("table"))
    assert table.main([f"--WORK_DIR={work}", "--NEG_PER_SCAN=4", "--PIXEL_MM=0"]) == 0
    return str(work / "2_table" / "slices.h5")


def test_nodule_sampling_weighs_each_nodule_equally(big_small_table):
    """SAMPLING='nodule': a 3-slice nodule is drawn as often as a 15-slice one (per slice: 1 in 6 of the
    positive rows); NEG_FRACTION of the draws are negatives."""
    import tables
    with tables.open_file(big_small_table) as h5:
        ids = h5.root.slices.col("nodule_ids")
        n = len(ids)
    small = (ids == 2).any(axis=1)
    big = (ids == 1).any(axis=1)
    assert small.sum() == 3 * 3 and big.sum() >= 4 * small.sum() and not (small & big).any()
    shares = {}
    for mode in ("slice", "nodule"):
        ds = SliceTableDataset(big_small_table, np.arange(n), batch_size=4, sampling=mode, neg_fraction=0.3)
        drawn = np.concatenate([ds.indexes[ds.order] for _ in range(30) if ds.on_epoch_end() or True])
        pos = drawn[small[drawn] | big[drawn]]
        shares[mode] = (small[pos].mean(), 1 - len(pos) / len(drawn))
    assert shares["slice"][0] < 0.25                        # by slices: the large nodule dominates
    assert 0.42 < shares["nodule"][0] < 0.58                # by nodules: half and half
    assert abs(shares["nodule"][1] - 0.3) < 0.02            # negatives: NEG_FRACTION
    with pytest.raises(ValueError, match="sampling"):
        SliceTableDataset(big_small_table, np.arange(n), sampling="pixel")


def test_nodule_sampling_crops_on_either_nodule_of_a_slice(tmp_path):
    """Crops placed on a nodule pick one of the slice's nodules with equal chance, not by area; the other
    crops land on a bright lung pixel (a vessel), not uniformly."""
    work = tmp_path
    d = work / "1_preprocessed"
    d.mkdir()
    make_stage1_scan(str(d / "1.6.h5"), "1.6", "P", size=128, n_z=6, seed=0,
                     nodules=((3, 40, 30, 14.0), (3, 90, 100, 3.0)))
    table = importlib.reload(importlib.import_module("table"))
    assert table.main([f"--WORK_DIR={work}", "--NEG_PER_SCAN=0", "--PIXEL_MM=0"]) == 0
    path = str(work / "2_table" / "slices.h5")
    import tables
    with tables.open_file(path) as h5:
        row = int(np.argmax((h5.root.slices.col("nodule_ids") > 0).sum(axis=1)))
    ds = SliceTableDataset(path, [row], batch_size=1, augment=False, crop=32, crop_nodule_p=1.0, sampling="nodule")
    image, label = ds.read_rows([row])
    small = label[0].copy()
    small[:60], small[:, :60] = 0, 0                           # the 3-px nodule alone (the large one is up-left)
    assert 0 < small.sum() < label[0].sum() / 10
    rng = np.random.default_rng(0)
    corners = [ds._crop_origin(None, image[0], label[0], rng) for _ in range(200)]
    share_small = np.mean([small[y0:y0 + 32, x0:x0 + 32].sum() > 0 for y0, x0 in corners])
    assert 0.35 < share_small < 0.65                          # by area it would be < 0.1
    # the other crops: on a bright lung pixel off the nodules
    ds_neg = SliceTableDataset(path, [row], batch_size=1, augment=False, crop=32, crop_nodule_p=0.0,
                               sampling="nodule")
    centre_ch = image[0][..., image.shape[-1] // 2]
    lung_vals = centre_ch[(centre_ch != 0) & (label[0] == 0)]
    for _ in range(20):
        y0, x0 = ds_neg._crop_origin(None, image[0], label[0], rng)
        crop = centre_ch[y0:y0 + 32, x0:x0 + 32] * (label[0][y0:y0 + 32, x0:x0 + 32] == 0)
        assert crop.max() > np.percentile(lung_vals, 98)


# ----------------------------------------------------------------------------- intensity augmentation

def _hu_stats(path, rows):
    import tables
    with tables.open_file(path) as h5:
        return h5.root.slices.col("hu_mean")[rows], h5.root.slices.col("hu_std")[rows]


def test_table_rows_carry_the_slice_hu_statistics(table_path):
    """hu_mean / hu_std are the raw slice's: the input times the SD plus the mean gives back the HU inside
    the lungs (raw-pixel table: the input pixel is the scan pixel)."""
    import tables
    from table import read_scan_h5
    with tables.open_file(table_path) as h5:
        r = h5.root.slices[0]
        x = h5.root.data[0]
    d = os.path.join(os.path.dirname(os.path.dirname(table_path)), "1_preprocessed")
    scan = read_scan_h5(os.path.join(d, r["seriesuid"].decode() + ".h5"), arrays=("hu", "lung_mask"))
    hu = scan["hu"][r["z"]].astype(np.float64)
    assert r["hu_mean"] == pytest.approx(hu.mean(), rel=1e-5) and r["hu_std"] == pytest.approx(hu.std(), rel=1e-5)
    crop = hu[r["y0"]:r["y0"] + r["height"], r["x0"]:r["x0"] + r["width"]]
    inside = x != 0
    np.testing.assert_allclose(x[inside] * r["hu_std"] + r["hu_mean"], crop[inside], atol=0.05)


@pytest.mark.parametrize("name,value", [("contrast", 1.3), ("contrast", 0.75), ("brightness", 50.0),
                                        ("brightness", -50.0), ("gamma", 0.7), ("gamma", 1.4), ("noise", 40.0),
                                        ("blur", 1.0), ("sharpen", 1.5)])
def test_each_intensity_transform_in_hu(name, value):
    """Each transform alone, with p = 1 and a one-value range, does in HU what it says: contrast about -850 HU,
    brightness a shift, gamma on the [-1000, 400] window (monotonic, ends fixed), noise of the given SD, blur
    lowers and sharpening raises the edge contrast; outside the lungs (0) stays 0."""
    from data_generator_sequence_table import intensity_augment, check_intensity
    mean, std = -400.0, 500.0
    hu = np.full((64, 64), -850.0, np.float32)
    hu[24:40, 24:40] = 40.0                                   # a nodule-like square in lung
    lung = np.zeros((64, 64), bool)
    lung[8:56, 8:56] = True
    x = np.where(lung, (hu - mean) / std, 0.0).astype(np.float32)
    out = intensity_augment(x, mean, std, check_intensity({name: (1.0, value, value)}), np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == x.shape
    assert (out[~lung] == 0).all()
    back = out * std + mean
    if name == "contrast":
        assert back[30, 30] == pytest.approx(-850 + value * 890, abs=0.1) and back[12, 12] == pytest.approx(-850, abs=0.1)
    elif name == "brightness":
        np.testing.assert_allclose(back[lung], hu[lung] + value, atol=0.1)
    elif name == "gamma":
        u = (40.0 + 1000) / 1400
        assert back[30, 30] == pytest.approx(-1000 + 1400 * u ** value, abs=0.1)
        assert (back[30, 30] > 40) == (value < 1)
    elif name == "noise":
        d = (back - hu)[lung]
        assert d.std() == pytest.approx(value, rel=0.15) and abs(d.mean()) < 3
    else:
        edge = back[30, 40] - back[30, 39]                    # across the square's right edge (step of -890 HU)
        assert (edge > -890) if name == "blur" else (edge < -890)


def test_intensity_augmentation_leaves_labels_and_respects_ranges(table_path):
    """Through the dataset: labels are exactly those of geometry-only augmentation with the same seed (the
    intensity draws come after the geometry's), images differ, the per-row HU shift stays within what the
    ranges allow, and bad settings are refused."""
    from data_generator_sequence_table import check_intensity
    rows = _nodule_rows(table_path)
    geo = SliceTableDataset(table_path, rows, batch_size=2, shuffle=False, seed=3)
    only_brightness = {"brightness": (1.0, -50.0, 50.0)}
    aug = SliceTableDataset(table_path, rows, batch_size=2, shuffle=False, seed=3, intensity=only_brightness)
    mean, std = _hu_stats(table_path, rows)
    for b in range(len(geo)):
        (xg, yg), (xa, ya) = geo[b], aug[b]
        np.testing.assert_array_equal(yg, ya)
        assert not np.array_equal(xg, xa)
        for i in range(len(xg)):
            r = b * 2 + i
            inside = xg[i] != 0
            shift = (xa[i] - xg[i])[inside] * std[r]             # HU
            assert shift.std() < 1e-2 and -50.0 - 1e-2 <= shift.mean() <= 50.0 + 1e-2
            assert ((xa[i] != 0) == inside).all()
    with pytest.raises(ValueError, match="expected one of"):
        check_intensity({"hue": (0.5, 0, 1)})
    with pytest.raises(ValueError, match="probability"):
        check_intensity({"noise": (1.5, 0, 1)})
    with pytest.raises(ValueError, match="probability"):
        check_intensity({"noise": (0.5, 3, 1)})
