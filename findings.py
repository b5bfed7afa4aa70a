"""Per-finding clinical outputs: every candidate above stage 6's operating threshold segmented (stage 5's
prediction around it, outlined again in HU by the magic wand) and measured, then written as the files and pages
a reader opens.

    s = FindingSettings(solid_hu=-200.0, type_fractions=(0.1, 0.8))
    found = measure_scan(scan, pred_path, xyz, p5, p6, score, threshold, s)   # where the scan is scored
    row = detail_columns(found, i)              # candidates_detail.csv's finding columns of candidate i
    with FindingsFolder(out_dir, threshold) as folder:     # OUT_DIR/findings, renamed into place when complete
        folder.add_scan(found)                  # <uid>.json, <uid>.html + PNGs (findings_page.py); DICOM input:
                                                # <uid>.seg.dcm and <uid>.sr.dcm (findings_dicom.py), else
                                                # <uid>.nii.gz; index.html when the block ends

A finding is a candidate whose final score (stage 6's COMBINE) is above THRESHOLD; the findings of a scan are
numbered 1, 2, ... by that score, highest first. Its centre is the candidate's world position (x, y, z mm) and
that position's voxel (z, y, x, fractional) in the stage-1 grid.

Segmentation, inside a cube of ``box_mm`` around the centre, in the stage-5 prediction (/mask, /prob; the stage-1
grid): the 26-connected component of /mask containing the centre voxel, or else the one nearest to the centre
within ``search_mm`` ("stage5_mask"); without one, the 26-connected region of /prob >= ``peak`` x the highest
probability within ``search_mm`` of the centre, around that voxel, when that probability is at least
``min_prob`` ("stage5_probability"); else none ("none": no measurement, only the centre). The stage-5 region
is then outlined again in the HU image ("wand", ``wand`` = (a, b), FINDING_WAND of stage 6; () = off): the
magic wand of cell_magic_wand.py (the stage-1 labeller) seeded at the centre, with the diameter bound
a x the stage-5 region's equivalent diameter + b mm (the network's mask at 0.5 is smaller than the nodule);
a finding without a stage-5 region (an image blob the network gave nothing) is outlined by the wand alone, its
bound that of a region of diameter 2 x ``search_mm``, when the outline has >= 8 voxels of median HU >= -700.

Measurements of the segmented voxels (spacing from the stage-1 file):
- volume (mm^3) = voxels x voxel volume; equivalent diameter = the diameter of the sphere of that volume,
  (6 V / pi)^(1/3);
- longest axial diameter (mm): on each axial slice the largest distance between the centres of two voxels of
  the finding, plus one pixel (the voxels' own extent), the largest over the slices (that slice is pictured);
- mean and max HU of the voxels.

Type from the HU inside (``solid_hu`` -200 HU, ``type_fractions`` (0.1, 0.8) by default: FINDING_SOLID_HU and
FINDING_TYPE_FRACTIONS of stage 6):
- the core = the segmented voxels less their one-voxel rim (the voxels with a 6-neighbour outside), so the
  partial-volume edge does not count; the whole region when the core is empty (very small findings);
- solid fraction f = the share of core voxels at or above ``solid_hu`` (-200 HU lies between ground glass,
  about -800 to -300 HU, and soft tissue, about -100 to +100 HU);
- f >= type_fractions[1]: "solid"; f < type_fractions[0]: "ground-glass"; otherwise "part-solid".

Lung side: the lung mask's components (at half resolution); when it has two lungs (the second largest at least a
fifth of the largest), the finding belongs to the lung with the most voxels within 10 mm of its centre, and that
lung is the left one when its centroid lies at larger world x than the other's (LPS: patient left = +x); without
two lungs, or far from both, the finding is left when its x is larger than that of the lung mask's centroid (the
midline); "unknown" without a lung mask.
"""
import dataclasses
import math
import os
import sys

import numpy as np
from scipy import ndimage

import ct_io
import runfiles

DETAIL_FIELDS = ["finding", "center_z", "center_y", "center_x", "volume_mm3", "equivalent_diameter_mm",
                 "axial_diameter_mm", "mean_hu", "max_hu", "solid_fraction", "nodule_type", "lung_side",
                 "segmentation"]            # candidates_detail.csv's finding columns (empty for other candidates)
_NEIGHBOURS = np.ones((3, 3, 3), bool)      # 26-connectivity
_WAND_ALONE_MIN_VOXELS = 8                  # without a stage-5 region the wand's outline counts from this size ...
_WAND_ALONE_MIN_HU = -700.0                 # ... and median HU (ground glass and denser; lung is about -850)


