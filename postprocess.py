"""Stage 5: whole-scan inference, 3D nodule candidates, metrics, report and pictures.

Reads
    WORK_DIR/1_preprocessed/<seriesuid>.h5   stage-1 scans: /hu, /lung_mask, /nodule_mask, /nodules, geometry
    WORK_DIR/3_split/split.json              the scans of each part (SCANS="test"; not needed for SCANS="all")
    WORK_DIR/4_model/best.keras              the network (or --MODEL=any.keras) and config.json beside it
                                             (the CROP and CONTEXT_SLICES it was trained with)
Writes
    WORK_DIR/5_predictions/<seriesuid>.h5    /prob (Z, Y, X) nodule probability and /mask uint8 (Z, Y, X), in the
                                             voxel grid of stage 1's /hu (uncropped: 0 outside the network's crop)
    WORK_DIR/5_predictions/<seriesuid>.nii.gz  the mask in the scan's geometry: opens over the CT in 3D Slicer
    WORK_DIR/6_report/metrics.json           every metric with its definition, overall and by nodule size
    WORK_DIR/6_report/nodules.csv            one row per truth nodule: found or not, Dice, diameter, probabilities
    WORK_DIR/6_report/candidates.csv         LUNA16 submission format: seriesuid, coordX, coordY, coordZ, probability
    WORK_DIR/6_report/candidates_detail.csv  the same candidates with voxel center, size and TP / FP / ignored
    WORK_DIR/6_report/froc.png               the FROC curve (overall and by size) with the CPM
    WORK_DIR/6_report/pictures/              overlays of found, missed and false nodules; mip/ per-scan projections
    WORK_DIR/6_report/config.json            the constants this run used
Run
    python postprocess.py                               # the test part of WORK_DIR=work with its best model
    python postprocess.py --SCANS=all --MODEL=other.keras --WORK_DIR=/data/run1
    python postprocess.py --BINARIZE=kmeans             # the thesis's binarisation, for reproduction only

A scan is read, predicted, written and evaluated, then dropped: memory does not grow with the number of
scans. A scan that fails is reported in one line and skipped; the exit status is non-zero if any failed.
A prediction file made by the same model file with the same settings is reused unless --OVERWRITE=1.
The metric functions are plain numpy (``find_components``, ``match_candidates``, ``evaluate_scan``, ``froc``,
``summarize``, ...): the report and the tests use these and nothing else.
"""
import contextlib
import csv
import heapq
import json
import os
import sys
import time

import numpy as np
from scipy import ndimage

import ct_io
from configurator import configure, constants, save_config

# ----------------------------------------------------------------------------- settings
WORK_DIR = "work"               # root of a run; every stage's folder is below it
MODEL = ""                      # saved Keras model to evaluate; "" = WORK_DIR/4_model/best.keras
PRED_DIR = ""                   # "" = WORK_DIR/5_predictions
REPORT_DIR = ""                 # "" = WORK_DIR/6_report
MODEL_CONFIG = ""               # the training constants (CROP, CONTEXT_SLICES); "" = config.json beside MODEL
SCANS = "test"                  # "test" (or another part of 3_split/split.json), or "all" stage-1 scans
THRESHOLD = 0.5                 # a voxel is nodule when its probability is above this
LUNG_GATE = True                # probability outside the stage-1 lung mask is set to 0 (the network's input is 0 there)
BINARIZE = "threshold"          # or "kmeans": the thesis's per-slice 2-cluster K-means + erosion (reproduction only)
KMEANS_EROSION = 3              # BINARIZE="kmeans": side in pixels of the square erosion element (0 = none)
BATCH_SIZE = 8                  # slices per prediction call
CONNECTIVITY = 3                # 3D components: 1 = 6 face neighbours, 2 = 18 (+edges), 3 = 26 (+corners)
MIN_COMPONENT_VOXELS = 1        # components with fewer voxels are removed from the mask and are no candidates
PROB_DTYPE = "float16"          # how /prob is stored: "float16" or "float32"
SIZE_BINS = (5.0, 10.0, 20.0)   # diameter bin edges in mm for the breakdowns: <5, 5-10, 10-20, >=20
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per scan where CPM reads the sensitivity
WRITE_NIFTI = True              # write each scan's mask as <seriesuid>.nii.gz in the scan's geometry
N_PICTURES = 8                  # overlay PNGs per kind: found, missed, false
PICTURE_HALF = 32               # half-width in pixels of an overlay's crop (grown for large nodules)
WRITE_MIP = True                # a maximum-intensity-projection montage of the probability per scan
OVERWRITE = False               # recompute predictions even when a file from the same model and settings exists

