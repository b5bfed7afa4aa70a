"""Per-finding outputs (findings.py, findings_dicom.py, findings_page.py, wired into stage 6): the measurements
of spheres of known diameter and volume, the type from HU, the lung side (flipped scans too); then stage 6
scoring a tiny DICOM series and a tiny .mhd scan with a stand-in stage-5 prediction and a stand-in stage-6
network (its output fixed at 0.95): the DICOM SEG read back equals the mask, the SR's measurements equal
candidates_detail.csv's, the .nii.gz and JSON of the .mhd scan, and the pages list every finding with a
malicious series description escaped. Small volumes, no training."""
import csv
import glob
import json
import math
import os
import re

import numpy as np
import pytest

import ct_io
import findings
import findings_dicom

IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
FLIPPED = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
EVIL = '<script>alert(1)</script> & <img src=http://evil.example/x>'


def sphere(shape, center_zyx, spacing_zyx, diameter_mm):
    return findings.ball(shape, center_zyx, spacing_zyx, diameter_mm / 2.0)


# ----------------------------------------------------------------------------- measurements

@pytest.mark.parametrize("diameter", [6.0, 10.0, 20.0])
def test_sphere_volume_and_diameters(diameter):
    spacing = np.array([1.25, 0.7, 0.7])
    shape = (40, 70, 70)
    region = sphere(shape, (20.2, 35.3, 34.6), spacing, diameter)
    hu = np.where(region, 40, -850).astype(np.int16)
    m = findings.measure_region(region, hu, spacing, findings.FindingSettings())
    volume = math.pi / 6.0 * diameter ** 3
    assert abs(m["volume_mm3"] - volume) / volume < 0.06, (m["volume_mm3"], volume)
    assert abs(m["equivalent_diameter_mm"] - diameter) < 0.15
    assert abs(m["axial_diameter_mm"] - diameter) <= 0.7 + 1e-6, m["axial_diameter_mm"]      # one pixel
    assert (m["mean_hu"], m["max_hu"], m["nodule_type"], m["solid_fraction"]) == (40.0, 40.0, "solid", 1.0)


def test_type_from_hu_ground_glass_part_solid_solid():
    spacing = np.array([1.0, 0.7, 0.7])
    shape, c = (30, 50, 50), (15.0, 25.0, 25.0)
    region = sphere(shape, c, spacing, 14.0)
    core = sphere(shape, c, spacing, 9.0)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 30, shape)
    s = findings.FindingSettings()
    kinds = {"ground-glass": np.where(region, -600, -850), "solid": np.where(region, 30, -850),
             "part-solid": np.where(core, 30, np.where(region, -600, -850))}
    for kind, hu in kinds.items():
        m = findings.measure_region(region, (hu + noise).astype(np.int16), spacing, s)
        assert m["nodule_type"] == kind, (kind, m["solid_fraction"])
    # the partial-volume rim of a small solid nodule does not make it part-solid: the core is judged
    small = sphere(shape, c, spacing, 5.0)
    rim = small & ~findings.ndimage.binary_erosion(small, findings.ndimage.generate_binary_structure(3, 1))
    hu = np.where(rim, -500, np.where(small, 40, -850)).astype(np.int16)
    assert findings.measure_region(small, hu, spacing, s)["nodule_type"] == "solid"


def test_segmentation_from_the_mask_or_the_probability():
    spacing = np.array([1.25, 0.8, 0.8])
    shape, c = (30, 60, 60), np.array([15.0, 30.0, 30.0])
    s = findings.FindingSettings()
    nodule = sphere(shape, c, spacing, 8.0)
    vessel = np.zeros(shape, bool)
    vessel[:, 10, 10] = True
    region, how = findings.segment(np.where(nodule, 0.9, 0.0), (nodule | vessel).astype(np.uint8),
                                   c + [0, 3.0, 0], spacing, s)        # the centre 2.4 mm off the component
    assert how == "stage5_mask" and np.array_equal(region, nodule)
    prob = np.exp(-(((np.indices(shape).T - c) * spacing) ** 2).sum(-1).T / (2 * 3.0 ** 2)) * 0.4
    region, how = findings.segment(prob, np.zeros(shape, np.uint8), c, spacing, s)
    assert how == "stage5_probability" and region[tuple(c.astype(int))] and 0 < region.sum() < nodule.sum() * 3
    assert findings.segment(np.zeros(shape), np.zeros(shape, np.uint8), c, spacing, s) == (None, "none")


