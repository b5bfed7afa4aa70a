"""Stage 5: whole-scan inference, 3D nodule components and candidates, metrics, report and pictures.

Reads
    WORK_DIR/1_preprocessed/<seriesuid>.h5   stage-1 scans: /hu, /lung_mask, /nodule_mask, /nodules, geometry
    WORK_DIR/3_split/split.json              the scans of each part (SCANS="test"; not needed for SCANS="all")
    WORK_DIR/4_model/best.keras              the network (or --MODEL=any.keras) and config.json beside it
                                             (its input geometry: table.InputGeometry's PIXEL_MM, CROP_MM,
                                             CONTEXT_MM, CONTEXT_SLICES, or raw pixels with CROP)
Writes
    WORK_DIR/5_predictions/<seriesuid>.h5    /prob (Z, Y, X) nodule probability and /mask uint8 (Z, Y, X), in the
                                             voxel grid of stage 1's /hu: the network's output mapped back from
                                             its input grid (0 outside the area the input covers)
    WORK_DIR/5_predictions/<seriesuid>.nii.gz  the mask in the scan's geometry: opens over the CT in 3D Slicer
    WORK_DIR/6_report/metrics.json           every metric with its definition, overall and by nodule size
    WORK_DIR/6_report/nodules.csv            one row per truth nodule: found or not, Dice, diameter, probabilities
    WORK_DIR/6_report/candidates.csv         LUNA16 submission format: seriesuid, coordX, coordY, coordZ, probability
                                             (every component of prob > CANDIDATE_THRESHOLD, <= MAX_CANDIDATES a scan)
    WORK_DIR/6_report/candidates_detail.csv  the same candidates with voxel center, size and TP / FP / ignored
                                             ("no truth" for scans without annotations)
    WORK_DIR/6_report/froc.png               the FROC curve (overall and by size) with the CPM
    WORK_DIR/6_report/pictures/              overlays of found, missed and false nodules (scans without annotations:
                                             of the top candidates); mip/ per-scan projections
    WORK_DIR/6_report/config.json            the constants this run used
Run
    python postprocess.py                               # the test part of WORK_DIR=work with its best model
    python postprocess.py --SCANS=all --MODEL=other.keras --WORK_DIR=/data/run1
    python postprocess.py --BINARIZE=kmeans             # the thesis's binarisation, for reproduction only
    python postprocess.py --DASK_SCHEDULER=tcp://host:8786   # scans predicted on a dask cluster, report made here

Scans without annotations (preprocess.py --DATASET=scans with no ANNOTATIONS: stage-1 attribute annotated=0) have
no truth: their candidates are listed and drawn, metrics.json says "annotations": "none" and holds no sensitivity,
false positives, Dice, FROC or CPM (a run mixing both kinds measures the annotated scans only).

A scan is read, predicted, written and evaluated, then dropped: memory does not grow with the number of
scans. A scan that fails is reported in one line and skipped; the exit status is non-zero if any failed.
A prediction file made by the same model file with the same settings from the same stage-1 file (path, size,
modification time) is reused unless --OVERWRITE=1.

Two sets of 3D components come from a scan's probability: the mask's (prob > THRESHOLD: Dice, the operating
point's sensitivity and false positives per scan) and the candidates (prob > CANDIDATE_THRESHOLD, scored by
their maximum, at most MAX_CANDIDATES a scan: candidates.csv, FROC and CPM down to 8 FP/scan). Every metric is
computed by metrics.py (numpy only; ``evaluate_scan`` here only measures a scan's volumes and hands the small
results to it); the report and the tests use it and nothing else.
"""
import contextlib
import csv
import functools
import glob
import heapq
import json
import os
import sys
import threading
import time

import numpy as np
from scipy import ndimage

import ct_io
from configurator import configure, constants, save_config
from metrics import (detect, dice_counts, match_candidates, nodule_dice, summarize, thesis_found,
                     top_candidates)
from metrics import dice  # noqa: F401  (nasnet_v2_train.py and older code import dice, dice_counts from here)

# ----------------------------------------------------------------------------- settings
WORK_DIR = "work"               # root of a run; every stage's folder is below it
MODEL = ""                      # saved Keras model to evaluate; "" = WORK_DIR/4_model/best.keras
PRED_DIR = ""                   # "" = WORK_DIR/5_predictions
REPORT_DIR = ""                 # "" = WORK_DIR/6_report
MODEL_CONFIG = ""               # the model's input geometry (PIXEL_MM, CROP_MM, CONTEXT_MM, ...); "" = config.json beside MODEL
SCANS = "test"                  # "test" (or another part of 3_split/split.json), or "all" stage-1 scans
THRESHOLD = 0.5                 # a voxel is nodule when its probability is above this (mask, Dice, operating point)
CANDIDATE_THRESHOLD = 0.02      # candidates: components of prob above this; low, so the FROC reaches 8 FP/scan (0.02 vs
                                # 0.05 on a selection cohort: recall 37/51 vs 35/51, CPM after stage 6 0.591 vs 0.557)
MAX_CANDIDATES = 100            # candidates kept per scan, the highest scored (LUNA16's evaluation keeps at most 100)
CANDIDATE_PEAK = 0.5            # a candidate's center: center of mass of its voxels >= this fraction of its maximum
CANDIDATE_SPLIT_MM = 0.0        # > 0: every local maximum of a component (none higher within this many mm along each
                                # axis) is a candidate of its own, so a faint small nodule touching a vessel's component
                                # is not hidden behind the vessel's maximum; 0 = one candidate per component (measured on
                                # the selection cohort: same recall, CPM after stage 6 0.577 vs 0.591 at 0.02: off)
CANDIDATE_SPLIT_DIP = 0.3       # ... if the probability dips by this share of its maximum towards the nearest higher one
LUNG_GATE = True                # probability outside the stage-1 lung mask is set to 0 (the network's input is 0 there)
BINARIZE = "threshold"          # or "kmeans": the thesis's per-slice 2-cluster K-means + erosion (reproduction only)
KMEANS_EROSION = 3              # BINARIZE="kmeans": side in pixels of the square erosion element (0 = none)
BATCH_SIZE = 8                  # slices per prediction call
TTA = 4                         # test-time augmentation: mean over this many flips of the slice: 1 = none (thesis),
                                # 2 = + left-right, 4 = + up-down and both; inference time x TTA (4 vs 1 on the selection
                                # cohort: candidate recall 76.5 vs 72.5 %, CPM after stage 6 0.669 vs 0.591)
CONNECTIVITY = 3                # 3D components: 1 = 6 face neighbours, 2 = 18 (+edges), 3 = 26 (+corners)
MIN_COMPONENT_VOXELS = 1        # components with fewer voxels are removed from the mask and are no candidates
PROB_DTYPE = "float16"          # how /prob is stored: "float16" or "float32"
SIZE_BINS = (5.0, 10.0, 20.0)   # diameter bin edges in mm for the breakdowns: <5, 5-10, 10-20, >=20
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per scan where CPM reads the sensitivity
WRITE_NIFTI = True              # write each scan's mask as <seriesuid>.nii.gz in the scan's geometry
N_PICTURES = 8                  # overlay PNGs per kind: found, missed, false
PICTURE_HALF = 32               # half-width in pixels of an overlay's crop (grown for large nodules)
WRITE_MIP = True                # a maximum-intensity-projection montage of the probability per scan
OVERWRITE = False               # recompute predictions even when one from the same model, settings, stage-1 file exists
DASK_SCHEDULER = ""             # "" = scans predicted here, one after another; "tcp://host:8786" = each scan a task on
                                # that dask cluster (each worker loads the model once), the report made here