LUNG_WINDOW = (-1000, 400)      # HU range shown in pictures
UNKNOWN_DIAMETER_MM = 10.0      # LUNA16's script: an annotation with diameter < 0 counts as 10 mm

DEFINITIONS = {
    "nodule_dice_found": "per-nodule Dice (as nodule_dice) averaged over the nodules found at the threshold "
                         "(LUNA16 hit rule) only: how well the found nodules are outlined.",
    "slice_dice": "2|P & T| / (|P| + |T|), pooled over every voxel of every slice of the evaluated scans; "
                  "P = the predicted mask (prob > THRESHOLD, components of >= MIN_COMPONENT_VOXELS), "
                  "T = the union of the truth nodule labels (excluded annotations are not labelled). "
                  "1 when P and T are both empty.",
    "slice_dice_nodule_slices": "the same pooled Dice, over only the slices holding truth nodule voxels.",
    "nodule_dice": "for each truth nodule with a label: Dice between its label and the union of the predicted 3D "
                   "components touching it (0 when none touches); mean over nodules.",
    "sensitivity": "fraction of truth nodules found at the threshold: a nodule is found when the center of mass "
                   "of a predicted 3D component lies within its radius (distance < diameter / 2 in world mm, "
                   "LUNA16's rule). Each component is matched to the first annotation it hits (included before "
                   "excluded ones); several components on one nodule find it once.",
    "fp_per_scan": "predicted 3D components whose center hits no annotation, divided by the number of scans; "
                   "components hitting an excluded annotation and second hits of a nodule are not counted.",
    "sensitivity_thesis_rule": "the thesis's detection rule: a nodule is found when on a slice within +-1 of its "
                               "center slice the predicted mask overlaps its label by more than 1 pixel.",
    "froc": "LUNA16's FROC: candidates = the predicted 3D components of all scans, probability = the maximum "
            "probability inside a component; a nodule's score is its highest hitting candidate (later hits are "
            "ignored, not false positives), candidates on excluded annotations are ignored, every other "
            "candidate is a false positive. Sensitivity vs false positives per scan as the threshold on the "
            "candidates' probability falls; read at FROC_RATES by linear interpolation of the curve "
            "(as LUNA16's script, np.interp), and the last sensitivity beyond the curve's end.",
    "cpm": "Competition Performance Metric: mean of the FROC sensitivities at 1/8, 1/4, 1/2, 1, 2, 4, 8 false "
           "positives per scan.",
    "by_size": "the same metric over the truth nodules of one diameter bin (mm); for FROC/CPM the candidates "
               "hitting nodules of other bins are ignored, false positives are those of the whole set.",
}

COMPONENT_DTYPE = np.dtype([("label", np.int32), ("n_voxels", np.int64), ("center_z", np.float64),
                            ("center_y", np.float64), ("center_x", np.float64), ("prob", np.float32)])


# ----------------------------------------------------------------------------- metrics (pure numpy)

def dice(intersection, n_pred, n_true):
    """2 I / (P + T); 1.0 when both are empty."""
    total = float(n_pred) + float(n_true)
    return 1.0 if total == 0 else 2.0 * float(intersection) / total