def test_the_wand_outlines_a_nodule_the_network_marked_too_small():
    """Stage 5's mask at 0.5 holds only the core of a nodule: the wand (FINDING_WAND's bound, seeded at the
    centre) outlines the whole nodule in HU, a solid one and a ground-glass one touching a vessel, within 1.5 mm of
    the diameter (the tolerance the findings are judged by; the vessel adds ~1.5 mm to the ground-glass one, the
    core alone would be 4-6 mm short); with the wand off the core is measured."""
    spacing = np.array([1.25, 0.7, 0.7])
    shape = (40, 80, 80)
    for hu_nodule, diameter in ((40, 12.0), (-550, 8.0)):
        hu = np.full(shape, -850, np.int16)
        hu[:, 39:42, :] = 30                                   # a vessel through the nodule's side
        c = (20.0, 36.0, 40.0)
        nodule = sphere(shape, c, spacing, diameter)
        hu[nodule] = hu_nodule
        core = sphere(shape, c, spacing, diameter / 2)
        s = findings.FindingSettings()
        region, how = findings.wand_refine(hu, core, np.array(c), spacing, s)
        m = findings.measure_region(region, hu, spacing, s)
        assert how == "wand" and abs(m["equivalent_diameter_mm"] - diameter) <= 1.5, (hu_nodule, m)
        off = findings.FindingSettings(wand=())
        assert findings.wand_refine(hu, core, np.array(c), spacing, off) == (core, None)


@pytest.mark.parametrize("direction", [IDENTITY, FLIPPED], ids=["identity", "flipped"])
def test_lung_side_patient_left_is_plus_x(direction):
    """Two lungs, one at each end of the x index axis: the one at larger world x is the patient's left, whether
    the x index runs along +x (identity) or -x (flipped)."""
    shape, spacing = (20, 40, 60), (1.0, 1.0, 2.0)
    origin = (30.0, 20.0, -50.0) if direction == FLIPPED else (-30.0, -20.0, -50.0)
    lung = np.zeros(shape, np.uint8)
    lung[2:18, 5:35, 4:26] = 1
    lung[2:18, 5:35, 34:56] = 1
    geo = (origin, spacing, direction)
    sides = findings.LungSides(lung, geo)
    at = lambda x: ct_io.voxel_to_world(np.array([10.0, 20.0, x]), *geo)
    low, high = ("left", "right") if direction == FLIPPED else ("right", "left")
    assert (sides.side(at(15.0)), sides.side(at(45.0))) == (low, high)
    assert sides.side(at(27.0)) == low                      # at the pleura, beside the lung at low x
    assert findings.LungSides(np.zeros(shape, np.uint8), geo).side(at(15.0)) == "unknown"