@dataclasses.dataclass(frozen=True)
class FindingSettings:
    """How findings are segmented and typed (see the module's docstring)."""
    solid_hu: float = -200.0                # a voxel at or above this HU is solid
    type_fractions: tuple = (0.1, 0.8)      # solid fraction: below the first ground-glass, from the second solid
    search_mm: float = 5.0                  # a mask component (or probability peak) within this of the centre
    box_mm: float = 60.0                    # measured inside a cube of this side around the centre
    peak: float = 0.5                       # without a mask component: prob >= peak x the local maximum
    min_prob: float = 0.02                  # ... when that maximum is at least this
    wand: tuple = (1.5, 6.0)                # the wand's diameter bound = a x stage-5 diameter + b mm; () = off

    @classmethod
    def from_config(cls, cfg):
        """From stage 6's settings (FINDING_SOLID_HU, FINDING_TYPE_FRACTIONS, FINDING_WAND)."""
        return cls(solid_hu=float(cfg["FINDING_SOLID_HU"]), type_fractions=tuple(cfg["FINDING_TYPE_FRACTIONS"]),
                   wand=tuple(cfg.get("FINDING_WAND", cls.wand)))


# ----------------------------------------------------------------------------- segmentation and measurements

def ball(shape, center, spacing_zyx, radius_mm):
    """Boolean (shape) of the voxels within ``radius_mm`` of ``center`` (voxels, z, y, x)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center, spacing_zyx))
    return d2 <= radius_mm ** 2


def segment(prob, mask, center, spacing_zyx, s):
    """The finding's voxels in a box of the prediction (``prob``, ``mask``; either None when missing) around
    ``center`` (voxels in the box) -> (boolean region or None, how: "stage5_mask" / "stage5_probability" /
    "none"). See the module's docstring."""
    shape = (prob if prob is not None else mask).shape if (prob is not None or mask is not None) else None
    if shape is None or not all(shape):
        return None, "none"
    near = ball(shape, center, spacing_zyx, s.search_mm)
    c = tuple(int(v) for v in np.clip(np.rint(center), 0, np.asarray(shape) - 1))
    if mask is not None and (mask[near] > 0).any():
        labels, _ = ndimage.label(mask > 0, _NEIGHBOURS)
        lab = labels[c]
        if lab == 0:                                     # the nearest component within search_mm
            pts = np.argwhere((labels > 0) & near)
            lab = labels[tuple(pts[np.argmin((((pts - center) * spacing_zyx) ** 2).sum(axis=1))])]
        return labels == lab, "stage5_mask"
    if prob is not None:
        i = np.unravel_index(np.argmax(np.where(near, prob, -1.0)), shape)
        top = float(prob[i])
        if near[i] and top >= s.min_prob:
            labels, _ = ndimage.label(prob >= s.peak * top, _NEIGHBOURS)
            return labels == labels[i], "stage5_probability"
    return None, "none"


def wand_refine(hu, region, center, spacing_zyx, s):
    """The finding outlined in the HU image (``hu``: the box of ``region``) by the magic wand of
    cell_magic_wand.py, seeded at ``center`` (voxels in the box), its diameter bound ``s.wand`` = (a, b): a x the
    stage-5 region's equivalent diameter + b mm (without a stage-5 region, ``region`` None: of a nodule filling the
    search sphere, 2 x ``search_mm``) -> (region, "wand"); (the stage-5 region, None) when the wand is off or its
    outline is empty."""
    if not s.wand:
        return region, None
    from cell_magic_wand import wand_nodule_box
    n5 = np.count_nonzero(region) if region is not None else 0
    d5 = (6.0 * n5 * float(np.prod(spacing_zyx)) / math.pi) ** (1.0 / 3.0) if n5 else 2.0 * s.search_mm
    box, sl = wand_nodule_box(hu, center, s.wand[0] * d5 + s.wand[1], spacing_zyx)
    out = np.zeros(np.shape(hu), bool)
    out[sl] = box
    if n5 == 0 and (np.count_nonzero(out) < _WAND_ALONE_MIN_VOXELS or np.median(hu[out]) < _WAND_ALONE_MIN_HU):
        return region, None                        # the wand alone outlined lung, not a nodule
    return (out, "wand") if out.any() else (region, None)