def dice_counts(pred, truth):
    """(|P & T|, |P|, |T|) of two boolean arrays, as ints, for pooling over slices and scans."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    return int(np.count_nonzero(pred & truth)), int(np.count_nonzero(pred)), int(np.count_nonzero(truth))


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
        count = int(np.count_nonzero(inside))
        center = []
        for axis in range(3):
            profile = inside.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
            center.append(box[axis].start + float(profile @ np.arange(len(profile))) / count)
        comps[i] = (i + 1, count, *center, float(np.asarray(prob[box])[inside].max()))
    keep = comps["n_voxels"] >= min_voxels
    if not keep.all():
        remap = np.zeros(n + 1, np.int32)
        remap[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        labels = remap[labels]
        comps = comps[keep]
        comps["label"] = np.arange(1, len(comps) + 1)
    return labels, comps


def match_candidates(cand_xyz, nodule_xyz, diameter_mm, excluded):
    """Which annotation each candidate hits (LUNA16's rule) -> int array (N,), -1 = none.

    A candidate hits an annotation when its world distance to the center is < diameter / 2 (mm). Like
    LUNA16's script, annotations are tried included first, then excluded, each in table order, and a
    candidate belongs to the first one it hits. Diameters < 0 (unknown) count as UNKNOWN_DIAMETER_MM."""
    cand = np.asarray(cand_xyz, np.float64).reshape(-1, 3)
    nod = np.asarray(nodule_xyz, np.float64).reshape(-1, 3)
    hits = np.full(len(cand), -1, np.int64)
    if len(cand) == 0 or len(nod) == 0:
        return hits
    diam = np.asarray(diameter_mm, np.float64).reshape(-1)
    diam = np.where(diam < 0, UNKNOWN_DIAMETER_MM, diam)
    inside = ((cand[:, None, :] - nod[None, :, :]) ** 2).sum(-1) < (diam / 2.0) ** 2
    order = np.argsort(np.asarray(excluded).reshape(-1).astype(bool), kind="stable")
    first = np.argmax(inside[:, order], axis=1)
    any_hit = inside[:, order].any(axis=1)
    hits[any_hit] = order[first[any_hit]]
    return hits


def detect(hits, cand_prob, excluded):
    """Candidates matched to annotations -> (found (M,), nodule score (M,), NaN if not found, is_fp (N,),
    is_ignored (N,)).

    A nodule's score is the highest probability among the candidates hitting it; candidates on excluded
    annotations are ignored; candidates hitting nothing are false positives. Excluded rows are never found."""
    hits = np.asarray(hits, np.int64)
    prob = np.asarray(cand_prob, np.float64).reshape(-1)
    excluded = np.asarray(excluded).reshape(-1).astype(bool)
    score = np.full(len(excluded), np.nan)
    hit = hits >= 0
    ignored = np.zeros(len(hits), bool)
    ignored[hit] = excluded[hits[hit]]
    tp = hit & ~ignored
    for i in np.nonzero(tp)[0]:
        score[hits[i]] = np.fmax(score[hits[i]], prob[i])
    found = ~np.isnan(score)
    return found, score, ~hit, ignored


def nodule_dice(labels, nodule_mask, indices, comp_sizes=None):
    """Per-nodule Dice: label k of ``nodule_mask`` vs the union of the components of ``labels`` touching it.
    NaN for an index with no voxel in ``nodule_mask``. ``comp_sizes[j]`` = voxels of component j (index 0
    unused), counted here when not given."""
    out = np.full(len(indices), np.nan)
    objects = ndimage.find_objects(np.asarray(nodule_mask))
    if comp_sizes is None:
        comp_sizes = np.bincount(np.asarray(labels).ravel())
    comp_sizes = np.asarray(comp_sizes)
    for j, k in enumerate(int(i) for i in indices):
        if k < 1 or k > len(objects) or objects[k - 1] is None:
            continue
        box = objects[k - 1]
        truth = nodule_mask[box] == k
        inside = labels[box][truth]
        touching = np.unique(inside[inside > 0])
        out[j] = dice(np.count_nonzero(inside), comp_sizes[touching].sum(), np.count_nonzero(truth))
    return out


def thesis_found(mask, nodule_mask, index, center_z, min_overlap=1):
    """The thesis's rule: on some slice within +-1 of the center slice, the mask overlaps label ``index`` by
    more than ``min_overlap`` pixels."""
    zc = int(round(float(center_z)))
    for z in range(max(zc - 1, 0), min(zc + 2, mask.shape[0])):
        if np.count_nonzero((mask[z] > 0) & (nodule_mask[z] == index)) > min_overlap:
            return True
    return False


def size_bin(diameter_mm, edges=None):
    """Name of the diameter bin: '<5', '5-10', '10-20', '>=20' for edges (5, 10, 20) (default SIZE_BINS)."""
    edges = SIZE_BINS if edges is None else edges
    names = size_bin_names(edges)
    return names[int(np.searchsorted(np.asarray(edges, float), float(diameter_mm), side="right"))]


def size_bin_names(edges=None):
    edges = SIZE_BINS if edges is None else edges
    fmt = lambda v: f"{float(v):g}"
    return ([f"<{fmt(edges[0])}"] + [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]
            + [f">={fmt(edges[-1])}"])


def interp_curve(x, fps, sens):
    """Sensitivity at false-positive rates ``x`` on a curve whose ``fps`` never decreases: linear between the
    last point at or left of x and the next one (at a rate the curve reaches exactly, its best sensitivity
    there); beyond the end, the last sensitivity. The same numbers as np.interp on LUNA16's curve."""
    fps, sens = np.asarray(fps, np.float64), np.asarray(sens, np.float64)
    out = []
    for f in np.asarray(x, np.float64).reshape(-1):
        if f >= fps[-1]:
            out.append(sens[-1])
            continue
        j = int(np.searchsorted(fps, f, side="right")) - 1
        f0, f1, s0, s1 = fps[j], fps[j + 1], sens[j], sens[j + 1]
        out.append(s0 + (s1 - s0) * (f - f0) / (f1 - f0))
    return np.asarray(out)


def froc(nodule_scores, fp_probs, n_scans, rates=None):
    """LUNA16's FROC.

    nodule_scores: one per truth nodule, the highest probability of a candidate hitting it (NaN if none);
    fp_probs: the probabilities of the false-positive candidates of all ``n_scans`` scans.
    Returns dict: fps, sens (the curve, starting at (0, 0), one point per distinct probability, highest
    first), thresholds, rates, sensitivities (at the rates), cpm (their mean); NaN sensitivities without nodules."""
    rates = FROC_RATES if rates is None else rates
    scores = np.asarray(nodule_scores, np.float64).reshape(-1)
    fp = np.sort(np.asarray(fp_probs, np.float64).reshape(-1))
    tp = np.sort(scores[~np.isnan(scores)])
    n_nodules = len(scores)
    thresholds = np.unique(np.concatenate([tp, fp]))[::-1]
    n_tp = len(tp) - np.searchsorted(tp, thresholds, side="left")
    n_fp = len(fp) - np.searchsorted(fp, thresholds, side="left")
    fps = np.concatenate([[0.0], n_fp / float(n_scans)])
    sens = np.concatenate([[0.0], n_tp / float(n_nodules)]) if n_nodules else np.full(len(fps), np.nan)
    at = interp_curve(rates, fps, sens)
    return {"fps": fps, "sens": sens, "thresholds": thresholds, "rates": np.asarray(rates, np.float64),
            "sensitivities": at, "cpm": float(np.mean(at))}


def evaluate_scan(prob, mask, nodule_mask, nodules, origin, spacing, direction, seriesuid="",
                  min_voxels=1, connectivity=3, components=None):
    """One scan's prediction against its truth -> dict of small, poolable results (no volumes):
    seriesuid; components (COMPONENT_DTYPE); cand_world (N, 3) x, y, z mm; hits, is_fp, is_ignored (N,);
    nodules: one dict per included truth nodule; dice_counts (all slices) and dice_counts_nodule_slices.
    ``components`` = (labels, comps) from find_components, to skip labelling again."""
    prob = np.asarray(prob)
    mask = np.asarray(mask) > 0
    nodule_mask = np.asarray(nodule_mask)
    nodules = np.asarray(nodules, dtype=ct_io.NODULE_DTYPE).reshape(-1)
    labels, comps = components if components is not None else find_components(mask, prob, min_voxels, connectivity)
    mask = labels > 0
    centers = np.stack([comps["center_z"], comps["center_y"], comps["center_x"]], axis=1)
    cand_world = ct_io.voxel_to_world(centers, origin, spacing, direction).reshape(-1, 3)
    nod_world = np.stack([nodules["world_x"], nodules["world_y"], nodules["world_z"]], axis=1)
    excluded = nodules["excluded"].astype(bool)
    hits = match_candidates(cand_world, nod_world, nodules["diameter_mm"], excluded)
    found, score, is_fp, is_ignored = detect(hits, comps["prob"], excluded)
    n_hits = np.bincount(hits[hits >= 0], minlength=len(nodules)) if len(nodules) else np.zeros(0, int)
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
                     "dice": float(dices[j]), "max_prob": max_prob, "candidate_prob": float(score[m])})
    truth_all = nodule_mask > 0
    with_truth = np.nonzero(truth_all.any(axis=(1, 2)))[0]
    return {"seriesuid": seriesuid, "components": comps, "cand_world": cand_world, "hits": hits,
            "is_fp": is_fp, "is_ignored": is_ignored, "nodules": rows,
            "n_excluded": int(excluded.sum()),
            "dice_counts": dice_counts(mask, truth_all),
            "dice_counts_nodule_slices": dice_counts(mask[with_truth], truth_all[with_truth])}


