"""The metrics, in plain numpy: Dice, LUNA16's matching of candidates to nodules, detection, per-nodule Dice,
size bins, FROC and CPM exactly as LUNA16's evaluation script counts them, and the summary written to
metrics.json. The one implementation: postprocess.py, the false-positive-reduction stage, the tests and the
command below use it. As a library it reads and writes nothing; arrays are numpy, coordinates world mm (x, y, z).

Run (scores any LUNA16 candidates file: prints CPM, the sensitivities at 1/8 ... 8 FP/scan, by nodule size, and
the 95 % bootstrap interval over the scans; OUT also writes them as JSON; docs/evaluation.md)
    python metrics.py --ANNOTATIONS=annotations.csv --CANDIDATES=candidates.csv
    python metrics.py --ANNOTATIONS=annotations.csv --CANDIDATES=candidates.csv --EXCLUDED=annotations_excluded.csv \\
        --SCANS=seriesuids.csv --BOOTSTRAP=1000 --OUT=evaluation.json
    python metrics.py --ANNOTATIONS=annotations.csv --CANDIDATES=a.csv --COMPARE=b.csv   # B's CPM minus A's, paired

LUNA16's rules (its evaluation script, noduleCADEvaluationLUNA16.py), as implemented here:
- a candidate hits an annotation when its distance to the centre is < diameter / 2 (unknown diameter, < 0:
  UNKNOWN_DIAMETER_MM); a candidate within the radii of two nodules hits both;
- a nodule's score is the highest score of the candidates hitting it; further hits are ignored, not false
  positives; candidates hitting only excluded annotations are ignored; every other candidate is a false positive;
- at most MAX_CANDIDATES per scan, the highest scored (when more: those strictly above the next score);
- FP/scan divides by every scan of the evaluated part (scans without candidates and failed scans included);
- the FROC is read at 1/8 ... 8 FP/scan by np.interp on the curve; CPM = their mean; undefined without nodules.
"""
import os

import numpy as np

# ----------------------------------------------------------------------------- settings
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)   # LUNA16's FP/scan rates; CPM = mean sensitivity there
SIZE_BINS = (5.0, 10.0, 20.0)       # default diameter bin edges in mm for the breakdowns: <5, 5-10, 10-20, >=20 [> 0]
UNKNOWN_DIAMETER_MM = 10.0          # LUNA16's script: an annotation with diameter < 0 counts as 10 mm
MAX_CANDIDATES = 100                # LUNA16's script keeps at most this many candidates per scan (the highest scored;
                                    # 0 = all) [>= 0]
# the command (python metrics.py); SIZE_BINS and MAX_CANDIDATES above are its settings too
ANNOTATIONS = ""                    # LUNA16 annotations.csv: seriesuid, coordX, coordY, coordZ, diameter_mm (world
                                    # mm) [existing path]
CANDIDATES = ""                     # the candidates to score, LUNA16 format: seriesuid, coordX, coordY, coordZ,
                                    # probability [existing path]
EXCLUDED = ""                       # annotations_excluded.csv: findings whose candidates are neither hits nor false
                                    # positives; "" = none [existing path]
SCANS = ""                          # the evaluated scans, one seriesuid a line (LUNA16's seriesuids.csv); FP/scan
                                    # divides by them; "" = every scan named in ANNOTATIONS or CANDIDATES
                                    # [existing path]
BOOTSTRAP = 1000                    # bootstrap draws of the scans for the 95 % intervals; 0 = none [>= 0]
OUT = ""                            # also write the figures as JSON to this file; "" = print only
COMPARE = ""                        # a second candidates file of the same scans: its CPM minus CANDIDATES's, paired
                                    # 95 % interval (each bootstrap draw resamples both); "" = none [existing path]
_SETTINGS = ("ANNOTATIONS", "CANDIDATES", "EXCLUDED", "SCANS", "BOOTSTRAP", "OUT", "SIZE_BINS", "MAX_CANDIDATES", "COMPARE")