LUNG_WINDOW = (-1000, 400)      # HU range shown in pictures

COMPONENT_DTYPE = np.dtype([("label", np.int32), ("n_voxels", np.int64), ("center_z", np.float64),
                            ("center_y", np.float64), ("center_x", np.float64), ("prob", np.float32)])


# ----------------------------------------------------------------------------- components and candidates

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


def find_candidates(prob, threshold=None, max_candidates=None, min_voxels=1, connectivity=3, peak=None,
                    split_mm=None, spacing_zyx=(1.0, 1.0, 1.0)):
    """The candidates of one scan -> array of COMPONENT_DTYPE, highest probability first.

    Candidates are the 3D components of prob > ``threshold`` (default CANDIDATE_THRESHOLD) of at least
    ``min_voxels`` voxels, each scored by the maximum probability inside it; at most ``max_candidates``
    (default MAX_CANDIDATES) are kept, the highest scored, by LUNA16's rule (metrics.top_candidates). A
    candidate's center is the center of mass of its voxels with probability >= ``peak`` (default
    CANDIDATE_PEAK) times its maximum, so a faint halo or a touching vessel does not pull it off its nodule;
    n_voxels counts the whole component; label is its number among the components at that threshold.

    ``split_mm`` > 0 (default CANDIDATE_SPLIT_MM): each local maximum of a component (a voxel no lower than any
    within +-split_mm / 2 along each axis, ``spacing_zyx`` in mm; a plateau counts once; kept if the probability
    dips by CANDIDATE_SPLIT_DIP of its value towards the nearest higher maximum of its component) is a candidate,
    scored by its probability: a faint nodule touching a vessel's component becomes a candidate of its own, the
    ripples on a large nodule's flat top do not. The component is divided between its kept maxima by a
    watershed of the probability; a candidate is centred on its part's voxels >= ``peak`` x its maximum, and
    n_voxels counts its part."""
    threshold = CANDIDATE_THRESHOLD if threshold is None else threshold
    max_candidates = MAX_CANDIDATES if max_candidates is None else max_candidates
    peak = CANDIDATE_PEAK if peak is None else peak
    split_mm = CANDIDATE_SPLIT_MM if split_mm is None else split_mm
    prob = np.asarray(prob)
    structure = ndimage.generate_binary_structure(3, connectivity)
    labels, n = ndimage.label(prob > threshold, structure=structure)
    if n == 0:
        return np.zeros(0, COMPONENT_DTYPE)
    fg = labels > 0
    lab = labels[fg]
    sizes = np.bincount(lab, minlength=n + 1)[1:]
    if split_mm > 0:
        return _split_candidates(prob, labels, sizes, max_candidates, min_voxels, split_mm, spacing_zyx, peak)
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


def _split_candidates(prob, labels, sizes, max_candidates, min_voxels, split_mm, spacing_zyx, peak):
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
    # a maximum is kept when the probability dips by at least SPLIT_DIP of its value on the straight line to the
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
        alive[j] = scores[j] - low >= CANDIDATE_SPLIT_DIP * scores[j]
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


def evaluate_scan(prob, mask, nodule_mask, nodules, origin, spacing, direction, seriesuid="",
                  min_voxels=1, connectivity=3, components=None, candidates=None):
    """One scan's prediction against its truth -> dict of small, poolable results (no volumes), the input of
    metrics.summarize: seriesuid; components (COMPONENT_DTYPE, the mask's 3D components) with component_world
    (N, 3) x, y, z mm, is_fp, is_ignored (N,); candidates (the FROC's, COMPONENT_DTYPE) with candidate_world,
    candidate_is_fp, candidate_is_ignored; nodules: one dict per included truth nodule; dice_counts (all slices)
    and dice_counts_nodule_slices. ``components`` = (labels, comps) from find_components, to skip labelling
    again; ``candidates`` from find_candidates (found here from ``prob`` with this file's settings if not given)."""
    prob = np.asarray(prob)
    mask = np.asarray(mask) > 0
    nodule_mask = np.asarray(nodule_mask)
    nodules = np.asarray(nodules, dtype=ct_io.NODULE_DTYPE).reshape(-1)
    labels, comps = components if components is not None else find_components(mask, prob, min_voxels, connectivity)
    if candidates is None:
        candidates = find_candidates(prob, min_voxels=min_voxels, connectivity=connectivity)
    mask = labels > 0
    nod_world = np.stack([nodules["world_x"], nodules["world_y"], nodules["world_z"]], axis=1)
    excluded = nodules["excluded"].astype(bool)

    def world(c):
        centers = np.stack([c["center_z"], c["center_y"], c["center_x"]], axis=1)
        return ct_io.voxel_to_world(centers, origin, spacing, direction).reshape(-1, 3)

    comp_world, cand_world = world(comps), world(candidates)
    hits = match_candidates(comp_world, nod_world, nodules["diameter_mm"])
    found, _, is_fp, is_ignored = detect(hits, comps["prob"], excluded)
    cand_hits = match_candidates(cand_world, nod_world, nodules["diameter_mm"])
    _, score, cand_fp, cand_ignored = detect(cand_hits, candidates["prob"], excluded)
    n_hits = hits.sum(axis=0)
    included = np.nonzero(~excluded)[0]
    dices = nodule_dice(labels, nodule_mask, nodules["index"][included],
                        np.concatenate([[0], comps["n_voxels"]]))
    objects = ndimage.find_objects(nodule_mask)
    rows = []
    for j, m in enumerate(included):
        n = nodules[m]
        k = int(n["index"])
        box = objects[k - 1] if 0 < k <= len(objects) else None
        if box is not None:
            truth = nodule_mask[box] == k
            n_truth, max_prob = int(np.count_nonzero(truth)), float(prob[box][truth].max())
        else:
            n_truth, max_prob = 0, float("nan")
        rows.append({"seriesuid": seriesuid, "index": k, "world_x": float(n["world_x"]),
                     "world_y": float(n["world_y"]), "world_z": float(n["world_z"]),
                     "center_z": float(n["center_z"]), "center_y": float(n["center_y"]),
                     "center_x": float(n["center_x"]), "diameter_mm": float(n["diameter_mm"]),
                     "label_voxels": n_truth,
                     "found": bool(found[m]), "n_hits": int(n_hits[m]),
                     "found_thesis_rule": bool(box is not None and thesis_found(mask, nodule_mask, k, n["center_z"])),
                     "dice": float(dices[j]), "max_prob": max_prob, "candidate_prob": float(score[m]),
                     "found_by_candidate": bool(np.isfinite(score[m]))})
    truth_all = nodule_mask > 0
    with_truth = np.nonzero(truth_all.any(axis=(1, 2)))[0]
    return {"seriesuid": seriesuid, "components": comps, "component_world": comp_world,
            "is_fp": is_fp, "is_ignored": is_ignored,
            "candidates": candidates, "candidate_world": cand_world, "candidate_is_fp": cand_fp,
            "candidate_is_ignored": cand_ignored, "nodules": rows,
            "n_excluded": int(excluded.sum()),
            "dice_counts": dice_counts(mask, truth_all),
            "dice_counts_nodule_slices": dice_counts(mask[with_truth], truth_all[with_truth])}


