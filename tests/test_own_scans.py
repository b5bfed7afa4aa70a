"""Your own scans (preprocess.py --DATASET=scans): any CT that SimpleITK or pydicom reads, with or without annotations.

One small phantom (synthetic_ct.make_luna_scan, 96 px of 3 mm, 24 slices of 5 mm, one planted nodule) written as
- a DICOM series with non-LIDC UIDs and files without the .dcm extension (a hospital export),
- a .nii.gz and an .nrrd (SimpleITK),
- a NIfTI written byte by byte in RAS+ storage (x and y reversed, positive RAS affine), not by SimpleITK:
  SimpleITK must turn its RAS affine into ITK's LPS direction diag(-1, -1, 1),
gives the same stage-1 arrays (the RAS one reversed in y and x), the same world coordinates for the nodule, and,
through stage 5 with a stand-in 1x1-convolution model, the same candidates. Without annotations, stage 1 says so
once and writes no labels, stage 5 writes candidates.csv and a metrics.json saying "annotations": "none".
"""
import csv
import glob
import gzip
import json
import os
import struct

import numpy as np
import pytest

import ct_io
import preprocess
import scans
import synthetic_ct

CFG = dict(SHAPE_LIBRARY_SCANS=3, NODULE_DIAMETER_MM=(14.0, 18.0), Z_EXTENT_MM=(120.0, 120.0), MAX_EXCLUDED=0,
           FLIP_EVERY=0, EMPTY_EVERY=0)     # a small, unflipped phantom with one nodule
MODEL_CONFIG = {"CROP": 0, "CONTEXT_SLICES": 1, "PIXEL_MM": 2.5, "CROP_MM": 240}   # the stand-in model's input
NAMES = ("dicom", "phantom_nii", "phantom_nrrd", "phantom_ras")     # DICOM stands for its SeriesInstanceUID


@pytest.fixture(scope="module")
def phantom():
    s = synthetic_ct.make_luna_scan(0, 11, CFG, image_size=96, n_slices=24, pixel_spacing=3.0, slice_spacing=5.0,
                                    n_nodules=1)
    assert len(s["nodules"]) == 1
    return s


def write_dicom(s, folder):
    """The phantom as a CT series with UIDs of pydicom's root (not LIDC's), files without extension."""
    from pydicom.uid import generate_uid
    d = dict(s, seriesuid=generate_uid(entropy_srcs=["own", "series"]), study_uid=generate_uid(entropy_srcs=["own"]),
             patient_id="PATIENT-7", zvals=s["origin"][2] + s["spacing"][2] * np.arange(s["hu"].shape[0]),
             ipp_xy=s["origin"][:2], pixel_spacing=s["spacing"][0], slice_thickness=s["spacing"][2],
             pixel_padding_tag=False)
    synthetic_ct.write_dicom_series(d, folder)
    for f in glob.glob(os.path.join(folder, "*.dcm")):
        os.rename(f, f"{f[:-4]}_IM")
    return d["seriesuid"]


def write_sitk(s, path):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(s["hu"])
    img.SetOrigin(s["origin"])
    img.SetSpacing(s["spacing"])
    img.SetDirection(s["direction"])
    sitk.WriteImage(img, path, True)


