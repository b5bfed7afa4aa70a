"""A scan's prediction measured against its truth: the volumes reduced to the small results metrics.py pools.

    mask = evaluation.binarize(prob, "threshold", 0.5)
    res = evaluation.evaluate_scan(prob, mask, nodule_mask, nodules, origin, spacing, direction, uid)
    metrics.summarize([res, ...])                     # the report's numbers

``binarize`` turns a probability into the operating point's mask (a threshold, or the thesis's per-slice
K-means); ``evaluate_scan`` matches the mask's 3D components and the FROC's candidates (candidates.py) to the
truth nodules by LUNA16's rule, per-nodule Dice and the Dice counts; ``no_truth_summary`` is metrics.json for
scans without annotations. Every metric itself is computed by metrics.py.
"""
import numpy as np
from scipy import ndimage

import ct_io
from candidates import find_candidates, find_components
from metrics import detect, dice_counts, match_candidates, nodule_dice, thesis_found


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
    """The operating point's mask: prob > ``threshold``, or ``kmeans_binarize`` (method "kmeans")."""
    if method == "threshold":
        return prob > threshold
    if method == "kmeans":
        return kmeans_binarize(prob, erosion, box)
    raise ValueError(f"BINARIZE={method!r}: expected 'threshold' or 'kmeans'")


# ----------------------------------------------------------------------------- one scan against its truth

def _world(comps, origin, spacing, direction):
    """World x, y, z (mm) of the voxel centers of components / candidates (COMPONENT_DTYPE) -> (N, 3)."""
    centers = np.stack([comps["center_z"], comps["center_y"], comps["center_x"]], axis=1)
    return ct_io.voxel_to_world(centers, origin, spacing, direction).reshape(-1, 3)


def _nodule_rows(prob, mask, nodule_mask, nodules, included, found, score, n_hits, dices, seriesuid):
    """nodules.csv's rows: one dict per included truth nodule (its size, whether and how it was found)."""
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
    return rows


def evaluate_scan(prob, mask, nodule_mask, nodules, origin, spacing, direction, seriesuid="",
                  min_voxels=1, connectivity=3, components=None, candidates=None):
    """One scan's prediction against its truth -> dict of small, poolable results (no volumes), the input of
    metrics.summarize: seriesuid; components (COMPONENT_DTYPE, the mask's 3D components) with component_world
    (N, 3) x, y, z mm, is_fp, is_ignored (N,); candidates (the FROC's, COMPONENT_DTYPE) with candidate_world,
    candidate_is_fp, candidate_is_ignored; nodules: one dict per included truth nodule; dice_counts (all slices)
    and dice_counts_nodule_slices. ``components`` = (labels, comps) from candidates.find_components, to skip
    labelling again; ``candidates`` from candidates.find_candidates (found here from ``prob`` with its default
    settings, stage 5's defaults, if not given)."""
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
    comp_world, cand_world = (_world(c, origin, spacing, direction) for c in (comps, candidates))
    hits = match_candidates(comp_world, nod_world, nodules["diameter_mm"])
    found, _, is_fp, is_ignored = detect(hits, comps["prob"], excluded)
    cand_hits = match_candidates(cand_world, nod_world, nodules["diameter_mm"])
    _, score, cand_fp, cand_ignored = detect(cand_hits, candidates["prob"], excluded)
    included = np.nonzero(~excluded)[0]
    dices = nodule_dice(labels, nodule_mask, nodules["index"][included],
                        np.concatenate([[0], comps["n_voxels"]]))
    rows = _nodule_rows(prob, mask, nodule_mask, nodules, included, found, score, hits.sum(axis=0), dices,
                        seriesuid)
    truth_all = nodule_mask > 0
    with_truth = np.nonzero(truth_all.any(axis=(1, 2)))[0]
    return {"seriesuid": seriesuid, "components": comps, "component_world": comp_world,
            "is_fp": is_fp, "is_ignored": is_ignored,
            "candidates": candidates, "candidate_world": cand_world, "candidate_is_fp": cand_fp,
            "candidate_is_ignored": cand_ignored, "nodules": rows,
            "n_excluded": int(excluded.sum()),
            "dice_counts": dice_counts(mask, truth_all),
            "dice_counts_nodule_slices": dice_counts(mask[with_truth], truth_all[with_truth])}


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