DEFINITIONS = {
    "ci95": "95 % interval: percentiles 2.5 and 97.5 of the CPM (and of each sensitivity) over 1000 bootstrap draws "
            "of the evaluated scans with replacement (failed scans included, as scans without candidates), as "
            "LUNA16's evaluation resamples scans; seeded, so a rerun gives the same interval",
    "slice_dice": "2|P & T| / (|P| + |T|), pooled over every voxel of every slice of the evaluated scans; "
                  "P = the predicted mask (prob > THRESHOLD, components of >= MIN_COMPONENT_VOXELS), "
                  "T = the union of the truth nodule labels (excluded annotations are not labelled). "
                  "1 when P and T are both empty.",
    "slice_dice_nodule_slices": "the same pooled Dice, over only the slices holding truth nodule voxels.",
    "nodule_dice": "for each truth nodule with a label: Dice between its label and the union of the predicted 3D "
                   "components touching it (0 when none touches); mean over nodules.",
    "nodule_dice_found": "per-nodule Dice (as nodule_dice) averaged over the nodules found at the threshold "
                         "(LUNA16 hit rule) only: how well the found nodules are outlined.",
    "sensitivity": "fraction of truth nodules found at the threshold: a nodule is found when the center of mass "
                   "of a predicted 3D component (prob > THRESHOLD) lies within its radius (distance < diameter / 2 "
                   "in world mm, LUNA16's rule; an unknown diameter counts as 10 mm). A component within the radii "
                   "of two nodules finds both; several components on one nodule find it once.",
    "fp_per_scan": "predicted 3D components (prob > THRESHOLD) whose center lies within no annotation's radius, "
                   "divided by n_scans = every scan of the evaluated part, failed scans included; components "
                   "within only excluded annotations and further hits of a nodule are not counted.",
    "sensitivity_thesis_rule": "the thesis's detection rule: a nodule is found when on a slice within +-1 of its "
                               "center slice the predicted mask overlaps its label by more than 1 pixel.",
    "froc": "LUNA16's FROC over the candidates (candidates.csv): the 3D components of prob > CANDIDATE_THRESHOLD, "
            "each scored by the maximum probability inside it, at most MAX_CANDIDATES per scan (the highest scored; "
            "when more, those strictly above the next score, as LUNA16's script). A nodule's score is the highest "
            "of the candidates within its radius (a candidate within two nodules' radii hits both; further hits "
            "on a nodule are ignored, not false positives); candidates within only excluded annotations are "
            "ignored; every other candidate is a false positive. As the threshold on the score falls, sensitivity "
            "= nodules scored / all nodules and FP/scan = false positives / n_scans (every scan of the evaluated "
            "part, failed scans included); read at fp_rates by linear interpolation of the curve (np.interp, as "
            "LUNA16's script), its last sensitivity beyond its end. Undefined (null) without nodules.",
    "cpm": "Competition Performance Metric: mean of the FROC sensitivities at 1/8, 1/4, 1/2, 1, 2, 4, 8 false "
           "positives per scan; null when there is no nodule.",
    "candidate_recall": "fraction of truth nodules within the radius of at least one candidate (the FROC curve's "
                        "end: its sensitivity with every candidate kept).",
    "reading": "the sensitivities are the official script's FROC curve (fps, sens of its computeFROC) read exactly "
               "at 1/8 ... 8 FP/scan by np.interp; at a rate the curve reaches with a vertical step, its top. The "
               "script's own plotted curve samples np.linspace(0.125, 8, 10001), whose points lie near, not at, most "
               "rates: read there (nearest point) a CPM differs where the curve steps at a rate (docs/evaluation.md)",
    "by_size": "the same metric over the truth nodules of one diameter bin (mm); for FROC/CPM the candidates "
               "hitting nodules of other bins are ignored, false positives are those of the whole set.",
}


# ----------------------------------------------------------------------------- Dice

def dice(intersection, n_pred, n_true):
    """2 I / (P + T); 1.0 when both are empty."""
    total = float(n_pred) + float(n_true)
    return 1.0 if total == 0 else 2.0 * float(intersection) / total


def dice_counts(pred, truth):
    """(|P & T|, |P|, |T|) of two boolean arrays, as ints, for pooling over slices and scans."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    return int(np.count_nonzero(pred & truth)), int(np.count_nonzero(pred)), int(np.count_nonzero(truth))


def label_boxes(volume):
    """{k: (z slice, y slice, x slice)}: the bounding box of every label k > 0 of an integer volume."""
    volume = np.asarray(volume)
    where = np.nonzero(volume)
    values = volume[where]
    boxes = {}
    for k in np.unique(values):
        sel = values == k
        boxes[int(k)] = tuple(slice(int(c[sel].min()), int(c[sel].max()) + 1) for c in where)
    return boxes


def nodule_dice(labels, nodule_mask, indices, comp_sizes=None):
    """Per-nodule Dice: label k of ``nodule_mask`` vs the union of the components of ``labels`` touching it.
    NaN for an index with no voxel in ``nodule_mask``. ``comp_sizes[j]`` = voxels of component j (index 0
    unused), counted here when not given."""
    labels, nodule_mask = np.asarray(labels), np.asarray(nodule_mask)
    out = np.full(len(indices), np.nan)
    boxes = label_boxes(nodule_mask)
    if comp_sizes is None:
        comp_sizes = np.bincount(labels.ravel())
    comp_sizes = np.asarray(comp_sizes)
    for j, k in enumerate(int(i) for i in indices):
        if k not in boxes:
            continue
        box = boxes[k]
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


# ----------------------------------------------------------------------------- detection (LUNA16's rules)

def top_candidates(scores, max_candidates=MAX_CANDIDATES):
    """Which of one scan's candidates LUNA16's script keeps -> bool (N,): all of them when there are at most
    ``max_candidates``; else those scored strictly above the (max_candidates + 1)-th highest score (candidates
    tied at the cut are all dropped, as the script does), so never more than ``max_candidates``."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    if max_candidates <= 0 or len(scores) <= max_candidates:
        return np.ones(len(scores), bool)
    cut = np.sort(scores)[::-1][max_candidates]
    return scores > cut