# ----------------------------------------------------------------------------- binarisation

def kmeans_binarize(prob, erosion=3, box=None):
    """The thesis's binarisation, slice by slice: 2-cluster K-means on the slice's probabilities (inside ``box``,
    the network's crop), threshold = mean of the two centers, then a square erosion of side ``erosion``.
    Like the original, a slice with any spread of values always yields a foreground."""
    out = np.zeros(prob.shape, bool)
    box = box or (slice(None), slice(None))
    element = np.ones((erosion, erosion), bool) if erosion > 1 else None
    for z in range(prob.shape[0]):
        v = np.sort(prob[z][box].astype(np.float64).ravel())
        if v.size == 0 or v[-1] - v[0] < 1e-12:
            continue
        csum = np.concatenate([[0.0], np.cumsum(v)])
        c0, c1 = v[0], v[-1]
        for _ in range(100):                     # Lloyd's iterations on sorted values, O(log n) each
            t = (c0 + c1) / 2.0
            k = int(np.searchsorted(v, t, side="right"))
            if k == 0 or k == v.size:
                break
            n0, n1 = csum[k] / k, (csum[-1] - csum[k]) / (v.size - k)
            if n0 == c0 and n1 == c1:
                break
            c0, c1 = n0, n1
        fg = prob[z][box] > (c0 + c1) / 2.0
        if element is not None:
            fg = ndimage.binary_erosion(fg, structure=element)
        out[z][box] = fg
    return out


def binarize(prob, method="threshold", threshold=0.5, erosion=3, box=None):
    if method == "threshold":
        return prob > threshold
    if method == "kmeans":
        return kmeans_binarize(prob, erosion, box)
    raise ValueError(f"BINARIZE={method!r}: expected 'threshold' or 'kmeans'")


# ----------------------------------------------------------------------------- model and inference

def _read_json(path):
    with open(path) as f:
        return json.load(f)


def rebuild_model(model, input_shape):
    """The same network as ``model`` (built by nasnet_v2.get_model) at another fixed input (H, W, C), with
    ``model``'s weights. The networks are fully convolutional, but their upsampling layers are built for
    exact sizes, so a model trained on crops of another size is rebuilt for the slices it must predict."""
    import nasnet_v2
    name = model.name
    if name == "unet":
        layer_names = [l.name for l in model.layers]
        kw = dict(variant="unet", base_filters=int(model.get_layer("enc0a_conv").filters),
                  depth=sum(1 for n in layer_names if n.startswith("pool")))
    elif name.startswith("nasnet_v2_") and name[len("nasnet_v2_"):] in nasnet_v2.VARIANTS:
        kw = dict(variant=name[len("nasnet_v2_"):])
    else:
        raise ValueError(f"model {name!r} has a fixed input {model.input_shape[1:3]} and is not a nasnet_v2 "
                         "network that could be rebuilt at the slices' size")
    new = nasnet_v2.get_model(tuple(int(v) for v in input_shape), bn_momentum=None, **kw)
    new.set_weights(model.get_weights())        # same architecture: same weights in the same order
    return new


