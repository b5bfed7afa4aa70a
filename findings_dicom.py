"""DICOM outputs of stage 6's findings (findings.py), written with highdicom: a Segmentation (SEG) of the
findings' voxels and a Comprehensive 3D SR holding a TID 1500 Measurement Report with one finding per nodule,
both referencing the source CT series (its Study, Series, Frame of Reference and SOP Instance UIDs).

    headers = source_headers(folder, series_uid)     # the series' slice headers (no pixels), sorted along the normal
    seg = segmentation(headers, labels, geometry, findings)      # labels: (Z, Y, X) in the stage-1 grid, k = finding k
    sr = measurement_report(headers, seg, findings)
    seg.save_as(path); sr.save_as(path)
    rows = read_measurements(sr_path)                # back: one dict per finding, candidates_detail.csv's names

SEG: one binary segment per finding (segment k = finding k, "Nodule k", category Morphologically abnormal
structure, type Nodule, algorithm AUTOMATIC, the finding's tracking UID), in the stage-1 voxel grid given as a
highdicom Volume (origin, spacing, direction): where that grid is the series' own (the usual case) each frame
references its source slice; a resampled stage-1 grid (gantry tilt, gaps in z) still lies in the series' frame
of reference. Only the slices holding findings are stored.

SR: per finding a Volumetric ROI group (TID 1411): tracking identifier "Nodule k" (the UID of its SEG segment),
finding type Nodule, finding site Lung with its laterality, the SEG segment (a finding without voxels: its centre
as a 3D point), measurements volume (mm3), diameter (method: sphere of equal volume), long axis (method: longest
axial diameter), mean and maximum attenuation coefficient (HU), solid fraction, and the final, stage-5 and stage-6
probabilities (methods name which); qualitative evaluation: nodule type. Concepts without a standard code use the
private coding scheme 99LUNGNOD.
"""
import glob
import os
import warnings

import numpy as np

import ct_io

_SCHEME = "99LUNGNOD"                        # private coding scheme of the concepts DICOM has no code for
_MANUFACTURER = "lung-nodule pipeline"
_MODEL = "NASNetMobile GCN-SE segmentation + 3D false-positive reduction"
_SERIES_NUMBERS = (9001, 9002)               # SEG, SR
# the type-2 patient / study attributes highdicom copies from the source (empty when the source has none)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
          "ReferringPhysicianName", "StudyDate", "StudyTime")


def _private(value, meaning):
    from highdicom.sr import CodedConcept
    return CodedConcept(value, _SCHEME, meaning)


def _measures():
    """(column, concept name, method or None, unit) of each SR measurement."""
    from pydicom.sr.codedict import codes
    ucum, p = codes.UCUM, _private
    return [("volume_mm3", codes.SCT.Volume, None, ucum.CubicMillimeter),
            ("equivalent_diameter_mm", codes.SCT.Diameter, p("EQVSPHERE", "Diameter of the sphere of equal volume"),
             ucum.Millimeter),
            ("axial_diameter_mm", codes.SCT.LongAxis, p("AXIALMAX", "Longest diameter on an axial slice"),
             ucum.Millimeter),
            ("mean_hu", codes.DCM.MeanAttenuationCoefficient, None, ucum.HounsfieldUnit),
            ("max_hu", codes.DCM.MaximumAttenuationCoefficient, None, ucum.HounsfieldUnit),
            ("solid_fraction", p("SOLIDFRAC", "Solid fraction"), None, ucum.NoUnits),
            ("probability", codes.DCM.Probability, p("FINAL", "Final score (stage 6)"), ucum.NoUnits),
            ("stage5_probability", codes.DCM.Probability, p("STAGE5", "Stage-5 segmentation network"),
             ucum.NoUnits),
            ("stage6_probability", codes.DCM.Probability, p("STAGE6", "Stage-6 false-positive reduction network"),
             ucum.NoUnits)]