def match_candidates(cand_xyz, nodule_xyz, diameter_mm):
    """Which annotations each candidate hits (LUNA16's rule) -> bool (N candidates, M annotations).

    A candidate hits an annotation when its world distance to the center is < diameter / 2 (mm); diameters < 0
    (unknown) count as UNKNOWN_DIAMETER_MM. A candidate within the radii of several annotations hits them all."""
    cand = np.asarray(cand_xyz, np.float64).reshape(-1, 3)
    nod = np.asarray(nodule_xyz, np.float64).reshape(-1, 3)
    if len(cand) == 0 or len(nod) == 0:
        return np.zeros((len(cand), len(nod)), bool)
    diam = np.asarray(diameter_mm, np.float64).reshape(-1)
    diam = np.where(diam < 0, UNKNOWN_DIAMETER_MM, diam)
    return ((cand[:, None, :] - nod[None, :, :]) ** 2).sum(-1) < (diam / 2.0) ** 2


def detect(hits, cand_score, excluded):
    """Candidates matched to annotations (``hits`` from match_candidates) -> (found (M,), score (M,), is_fp (N,),
    is_ignored (N,)).

    An included annotation is found when a candidate hits it; its score is the highest score among those
    candidates (NaN when none; always NaN for excluded rows). A candidate hitting no annotation is a false
    positive; one hitting only excluded annotations is ignored; the others are true positives (of every included
    annotation they hit)."""
    excluded = np.asarray(excluded).reshape(-1).astype(bool)
    score_in = np.asarray(cand_score, np.float64).reshape(-1)
    hits = np.asarray(hits, bool).reshape(len(score_in), len(excluded))
    tp = hits & ~excluded[None, :]
    score = np.where(tp, score_in[:, None], -np.inf).max(axis=0, initial=-np.inf)
    found = tp.any(axis=0)
    score = np.where(found, score, np.nan)
    is_fp = ~hits.any(axis=1)
    is_ignored = ~is_fp & ~tp.any(axis=1)
    return found, score, is_fp, is_ignored


# ----------------------------------------------------------------------------- FROC and CPM

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


def froc(nodule_scores, fp_scores, n_scans, rates=None):
    """LUNA16's FROC.

    nodule_scores: one per truth nodule, the highest score of a candidate hitting it (NaN if none);
    fp_scores: the scores of the false-positive candidates of all ``n_scans`` scans (every scan of the part).
    Returns dict: fps, sens (the curve, from (0, 0), one point per distinct score, highest first), thresholds,
    rates, sensitivities (at the rates), cpm (their mean; None without nodules, the sensitivities then NaN).
    The arithmetic follows the script's order (fpr * false positives / scans, tpr * found / nodules), so a rate
    falling exactly on a step of the curve is read as the script reads it."""
    rates = np.asarray(FROC_RATES if rates is None else rates, np.float64)
    scores = np.asarray(nodule_scores, np.float64).reshape(-1)
    fp = np.sort(np.asarray(fp_scores, np.float64).reshape(-1))
    tp = np.sort(scores[~np.isnan(scores)])
    n_nodules, n_fp, n_tp = len(scores), len(fp), len(tp)
    thresholds = np.unique(np.concatenate([tp, fp]))[::-1]
    cum_tp = (n_tp - np.searchsorted(tp, thresholds, side="left")).astype(np.float64)
    cum_fp = (n_fp - np.searchsorted(fp, thresholds, side="left")).astype(np.float64)
    fps = np.zeros(len(thresholds) + 1)
    if n_fp:
        fps[1:] = cum_fp / n_fp * n_fp / float(n_scans)
    if not n_nodules:
        nan = np.full(len(rates), np.nan)
        return {"fps": fps, "sens": np.full(len(fps), np.nan), "thresholds": thresholds, "rates": rates,
                "sensitivities": nan, "cpm": None}
    sens = np.zeros(len(thresholds) + 1)
    if n_tp:
        sens[1:] = cum_tp / n_tp * n_tp / float(n_nodules)
    at = interp_curve(rates, fps, sens)
    return {"fps": fps, "sens": sens, "thresholds": thresholds, "rates": rates, "sensitivities": at,
            "cpm": float(np.mean(at))}


# ----------------------------------------------------------------------------- size bins

