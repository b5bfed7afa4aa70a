"""Stage 6's network: the small 3D CNN that rescores candidates, its prediction (with flips), the final score of
a candidate, and the evaluation of a scoring with metrics.py (fp_reduction.py trains and runs it).

    model = build_model(side, width=16, blocks=3, dense=64, dropout=0.3, lr=1e-3)
    p6 = predict(model, x, tta=8, batch=64)                  # x: (N, S, S, S) inputs in [-1, 1]
    score = combine(p5, p6, "product")
    r = score_scan(path, model, table.of, side, cfg)          # one scan's candidates rescored
    before, after, timing = score_scans(model, model_path, paths, table, side, "fp", out_dir, failed, cfg)
    ev = Evaluation(threshold, max_candidates); ev.add(...); m, curves = ev.summary(size_edges, rates)

``cfg`` is stage 6's settings (fp_reduction.py's constants by name: VOXEL_MM, HU_WINDOW, PREDICT_BATCH, TTA,
THRESHOLD, MAX_CANDIDATES, FROC_RATES, DASK_SCHEDULER and the BLOB_* settings). ``score_scans`` streams a part
scan by scan (one HU volume in memory at a time), here or as tasks on a dask cluster (the settings travel in
each task), and writes candidates.csv / candidates_detail.csv with candidates.CandidateWriter; with FINDINGS, the
candidates above THRESHOLD are measured where the scan is scored (findings.measure_scan, on the stage-5 prediction
in PRED_DIR_USED) and written to OUT_DIR/findings/ (findings.FindingsFolder) and candidates_detail.csv.
"""
import contextlib
import json
import os
import sys
import threading
import time

import numpy as np

import candidates
import ct_io
import dask_tasks
import findings
import metrics
import runfiles
from fp_patches import (KIND_CANDIDATE, augment_crop, extract_patches, label_candidates, nodule_arrays,
                        patch_offsets, to_uint8, uint8_to_input)

COMBINE_CHOICES = ("fp", "product", "mean")     # how a candidate's final score is made (see combine)


# ----------------------------------------------------------------------------- the network

def build_model(side, width, blocks, dense, dropout, lr):
    """The stage-6 network: (side, side, side, 1) patch -> probability that a nodule is at its centre.
    ``blocks`` x [conv 3x3x3 (width * 2^b filters) + batch norm + ReLU + max-pool 2], flatten (the position of
    what is seen matters: a nodule must be at the centre), dropout, dense + ReLU, dropout, dense + sigmoid;
    compiled with Adam at ``lr`` and binary cross-entropy."""
    import keras
    from keras import layers
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
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="binary_crossentropy")
    return model


def flips(x, k):
    """The k-th of 8 flip combinations of a batch (N, Z, Y, X, C) (k = 0: unchanged)."""
    axes = tuple(a + 1 for a in range(3) if (k >> a) & 1)
    return np.flip(x, axis=axes) if axes else x


def predict(model, x, tta, batch):
    """Probabilities (N,) of a batch of network inputs (N, S, S, S) or (N, S, S, S, 1); mean over ``tta`` flips,
    ``batch`` patches per call; ``model`` a network or a list of them (an ensemble: the mean over them too)."""
    models = model if isinstance(model, (list, tuple)) else [model]
    x = np.asarray(x, np.float32)
    if x.ndim == 4:
        x = x[..., None]
    out = np.zeros(len(x), np.float64)
    n = max(int(tta), 1)
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        acc = np.zeros(len(xb))
        for m in models:
            for k in range(n):
                acc += np.asarray(m.predict_on_batch(np.ascontiguousarray(flips(xb, k)))).reshape(-1)
        out[i:i + batch] = acc / (n * len(models))
    return out