class Predictor:
    """The network, loaded on first use, and the input geometry it was trained with (table.InputGeometry:
    PIXEL_MM, CROP_MM, CONTEXT_MM, or raw pixels with CROP; CONTEXT_SLICES): from ``config_path`` (default
    config.json beside the model), else from the slice table's attributes (WORK_DIR/2_table/slices.h5), else
    table.py's raw-pixel defaults and the model's input channels. A raw-pixel model (PIXEL_MM = 0) applied to
    a scan whose pixels are outside the range it was trained on (PIXEL_MM_RANGE) is named in one line.
    ``tta``: how many flips of each input are averaged (1, 2 or 4: see TTA)."""

    def __init__(self, model_path, config_path="", table_path="", tta=1):
        import table
        if tta not in (1, 2, 4):
            raise ValueError(f"TTA must be 1, 2 or 4, got {tta!r}")
        self.table, self.model_path, self.tta = table, model_path, int(tta)
        config_path = config_path or os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
        cfg = _read_json(config_path) if os.path.isfile(config_path) else {}
        if "CROP" not in cfg and table_path and os.path.isfile(table_path):
            cfg = {k.upper(): v for k, v in table.table_settings(table_path).items()}
        self.crop = int(cfg.get("CROP", table.CROP))
        self.pixel_mm = float(cfg.get("PIXEL_MM", 0.0))           # models from before millimetre input: raw pixels
        self.crop_mm = float(cfg.get("CROP_MM", 0.0))
        self.context_mm = float(cfg.get("CONTEXT_MM", 0.0))
        self.pixel_range = cfg.get("PIXEL_MM_RANGE")               # raw-pixel models: pixel sizes trained on
        self.context = int(cfg["CONTEXT_SLICES"]) if "CONTEXT_SLICES" in cfg else None   # None: the model's channels
        self._context_cfg = self.context
        self._loaded, self._models = None, {}
        self.load_seconds = 0.0           # time spent loading / rebuilding the model (not inference)
        self.outside_range = []           # scans a raw-pixel model was applied to outside its pixel range

    def signature(self):
        """What identifies a prediction: the model file (path, size, time) and the input settings."""
        st = os.stat(self.model_path)
        return {"model": os.path.abspath(self.model_path), "model_bytes": st.st_size,
                "model_mtime_ns": st.st_mtime_ns, "crop": self.crop, "context_slices": self._context_cfg,
                "pixel_mm": self.pixel_mm, "crop_mm": self.crop_mm, "context_mm": self.context_mm,
                **({"tta": self.tta} if self.tta > 1 else {})}

    def geometry(self, shape, spacing=None):
        """The table.InputGeometry of a scan of ``shape`` (Z, Y, X) and (x, y, z) ``spacing`` for this model."""
        return self.table.InputGeometry(shape, spacing, self.crop, self.context or 1, self.pixel_mm,
                                        self.crop_mm, self.context_mm)

    def model_for(self, hw):
        """A model taking (h, w) slices: the saved one when its input size is free or equal, else rebuilt."""
        hw = tuple(int(v) for v in hw)
        if hw not in self._models:
            t0 = time.perf_counter()
            if self._loaded is None:
                import keras
                try:
                    import nasnet_v2  # noqa: F401  (registers the loss and metric of compiled models)
                except ImportError:
                    pass
                try:
                    self._loaded = keras.saving.load_model(self.model_path, compile=False)
                except Exception as e:            # not a scan's fault: stop the run with one line
                    msg = (str(e).strip().splitlines() or [""])[0][:200]
                    raise SystemExit(f"{self.model_path}: cannot load the model ({type(e).__name__}: {msg})") from None
            model = self._loaded
            shape = model.input_shape
            if tuple(shape[1:3]) not in ((None, None), hw):
                model = rebuild_model(model, (hw[0], hw[1], shape[-1]))
            if self.context is None:
                self.context = int(shape[-1])
            if shape[-1] != self.context:
                raise ValueError(f"{self.model_path}: the model takes {shape[-1]} channel(s), CONTEXT_SLICES is "
                                 f"{self.context}")
            self._models[hw] = model
            self.load_seconds += time.perf_counter() - t0
        return self._models[hw]

    def _check_pixels(self, spacing):
        """One line when a raw-pixel model meets a scan whose pixel size it was not trained on (> 10 % off)."""
        if self.pixel_mm > 0 or not self.pixel_range or spacing is None:
            return
        lo, hi = (float(v) for v in self.pixel_range)
        from tqdm import tqdm
        px = float(spacing[0])
        if not 0.9 * lo <= px <= 1.1 * hi:
            if not self.outside_range:
                tqdm.write(f"{self.model_path}: a raw-pixel model (PIXEL_MM=0) trained on {lo:.2f}-{hi:.2f} mm "
                           f"pixels is applied to {px:.2f} mm pixels: nodules look {px and lo / px:.1f}-"
                           f"{px and hi / px:.1f}x their training size (retrain with PIXEL_MM > 0)", file=sys.stderr)
            self.outside_range.append(px)

    def _forward(self, model, x):
        """Nodule probability (B, h, w) of a batch of inputs (B, h, w, C): the mean over the first ``tta``
        of (as is, left-right, up-down, both), each flipped back."""
        total = None
        for axes in ((), (2,), (1,), (1, 2))[:self.tta]:
            xi = np.ascontiguousarray(np.flip(x, axes)) if axes else x
            y = np.asarray(model.predict_on_batch(xi))
            if y.ndim == 4:
                y = y[..., 1] if y.shape[-1] >= 2 else y[..., 0]
            y = np.flip(y, axes) if axes else y
            total = y.astype(np.float32) if total is None else total + y
        return total / self.tta if self.tta > 1 else total

    def predict(self, hu, lung_mask, batch_size=8, spacing=None, lung_slices_only=False):
        """Nodule probability float32 (Z, Y, X) on the scan's full voxel grid (0 outside what the input covers)
        and the scan pixels the input covers as (row slice, column slice). The inputs come from
        table.volume_inputs (the table's own code); the output is mapped back by the same InputGeometry.
        ``lung_slices_only``: slices without lung inside the input's box are not predicted (0), which is what
        the lung gate would make of them anyway."""
        self._check_pixels(spacing)
        g = self.geometry(hu.shape, spacing)
        y0, x0, bh, bw = g.box
        box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
        model = self.model_for((g.h, g.w))
        prob = np.zeros(hu.shape, np.float32)
        slices = None
        if lung_slices_only:
            slices = np.nonzero(np.asarray(lung_mask[:, box[0], box[1]]).reshape(hu.shape[0], -1).any(axis=1))[0]
            if not len(slices):
                return prob, box
        for zs, x in self.table.volume_inputs(hu, lung_mask, self.crop, self.context, batch_size, spacing,
                                              self.pixel_mm, self.crop_mm, self.context_mm, slices):
            y = self._forward(model, x)
            if y.shape[1:] != (g.h, g.w):
                raise ValueError(f"model output {y.shape[1:]} differs from its input {(g.h, g.w)}")
            prob[zs] = np.clip(g.to_scan(y), 0.0, 1.0)
        return prob, box


# ----------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic(path):
    """Yield a temporary name beside ``path`` (same extension); renamed to ``path`` only when the block succeeds."""
    folder, name = os.path.split(path)
    stem, ext = (name[:-7], ".nii.gz") if name.endswith(".nii.gz") else os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.tmp{os.getpid()}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_prediction(path, prob, mask, attrs):
    """/prob and /mask (one chunk per slice, zlib: readable by h5py, PyTables, MATLAB) and ``attrs``."""
    import tables
    filters = tables.Filters(complevel=1, complib="zlib", shuffle=True)
    with atomic(path) as tmp:
        with tables.open_file(tmp, "w") as h5:
            for name, arr in (("prob", prob), ("mask", mask)):
                h5.create_carray("/", name, obj=arr, filters=filters, chunkshape=(1,) + arr.shape[1:])
            for k, v in attrs.items():
                setattr(h5.root._v_attrs, k, v)


def read_prediction(path):
    """A stage-5 file -> (prob, mask, attrs)."""
    import tables
    with tables.open_file(path, "r") as h5:
        a = h5.root._v_attrs
        return h5.root.prob.read(), h5.root.mask.read(), {k: a[k] for k in a._v_attrnamesuser}


