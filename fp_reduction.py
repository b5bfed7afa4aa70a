"""Stage 6: false-positive reduction, the thesis code's second network: a small 3D CNN on isotropic patches
around each candidate rescores stage 5's candidates.

Reads
    WORK_DIR/1_preprocessed/<seriesuid>.h5   stage-1 scans: /hu (the patches), /lung_mask (random negatives),
                                             /nodules (the truth), origin / spacing / direction
    WORK_DIR/3_split/split.json              the train / val / test parts (by patient)
    CANDIDATES_DIR/candidates.csv            the candidates to rescore (default WORK_DIR/6_report: stage 5's, LUNA16
                                             format seriesuid, coordX, coordY, coordZ, probability; world mm) and
                                             its config.json (which part stage 5 evaluated); or --CANDIDATES=<csv>
                                             (any LUNA16-format file; candidates_V2.csv's `class` column is allowed,
                                             its rows have no probability)
    TRAIN_CANDIDATES                         candidates on the training and validation scans (hard negatives and
                                             positives): e.g. a stage-5 run over every scan,
                                             postprocess.py --SCANS=all --REPORT_DIR=WORK_DIR/6_report_all
Writes (OUT_DIR, default WORK_DIR/7_fp_reduction)
    model.keras        the trained network (the checkpoint with the best validation CPM); last.keras, state.json,
                       history.csv (what --RESUME=1 continues from; each written to a temporary file, then renamed)
    config.json        the constants used, with the patch geometry the model was trained with
    candidates.csv     the same candidates, LUNA16 format, rescored (probability = see COMBINE)
    candidates_detail.csv  each candidate's stage-5 and stage-6 probabilities and its status (TP / FP / ignored)
    metrics.json       before (stage 5's scores) and after (rescored): CPM and FROC sensitivities at 1/8 ... 8
                       FP/scan overall and by nodule size, candidate recall, the operating point (THRESHOLD):
                       sensitivity by size and FP/scan; training and scoring times
    froc.png           the FROC curves before (dashed) and after (solid), overall and by size
    patches/           the training and validation patches (uint8, memory-mapped; reused by a rerun or --RESUME=1)
Run
    python fp_reduction.py --WORK_DIR=work                      # train on the training part, score the test part
    python fp_reduction.py --WORK_DIR=work --TRAIN_CANDIDATES=work/6_report_all/candidates.csv
    python fp_reduction.py --WORK_DIR=<run> --SCANS=all --MODEL=<trained model.keras>   # score only, no training
    python fp_reduction.py --WORK_DIR=luna --CANDIDATES=/data/LUNA16/candidates_V2.csv  # LUNA16's FP-reduction track
    python fp_reduction.py --WORK_DIR=work --DASK_SCHEDULER=tcp://host:8786   # scoring on a dask cluster

Patches: a cube of PATCH_MM on a side, VOXEL_MM voxels, axes along world x, y, z, centred on the candidate's
world position, sampled (trilinear) from the scan through ct_io.world_to_voxel (origin, spacing and direction:
flipped scans give the same anatomy orientation); beyond the volume the edge voxels are repeated (a candidate
at the edge is padded, not an error); HU clipped to HU_WINDOW and scaled to [-1, 1].

Training samples (only the training part's scans; the validation part chooses the checkpoint):
- positives: candidates hitting an included nodule (LUNA16's rule, metrics.py) and every included nodule's
  centre, jittered at each draw by up to JITTER x its radius; drawn as POS_FRACTION of each batch (oversampled);
- negatives: the false-positive candidates of the scan (hard negatives, the HARD_NEG_PER_SCAN highest scored),
  RANDOM_NEG_PER_SCAN random lung points and DENSE_NEG_PER_SCAN random lung points denser than DENSE_HU
  (vessels, fissures, pleura: what a 2D detector mistakes for nodules), all away from every annotation;
  candidates hitting only excluded annotations are not used;
- augmentation: one of the 48 symmetries of the cube (flips, 90-degree rotations), shifts up to SHIFT_MM, scales
  in [1 - SCALE, 1 + SCALE]; batches drawn with a generator seeded by (SEED, epoch), so a resumed run continues
  the same sequence.
Each epoch ends with the validation part's patches rescored; the checkpoint with the best validation CPM over its
candidates (without candidates on the validation scans: the best ROC AUC of its patches, nodule centres against
random and dense lung points; then the lower loss) is model.keras. COMBINE="auto" chooses the final score on the validation part too.

Blob candidates (BLOB_CANDIDATES > 0 per scan): stage 5's list recalls only the nodules its network's components
reach; bright blobs of 3-12 mm found in the image itself (detect_blobs: a scale-normalised Laplacian of Gaussian on
the HU resampled to BLOB_MM isotropic, inside the dilated stage-1 lung mask) are added to every scan's list, those
within BLOB_MERGE_MM of a stage-5 candidate dropped, each with the stage-5 score BLOB_SCORE, and rescored like the
others; on the training and validation scans they are candidates too (hard negatives, positives when on a nodule).

Scoring streams scan by scan: one HU volume in memory at a time, patches predicted in batches, candidates.csv
written row by row; memory does not grow with the number of candidates (the candidate table itself takes ~21
bytes a candidate). A scan that fails is reported in one line and skipped (it still counts in FP/scan); the exit
status is then non-zero. Every metric comes from metrics.py.
"""
import array
import csv
import json
import os
import shutil
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import ct_io  # noqa: E402
import metrics  # noqa: E402
from configurator import configure, constants, save_config  # noqa: E402

# ----------------------------------------------------------------------------- settings
WORK_DIR = "work"               # root of a run; every stage's folder is below it
SCANS = "test"                  # scans rescored and evaluated: a part of 3_split/split.json, or "all"
CANDIDATES = ""                 # LUNA16-format CSV to rescore; "" = CANDIDATES_DIR/candidates.csv (stage 5's)
CANDIDATES_DIR = ""             # the stage-5 report folder rescored; "" = WORK_DIR/6_report
TRAIN_CANDIDATES = ""           # comma-separated CSVs with candidates on the train / val scans; "" = the CANDIDATES file
MODEL = ""                      # a trained stage-6 model: score only, no training (its patch geometry, THRESHOLD and
                                # BLOB_* settings from its config.json); "" = train one (OUT_DIR/model.keras)