def combine(p5, p6, how):
    """The final score of a candidate from its stage-5 (p5; NaN = none) and stage-6 (p6) probabilities: "fp"
    p6 alone, "product" p5 x p6, "mean" their mean (p6 alone when a p5 is missing)."""
    p5, p6 = np.asarray(p5, np.float64), np.asarray(p6, np.float64)
    if how == "fp" or not np.all(np.isfinite(p5)):
        return p6
    if how == "product":
        return p5 * p6
    if how == "mean":
        return (p5 + p6) / 2.0
    raise ValueError(f"COMBINE={how!r}: expected one of {COMBINE_CHOICES}")


def chosen_combine(how, best_val):
    """COMBINE, or with "auto" the combination with the best validation CPM of the chosen checkpoint ("fp" on a
    tie or without validation candidates)."""
    if how != "auto":
        return how
    by = {k: v for k, v in (best_val.get("cpm_by_combine") or {}).items() if v is not None}
    chosen = max(COMBINE_CHOICES, key=lambda k: (by.get(k, -1.0), k == "fp")) if by else "fp"
    print(f"COMBINE=auto: validation CPM by combination {json.dumps({k: round(v, 4) for k, v in by.items()})}"
          f" -> {chosen}")
    return chosen


# ----------------------------------------------------------------------------- scoring a scan

def score_scan(path, model, lookup, side, cfg):
    """One scan's candidates (``lookup(uid)`` -> (xyz, p5, ...)), blobs added (BLOB_CANDIDATES), rescored by
    ``model`` -> dict: uid, xyz, p5, p6, is_blob, nodules (xyz, diameter, excluded), blob_seconds, seconds, and
    with FINDINGS the findings (findings.measure_scan's dict). Raises on a scan that cannot be read."""
    t0 = time.perf_counter()
    blob = candidates.BlobSettings.from_config(cfg)
    with_findings = bool(cfg.get("FINDINGS", False))
    scan = ct_io.read_stage1(path, ("hu", "lung_mask") if blob.n > 0 or with_findings else ("hu",))
    a = scan["attrs"]
    uid = str(a.get("seriesuid", runfiles.uid_of(path)))
    geo = (a["origin"], a["spacing"], a["direction"])
    xyz, p5 = lookup(uid)[:2]
    xyz, p5, is_blob, blob_sec = candidates.with_blobs(scan, xyz, p5, blob)
    p6 = np.zeros(len(xyz))
    batch, voxel = cfg["PREDICT_BATCH"], cfg["VOXEL_MM"]
    offsets = patch_offsets(side, voxel, *geo)
    for i in range(0, len(xyz), batch):
        hu_p = extract_patches(scan["hu"], *geo, xyz[i:i + batch], side, voxel, offsets)
        x = uint8_to_input(to_uint8(hu_p, cfg["HU_WINDOW"]))     # as the training patches are stored
        p6[i:i + len(x)] = predict(model, x, cfg["TTA"], batch)
    vox = ct_io.world_to_voxel(np.asarray(xyz, np.float64).reshape(-1, 3), *geo).reshape(-1, 3)
    outside = int(np.sum(((vox < -0.5) | (vox > np.asarray(scan["hu"].shape) - 0.5)).any(axis=1)))
    found = None
    if with_findings:
        pred = runfiles.file_in(cfg["PRED_DIR_USED"], uid, ".h5") if cfg.get("PRED_DIR_USED") else ""
        found = findings.measure_scan(scan, pred, xyz, p5, p6, combine(p5, p6, cfg["COMBINE_USED"]), cfg["THRESHOLD"],
                                      findings.FindingSettings.from_config(cfg))
    return {"uid": uid, "xyz": xyz, "p5": p5, "p6": p6, "is_blob": is_blob, "nodules": nodule_arrays(scan["nodules"]),
            "blob_seconds": blob_sec, "seconds": time.perf_counter() - t0, "n_outside": outside, "findings": found}


# ----------------------------------------------------------------------------- scoring a part (here or on dask)

_WORKER_MODELS = {}             # on a dask worker: the stage-6 model of each model file, loaded once per worker process
_WORKER_LOCK = threading.Lock()