def axial_diameter(region, spacing_zyx):
    """The longest axial diameter of a region (see the module's docstring) -> (mm, slice index in the region's
    array, the two end voxels ((y, x), (y, x)))."""
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist, squareform
    sy, sx = float(spacing_zyx[1]), float(spacing_zyx[2])
    best = (-1.0, 0, ((0, 0), (0, 0)))
    for z in np.nonzero(region.any(axis=(1, 2)))[0]:
        pts = np.argwhere(region[z])
        if len(pts) >= 3:
            try:
                pts = pts[ConvexHull(pts * (sy, sx)).vertices]
            except QhullError:                               # collinear: every point
                pass
        d = squareform(pdist(pts * (sy, sx))) if len(pts) > 1 else np.zeros((1, 1))
        i, j = np.unravel_index(np.argmax(d), d.shape)
        if d[i, j] > best[0]:
            best = (float(d[i, j]), int(z), (tuple(int(v) for v in pts[i]), tuple(int(v) for v in pts[j])))
    return best[0] + (sy + sx) / 2.0, best[1], best[2]


def nodule_type(solid_fraction, s):
    """"solid", "part-solid" or "ground-glass" from the core's solid fraction (see the module's docstring)."""
    if solid_fraction >= s.type_fractions[1]:
        return "solid"
    return "ground-glass" if solid_fraction < s.type_fractions[0] else "part-solid"


def measure_region(region, hu, spacing_zyx, s):
    """Volume, diameters, HU and type of the voxels ``region`` (boolean) of ``hu`` (the same box) -> dict (rounded
    as the tables give them) with the slice and end voxels of the axial diameter."""
    n = int(np.count_nonzero(region))
    volume = n * float(np.prod(spacing_zyx))
    diameter, z, ends = axial_diameter(region, spacing_zyx)
    vals = np.asarray(hu)[region]
    core = ndimage.binary_erosion(region, ndimage.generate_binary_structure(3, 1), border_value=0)
    if not core.any():
        core = region
    solid = float(np.mean(np.asarray(hu)[core] >= s.solid_hu))
    return {"n_voxels": n, "volume_mm3": round(volume, 1),
            "equivalent_diameter_mm": round((6.0 * volume / math.pi) ** (1.0 / 3.0), 2),
            "axial_diameter_mm": round(diameter, 2), "mean_hu": round(float(vals.mean()), 1),
            "max_hu": round(float(vals.max()), 1), "solid_fraction": round(solid, 3),
            "nodule_type": nodule_type(solid, s), "_z": z, "_ends": ends}


class LungSides:
    """Left / right of world points from a scan's lung mask (see the module's docstring)."""

    def __init__(self, lung, geometry, step=2):
        self.geo, self.step, self.mid, self.lungs = geometry, step, None, None
        if lung is None:
            return
        small = np.asarray(lung)[::step, ::step, ::step] > 0
        if not small.any():
            return
        world_x = lambda zyx: float(ct_io.voxel_to_world(np.asarray(zyx) * step, *geometry)[0])
        self.mid = world_x(ndimage.center_of_mass(small))
        self.labels, n = ndimage.label(small, _NEIGHBOURS)
        sizes = np.bincount(self.labels.ravel())[1:]
        order = np.argsort(-sizes, kind="stable") + 1
        if n >= 2 and sizes[order[1] - 1] >= 0.2 * sizes[order[0] - 1]:
            self.lungs = {int(k): world_x(ndimage.center_of_mass(small, self.labels, int(k))) for k in order[:2]}

    def side(self, xyz):
        """"left", "right" or "unknown" for the world point ``xyz``."""
        if self.mid is None:
            return "unknown"
        if self.lungs:
            zyx = ct_io.world_to_voxel(np.asarray(xyz, np.float64), *self.geo) / self.step
            spacing = np.asarray(self.geo[1], np.float64)[::-1] * self.step
            box = _box(zyx, self.labels.shape, spacing, 20.0)
            counts = {k: int(np.count_nonzero(self.labels[box] == k)) for k in self.lungs}
            k = max(counts, key=counts.get)
            if counts[k]:
                other = next(j for j in self.lungs if j != k)
                return "left" if self.lungs[k] > self.lungs[other] else "right"
        return "left" if float(xyz[0]) > self.mid else "right"


def _box(center, shape, spacing_zyx, side_mm):
    """Slices of a cube of ``side_mm`` around ``center`` (voxels), clipped to ``shape`` (empty when outside)."""
    half = np.ceil(side_mm / 2.0 / np.asarray(spacing_zyx, np.float64)).astype(int)
    c = np.rint(np.asarray(center, np.float64)).astype(int)
    lo, hi = np.clip(c - half, 0, shape), np.clip(c + half + 1, 0, shape)
    return tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))