def write_nifti_ras(s, path):
    """The phantom stored as many NIfTI files are (RAS+: the x index runs towards the patient's right, y towards
    the front): the array reversed in y and x, a positive diagonal RAS affine in qform and sform. The NIfTI-1
    header is written field by field, so SimpleITK's reading is checked against an independent writer."""
    hu = s["hu"][:, ::-1, ::-1]
    nz, ny, nx = hu.shape
    sx, sy, sz = s["spacing"]
    ox, oy, oz = s["origin"]
    # voxel (0, 0, 0) of the reversed array is the LPS voxel (nx-1, ny-1, 0); RAS = (-x, -y, z) of LPS
    off = (-(ox + (nx - 1) * sx), -(oy + (ny - 1) * sy), oz)
    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)                              # sizeof_hdr
    struct.pack_into("<8h", h, 40, 3, nx, ny, nz, 1, 1, 1, 1)       # dim
    struct.pack_into("<2h", h, 70, 4, 16)                          # datatype int16, bitpix
    struct.pack_into("<8f", h, 76, 1.0, sx, sy, sz, 0, 0, 0, 0)    # pixdim (pixdim[0] = qfac = 1)
    struct.pack_into("<3f", h, 108, 352.0, 1.0, 0.0)               # vox_offset, scl_slope, scl_inter
    h[123] = 2                                                     # xyzt_units: mm
    struct.pack_into("<2h", h, 252, 1, 1)                          # qform_code, sform_code: scanner
    struct.pack_into("<6f", h, 256, 0, 0, 0, *off)                 # quaternion b, c, d (identity), qoffset
    struct.pack_into("<12f", h, 280, sx, 0, 0, off[0], 0, sy, 0, off[1], 0, 0, sz, off[2])   # srow_x, y, z
    h[344:348] = b"n+1\0"
    with gzip.open(path, "wb") as f:
        f.write(bytes(h) + np.ascontiguousarray(hu, "<i2").tobytes())   # x fastest = C order of (z, y, x)


@pytest.fixture(scope="module")
def folder(phantom, tmp_path_factory):
    """INPUT_DIR holding the four copies, in subfolders or not, and a stray text file beside the DICOM files."""
    d = tmp_path_factory.mktemp("own")
    uid = write_dicom(phantom, str(d / "export" / "series1"))
    write_sitk(phantom, str(d / "phantom_nii.nii.gz"))
    os.makedirs(d / "more")
    write_sitk(phantom, str(d / "more" / "phantom_nrrd.nrrd"))
    write_nifti_ras(phantom, str(d / "phantom_ras.nii.gz"))
    (d / "export" / "README.txt").write_text("not a scan")
    return str(d), uid


def _flip(name, arr):
    return arr[:, ::-1, ::-1] if name == "phantom_ras" else arr


def test_each_format_reads_the_same_volume_and_geometry(phantom, folder):
    """ct_io through scans.read_own_scan: the same HU, and each voxel at the same world point (the RAS NIfTI:
    direction diag(-1, -1, 1) from SimpleITK, its array reversed in y and x)."""
    d, uid = folder
    paths = scans.find_own_scans(d)
    tasks = scans.scans_tasks(paths)
    assert sorted(scans.scan_id(p, u) for p, u in tasks) == sorted([uid, *NAMES[1:]])
    want = ct_io.read_image(str(os.path.join(d, "phantom_nii.nii.gz")))
    nod = phantom["nodules"][0]
    nod_world = np.array([nod["world_x"], nod["world_y"], nod["world_z"]])
    for path, series in tasks:
        scan = scans.read_own_scan(path, series)
        name = NAMES[0] if series else scan.seriesuid
        assert scan.source == "scans"
        assert scan.patient_id == ("PATIENT-7" if series else name)
        np.testing.assert_array_equal(_flip(name, scan.hu), want.hu)
        flipped = name == "phantom_ras"
        np.testing.assert_allclose(scan.direction, (-1, 0, 0, 0, -1, 0, 0, 0, 1) if flipped else np.eye(3).ravel(),
                                   atol=1e-6)
        # the planted nodule: its world centre -> this scan's voxel -> the phantom's voxel, and back to world
        zyx = ct_io.world_to_voxel(nod_world, scan.origin, scan.spacing, scan.direction)
        n = np.array(scan.hu.shape)
        own = zyx if not flipped else np.array([zyx[0], n[1] - 1 - zyx[1], n[2] - 1 - zyx[2]])
        np.testing.assert_allclose(own, [nod["center_z"], nod["center_y"], nod["center_x"]], atol=1e-3)
        np.testing.assert_allclose(ct_io.voxel_to_world(zyx, scan.origin, scan.spacing, scan.direction),
                                   nod_world, atol=1e-3)


@pytest.fixture(scope="module")
def stage1(folder, tmp_path_factory):
    """preprocess.py --DATASET=scans on the folder, without annotations."""
    d, uid = folder
    work = str(tmp_path_factory.mktemp("work"))
    assert preprocess.main(["--DATASET=scans", f"--INPUT_DIR={d}", f"--WORK_DIR={work}", "--N_WORKERS=1"]) == 0
    return work, uid