def test_findings_without_prediction_outside_the_scan_or_without_source(tmp_path):
    """No stage-5 prediction, a candidate far outside the volume, a NaN stage-5 score, a DICOM folder that is
    gone: the findings keep their centre and probabilities, the pages are written, a line says what is missing."""
    shape = (10, 30, 30)
    attrs = {"seriesuid": "1.2.3", "origin": np.zeros(3), "spacing": np.ones(3), "direction": np.array(IDENTITY),
             "source": "lidc", "source_path": str(tmp_path / "gone")}
    scan = {"hu": np.full(shape, -850, np.int16), "lung_mask": np.ones(shape, np.uint8), "attrs": attrs}
    xyz = np.array([[15.0, 15.0, 5.0], [900.0, 900.0, 900.0], [3.0, 3.0, 3.0]])
    found = findings.measure_scan(scan, str(tmp_path / "none.h5"), xyz, np.array([np.nan, 0.9, 0.1]),
                                  np.array([0.8, 0.9, 0.2]), np.array([0.8, 0.9, 0.2]), 0.5, findings.FindingSettings())
    assert [f["finding"] for f in found["findings"]] == [1, 2] and found["candidate_finding"] == {1: 1, 0: 2}
    assert {f["segmentation"] for f in found["findings"]} == {"none"}
    assert "no stage-5 prediction" in found["warnings"][0]
    assert found["findings"][1]["stage5_probability"] is None and findings.detail_columns(found, 2) == {}
    assert findings.detail_columns(found, 0)["finding"] == 2 and findings.detail_columns(found, 0)["volume_mm3"] == ""
    lines = []
    with findings.FindingsFolder(str(tmp_path), 0.5, log=lines.append) as folder:
        folder.add_scan(found)
        folder.add_scan(dict(found, uid="1.2.4", findings=[], candidate_finding={}, warnings=[]))
    names = sorted(os.listdir(tmp_path / "findings"))
    assert names == ["1.2.3.html", "1.2.3.json", "1.2.3_001.png", "1.2.3_002.png", "1.2.4.html", "1.2.4.json",
                     "index.html"], names                  # no voxels: no mask file
    assert any("DICOM SEG / SR not written" in ln for ln in lines)
    assert any("no stage-5 prediction" in ln for ln in lines)
    assert "0 findings with a final score above 0.5: none." in open(tmp_path / "findings" / "1.2.4.html").read()


# ----------------------------------------------------------------------------- stage 6 end to end

SHAPE, SPACING = (24, 64, 64), (0.8, 0.8, 1.5)          # (z, y, x) voxels; spacing (x, y, z) mm
NODULES = [((12.0, 30.0, 46.0), 8.0, 40), ((11.0, 34.0, 17.0), 9.0, -550)]   # (voxel zyx, diameter, HU)


def _volume():
    """HU: body 20, two lungs (-850) at low and high x index, a solid nodule in the left (high x) lung, a
    ground-glass one in the right; the stand-in stage-5 mask: the two nodules."""
    hu = np.full(SHAPE, 20, np.int16)
    hu[2:22, 8:56, 4:30] = -850
    hu[2:22, 8:56, 34:60] = -850
    sp = np.array(SPACING[::-1])
    mask = np.zeros(SHAPE, np.uint8)
    for c, d, v in NODULES:
        ball = sphere(SHAPE, c, sp, d)
        hu[ball] = v
        mask[ball] = 1
    return hu, mask


def _stage1(work, scan, hu):
    from ct_io import NODULE_DTYPE
    rows = []
    for k, (c, d, _) in enumerate(NODULES, 1):
        w = ct_io.voxel_to_world(np.array(c), scan.origin, scan.spacing, scan.direction)
        rows.append((k, *c, *w, d, -1, b"sphere", 0))
    ct_io.write_scan_h5(os.path.join(work, "1_preprocessed", f"{scan.seriesuid}.h5"), scan,
                        (hu < -400).astype(np.uint8), np.zeros(SHAPE, np.uint8), np.array(rows, NODULE_DTYPE))
    return [ct_io.voxel_to_world(np.array(c), scan.origin, scan.spacing, scan.direction) for c, _, _ in NODULES]


