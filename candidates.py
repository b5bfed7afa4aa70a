"""Candidates: every way the pipeline makes, merges, cuts, reads and writes candidate nodules.

- ``find_candidates``: 3D components of a stage-5 probability map above a low threshold, each scored by its
  maximum, at most ``max_candidates`` a scan (LUNA16's cut, metrics.top_candidates); ``find_components``: the
  components of a binary mask (the operating point's detections).
- ``detect_blobs`` / ``with_blobs``: bright blobs found in the image itself (a scale-normalised Laplacian of
  Gaussian inside the lung mask, ranked by the Hessian), added to a scan's list; ``merge_far`` keeps one
  candidate per place (nothing within ``merge_mm`` of a stronger one).
- ``CandidateTable`` reads any LUNA16-format candidate file; ``CandidateWriter`` writes ``candidates.csv`` (the
  submission format) and ``candidates_detail.csv`` side by side, streamed, renamed into place when complete.
- ``pool_files``, ``write_truth``, ``write_scan_list``: the files LUNA16's evaluation (metrics.py) scores for a set
  of scans pooled from several runs: candidates one file after another, annotations from the stage-1 files.

Stage 5 (postprocess.py) and stage 6 (fp_reduction.py) both use this module; settings arrive as arguments
(``BlobSettings`` for the blob detector), never as module constants.
"""
import array
import csv
import dataclasses
import os
import time

import numpy as np
from scipy import ndimage

import ct_io
import runfiles
from metrics import top_candidates

COMPONENT_DTYPE = np.dtype([("label", np.int32), ("n_voxels", np.int64), ("center_z", np.float64),
                            ("center_y", np.float64), ("center_x", np.float64), ("prob", np.float32)])
LUNA_FIELDS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]   # LUNA16's submission columns


# ----------------------------------------------------------------------------- components of a probability map