def _error_line(path, e):
    msg = runfiles.one_line(e)
    return msg if isinstance(e, ct_io.ScanError) else f"{path}: {type(e).__name__}: {msg}"


def _score_on_worker(task):
    """One scan on a dask worker: score_scan with the run's settings (in the task) and this worker's cached
    model -> ("done", score_scan's dict) or ("failed", one-line error)."""
    path, cfg, model_path, rows, side = task
    try:
        files = [p.strip() for p in model_path.split(",") if p.strip()]
        key = tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files)
        with _WORKER_LOCK:
            if key not in _WORKER_MODELS:
                import nasnet_v2  # noqa: F401  (first: TensorFlow's CPU allocator)
                import keras
                _WORKER_MODELS[key] = [keras.saving.load_model(p, compile=False) for p in files]
        return "done", score_scan(path, _WORKER_MODELS[key], lambda uid: rows, side, cfg)
    except Exception as e:
        return "failed", _error_line(path, e)


def _scan_scores(paths, model, model_path, table, side, cfg):
    """(path, score_scan's dict or None, error line or None) per scan, in path order: computed here, or with
    DASK_SCHEDULER by the cluster's workers (_score_on_worker; each task carries the settings and its scan's
    candidate rows, by the stage-1 file's name)."""
    if not cfg.DASK_SCHEDULER:
        for path in paths:
            try:
                yield path, score_scan(path, model, table.of, side, cfg), None
            except Exception as e:
                yield path, None, _error_line(path, e)
        return
    a = os.path.abspath                               # absolute paths: the workers' folder may differ
    tasks = [(a(p), cfg, ",".join(a(m) for m in model_path.split(",")), table.of(runfiles.uid_of(p))[:2], side)
             for p in paths]
    for path, (_, out, err) in zip(paths, dask_tasks.run_in_order(cfg.DASK_SCHEDULER, _score_on_worker, tasks,
                                                                  names=paths)):
        status, value = out if err is None else ("failed", err)
        yield (path, value, None) if status == "done" else (path, None, value)


def _add_scan(r, how, before, after, writer, tally, cfg, folder=None):
    """One scored scan: its candidates into the evaluations (stage 5's scores, the final scores) and the files
    (``folder``: the findings folder, or None)."""
    uid, xyz, p5, p6, is_blob = r["uid"], r["xyz"], r["p5"], r["p6"], r["is_blob"]
    nod_xyz, diam, excl = r["nodules"]
    if r.get("n_outside"):
        from tqdm import tqdm
        tqdm.write(f"warning: {uid}: {r['n_outside']} candidate(s) outside the scan volume (scored on patches of "
                   f"the repeated edge voxels)", file=sys.stderr)
    score = combine(p5, p6, how)
    after.add(xyz, score, nod_xyz, diam, excl)
    if before is not None:
        before.add(xyz, p5, nod_xyz, diam, excl)
    tp, fp, _ = label_candidates(xyz, nod_xyz, diam, excl)
    hit = metrics.match_candidates(xyz, nod_xyz, diam)[:, ~excl].any(axis=0)
    tally["found"] += int(hit.sum())
    tally["total"] += int(len(hit))
    found = r.get("findings")
    for i, (c, s5, s6, s, t, f, b) in enumerate(zip(xyz, p5, p6, score, tp, fp, is_blob)):
        writer.write(uid, c, s, stage5_probability="" if not np.isfinite(s5) else f"{float(s5):.6f}",
                     stage6_probability=f"{s6:.6f}", status="TP" if t else ("FP" if f else "ignored"),
                     source="blob" if b else "stage5", **findings.detail_columns(found, i))
    if folder is not None and found is not None:
        try:
            folder.add_scan(found)
        except Exception as e:                        # the scores stand; the scan's findings files are said missing
            from tqdm import tqdm
            tqdm.write(f"warning: {uid}: findings files not written ({type(e).__name__}: {runfiles.one_line(e)})",
                       file=sys.stderr)
    tally["seconds"].append(r["seconds"])
    if cfg.BLOB_CANDIDATES > 0:
        tally["blob_seconds"].append(r["blob_seconds"])
        tally["n_blobs"] += int(is_blob.sum())