def _dicom_scan(folder, hu):
    import pydicom
    import synthetic_ct
    from pydicom.uid import generate_uid
    s = dict(hu=hu, seriesuid=generate_uid(entropy_srcs=["findings", "series"]),
             study_uid=generate_uid(entropy_srcs=["findings"]),
             patient_id="PATIENT-1", zvals=-60.0 + SPACING[2] * np.arange(SHAPE[0]), ipp_xy=(-25.6, -25.6),
             pixel_spacing=SPACING[0], slice_thickness=SPACING[2], padding="air", pixel_padding_tag=False)
    synthetic_ct.write_dicom_series(s, folder)
    for path in glob.glob(os.path.join(folder, "*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = EVIL
        ds.save_as(path)
    return ct_io.read_dicom_series(folder)


def _tiny_model(path):
    """A stage-6 network of 8^3 patches whose output is 0.95 whatever the patch (kernels 0, final bias 2.944)."""
    import nasnet_v2  # noqa: F401  (TensorFlow's allocator first, as the stages do)
    import fp_net
    model = fp_net.build_model(8, 2, 1, 4, 0.0, 1e-3)
    for layer in model.layers:
        weights = [np.zeros_like(w) for w in layer.get_weights()]
        if layer.name == "prob":
            weights[-1][:] = 2.944                               # sigmoid(2.944) = 0.95
        layer.set_weights(weights)
    model.save(path)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Stage 6 scoring (a stand-in network) a DICOM series and an .mhd scan with stand-in stage-5 predictions."""
    import SimpleITK as sitk
    import fp_reduction
    import report
    base = tmp_path_factory.mktemp("findings")
    work = str(base / "work")
    for d in ("1_preprocessed", "5_predictions", "5_report"):
        os.makedirs(os.path.join(work, d))
    hu, mask = _volume()
    dicom = _dicom_scan(str(base / "dicom" / "series"), hu)
    img = sitk.GetImageFromArray(hu)
    img.SetOrigin((-25.6, -25.6, -60.0))
    img.SetSpacing(SPACING)
    sitk.WriteImage(img, str(base / "scan7.mhd"))
    scans = [dicom, ct_io.read_image(str(base / "scan7.mhd"))]
    rows = []
    for scan in scans:
        centres = _stage1(work, scan, scan.hu)
        report.write_prediction(os.path.join(work, "5_predictions", f"{scan.seriesuid}.h5"),
                                np.where(mask > 0, 0.9, 0.0).astype(np.float32), mask, {})
        body = ct_io.voxel_to_world(np.array([12.0, 4.0, 32.0]), scan.origin, scan.spacing, scan.direction)
        rows += [(scan.seriesuid, *centres[0], 0.9), (scan.seriesuid, *centres[1], 0.8), (scan.seriesuid, *body, 0.3)]
    with open(os.path.join(work, "5_report", "candidates.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["seriesuid", "coordX", "coordY", "coordZ", "probability"]] + rows)
    json.dump({"SCANS": "all"}, open(os.path.join(work, "5_report", "config.json"), "w"))
    model = str(base / "model" / "model.keras")
    os.makedirs(os.path.dirname(model))
    _tiny_model(model)
    out = str(base / "out")
    assert fp_reduction.main([f"--WORK_DIR={work}", "--SCANS=all", f"--MODEL={model}", f"--OUT_DIR={out}",
                              "--PATCH_MM=16", "--VOXEL_MM=2.0", "--TTA=1", "--COMBINE=product",
                              "--THRESHOLD=0.5", "--FINDING_WAND=()"]) == 0     # measured on the mask itself
    detail = list(csv.DictReader(open(os.path.join(out, "candidates_detail.csv"))))
    return {"out": out, "detail": detail, "dicom": dicom, "mhd": scans[1], "mask": mask}


def test_detail_columns_of_every_finding(scored):
    d = scored["detail"]
    assert len(d) == 6
    for uid in (scored["dicom"].seriesuid, "scan7"):
        rows = {r["finding"]: r for r in d if r["seriesuid"] == uid}
        assert sorted(rows) == ["", "1", "2"]                  # the body point (0.3 x 0.95) is no finding
        one, two, rest = rows["1"], rows["2"], rows[""]
        assert (one["nodule_type"], one["lung_side"], two["nodule_type"], two["lung_side"]) == \
            ("solid", "left", "ground-glass", "right")
        assert abs(float(one["volume_mm3"]) - math.pi / 6 * 8 ** 3) / (math.pi / 6 * 8 ** 3) < 0.1
        assert abs(float(two["equivalent_diameter_mm"]) - 9.0) < 0.4 and abs(float(one["axial_diameter_mm"]) - 8) < 0.9
        assert float(one["mean_hu"]) == 40.0 and float(two["max_hu"]) == -550.0
        assert one["segmentation"] == "stage5_mask" and rest["volume_mm3"] == "" and rest["nodule_type"] == ""
        assert float(one["probability"]) == pytest.approx(0.9 * 0.95, abs=1e-3)
        assert [float(one[k]) for k in ("center_z", "center_y", "center_x")] == pytest.approx(NODULES[0][0], abs=0.01)


def test_dicom_seg_reads_back_as_the_mask(scored):
    import highdicom as hd
    import pydicom
    uid = scored["dicom"].seriesuid
    seg = hd.seg.segread(os.path.join(scored["out"], "findings", f"{uid}.seg.dcm"))
    headers = findings_dicom.source_headers(scored["dicom"].path, uid)       # sorted as stage 1's slices
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[h.SOPInstanceUID for h in headers],
                                               combine_segments=True, assert_missing_frames_are_empty=True)
    assert labels.shape == SHAPE
    assert np.array_equal(labels > 0, scored["mask"] > 0)
    for k, (c, _, _) in enumerate(NODULES, 1):                 # segment k is finding k
        assert labels[tuple(int(round(v)) for v in c)] == k
    src = pydicom.dcmread(headers[0].filename, stop_before_pixels=True)
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (src.StudyInstanceUID, src.FrameOfReferenceUID)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Nodule 1", "Nodule 2"]


def test_dicom_sr_measurements_equal_the_csv(scored):
    import highdicom as hd
    uid = scored["dicom"].seriesuid
    path = os.path.join(scored["out"], "findings", f"{uid}.sr.dcm")
    rows = {int(r["finding"]): r for r in scored["detail"] if r["seriesuid"] == uid and r["finding"]}
    got = findings_dicom.read_measurements(path)
    assert [g["finding"] for g in got] == [1, 2]
    for g in got:
        r = rows[g["finding"]]
        for key in ("volume_mm3", "equivalent_diameter_mm", "axial_diameter_mm", "mean_hu", "max_hu", "solid_fraction",
                    "probability", "stage5_probability", "stage6_probability"):
            assert g[key] == float(r[key]), key
        assert (g["nodule_type"], g["lung_side"], g["segment"]) == (r["nodule_type"], r["lung_side"], g["finding"])
    sr = hd.sr.srread(path)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    headers = findings_dicom.source_headers(scored["dicom"].path, uid)
    assert evidence.StudyInstanceUID == headers[0].StudyInstanceUID
    assert uid in {s.SeriesInstanceUID for s in evidence.ReferencedSeriesSequence}
    seg = hd.seg.segread(os.path.join(scored["out"], "findings", f"{uid}.seg.dcm"))
    refs = {i.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in refs


def test_mhd_input_gets_a_nifti_mask_and_json(scored):
    import SimpleITK as sitk
    folder = os.path.join(scored["out"], "findings")
    img = sitk.ReadImage(os.path.join(folder, "scan7.nii.gz"))
    labels = sitk.GetArrayFromImage(img)
    assert np.array_equal(labels > 0, scored["mask"] > 0) and not glob.glob(os.path.join(folder, "scan7*.dcm"))
    assert np.allclose(img.GetOrigin(), scored["mhd"].origin) and np.allclose(img.GetSpacing(), SPACING)
    doc = json.load(open(os.path.join(folder, "scan7.json")))
    rows = {int(r["finding"]): r for r in scored["detail"] if r["seriesuid"] == "scan7" and r["finding"]}
    assert [f["finding"] for f in doc["findings"]] == [1, 2]
    for f in doc["findings"]:
        assert f["volume_mm3"] == float(rows[f["finding"]]["volume_mm3"])
        csv_xyz = [float(rows[f["finding"]][k]) for k in ("coordX", "coordY", "coordZ")]
        assert f["center_world_mm"] == pytest.approx(csv_xyz, abs=1e-3)
        assert labels[tuple(int(round(v)) for v in f["center_voxel_zyx"])] == f["finding"]
    assert doc["files"]["mask (NIfTI)"] == "scan7.nii.gz"


def test_pages_list_every_finding_and_escape_the_scan_text(scored):
    folder = os.path.join(scored["out"], "findings")
    uid = scored["dicom"].seriesuid
    page = open(os.path.join(folder, f"{uid}.html"), encoding="utf-8").read()
    for k, r in enumerate(sorted((r for r in scored["detail"] if r["seriesuid"] == uid and r["finding"]),
                                 key=lambda r: r["finding"]), 1):
        assert f"Finding {k}</h2>" in page and r["nodule_type"] in page
        assert f'src="{uid}_{k:03d}.png"' in page and os.path.isfile(os.path.join(folder, f"{uid}_{k:03d}.png"))
    assert page.index("Finding 1</h2>") < page.index("Finding 2</h2>")        # by probability
    assert "<script" not in page and "<img src=http" not in page and "&lt;script&gt;alert" in page
    index = open(os.path.join(folder, "index.html"), encoding="utf-8").read()
    assert f'href="{uid}.html"' in index and 'href="scan7.html"' in index and "<script" not in index
    for name in os.listdir(folder):
        if name.endswith(".html"):
            text = open(os.path.join(folder, name), encoding="utf-8").read()
            links = re.findall(r'(?:src|href)="([^"]*)"', text)
            assert all("/" not in v and ":" not in v and os.path.isfile(os.path.join(folder, v)) for v in links), links
    assert not [f for f in os.listdir(scored["out"]) if ".tmp" in f]


# ----------------------------------------------------------------------------- the check against the truth

def test_findings_check_matches_by_radius_and_measures_errors():
    """benchmarks/findings_check.py: a finding counts for the truth nodule whose radius holds its centre (the
    higher-scored of two), its errors are measured against the truth's diameter, voxel volume and axial diameter;
    a nodule without a finding within its radius is counted but not found."""
    from benchmarks import findings_check as fc
    import synthetic_ct
    spacing_zyx = np.array([1.0, 0.5, 0.5])
    mask = np.zeros((40, 80, 80), np.uint8)
    big = sphere(mask.shape, (20, 40, 20), spacing_zyx, 10.0)
    mask[big] = 1
    mask[sphere(mask.shape, (20, 40, 62), spacing_zyx, 6.0)] = 2
    nodules = np.zeros(2, synthetic_ct.TRUTH_DTYPE)
    for i, (k, cx, d) in enumerate(((1, 20, 10.0), (2, 62, 6.0))):
        nodules[i]["k"], nodules[i]["diameter_mm"], nodules[i]["kind"] = k, d, b"solid"
        nodules[i]["world_x"], nodules[i]["world_y"], nodules[i]["world_z"] = cx * 0.5, 20.0, 20.0
        nodules[i]["n_voxels"] = int((mask == k).sum())
    truth = {"nodule_mask": mask, "nodules": nodules, "attrs": {"spacing": spacing_zyx[::-1]}}
    v = float((mask == 1).sum() * 0.25)
    row = dict(coordX=10.5, coordY=20.0, coordZ=20.0, probability=0.9, equivalent_diameter_mm=11.0,
               volume_mm3=v * 1.2, axial_diameter_mm=10.0, nodule_type="solid")
    worse = dict(row, probability=0.5, equivalent_diameter_mm=20.0)
    far = dict(row, coordX=31.0 + 3.5)                    # beyond the 3 mm radius of nodule 2 (x = 31 mm)
    entries = fc.match_scan(truth, [worse, row, far])
    assert entries[0]["found"]["equivalent_diameter_mm"] == 11.0            # the higher-scored of the two
    assert "found" not in entries[1]
    assert abs(entries[0]["volume_mm3"] - v) < 1e-6 and 9.0 < entries[0]["axial_mm"] < 11.5
    s = fc.summarize(entries, (5.0, 10.0), 1.5, 0.25)
    assert s[">= 10 mm"]["found"] == 1 and s["5-10 mm"] == dict(s["5-10 mm"], nodules=1, found=0)
    assert s[">= 10 mm"]["diameter_within_tol"] == 1.0 and s[">= 10 mm"]["volume_within_tol"] == 1.0
    assert s[">= 5 mm (all)"]["nodules"] == 2
    assert "| >= 10 mm | 1 | 1 | 100 % |" in fc.table(s, 1.5, 0.25)