def find_components(mask, prob, min_voxels=1, connectivity=3):
    """3D connected components of ``mask`` -> (labels int32 (Z, Y, X), components of COMPONENT_DTYPE).

    Components smaller than ``min_voxels`` are dropped (label 0) and the rest numbered 1..n. A component's
    center is its (unweighted) center of mass in voxels (z, y, x); its prob the maximum of ``prob`` inside.
    Each component is measured inside its bounding box (fast, and no per-voxel coordinate arrays)."""
    structure = ndimage.generate_binary_structure(3, connectivity)
    labels, n = ndimage.label(np.asarray(mask) > 0, structure=structure)
    labels = labels.astype(np.int32, copy=False)
    comps = np.zeros(n, COMPONENT_DTYPE)
    for i, box in enumerate(ndimage.find_objects(labels)):
        inside = labels[box] == i + 1
        comps[i] = (i + 1, int(np.count_nonzero(inside)), *_center(inside, box),
                    float(np.asarray(prob[box])[inside].max()))
    keep = comps["n_voxels"] >= min_voxels
    if not keep.all():
        remap = np.zeros(n + 1, np.int32)
        remap[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        labels = remap[labels]
        comps = comps[keep]
        comps["label"] = np.arange(1, len(comps) + 1)
    return labels, comps


def _center(inside, box):
    """Center of mass (z, y, x) in scan voxels of the True voxels of ``inside``, a crop at ``box``."""
    count = float(np.count_nonzero(inside))
    center = []
    for axis in range(3):
        profile = inside.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        center.append(box[axis].start + float(profile @ np.arange(len(profile))) / count)
    return center


def find_candidates(prob, threshold=0.02, max_candidates=100, min_voxels=1, connectivity=3, peak=0.5,
                    split_mm=0.0, spacing_zyx=(1.0, 1.0, 1.0), split_dip=0.3):
    """The candidates of one scan -> array of COMPONENT_DTYPE, highest probability first.

    Candidates are the 3D components of prob > ``threshold`` of at least ``min_voxels`` voxels, each scored by
    the maximum probability inside it; at most ``max_candidates`` are kept, the highest scored, by LUNA16's rule
    (metrics.top_candidates). A candidate's center is the center of mass of its voxels with probability >=
    ``peak`` times its maximum, so a faint halo or a touching vessel does not pull it off its nodule;
    n_voxels counts the whole component; label is its number among the components at that threshold.

    ``split_mm`` > 0: each local maximum of a component (a voxel no lower than any
    within +-split_mm / 2 along each axis, ``spacing_zyx`` in mm; a plateau counts once; kept if the probability
    dips by ``split_dip`` of its value towards the nearest higher maximum of its component) is a candidate,
    scored by its probability: a faint nodule touching a vessel's component becomes a candidate of its own, the
    ripples on a large nodule's flat top do not. The component is divided between its kept maxima by a
    watershed of the probability; a candidate is centred on its part's voxels >= ``peak`` x its maximum, and
    n_voxels counts its part."""
    prob = np.asarray(prob)
    structure = ndimage.generate_binary_structure(3, connectivity)
    labels, n = ndimage.label(prob > threshold, structure=structure)
    if n == 0:
        return np.zeros(0, COMPONENT_DTYPE)
    fg = labels > 0
    lab = labels[fg]
    sizes = np.bincount(lab, minlength=n + 1)[1:]
    if split_mm > 0:
        return _split_candidates(prob, labels, sizes, max_candidates, min_voxels, split_mm, spacing_zyx, peak,
                                 split_dip)
    scores = np.full(n + 1, -np.inf)
    np.maximum.at(scores, lab, prob[fg])             # each component's maximum (ndimage.maximum: 100x slower)
    scores = scores[1:]
    big = np.nonzero(sizes >= min_voxels)[0]
    chosen = big[top_candidates(scores[big], max_candidates)]
    chosen = chosen[np.argsort(-scores[chosen], kind="stable")]
    boxes = ndimage.find_objects(labels)
    cands = np.zeros(len(chosen), COMPONENT_DTYPE)
    for i, j in enumerate(chosen):
        box = boxes[j]
        p = np.asarray(prob[box], np.float64)
        inside = labels[box] == j + 1
        core = inside & (p >= peak * scores[j])
        cands[i] = (j + 1, int(sizes[j]), *_center(core if core.any() else inside, box), scores[j])
    return cands


def _split_candidates(prob, labels, sizes, max_candidates, min_voxels, split_mm, spacing_zyx, peak, split_dip):
    """find_candidates with split_mm > 0: the local maxima of the components (see there)."""
    box = ndimage.find_objects((labels > 0).astype(np.int8))[0]         # the components' bounding box
    p = np.where(labels[box] > 0, np.asarray(prob[box], np.float32), np.float32(-1))
    size = [max(1, int(round(split_mm / float(s)))) | 1 for s in spacing_zyx]     # odd window, voxels
    top = ndimage.maximum_filter(p, size=size, mode="constant", cval=-1)
    lab = labels[box]
    keep = (p >= top) & (lab > 0)
    keep &= sizes[np.maximum(lab, 1) - 1] >= min_voxels
    peaks, n_peaks = ndimage.label(keep, structure=np.ones((3, 3, 3), bool))   # a plateau is one maximum
    if n_peaks == 0:
        return np.zeros(0, COMPONENT_DTYPE)
    idx = np.arange(1, n_peaks + 1)
    scores = np.asarray(ndimage.maximum(p, peaks, idx), np.float64)
    centres = np.asarray(ndimage.center_of_mass(keep, peaks, idx), np.float64).reshape(-1, 3)
    comps = np.asarray(ndimage.maximum(lab, peaks, idx), np.int64)
    # a maximum is kept when the probability dips by at least split_dip of its value on the straight line to the
    # nearest higher maximum of its component (the line's voxels inside the component) (the component's highest is always kept): the ripples on the
    # flat top of a large nodule at ~0.99 are one candidate, a faint nodule beside a vessel is its own
    mm = centres * np.asarray(spacing_zyx, np.float64)
    alive = np.ones(n_peaks, bool)
    t = np.linspace(0.0, 1.0, 24)[:, None]
    for j in range(n_peaks):
        higher = np.nonzero((comps == comps[j]) & (scores > scores[j]))[0]
        if len(higher) == 0:
            continue
        k = higher[np.argmin(((mm[higher] - mm[j]) ** 2).sum(axis=1))]
        line = centres[j] + t * (centres[k] - centres[j])
        vals = ndimage.map_coordinates(p, line.T, order=0, mode="nearest")     # voxel values; a line leaving the
        low = float(vals[vals >= 0].min())                                      # component (-1) is not a dip
        alive[j] = scores[j] - low >= split_dip * scores[j]
    survivors = np.nonzero(alive)[0]
    # each component voxel goes to the basin of one kept maximum (watershed of -prob); a candidate is centred on
    # its basin's voxels >= peak x its maximum, as an unsplit component is on its own
    from skimage.segmentation import watershed
    lut = np.zeros(n_peaks + 1, np.int32)
    lut[survivors + 1] = np.arange(1, len(survivors) + 1)
    markers = lut[peaks]                                  # kept maxima numbered 1..K, one pass over the box
    basins = watershed(-p, markers, mask=lab > 0)
    core = basins * (p >= peak * scores[survivors][np.maximum(basins, 1) - 1])
    n_kept = len(survivors)
    centres = np.asarray(ndimage.center_of_mass(core > 0, core, np.arange(1, n_kept + 1)), np.float64).reshape(-1, 3)
    n_basin = np.bincount(basins.ravel(), minlength=n_kept + 1)[1:]
    order = np.nonzero(top_candidates(scores[survivors], max_candidates))[0]
    order = order[np.argsort(-scores[survivors][order], kind="stable")]
    cands = np.zeros(len(order), COMPONENT_DTYPE)
    for i, k in enumerate(order):
        c = centres[k]
        cands[i] = (comps[survivors[k]], int(n_basin[k]), c[0] + box[0].start, c[1] + box[1].start,
                    c[2] + box[2].start, scores[survivors[k]])
    return cands

# ----------------------------------------------------------------------------- blobs found in the image

@dataclasses.dataclass(frozen=True)
class BlobSettings:
    """The blob detector's settings (stage 6's BLOB_* constants)."""
    n: int = 0                                  # blobs added per scan (0 = off)
    mm: float = 1.25                            # isotropic voxel (mm) the HU volume is resampled to
    diameters_mm: tuple = (3.0, 12.0)           # smallest and largest blob diameter looked for
    scales: int = 4                             # Laplacian-of-Gaussian scales, log-spaced over diameters_mm
    hu: tuple = (-1000.0, 100.0)                # HU clipped to this range before filtering
    min_hu: float = -750.0                      # a blob's centre must be denser than this
    lung_dilate_mm: float = 2.5                 # the lung mask dilated this much (nodules on the pleura count)
    merge_mm: float = 5.0                       # a blob within this of a candidate or of a stronger blob is dropped
    score: float = 0.0                          # the stage-5 probability given to a blob candidate
    rank: str = "hessian"                       # "hessian" (weakest curvature: ~0 on vessels) or "log"

    @classmethod
    def from_config(cls, cfg):
        """From a stage's settings (a dict with BLOB_CANDIDATES, BLOB_MM, ...)."""
        return cls(n=int(cfg["BLOB_CANDIDATES"]), mm=cfg["BLOB_MM"], diameters_mm=tuple(cfg["BLOB_DIAMETERS_MM"]),
                   scales=cfg["BLOB_SCALES"], hu=tuple(cfg["BLOB_HU"]), min_hu=cfg["BLOB_MIN_HU"],
                   lung_dilate_mm=cfg["BLOB_LUNG_DILATE_MM"], merge_mm=cfg["BLOB_MERGE_MM"],
                   score=cfg["BLOB_SCORE"], rank=cfg["BLOB_RANK"])

def detect_blobs(hu, lung, origin, spacing, direction, n, existing_xyz=None, blob=None):
    """Up to ``n`` bright blobs of ``blob.diameters_mm`` (a BlobSettings; default BlobSettings()) inside the (dilated) lung mask -> (world xyz (k, 3),
    response (k,)), strongest first.

    The lung's bounding box of ``hu`` (Z, Y, X), clipped to blob.hu, resampled (trilinear) to blob.mm isotropic;
    the scale-normalised Laplacian of Gaussian (-sigma^2 LoG, sigma = diameter / (2 sqrt 3): a ball's best scale;
    a Gaussian filter, then the 7-point discrete Laplacian) at blob.scales diameters, its maximum over the scales;
    blobs are its 3x3x3 local maxima inside the lung mask dilated by blob.lung_dilate_mm, denser than blob.min_hu,
    strongest first, none within blob.merge_mm of a stronger one or of ``existing_xyz`` (world, e.g. stage 5's
    candidates). blob.rank="hessian" ranks them by sigma^2 times the weakest curvature of the Hessian at their scale
    (all three negative on a ball; one ~0 on a vessel, which is dropped) instead of the LoG. World positions via
    ct_io.voxel_to_world (the resampled grid's voxel -> the scan's voxel)."""
    blob = BlobSettings() if blob is None else blob
    none = np.zeros((0, 3)), np.zeros(0)
    if n <= 0:
        return none
    sp = np.asarray(spacing, np.float64)[::-1]                       # mm per voxel along (z, y, x)
    rng = [np.nonzero(np.asarray(lung).any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)]
    if any(not len(r) for r in rng):
        return none
    pad = np.ceil((blob.diameters_mm[1] + blob.lung_dilate_mm) / sp).astype(int)
    lo = np.maximum([r[0] for r in rng] - pad, 0)
    hi = np.minimum([r[-1] + 1 for r in rng] + pad, hu.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    step = blob.mm / sp                                              # input voxels per output voxel
    shape = tuple(int(k) for k in np.floor((hi - lo - 1) / step) + 1)
    vol = ndimage.affine_transform(np.asarray(hu[box]), step, output_shape=shape, output=np.float32, order=1,
                                   mode="nearest")
    np.clip(vol, *blob.hu, out=vol)                                  # clipped after resampling: no float copy of hu
    mask = ndimage.affine_transform(np.asarray(lung[box], np.uint8), step, output_shape=shape, order=0, mode="nearest")
    r = int(round(blob.lung_dilate_mm / blob.mm))
    if r > 0:
        mask = ndimage.maximum_filter(mask, size=2 * r + 1)
    best, scale, smooth = None, None, []
    sigmas = np.geomspace(blob.diameters_mm[0], blob.diameters_mm[1], max(int(blob.scales), 1)) / (2 * np.sqrt(3.0))
    for k, sigma in enumerate(sigmas / blob.mm):                      # in output voxels
        g = ndimage.gaussian_filter(vol, sigma, truncate=3.0)
        resp = ndimage.laplace(g) * np.float32(-sigma * sigma)
        smooth.append(g if blob.rank == "hessian" else None)
        if best is None:
            best, scale = resp, np.zeros(resp.shape, np.uint8)
        else:
            scale[resp > best] = k
            np.maximum(best, resp, out=best)
    peak = (best == ndimage.maximum_filter(best, size=3)) & (mask > 0) & (vol > blob.min_hu) & (best > 0)
    zyx = np.argwhere(peak)
    resp = best[peak]
    if blob.rank == "hessian" and len(zyx):                          # tubes (vessels) have one curvature ~0
        resp = np.zeros(len(zyx))
        for k, sigma in enumerate(sigmas / blob.mm):
            sel = scale[peak] == k
            if sel.any():
                resp[sel] = sigma * sigma * np.maximum(-hessian_eigenvalues(smooth[k], zyx[sel])[:, 2], 0)
        keep = resp > 0
        zyx, resp = zyx[keep], resp[keep]
    order = np.argsort(-resp, kind="stable")[:max(50 * n, 1000)]     # the strongest peaks: enough for n blobs
    zyx, resp = zyx[order], resp[order]
    world = ct_io.voxel_to_world(lo + zyx * step, origin, spacing, direction).reshape(-1, 3)
    keep = merge_far(world, existing_xyz, n, blob.merge_mm)
    return world[keep], resp[keep].astype(np.float64)


def hessian_eigenvalues(g, zyx):
    """Eigenvalues (ascending) of the Hessian of volume ``g`` (central differences, voxel units) at the voxels
    ``zyx`` (N, 3) -> (N, 3); indices clipped at the border."""
    zyx = np.asarray(zyx, np.int64)
    hi = np.asarray(g.shape) - 1

    def at(dz, dy, dx):
        i = np.clip(zyx + np.array([dz, dy, dx]), 0, hi)
        return g[i[:, 0], i[:, 1], i[:, 2]].astype(np.float64)
    c = at(0, 0, 0)
    h = np.empty((len(zyx), 3, 3))
    unit = np.eye(3, dtype=int)
    for a in range(3):
        h[:, a, a] = at(*unit[a]) + at(*-unit[a]) - 2 * c
        for b in range(a + 1, 3):
            h[:, a, b] = h[:, b, a] = (at(*(unit[a] + unit[b])) + at(*(-unit[a] - unit[b]))
                                       - at(*(unit[a] - unit[b])) - at(*(unit[b] - unit[a]))) / 4.0
    return np.linalg.eigvalsh(h)


def merge_far(xyz, existing_xyz, n, merge_mm):
    """Indices of up to ``n`` points of ``xyz`` (in order: strongest first) that lie farther than ``merge_mm``
    from every point of ``existing_xyz`` and from every point kept before them: one candidate per nodule."""
    r2 = merge_mm ** 2
    taken = [np.asarray(existing_xyz, np.float64).reshape(-1, 3)] if existing_xyz is not None else []
    taken = np.concatenate(taken) if taken else np.zeros((0, 3))
    keep = []
    for i, p in enumerate(np.asarray(xyz, np.float64).reshape(-1, 3)):
        if len(keep) >= n:
            break
        if len(taken) and (((taken - p) ** 2).sum(axis=1) <= r2).any():
            continue
        keep.append(i)
        taken = np.vstack([taken, p])
    return np.asarray(keep, np.int64)


def with_blobs(scan, xyz, p5, blob):
    """A scan's candidates (xyz, p5) with ``blob.n`` blobs added (stage-5 score blob.score) -> (xyz, p5,
    is_blob (bool per candidate), detection seconds). Needs scan['hu'] and scan['lung_mask']."""
    xyz, p5 = np.asarray(xyz, np.float64).reshape(-1, 3), np.asarray(p5, np.float64)
    if blob.n <= 0:
        return xyz, p5, np.zeros(len(xyz), bool), 0.0
    t0 = time.perf_counter()
    a = scan["attrs"]
    blobs, _ = detect_blobs(scan["hu"], scan["lung_mask"], a["origin"], a["spacing"], a["direction"],
                            blob.n, xyz, blob)
    sec = time.perf_counter() - t0
    return (np.concatenate([xyz, blobs]), np.concatenate([p5, np.full(len(blobs), blob.score)]),
            np.arange(len(xyz) + len(blobs)) >= len(xyz), sec)


# ----------------------------------------------------------------------------- candidate files

class CandidateTable:
    """A LUNA16-format candidate CSV, compactly: per row a series number, world x, y, z (float64), a probability
    (NaN when the file has none, as candidates_V2.csv) and a class (-1 when none). ``of(uid)`` -> the rows of one
    series (xyz (n, 3), prob (n,), cls (n,)), in file order."""

    def __init__(self, paths):
        self.paths = [p for p in paths if p]
        self.uids, index = [], {}
        uid_a, xyz_a, prob_a, cls_a = array.array("i"), array.array("d"), array.array("f"), array.array("b")
        self.has_prob = True
        for path in self.paths:
            if not os.path.isfile(path):
                raise SystemExit(f"{path}: candidate file not found")
            with open(path, newline="") as f:
                rows = csv.reader(f)
                head = [h.strip() for h in next(rows, [])]
                need = ("seriesuid", "coordX", "coordY", "coordZ")
                if any(h not in head for h in need):
                    raise SystemExit(f"{path}: not a LUNA16 candidate file (columns {head}; need {', '.join(need)})")
                col = {h: head.index(h) for h in head}
                ip = col.get("probability")
                ic = col.get("class")
                self.has_prob &= ip is not None
                for n, r in enumerate(rows, start=2):
                    if not r:
                        continue
                    try:
                        uid = r[col["seriesuid"]].strip()
                        k = index.get(uid)
                        if k is None:
                            k = index[uid] = len(self.uids)
                            self.uids.append(uid)
                        xyz = (float(r[col["coordX"]]), float(r[col["coordY"]]), float(r[col["coordZ"]]))
                        p = float(r[ip]) if ip is not None else float("nan")
                        c = int(float(r[ic])) if ic is not None else -1
                    except (ValueError, IndexError):
                        raise SystemExit(f"{path}: line {n}: unreadable row {r[:6]}") from None
                    if ip is not None and not np.isfinite(p):        # NaN would change how scores combine
                        raise SystemExit(f"{path}: line {n}: probability {r[ip]!r} is not a finite number")
                    uid_a.append(k)
                    xyz_a.extend(xyz)
                    prob_a.append(p)
                    cls_a.append(c)
        uid = np.frombuffer(uid_a, np.int32) if len(uid_a) else np.zeros(0, np.int32)
        self.xyz = np.frombuffer(xyz_a, np.float64).reshape(-1, 3) if len(xyz_a) else np.zeros((0, 3))
        self.prob = np.frombuffer(prob_a, np.float32) if len(prob_a) else np.zeros(0, np.float32)
        self.cls = np.frombuffer(cls_a, np.int8) if len(cls_a) else np.zeros(0, np.int8)
        self.order = np.argsort(uid, kind="stable")
        self.starts = np.searchsorted(uid[self.order], np.arange(len(self.uids) + 1))
        self.index = index

    def __len__(self):
        return len(self.prob)

    def of(self, uid):
        k = self.index.get(uid)
        if k is None:
            return np.zeros((0, 3)), np.zeros(0, np.float32), np.zeros(0, np.int8)
        rows = self.order[self.starts[k]:self.starts[k + 1]]
        return self.xyz[rows], self.prob[rows], self.cls[rows]


class CandidateWriter:
    """``candidates.csv`` (LUNA16 format) and ``candidates_detail.csv`` (the same rows and ``detail_fields``)
    in ``folder``, rows streamed to temporary files that are renamed into place by ``close()`` (use as a context
    manager: nothing is renamed when the block raises)."""

    def __init__(self, folder, detail_fields):
        self.paths = [os.path.join(folder, n) for n in ("candidates.csv", "candidates_detail.csv")]
        self.fields = [LUNA_FIELDS, LUNA_FIELDS + [f for f in detail_fields if f not in LUNA_FIELDS]]
        self.n = 0

    def __enter__(self):
        self._files = [open(runfiles.tmp_name(p), "w", newline="") for p in self.paths]
        self._writers = [csv.DictWriter(f, fields, extrasaction="ignore", restval="")
                         for f, fields in zip(self._files, self.fields)]
        for w in self._writers:
            w.writeheader()
        return self

    def write(self, uid, xyz, prob, **detail):
        """One candidate: world ``xyz`` (x, y, z mm), its final ``prob``, and its detail columns."""
        row = luna_row(uid, xyz, prob)
        self._writers[0].writerow(row)
        self._writers[1].writerow({**row, **detail})
        self.n += 1

    def __exit__(self, kind, value, tb):
        for f in self._files:
            f.close()
        for p in self.paths:
            if kind is None:
                runfiles.commit(runfiles.tmp_name(p), p)
            elif os.path.exists(runfiles.tmp_name(p)):
                os.remove(runfiles.tmp_name(p))
        return False


def luna_row(uid, xyz, prob):
    """One row of a LUNA16 candidate file (world mm to 3 decimals, probability to 6)."""
    return {"seriesuid": uid, "coordX": f"{xyz[0]:.3f}", "coordY": f"{xyz[1]:.3f}", "coordZ": f"{xyz[2]:.3f}",
            "probability": f"{float(prob):.6f}"}


# ----------------------------------------------------------------------------- LUNA16-format files of a set of scans

def _lines(path):
    """A candidates file -> (header line, data lines)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return (lines[0] if lines else ""), [ln for ln in lines[1:] if ln.strip()]


def pool_files(path, files, keep=None):
    """The data lines of ``files`` one after another under the first one's header, atomically; ``keep``: per file
    the seriesuids whose lines are kept (None = all) -> the number of lines."""
    header, lines = None, []
    for i, p in enumerate(files):
        head, rows = _lines(p)
        if header is not None and head != header:
            raise SystemExit(f"{p}: its header {head!r} differs from {files[0]}'s {header!r}")
        header = head
        lines += rows if keep is None else [r for r in rows if r.split(",", 1)[0].strip() in keep[i]]
    with runfiles.atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join([header or ",".join(LUNA_FIELDS)] + lines) + "\n")
    return len(lines)


def write_truth(folder, stage1_dirs, uids):
    """``folder``/annotations.csv and annotations_excluded.csv of the scans ``uids`` from their stage-1 files (each
    found in the first of ``stage1_dirs``, a folder or a list of them, that holds it; world mm, written exactly)
    -> (annotations path, excluded path)."""
    dirs = [stage1_dirs] if isinstance(stage1_dirs, str) else list(stage1_dirs)
    fields = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
    rows = {0: [], 1: []}
    for uid in uids:
        path = next((f for f in (runfiles.file_in(d, uid, ".h5") for d in dirs) if os.path.isfile(f)), None)
        if path is None:
            raise SystemExit(f"{uid}: no stage-1 file in {', '.join(dirs)}")
        for n in ct_io.read_scan_h5(path, ())["nodules"]:
            rows[int(n["excluded"] != 0)].append(dict(zip(fields, (uid, repr(float(n["world_x"])),
                                                                   repr(float(n["world_y"])), repr(float(n["world_z"])),
                                                                   repr(float(n["diameter_mm"]))))))
    paths = os.path.join(folder, "annotations.csv"), os.path.join(folder, "annotations_excluded.csv")
    for path, key in zip(paths, (0, 1)):
        runfiles.write_csv(path, rows[key], fields)
    return paths


def write_scan_list(path, uids):
    """A scan list (metrics.py's SCANS: a header, one seriesuid a line) -> its path."""
    return runfiles.write_csv(path, [{"seriesuid": u} for u in uids], ("seriesuid",))