_TYPES = {"solid": ("SOLID", "Solid"), "part-solid": ("PARTSOLID", "Part-solid"),
          "ground-glass": ("GROUNDGLASS", "Ground-glass")}


# ----------------------------------------------------------------------------- the source series

def source_headers(folder, series_uid):
    """The headers (no pixel data) of the image slices of series ``series_uid`` under ``folder``, sorted along the
    slice normal, with the type-2 patient / study attributes highdicom copies set (empty) where missing.
    ValueError when there is none."""
    import pydicom
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True)):
        if not os.path.isfile(path) or os.path.basename(path).upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:                            # not DICOM: not part of the series
            continue
        if str(ds.get("SeriesInstanceUID", "")) == series_uid and "ImagePositionPatient" in ds:
            out.append(ds)
    if not out:
        raise ValueError(f"{folder}: no image of series {series_uid}")
    orient = np.array([float(v) for v in out[0].ImageOrientationPatient])
    normal = np.cross(orient[:3], orient[3:])
    out.sort(key=lambda ds: float(np.array([float(v) for v in ds.ImagePositionPatient]) @ normal))
    for ds in out:
        for name in _TYPE2:
            if name not in ds:
                setattr(ds, name, "")
    return out


def _affine(geometry, z0):
    """The 4x4 affine of the stage-1 grid from slice ``z0`` on: array axes (z, y, x) -> patient (LPS) mm."""
    origin, spacing, direction = geometry
    d = np.asarray(direction, np.float64).reshape(3, 3)
    aff = np.eye(4)
    for col, (axis, s) in enumerate(((2, spacing[2]), (1, spacing[1]), (0, spacing[0]))):
        aff[:3, col] = d[:, axis] * float(s)
    aff[:3, 3] = ct_io.voxel_to_world(np.array([float(z0), 0.0, 0.0]), origin, spacing, direction)
    return aff


# ----------------------------------------------------------------------------- SEG