def _stage1_files(work, uid):
    return {name: ct_io.read_scan_h5(os.path.join(work, "1_preprocessed", f"{uid if name == 'dicom' else name}.h5"))
            for name in NAMES}


def test_stage1_without_annotations_same_arrays_no_labels_said_once(stage1):
    work, uid = stage1
    files = _stage1_files(work, uid)
    ref = files["phantom_nii"]
    assert np.count_nonzero(ref["lung_mask"]) * 27 * 5 / 1000 > 100           # lungs found (ml)
    for name, f in files.items():
        np.testing.assert_array_equal(_flip(name, f["hu"]), ref["hu"])
        np.testing.assert_array_equal(_flip(name, f["lung_mask"]), ref["lung_mask"])
        assert len(f["nodules"]) == 0 and not f["nodule_mask"].any()
        a = f["attrs"]
        assert a["annotated"] == 0 and a["source"] == "scans"
        assert a["patient_id"] == ("PATIENT-7" if name == "dicom" else name)
    with open(os.path.join(work, "1_preprocessed", "preprocess.log")) as f:
        log = f.read()
    assert log.count("no ANNOTATIONS given") == 1
    assert "4 scans (files and DICOM series)" in log and "FAILED" not in log


def test_annotations_keyed_by_scan_id_label_the_nodule_at_one_world_point(phantom, folder, tmp_path, capsys):
    """ANNOTATIONS in LUNA16's format keyed by scan id (SeriesInstanceUID / file name): the nodule is drawn in every
    copy around the same world point; a row naming no scan is counted."""
    d, uid = folder
    n = phantom["nodules"][0]
    ann = tmp_path / "ann.csv"
    rows = [f"{sid},{n['world_x']},{n['world_y']},{n['world_z']},{n['diameter_mm']}" for sid in (uid, *NAMES[1:])]
    ann.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "\n".join(rows) + "\nnot_a_scan,0,0,0,5\n")
    work = str(tmp_path / "work")
    assert preprocess.main(["--DATASET=scans", f"--INPUT_DIR={d}", f"--WORK_DIR={work}", "--N_WORKERS=1",
                            f"--ANNOTATIONS={ann}", "--LABELS=sphere"]) == 0
    assert "1 of 5 annotation rows match no scan" in capsys.readouterr().err
    files = _stage1_files(work, uid)
    ref = files["phantom_nii"]["nodule_mask"]
    assert ref.sum() > 20
    for name, f in files.items():
        assert f["attrs"]["annotated"] == 1 and len(f["nodules"]) == 1
        np.testing.assert_array_equal(_flip(name, f["nodule_mask"]), ref)
        a = f["attrs"]
        c = f["nodules"][0]
        w = ct_io.voxel_to_world([c["center_z"], c["center_y"], c["center_x"]], a["origin"], a["spacing"],
                                 a["direction"])
        np.testing.assert_allclose(w, [n["world_x"], n["world_y"], n["world_z"]], atol=1e-3)