# ----------------------------------------------------------------------------- one scan's findings

class _Prediction:
    """Boxes of a stage-5 prediction file (/prob, /mask), read box by box; ``problem`` says why there are none."""

    def __init__(self, path, shape):
        self.h5, self.problem = None, ""
        if not path or not os.path.isfile(path):
            self.problem = f"no stage-5 prediction {path or ''}".strip()
            return
        import tables
        try:
            self.h5 = tables.open_file(path, "r")
            found = tuple(self.h5.root.prob.shape)
        except Exception as e:                          # corrupt or foreign file: measured without it
            self.close()
            self.problem = f"{path}: unreadable stage-5 prediction ({runfiles.one_line(e, 120)})"
            return
        if found != tuple(shape):
            self.close()
            self.problem = f"{path}: prediction of shape {found}, the scan is {tuple(shape)}"

    def boxes(self, box):
        if self.h5 is None:
            return None, None
        return np.asarray(self.h5.root.prob[box], np.float32), np.asarray(self.h5.root.mask[box])

    def close(self):
        if self.h5 is not None:
            self.h5.close()
        self.h5 = None


def measure_scan(scan, pred_path, xyz, p5, p6, score, threshold, s):
    """The findings of one scan (ct_io.read_stage1's dict with /hu and /lung_mask): its candidates (world
    ``xyz``, stage-5 ``p5``, stage-6 ``p6``, final ``score``) above ``threshold``, measured on the stage-5
    prediction file ``pred_path`` -> dict: uid, geometry, shape, source, source_path, findings (a list, by
    score), candidate_finding ({candidate index: finding number}), warnings."""
    a = scan["attrs"]
    geo = tuple(tuple(float(v) for v in np.asarray(a[k]).reshape(-1)) for k in ("origin", "spacing", "direction"))
    hu = scan["hu"]
    score = np.asarray(score, np.float64)
    above = np.nonzero(score > threshold)[0]
    order = above[np.argsort(-score[above], kind="stable")]
    out = {"uid": str(a.get("seriesuid", "")), "geometry": geo, "shape": tuple(hu.shape),
           "source": str(a.get("source", "")), "source_path": str(a.get("source_path", "")), "findings": [],
           "candidate_finding": {}, "warnings": []}
    if not len(order):
        return out
    sides = LungSides(scan.get("lung_mask"), geo)
    pred = _Prediction(pred_path, hu.shape)
    if pred.problem:
        out["warnings"].append(f"{out['uid']}: {pred.problem}: findings not segmented")
    try:
        for rank, i in enumerate(order, 1):
            f = measure_one(hu, pred, geo, np.asarray(xyz[i], np.float64), s)
            f.update(finding=rank, lung_side=sides.side(xyz[i]), probability=round(float(score[i]), 6),
                     stage5_probability=round(float(p5[i]), 6) if np.isfinite(p5[i]) else None,
                     stage6_probability=round(float(p6[i]), 6))
            out["findings"].append(f)
            out["candidate_finding"][int(i)] = rank
    finally:
        pred.close()
    return out


def measure_one(hu, pred, geo, xyz, s):
    """One finding at world ``xyz``: centre, segmentation and measurements (None where not measured), the
    region (``_box``, ``_region``) and the picture's crop (``_picture``)."""
    spacing = np.asarray(geo[1], np.float64)[::-1]
    zyx = ct_io.world_to_voxel(xyz, *geo)
    f = {"center_world_mm": [round(float(v), 3) for v in xyz], "center_voxel_zyx": [round(float(v), 2) for v in zyx],
         "segmentation": "none", "n_voxels": 0, "_box": None, "_region": None}
    f.update({k: None for k in ("volume_mm3", "equivalent_diameter_mm", "axial_diameter_mm", "mean_hu", "max_hu",
                                "solid_fraction", "nodule_type")})
    inside = bool(np.all((zyx > -0.5) & (zyx < np.asarray(hu.shape) - 0.5)))
    box = _box(zyx, hu.shape, spacing, s.box_mm) if inside else None
    z, ends = (int(np.clip(np.rint(zyx[0]), 0, hu.shape[0] - 1)), None)
    if box is not None:
        local = zyx - [b.start for b in box]
        region, how = segment(*pred.boxes(box), local, spacing, s)
        region, wand = wand_refine(hu[box], region, local, spacing, s)
        how = wand or how
        if region is not None and region.any():
            m = measure_region(region, hu[box], spacing, s)
            z, ends = box[0].start + m.pop("_z"), m.pop("_ends")
            ends = [tuple(int(v) for v in np.add(e, (box[1].start, box[2].start))) for e in ends]
            sub = ndimage.find_objects(region.astype(np.uint8))[0]
            f.update(m, segmentation=how, _region=region[sub],
                     _box=tuple((b.start + q.start, b.start + q.stop) for b, q in zip(box, sub)))
    f["_picture"] = _picture_crop(hu, f, z, zyx, spacing, ends)
    return f