def summarize(results, size_edges=None, rates=None):
    """Per-scan results of evaluate_scan (all scans) -> (the metrics dict written to metrics.json, FROC curves
    overall and by size). Defaults: SIZE_BINS, FROC_RATES."""
    size_edges = SIZE_BINS if size_edges is None else size_edges
    rates = FROC_RATES if rates is None else rates
    n_scans = len(results)
    nod = [r for res in results for r in res["nodules"]]
    fp_probs = np.concatenate([res["components"]["prob"][res["is_fp"]] for res in results]) if results else np.zeros(0)
    n_fp = int(len(fp_probs))
    n_ignored = int(sum(int(res["is_ignored"].sum()) for res in results))
    n_cand = int(sum(len(res["components"]) for res in results))
    pooled = np.sum([res["dice_counts"] for res in results], axis=0) if results else np.zeros(3)
    pooled_ns = np.sum([res["dice_counts_nodule_slices"] for res in results], axis=0) if results else np.zeros(3)

    def block(rows):
        found = np.array([r["found"] for r in rows], bool)
        thesis = np.array([r["found_thesis_rule"] for r in rows], bool)
        dices = np.array([r["dice"] for r in rows], np.float64)
        labelled = dices[~np.isnan(dices)]
        found_dices = dices[found & ~np.isnan(dices)]
        curve = froc([r["candidate_prob"] for r in rows], fp_probs, max(n_scans, 1), rates)
        return {"n_nodules": len(rows), "n_found": int(found.sum()),
                "sensitivity": float(found.mean()) if len(rows) else float("nan"),
                "sensitivity_thesis_rule": float(thesis.mean()) if len(rows) else float("nan"),
                "nodule_dice": float(labelled.mean()) if len(labelled) else float("nan"),
                "n_labelled": int(len(labelled)),
                "nodule_dice_found": float(found_dices.mean()) if len(found_dices) else float("nan"),
                "froc_sensitivities": [float(s) for s in curve["sensitivities"]], "cpm": curve["cpm"],
                "_curve": curve}

    for r in nod:
        r["size_bin"] = size_bin(r["diameter_mm"], size_edges)
    overall = block(nod)
    by_size = {name: block([r for r in nod if r["size_bin"] == name]) for name in size_bin_names(size_edges)}
    fp_rate = n_fp / n_scans if n_scans else float("nan")
    D = DEFINITIONS
    metrics = {
        "n_scans": n_scans, "n_nodules": overall["n_nodules"],
        "n_excluded_annotations": int(sum(res["n_excluded"] for res in results)),
        "n_candidates": n_cand, "n_false_positives": n_fp, "n_ignored_candidates": n_ignored,
        "slice_dice": {"value": dice(*pooled), "intersection": int(pooled[0]), "pred_voxels": int(pooled[1]),
                       "truth_voxels": int(pooled[2]), "definition": D["slice_dice"]},
        "slice_dice_nodule_slices": {"value": dice(*pooled_ns), "definition": D["slice_dice_nodule_slices"]},
        "nodule_dice": {"value": overall["nodule_dice"], "n_nodules": overall["n_labelled"],
                        "by_size": {k: v["nodule_dice"] for k, v in by_size.items()}, "definition": D["nodule_dice"]},
        "nodule_dice_found": {"value": overall["nodule_dice_found"],
                              "by_size": {k: v["nodule_dice_found"] for k, v in by_size.items()},
                              "definition": D["nodule_dice_found"]},
        "sensitivity": {"value": overall["sensitivity"], "found": overall["n_found"], "total": overall["n_nodules"],
                        "by_size": {k: {"value": v["sensitivity"], "found": v["n_found"], "total": v["n_nodules"]}
                                    for k, v in by_size.items()}, "definition": D["sensitivity"]},
        "fp_per_scan": {"value": fp_rate, "n_false_positives": n_fp, "definition": D["fp_per_scan"]},
        "sensitivity_thesis_rule": {"value": overall["sensitivity_thesis_rule"],
                                    "by_size": {k: v["sensitivity_thesis_rule"] for k, v in by_size.items()},
                                    "definition": D["sensitivity_thesis_rule"]},
        "froc": {"fp_rates": [float(r) for r in rates], "sensitivities": overall["froc_sensitivities"],
                 "by_size": {k: v["froc_sensitivities"] for k, v in by_size.items()}, "definition": D["froc"]},
        "cpm": {"value": overall["cpm"], "by_size": {k: v["cpm"] for k, v in by_size.items()}, "definition": D["cpm"]},
        "size_bins_mm": list(size_bin_names(size_edges)), "by_size_definition": D["by_size"],
    }
    curves = {"all": overall["_curve"], **{k: v["_curve"] for k, v in by_size.items()}}
    return metrics, curves


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
    """The network, loaded on first use, and the network-input settings (CROP, CONTEXT_SLICES) it was
    trained with: from ``config_path`` (default config.json beside the model), else from the slice table's
    attributes (WORK_DIR/2_table/slices.h5), else table.py's defaults and the model's input channels."""

    def __init__(self, model_path, config_path="", table_path=""):
        import table
        self.table, self.model_path = table, model_path
        config_path = config_path or os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
        cfg = _read_json(config_path) if os.path.isfile(config_path) else {}
        if "CROP" not in cfg and table_path and os.path.isfile(table_path):
            cfg = {k.upper(): v for k, v in table.table_settings(table_path).items()}
        self.crop = int(cfg.get("CROP", table.CROP))
        self.context = int(cfg["CONTEXT_SLICES"]) if "CONTEXT_SLICES" in cfg else None   # None: the model's channels
        self._context_cfg = self.context
        self._loaded, self._models = None, {}
        self.load_seconds = 0.0           # time spent loading / rebuilding the model (not inference)

    def signature(self):
        """What identifies a prediction: the model file (path, size, time) and the input settings."""
        st = os.stat(self.model_path)
        return {"model": os.path.abspath(self.model_path), "model_bytes": st.st_size,
                "model_mtime_ns": st.st_mtime_ns, "crop": self.crop, "context_slices": self._context_cfg}

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

    def predict(self, hu, lung_mask, batch_size=8):
        """Nodule probability float32 (Z, Y, X) on the scan's full grid (0 outside the crop), and the crop box
        as (row slice, column slice). The inputs come from table.volume_inputs (the table's own code)."""
        y0, x0, h, w = self.table.crop_box(hu.shape, self.crop)
        box = (slice(y0, y0 + h), slice(x0, x0 + w))
        model = self.model_for((h, w))
        prob = np.zeros(hu.shape, np.float32)
        for z0, x in self.table.volume_inputs(hu, lung_mask, self.crop, self.context, batch_size):
            y = np.asarray(model.predict_on_batch(x))
            if y.ndim == 4:
                y = y[..., 1] if y.shape[-1] >= 2 else y[..., 0]
            if y.shape[1:] != (h, w):
                raise ValueError(f"model output {y.shape[1:]} differs from its input {(h, w)}")
            prob[z0:z0 + len(y), box[0], box[1]] = y
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
        self.n, self.half, self.heaps, self.count = n, half, {"found": [], "missed": [], "false": []}, 0

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
                axes[0].set_title("CT, truth (green), prediction (red)", fontsize=8)
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
    truth centers circled green, predicted components' centers marked red. Coronal: z drawn upwards, to scale."""
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
    fig.suptitle(f"{seriesuid}: probability MIP (>= 0.05), truth (green o), candidates (cyan x)", fontsize=9)
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def write_froc(path, curves, metrics):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rates = np.asarray(FROC_RATES)
    for name, c in curves.items():
        if not np.isfinite(c["sens"]).all() or len(c["sens"]) == 0:
            continue
        x = np.concatenate([c["fps"], [max(rates[-1], c["fps"][-1])]])
        y = np.concatenate([c["sens"], [c["sens"][-1]]])
        style = dict(lw=2.2, color="black") if name == "all" else dict(lw=1.0)
        ax.plot(np.maximum(x, rates[0] / 2), y, label=f"{name}: CPM {c['cpm']:.3f}", **style)   # as interpolated
        if name == "all":
            ax.plot(rates, c["sensitivities"], "o", color="black")
    ax.set_xscale("log", base=2)
    ax.set_xlim(rates[0] / 2, rates[-1] * 2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"FROC over {metrics['n_scans']} scans, {metrics['n_nodules']} nodules", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- the run

def read_stage1(path):
    """ct_io.read_scan_h5 with one-line errors naming the problem."""
    import tables
    if not os.path.isfile(path):
        raise ct_io.ScanError(f"{path}: no such stage-1 file")
    try:
        is_hdf5 = tables.is_hdf5_file(path)
    except Exception:
        is_hdf5 = False
    if not is_hdf5:
        raise ct_io.ScanError(f"{path}: not an HDF5 file (corrupt or truncated)")
    try:
        scan = ct_io.read_scan_h5(path)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ct_io.ScanError(f"{path}: unreadable stage-1 file ({type(e).__name__}: {first})") from None
    shapes = {k: scan[k].shape for k in ("hu", "lung_mask", "nodule_mask")}
    if len(set(shapes.values())) != 1 or len(shapes["hu"]) != 3:
        raise ct_io.ScanError(f"{path}: arrays differ in shape or are not 3-D: {shapes}")
    return scan


def process_scan(path, predictor, pred_dir, book, mip_dir):
    """Predict (or reuse), write and evaluate one scan -> (evaluate_scan's result, seconds of inference or None)."""
    scan = read_stage1(path)
    a = scan["attrs"]
    uid = str(a["seriesuid"])
    origin, spacing, direction = a["origin"], a["spacing"], a["direction"]
    hu, lung = scan["hu"], scan["lung_mask"]
    out = os.path.join(pred_dir, f"{uid}.h5")
    key = json.dumps({**predictor.signature(), "threshold": THRESHOLD, "binarize": BINARIZE,
                      "kmeans_erosion": KMEANS_EROSION, "min_component_voxels": MIN_COMPONENT_VOXELS,
                      "connectivity": CONNECTIVITY, "prob_dtype": PROB_DTYPE, "lung_gate": LUNG_GATE},
                     sort_keys=True)
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
        prob, box = predictor.predict(hu, lung, BATCH_SIZE)
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
    res = evaluate_scan(prob, mask, scan["nodule_mask"], scan["nodules"], origin, spacing, direction, uid,
                        components=(labels, comps))
    res["n_slices"] = int(hu.shape[0])
    nod = scan["nodules"]
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
    res.pop("hits")
    return res, seconds


def print_table(m):
    """The metrics by nodule size as a plain-text table (what `make demo` ends with)."""
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
    print(f"false positives per scan {m['fp_per_scan']['value']:.2f}; slice Dice {f(m['slice_dice']['value'])} "
          f"(pooled over all slices)")


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
    paths = scan_list(WORK_DIR, SCANS)
    if not paths:
        raise SystemExit(f"no scans in part {SCANS!r} of {WORK_DIR}")
    predictor = Predictor(model_path, MODEL_CONFIG, os.path.join(WORK_DIR, "2_table", "slices.h5"))
    book = PictureBook(N_PICTURES, PICTURE_HALF)
    results, failed, timing = [], [], []
    bar = tqdm(paths, desc="postprocess", unit="scan")
    for path in bar:
        try:
            res, seconds = process_scan(path, predictor, pred_dir, book, mip_dir)
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
                        cands=sum(len(r["components"]) for r in results))

    metrics, curves = summarize(results, SIZE_BINS, FROC_RATES)
    metrics["model"] = os.path.abspath(model_path)
    metrics["scans"] = SCANS
    metrics["threshold"], metrics["binarize"] = THRESHOLD, BINARIZE
    metrics["failed_scans"] = failed
    metrics["timing"] = {"definition": "seconds of inference per scan (network inputs + prediction, the first "
                                       "scan's graph tracing included, model loading not); peak resident memory "
                                       "of this process",
                         "model_load_seconds": predictor.load_seconds, "scans_predicted": len(timing),
                         "seconds_per_scan": float(np.mean([s for s, _ in timing])) if timing else None,
                         "seconds_per_slice": (float(sum(s for s, _ in timing) / sum(n for _, n in timing))
                                               if timing else None),
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    write_json(os.path.join(report_dir, "metrics.json"), metrics)
    nodule_fields = ["seriesuid", "index", "world_x", "world_y", "world_z", "diameter_mm", "size_bin", "found",
                     "found_thesis_rule", "n_hits", "dice", "max_prob", "candidate_prob", "label_voxels",
                     "center_z", "center_y", "center_x"]
    write_csv(os.path.join(report_dir, "nodules.csv"), [r for res in results for r in res["nodules"]], nodule_fields)
    cands, detail = [], []
    for res in results:
        for c, xyz, fp, ign in zip(res["components"], res["cand_world"], res["is_fp"], res["is_ignored"]):
            row = {"seriesuid": res["seriesuid"], "coordX": f"{xyz[0]:.3f}", "coordY": f"{xyz[1]:.3f}",
                   "coordZ": f"{xyz[2]:.3f}", "probability": f"{float(c['prob']):.6f}"}
            cands.append(row)
            detail.append({**row, "n_voxels": int(c["n_voxels"]), "center_z": f"{c['center_z']:.2f}",
                           "center_y": f"{c['center_y']:.2f}", "center_x": f"{c['center_x']:.2f}",
                           "status": "FP" if fp else ("ignored" if ign else "TP")})
    fields = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    write_csv(os.path.join(report_dir, "candidates.csv"), cands, fields)
    write_csv(os.path.join(report_dir, "candidates_detail.csv"), detail,
              fields + ["n_voxels", "center_z", "center_y", "center_x", "status"])
    write_froc(os.path.join(report_dir, "froc.png"), curves, metrics)
    book.draw(pic_dir)
    save_config(cfg, report_dir)

    def pct(v):
        return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}%"
    m = metrics
    print(f"{len(results)} scan(s), {m['n_nodules']} nodule(s): slice Dice {pct(m['slice_dice']['value'])}, "
          f"nodule Dice {pct(m['nodule_dice']['value'])}, sensitivity {pct(m['sensitivity']['value'])} at "
          f"{m['fp_per_scan']['value']:.2f} FP/scan (thesis rule {pct(m['sensitivity_thesis_rule']['value'])}), "
          f"CPM {m['cpm']['value']:.3f} -> {report_dir}" if results else "no scan evaluated")
    if results:
        print_table(m)
    if failed:
        print(f"{len(failed)} scan(s) failed: " + "; ".join(os.path.basename(f["path"]) for f in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