def size_bin(diameter_mm, edges=None):
    """Name of the diameter bin: '<5', '5-10', '10-20', '>=20' for edges (5, 10, 20) (default SIZE_BINS)."""
    edges = SIZE_BINS if edges is None else edges
    names = size_bin_names(edges)
    return names[int(np.searchsorted(np.asarray(edges, float), float(diameter_mm), side="right"))]


def size_bin_names(edges=None):
    """The bin names of ``edges`` (default SIZE_BINS), smallest first."""
    edges = SIZE_BINS if edges is None else edges
    fmt = lambda v: f"{float(v):g}"
    return ([f"<{fmt(edges[0])}"] + [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]
            + [f">={fmt(edges[-1])}"])


# ----------------------------------------------------------------------------- summaries

def _fraction(hit):
    hit = np.asarray(hit, bool)
    return {"value": float(hit.mean()) if len(hit) else float("nan"), "found": int(hit.sum()), "total": len(hit)}


def scan_draws(n_scans, n_boot=1000, seed=0):
    """``n_boot`` bootstrap draws: how often each scan is drawn (n_scans draws with replacement). Seeded."""
    rng = np.random.default_rng(seed)
    return (np.bincount(rng.integers(0, n_scans, n_scans), minlength=n_scans) for _ in range(int(n_boot)))


def bootstrap_cpm(diameters, nodule_scores, nodule_scan, fp_scores, fp_scan, n_scans, size_edges=None, rates=None,
                  n_boot=1000, seed=0):
    """95 % intervals of the CPM (overall and by size) and of the sensitivities at ``rates``: the part's scans
    drawn with replacement ``n_boot`` times (a scan drawn twice counts twice: its nodules, false positives and
    FP/scan share), FROC and CPM recomputed on each draw, percentiles 2.5 and 97.5 (draws without a nodule of a
    size are left out of that size's interval). ``nodule_scan`` / ``fp_scan``: the scan index (0 .. n_scans - 1)
    of each nodule / false positive; scans with neither (failed, empty) still count. Seeded: reproducible."""
    size_edges = SIZE_BINS if size_edges is None else size_edges
    rates = FROC_RATES if rates is None else rates
    scores = np.asarray(nodule_scores, np.float64).reshape(-1)
    fp = np.asarray(fp_scores, np.float64).reshape(-1)
    nod_scan, fp_scan = np.asarray(nodule_scan, np.int64), np.asarray(fp_scan, np.int64)
    bins = np.array([size_bin(d, size_edges) for d in np.asarray(diameters, np.float64).reshape(-1)], object)
    names = ["all"] + list(size_bin_names(size_edges))
    cpms, sens = {k: [] for k in names}, []
    for counts in scan_draws(n_scans, n_boot, seed):
        w_nod, fp_draw = counts[nod_scan], np.repeat(fp, counts[fp_scan])
        for k in names:
            sel = slice(None) if k == "all" else bins == k
            c = froc(np.repeat(scores[sel], w_nod[sel]), fp_draw, n_scans, rates)
            if c["cpm"] is not None:
                cpms[k].append(c["cpm"])
                if k == "all":
                    sens.append(c["sensitivities"])
    ci = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else None
    return {"cpm": ci(cpms["all"]), "cpm_by_size": {k: ci(cpms[k]) for k in names[1:]},
            "sensitivities": [ci(np.asarray(sens)[:, i]) if sens else None for i in range(len(rates))],
            "n_boot": int(n_boot), "definition": DEFINITIONS["ci95"]}


def paired_cpm_difference(ev_a, ev_b, n_scans, rates=None, n_boot=1000, seed=0):
    """CPM of list B minus list A's on the same scans (evaluate_lists's dicts), with a paired 95 % interval (each
    draw of scan_draws resamples both alike) -> {a, b, difference, ci95, b_higher: share of draws B is higher}."""
    if list(ev_a["nodule_scan"]) != list(ev_b["nodule_scan"]):
        raise ValueError("paired_cpm_difference: the two lists are not scored against the same nodules")
    nod, lists = np.asarray(ev_a["nodule_scan"], np.int64), [(np.asarray(e["scores"], np.float64), np.asarray(
        e["fp_scores"], np.float64), np.asarray(e["fp_scan"], np.int64)) for e in (ev_a, ev_b)]
    cpm = lambda w: [froc(np.repeat(sc, w[nod]), np.repeat(fp, w[fs]), n_scans, rates)["cpm"] for sc, fp, fs in lists]
    a, b = cpm(np.ones(n_scans, np.int64))
    d = np.array([y - x for x, y in map(cpm, scan_draws(n_scans, n_boot, seed)) if x is not None and y is not None])
    return {"a": a, "b": b, "difference": None if a is None or b is None else b - a, "n_boot": len(d),
            "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))] if len(d) else None,
            "b_higher": float(np.mean(d > 0)) if len(d) else None}


