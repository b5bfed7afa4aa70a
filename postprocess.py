"""Stage 5: whole-scan inference, 3D nodule components and candidates, metrics, report and pictures.

Reads
    WORK_DIR/1_preprocessed/<seriesuid>.h5   stage-1 scans: /hu, /lung_mask, /nodule_mask, /nodules, geometry
    WORK_DIR/3_split/split.json              the scans of each part (SCANS="test"; not needed for SCANS="all")
    WORK_DIR/4_model/best.keras              the network (or --MODEL=any.keras) and config.json beside it
                                             (its input geometry: network_input.InputGeometry's PIXEL_MM,
                                             CROP_MM, CONTEXT_MM, CONTEXT_SLICES, or raw pixels with CROP)
Writes
    WORK_DIR/5_predictions/<seriesuid>.h5    /prob (Z, Y, X) nodule probability and /mask uint8 (Z, Y, X), in the
                                             voxel grid of stage 1's /hu: the network's output mapped back from
                                             its input grid (0 outside the area the input covers)
    WORK_DIR/5_predictions/<seriesuid>.nii.gz  the mask in the scan's geometry: opens over the CT in 3D Slicer
    WORK_DIR/5_report/metrics.json           every metric with its definition, overall and by nodule size
    WORK_DIR/5_report/nodules.csv            one row per truth nodule: found or not, Dice, diameter, probabilities
    WORK_DIR/5_report/candidates.csv         LUNA16 submission format: seriesuid, coordX, coordY, coordZ, probability
                                             (every component of prob > CANDIDATE_THRESHOLD, <= MAX_CANDIDATES a scan)
    WORK_DIR/5_report/candidates_detail.csv  the same candidates with voxel center, size and TP / FP / ignored
                                             ("no truth" for scans without annotations)
    WORK_DIR/5_report/froc.png               the FROC curve (overall and by size) with the CPM
    WORK_DIR/5_report/pictures/              overlays of found, missed and false nodules (scans without annotations:
                                             of the top candidates); mip/ per-scan projections
    WORK_DIR/5_report/config.json            the constants this run used
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
computed by metrics.py (numpy only; evaluation.evaluate_scan only measures a scan's volumes and hands the small
results to it); the report and the tests use it and nothing else. The steps live in libraries: inference.py
(the model and its input geometry), candidates.py, evaluation.py, report.py (the files and pictures).
"""
import functools
import json
import os
import sys
import threading
import time

import numpy as np

import ct_io
import evaluation
import report
import runfiles
from candidates import find_candidates, find_components
from configurator import configure, save_config
from inference import Predictor, model_files
from metrics import summarize

# ----------------------------------------------------------------------------- settings
WORK_DIR = "work"               # root of a run; every stage's folder is below it
MODEL = ""                      # saved Keras model to evaluate, or several comma-separated (an ensemble: probabilities
                                # averaged); "" = WORK_DIR/4_model/best.keras
PRED_DIR = ""                   # "" = WORK_DIR/5_predictions
REPORT_DIR = ""                 # "" = WORK_DIR/5_report
MODEL_CONFIG = ""               # the model's input geometry (PIXEL_MM, CROP_MM, CONTEXT_MM, ...); "" = config.json beside MODEL
SCANS = "test"                  # "test" (or another part of 3_split/split.json), or "all" stage-1 scans
THRESHOLD = 0.5                 # a voxel is nodule when its probability is above this (mask, Dice, operating point) [0 .. 1]
CANDIDATE_THRESHOLD = 0.02      # candidates: components of prob above this; low, so the FROC reaches 8 FP/scan (0.02 vs
                                # 0.05 on a selection cohort: recall 37/51 vs 35/51, CPM after stage 6 0.591 vs 0.557) [0 .. 1]