_DETAIL_FIELDS = ["stage5_probability", "stage6_probability", "status", "source"]   # candidates_detail.csv's own
                                                                                     # (+ findings.DETAIL_FIELDS)


def score_scans(model, model_path, paths, table, side, how, out_dir, failed, cfg):
    """Rescore every candidate of ``paths`` scan by scan (here, or on DASK_SCHEDULER's workers); write
    candidates.csv and candidates_detail.csv (candidates.CandidateWriter: streamed, renamed at the end) ->
    (Evaluation before, Evaluation after, timing dict)."""
    from tqdm import tqdm
    before = Evaluation(cfg.THRESHOLD, cfg.MAX_CANDIDATES) if table.has_prob else None
    after = Evaluation(cfg.THRESHOLD, cfg.MAX_CANDIDATES)
    tally = {"found": 0, "total": 0, "seconds": [], "blob_seconds": [], "n_blobs": 0}
    on = bool(cfg.get("FINDINGS", False))
    folder = findings.FindingsFolder(out_dir, cfg.THRESHOLD, findings.FindingSettings.from_config(cfg),
                                     lambda line: tqdm.write(line, file=sys.stderr)) if on else contextlib.nullcontext()
    with candidates.CandidateWriter(out_dir, _DETAIL_FIELDS + (findings.DETAIL_FIELDS if on else [])) as writer, \
            folder:
        bar = tqdm(total=len(paths), desc="fp_reduction scoring", unit="scan")
        for path, r, err in _scan_scores(paths, model, model_path, table, side, cfg):
            bar.update(1)
            if err is not None:
                tqdm.write(f"FAILED {err}; skipped", file=sys.stderr)
                failed.append({"path": path, "error": err})
                for ev in (after, before):
                    if ev is not None:
                        ev.add_failed()
                continue
            _add_scan(r, how, before, after, writer, tally, cfg, folder if on else None)
            bar.set_postfix(candidates=writer.n)
        bar.close()
        if paths and not tally["seconds"]:            # raised inside the writer: the earlier files stay
            raise SystemExit(f"every scan failed ({len(paths)}): {out_dir}'s candidates and report are left as "
                             f"they were")
    return before, after, _timing(tally, writer.n)


def _timing(tally, n_cand):
    seconds, blob_seconds = tally["seconds"], tally["blob_seconds"]
    recall = {"found": tally["found"], "total": tally["total"]}
    return {"seconds_per_scan": float(np.mean(seconds)) if seconds else None,
            "seconds_per_candidate": float(np.sum(seconds) / n_cand) if n_cand else None,
            "scans_scored": len(seconds), "n_candidates": n_cand, "n_blob_candidates": tally["n_blobs"],
            "blob_seconds_per_scan": float(np.mean(blob_seconds)) if blob_seconds else None,
            "candidate_recall_all": {**recall, "value": recall["found"] / recall["total"] if recall["total"] else None,
                                     "definition": "nodules within the radius of any candidate of the list, "
                                                   "without the MAX_CANDIDATES cut"}}


# ----------------------------------------------------------------------------- evaluation (metrics.py)