def froc_summary(diameters, nodule_scores, fp_scores, n_scans, size_edges=None, rates=None, nodule_scan=None,
                 fp_scan=None, n_boot=1000):
    """FROC, CPM and candidate recall, overall and by nodule size -> (metrics dict with the keys froc, cpm,
    candidate_recall, curves {"all": froc(...), bin: froc(...)}).

    diameters, nodule_scores: one per included truth nodule of the evaluated scans (score NaN: no candidate hit
    it); fp_scores: every false-positive candidate's score; n_scans: every scan of the evaluated part. Given the
    scan index of each nodule and false positive (``nodule_scan``, ``fp_scan``), the CPM and the sensitivities
    get 95 % bootstrap intervals over the scans (bootstrap_cpm, ``n_boot`` draws; 0 = none)."""
    size_edges = SIZE_BINS if size_edges is None else size_edges
    rates = FROC_RATES if rates is None else rates
    scores = np.asarray(nodule_scores, np.float64).reshape(-1)
    bins = np.array([size_bin(d, size_edges) for d in np.asarray(diameters, np.float64).reshape(-1)], object)
    curves = {"all": froc(scores, fp_scores, n_scans, rates)}
    for name in size_bin_names(size_edges):
        curves[name] = froc(scores[bins == name], fp_scores, n_scans, rates)
    sens = lambda c: [float(s) for s in c["sensitivities"]]
    found = ~np.isnan(scores)
    D = DEFINITIONS
    metrics = {
        "froc": {"fp_rates": [float(r) for r in rates], "sensitivities": sens(curves["all"]),
                 "by_size": {k: sens(c) for k, c in curves.items() if k != "all"},
                 "n_scans": int(n_scans), "n_false_positives": int(np.size(fp_scores)), "definition": D["froc"]},
        "cpm": {"value": curves["all"]["cpm"], "by_size": {k: c["cpm"] for k, c in curves.items() if k != "all"},
                "definition": D["cpm"]},
        "candidate_recall": {**_fraction(found), "by_size": {k: _fraction(found[bins == k])
                                                             for k in size_bin_names(size_edges)},
                             "definition": D["candidate_recall"]},
    }
    if nodule_scan is not None and fp_scan is not None and n_boot > 0 and len(scores):
        ci = bootstrap_cpm(diameters, scores, nodule_scan, fp_scores, fp_scan, int(n_scans), size_edges, rates, n_boot)
        metrics["cpm"]["ci95"], metrics["cpm"]["ci95_by_size"] = ci["cpm"], ci["cpm_by_size"]
        metrics["froc"]["sensitivities_ci95"] = ci["sensitivities"]
        metrics["cpm"]["ci95_definition"] = ci["definition"]
    return metrics, curves


def _nodule_block(rows):
    """Sensitivity, thesis-rule sensitivity and per-nodule Dice (all, found) of some nodules.csv rows."""
    found = np.array([r["found"] for r in rows], bool)
    dices = np.array([r["dice"] for r in rows], np.float64)
    labelled = ~np.isnan(dices)
    return {"sensitivity": _fraction(found),
            "thesis": _fraction([r["found_thesis_rule"] for r in rows])["value"],
            "dice": float(dices[labelled].mean()) if labelled.any() else float("nan"),
            "n_labelled": int(labelled.sum()),
            "dice_found": float(dices[found & labelled].mean()) if (found & labelled).any() else float("nan")}


def evaluation_statement(n_excluded, n_boot=1000):
    """What a report's figures come from: the evaluation, whether excluded findings were used, the CPM reading
    convention and the interval method (every report states them)."""
    return {"evaluation": "official-equivalent LUNA16 FROC (metrics.py; the same CPM and sensitivities as "
                          "noduleCADEvaluationLUNA16.py on every edge case of tests/fixtures/luna16_eval, except "
                          "no nodule hit: 0 here, NaN there; docs/evaluation.md)",
            "excluded_findings": (f"used: {int(n_excluded)} excluded finding(s), candidates within them neither hits "
                                  "nor false positives") if n_excluded else "none in the truth of these scans",
            "cpm_reading": "mean of the sensitivities read exactly at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan on the "
                           "curve (np.interp), not at the official plot's sampled points",
            "interval": f"95 % bootstrap over scans, {int(n_boot)} seeded draws with replacement, percentiles "
                        "2.5 / 97.5" if n_boot else "none"}