OUT_DIR = ""                    # "" = WORK_DIR/7_fp_reduction
PATCH_MM = 32.0                 # side of the patch cube in mm
VOXEL_MM = 1.0                  # isotropic voxel size of the patch in mm (side = round(PATCH_MM / VOXEL_MM) voxels)
HU_WINDOW = (-1000.0, 400.0)    # HU clipped to this range and scaled to [-1, 1]
WIDTH = 16                      # filters of the first convolution block (doubled in each further block)
BLOCKS = 3                      # convolution blocks (conv 3x3x3 + batch norm + ReLU + max-pool 2)
DENSE = 64                      # units of the hidden dense layer
DROPOUT = 0.3                   # dropout before each dense layer
BATCH_SIZE = 32                 # patches per training step
EPOCHS = 10                     # epochs of STEPS_PER_EPOCH steps (a fixed number of steps: same result on any machine)
STEPS_PER_EPOCH = 50            # training steps per epoch
LR = 1e-3                       # Adam learning rate
MAX_MINUTES = 0.0               # stop after the epoch that passes this much training time (0 = no limit; a safety stop)
POS_FRACTION = 0.5              # share of positives in every training batch (positives are oversampled)
JITTER = 0.5                    # nodule-centre positives: moved up to this fraction of the radius at each draw (<= MAX_SHIFT_MM)
SHIFT_MM = 2.0                  # every training patch moved up to this (mm, each axis)
MAX_SHIFT_MM = 4.0              # largest move in mm (jitter + shift): the margin stored around training patches
SCALE = 0.1                     # training patches scaled by a factor in [1 - SCALE, 1 + SCALE]
AUGMENT = True                  # flips, 90-degree rotations, shifts and scales of the training patches
HARD_NEG_PER_SCAN = 100         # false-positive candidates kept per training scan as hard negatives (highest scored)
RANDOM_NEG_PER_SCAN = 20        # random lung-mask points per training scan (negatives)
DENSE_NEG_PER_SCAN = 60         # random lung-mask points denser than DENSE_HU per training scan (vessel-like negatives)
DENSE_HU = -500.0               # HU above which a lung-mask voxel counts as dense
NEG_MARGIN_MM = 5.0             # random negatives lie farther than an annotation's radius + this from its centre
COMBINE = "auto"                # final score: "fp" (stage 6), "product" (stage 5 x stage 6), "mean", "auto" (best on val)
THRESHOLD = 0.5                 # operating point: candidates whose final score is above this are detections
MAX_CANDIDATES = 100            # candidates evaluated per scan, the highest scored (LUNA16's rule, metrics.top_candidates)
SIZE_BINS = (5.0, 10.0, 20.0)   # diameter bin edges in mm for the breakdowns
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per scan where the CPM reads the sensitivity
PREDICT_BATCH = 64              # patches per prediction call
TTA = 8                         # test-time augmentation: mean over this many flips of the patch (1 = none, at most 8)
SEED = 85                       # weights, sampling and augmentation
RESUME = False                  # continue training from OUT_DIR/last.keras and state.json
DASK_SCHEDULER = ""             # "" = scans scored here; "tcp://host:8786" = each scan a task on that dask cluster
BLOB_CANDIDATES = 0             # candidates per scan added from the image (3D blob detector in the lung mask); 0 = off
BLOB_MM = 1.25                  # isotropic voxel (mm) of the grid the blob detector resamples the HU volume to
BLOB_DIAMETERS_MM = (3.0, 12.0) # smallest and largest blob diameter looked for (mm)
BLOB_SCALES = 4                 # Laplacian-of-Gaussian scales, log-spaced over BLOB_DIAMETERS_MM
BLOB_HU = (-1000.0, 100.0)      # HU clipped to this range before filtering (bone and contrast do not outshine nodules)
BLOB_MIN_HU = -750.0            # a blob's centre (resampled HU) must be denser than this
BLOB_LUNG_DILATE_MM = 2.5       # the stage-1 lung mask dilated this much (nodules on the pleura count)
BLOB_MERGE_MM = 5.0             # a blob within this of a stage-5 candidate or of a stronger blob is dropped
BLOB_SCORE = 0.0                # the stage-5 probability given to a blob candidate
BLOB_RANK = "hessian"           # blobs ranked by "hessian" (the Hessian's weakest curvature: ~0 on vessels) or "log"

COMBINE_CHOICES = ("fp", "product", "mean")
KIND_CANDIDATE, KIND_NODULE, KIND_RANDOM, KIND_DENSE = 0, 1, 2, 3
GEOMETRY_KEYS = ("PATCH_MM", "VOXEL_MM", "HU_WINDOW")     # read from a scoring model's config.json
SCORING_KEYS = ("THRESHOLD", "BLOB_CANDIDATES", "BLOB_MM", "BLOB_DIAMETERS_MM", "BLOB_SCALES", "BLOB_HU",
                "BLOB_MIN_HU", "BLOB_LUNG_DILATE_MM", "BLOB_MERGE_MM", "BLOB_SCORE", "BLOB_RANK")
                                # the choices a model was trained and chosen with: a scoring run repeats them from
                                # its config.json unless they are given on the command line


# ----------------------------------------------------------------------------- patches

def patch_side(patch_mm=None, voxel_mm=None):
    """Voxels on a side of a patch."""
    return max(int(round((PATCH_MM if patch_mm is None else patch_mm) / (VOXEL_MM if voxel_mm is None else voxel_mm))), 2)


def patch_offsets(side, voxel_mm, origin, spacing, direction):
    """The fractional voxel (z, y, x) offsets of a patch's points from its centre -> (side^3, 3).

    The patch's axes are world z, y, x (index k along world axis increasing), spaced ``voxel_mm``; the world ->
    voxel map is affine, so the offsets of ct_io.world_to_voxel are the same for every centre of a scan."""
    d = (np.arange(side, dtype=np.float64) - (side - 1) / 2.0) * voxel_mm
    gz, gy, gx = np.meshgrid(d, d, d, indexing="ij")
    world = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1) + np.asarray(origin, np.float64)
    return ct_io.world_to_voxel(world, origin, spacing, direction)


def extract_patches(hu, origin, spacing, direction, centers_xyz, side, voxel_mm, offsets=None):
    """Patches of HU around world centres -> float32 (N, side, side, side), axes world (z, y, x).

    Trilinear samples of ``hu`` (Z, Y, X) at ``voxel_mm`` spacing; points beyond the volume take the nearest edge
    voxel (a candidate at or beyond the edge gives a padded patch, never an error)."""
    from scipy import ndimage
    centers = np.asarray(centers_xyz, np.float64).reshape(-1, 3)
    if offsets is None:
        offsets = patch_offsets(side, voxel_mm, origin, spacing, direction)
    out = np.empty((len(centers), side, side, side), np.float32)
    if not len(centers):
        return out
    shape = np.asarray(hu.shape)
    vox = ct_io.world_to_voxel(centers, origin, spacing, direction).reshape(-1, 3)
    for i, c in enumerate(vox):
        pts = offsets + c
        lo = np.clip(np.floor(pts.min(axis=0)).astype(int) - 1, 0, shape - 1)
        hi = np.clip(np.ceil(pts.max(axis=0)).astype(int) + 2, lo + 1, shape)
        sub = np.asarray(hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], np.float32)
        out[i] = ndimage.map_coordinates(sub, (pts - lo).T, order=1, mode="nearest").reshape(side, side, side)
    return out