def test_two_files_with_one_scan_id_and_a_folder_without_ct_are_refused(phantom, tmp_path):
    """Refused in one line before any scan is read: two scans that would write one output file; no CT at all."""
    os.makedirs(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("no scan here")
    with pytest.raises(SystemExit, match=r"in: no CT found \(no \.mhd/.*file, no DICOM file\)"):
        preprocess.main(["--DATASET=scans", f"--INPUT_DIR={tmp_path / 'in'}", f"--WORK_DIR={tmp_path / 'w'}"])
    write_sitk(phantom, str(tmp_path / "in" / "a.nrrd"))
    write_sitk(phantom, str(tmp_path / "in" / "a.nii.gz"))
    with pytest.raises(SystemExit, match=r"a\.n.*scan id 'a' is also that of .*a\.n.*rename one"):
        preprocess.main(["--DATASET=scans", f"--INPUT_DIR={tmp_path / 'in'}", f"--WORK_DIR={tmp_path / 'w'}"])
    assert not glob.glob(str(tmp_path / "w" / "1_preprocessed" / "*.h5"))


def _stand_in_model(folder):
    """A 1x1 convolution: nodule probability sigmoid(4 x - 2) of the network input x (bright lung structures)."""
    import keras
    inp = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(2, 1, activation="softmax")
    model = keras.Model(inp, conv(inp))
    conv.set_weights([np.array([0.0, 4.0], np.float32).reshape(1, 1, 1, 2), np.array([0.0, -2.0], np.float32)])
    path = os.path.join(folder, "best.keras")
    model.save(path)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(MODEL_CONFIG, f)
    return path


def test_stage5_without_annotations_lists_the_same_candidates_no_metrics(stage1, tmp_path):
    """postprocess.py --SCANS=all on the run without annotations: candidates.csv (world mm) with the same candidates
    for the four copies, masks as .nii.gz in each scan's geometry, candidate pictures and projections, and a
    metrics.json that says "annotations": "none" and holds no sensitivity, Dice, FROC or CPM."""
    import SimpleITK as sitk
    import postprocess
    work, uid = stage1
    model = _stand_in_model(str(tmp_path))
    assert postprocess.main([f"--WORK_DIR={work}", "--SCANS=all", f"--MODEL={model}", "--N_PICTURES=3"]) == 0
    report = os.path.join(work, "5_report")
    with open(os.path.join(report, "metrics.json")) as f:
        m = json.load(f)
    assert m["annotations"] == "none" and m["n_scans"] == 4 and m["n_nodules"] is None
    assert not {"sensitivity", "cpm", "froc", "slice_dice", "nodule_dice", "fp_per_scan"} & set(m)
    assert m["n_candidates"] > 0 and not os.path.exists(os.path.join(report, "froc.png"))
    with open(os.path.join(report, "candidates.csv")) as f:
        rows = list(csv.DictReader(f))
    by_scan = {}
    for r in rows:
        by_scan.setdefault(r["seriesuid"], []).append([float(r[k]) for k in ("coordX", "coordY", "coordZ")])
    assert sorted(by_scan) == sorted([uid, *NAMES[1:]])
    ref = np.array(by_scan["phantom_nii"])
    for sid, xyz in by_scan.items():                                      # the same candidates, within one voxel
        xyz = np.array(xyz)
        assert len(xyz) == len(ref), sid
        nearest = np.linalg.norm(xyz[:, None] - ref[None], axis=2).min(axis=1)
        assert nearest.max() < 3.0, (sid, nearest.max())
    with open(os.path.join(report, "candidates_detail.csv")) as f:
        assert {r["status"] for r in csv.DictReader(f)} == {"no truth"}
    for sid in by_scan:                                                   # the mask lies over its scan
        img = sitk.ReadImage(os.path.join(work, "5_predictions", f"{sid}.nii.gz"))
        a = ct_io.read_scan_h5(os.path.join(work, "1_preprocessed", f"{sid}.h5"), arrays=())["attrs"]
        np.testing.assert_allclose(img.GetOrigin(), a["origin"], atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), a["direction"], atol=1e-6)
        assert os.path.isfile(os.path.join(report, "pictures", "mip", f"{sid}.png"))
    pics = sorted(os.path.basename(p) for p in glob.glob(os.path.join(report, "pictures", "*.png")))
    assert pics == ["candidate_00.png", "candidate_01.png", "candidate_02.png"]


def test_a_symlinked_subfolder_of_scans_is_read_once(tmp_path):
    """A scan in a folder reached through a symbolic link is found (os.walk alone skips it), and a link back up
    does not make the search loop or list a scan twice."""
    real = tmp_path / "elsewhere" / "series1"
    real.mkdir(parents=True)
    (real / "a.nii.gz").write_bytes(b"")
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "b.mha").write_bytes(b"")
    os.symlink(real, tmp_path / "scans" / "linked")
    os.symlink(tmp_path / "scans", real / "back_up")          # a cycle through the links
    found = scans.find_own_scans(str(tmp_path / "scans"))
    assert [os.path.basename(p) for p in found] == ["b.mha", "a.nii.gz"]