def summarize(results, size_edges=None, rates=None, n_failed=0):
    """Per-scan results (evaluation.evaluate_scan's dicts, one per evaluated scan) -> (the metrics dict written
    to metrics.json, FROC curves overall and by size). ``n_failed`` scans of the part that failed count in
    FP/scan (as scans without candidates). Each result holds: nodules (one dict per included truth nodule:
    diameter_mm, found, found_thesis_rule, dice, candidate_prob), is_fp and is_ignored (the components at the
    threshold), candidates (with "prob"), candidate_is_fp, candidate_is_ignored, n_excluded, dice_counts,
    dice_counts_nodule_slices. Defaults: SIZE_BINS, FROC_RATES."""
    size_edges = SIZE_BINS if size_edges is None else size_edges
    rates = FROC_RATES if rates is None else rates
    n_scans = len(results) + int(n_failed)            # FP/scan divides by every scan of the part
    nod = [r for res in results for r in res["nodules"]]
    for r in nod:
        r["size_bin"] = size_bin(r["diameter_mm"], size_edges)
    n_fp = int(sum(int(np.sum(res["is_fp"])) for res in results))
    fp_scores = (np.concatenate([np.asarray(res["candidates"]["prob"], np.float64)[res["candidate_is_fp"]]
                                 for res in results]) if results else np.zeros(0))
    nodule_scan = [i for i, res in enumerate(results) for _ in res["nodules"]]      # for the bootstrap interval
    fp_scan = [i for i, res in enumerate(results) for _ in range(int(np.sum(res["candidate_is_fp"])))]
    pooled = np.sum([res["dice_counts"] for res in results], axis=0) if results else np.zeros(3)
    pooled_ns = np.sum([res["dice_counts_nodule_slices"] for res in results], axis=0) if results else np.zeros(3)

    overall = _nodule_block(nod)
    by_size = {name: _nodule_block([r for r in nod if r["size_bin"] == name]) for name in size_bin_names(size_edges)}
    detection, curves = froc_summary([r["diameter_mm"] for r in nod], [r["candidate_prob"] for r in nod],
                                     fp_scores, max(n_scans, 1), size_edges, rates, nodule_scan, fp_scan)
    D = DEFINITIONS
    metrics = {
        "n_scans": len(results), "n_scans_failed": int(n_failed), "n_nodules": len(nod),
        "n_excluded_annotations": int(sum(res["n_excluded"] for res in results)),
        "n_components": int(sum(len(res["is_fp"]) for res in results)),
        "n_false_positives": n_fp,
        "n_ignored_components": int(sum(int(np.sum(res["is_ignored"])) for res in results)),
        "n_candidates": int(sum(len(res["candidates"]) for res in results)),
        "n_ignored_candidates": int(sum(int(np.sum(res["candidate_is_ignored"])) for res in results)),
        "slice_dice": {"value": dice(*pooled) if results else None, "intersection": int(pooled[0]), "pred_voxels": int(pooled[1]),
                       "truth_voxels": int(pooled[2]), "definition": D["slice_dice"]},
        "slice_dice_nodule_slices": {"value": dice(*pooled_ns) if results else None, "definition": D["slice_dice_nodule_slices"]},
        "nodule_dice": {"value": overall["dice"], "n_nodules": overall["n_labelled"],
                        "by_size": {k: v["dice"] for k, v in by_size.items()}, "definition": D["nodule_dice"]},
        "nodule_dice_found": {"value": overall["dice_found"],
                              "by_size": {k: v["dice_found"] for k, v in by_size.items()},
                              "definition": D["nodule_dice_found"]},
        "sensitivity": {**overall["sensitivity"], "by_size": {k: v["sensitivity"] for k, v in by_size.items()},
                        "definition": D["sensitivity"]},
        "fp_per_scan": {"value": n_fp / n_scans if n_scans else float("nan"), "n_false_positives": n_fp,
                        "n_scans": n_scans, "definition": D["fp_per_scan"]},
        "sensitivity_thesis_rule": {"value": overall["thesis"],
                                    "by_size": {k: v["thesis"] for k, v in by_size.items()},
                                    "definition": D["sensitivity_thesis_rule"]},
        **detection,
        "size_bins_mm": list(size_bin_names(size_edges)), "by_size_definition": D["by_size"],
        "evaluation": evaluation_statement(sum(res["n_excluded"] for res in results)),
    }
    return metrics, curves


# ----------------------------------------------------------------------------- the command: python metrics.py