MAX_CANDIDATES = 100            # candidates kept per scan, the highest scored (LUNA16's evaluation keeps at most 100) [>= 1]
CANDIDATE_PEAK = 0.5            # a candidate's center: center of mass of its voxels >= this fraction of its maximum [0 .. 1]
CANDIDATE_SPLIT_MM = 0.0        # > 0: every local maximum of a component (none higher within this many mm along each
                                # axis) is a candidate of its own, so a faint small nodule touching a vessel's component
                                # is not hidden behind the vessel's maximum; 0 = one candidate per component (measured on
                                # the selection cohort: same recall, CPM after stage 6 0.577 vs 0.591 at 0.02: off) [>= 0]
CANDIDATE_SPLIT_DIP = 0.3       # ... if the probability dips by this share of its maximum towards the nearest higher one [0 .. 1]
LUNG_GATE = True                # probability outside the stage-1 lung mask is set to 0 (the network's input is 0 there)
BINARIZE = "threshold"          # or "kmeans": the thesis's per-slice 2-cluster K-means + erosion (reproduction only)
KMEANS_EROSION = 3              # BINARIZE="kmeans": side in pixels of the square erosion element (0 = none) [>= 0]
BATCH_SIZE = 8                  # slices per prediction call [>= 1]
TTA = 1                         # test-time augmentation: mean over this many flips of the slice: 1 = none (thesis),
                                # 2 = + left-right, 4 = + up-down and both; time x TTA. On a held-out cohort (fresh seed,
                                # 82 nodules) TTA 4 / 2 / 1 gave stage-5 CPM 0.437 / 0.382 / 0.348 and CPM after stage 6
                                # 0.671 / 0.669 / 0.666: the final answer barely moves (benchmarks/RESULTS.md, "Speed")
LUNG_WINDOW_MM = -1.0           # >= 0: only the part of the network input holding the lungs (their box over the scan's
                                # slices, this margin in mm around it, on the network's 32-pixel grid) is predicted,
                                # 1.2-1.35x faster; the decoder's global pooling then sees the window: CPM after stage 6
                                # +0.020 on 3 held-out cohorts, -0.024 on the demo's test part; -1 = the whole input [>= -1]
CONNECTIVITY = 3                # 3D components: 1 = 6 face neighbours, 2 = 18 (+edges), 3 = 26 (+corners) [one of: 1, 2, 3]
MIN_COMPONENT_VOXELS = 1        # components with fewer voxels are removed from the mask and are no candidates [>= 1]
PROB_DTYPE = "float16"          # how /prob is stored: "float16" or "float32"
SIZE_BINS = (5.0, 10.0, 20.0)   # diameter bin edges in mm for the breakdowns: <5, 5-10, 10-20, >=20
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per scan where CPM reads the sensitivity
WRITE_NIFTI = True              # write each scan's mask as <seriesuid>.nii.gz in the scan's geometry
N_PICTURES = 8                  # overlay PNGs per kind: found, missed, false [>= 0]
PICTURE_HALF = 32               # half-width in pixels of an overlay's crop (grown for large nodules) [>= 4]
WRITE_MIP = True                # a maximum-intensity-projection montage of the probability per scan
OVERWRITE = False               # recompute predictions even when one from the same model, settings, stage-1 file exists
DASK_SCHEDULER = ""             # "" = scans predicted here, one after another; "tcp://host:8786" = each scan a task on
                                # that dask cluster (each worker loads the model once), the report made here

_CHOICES = {"BINARIZE": ("threshold", "kmeans"), "PROB_DTYPE": ("float16", "float32"), "TTA": (1, 2, 4)}


# ----------------------------------------------------------------------------- one scan