class Evaluation:
    """Accumulates, scan by scan, what metrics.froc_summary needs for one scoring of the candidates: each included
    nodule's best hitting score, the false positives' scores; at most ``max_candidates`` per scan (the highest
    scored, metrics.top_candidates). Also the operating point: candidates scored above ``threshold``."""

    def __init__(self, threshold, max_candidates):
        self.threshold, self.max_candidates = threshold, max_candidates
        self.diam, self.score, self.fp = [], [], []
        self.nodule_scan, self.fp_scan = [], []             # each one's scan index, for the bootstrap interval
        self.found_op, self.n_fp_op, self.n_scans, self.n_excluded = [], 0, 0, 0

    def add(self, xyz, score, nod_xyz, diam, excluded):
        self.n_scans += 1
        score = np.asarray(score, np.float64)
        keep = metrics.top_candidates(score, self.max_candidates) if len(score) else np.zeros(0, bool)
        xyz, score = np.asarray(xyz).reshape(-1, 3)[keep], score[keep]
        hits = metrics.match_candidates(xyz, nod_xyz, diam)
        _, best, is_fp, _ = metrics.detect(hits, score, excluded)
        incl = ~excluded
        self.n_excluded += int(np.sum(excluded))
        self.diam += list(diam[incl])
        self.score += list(best[incl])
        self.fp += list(score[is_fp])
        self.nodule_scan += [self.n_scans - 1] * int(incl.sum())
        self.fp_scan += [self.n_scans - 1] * int(is_fp.sum())
        above = score > self.threshold
        found, _, fp_op, _ = metrics.detect(hits[above], score[above], excluded)
        self.found_op += list(found[incl])
        self.n_fp_op += int(fp_op.sum())

    def add_failed(self):
        self.n_scans += 1

    def summary(self, size_edges, rates):
        m, curves = metrics.froc_summary(self.diam, self.score, self.fp, max(self.n_scans, 1), size_edges, rates,
                                         self.nodule_scan, self.fp_scan)
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
        m["evaluation"] = metrics.evaluation_statement(self.n_excluded)
        return m, curves


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


def validate(model, store, side, how, cfg):
    """Validation: every stored patch's stage-6 probability (centre crop) -> dict with loss (binary cross-entropy
    over all patches), auc (nodules against the rest) and cpm (metrics.py's FROC over the validation candidates
    scored by ``how``; None when the validation scans have no candidates or no nodules); cpm_by_combine for each
    of COMBINE_CHOICES."""
    meta = store.meta
    n = int(meta["n"])
    if n == 0:
        return {"loss": None, "cpm": None}
    p = np.zeros(n)
    batch = cfg["PREDICT_BATCH"]
    for i in range(0, n, batch):
        x = np.stack([augment_crop(store.patches[j], side, None, 0, 0, augment=False)
                      for j in range(i, min(i + batch, n))])
        p[i:i + len(x)] = predict(model, x, cfg["TTA"], batch)
    y = meta["label"].astype(np.float64)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    out = {"loss": float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))), "auc": auc(y > 0, p), "cpm": None,
           "cpm_by_combine": {}}
    cand = meta["kind"] == KIND_CANDIDATE
    if cand.any() and len(meta["nod_diam"]):
        for c in COMBINE_CHOICES:
            out["cpm_by_combine"][c] = _validation_cpm(meta, cand, p, c, cfg)
        out["cpm"] = out["cpm_by_combine"].get(how if how in COMBINE_CHOICES else "fp")
    return out


def _validation_cpm(meta, cand, p6, how, cfg):
    """The CPM of the validation store's candidates (``cand``) with stage-6 probabilities ``p6``, combined ``how``
    (scan by scan, as scoring does)."""
    ev = Evaluation(cfg["THRESHOLD"], cfg["MAX_CANDIDATES"])
    for k in range(len(meta["uids"]) if int(meta["n"]) else 0):
        sel = cand & (meta["scan"] == k)
        ns = meta["nod_scan"] == k
        ev.add(meta["xyz"][sel], combine(meta["p5"][sel], p6[sel], how), meta["nod_xyz"][ns], meta["nod_diam"][ns],
               meta["nod_excl"][ns].astype(bool))
    return metrics.froc(list(ev.score), ev.fp, max(ev.n_scans, 1), cfg["FROC_RATES"])["cpm"]