def read_table(path, columns, what):
    """A LUNA16 CSV (a header naming seriesuid and ``columns``) -> {seriesuid: float array (n, len(columns))}, rows
    in file order. A missing file or column, or a value that is no number, ends the run with one line."""
    import csv
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise SystemExit(f"{path}: cannot read the {what}: {e.strerror}")
    head = [h.strip() for h in rows[0]] if rows else []
    missing = [c for c in ("seriesuid",) + tuple(columns) if c not in head]
    if missing:
        raise SystemExit(f"{path}: the {what} have no column {', '.join(missing)} (header: {','.join(head)})")
    uid, cols, out = head.index("seriesuid"), [head.index(c) for c in columns], {}
    for n, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            values = [float(row[i]) for i in cols]
        except (ValueError, IndexError):
            raise SystemExit(f"{path}:{n}: expected numbers in {', '.join(columns)}, got {','.join(row)}") from None
        out.setdefault(row[uid].strip(), []).append(values)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def read_scans(path):
    """The seriesuids of a scan list (first column, one a line; a header "seriesuid" skipped, repeats once)."""
    import csv
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            uids = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
    except OSError as e:
        raise SystemExit(f"{path}: cannot read the scan list: {e.strerror}")
    uids = uids[1:] if uids[:1] == ["seriesuid"] else uids
    return list(dict.fromkeys(uids))


def evaluate_lists(annotations, candidates, excluded, scans, max_candidates=MAX_CANDIDATES):
    """LUNA16's evaluation of candidate lists: {uid: (n, 4) x, y, z, diameter} annotations and excluded findings,
    {uid: (n, 4) x, y, z, score} candidates, the evaluated scans (a list of uids) -> dict of the per-nodule and
    per-false-positive arrays froc_summary takes (diameters, scores, fp_scores, nodule_scan, fp_scan) and the
    counts the official script reports. Candidates and annotations of scans not in ``scans`` are left out."""
    none = np.zeros((0, 4))
    diam, scores, nod_scan, fp_scores, fp_scan = [], [], [], [], []
    n = dict.fromkeys(("candidates", "false_positives", "ignored_on_excluded", "further_hits", "excluded",
                       "over_max_candidates", "scans_without_candidates"), 0)
    for i, uid in enumerate(scans):
        cand, ann, exc = candidates.get(uid, none), annotations.get(uid, none), excluded.get(uid, none)
        keep = top_candidates(cand[:, 3], max_candidates)
        n["over_max_candidates"] += int((~keep).sum())
        cand = cand[keep]
        both = np.concatenate([ann, exc])
        is_exc = np.arange(len(both)) >= len(ann)
        hits = match_candidates(cand[:, :3], both[:, :3], both[:, 3])
        found, score, is_fp, is_ignored = detect(hits, cand[:, 3], is_exc)
        diam += list(np.where(ann[:, 3] < 0, UNKNOWN_DIAMETER_MM, ann[:, 3]))
        scores += list(score[~is_exc])
        nod_scan += [i] * len(ann)
        fp_scores += list(cand[is_fp, 3])
        fp_scan += [i] * int(is_fp.sum())
        n["candidates"] += len(cand)
        n["scans_without_candidates"] += int(len(cand) == 0)
        n["false_positives"] += int(is_fp.sum())
        n["ignored_on_excluded"] += int(is_ignored.sum())
        n["further_hits"] += int(np.maximum(hits[:, ~is_exc].sum(axis=0) - 1, 0).sum())
        n["excluded"] += len(exc)
    listed = set(scans)
    n["outside_scans"] = int(sum(len(v) for k, v in candidates.items() if k not in listed))
    n.update(scans=len(scans), nodules=len(scores), found=int(np.sum(~np.isnan(scores))))
    return {"diameters": diam, "scores": scores, "nodule_scan": nod_scan, "fp_scores": fp_scores,
            "fp_scan": fp_scan, "counts": n}


def evaluate_files(cfg):
    """The settings' files -> the figures (the dict ``OUT`` holds): counts, froc, cpm, candidate_recall."""
    if not cfg.ANNOTATIONS or not cfg.CANDIDATES:
        raise SystemExit("metrics.py needs --ANNOTATIONS=annotations.csv and --CANDIDATES=candidates.csv (--help)")
    ann = read_table(cfg.ANNOTATIONS, ("coordX", "coordY", "coordZ", "diameter_mm"), "annotations")
    cand_cols = ("coordX", "coordY", "coordZ", "probability")
    cand = read_table(cfg.CANDIDATES, cand_cols, "candidates")
    exc = read_table(cfg.EXCLUDED, ("coordX", "coordY", "coordZ", "diameter_mm"), "excluded findings") \
        if cfg.EXCLUDED else {}
    scans = read_scans(cfg.SCANS) if cfg.SCANS else sorted(set(ann) | set(cand))
    if not scans:
        raise SystemExit(f"{cfg.SCANS or cfg.CANDIDATES}: no scan to evaluate")
    ev = evaluate_lists(ann, cand, exc, scans, cfg.MAX_CANDIDATES)
    summary, _ = froc_summary(ev["diameters"], ev["scores"], np.asarray(ev["fp_scores"]), len(scans), cfg.SIZE_BINS,
                              FROC_RATES, ev["nodule_scan"], ev["fp_scan"], cfg.BOOTSTRAP)
    by_size = {k: int(np.sum(np.array([size_bin(d, cfg.SIZE_BINS) for d in ev["diameters"]], object) == k))
               for k in size_bin_names(cfg.SIZE_BINS)}
    res = {"settings": {k: cfg[k] for k in _SETTINGS}, "counts": {**ev["counts"], "nodules_by_size": by_size},
           "n_boot": int(cfg.BOOTSTRAP) if "ci95" in summary["cpm"] else 0, **summary, "reading": DEFINITIONS["reading"]}
    if cfg.COMPARE:
        b = evaluate_lists(ann, read_table(cfg.COMPARE, cand_cols, "candidates"), exc, scans, cfg.MAX_CANDIDATES)
        res["compare"] = {"candidates": cfg.COMPARE, **paired_cpm_difference(ev, b, len(scans), None, cfg.BOOTSTRAP)}
    return res