def file_signature(path):
    """What identifies a stage-1 file for the prediction cache: its path, size and modification time (ns); a
    preprocess rerun writes a new file, so old predictions are not reused for it."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _prediction_key(path, predictor, cfg):
    """What a prediction file was made from: the model and its input settings, the settings that made the mask,
    the stage-1 file (JSON, stored in the file's attributes)."""
    return json.dumps({**predictor.signature(), "threshold": cfg.THRESHOLD, "binarize": cfg.BINARIZE,
                       "kmeans_erosion": cfg.KMEANS_EROSION, "min_component_voxels": cfg.MIN_COMPONENT_VOXELS,
                       "connectivity": cfg.CONNECTIVITY, "prob_dtype": cfg.PROB_DTYPE, "lung_gate": cfg.LUNG_GATE,
                       "lung_window_mm": cfg.LUNG_WINDOW_MM,
                       "stage1": file_signature(path)}, sort_keys=True)


def _cached_prediction(out, key, shape, cfg):
    """(prob float32, mask) of the prediction file ``out`` when it was made with ``key`` (and OVERWRITE is off);
    None when it must be predicted."""
    if cfg.OVERWRITE or not os.path.isfile(out):
        return None
    try:
        prob, mask, attrs = report.read_prediction(out)
    except Exception:
        return None
    return (prob.astype(np.float32), mask) if attrs.get("key") == key and prob.shape == shape else None


def _predict(scan, predictor, cfg, out, key):
    """Predict a scan, binarize it and write its prediction file ``out`` -> (prob float32, exactly what /prob
    stores; mask uint8; the mask's (labels, components); seconds of inference, model loading not counted)."""
    a, hu, lung = scan["attrs"], scan["hu"], scan["lung_mask"]
    t0, load0 = time.perf_counter(), predictor.load_seconds
    prob, box = predictor.predict(hu, lung, cfg.BATCH_SIZE, a["spacing"], lung_slices_only=cfg.LUNG_GATE,
                                  window_mm=cfg.LUNG_WINDOW_MM)
    if cfg.LUNG_GATE:
        prob[lung == 0] = 0.0
    seconds = time.perf_counter() - t0 - (predictor.load_seconds - load0)
    prob = prob.astype(cfg.PROB_DTYPE).astype(np.float32)     # from here on exactly what /prob stores
    raw = evaluation.binarize(prob, cfg.BINARIZE, cfg.THRESHOLD, cfg.KMEANS_EROSION, box)
    labels, comps = find_components(raw, prob, cfg.MIN_COMPONENT_VOXELS, cfg.CONNECTIVITY)
    mask = (labels > 0).astype(np.uint8)
    report.write_prediction(out, prob.astype(cfg.PROB_DTYPE), mask,
                            {"seriesuid": str(a["seriesuid"]), "key": key, "threshold": cfg.THRESHOLD,
                             "binarize": cfg.BINARIZE, "model": _abs_models(predictor.model_path),
                             "crop_box_y0_x0_h_w": np.array([box[0].start, box[1].start, box[0].stop - box[0].start,
                                                             box[1].stop - box[1].start], np.int64),
                             "origin": np.asarray(a["origin"], np.float64),
                             "spacing": np.asarray(a["spacing"], np.float64),
                             "direction": np.asarray(a["direction"], np.float64), "inference_seconds": seconds})
    return prob, mask, (labels, comps), seconds


def _scan_candidates(prob, spacing, cfg):
    """The scan's candidates (candidates.find_candidates with this run's CANDIDATE_* settings)."""
    return find_candidates(prob, cfg.CANDIDATE_THRESHOLD, cfg.MAX_CANDIDATES, cfg.MIN_COMPONENT_VOXELS,
                           cfg.CONNECTIVITY, cfg.CANDIDATE_PEAK, cfg.CANDIDATE_SPLIT_MM,
                           tuple(float(v) for v in spacing[::-1]), cfg.CANDIDATE_SPLIT_DIP)


def _offer_pictures(book, scan, res, prob, mask, comps, cands):
    """The scan's overlays offered to ``book``: a scan without annotations its candidates; else its found and
    missed nodules and the mask's false positives."""
    hu, truth, spacing, uid = scan["hu"], scan["nodule_mask"], scan["attrs"]["spacing"], res["seriesuid"]
    if not res["annotated"]:
        for c, xyz in zip(cands, res["candidate_world"]):
            book.offer("candidate", float(c["prob"]), hu, prob, mask, truth,
                       (c["center_z"], c["center_y"], c["center_x"]), spacing, 0.0,
                       f"candidate: {uid}\nprob {c['prob']:.2f}, {c['n_voxels']} voxels, "
                       f"world x, y, z {xyz[0]:.1f}, {xyz[1]:.1f}, {xyz[2]:.1f} mm (LPS)")
        return
    nod = scan["nodules"]
    for r, n in zip(res["nodules"], nod[nod["excluded"] == 0]):
        kind = "found" if r["found"] else "missed"
        book.offer(kind, r["diameter_mm"], hu, prob, mask, truth, (n["center_z"], n["center_y"], n["center_x"]),
                   spacing, r["diameter_mm"], f"{kind}: {uid}\nnodule {r['index']}, {r['diameter_mm']:.1f} mm, "
                   f"max prob {r['max_prob']:.2f}, Dice {r['dice']:.2f}")
    for c in comps[res["is_fp"]]:
        book.offer("false", float(c["prob"]), hu, prob, mask, truth, (c["center_z"], c["center_y"], c["center_x"]),
                   spacing, 0.0, f"false positive: {uid}\n{c['n_voxels']} voxels, prob {c['prob']:.2f}")


def process_scan(path, predictor, cfg, dirs, book):
    """Predict (or reuse), write and evaluate one scan -> (evaluation.evaluate_scan's result, seconds of
    inference or None when the prediction file was reused). ``dirs``: the run's folders (_output_folders)."""
    scan = ct_io.read_stage1(path)
    a = scan["attrs"]
    uid = str(a["seriesuid"])
    out = os.path.join(dirs["pred"], f"{uid}.h5")                      # 1. the prediction: reused or made
    key = _prediction_key(path, predictor, cfg)
    cached = _cached_prediction(out, key, scan["hu"].shape, cfg)
    if cached is None:
        prob, mask, components, seconds = _predict(scan, predictor, cfg, out, key)
    else:
        (prob, mask), seconds = cached, None
        components = find_components(mask, prob, cfg.MIN_COMPONENT_VOXELS, cfg.CONNECTIVITY)
    if cfg.WRITE_NIFTI:                                                 # 2. the mask over the scan
        report.write_mask_image(os.path.join(dirs["pred"], f"{uid}.nii.gz"), mask, a["origin"], a["spacing"],
                                a["direction"])
    cands = _scan_candidates(prob, a["spacing"], cfg)                   # 3. candidates and evaluation
    res = evaluation.evaluate_scan(prob, mask, scan["nodule_mask"], scan["nodules"], a["origin"], a["spacing"],
                                   a["direction"], uid, components=components, candidates=cands)
    res["n_slices"] = int(scan["hu"].shape[0])
    res["annotated"] = bool(int(a.get("annotated", 1)))      # 0: no annotations given: no truth to measure against
    _offer_pictures(book, scan, res, prob, mask, components[1], cands)  # 4. pictures
    if cfg.WRITE_MIP:
        report.write_mip(os.path.join(dirs["mip"], f"{uid}.png"), scan["hu"], prob, scan["nodules"], components[1],
                         uid, a["spacing"])
    return res, seconds


def _failure_line(path, e):
    """A scan's error as the one line reported and listed in metrics.json."""
    msg = runfiles.one_line(e, 300)
    return msg if isinstance(e, ct_io.ScanError) else f"{path}: {type(e).__name__}: {msg}"


# ----------------------------------------------------------------------------- every scan, here or on a cluster

def _table_path(cfg):
    """The slice table: where a model's input geometry is read when it has no config.json."""
    return os.path.join(cfg.WORK_DIR, "2_table", "slices.h5")


def _scan_outcomes(paths, predictor, dirs, book, cfg):
    """(path, a call returning process_scan's result or raising its error) per scan, in path order: computed here
    when the call is made, or, with DASK_SCHEDULER, by the cluster's workers (_scan_on_worker), whose pictures,
    model loading time and pixel-range notes are added to ``book`` and ``predictor`` here."""
    if not cfg.DASK_SCHEDULER:
        for path in paths:
            yield path, functools.partial(process_scan, path, predictor, cfg, dirs, book)
        return
    from dask_tasks import run_in_order
    a = os.path.abspath                                   # absolute paths: the workers' folder may differ
    task_dirs = {k: a(v) for k, v in dirs.items()}
    tasks = [(a(p), cfg, _abs_models(predictor.model_path), cfg.MODEL_CONFIG and a(cfg.MODEL_CONFIG), a(_table_path(cfg)),
              task_dirs) for p in paths]
    for path, (_, out, err) in zip(paths, run_in_order(cfg.DASK_SCHEDULER, _scan_on_worker, tasks, names=paths)):
        if err is None:
            status, value, extra = out
            book.merge(extra["pages"])
            predictor.load_seconds += extra["load_seconds"]
            predictor.outside_range += extra["outside_range"]
            predictor.context = predictor.context if predictor.context is not None else extra["context"]
        else:
            status, value = "failed", err
        yield path, functools.partial(_remote_outcome, status, value)


def _remote_outcome(status, value):
    """A worker's outcome as the local call would have it: the result, or the one-line error raised again."""
    if status == "exit":
        raise SystemExit(value)
    if status == "failed":
        raise ct_io.ScanError(value)
    return value


_WORKER_PREDICTORS = {}         # on a dask worker: the Predictor of each model file, loaded once per worker process
_WORKER_LOCK = threading.Lock()


def _worker_predictor(model_path, model_config, table_path, tta):
    """This worker process's Predictor of a model file (or an ensemble's files; loaded once, reused by every
    task)."""
    st = [os.stat(p) for p in model_files(model_path)]
    key = (_abs_models(model_path), tuple((s.st_size, s.st_mtime_ns) for s in st), model_config, table_path, tta)
    with _WORKER_LOCK:
        if key not in _WORKER_PREDICTORS:
            _WORKER_PREDICTORS[key] = Predictor(model_path, model_config, table_path, tta)
    return _WORKER_PREDICTORS[key]


def _scan_on_worker(task):
    """One scan on a dask worker: process_scan with the run's settings (carried in the task) and this worker's
    cached model -> (status 'done' / 'failed' / 'exit', (result, seconds) or the error line, the scan's
    pictures and notes)."""
    path, cfg, model_path, model_config, table_path, dirs = task
    predictor = _worker_predictor(model_path, model_config, table_path, cfg.TTA)
    load0, outside0 = predictor.load_seconds, len(predictor.outside_range)
    book = report.PictureBook(cfg.N_PICTURES, cfg.PICTURE_HALF)
    try:
        status, value = "done", process_scan(path, predictor, cfg, dirs, book)
    except SystemExit as e:
        status, value = "exit", str(e.code)
    except Exception as e:
        status, value = "failed", _failure_line(path, e)
    return status, value, {"pages": book.heaps, "load_seconds": predictor.load_seconds - load0,
                           "outside_range": predictor.outside_range[outside0:], "context": predictor.context}


# ----------------------------------------------------------------------------- the run's steps

def _abs_models(model):
    """MODEL's file(s) as absolute paths, comma-separated as given."""
    return ",".join(os.path.abspath(p) for p in model_files(model))


def _model_path(cfg):
    """The model file(s) evaluated (MODEL: one file or an ensemble's, comma-separated; default
    WORK_DIR/4_model/best.keras); SystemExit when one is missing."""
    given = cfg.MODEL or os.path.join(cfg.WORK_DIR, "4_model", "best.keras")
    for path in model_files(given):
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: model not found (train one with nasnet_v2_train.py, or give --MODEL=)")
        config = cfg.MODEL_CONFIG or os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        if not os.path.isfile(config):                # the input geometry would be guessed: say so, or refuse
            if not os.path.isfile(_table_path(cfg)):
                raise SystemExit(f"{path}: no config.json beside it (the input geometry it was trained with: pixel "
                                 f"size, crop, context); copy its training folder's config.json beside it, or give "
                                 f"--MODEL_CONFIG=<that config.json>")
            print(f"{path}: no config.json beside it: the input geometry of {_table_path(cfg)} is used",
                  file=sys.stderr)
    return given


def _report_dir(cfg):
    return cfg.REPORT_DIR or os.path.join(cfg.WORK_DIR, "5_report")


def _output_folders(cfg):
    """The run's folders {pred, report, pictures, mip}, created, with the temporary files a killed run left
    there removed."""
    report_dir = _report_dir(cfg)
    dirs = {"pred": cfg.PRED_DIR or os.path.join(cfg.WORK_DIR, "5_predictions"), "report": report_dir,
            "pictures": os.path.join(report_dir, "pictures"), "mip": os.path.join(report_dir, "pictures", "mip")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    stale = [p for d in dirs.values() for p in runfiles.clean_stale(d)]
    if stale:
        print(f"removed {len(stale)} temporary file(s) left by an interrupted run", file=sys.stderr)
    return dirs


def _scan_paths(cfg):
    """The stage-1 files of the part SCANS; SystemExit when there is none."""
    paths = runfiles.part_scans(cfg.WORK_DIR, cfg.SCANS)
    if not paths:
        raise SystemExit(f"no scans in part {cfg.SCANS!r} of {cfg.WORK_DIR}")
    return paths


def _evaluate_scans(paths, predictor, dirs, book, cfg):
    """Every scan predicted, written and evaluated; a scan that fails is reported in one line and skipped ->
    (results, failed [{path, error}], timing [(seconds of inference, slices)] of the scans predicted)."""
    from tqdm import tqdm
    results, failed, timing = [], [], []
    bar = tqdm(_scan_outcomes(paths, predictor, dirs, book, cfg), total=len(paths), desc="postprocess", unit="scan")
    for path, outcome in bar:
        try:
            res, seconds = outcome()
        except SystemExit:
            raise
        except Exception as e:
            msg = _failure_line(path, e)
            tqdm.write(f"FAILED {msg}; skipped", file=sys.stderr)
            failed.append({"path": path, "error": msg})
            continue
        results.append(res)
        if seconds is not None:
            timing.append((seconds, res["n_slices"]))
        bar.set_postfix(nodules=sum(len(r["nodules"]) for r in results),
                        cands=sum(len(r["candidates"]) for r in results))
    return results, failed, timing


def _timing(predictor, timing):
    """metrics.json's timing: inference seconds per scan and per slice, model loading, peak memory."""
    import resource
    return {"definition": "seconds of inference per scan (network inputs + prediction, TTA passes a slice, the "
                          "first scan's graph tracing included, model loading not); peak resident memory of this "
                          "process",
            "model_load_seconds": predictor.load_seconds, "scans_predicted": len(timing),
            "seconds_per_scan": float(np.mean([s for s, _ in timing])) if timing else None,
            "seconds_per_slice": (float(sum(s for s, _ in timing) / sum(n for _, n in timing)) if timing else None),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _metrics(results, failed, timing, predictor, model_path, cfg):
    """metrics.json's content (metrics.summarize over the annotated scans, and the run's settings) and the FROC
    curves (None when no scan has annotations)."""
    truth = [r for r in results if r["annotated"]]
    if results and not truth:                          # no annotations at all: nothing to measure against
        metrics, curves = evaluation.no_truth_summary(results, len(failed)), None
    else:
        metrics, curves = summarize(truth, cfg.SIZE_BINS, cfg.FROC_RATES, n_failed=len(failed))
        metrics["annotations"] = "given" if len(truth) == len(results) else "partial"
        if len(truth) < len(results):
            metrics["n_scans_without_annotations"] = len(results) - len(truth)
            metrics["note"] = (f"{len(results) - len(truth)} scan(s) had no annotations: the metrics are over "
                               f"the {len(truth)} annotated one(s); candidates.csv lists every scan's")
    metrics["model"] = _abs_models(model_path)
    metrics["scans"] = cfg.SCANS
    metrics["threshold"], metrics["binarize"] = cfg.THRESHOLD, cfg.BINARIZE
    metrics["candidate_threshold"], metrics["max_candidates"] = cfg.CANDIDATE_THRESHOLD, cfg.MAX_CANDIDATES
    metrics["candidate_split_mm"] = cfg.CANDIDATE_SPLIT_MM
    metrics["tta"] = predictor.tta                    # flips averaged per slice (what the timing below includes)
    metrics["failed_scans"] = failed
    metrics["input_geometry"] = {"pixel_mm": predictor.pixel_mm, "crop_mm": predictor.crop_mm,
                                 "context_mm": predictor.context_mm, "crop": predictor.crop,
                                 "context_slices": predictor.context, "trained_pixel_mm_range": predictor.pixel_range,
                                 "scans_outside_trained_pixel_range": len(predictor.outside_range)}
    metrics["timing"] = _timing(predictor, timing)
    return metrics, curves


def _write_report(dirs, metrics, curves, results, book, cfg):
    """metrics.json, nodules.csv, candidates.csv (+ _detail), froc.png, the pictures and config.json."""
    folder = dirs["report"]
    runfiles.write_json(os.path.join(folder, "metrics.json"), metrics)
    report.write_nodules(os.path.join(folder, "nodules.csv"), results)
    report.write_candidates(folder, results)
    froc = os.path.join(folder, "froc.png")
    if curves is not None:
        report.write_froc(froc, curves, metrics, cfg.FROC_RATES)
    elif os.path.exists(froc):
        os.remove(froc)                                # an earlier run's curve: not of these scans
    book.draw(dirs["pictures"])
    save_config(cfg, folder)


def _print_outcome(m, curves, results, failed, predictor, report_dir):
    """The run's summary lines (and the tables by size) -> the exit status: 1 if any scan failed."""
    def pct(v):
        return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}%"
    if curves is None:
        print(f"{len(results)} scan(s) without annotations: {m['n_candidates']} candidate(s) in "
              f"{os.path.join(report_dir, 'candidates.csv')} (world mm); no metrics (no truth)")
    else:
        cpm = "n/a (no nodules)" if m["cpm"]["value"] is None else f"{m['cpm']['value']:.3f}"
        print(f"{len(results)} scan(s), {m['n_nodules']} nodule(s): slice Dice {pct(m['slice_dice']['value'])}, "
              f"nodule Dice {pct(m['nodule_dice']['value'])}, sensitivity {pct(m['sensitivity']['value'])} at "
              f"{m['fp_per_scan']['value']:.2f} FP/scan (thesis rule {pct(m['sensitivity_thesis_rule']['value'])}), "
              f"CPM {cpm} -> {report_dir}" if results else "no scan evaluated")
        if results:
            report.print_table(m)
        if predictor.outside_range:
            print(f"{len(predictor.outside_range)} scan(s) had pixels outside the raw-pixel model's trained range "
                  f"{predictor.pixel_range} mm: their results are not what the model would give at its own "
                  "resolution")
    if failed:
        print(f"{len(failed)} scan(s) failed: " + "; ".join(os.path.basename(f["path"]) for f in failed))
    return 1 if failed else 0


def main(argv=None):
    cfg = configure(globals(), argv, choices=_CHOICES)
    runfiles.refuse_old_layout(cfg.WORK_DIR)
    model_path = _model_path(cfg)                                     # 1. the model and the folders
    with runfiles.hold(_report_dir(cfg), "postprocess.py"):         # one run at a time in the folders
        return _run(cfg, model_path, _output_folders(cfg))


def _run(cfg, model_path, dirs):
    """Steps 2-6 of main(), with the report folder held by this run."""
    paths = _scan_paths(cfg)                                          # 2. the scans of the part
    predictor = Predictor(model_path, cfg.MODEL_CONFIG, _table_path(cfg), cfg.TTA)
    predictor.check()                                                 # the model against its settings, first
    book = report.PictureBook(cfg.N_PICTURES, cfg.PICTURE_HALF)
    results, failed, timing = _evaluate_scans(paths, predictor, dirs, book, cfg)   # 3. each scan
    if failed and not results:                        # nothing to report: an earlier report stays as it was
        print(f"every scan failed ({len(failed)}): {dirs['report']} is left as it was", file=sys.stderr)
        return 1
    metrics, curves = _metrics(results, failed, timing, predictor, model_path, cfg)  # 4. the metrics
    _write_report(dirs, metrics, curves, results, book, cfg)          # 5. the report
    return _print_outcome(metrics, curves, results, failed, predictor, dirs["report"])   # 6. the summary


if __name__ == "__main__":
    sys.exit(main())