def segmentation(headers, labels, geometry, findings):
    """A highdicom Segmentation of the label volume ``labels`` (stage-1 grid; finding k = k) with one segment per
    finding (findings.py's dicts, with ``tracking_uid``), or None when no finding has voxels."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid
    if labels is None or not labels.any():
        return None
    zs = np.nonzero(labels.any(axis=(1, 2)))[0]
    volume = hd.Volume(np.ascontiguousarray(labels[zs[0]:zs[-1] + 1]), _affine(geometry, zs[0]), "PATIENT",
                       frame_of_reference_uid=headers[0].FrameOfReferenceUID)
    algorithm = hd.AlgorithmIdentificationSequence(name=_MANUFACTURER, version="1",
                                                   family=codes.DCM.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=f["finding"], segment_label=f"Nodule {f['finding']}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=f["tracking_uid"], tracking_id=f"Nodule {f['finding']}")
        for f in findings]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)          # e.g. a one-component PatientName
        seg = hd.seg.Segmentation(
            source_images=headers, pixel_array=volume, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=generate_uid(), series_number=_SERIES_NUMBERS[0],
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer=_MANUFACTURER,
            manufacturer_model_name=_MODEL, software_versions="1", device_serial_number="none",
            series_description="Lung nodule findings (SEG)")
    return seg


# ----------------------------------------------------------------------------- SR

def _group(f, seg, headers):
    """The TID 1411 group of one finding."""
    from highdicom import sr
    from pydicom.sr.codedict import codes
    series = sr.SourceSeriesForSegmentation(headers[0].SeriesInstanceUID)
    if seg is not None and f.get("in_seg"):
        where = dict(referenced_segment=sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=f["finding"],
            source_series=series))
    else:
        where = dict(referenced_volume_surface=sr.VolumeSurface(
            graphic_type=sr.GraphicTypeValues3D.POINT, graphic_data=np.array([f["center_world_mm"]], np.float64),
            frame_of_reference_uid=headers[0].FrameOfReferenceUID, source_series=series))
    side = {"left": codes.SCT.Left, "right": codes.SCT.Right}.get(f.get("lung_side"))
    measurements = [sr.Measurement(name=name, value=float(f[key]), unit=unit, method=method)
                    for key, name, method, unit in _measures() if f.get(key) is not None]
    quality = []
    if f.get("nodule_type") in _TYPES:
        quality.append(sr.QualitativeEvaluation(name=_private("NODTYPE", "Nodule type"),
                                                value=_private(*_TYPES[f["nodule_type"]])))
    return sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=sr.TrackingIdentifier(uid=f["tracking_uid"], identifier=f"Nodule {f['finding']}"),
        finding_type=codes.SCT.Nodule,
        finding_sites=[sr.FindingSite(anatomic_location=codes.SCT.Lung, laterality=side)],
        measurements=measurements, qualitative_evaluations=quality, **where)


def measurement_report(headers, seg, findings):
    """A Comprehensive 3D SR (TID 1500 Measurement Report) with one group per finding, its evidence the source
    series (and the SEG)."""
    import highdicom as hd
    from highdicom import sr
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid
    device = sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(entropy_srcs=[_MANUFACTURER, _MODEL]),
                                                    name=_MANUFACTURER, model_name=_MODEL)
    context = sr.ObservationContext(observer_device_context=sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                  imaging_measurements=[_group(f, seg, headers) for f in findings])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        doc = sr.Comprehensive3DSR(
            evidence=list(headers) + ([seg] if seg is not None else []), content=report,
            series_instance_uid=generate_uid(), series_number=_SERIES_NUMBERS[1], sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer=_MANUFACTURER, is_complete=True,
            series_description="Lung nodule findings (SR)",
            coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(designator=_SCHEME,
                                                                               name=f"{_MANUFACTURER} concepts")])
    return doc


def write(folder, uid, found, labels, source_folder):
    """``uid``.seg.dcm (when a finding has voxels) and ``uid``.sr.dcm in ``folder`` for one scan (findings.py's
    measure_scan dict) -> ({"seg": name, "sr": name}, the series' SeriesDescription)."""
    headers = source_headers(source_folder, uid)
    for f in found["findings"]:
        f["in_seg"] = bool(labels is not None and (labels == f["finding"]).any())
    seg = segmentation(headers, labels, found["geometry"], found["findings"])
    files = {}
    if seg is not None:
        files["seg"] = f"{uid}.seg.dcm"
        seg.save_as(os.path.join(folder, files["seg"]))
    files["sr"] = f"{uid}.sr.dcm"
    measurement_report(headers, seg, found["findings"]).save_as(os.path.join(folder, files["sr"]))
    return files, str(headers[0].get("SeriesDescription", ""))


def read_measurements(path):
    """An SR written by measurement_report -> one dict per finding: finding (from "Nodule k"), tracking_uid,
    lung_side, nodule_type, segment (the SEG segment number or None) and the measurements by their
    candidates_detail.csv names."""
    import highdicom as hd
    doc = hd.sr.srread(path)
    keys = {(name.value, method.value if method is not None else None): key for key, name, method, _ in _measures()}
    types = {code: name for name, (code, _) in _TYPES.items()}
    out = []
    for g in doc.content.get_volumetric_roi_measurement_groups():
        row = {"finding": int(str(g.tracking_identifier).split()[-1]), "tracking_uid": str(g.tracking_uid)}
        for m in g.get_measurements():
            row[keys[(m.name.value, m.method.value if m.method is not None else None)]] = float(m.value)
        for q in g.get_qualitative_evaluations():
            row["nodule_type"] = types.get(q.value.value)
        sites = g.finding_sites
        side = sites[0].laterality if sites else None
        row["lung_side"] = side.meaning.lower() if side is not None else "unknown"
        seg = g.referenced_segment
        row["segment"] = int(seg.referenced_segment_numbers[0]) if seg is not None else None
        out.append(row)
    return out