def _picture_crop(hu, f, z, zyx, spacing, ends):
    """What the finding's picture shows: an axial crop of ``hu`` at slice ``z`` around the finding, its outline
    there and its axial diameter (crop voxels)."""
    diameter = f["axial_diameter_mm"] or 10.0
    half = int(max(24, math.ceil(1.5 * diameter / float(spacing[1]))))
    cy, cx = (int(np.clip(np.rint(v), 0, n - 1)) for v, n in zip(zyx[1:], hu.shape[1:]))
    ys = slice(max(cy - half, 0), min(cy + half + 1, hu.shape[1]))
    xs = slice(max(cx - half, 0), min(cx + half + 1, hu.shape[2]))
    outline = np.zeros((ys.stop - ys.start, xs.stop - xs.start), bool)
    if f["_region"] is not None:
        (z0, z1), (y0, y1), (x0, x1) = f["_box"]
        if z0 <= z < z1:
            full = np.zeros(hu.shape[1:], bool)
            full[y0:y1, x0:x1] = f["_region"][z - z0]
            outline = full[ys, xs]
    line = [(e[0] - ys.start, e[1] - xs.start) for e in ends] if ends else None
    return {"hu": np.array(hu[z, ys, xs]), "outline": outline, "line": line, "z": int(z),
            "center": (cy - ys.start, cx - xs.start)}


def detail_columns(found, i):
    """candidates_detail.csv's finding columns of candidate ``i`` of a scan (measure_scan's dict), all empty
    for a candidate that is no finding."""
    rank = found["candidate_finding"].get(int(i)) if found else None
    if rank is None:
        return {}
    f = found["findings"][rank - 1]
    row = {k: ("" if f.get(k) is None else f[k]) for k in DETAIL_FIELDS}
    row.update({k: f"{v:.2f}" for k, v in zip(("center_z", "center_y", "center_x"), f["center_voxel_zyx"])})
    return row


def label_volume(found):
    """The findings' voxels as one label volume (Z, Y, X) in the stage-1 grid: finding k = k (uint8, uint16 beyond
    255 findings); a voxel of two findings goes to the higher scored one. None when no finding has voxels."""
    regions = [f for f in found["findings"] if f["_region"] is not None]
    if not regions:
        return None
    labels = np.zeros(found["shape"], np.uint8 if len(found["findings"]) < 256 else np.uint16)
    for f in reversed(regions):                        # the lowest scored first: the higher ones overwrite
        box = tuple(slice(a, b) for a, b in f["_box"])
        labels[box][f["_region"]] = f["finding"]
    return labels


def _log(line):
    print(line, file=sys.stderr)


# ----------------------------------------------------------------------------- the findings folder

def rules(s, threshold):
    """The definitions a reader of the findings needs, as lines of text (the pages and the JSON hold them)."""
    lo, hi = s.type_fractions
    return [f"Findings: candidates whose final score is above {threshold}, numbered by that score.",
            "Segmentation: the stage-5 mask's 3D component at (or within "
            f"{s.search_mm:g} mm of) the centre; without one, the stage-5 probability >= {s.peak:g} x its maximum "
            f"near the centre; measured inside a {s.box_mm:g} mm cube.",
            "Volume: voxels x voxel volume; equivalent diameter: of the sphere of that volume; longest axial "
            "diameter: the largest distance between two voxel centres on one axial slice, plus one pixel.",
            f"Type: solid fraction = share of the core's voxels (the region less its one-voxel rim) at or above "
            f"{s.solid_hu:g} HU; solid from {hi:g}, ground-glass below {lo:g}, part-solid between.",
            "Lung side: the lung of the stage-1 lung mask the finding lies in (patient left = +x, LPS)."]