def evaluate_paths(annotations, candidates, excluded="", scans="", n_boot=BOOTSTRAP, size_bins=SIZE_BINS,
                   max_candidates=MAX_CANDIDATES):
    """evaluate_files with its settings as arguments: the figures ``python metrics.py`` prints for these files."""
    from configurator import Config
    return evaluate_files(Config(ANNOTATIONS=annotations, CANDIDATES=candidates, EXCLUDED=excluded, SCANS=scans,
                                 BOOTSTRAP=int(n_boot), OUT="", SIZE_BINS=tuple(size_bins),
                                 MAX_CANDIDATES=int(max_candidates), COMPARE=""))


def _fmt(v, width=6):
    return f"{v:{width}.3f}" if v is not None and np.isfinite(v) else "n/a".rjust(width)


def report_text(res):
    """What the command prints: the counts, the CPM with its interval, the sensitivities at the rates, by size."""
    c, cpm, fr = res["counts"], res["cpm"], res["froc"]
    ci = cpm.get("ci95")
    lines = [f"{c['scans']} scans ({c['scans_without_candidates']} without candidates), {c['nodules']} nodules, "
             f"{c['excluded']} excluded findings",
             f"{c['candidates']} candidates evaluated ({c['over_max_candidates']} over the "
             f"{res['settings']['MAX_CANDIDATES']} a scan and {c['outside_scans']} of scans not evaluated left out): "
             f"{c['found']} nodules hit, "
             f"{c['false_positives']} false positives, {c['ignored_on_excluded']} ignored on excluded findings, "
             f"{c['further_hits']} further hits on a nodule",
             f"CPM {_fmt(cpm['value'], 0)}" + (f" (95 % interval {_fmt(ci[0], 0)}-{_fmt(ci[1], 0)}, {res['n_boot']} "
                                               "bootstrap draws of the scans)" if ci else ""),
             "", f"{'nodules':14s}{'n':>4s}{'CPM':>7s}" + "".join(f"{r:>7g}" for r in fr["fp_rates"])
             + "   <- sensitivity at FP/scan"]
    row = lambda name, n, v, sens: f"{name:14s}{n:>4}{_fmt(v, 7)}" + "".join(_fmt(s, 7) for s in sens)
    lines.append(row("all", c["nodules"], cpm["value"], fr["sensitivities"]))
    if fr.get("sensitivities_ci95"):
        for j, name in ((0, "  2.5 %"), (1, "  97.5 %")):
            bounds = [b[j] if b else None for b in fr["sensitivities_ci95"]]
            lines.append(row(name, "", (ci or [None, None])[j], bounds))
    for k, sens in fr["by_size"].items():
        lines.append(row(f"{k} mm", c["nodules_by_size"][k], cpm["by_size"][k], sens))
    cmp = res.get("compare")
    if cmp:                                     # the difference, and its paired interval when there are draws
        d = cmp["ci95"] and f" (paired 95 % interval {_fmt(cmp['ci95'][0], 0)} to {_fmt(cmp['ci95'][1], 0)}; higher in {100 * cmp['b_higher']:.0f} % of draws)"
        lines += ["", f"COMPARE {cmp['candidates']}: CPM {_fmt(cmp['b'], 0)} minus {_fmt(cmp['a'], 0)} = {_fmt(cmp['difference'], 0)}{d or ''}"]
    return "\n".join(lines)


def main(argv=None):
    """Score a candidates file against annotations (LUNA16's evaluation); print the figures, write them to OUT."""
    import sys
    from configurator import configure
    namespace = {k: v for k, v in globals().items() if k in _SETTINGS + ("__doc__", "__file__")}
    cfg = configure(namespace, sys.argv[1:] if argv is None else argv)
    res = evaluate_files(cfg)
    print(report_text(res))
    if cfg.OUT:
        import runfiles
        os.makedirs(os.path.dirname(os.path.abspath(cfg.OUT)), exist_ok=True)
        runfiles.write_json(cfg.OUT, res)
        print(f"written: {cfg.OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