def write_mask_image(path, mask, origin, spacing, direction):
    """The mask as an image file (.nii.gz, .mha, ...) in the scan's geometry (ITK x, y, z order)."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(np.ascontiguousarray(mask, np.uint8))
    img.SetOrigin([float(v) for v in origin])
    img.SetSpacing([float(v) for v in spacing])
    img.SetDirection([float(v) for v in np.asarray(direction).reshape(-1)])
    with atomic(path) as tmp:
        sitk.WriteImage(img, tmp, True)


def write_csv(path, rows, fields):
    with atomic(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def write_json(path, obj):
    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if not k.startswith("_")}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (float, np.floating)):
            return None if not np.isfinite(o) else float(o)
        if isinstance(o, np.integer):
            return int(o)
        return o
    with atomic(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(clean(obj), f, indent=2)


def scan_list(work_dir, part):
    """Stage-1 files of the scans in ``part`` ('all', or a part of 3_split/split.json) -> list of paths."""
    folder = os.path.join(work_dir, "1_preprocessed")
    if part == "all":
        if not os.path.isdir(folder):
            raise SystemExit(f"{folder}: no stage-1 folder (run preprocess.py)")
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".h5"))
    split_path = os.path.join(work_dir, "3_split", "split.json")
    if not os.path.isfile(split_path):
        raise SystemExit(f"{split_path}: no split (run slice_idx.py, or use --SCANS=all)")
    split = _read_json(split_path)
    uids = _series_of_part(split, part)
    if uids is None:
        raise SystemExit(f"{split_path}: no part {part!r} with its series")
    return [os.path.join(folder, f"{uid}.h5") for uid in uids]


def _series_of_part(split, part):
    """The series uids of one part in split.json; tolerant of {'test': {'series': [...]}} and
    {'series': {'test': [...]}} layouts."""
    entry = split.get(part)
    if isinstance(entry, dict):
        for key in ("series", "seriesuids", "series_uids"):
            if key in entry:
                return sorted(entry[key])
    for key in ("series", "seriesuids", "series_uids"):
        if isinstance(split.get(key), dict) and part in split[key]:
            return sorted(split[key][part])
    return None


# ----------------------------------------------------------------------------- pictures

class PictureBook:
    """Keeps, while scans stream past, small crops for the N most telling overlays of each kind (found and
    missed: the largest nodules; false: the most probable components) and draws them at the end. Memory is
    bounded by N crops per kind, whatever the number of scans."""

    def __init__(self, n, half):
        self.n, self.half, self.count = n, half, 0
        self.heaps = {"found": [], "missed": [], "false": [], "candidate": []}   # candidate: scans without truth

    def offer(self, kind, priority, hu, prob, mask, nodule_mask, center_zyx, spacing, diameter_mm, title):
        if self.n <= 0:
            return
        heap = self.heaps[kind]
        if len(heap) >= self.n and priority <= heap[0][0]:
            return
        z, y, x = (int(round(v)) for v in center_zyx)
        z = min(max(z, 0), hu.shape[0] - 1)
        half = max(self.half, int(np.ceil(1.5 * diameter_mm / float(spacing[1]))) if diameter_mm > 0 else 0)
        ys = slice(max(y - half, 0), min(y + half, hu.shape[1]))
        xs = slice(max(x - half, 0), min(x + half, hu.shape[2]))
        rec = {"hu": hu[z, ys, xs].copy(), "prob": np.asarray(prob[z, ys, xs], np.float32),
               "mask": mask[z, ys, xs] > 0, "truth": nodule_mask[z, ys, xs] > 0, "title": f"{title}\nslice z={z}"}
        self.count += 1
        item = (priority, self.count, rec)
        heapq.heappush(heap, item) if len(heap) < self.n else heapq.heapreplace(heap, item)

    def draw(self, folder):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from skimage import measure
        os.makedirs(folder, exist_ok=True)
        written = []
        for kind, heap in self.heaps.items():
            for rank, (_, _, rec) in enumerate(sorted(heap, key=lambda t: -t[0])):
                fig, axes = plt.subplots(1, 2, figsize=(7, 3.8))
                axes[0].imshow(rec["hu"], cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1])
                for c in measure.find_contours(rec["truth"].astype(float), 0.5):
                    axes[0].plot(c[:, 1], c[:, 0], color="lime", lw=1.2)
                for c in measure.find_contours(rec["mask"].astype(float), 0.5):
                    axes[0].plot(c[:, 1], c[:, 0], color="red", lw=1.2, ls="--")
                axes[0].set_title("CT, prediction (red): no truth" if kind == "candidate" else
                                  "CT, truth (green), prediction (red)", fontsize=8)
                im = axes[1].imshow(rec["prob"], cmap="magma", vmin=0, vmax=1)
                axes[1].set_title("nodule probability", fontsize=8)
                fig.colorbar(im, ax=axes[1], fraction=0.046)
                for ax in axes:
                    ax.axis("off")
                fig.suptitle(rec["title"], fontsize=8)
                path = os.path.join(folder, f"{kind}_{rank:02d}.png")
                with atomic(path) as tmp:
                    fig.savefig(tmp, dpi=100, format="png")
                plt.close(fig)
                written.append(path)
        return written


def write_mip(path, hu, prob, nodules, comps, seriesuid, spacing):
    """Axial and coronal maximum-intensity projections of the probability over the mean CT (lung window);
    truth centers circled green, the mask's components' centers marked cyan. Coronal: z drawn upwards, to scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    keep = [(n["center_z"], n["center_y"], n["center_x"]) for n in nodules if not n["excluded"]]
    for ax, axis, name in ((axes[0], 0, "axial (max over z)"), (axes[1], 1, "coronal (max over y)")):
        ct = np.zeros(hu.shape[:axis] + hu.shape[axis + 1:], np.float64)
        for z in range(hu.shape[0]):                       # slice by slice: no float copy of the volume
            s = np.clip(hu[z], *LUNG_WINDOW)
            if axis == 0:
                ct += s
            else:
                ct[z] = s.mean(axis=0)
        ct = ct / hu.shape[0] if axis == 0 else ct
        p = np.max(prob, axis=axis).astype(np.float32)
        view = dict(origin="upper", aspect=1.0) if axis == 0 else \
            dict(origin="lower", aspect=float(spacing[2]) / float(spacing[0]))
        ax.imshow(ct, cmap="gray", **view)
        ax.imshow(np.ma.masked_less(p, 0.05), cmap="autumn", vmin=0, vmax=1, alpha=0.6, **view)
        for cz, cy, cx in keep:
            ax.plot(cx, cy if axis == 0 else cz, "o", mfc="none", mec="lime", ms=12)
        for c in comps:
            ax.plot(c["center_x"], c["center_y"] if axis == 0 else c["center_z"], "x", color="cyan", ms=6)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{seriesuid}: probability MIP (>= 0.05), {'truth (green o), ' if keep else ''}components (cyan x)",
                 fontsize=9)
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def froc_xy(curve, rates):
    """A FROC curve's points as drawn (x, y): extended flat beyond its end to the last rate, and the x below the
    first rate drawn at half of it (the log axis), as the sensitivities are interpolated."""
    x = np.concatenate([curve["fps"], [max(rates[-1], curve["fps"][-1])]])
    y = np.concatenate([curve["sens"], [curve["sens"][-1]]])
    return np.maximum(x, rates[0] / 2), y


def froc_axes(ax, rates, title, title_size=10, **legend):
    """The FROC plot's axes: log2 false positives per scan around ``rates``, sensitivity 0-1, grid, legend."""
    ax.set_xscale("log", base=2)
    ax.set_xlim(rates[0] / 2, rates[-1] * 2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=title_size)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(**legend)


def write_froc(path, curves, metrics):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rates = np.asarray(FROC_RATES)
    for name, c in curves.items():
        if not np.isfinite(c["sens"]).all() or len(c["sens"]) == 0:
            continue
        style = dict(lw=2.2, color="black") if name == "all" else dict(lw=1.0)
        ax.plot(*froc_xy(c, rates), label=f"{name}: CPM {c['cpm']:.3f}", **style)
        if name == "all":
            ax.plot(rates, c["sensitivities"], "o", color="black")
    froc_axes(ax, rates, f"FROC over {metrics['froc']['n_scans']} scans, {metrics['n_nodules']} nodules, "
                         f"{metrics['n_candidates']} candidates", title_size=10, fontsize=8, loc="lower right")
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- the run