def to_uint8(patches, window):
    """HU patches -> uint8 (window clipped, 256 levels): how training patches are stored."""
    lo, hi = float(window[0]), float(window[1])
    return np.rint((np.clip(patches, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def normalize(patches, window):
    """HU patches -> float32 in [-1, 1] (window clipped)."""
    lo, hi = float(window[0]), float(window[1])
    return (np.clip(np.asarray(patches, np.float32), lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0


def uint8_to_input(patches):
    """Stored uint8 patches -> the network's float32 input in [-1, 1]."""
    return np.asarray(patches, np.float32) * (2.0 / 255.0) - 1.0


_CUBE = None


def cube_symmetries():
    """The 48 signed permutation matrices (rotations and reflections of the cube), as an (48, 3, 3) array."""
    global _CUBE
    if _CUBE is None:
        import itertools
        mats = []
        for perm in itertools.permutations(range(3)):
            for signs in itertools.product((1, -1), repeat=3):
                m = np.zeros((3, 3))
                for r, (c, s) in enumerate(zip(perm, signs)):
                    m[r, c] = s
                mats.append(m)
        _CUBE = np.asarray(mats)
    return _CUBE


def augment_crop(stored, side, rng, shift_vox, scale, augment=True):
    """A training view of one stored patch (uint8, S^3 with a margin) -> float32 (side^3) in [-1, 1]: the centre
    crop, or (``augment``) a random cube symmetry, a shift of up to ``shift_vox`` voxels (scalar, or 3 per-axis
    values) and a scale in [1 - scale, 1 + scale], sampled trilinearly."""
    from scipy import ndimage
    s = stored.shape[0]
    c_in, c_out = (s - 1) / 2.0, (side - 1) / 2.0
    if not augment:
        a = int(round(c_in - c_out))
        return uint8_to_input(stored[a:a + side, a:a + side, a:a + side])
    m = cube_symmetries()[rng.integers(48)] * rng.uniform(1 - scale, 1 + scale)
    shift = rng.uniform(-1, 1, 3) * np.asarray(shift_vox, np.float64)
    offset = c_in + shift - m @ np.full(3, c_out)
    out = ndimage.affine_transform(stored.astype(np.float32), m, offset=offset, output_shape=(side,) * 3,
                                   order=1, mode="nearest")
    return out * (2.0 / 255.0) - 1.0


def flips(x, k):
    """The k-th of 8 flip combinations of a batch (N, Z, Y, X, C) (k = 0: unchanged)."""
    axes = tuple(a + 1 for a in range(3) if (k >> a) & 1)
    return np.flip(x, axis=axes) if axes else x


# ----------------------------------------------------------------------------- candidates

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


def nodule_arrays(nodules):
    """A stage-1 /nodules table -> (world xyz (M, 3), diameter_mm (M,), excluded bool (M,))."""
    nod = np.asarray(nodules, dtype=ct_io.NODULE_DTYPE).reshape(-1)
    xyz = np.stack([nod["world_x"], nod["world_y"], nod["world_z"]], axis=1).astype(np.float64)
    return xyz, nod["diameter_mm"].astype(np.float64), nod["excluded"].astype(bool)


def label_candidates(xyz, nod_xyz, diam, excluded):
    """LUNA16's rule (metrics.py) -> (is_tp, is_fp, is_ignored) per candidate."""
    hits = metrics.match_candidates(xyz, nod_xyz, diam)
    _, _, is_fp, is_ign = metrics.detect(hits, np.zeros(len(hits)), excluded)
    return ~is_fp & ~is_ign, is_fp, is_ign


def random_lung_points(hu, lung, origin, spacing, direction, n, rng, nod_xyz, diam, margin_mm, min_hu=None):
    """Up to ``n`` random world points (N, 3) of lung-mask voxels (denser than ``min_hu`` when given), each
    farther than radius + ``margin_mm`` from every annotation. Rejection sampling: no index array of the lung."""
    if n <= 0:
        return np.zeros((0, 3))
    shape = np.asarray(lung.shape)
    got = []
    for _ in range(20):
        zyx = (rng.random((200_000, 3)) * shape).astype(np.int64)
        ok = lung[zyx[:, 0], zyx[:, 1], zyx[:, 2]] > 0
        if min_hu is not None:
            ok &= hu[zyx[:, 0], zyx[:, 1], zyx[:, 2]] > min_hu
        zyx = zyx[ok]
        if len(zyx):
            world = ct_io.voxel_to_world(zyx.astype(np.float64), origin, spacing, direction).reshape(-1, 3)
            if len(nod_xyz):
                d2 = ((world[:, None, :] - nod_xyz[None, :, :]) ** 2).sum(-1)
                far = (d2 >= (np.maximum(diam, 0) / 2.0 + margin_mm)[None, :] ** 2).all(axis=1)
                world = world[far]
            got.append(world)
        if sum(len(g) for g in got) >= n:
            break
    world = np.concatenate(got) if got else np.zeros((0, 3))
    if len(world) > n:
        world = world[rng.choice(len(world), n, replace=False)]
    return world


# ----------------------------------------------------------------------------- blob candidates

def detect_blobs(hu, lung, origin, spacing, direction, n, existing_xyz=None):
    """Up to ``n`` bright blobs of BLOB_DIAMETERS_MM inside the (dilated) lung mask -> (world xyz (k, 3),
    response (k,)), strongest first.

    The lung's bounding box of ``hu`` (Z, Y, X), clipped to BLOB_HU, resampled (trilinear) to BLOB_MM isotropic;
    the scale-normalised Laplacian of Gaussian (-sigma^2 LoG, sigma = diameter / (2 sqrt 3): a ball's best scale;
    a Gaussian filter, then the 7-point discrete Laplacian) at BLOB_SCALES diameters, its maximum over the scales;
    blobs are its 3x3x3 local maxima inside the lung mask dilated by BLOB_LUNG_DILATE_MM, denser than BLOB_MIN_HU,
    strongest first, none within BLOB_MERGE_MM of a stronger one or of ``existing_xyz`` (world, e.g. stage 5's
    candidates). BLOB_RANK="hessian" ranks them by sigma^2 times the weakest curvature of the Hessian at their scale
    (all three negative on a ball; one ~0 on a vessel, which is dropped) instead of the LoG. World positions via
    ct_io.voxel_to_world (the resampled grid's voxel -> the scan's voxel)."""
    from scipy import ndimage
    none = np.zeros((0, 3)), np.zeros(0)
    if n <= 0:
        return none
    sp = np.asarray(spacing, np.float64)[::-1]                       # mm per voxel along (z, y, x)
    rng = [np.nonzero(np.asarray(lung).any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)]
    if any(not len(r) for r in rng):
        return none
    pad = np.ceil((BLOB_DIAMETERS_MM[1] + BLOB_LUNG_DILATE_MM) / sp).astype(int)
    lo = np.maximum([r[0] for r in rng] - pad, 0)
    hi = np.minimum([r[-1] + 1 for r in rng] + pad, hu.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    step = BLOB_MM / sp                                              # input voxels per output voxel
    shape = tuple(int(k) for k in np.floor((hi - lo - 1) / step) + 1)
    vol = ndimage.affine_transform(np.asarray(hu[box]), step, output_shape=shape, output=np.float32, order=1,
                                   mode="nearest")
    np.clip(vol, *BLOB_HU, out=vol)                                  # clipped after resampling: no float copy of hu
    mask = ndimage.affine_transform(np.asarray(lung[box], np.uint8), step, output_shape=shape, order=0, mode="nearest")
    r = int(round(BLOB_LUNG_DILATE_MM / BLOB_MM))
    if r > 0:
        mask = ndimage.maximum_filter(mask, size=2 * r + 1)
    best, scale, smooth = None, None, []
    sigmas = np.geomspace(BLOB_DIAMETERS_MM[0], BLOB_DIAMETERS_MM[1], max(int(BLOB_SCALES), 1)) / (2 * np.sqrt(3.0))
    for k, sigma in enumerate(sigmas / BLOB_MM):                      # in output voxels
        g = ndimage.gaussian_filter(vol, sigma, truncate=3.0)
        resp = ndimage.laplace(g) * np.float32(-sigma * sigma)
        smooth.append(g if BLOB_RANK == "hessian" else None)
        if best is None:
            best, scale = resp, np.zeros(resp.shape, np.uint8)
        else:
            scale[resp > best] = k
            np.maximum(best, resp, out=best)
    peak = (best == ndimage.maximum_filter(best, size=3)) & (mask > 0) & (vol > BLOB_MIN_HU) & (best > 0)
    zyx = np.argwhere(peak)
    resp = best[peak]
    if BLOB_RANK == "hessian" and len(zyx):                          # tubes (vessels) have one curvature ~0
        resp = np.zeros(len(zyx))
        for k, sigma in enumerate(sigmas / BLOB_MM):
            sel = scale[peak] == k
            if sel.any():
                resp[sel] = sigma * sigma * np.maximum(-hessian_eigenvalues(smooth[k], zyx[sel])[:, 2], 0)
        keep = resp > 0
        zyx, resp = zyx[keep], resp[keep]
    order = np.argsort(-resp, kind="stable")[:max(50 * n, 1000)]     # the strongest peaks: enough for n blobs
    zyx, resp = zyx[order], resp[order]
    world = ct_io.voxel_to_world(lo + zyx * step, origin, spacing, direction).reshape(-1, 3)
    keep = merge_far(world, existing_xyz, n)
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


def merge_far(xyz, existing_xyz, n, merge_mm=None):
    """Indices of up to ``n`` points of ``xyz`` (in order: strongest first) that lie farther than ``merge_mm``
    (BLOB_MERGE_MM) from every point of ``existing_xyz`` and from every point kept before them."""
    r2 = (BLOB_MERGE_MM if merge_mm is None else merge_mm) ** 2
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


def with_blobs(scan, xyz, p5):
    """A scan's candidates (xyz, p5) with BLOB_CANDIDATES blobs added (stage-5 score BLOB_SCORE) -> (xyz, p5,
    is_blob (bool per candidate), detection seconds). Needs scan['hu'] and scan['lung_mask']."""
    xyz, p5 = np.asarray(xyz, np.float64).reshape(-1, 3), np.asarray(p5, np.float64)
    if BLOB_CANDIDATES <= 0:
        return xyz, p5, np.zeros(len(xyz), bool), 0.0
    t0 = time.perf_counter()
    a = scan["attrs"]
    blobs, _ = detect_blobs(scan["hu"], scan["lung_mask"], a["origin"], a["spacing"], a["direction"],
                            BLOB_CANDIDATES, xyz)
    sec = time.perf_counter() - t0
    return (np.concatenate([xyz, blobs]), np.concatenate([p5, np.full(len(blobs), BLOB_SCORE)]),
            np.arange(len(xyz) + len(blobs)) >= len(xyz), sec)


# ----------------------------------------------------------------------------- stage-1 files and parts

def part_scans(work_dir, part):
    """Stage-1 files of a part ('all' or a part of split.json) -> list of paths (postprocess.scan_list)."""
    import postprocess
    return postprocess.scan_list(work_dir, part)


def uid_of(path):
    return os.path.basename(path)[:-3] if path.endswith(".h5") else os.path.basename(path)


# ----------------------------------------------------------------------------- the network

def build_model(side, width=None, blocks=None, dense=None, dropout=None, lr=None):
    """The stage-6 network: (side, side, side, 1) patch -> probability that a nodule is at its centre.
    BLOCKS x [conv 3x3x3 (WIDTH * 2^b filters) + batch norm + ReLU + max-pool 2], flatten (the position of what
    is seen matters: a nodule must be at the centre), dropout, dense + ReLU, dropout, dense + sigmoid."""
    import keras
    from keras import layers
    width, blocks = WIDTH if width is None else width, BLOCKS if blocks is None else blocks
    dense, dropout = DENSE if dense is None else dense, DROPOUT if dropout is None else dropout
    inp = keras.Input((side, side, side, 1), name="patch")
    x = inp
    for b in range(blocks):
        x = layers.Conv3D(width * 2 ** b, 3, padding="same", use_bias=False, name=f"conv{b}")(x)
        x = layers.BatchNormalization(name=f"bn{b}")(x)
        x = layers.ReLU(name=f"relu{b}")(x)
        x = layers.MaxPooling3D(2, padding="same", name=f"pool{b}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(dropout, name="drop0")(x)
    x = layers.Dense(dense, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout, name="drop1")(x)
    out = layers.Dense(1, activation="sigmoid", name="prob")(x)
    model = keras.Model(inp, out, name="fp_reduction_3d")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LR if lr is None else lr),
                  loss="binary_crossentropy")
    return model


def predict(model, x, tta=1, batch=None):
    """Probabilities (N,) of a batch of network inputs (N, S, S, S) or (N, S, S, S, 1); mean over ``tta`` flips."""
    batch = batch or PREDICT_BATCH
    x = np.asarray(x, np.float32)
    if x.ndim == 4:
        x = x[..., None]
    out = np.zeros(len(x), np.float64)
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        acc = np.zeros(len(xb))
        for k in range(max(int(tta), 1)):
            acc += np.asarray(model.predict_on_batch(np.ascontiguousarray(flips(xb, k)))).reshape(-1)
        out[i:i + batch] = acc / max(int(tta), 1)
    return out


def combine(p5, p6, how):
    """The final score of a candidate from its stage-5 (p5; NaN = none) and stage-6 (p6) probabilities."""
    p5, p6 = np.asarray(p5, np.float64), np.asarray(p6, np.float64)
    if how == "fp" or not np.all(np.isfinite(p5)):
        return p6
    if how == "product":
        return p5 * p6
    if how == "mean":
        return (p5 + p6) / 2.0
    raise ValueError(f"COMBINE={how!r}: expected one of {COMBINE_CHOICES}")


# ----------------------------------------------------------------------------- evaluation (metrics.py)

class Evaluation:
    """Accumulates, scan by scan, what metrics.froc_summary needs for one scoring of the candidates: each included
    nodule's best hitting score, the false positives' scores; at most MAX_CANDIDATES per scan (the highest
    scored, metrics.top_candidates). Also the operating point: candidates scored above ``threshold``."""

    def __init__(self, threshold, max_candidates):
        self.threshold, self.max_candidates = threshold, max_candidates
        self.diam, self.score, self.fp = [], [], []
        self.found_op, self.n_fp_op, self.n_scans = [], 0, 0

    def add(self, xyz, score, nod_xyz, diam, excluded):
        self.n_scans += 1
        score = np.asarray(score, np.float64)
        keep = metrics.top_candidates(score, self.max_candidates) if len(score) else np.zeros(0, bool)
        xyz, score = np.asarray(xyz).reshape(-1, 3)[keep], score[keep]
        hits = metrics.match_candidates(xyz, nod_xyz, diam)
        _, best, is_fp, _ = metrics.detect(hits, score, excluded)
        incl = ~excluded
        self.diam += list(diam[incl])
        self.score += list(best[incl])
        self.fp += list(score[is_fp])
        above = score > self.threshold
        found, _, fp_op, _ = metrics.detect(hits[above], score[above], excluded)
        self.found_op += list(found[incl])
        self.n_fp_op += int(fp_op.sum())

    def add_failed(self):
        self.n_scans += 1

    def summary(self, size_edges, rates):
        m, curves = metrics.froc_summary(self.diam, self.score, self.fp, max(self.n_scans, 1), size_edges, rates)
        found = np.asarray(self.found_op, bool)
        bins = np.array([metrics.size_bin(d, size_edges) for d in self.diam], object)
        frac = lambda h: {"value": float(h.mean()) if len(h) else None, "found": int(h.sum()), "total": int(len(h))}
        m["operating_point"] = {
            "threshold": self.threshold, "sensitivity": frac(found),
            "sensitivity_by_size": {b: frac(found[bins == b]) for b in metrics.size_bin_names(size_edges)},
            "fp_per_scan": self.n_fp_op / max(self.n_scans, 1), "n_false_positives": self.n_fp_op,
            "definition": "candidates whose score is above threshold are the detections: a nodule is found when one "
                          "lies within its radius (LUNA16's rule); the others (not on excluded annotations) are "
                          "false positives, divided by every scan of the part"}
        m["n_nodules"], m["n_scans"] = len(self.diam), self.n_scans
        return m, curves


# ----------------------------------------------------------------------------- training patches

def _sig(path):
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


class PatchStore:
    """Training or validation patches on disk: patches.u8 (uint8, (N, S, S, S), memory-mapped when read) and
    meta.npz (label, kind, largest jitter in voxels, scan number, stage-5 probability, world xyz; each scan's
    nodules); written scan by scan, meta.npz last (it marks the store complete, with the settings that made it)."""

    def __init__(self, folder):
        self.folder = folder
        self.data_path, self.meta_path = os.path.join(folder, "patches.u8"), os.path.join(folder, "meta.npz")

    def load(self, key):
        """The stored patches if complete and made with ``key`` -> True."""
        if not os.path.isfile(self.meta_path) or not os.path.isfile(self.data_path):
            return False
        try:
            meta = dict(np.load(self.meta_path, allow_pickle=False))
        except Exception:
            return False
        if str(meta.get("key")) != key:
            return False
        self.meta = meta
        n, s = int(meta["n"]), int(meta["side"])
        if os.path.getsize(self.data_path) != n * s ** 3:
            return False
        self.patches = np.memmap(self.data_path, np.uint8, "r", shape=(n, s, s, s)) if n else np.zeros((0, s, s, s), np.uint8)
        return True

    def build(self, key, paths, table, side, rng, what, failed):
        """Extract the patches of ``paths`` (stage-1 files) -> self (loaded)."""
        from tqdm import tqdm
        os.makedirs(self.folder, exist_ok=True)
        if os.path.exists(self.meta_path):
            os.remove(self.meta_path)
        cols = {k: [] for k in ("label", "kind", "jitter_vox", "scan", "p5", "xyz")}
        nods = {k: [] for k in ("nod_scan", "nod_xyz", "nod_diam", "nod_excl")}
        scan_uids, n = [], 0
        margin_vox = MAX_SHIFT_MM / VOXEL_MM + side * SCALE / 2.0
        voxel = VOXEL_MM
        with open(self.data_path, "wb") as f:
            bar = tqdm(paths, desc=f"fp_reduction {what} patches", unit="scan")
            for path in bar:
                try:
                    scan = ct_io.read_stage1(path, ("hu", "lung_mask"))
                    a = scan["attrs"]
                    uid = str(a.get("seriesuid", uid_of(path)))
                    geo = (a["origin"], a["spacing"], a["direction"])
                    nod_xyz, diam, excl = nodule_arrays(scan["nodules"])
                    xyz, p5, _ = table.of(uid)
                    xyz, p5, _, _ = with_blobs(scan, xyz, p5)    # blobs: hard negatives, or positives on nodules
                    tp, fp, _ = label_candidates(xyz, nod_xyz, diam, excl)
                    hard = np.nonzero(fp)[0]
                    if len(hard) > HARD_NEG_PER_SCAN:       # the highest scored (random when no scores)
                        order = (np.argsort(-p5[hard], kind="stable") if np.isfinite(p5[hard]).all()
                                 else rng.permutation(len(hard)))
                        hard = hard[order[:HARD_NEG_PER_SCAN]]
                    pos = np.nonzero(tp)[0]
                    if what == "val":                       # validation: every candidate, scored as at the end
                        hard = np.nonzero(fp)[0]
                    incl = np.nonzero(~excl)[0]
                    rnd = random_lung_points(scan["hu"], scan["lung_mask"], *geo, RANDOM_NEG_PER_SCAN, rng,
                                             nod_xyz, diam, NEG_MARGIN_MM)
                    dense = random_lung_points(scan["hu"], scan["lung_mask"], *geo, DENSE_NEG_PER_SCAN, rng,
                                               nod_xyz, diam, NEG_MARGIN_MM, DENSE_HU)
                    groups = [(xyz[pos], 1, KIND_CANDIDATE, p5[pos]), (xyz[hard], 0, KIND_CANDIDATE, p5[hard]),
                              (nod_xyz[incl], 1, KIND_NODULE, None), (rnd, 0, KIND_RANDOM, None),
                              (dense, 0, KIND_DENSE, None)]
                    centers = np.concatenate([g[0].reshape(-1, 3) for g in groups])
                    stored_side = side + 2 * int(np.ceil(margin_vox))
                    hu_patches = extract_patches(scan["hu"], *geo, centers, stored_side, voxel)
                    f.write(to_uint8(hu_patches, HU_WINDOW).tobytes())
                except Exception as e:
                    msg = " ".join(str(e).split())[:300]
                    msg = msg if isinstance(e, ct_io.ScanError) else f"{path}: {type(e).__name__}: {msg}"
                    tqdm.write(f"FAILED {msg}; skipped", file=sys.stderr)
                    failed.append({"path": path, "error": msg})
                    continue
                k = len(scan_uids)
                scan_uids.append(uid)
                for g_xyz, label, kind, p in groups:
                    m = len(g_xyz)
                    cols["label"].append(np.full(m, label, np.uint8))
                    cols["kind"].append(np.full(m, kind, np.int8))
                    cols["scan"].append(np.full(m, k, np.int32))
                    cols["p5"].append(np.full(m, np.nan, np.float32) if p is None else np.asarray(p, np.float32))
                    cols["xyz"].append(np.asarray(g_xyz, np.float64).reshape(-1, 3))
                    if kind == KIND_NODULE:
                        jit = np.minimum(JITTER * diam[incl] / 2.0, MAX_SHIFT_MM) / voxel
                    else:
                        jit = np.full(m, min(SHIFT_MM, MAX_SHIFT_MM) / voxel)
                    cols["jitter_vox"].append(np.asarray(jit, np.float32))
                nods["nod_scan"].append(np.full(len(diam), k, np.int32))
                nods["nod_xyz"].append(nod_xyz)
                nods["nod_diam"].append(diam)
                nods["nod_excl"].append(excl)
                n += len(centers)
                bar.set_postfix(patches=n)
        meta = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in {**cols, **nods}.items()}
        meta["xyz"] = meta["xyz"].reshape(-1, 3)
        meta["nod_xyz"] = meta["nod_xyz"].reshape(-1, 3)
        meta.update(key=np.array(key), n=np.array(n), side=np.array(side + 2 * int(np.ceil(margin_vox))),
                    uids=np.array(scan_uids if scan_uids else [""]))
        tmp = self.meta_path + ".tmp.npz"
        np.savez(tmp, **meta)
        os.replace(tmp, self.meta_path)
        if not self.load(key):
            raise RuntimeError(f"{self.folder}: patch store unreadable after writing")
        return self


class Sampler:
    """Training batches from a PatchStore: POS_FRACTION positives (with replacement: oversampled), the rest
    negatives, each augmented; seeded by (SEED, epoch)."""

    def __init__(self, store, side):
        self.store, self.side = store, side
        label = store.meta["label"]
        self.pos, self.neg = np.nonzero(label == 1)[0], np.nonzero(label == 0)[0]
        if not len(self.pos) or not len(self.neg):
            raise SystemExit(f"{store.folder}: {len(self.pos)} positive and {len(self.neg)} negative training "
                             "patches; need both (nodules in the training part, lung in the masks)")

    def batches(self, epoch, steps, batch_size):
        rng = np.random.default_rng([SEED, epoch])
        n_pos = max(1, int(round(POS_FRACTION * batch_size)))
        jit = self.store.meta["jitter_vox"]
        for _ in range(steps):
            idx = np.concatenate([rng.choice(self.pos, n_pos), rng.choice(self.neg, batch_size - n_pos)])
            x = np.empty((batch_size, self.side, self.side, self.side, 1), np.float32)
            for j, i in enumerate(idx):
                x[j, ..., 0] = augment_crop(self.store.patches[i], self.side, rng, jit[i], SCALE, AUGMENT)
            y = self.store.meta["label"][idx].astype(np.float32)[:, None]
            yield x, y


def validate(model, store, side, how):
    """Validation: every stored patch's stage-6 probability (centre crop) -> dict with loss (binary cross-entropy
    over all patches) and cpm (metrics.py's FROC over the validation candidates scored by ``how``; None when the
    validation scans have no candidates or no nodules); cpm_by_combine for each COMBINE choice."""
    meta = store.meta
    n = int(meta["n"])
    if n == 0:
        return {"loss": None, "cpm": None}
    p = np.zeros(n)
    for i in range(0, n, PREDICT_BATCH):
        x = np.stack([augment_crop(store.patches[j], side, None, 0, 0, augment=False)
                      for j in range(i, min(i + PREDICT_BATCH, n))])
        p[i:i + len(x)] = predict(model, x, TTA)
    y = meta["label"].astype(np.float64)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    out = {"loss": float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))), "auc": auc(y > 0, p), "cpm": None,
           "cpm_by_combine": {}}
    cand = meta["kind"] == KIND_CANDIDATE
    if cand.any() and len(meta["nod_diam"]):
        for c in COMBINE_CHOICES:
            ev = Evaluation(THRESHOLD, MAX_CANDIDATES)
            for k in range(len(meta["uids"]) if int(meta["n"]) else 0):
                sel = cand & (meta["scan"] == k)
                ns = meta["nod_scan"] == k
                ev.add(meta["xyz"][sel], combine(meta["p5"][sel], p[sel], c), meta["nod_xyz"][ns],
                       meta["nod_diam"][ns], meta["nod_excl"][ns].astype(bool))
            cpm = metrics.froc([s for s in ev.score], ev.fp, max(ev.n_scans, 1), FROC_RATES)["cpm"]
            out["cpm_by_combine"][c] = cpm
        out["cpm"] = out["cpm_by_combine"].get(how if how in COMBINE_CHOICES else "fp")
    return out


def auc(positive, score):
    """Area under the ROC curve (the probability that a random positive outranks a random negative, ties half)
    -> float, or None without positives or negatives."""
    from scipy.stats import rankdata
    positive, score = np.asarray(positive, bool), np.asarray(score, np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _save_model(model, path):
    model.save(path + ".tmp.keras")                 # Keras wants the .keras extension
    os.replace(path + ".tmp.keras", path)


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    os.replace(tmp, path)


def _write_history(path, rows):
    keys = sorted({k for r in rows for k in r} - {"epoch"})
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch"] + keys, restval="")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def train(out_dir, side, cfg, train_paths, val_paths, table_paths, failed):
    """Extract (or reuse) the patches, train (or resume), keep the best checkpoint as out_dir/model.keras ->
    (model path, training record dict)."""
    import keras
    from tqdm import tqdm
    table = CandidateTable(table_paths)
    train_uids = {uid_of(p) for p in train_paths}
    covered = sum(1 for u in train_uids if u in table.index)
    if covered == 0:
        print(f"note: no candidates on the {len(train_paths)} training scans in {', '.join(table_paths) or '(none)'}: "
              "negatives are random and dense lung points only (give TRAIN_CANDIDATES from a stage-5 run over "
              "every scan, postprocess.py --SCANS=all, for hard negatives)")
    sampling = {k: cfg[k] for k in ("PATCH_MM", "VOXEL_MM", "HU_WINDOW", "JITTER", "SHIFT_MM", "MAX_SHIFT_MM",
                                    "SCALE", "HARD_NEG_PER_SCAN", "RANDOM_NEG_PER_SCAN", "DENSE_NEG_PER_SCAN",
                                    "DENSE_HU", "NEG_MARGIN_MM", "SEED")}
    sampling.update({k: cfg[k] for k in cfg if k.startswith("BLOB_")} if cfg.get("BLOB_CANDIDATES") else {})
    stores = {}
    for what, paths, seed in (("train", train_paths, 0), ("val", val_paths, 1)):
        key = json.dumps({"what": what, "sampling": sampling, "candidates": [_sig(p) for p in table_paths],
                          "scans": [_sig(p) if os.path.isfile(p) else [p] for p in paths]}, sort_keys=True)
        store = PatchStore(os.path.join(out_dir, "patches", what))
        if store.load(key):
            print(f"{what}: reusing {int(store.meta['n'])} stored patches ({store.folder})")
        else:
            store.build(key, paths, table, side, np.random.default_rng([SEED, seed]), what, failed)
        stores[what] = store
    meta = stores["train"].meta
    counts = {"positive_candidates": int(((meta["kind"] == KIND_CANDIDATE) & (meta["label"] == 1)).sum()),
              "nodule_centres": int((meta["kind"] == KIND_NODULE).sum()),
              "hard_negatives": int(((meta["kind"] == KIND_CANDIDATE) & (meta["label"] == 0)).sum()),
              "random_negatives": int((meta["kind"] == KIND_RANDOM).sum()),
              "dense_negatives": int((meta["kind"] == KIND_DENSE).sum()),
              "scans": int(len(meta["uids"])) if int(meta["n"]) else 0,
              "validation_patches": int(stores["val"].meta["n"])}
    print("training patches: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    sampler = Sampler(stores["train"], side)

    last, best, state_path = (os.path.join(out_dir, n) for n in ("last.keras", "model.keras", "state.json"))
    hist_path = os.path.join(out_dir, "history.csv")
    state, model = {}, None
    if RESUME and os.path.isfile(last) and os.path.isfile(state_path):
        model = keras.saving.load_model(last)
        state = json.load(open(state_path))
        iters = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        if state.get("iterations") != iters:
            print(f"RESUME=1 but {state_path} does not match {last}: starting from scratch")
            state, model = {}, None
        else:
            print(f"resuming from {last}: epoch {state['epoch'] + 2}, best validation {state.get('best')}")
    elif RESUME:
        print(f"RESUME=1 but {last} or {state_path} does not exist: starting from scratch")
    if model is None:
        keras.utils.set_random_seed(SEED)
        model = build_model(side)
    history = state.get("history", [])
    start = state.get("epoch", -1) + 1
    print(f"stage-6 network: {model.count_params():,} parameters, patches {side}^3 of {VOXEL_MM:g} mm; "
          f"epochs {start + 1}-{EPOCHS} of {STEPS_PER_EPOCH} steps of {BATCH_SIZE}")
    for epoch in range(start, EPOCHS):
        t0, losses = time.time(), []
        bar = tqdm(sampler.batches(epoch, STEPS_PER_EPOCH, BATCH_SIZE), total=STEPS_PER_EPOCH,
                   desc=f"fp_reduction epoch {epoch + 1}/{EPOCHS}", unit="step")
        for x, y in bar:
            loss = model.train_on_batch(x, y)
            losses.append(float(np.asarray(loss).reshape(-1)[0]))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        train_s = time.time() - t0
        state["train_seconds"] = state.get("train_seconds", 0.0) + train_s
        t1 = time.time()
        val = validate(model, stores["val"], side, COMBINE)
        val_s = time.time() - t1
        crit = (val["cpm"] if val["cpm"] is not None else -1.0, val.get("auc") or 0.0,
                -(val["loss"] if val["loss"] is not None else 0.0))
        improved = "best" not in state or val["loss"] is None or crit > tuple(state["best"])
        if improved:
            state["best"], state["best_epoch"], state["best_val"] = list(crit), epoch, val
            _save_model(model, best)
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "val_loss": val["loss"], "val_cpm": val["cpm"],
               "val_auc": val.get("auc"),
               "train_seconds": train_s, "val_seconds": val_s,
               "patches_per_s": STEPS_PER_EPOCH * BATCH_SIZE / max(train_s, 1e-9)}
        history.append(row)
        state["epoch"], state["history"] = epoch, history
        _save_model(model, last)
        _write_history(hist_path, history)
        state["iterations"] = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        _write_json(state_path, state)                          # the commit: written last
        cpm = "n/a" if val["cpm"] is None else f"{val['cpm']:.3f}"
        vauc = "n/a" if val.get("auc") is None else f"{val['auc']:.3f}"
        print(f"epoch {epoch + 1}: loss {row['loss']:.4f}, val loss {val['loss']:.4f}, val AUC {vauc}, val CPM {cpm}"
              f"{' (best)' if improved else ''} | {row['patches_per_s']:.0f} patches/s, {train_s:.0f} s "
              f"(+{val_s:.0f} s validation)", flush=True)
        if MAX_MINUTES and state["train_seconds"] >= MAX_MINUTES * 60:
            print(f"time budget of {MAX_MINUTES} min reached")
            break
    if not os.path.isfile(best):
        raise SystemExit(f"{best}: no checkpoint (EPOCHS={EPOCHS}?)")
    bv = state.get("best_val", {})
    chosen = COMBINE
    if COMBINE == "auto":
        by = {k: v for k, v in (bv.get("cpm_by_combine") or {}).items() if v is not None}
        chosen = max(COMBINE_CHOICES, key=lambda k: (by.get(k, -1.0), k == "fp")) if by else "fp"
        print(f"COMBINE=auto: validation CPM by combination {json.dumps({k: round(v, 4) for k, v in by.items()})}"
              f" -> {chosen}")
    record = {"train_seconds": state.get("train_seconds"), "epochs": len(history), "steps": len(history) * STEPS_PER_EPOCH,
              "batch_size": BATCH_SIZE, "best_epoch": state.get("best_epoch", 0) + 1, "best_validation": bv,
              "patches": counts, "combine": chosen, "history": history}
    return best, record


# ----------------------------------------------------------------------------- scoring

def score_scan(path, model, lookup, side):
    """One scan's candidates (``lookup(uid)`` -> (xyz, p5, ...)), blobs added (BLOB_CANDIDATES), rescored by
    ``model`` -> dict: uid, xyz, p5, p6, is_blob, nodules (xyz, diameter, excluded), blob_seconds, seconds.
    Raises on a scan that cannot be read."""
    t0 = time.perf_counter()
    scan = ct_io.read_stage1(path, ("hu", "lung_mask") if BLOB_CANDIDATES > 0 else ("hu",))
    a = scan["attrs"]
    uid = str(a.get("seriesuid", uid_of(path)))
    geo = (a["origin"], a["spacing"], a["direction"])
    xyz, p5 = lookup(uid)[:2]
    xyz, p5, is_blob, blob_sec = with_blobs(scan, xyz, p5)
    p6 = np.zeros(len(xyz))
    offsets = patch_offsets(side, VOXEL_MM, *geo)
    for i in range(0, len(xyz), PREDICT_BATCH):
        hu_p = extract_patches(scan["hu"], *geo, xyz[i:i + PREDICT_BATCH], side, VOXEL_MM, offsets)
        x = uint8_to_input(to_uint8(hu_p, HU_WINDOW))     # as the training patches are stored
        p6[i:i + len(x)] = predict(model, x, TTA)
    return {"uid": uid, "xyz": xyz, "p5": p5, "p6": p6, "is_blob": is_blob, "nodules": nodule_arrays(scan["nodules"]),
            "blob_seconds": blob_sec, "seconds": time.perf_counter() - t0}


_WORKER_MODELS = {}             # on a dask worker: the stage-6 model of each model file, loaded once per worker process
_WORKER_LOCK = threading.Lock()


def _score_on_worker(task):
    """One scan on a dask worker: score_scan with the run's settings and this worker's cached model ->
    ("done", score_scan's dict) or ("failed", one-line error)."""
    path, cfg, model_path, rows, side = task
    globals().update(cfg)                             # the run's settings (TTA, BLOB_CANDIDATES, ...) in this worker
    try:
        st = os.stat(model_path)
        key = (model_path, st.st_size, st.st_mtime_ns)
        with _WORKER_LOCK:
            if key not in _WORKER_MODELS:
                import nasnet_v2  # noqa: F401  (first: TensorFlow's CPU allocator)
                import keras
                _WORKER_MODELS[key] = keras.saving.load_model(model_path, compile=False)
        return "done", score_scan(path, _WORKER_MODELS[key], lambda uid: rows, side)
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        return "failed", msg if isinstance(e, ct_io.ScanError) else f"{path}: {type(e).__name__}: {msg}"


def _scan_scores(paths, model, model_path, table, side, cfg):
    """(path, score_scan's dict or None, error line or None) per scan, in path order: computed here, or with
    DASK_SCHEDULER by the cluster's workers (_score_on_worker; each task carries its scan's candidate rows, by the
    stage-1 file's name)."""
    if not DASK_SCHEDULER:
        for path in paths:
            try:
                yield path, score_scan(path, model, table.of, side), None
            except Exception as e:
                msg = " ".join(str(e).split())[:300]
                yield path, None, msg if isinstance(e, ct_io.ScanError) else f"{path}: {type(e).__name__}: {msg}"
        return
    from dask_tasks import run_on_cluster
    a = os.path.abspath                               # absolute paths: the workers' folder may differ
    tasks = [(a(p), cfg, a(model_path), table.of(uid_of(p))[:2], side) for p in paths]
    index = {t[0]: p for t, p in zip(tasks, paths)}
    done, next_i = {}, 0
    for task, out, err in run_on_cluster(DASK_SCHEDULER, _score_on_worker, tasks, names=paths):
        status, value = out if err is None else ("failed", err)
        done[index[task[0]]] = (value, None) if status == "done" else (None, value)
        while next_i < len(paths) and paths[next_i] in done:     # in path order, as the local run
            yield (paths[next_i], *done.pop(paths[next_i]))
            next_i += 1


def score_scans(model, model_path, paths, table, side, how, out_dir, failed, cfg):
    """Rescore every candidate of ``paths`` scan by scan (here, or on DASK_SCHEDULER's workers); write
    candidates.csv and candidates_detail.csv (rows streamed to temporary files, renamed at the end) -> (Evaluation
    before, Evaluation after, timing dict)."""
    from tqdm import tqdm
    before = Evaluation(THRESHOLD, MAX_CANDIDATES) if table.has_prob else None
    after = Evaluation(THRESHOLD, MAX_CANDIDATES)
    recall_all = {"found": 0, "total": 0}
    fields = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    detail_fields = fields + ["stage5_probability", "stage6_probability", "status", "source"]
    paths_out = [os.path.join(out_dir, n) for n in ("candidates.csv", "candidates_detail.csv")]
    tmps = [p + ".tmp" for p in paths_out]
    seconds, n_cand, blob_seconds, n_blobs = [], 0, [], 0
    with open(tmps[0], "w", newline="") as f1, open(tmps[1], "w", newline="") as f2:
        w1, w2 = csv.DictWriter(f1, fields), csv.DictWriter(f2, detail_fields)
        w1.writeheader()
        w2.writeheader()
        bar = tqdm(total=len(paths), desc="fp_reduction scoring", unit="scan")
        for path, r, err in _scan_scores(paths, model, model_path, table, side, cfg):
            bar.update(1)
            if err is not None:
                tqdm.write(f"FAILED {err}; skipped", file=sys.stderr)
                failed.append({"path": path, "error": err})
                after.add_failed()
                if before is not None:
                    before.add_failed()
                continue
            uid, xyz, p5, p6, is_blob = r["uid"], r["xyz"], r["p5"], r["p6"], r["is_blob"]
            nod_xyz, diam, excl = r["nodules"]
            score = combine(p5, p6, how)
            after.add(xyz, score, nod_xyz, diam, excl)
            if before is not None:
                before.add(xyz, p5, nod_xyz, diam, excl)
            tp, fp, _ = label_candidates(xyz, nod_xyz, diam, excl)
            hit = metrics.match_candidates(xyz, nod_xyz, diam)[:, ~excl].any(axis=0)
            recall_all["found"] += int(hit.sum())
            recall_all["total"] += int(len(hit))
            for c, s5, s6, s, t, f, b in zip(xyz, p5, p6, score, tp, fp, is_blob):
                row = {"seriesuid": uid, "coordX": f"{c[0]:.3f}", "coordY": f"{c[1]:.3f}", "coordZ": f"{c[2]:.3f}",
                       "probability": f"{s:.6f}"}
                w1.writerow(row)
                w2.writerow({**row, "stage5_probability": "" if not np.isfinite(s5) else f"{float(s5):.6f}",
                             "stage6_probability": f"{s6:.6f}", "status": "TP" if t else ("FP" if f else "ignored"),
                             "source": "blob" if b else "stage5"})
            seconds.append(r["seconds"])
            if BLOB_CANDIDATES > 0:
                blob_seconds.append(r["blob_seconds"])
                n_blobs += int(is_blob.sum())
            n_cand += len(xyz)
            bar.set_postfix(candidates=n_cand)
        bar.close()
    for t, p in zip(tmps, paths_out):
        os.replace(t, p)
    timing = {"seconds_per_scan": float(np.mean(seconds)) if seconds else None,
              "seconds_per_candidate": float(np.sum(seconds) / n_cand) if n_cand else None,
              "scans_scored": len(seconds), "n_candidates": n_cand, "n_blob_candidates": n_blobs,
              "blob_seconds_per_scan": float(np.mean(blob_seconds)) if blob_seconds else None,
              "candidate_recall_all": {**recall_all, "value": recall_all["found"] / recall_all["total"]
                                       if recall_all["total"] else None,
                                       "definition": "nodules within the radius of any candidate of the list, "
                                                     "without the MAX_CANDIDATES cut"}}
    return before, after, timing


def write_froc(path, curves_before, curves_after, m_before, m_after):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from postprocess import atomic, froc_axes, froc_xy
    fig, ax = plt.subplots(figsize=(7, 4.8))
    rates = np.asarray(FROC_RATES)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(curves_after):
        color = "black" if name == "all" else colors[i % len(colors)]
        for curves, style, tag, m in ((curves_before, "--", "before", m_before), (curves_after, "-", "after", m_after)):
            if curves is None:
                continue
            c = curves[name]
            if len(c["sens"]) == 0 or not np.isfinite(c["sens"]).all():
                continue
            n = "all" if name == "all" else f"{name} mm"
            ax.plot(*froc_xy(c, rates), style, color=color, lw=2.2 if name == "all" else 1.0,
                    label=f"{n} {tag}: CPM {c['cpm']:.3f}")
    froc_axes(ax, rates, f"FROC before (stage 5, dashed) and after (stage 6, solid): {m_after['n_scans']} scans, "
                         f"{m_after['n_nodules']} nodules", title_size=9, fontsize=7, loc="best", ncol=2)
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def print_table(before, after):
    """Before / after by nodule size: CPM, sensitivity at 1 and 8 FP/scan, and the operating point."""
    def f(v):
        return "  n/a" if v is None or not np.isfinite(v) else f"{v:5.3f}"
    rates = list(FROC_RATES)
    i1 = rates.index(1.0) if 1.0 in rates else len(rates) // 2
    bins = metrics.size_bin_names(SIZE_BINS)
    print(f"{'diameter (mm)':>14} {'nodules':>8} {'CPM before':>11} {'CPM after':>10} {'@1FP before':>12} "
          f"{'@1FP after':>11} {'recall':>7}")
    for b in bins + ["all"]:
        def get(m, what):
            if m is None:
                return None
            if what == "cpm":
                return m["cpm"]["by_size"][b] if b != "all" else m["cpm"]["value"]
            s = m["froc"]["by_size"][b] if b != "all" else m["froc"]["sensitivities"]
            return s[i1]
        rec = after["candidate_recall"]["by_size"][b] if b != "all" else after["candidate_recall"]
        print(f"{b:>14} {rec['total']:>8} {f(get(before, 'cpm')):>11} {f(get(after, 'cpm')):>10} "
              f"{f(get(before, '1')):>12} {f(get(after, '1')):>11} {f(rec['value']):>7}")
    for tag, m in (("before", before), ("after", after)):
        if m is not None:
            op = m["operating_point"]
            print(f"operating point {tag} (score > {op['threshold']}): sensitivity {f(op['sensitivity']['value'])} "
                  f"at {op['fp_per_scan']:.2f} FP/scan")


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    defaults = constants(globals())
    try:
        cfg = configure(globals(), argv, choices={"COMBINE": COMBINE_CHOICES + ("auto",),
                                                  "BLOB_RANK": ("hessian", "log")})
        given = {a[2:].split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
        return _run(cfg, given)
    finally:
        globals().update(defaults)      # a second main() in one process starts from the file's constants


def _run(cfg, given=()):
    import resource
    import nasnet_v2  # noqa: F401  (first: TensorFlow's CPU allocator, before any tensor exists)
    import keras
    out_dir = OUT_DIR or os.path.join(WORK_DIR, "7_fp_reduction")
    os.makedirs(out_dir, exist_ok=True)
    cand_dir = CANDIDATES_DIR or os.path.join(WORK_DIR, "6_report")
    cand_path = CANDIDATES or os.path.join(cand_dir, "candidates.csv")
    if not os.path.isfile(cand_path):
        raise SystemExit(f"{cand_path}: no candidates (run postprocess.py, or give --CANDIDATES=)")
    failed, record, t_start = [], None, time.time()
    how = COMBINE

    # the scans scored: the part SCANS, among those stage 5 evaluated (its config.json) when rescoring its report
    paths = part_scans(WORK_DIR, SCANS)
    stage5_cfg = os.path.join(cand_dir, "config.json")
    if not CANDIDATES and os.path.isfile(stage5_cfg):
        part5 = json.load(open(stage5_cfg)).get("SCANS", "all")
        covered = {uid_of(p) for p in part_scans(WORK_DIR, part5)}
        left = [p for p in paths if uid_of(p) in covered]
        if len(left) < len(paths):
            print(f"{len(paths) - len(left)} of the {len(paths)} scans of part {SCANS!r} were not evaluated by "
                  f"stage 5 ({stage5_cfg}: SCANS={part5}); scoring the {len(left)} it evaluated")
        paths = left
    if not paths:
        raise SystemExit(f"no scans to score in part {SCANS!r} of {WORK_DIR}")

    if MODEL:              # score only: the model's own patch geometry, blob candidates and operating point
        if not os.path.isfile(MODEL):
            raise SystemExit(f"{MODEL}: model not found")
        mcfg_path = os.path.join(os.path.dirname(os.path.abspath(MODEL)), "config.json")
        mcfg = json.load(open(mcfg_path)) if os.path.isfile(mcfg_path) else {}
        for k in GEOMETRY_KEYS + tuple(k for k in SCORING_KEYS if k not in given):
            if k in mcfg:
                v = mcfg[k]
                globals()[k] = tuple(v) if isinstance(cfg[k], tuple) else type(cfg[k])(v)
                cfg[k] = globals()[k]
        if how == "auto":
            how = mcfg.get("COMBINE_USED", "fp")
        model_path = os.path.join(out_dir, "model.keras")
        if os.path.abspath(MODEL) != os.path.abspath(model_path):
            shutil.copyfile(MODEL, model_path + ".tmp.keras")
            os.replace(model_path + ".tmp.keras", model_path)
        print(f"scoring only with {MODEL} (patches {PATCH_MM:g} mm at {VOXEL_MM:g} mm, COMBINE={how})")
    else:
        side = patch_side()
        train_tables = [p.strip() for p in TRAIN_CANDIDATES.split(",") if p.strip()] or [cand_path]
        cfg.update(PATCH_SIDE=side)
        save_config({**cfg, "MODE": "train"}, out_dir)
        model_path, record = train(out_dir, side, cfg, part_scans(WORK_DIR, "train"),
                                   part_scans(WORK_DIR, "val"), train_tables, failed)
        how = record["combine"]
    side = patch_side()
    cfg.update(PATCH_SIDE=side, COMBINE_USED=how, MODE="score" if MODEL else "train",
               CANDIDATES_FILE=os.path.abspath(cand_path))
    save_config(cfg, out_dir)
    model = keras.saving.load_model(model_path, compile=False)
    if tuple(model.input_shape[1:4]) != (side,) * 3:
        raise SystemExit(f"{model_path}: takes patches of {model.input_shape[1:4]}, PATCH_MM / VOXEL_MM give {side}")
    table = CandidateTable([cand_path])
    n_train_failed = len(failed)
    t0 = time.time()
    ev_before, ev_after, timing = score_scans(model, model_path, paths, table, side, how, out_dir, failed, cfg)
    timing["scoring_seconds"] = time.time() - t0
    m_after, c_after = ev_after.summary(SIZE_BINS, FROC_RATES)
    m_before, c_before = ev_before.summary(SIZE_BINS, FROC_RATES) if ev_before is not None else (None, None)
    timing["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    timing["total_seconds"] = time.time() - t_start
    if record is not None:
        timing["train_seconds"] = record["train_seconds"]
    result = {
        "scans": SCANS, "n_scans": m_after["n_scans"], "n_scans_failed": len(failed) - n_train_failed,
        "n_nodules": m_after["n_nodules"], "n_candidates": timing["n_candidates"],
        "candidates": os.path.abspath(cand_path), "model": os.path.abspath(model_path), "combine": how,
        "definition": "before: the candidates scored by their own probability (stage 5's; blob candidates, "
                      "BLOB_CANDIDATES > 0, by BLOB_SCORE); after: the same "
                      "candidates scored by COMBINE of stage 5's and stage 6's probabilities ('fp': stage 6 alone, "
                      "'product': their product, 'mean': their mean). Both through metrics.py: at most "
                      "MAX_CANDIDATES a scan, LUNA16's hit rule, FP/scan over every scan of the part (failed ones "
                      "included). before is null when the candidates have no probability (candidates_V2.csv).",
        "before": m_before, "after": m_after, "timing": timing, "training": record,
        "failed_scans": failed, "size_bins_mm": metrics.size_bin_names(SIZE_BINS),
    }
    import postprocess
    postprocess.write_json(os.path.join(out_dir, "metrics.json"), result)
    write_froc(os.path.join(out_dir, "froc.png"), c_before, c_after, m_before, m_after)
    cpm = lambda m: "n/a" if m is None or m["cpm"]["value"] is None else f"{m['cpm']['value']:.3f}"
    print(f"{m_after['n_scans']} scan(s), {m_after['n_nodules']} nodule(s), {timing['n_candidates']} candidates: "
          f"CPM {cpm(m_before)} -> {cpm(m_after)} (COMBINE={how}); scoring {timing['seconds_per_scan'] or 0:.2f} s/scan"
          + (f", training {record['train_seconds']:.0f} s" if record else "") + f" -> {out_dir}")
    print_table(m_before, m_after)
    if failed:
        print(f"{len(failed)} scan(s) failed: " + "; ".join(os.path.basename(f["path"]) for f in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