def _write_mask(path, labels, geometry):
    """The label volume as a compressed NIfTI (or any SimpleITK format by the name) in the scan's geometry."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(np.ascontiguousarray(labels))
    origin, spacing, direction = geometry
    img.SetOrigin([float(v) for v in origin])
    img.SetSpacing([float(v) for v in spacing])
    img.SetDirection([float(v) for v in direction])
    sitk.WriteImage(img, path, True)


def _is_dicom_source(path):
    """Whether a stage-1 file's source_path is a DICOM series' folder (not a volume file)."""
    return bool(path) and not path.lower().endswith(ct_io.IMAGE_EXTENSIONS)


class FindingsFolder:
    """OUT_DIR/findings/ for every scored scan (``add_scan``): <uid>.json, <uid>.html and its PNGs, and the
    mask: DICOM SEG + SR for DICOM input (findings_dicom.py), <uid>.nii.gz otherwise; index.html when the block
    ends. Written into findings.tmp, renamed into place when the block ends without error (an earlier folder
    is replaced whole; nothing is renamed when it raises)."""

    def __init__(self, out_dir, threshold, settings=None, log=_log):
        self.path, self.threshold, self.log = os.path.join(out_dir, "findings"), threshold, log
        self.settings = settings or FindingSettings()
        self.scans = []

    def __enter__(self):
        self._atomic = runfiles.atomic(self.path)
        self.folder = self._atomic.__enter__()
        os.makedirs(self.folder)
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            import findings_page
            try:
                findings_page.write_index(os.path.join(self.folder, "index.html"), self.scans, self.threshold)
            except BaseException as e:
                self._atomic.__exit__(type(e), e, e.__traceback__)
                raise
        return self._atomic.__exit__(kind, value, tb)

    def add_scan(self, found):
        """One scan's files (``found``: measure_scan's dict)."""
        import findings_page
        from pydicom.uid import generate_uid
        uid = found["uid"]
        for line in found["warnings"]:
            self.log(f"warning: {line}")
        try:
            runfiles.file_in(self.folder, uid, ".json")
        except ValueError as e:
            self.log(f"warning: {e}: no findings files for this scan")
            return
        for f in found["findings"]:
            f["tracking_uid"] = generate_uid()
        files, description = self._masks(found)
        pictures = findings_page.draw(self.folder, found)
        files = {"JSON": f"{uid}.json", **files}
        info = {"description": description or "", "threshold": self.threshold,
                "rules": rules(self.settings, self.threshold)}
        runfiles.write_json(os.path.join(self.folder, files["JSON"]), {
            "seriesuid": uid, "series_description": description, "source": found["source"],
            "source_path": found["source_path"], "threshold": self.threshold, "definitions": info["rules"],
            "files": files, "pictures": pictures, "findings": found["findings"]})
        findings_page.write_page(os.path.join(self.folder, f"{uid}.html"), found, info, pictures, files)
        probs = [f["probability"] for f in found["findings"]]
        types = sorted({f["nodule_type"] for f in found["findings"] if f["nodule_type"]})
        self.scans.append({"uid": uid, "page": f"{uid}.html", "description": description or "", "n": len(probs),
                           "top": max(probs) if probs else None, "types": ", ".join(types)})

    def _masks(self, found):
        """The scan's mask files -> ({what: file name}, series description or None): DICOM SEG + SR for a DICOM
        source (when its folder can be read), else the label volume as <uid>.nii.gz; none without findings."""
        uid, source = found["uid"], found["source_path"]
        if not found["findings"]:
            return {}, None
        labels = label_volume(found)
        if _is_dicom_source(source):
            import findings_dicom
            try:
                names, description = findings_dicom.write(self.folder, uid, found, labels, source)
                return {"DICOM SEG" if k == "seg" else "DICOM SR": v for k, v in names.items()}, description
            except Exception as e:                          # the source moved, or highdicom refused: said, then NIfTI
                for name in (f"{uid}.seg.dcm", f"{uid}.sr.dcm"):
                    if os.path.exists(os.path.join(self.folder, name)):
                        os.remove(os.path.join(self.folder, name))
                self.log(f"warning: {uid}: DICOM SEG / SR not written ({type(e).__name__}: "
                         f"{runfiles.one_line(e, 160)}); the mask is written as {uid}.nii.gz")
        if labels is None:
            return {}, None
        _write_mask(os.path.join(self.folder, f"{uid}.nii.gz"), labels, found["geometry"])
        return {"mask (NIfTI)": f"{uid}.nii.gz"}, None