def file_signature(path):
    """What identifies a stage-1 file for the prediction cache: its path, size and modification time (ns); a
    preprocess rerun writes a new file, so old predictions are not reused for it."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def process_scan(path, predictor, pred_dir, book, mip_dir):
    """Predict (or reuse), write and evaluate one scan -> (evaluate_scan's result, seconds of inference or None)."""
    scan = ct_io.read_stage1(path)
    a = scan["attrs"]
    uid = str(a["seriesuid"])
    origin, spacing, direction = a["origin"], a["spacing"], a["direction"]
    hu, lung = scan["hu"], scan["lung_mask"]
    out = os.path.join(pred_dir, f"{uid}.h5")
    key = json.dumps({**predictor.signature(), "threshold": THRESHOLD, "binarize": BINARIZE,
                      "kmeans_erosion": KMEANS_EROSION, "min_component_voxels": MIN_COMPONENT_VOXELS,
                      "connectivity": CONNECTIVITY, "prob_dtype": PROB_DTYPE, "lung_gate": LUNG_GATE,
                      "stage1": file_signature(path)}, sort_keys=True)
    seconds, prob = None, None
    if not OVERWRITE and os.path.isfile(out):
        try:
            p, m, old = read_prediction(out)
            if old.get("key") == key and p.shape == hu.shape:
                prob, mask = p.astype(np.float32), m
        except Exception:
            prob = None
    if prob is None:
        t0, load0 = time.perf_counter(), predictor.load_seconds
        prob, box = predictor.predict(hu, lung, BATCH_SIZE, spacing, lung_slices_only=LUNG_GATE)
        if LUNG_GATE:
            prob[lung == 0] = 0.0
        seconds = time.perf_counter() - t0 - (predictor.load_seconds - load0)
        prob = prob.astype(PROB_DTYPE).astype(np.float32)     # from here on exactly what /prob stores
        raw = binarize(prob, BINARIZE, THRESHOLD, KMEANS_EROSION, box)
        labels, comps = find_components(raw, prob, MIN_COMPONENT_VOXELS, CONNECTIVITY)
        mask = (labels > 0).astype(np.uint8)
        write_prediction(out, prob.astype(PROB_DTYPE), mask,
                         {"seriesuid": uid, "key": key, "threshold": THRESHOLD, "binarize": BINARIZE,
                          "model": os.path.abspath(predictor.model_path),
                          "crop_box_y0_x0_h_w": np.array([box[0].start, box[1].start, box[0].stop - box[0].start,
                                                          box[1].stop - box[1].start], np.int64),
                          "origin": np.asarray(origin, np.float64), "spacing": np.asarray(spacing, np.float64),
                          "direction": np.asarray(direction, np.float64), "inference_seconds": seconds})
    else:
        labels, comps = find_components(mask, prob, MIN_COMPONENT_VOXELS, CONNECTIVITY)
    if WRITE_NIFTI:
        write_mask_image(os.path.join(pred_dir, f"{uid}.nii.gz"), mask, origin, spacing, direction)
    cands = find_candidates(prob, CANDIDATE_THRESHOLD, MAX_CANDIDATES, MIN_COMPONENT_VOXELS, CONNECTIVITY,
                            CANDIDATE_PEAK, CANDIDATE_SPLIT_MM, tuple(float(v) for v in spacing[::-1]))
    res = evaluate_scan(prob, mask, scan["nodule_mask"], scan["nodules"], origin, spacing, direction, uid,
                        components=(labels, comps), candidates=cands)
    res["n_slices"] = int(hu.shape[0])
    res["annotated"] = bool(int(a.get("annotated", 1)))      # 0: no annotations given: no truth to measure against
    nod = scan["nodules"]
    if not res["annotated"]:
        for c, xyz in zip(cands, res["candidate_world"]):
            book.offer("candidate", float(c["prob"]), hu, prob, mask, scan["nodule_mask"],
                       (c["center_z"], c["center_y"], c["center_x"]), spacing, 0.0,
                       f"candidate: {uid}\nprob {c['prob']:.2f}, {c['n_voxels']} voxels, "
                       f"world x, y, z {xyz[0]:.1f}, {xyz[1]:.1f}, {xyz[2]:.1f} mm (LPS)")
        if WRITE_MIP:
            write_mip(os.path.join(mip_dir, f"{uid}.png"), hu, prob, nod, comps, uid, spacing)
        return res, seconds
    incl = nod[nod["excluded"] == 0]
    for r, n in zip(res["nodules"], incl):
        kind = "found" if r["found"] else "missed"
        book.offer(kind, r["diameter_mm"], hu, prob, mask, scan["nodule_mask"],
                   (n["center_z"], n["center_y"], n["center_x"]), spacing, r["diameter_mm"],
                   f"{kind}: {uid}\nnodule {r['index']}, {r['diameter_mm']:.1f} mm, "
                   f"max prob {r['max_prob']:.2f}, Dice {r['dice']:.2f}")
    for c in comps[res["is_fp"]]:
        book.offer("false", float(c["prob"]), hu, prob, mask, scan["nodule_mask"],
                   (c["center_z"], c["center_y"], c["center_x"]), spacing, 0.0,
                   f"false positive: {uid}\n{c['n_voxels']} voxels, prob {c['prob']:.2f}")
    if WRITE_MIP:
        write_mip(os.path.join(mip_dir, f"{uid}.png"), hu, prob, nod, comps, uid, spacing)
    return res, seconds


def no_truth_summary(results, n_failed=0):
    """metrics.json for scans without annotations: what was found, and no figure that needs a truth."""
    per_scan = {}
    for r in results:
        p = np.asarray(r["candidates"]["prob"], np.float64)
        per_scan[r["seriesuid"]] = {"n_candidates": int(len(p)), "n_components": int(len(r["components"])),
                                    "max_probability": float(p.max()) if len(p) else None}
    return {"annotations": "none",
            "note": "no annotations were given (preprocess.py --DATASET=scans without --ANNOTATIONS): there is no "
                    "truth, so no sensitivity, false positives, Dice, FROC or CPM; candidates.csv lists what the "
                    "network found (world mm, ITK's LPS), pictures/candidate_*.png the most probable ones",
            "n_scans": len(results), "n_scans_failed": int(n_failed), "n_nodules": None,
            "n_components": int(sum(len(r["components"]) for r in results)),
            "n_candidates": int(sum(len(r["candidates"]) for r in results)),
            "component_definition": "3D components of prob > THRESHOLD (the mask written to 5_predictions)",
            "candidate_definition": "3D components of prob > CANDIDATE_THRESHOLD scored by their maximum "
                                    "probability (CANDIDATE_SPLIT_MM > 0: each local maximum of a component, "
                                    "scored by its probability), at most MAX_CANDIDATES a scan (candidates.csv)",
            "per_scan": per_scan}


def _scan_results(bar, predictor, pred_dir, book, mip_dir, cfg):
    """(path, a call returning process_scan's result or raising its error) per scan of ``bar`` (a tqdm over the
    paths), in path order: computed here when the call is made, or, with DASK_SCHEDULER, by the cluster's
    workers (_scan_on_worker), whose pictures, model loading time and pixel-range notes are added to
    ``book`` and ``predictor`` here."""
    if not DASK_SCHEDULER:
        for path in bar:
            yield path, functools.partial(process_scan, path, predictor, pred_dir, book, mip_dir)
        return
    from dask_tasks import run_on_cluster
    paths, a = list(bar.iterable), os.path.abspath          # absolute paths: the workers' folder may differ
    tasks = [(a(p), cfg, a(predictor.model_path), MODEL_CONFIG and a(MODEL_CONFIG),
              a(os.path.join(WORK_DIR, "2_table", "slices.h5")), a(pred_dir), a(mip_dir)) for p in paths]
    index = {t[0]: p for t, p in zip(tasks, paths)}
    done, next_i = {}, 0
    for task, out, err in run_on_cluster(DASK_SCHEDULER, _scan_on_worker, tasks, names=paths):
        bar.update(1)
        if err is None:
            status, value, extra = out
            _merge_pages(book, extra["pages"])
            predictor.load_seconds += extra["load_seconds"]
            predictor.outside_range += extra["outside_range"]
            predictor.context = predictor.context if predictor.context is not None else extra["context"]
        else:
            status, value = "failed", err
        done[index[task[0]]] = (status, value)
        while next_i < len(paths) and paths[next_i] in done:     # in path order, as the local run
            yield paths[next_i], functools.partial(_remote_outcome, *done.pop(paths[next_i]))
            next_i += 1
    bar.close()


def _remote_outcome(status, value):
    """A worker's outcome as the local call would have it: the result, or the one-line error raised again."""
    if status == "exit":
        raise SystemExit(value)
    if status == "failed":
        raise ct_io.ScanError(value)
    return value


_WORKER_PREDICTORS = {}         # on a dask worker: the Predictor of each model file, loaded once per worker process
_WORKER_LOCK = threading.Lock()


def _scan_on_worker(task):
    """One scan on a dask worker: process_scan with the run's settings and this worker's cached model ->
    (status 'done' / 'failed' / 'exit', (result, seconds) or the error line, the scan's pictures and notes)."""
    path, cfg, model_path, model_config, table_path, pred_dir, mip_dir = task
    globals().update(cfg)                             # the run's settings (THRESHOLD, ...) in this worker
    st = os.stat(model_path)
    key = (os.path.abspath(model_path), st.st_size, st.st_mtime_ns, model_config, table_path, TTA)
    with _WORKER_LOCK:
        if key not in _WORKER_PREDICTORS:
            _WORKER_PREDICTORS[key] = Predictor(model_path, model_config, table_path, TTA)
    predictor = _WORKER_PREDICTORS[key]
    load0, outside0 = predictor.load_seconds, len(predictor.outside_range)
    book = PictureBook(N_PICTURES, PICTURE_HALF)
    try:
        status, value = "done", process_scan(path, predictor, pred_dir, book, mip_dir)
    except SystemExit as e:
        status, value = "exit", str(e.code)
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        status, value = "failed", msg if isinstance(e, ct_io.ScanError) else f"{path}: {type(e).__name__}: {msg}"
    return status, value, {"pages": book.heaps, "load_seconds": predictor.load_seconds - load0,
                           "outside_range": predictor.outside_range[outside0:], "context": predictor.context}


def _merge_pages(book, pages):
    """Offer a worker's kept picture crops (PictureBook.heaps) to ``book``: it keeps its N best of each kind."""
    for kind, heap in pages.items():
        for priority, _, rec in heap:
            target = book.heaps[kind]
            if book.n <= 0 or (len(target) >= book.n and priority <= target[0][0]):
                continue
            book.count += 1
            item = (priority, book.count, rec)
            heapq.heappush(target, item) if len(target) < book.n else heapq.heapreplace(target, item)


def print_table(m):
    """The metrics by nodule size as plain-text tables (what `make demo` ends with): the operating point (the
    mask at THRESHOLD), then the FROC over the candidates: sensitivity at each rate, CPM, candidate recall."""
    def f(v, pct=True):
        return "  n/a" if v is None or not np.isfinite(v) else (f"{100 * v:5.1f}%" if pct else f"{v:5.3f}")
    bins = m["size_bins_mm"]
    print(f"{'diameter (mm)':>14} {'nodules':>8} {'found':>6} {'sensitivity':>12} {'nodule Dice':>12} "
          f"{'Dice found':>11} {'thesis rule':>12} {'CPM':>6}")
    for b in bins + ["all"]:
        s = m["sensitivity"]["by_size"][b] if b != "all" else m["sensitivity"]
        d = m["nodule_dice"]["by_size"][b] if b != "all" else m["nodule_dice"]["value"]
        t = m["sensitivity_thesis_rule"]["by_size"][b] if b != "all" else m["sensitivity_thesis_rule"]["value"]
        c = m["cpm"]["by_size"][b] if b != "all" else m["cpm"]["value"]
        g = m["nodule_dice_found"]["by_size"][b] if b != "all" else m["nodule_dice_found"]["value"]
        print(f"{b:>14} {s['total']:>8} {s['found']:>6} {f(s['value']):>12} {f(d):>12} {f(g):>11} {f(t):>12} "
              f"{f(c, False):>6}")
    print(f"false positives per scan {m['fp_per_scan']['value']:.2f} (at threshold {m.get('threshold')}); "
          f"slice Dice {f(m['slice_dice']['value'])} (pooled over all slices)")
    fr, rec = m["froc"], m["candidate_recall"]
    rates = [f"{r:g}" if r >= 1 else f"1/{round(1 / r)}" for r in fr["fp_rates"]]
    print(f"FROC: sensitivity at false positives per scan ({m['n_candidates']} candidates of prob > "
          f"{m.get('candidate_threshold')}, <= {m.get('max_candidates')} a scan; {fr['n_scans']} scans)")
    print(f"{'diameter (mm)':>14} {'nodules':>8} " + " ".join(f"{r:>6}" for r in rates) + f" {'CPM':>6} {'recall':>7}")
    for b in bins + ["all"]:
        s = fr["by_size"][b] if b != "all" else fr["sensitivities"]
        r = rec["by_size"][b] if b != "all" else rec
        c = m["cpm"]["by_size"][b] if b != "all" else m["cpm"]["value"]
        print(f"{b:>14} {r['total']:>8} " + " ".join(f"{f(v):>6}" for v in s) + f" {f(c, False):>6} "
              f"{f(r['value']):>7}")


def main(argv=None):
    defaults = constants(globals())
    try:
        cfg = configure(globals(), argv)
        return _run(cfg)
    finally:
        globals().update(defaults)      # a second main() in one process starts from the file's constants


def _run(cfg):
    import resource
    from tqdm import tqdm
    if BINARIZE not in ("threshold", "kmeans"):
        raise SystemExit(f"--BINARIZE={BINARIZE!r}: expected 'threshold' or 'kmeans'")
    if PROB_DTYPE not in ("float16", "float32"):
        raise SystemExit(f"--PROB_DTYPE={PROB_DTYPE!r}: expected 'float16' or 'float32'")
    model_path = MODEL or os.path.join(WORK_DIR, "4_model", "best.keras")
    if not os.path.isfile(model_path):
        raise SystemExit(f"{model_path}: model not found (train one with nasnet_v2_train.py, or give --MODEL=)")
    pred_dir = PRED_DIR or os.path.join(WORK_DIR, "5_predictions")
    report_dir = REPORT_DIR or os.path.join(WORK_DIR, "6_report")
    pic_dir, mip_dir = os.path.join(report_dir, "pictures"), os.path.join(report_dir, "pictures", "mip")
    for d in (pred_dir, report_dir, pic_dir, mip_dir):
        os.makedirs(d, exist_ok=True)
    stale = [p for d in (pred_dir, report_dir, pic_dir, mip_dir) for p in glob.glob(os.path.join(d, ".*.tmp*"))]
    for p in stale:                                    # atomic()'s temporary files, left by a killed run
        os.remove(p)
    if stale:
        print(f"removed {len(stale)} temporary file(s) left by an interrupted run", file=sys.stderr)
    paths = scan_list(WORK_DIR, SCANS)
    if not paths:
        raise SystemExit(f"no scans in part {SCANS!r} of {WORK_DIR}")
    predictor = Predictor(model_path, MODEL_CONFIG, os.path.join(WORK_DIR, "2_table", "slices.h5"), TTA)
    book = PictureBook(N_PICTURES, PICTURE_HALF)
    results, failed, timing = [], [], []
    bar = tqdm(paths, desc="postprocess", unit="scan")
    for path, scan_result in _scan_results(bar, predictor, pred_dir, book, mip_dir, cfg):
        try:
            res, seconds = scan_result()
        except SystemExit:
            raise
        except Exception as e:
            msg = " ".join(str(e).split())[:300]
            msg = msg if isinstance(e, ct_io.ScanError) else f"{path}: {type(e).__name__}: {msg}"
            tqdm.write(f"FAILED {msg}; skipped", file=sys.stderr)
            failed.append({"path": path, "error": msg})
            continue
        results.append(res)
        if seconds is not None:
            timing.append((seconds, res["n_slices"]))
        bar.set_postfix(nodules=sum(len(r["nodules"]) for r in results),
                        cands=sum(len(r["candidates"]) for r in results))

    truth = [r for r in results if r["annotated"]]
    if results and not truth:                          # no annotations at all: nothing to measure against
        metrics, curves = no_truth_summary(results, len(failed)), None
    else:
        metrics, curves = summarize(truth, SIZE_BINS, FROC_RATES, n_failed=len(failed))
        metrics["annotations"] = "given" if len(truth) == len(results) else "partial"
        if len(truth) < len(results):
            metrics["n_scans_without_annotations"] = len(results) - len(truth)
            metrics["note"] = (f"{len(results) - len(truth)} scan(s) had no annotations: the metrics are over "
                               f"the {len(truth)} annotated one(s); candidates.csv lists every scan's")
    metrics["model"] = os.path.abspath(model_path)
    metrics["scans"] = SCANS
    metrics["threshold"], metrics["binarize"] = THRESHOLD, BINARIZE
    metrics["candidate_threshold"], metrics["max_candidates"] = CANDIDATE_THRESHOLD, MAX_CANDIDATES
    metrics["candidate_split_mm"] = CANDIDATE_SPLIT_MM
    metrics["tta"] = predictor.tta                    # flips averaged per slice (what the timing below includes)
    metrics["failed_scans"] = failed
    metrics["input_geometry"] = {"pixel_mm": predictor.pixel_mm, "crop_mm": predictor.crop_mm,
                                 "context_mm": predictor.context_mm, "crop": predictor.crop,
                                 "context_slices": predictor.context, "trained_pixel_mm_range": predictor.pixel_range,
                                 "scans_outside_trained_pixel_range": len(predictor.outside_range)}
    metrics["timing"] = {"definition": "seconds of inference per scan (network inputs + prediction, TTA passes a "
                                       "slice, the first scan's graph tracing included, model loading not); peak "
                                       "resident memory "
                                       "of this process",
                         "model_load_seconds": predictor.load_seconds, "scans_predicted": len(timing),
                         "seconds_per_scan": float(np.mean([s for s, _ in timing])) if timing else None,
                         "seconds_per_slice": (float(sum(s for s, _ in timing) / sum(n for _, n in timing))
                                               if timing else None),
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    write_json(os.path.join(report_dir, "metrics.json"), metrics)
    nodule_fields = ["seriesuid", "index", "world_x", "world_y", "world_z", "diameter_mm", "size_bin", "found",
                     "found_thesis_rule", "n_hits", "dice", "max_prob", "candidate_prob", "found_by_candidate",
                     "label_voxels",
                     "center_z", "center_y", "center_x"]
    write_csv(os.path.join(report_dir, "nodules.csv"), [r for res in results for r in res["nodules"]], nodule_fields)
    cands, detail = [], []
    for res in results:
        for c, xyz, fp, ign in zip(res["candidates"], res["candidate_world"], res["candidate_is_fp"],
                                   res["candidate_is_ignored"]):
            row = {"seriesuid": res["seriesuid"], "coordX": f"{xyz[0]:.3f}", "coordY": f"{xyz[1]:.3f}",
                   "coordZ": f"{xyz[2]:.3f}", "probability": f"{float(c['prob']):.6f}"}
            cands.append(row)
            detail.append({**row, "n_voxels": int(c["n_voxels"]), "center_z": f"{c['center_z']:.2f}",
                           "center_y": f"{c['center_y']:.2f}", "center_x": f"{c['center_x']:.2f}",
                           "status": ("no truth" if not res["annotated"] else
                                      "FP" if fp else ("ignored" if ign else "TP"))})
    fields = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    write_csv(os.path.join(report_dir, "candidates.csv"), cands, fields)
    write_csv(os.path.join(report_dir, "candidates_detail.csv"), detail,
              fields + ["n_voxels", "center_z", "center_y", "center_x", "status"])
    if curves is not None:
        write_froc(os.path.join(report_dir, "froc.png"), curves, metrics)
    elif os.path.exists(os.path.join(report_dir, "froc.png")):
        os.remove(os.path.join(report_dir, "froc.png"))         # an earlier run's curve: not of these scans
    book.draw(pic_dir)
    save_config(cfg, report_dir)

    def pct(v):
        return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}%"
    m = metrics
    if curves is None:
        print(f"{len(results)} scan(s) without annotations: {m['n_candidates']} candidate(s) in "
              f"{os.path.join(report_dir, 'candidates.csv')} (world mm); no metrics (no truth)")
        if failed:
            print(f"{len(failed)} scan(s) failed: " + "; ".join(os.path.basename(f["path"]) for f in failed))
        return 1 if failed else 0
    cpm = "n/a (no nodules)" if m["cpm"]["value"] is None else f"{m['cpm']['value']:.3f}"
    print(f"{len(results)} scan(s), {m['n_nodules']} nodule(s): slice Dice {pct(m['slice_dice']['value'])}, "
          f"nodule Dice {pct(m['nodule_dice']['value'])}, sensitivity {pct(m['sensitivity']['value'])} at "
          f"{m['fp_per_scan']['value']:.2f} FP/scan (thesis rule {pct(m['sensitivity_thesis_rule']['value'])}), "
          f"CPM {cpm} -> {report_dir}" if results else "no scan evaluated")
    if results:
        print_table(m)
    if predictor.outside_range:
        print(f"{len(predictor.outside_range)} scan(s) had pixels outside the raw-pixel model's trained range "
              f"{predictor.pixel_range} mm: their results are not what the model would give at its own resolution")
    if failed:
        print(f"{len(failed)} scan(s) failed: " + "; ".join(os.path.basename(f["path"]) for f in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
