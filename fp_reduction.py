"""Stage 6: false-positive reduction, the thesis code's second network: a small 3D CNN on isotropic patches
around each candidate rescores stage 5's candidates.

Reads
    WORK_DIR/1_preprocessed/<seriesuid>.h5   stage-1 scans: /hu (the patches), /lung_mask (random negatives),
                                             /nodules (the truth), origin / spacing / direction
    WORK_DIR/3_split/split.json              the train / val / test parts (by patient)
    CANDIDATES_DIR/candidates.csv            the candidates to rescore (default WORK_DIR/5_report: stage 5's, LUNA16
                                             format seriesuid, coordX, coordY, coordZ, probability; world mm) and
                                             its config.json (which part stage 5 evaluated); or --CANDIDATES=<csv>
                                             (any LUNA16-format file; candidates_V2.csv's `class` column is allowed,
                                             its rows have no probability)
    TRAIN_CANDIDATES                         candidates on the training and validation scans (hard negatives and
                                             positives): e.g. a stage-5 run over every scan,
                                             postprocess.py --SCANS=all --REPORT_DIR=WORK_DIR/5_report_all
Writes (OUT_DIR, default WORK_DIR/6_fp_reduction)
    model.keras        the trained network (the checkpoint with the best validation CPM); last.keras, state.json,
                       history.csv (what --RESUME=1 continues from; each written to a temporary file, then renamed)
    config.json        the constants used, with the patch geometry the model was trained with
    candidates.csv     the same candidates, LUNA16 format, rescored (probability = see COMBINE)
    candidates_detail.csv  each candidate's stage-5 and stage-6 probabilities and its status (TP / FP / ignored);
                       with FINDINGS, for each finding (final score above THRESHOLD): its number, centre voxel,
                       volume, equivalent and longest axial diameter, mean / max HU, type, lung side (findings.py)
    findings/          with FINDINGS, per scan: <seriesuid>.json (the findings), <seriesuid>.html and a PNG per
                       finding, the mask as DICOM SEG + SR (TID 1500) for DICOM input, else <seriesuid>.nii.gz;
                       index.html linking the pages (docs/findings.md)
    metrics.json       before (stage 5's scores) and after (rescored): CPM and FROC sensitivities at 1/8 ... 8
                       FP/scan overall and by nodule size, candidate recall, the operating point (THRESHOLD):
                       sensitivity by size and FP/scan; training and scoring times
    froc.png           the FROC curves before (dashed) and after (solid), overall and by size
    patches/           the training and validation patches (uint8, memory-mapped; reused by a rerun or --RESUME=1)
Run
    python fp_reduction.py --WORK_DIR=work                      # train on the training part, score the test part
    python fp_reduction.py --WORK_DIR=work --TRAIN_CANDIDATES=work/5_report_all/candidates.csv
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
reach; bright blobs of 3-12 mm found in the image itself (candidates.detect_blobs: a scale-normalised Laplacian of Gaussian on
the HU resampled to BLOB_MM isotropic, inside the dilated stage-1 lung mask) are added to every scan's list, those
within BLOB_MERGE_MM of a stage-5 candidate dropped, each with the stage-5 score BLOB_SCORE, and rescored like the
others; on the training and validation scans they are candidates too (hard negatives, positives when on a nodule).

Scoring streams scan by scan: one HU volume in memory at a time, patches predicted in batches, candidates.csv
written row by row; memory does not grow with the number of candidates (the candidate table itself takes ~21
bytes a candidate). A scan that fails is reported in one line and skipped (it still counts in FP/scan); the exit
status is then non-zero. Every metric comes from metrics.py. The patches, their store and sampler are in
fp_patches.py, the network and its evaluation in fp_net.py, the candidate files and blobs in candidates.py.
"""
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import candidates  # noqa: E402
from inference import model_files  # noqa: E402
import checkpoints  # noqa: E402
import fp_net  # noqa: E402
import fp_patches  # noqa: E402
import froc_plot  # noqa: E402
import metrics  # noqa: E402
import runfiles  # noqa: E402
from configurator import configure, save_config  # noqa: E402

# ----------------------------------------------------------------------------- settings
WORK_DIR = "work"               # root of a run; every stage's folder is below it
SCANS = "test"                  # scans rescored and evaluated: a part of 3_split/split.json, or "all"
CANDIDATES = ""                 # LUNA16-format CSV to rescore; "" = CANDIDATES_DIR/candidates.csv (stage 5's)
CANDIDATES_DIR = ""             # the stage-5 report folder rescored; "" = WORK_DIR/5_report
TRAIN_CANDIDATES = ""           # comma-separated CSVs with candidates on the train / val scans; "" = the CANDIDATES file
MODEL = ""                      # a trained stage-6 model: score only, no training (its patch geometry, THRESHOLD and
                                # BLOB_* settings from its config.json); several comma-separated: an ensemble, scores
                                # averaged (settings from the first); "" = train one (OUT_DIR/model.keras)
OUT_DIR = ""                    # "" = WORK_DIR/6_fp_reduction
PATCH_MM = 32.0                 # side of the patch cube in mm [> 0]
VOXEL_MM = 1.0                  # isotropic voxel size of the patch in mm (side = round(PATCH_MM / VOXEL_MM) voxels) [> 0]
HU_WINDOW = (-1000.0, 400.0)    # HU clipped to this range and scaled to [-1, 1]
WIDTH = 16                      # filters of the first convolution block (doubled in each further block) [>= 1]
BLOCKS = 3                      # convolution blocks (conv 3x3x3 + batch norm + ReLU + max-pool 2) [>= 1]
DENSE = 64                      # units of the hidden dense layer [>= 1]
DROPOUT = 0.3                   # dropout before each dense layer [0 .. 1]
BATCH_SIZE = 32                 # patches per training step [>= 1]
EPOCHS = 10                     # epochs of STEPS_PER_EPOCH steps (a fixed number of steps: same result on any machine) [>= 1]
STEPS_PER_EPOCH = 50            # training steps per epoch [>= 1]
LR = 1e-3                       # Adam learning rate [> 0]
MAX_MINUTES = 0.0               # stop after the epoch that passes this much training time (0 = no limit; a safety stop) [>= 0]
POS_FRACTION = 0.5              # share of positives in every training batch (positives are oversampled) [0 .. 1]
JITTER = 0.5                    # nodule-centre positives: moved up to this fraction of the radius at each draw (<= MAX_SHIFT_MM) [>= 0]
SHIFT_MM = 2.0                  # every training patch moved up to this (mm, each axis) [>= 0]
MAX_SHIFT_MM = 4.0              # largest move in mm (jitter + shift): the margin stored around training patches [>= 0]
SCALE = 0.1                     # training patches scaled by a factor in [1 - SCALE, 1 + SCALE]
AUGMENT = True                  # flips, 90-degree rotations, shifts and scales of the training patches
HARD_NEG_PER_SCAN = 100         # false-positive candidates kept per training scan as hard negatives (highest scored) [>= 0]
RANDOM_NEG_PER_SCAN = 20        # random lung-mask points per training scan (negatives) [>= 0]
DENSE_NEG_PER_SCAN = 60         # random lung-mask points denser than DENSE_HU per training scan (vessel-like negatives) [>= 0]
DENSE_HU = -500.0               # HU above which a lung-mask voxel counts as dense
NEG_MARGIN_MM = 5.0             # random negatives lie farther than an annotation's radius + this from its centre [>= 0]
COMBINE = "auto"                # final score: "fp" (stage 6), "product" (stage 5 x stage 6), "mean", "auto" (best on val)
THRESHOLD = 0.5                 # operating point: candidates whose final score is above this are detections [0 .. 1]
MAX_CANDIDATES = 100            # candidates evaluated per scan, the highest scored (LUNA16's rule, metrics.top_candidates) [>= 1]
SIZE_BINS = (5.0, 10.0, 20.0)   # diameter bin edges in mm for the breakdowns
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per scan where the CPM reads the sensitivity
PREDICT_BATCH = 64              # patches per prediction call [>= 1]
TTA = 8                         # test-time augmentation: mean over this many flips of the patch (1 = none, at most 8) [1 .. 8]
SEED = 85                       # weights, sampling and augmentation
RESUME = False                  # continue training from OUT_DIR/last.keras and state.json
DASK_SCHEDULER = ""             # "" = scans scored here; "tcp://host:8786" = each scan a task on that dask cluster
BLOB_CANDIDATES = 0             # candidates per scan added from the image (3D blob detector in the lung mask); 0 = off [>= 0]
BLOB_MM = 1.25                  # isotropic voxel (mm) of the grid the blob detector resamples the HU volume to [> 0]
BLOB_DIAMETERS_MM = (3.0, 12.0) # smallest and largest blob diameter looked for (mm)
BLOB_SCALES = 4                 # Laplacian-of-Gaussian scales, log-spaced over BLOB_DIAMETERS_MM [>= 1]
BLOB_HU = (-1000.0, 100.0)      # HU clipped to this range before filtering (bone and contrast do not outshine nodules)
BLOB_MIN_HU = -750.0            # a blob's centre (resampled HU) must be denser than this
BLOB_LUNG_DILATE_MM = 2.5       # the stage-1 lung mask dilated this much (nodules on the pleura count) [>= 0]
BLOB_MERGE_MM = 5.0             # a blob within this of a stage-5 candidate or of a stronger blob is dropped [>= 0]
BLOB_SCORE = 0.0                # the stage-5 probability given to a blob candidate
BLOB_RANK = "hessian"           # blobs ranked by "hessian" (the Hessian's weakest curvature: ~0 on vessels) or "log"
FINDINGS = True                 # candidates above THRESHOLD measured on stage 5's prediction: candidates_detail.csv
                                # columns and findings/ (pages; DICOM SEG + SR for DICOM input, else .nii.gz + JSON)
FINDING_SOLID_HU = -200.0       # a voxel inside a finding at or above this HU counts as solid (the type rules)
FINDING_TYPE_FRACTIONS = (0.1, 0.8)  # solid fraction below the first: ground-glass; from the second on: solid
FINDING_WAND = (1.5, 6.0)       # findings outlined in HU by the magic wand, diameter bound a x stage-5 diameter + b
                                # mm (chosen on a cohort of another seed: benchmarks/RESULTS.md); () = stage 5's region


_CHOICES = {"COMBINE": fp_net.COMBINE_CHOICES + ("auto",), "BLOB_RANK": ("hessian", "log")}
_GEOMETRY_KEYS = ("PATCH_MM", "VOXEL_MM", "HU_WINDOW")     # read from a scoring model's config.json
_SCORING_KEYS = ("THRESHOLD", "BLOB_CANDIDATES", "BLOB_MM", "BLOB_DIAMETERS_MM", "BLOB_SCALES", "BLOB_HU",
                 "BLOB_MIN_HU", "BLOB_LUNG_DILATE_MM", "BLOB_MERGE_MM", "BLOB_SCORE", "BLOB_RANK")
                                # the choices a model was trained and chosen with: a scoring run repeats them from
                                # its config.json unless they are given on the command line
_SAMPLING_KEYS = ("PATCH_MM", "VOXEL_MM", "HU_WINDOW", "JITTER", "SHIFT_MM", "MAX_SHIFT_MM", "SCALE",
                  "HARD_NEG_PER_SCAN", "RANDOM_NEG_PER_SCAN", "DENSE_NEG_PER_SCAN", "DENSE_HU", "NEG_MARGIN_MM",
                  "SEED")       # the settings a patch store is made with (with BLOB_* when blobs are on)


def _log(line):                 # runfiles.clean_stale's report
    print(line, file=sys.stderr)


# ----------------------------------------------------------------------------- settings and folders

def _model_config(model):
    """The config.json beside a trained stage-6 model ({} when there is none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(model)), "config.json")
    return runfiles.read_json(path) if os.path.isfile(path) else {}


def with_model_settings(cfg, given=()):
    """With MODEL (score only): ``cfg`` with the model's patch geometry, and its blob candidates and operating
    point unless given on the command line (``given``: the names given), from the model's config.json."""
    if not cfg.MODEL:
        return cfg
    for path in model_files(cfg.MODEL):
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: model not found")
    mcfg = _model_config(model_files(cfg.MODEL)[0])       # an ensemble: its first model's settings
    keys = _GEOMETRY_KEYS + tuple(k for k in _SCORING_KEYS if k not in given)
    return cfg.replace(**{k: tuple(mcfg[k]) if isinstance(cfg[k], tuple) else type(cfg[k])(mcfg[k])
                          for k in keys if k in mcfg})


def _out_dir(cfg):
    return cfg.OUT_DIR or os.path.join(cfg.WORK_DIR, "6_fp_reduction")


def output_folder(cfg):
    """OUT_DIR (created), with the temporary files a killed run left removed (a resumed training first
    recovers its checkpoint from them: see start_or_resume)."""
    out_dir = _out_dir(cfg)
    os.makedirs(out_dir, exist_ok=True)
    if not (cfg.RESUME and not cfg.MODEL):
        runfiles.clean_stale(out_dir, _log)
    return out_dir


def candidates_file(cfg):
    """The candidates rescored: CANDIDATES, or CANDIDATES_DIR's (stage 5's report) candidates.csv."""
    path = cfg.CANDIDATES or os.path.join(_report_dir(cfg), "candidates.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no candidates (run postprocess.py, or give --CANDIDATES=)")
    return path


def _report_dir(cfg):
    return cfg.CANDIDATES_DIR or os.path.join(cfg.WORK_DIR, "5_report")


def predictions_dir(cfg):
    """The stage-5 prediction files the findings are measured on: PRED_DIR of stage 5's config.json (beside the
    candidates rescored), else WORK_DIR/5_predictions (absolute)."""
    stage5_cfg = os.path.join(_report_dir(cfg), "config.json")
    pred = runfiles.read_json(stage5_cfg).get("PRED_DIR", "") if os.path.isfile(stage5_cfg) else ""
    return os.path.abspath(pred or os.path.join(cfg.WORK_DIR, "5_predictions"))


def scans_to_score(cfg):
    """The stage-1 files scored: the part SCANS, among those stage 5 evaluated (its config.json) when rescoring
    its report."""
    paths = runfiles.part_scans(cfg.WORK_DIR, cfg.SCANS)
    stage5_cfg = os.path.join(_report_dir(cfg), "config.json")
    if not cfg.CANDIDATES and os.path.isfile(stage5_cfg):
        part5 = runfiles.read_json(stage5_cfg).get("SCANS", "all")
        covered = {runfiles.uid_of(p) for p in runfiles.part_scans(cfg.WORK_DIR, part5)}
        left = [p for p in paths if runfiles.uid_of(p) in covered]
        if len(left) < len(paths):
            print(f"{len(paths) - len(left)} of the {len(paths)} scans of part {cfg.SCANS!r} were not evaluated by "
                  f"stage 5 ({stage5_cfg}: SCANS={part5}); scoring the {len(left)} it evaluated")
        paths = left
    if not paths:
        raise SystemExit(f"no scans to score in part {cfg.SCANS!r} of {cfg.WORK_DIR}")
    return paths


# ----------------------------------------------------------------------------- training

def patch_stores(out_dir, side, cfg, train_paths, val_paths, table_paths, failed):
    """The training and validation patch stores (out_dir/patches/train, .../val): reused when made with the same
    settings, candidates and scans, else extracted."""
    table = candidates.CandidateTable(table_paths)
    covered = sum(1 for p in train_paths if runfiles.uid_of(p) in table.index)
    if covered == 0:
        print(f"note: no candidates on the {len(train_paths)} training scans in {', '.join(table_paths) or '(none)'}: "
              "negatives are random and dense lung points only (give TRAIN_CANDIDATES from a stage-5 run over "
              "every scan, postprocess.py --SCANS=all, for hard negatives)")
    sampling = {k: cfg[k] for k in _SAMPLING_KEYS}
    sampling.update({k: cfg[k] for k in cfg if k.startswith("BLOB_")} if cfg.BLOB_CANDIDATES else {})
    stores = {}
    for what, paths, seed in (("train", train_paths, 0), ("val", val_paths, 1)):
        key = fp_patches.store_key(what, sampling, table_paths, paths)
        store = fp_patches.PatchStore(os.path.join(out_dir, "patches", what))
        if store.load(key):
            print(f"{what}: reusing {int(store.meta['n'])} stored patches ({store.folder})")
        else:
            store.build(key, paths, table, side, np.random.default_rng([cfg.SEED, seed]), what, failed, cfg)
        stores[what] = store
    return stores


def start_or_resume(out_dir, side, cfg):
    """The network to train and the training state: with RESUME, last.keras and its state.json (a checkpoint
    whose commit a kill interrupted is recovered: checkpoints.recover_checkpoint), else a new network (seeded)."""
    import keras
    last, state_path = os.path.join(out_dir, "last.keras"), os.path.join(out_dir, "state.json")
    state, model = {}, None
    if cfg.RESUME and os.path.isfile(last):
        model = keras.saving.load_model(last)
        state, _ = checkpoints.recover_checkpoint(out_dir, model)
        if state is None:
            print(f"RESUME=1 but {state_path} does not match {last}: starting from scratch")
            state, model = {}, None
        else:
            print(f"resuming from {last}: epoch {state['epoch'] + 2}, best validation {state.get('best')}")
    elif cfg.RESUME:
        print(f"RESUME=1 but {last} does not exist: starting from scratch")
    runfiles.clean_stale(out_dir, _log)
    if model is None:
        keras.utils.set_random_seed(cfg.SEED)
        model = fp_net.build_model(side, cfg.WIDTH, cfg.BLOCKS, cfg.DENSE, cfg.DROPOUT, cfg.LR)
    return model, state


def train_epoch(model, sampler, epoch, cfg):
    """One epoch of STEPS_PER_EPOCH batches -> (mean loss, seconds)."""
    from tqdm import tqdm
    t0, losses = time.time(), []
    bar = tqdm(sampler.batches(epoch, cfg.STEPS_PER_EPOCH, cfg.BATCH_SIZE), total=cfg.STEPS_PER_EPOCH,
               desc=f"fp_reduction epoch {epoch + 1}/{cfg.EPOCHS}", unit="step")
    for x, y in bar:
        loss = model.train_on_batch(x, y)
        losses.append(float(np.asarray(loss).reshape(-1)[0]))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return float(np.mean(losses)), time.time() - t0


def fit(model, state, sampler, val_store, side, cfg, out_dir):
    """Train from the epoch after state's to EPOCHS (or MAX_MINUTES); after each, rescore the validation patches,
    keep the best network as out_dir/model.keras (validation CPM, then AUC, then the lower loss) and write the
    checkpoint (checkpoints.save_checkpoint). Returns the state."""
    best = os.path.join(out_dir, "model.keras")
    history = state.get("history", [])
    start = state.get("epoch", -1) + 1
    print(f"stage-6 network: {model.count_params():,} parameters, patches {side}^3 of {cfg.VOXEL_MM:g} mm; "
          f"epochs {start + 1}-{cfg.EPOCHS} of {cfg.STEPS_PER_EPOCH} steps of {cfg.BATCH_SIZE}")
    for epoch in range(start, cfg.EPOCHS):
        loss, train_s = train_epoch(model, sampler, epoch, cfg)
        state["train_seconds"] = state.get("train_seconds", 0.0) + train_s
        t1 = time.time()
        val = fp_net.validate(model, val_store, side, cfg.COMBINE, cfg)
        val_s = time.time() - t1
        crit = (val["cpm"] if val["cpm"] is not None else -1.0, val.get("auc") or 0.0,
                -(val["loss"] if val["loss"] is not None else 0.0))
        improved = "best" not in state or val["loss"] is None or crit > tuple(state["best"])
        if improved:
            state["best"], state["best_epoch"], state["best_val"] = list(crit), epoch, val
        row = {"epoch": epoch, "loss": loss, "val_loss": val["loss"], "val_cpm": val["cpm"], "val_auc": val.get("auc"),
               "train_seconds": train_s, "val_seconds": val_s,
               "patches_per_s": cfg.STEPS_PER_EPOCH * cfg.BATCH_SIZE / max(train_s, 1e-9)}
        history.append(row)
        state["epoch"], state["history"] = epoch, history
        checkpoints.save_checkpoint(model, out_dir, state, history, best if improved else "")
        cpm = "n/a" if val["cpm"] is None else f"{val['cpm']:.3f}"
        vauc = "n/a" if val.get("auc") is None else f"{val['auc']:.3f}"
        print(f"epoch {epoch + 1}: loss {row['loss']:.4f}, val loss {val['loss']:.4f}, val AUC {vauc}, val CPM {cpm}"
              f"{' (best)' if improved else ''} | {row['patches_per_s']:.0f} patches/s, {train_s:.0f} s "
              f"(+{val_s:.0f} s validation)", flush=True)
        if cfg.MAX_MINUTES and state["train_seconds"] >= cfg.MAX_MINUTES * 60:
            print(f"time budget of {cfg.MAX_MINUTES} min reached")
            break
    if not os.path.isfile(best):
        raise SystemExit(f"{best}: no checkpoint (EPOCHS={cfg.EPOCHS}?)")
    return state


def train(out_dir, side, cfg, train_paths, val_paths, table_paths, failed):
    """Extract (or reuse) the patches, train (or resume), keep the best checkpoint as out_dir/model.keras ->
    (model path, training record dict)."""
    stores = patch_stores(out_dir, side, cfg, train_paths, val_paths, table_paths, failed)
    counts = fp_patches.store_counts(stores["train"], stores["val"])
    print("training patches: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    sampler = fp_patches.Sampler(stores["train"], side, cfg)
    model, state = start_or_resume(out_dir, side, cfg)
    state = fit(model, state, sampler, stores["val"], side, cfg, out_dir)
    bv, history = state.get("best_val", {}), state.get("history", [])
    record = {"train_seconds": state.get("train_seconds"), "epochs": len(history),
              "steps": len(history) * cfg.STEPS_PER_EPOCH, "batch_size": cfg.BATCH_SIZE,
              "best_epoch": state.get("best_epoch", 0) + 1, "best_validation": bv, "patches": counts,
              "combine": fp_net.chosen_combine(cfg.COMBINE, bv), "history": history}
    return os.path.join(out_dir, "model.keras"), record


def scoring_model(cfg, out_dir, cand_path, failed):
    """The network that scores: MODEL (copied to out_dir/model.keras), or one trained here on the training part
    (validation part: the checkpoint and COMBINE="auto") -> (settings with PATCH_SIDE, COMBINE_USED, MODE,
    CANDIDATES_FILE; model path; training record or None)."""
    side = fp_patches.patch_side(cfg.PATCH_MM, cfg.VOXEL_MM)
    cfg = cfg.replace(PATCH_SIDE=side)
    model_path, record = os.path.join(out_dir, "model.keras"), None
    if cfg.MODEL:
        load_scoring_model(cfg.MODEL, side)                 # checked before anything is written
        first = model_files(cfg.MODEL)[0]
        how = cfg.COMBINE if cfg.COMBINE != "auto" else _model_config(first).get("COMBINE_USED", "fp")
        if len(model_files(cfg.MODEL)) > 1:                 # an ensemble: scored from where its models are
            model_path = ",".join(os.path.abspath(p) for p in model_files(cfg.MODEL))
        elif os.path.abspath(cfg.MODEL) != os.path.abspath(model_path):
            if os.path.isfile(model_path) and _model_config(model_path).get("MODE") == "train":
                raise SystemExit(f"{out_dir} holds the stage-6 model trained there: scoring with --MODEL={cfg.MODEL} "
                                 f"would replace it; give another --OUT_DIR")
            with runfiles.atomic(model_path) as tmp:
                shutil.copyfile(cfg.MODEL, tmp)
        print(f"scoring only with {cfg.MODEL} (patches {cfg.PATCH_MM:g} mm at {cfg.VOXEL_MM:g} mm, COMBINE={how})")
    else:
        train_tables = [p.strip() for p in cfg.TRAIN_CANDIDATES.split(",") if p.strip()] or [cand_path]
        save_config(cfg.replace(MODE="train"), out_dir)
        model_path, record = train(out_dir, side, cfg, runfiles.part_scans(cfg.WORK_DIR, "train"),
                                   runfiles.part_scans(cfg.WORK_DIR, "val"), train_tables, failed)
        how = record["combine"]
    cfg = cfg.replace(COMBINE_USED=how, MODE="score" if cfg.MODEL else "train",
                      CANDIDATES_FILE=os.path.abspath(cand_path))
    return cfg, model_path, record


def load_scoring_model(model_path, side):
    """The scoring network, checked to be a stage-6 network (one-channel 3D patches in, one score out) that
    takes patches of ``side``^3 (PATCH_MM / VOXEL_MM); else one line naming the file. Several files
    (comma-separated): the list of their networks (an ensemble, scores averaged)."""
    import keras
    models = []
    for path in model_files(model_path):
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as e:                          # a corrupt or foreign file: Keras's reasons vary
            raise SystemExit(f"{path}: not a stage-6 model (cannot be loaded: {runfiles.one_line(e, 160)})") from None
        shape_in, shape_out = tuple(model.input_shape), tuple(model.output_shape)
        if len(shape_in) != 5 or shape_in[-1] != 1 or shape_out[1:] != (1,):
            raise SystemExit(f"{path}: not a stage-6 model (input {shape_in[1:]}, output {shape_out[1:]}; "
                             f"expected (side, side, side, 1) -> (1,))")
        if tuple(model.input_shape[1:4]) != (side,) * 3:
            raise SystemExit(f"{path}: takes patches of {model.input_shape[1:4]}, PATCH_MM / VOXEL_MM give {side}")
        models.append(model)
    return models[0] if len(models) == 1 else models


# ----------------------------------------------------------------------------- the report

def write_froc(path, curves_before, curves_after, m_before, m_after, rates):
    """froc.png: each size's curve before (stage 5, dashed) and after (stage 6, solid), the whole part in black."""
    import matplotlib
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = []
    for i, name in enumerate(curves_after):
        color = "black" if name == "all" else colors[i % len(colors)]
        for curves, style, tag in ((curves_before, "--", "before"), (curves_after, "-", "after")):
            if curves is None or not froc_plot.drawable(curves[name]):
                continue
            c = curves[name]
            n = "all" if name == "all" else f"{name} mm"
            lines.append((c, f"{n} {tag}: CPM {c['cpm']:.3f}",
                          dict(linestyle=style, color=color, lw=2.2 if name == "all" else 1.0), False))
    froc_plot.write_froc(path, lines, rates, f"FROC before (stage 5, dashed) and after (stage 6, solid): "
                                             f"{m_after['n_scans']} scans, {m_after['n_nodules']} nodules",
                         title_size=9, figsize=(7, 4.8), fontsize=7, loc="best", ncol=2)


def print_table(before, after, cfg):
    """Before / after by nodule size: CPM, sensitivity at 1 FP/scan, candidate recall, and the operating point."""
    def f(v):
        return "  n/a" if v is None or not np.isfinite(v) else f"{v:5.3f}"
    rates = list(cfg.FROC_RATES)
    i1 = rates.index(1.0) if 1.0 in rates else len(rates) // 2
    bins = metrics.size_bin_names(cfg.SIZE_BINS)
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


def print_summary(m_before, m_after, timing, record, out_dir, cfg):
    """One line (scans, nodules, candidates, CPM before -> after, times, the folder), then print_table."""
    cpm = lambda m: "n/a" if m is None or m["cpm"]["value"] is None else f"{m['cpm']['value']:.3f}"
    print(f"{m_after['n_scans']} scan(s), {m_after['n_nodules']} nodule(s), {timing['n_candidates']} candidates: "
          f"CPM {cpm(m_before)} -> {cpm(m_after)} (COMBINE={cfg.COMBINE_USED}); scoring "
          f"{timing['seconds_per_scan'] or 0:.2f} s/scan"
          + (f", training {record['train_seconds']:.0f} s" if record else "") + f" -> {out_dir}")
    print_table(m_before, m_after, cfg)


def write_report(out_dir, cfg, evaluations, timing, failed, n_train_failed, record, t_start):
    """metrics.json (before and after, timing, training record, failed scans) and froc.png -> (metrics after,
    metrics before or None)."""
    import resource
    ev_before, ev_after = evaluations
    m_after, c_after = ev_after.summary(cfg.SIZE_BINS, cfg.FROC_RATES)
    m_before, c_before = ev_before.summary(cfg.SIZE_BINS, cfg.FROC_RATES) if ev_before is not None else (None, None)
    timing["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    timing["total_seconds"] = time.time() - t_start
    if record is not None:
        timing["train_seconds"] = record["train_seconds"]
    result = {
        "scans": cfg.SCANS, "n_scans": m_after["n_scans"], "n_scans_failed": len(failed) - n_train_failed,
        "n_nodules": m_after["n_nodules"], "n_candidates": timing["n_candidates"],
        "candidates": cfg.CANDIDATES_FILE,
        "model": (",".join(os.path.abspath(p) for p in model_files(cfg.MODEL)) if len(model_files(cfg.MODEL)) > 1
                  else os.path.abspath(os.path.join(out_dir, "model.keras"))),
        "combine": cfg.COMBINE_USED,
        "definition": "before: the candidates scored by their own probability (stage 5's; blob candidates, "
                      "BLOB_CANDIDATES > 0, by BLOB_SCORE); after: the same "
                      "candidates scored by COMBINE of stage 5's and stage 6's probabilities ('fp': stage 6 alone, "
                      "'product': their product, 'mean': their mean). Both through metrics.py: at most "
                      "MAX_CANDIDATES a scan, LUNA16's hit rule, FP/scan over every scan of the part (failed ones "
                      "included). before is null when the candidates have no probability (candidates_V2.csv).",
        "before": m_before, "after": m_after, "timing": timing, "training": record,
        "failed_scans": failed, "size_bins_mm": metrics.size_bin_names(cfg.SIZE_BINS),
    }
    runfiles.write_json(os.path.join(out_dir, "metrics.json"), result)
    write_froc(os.path.join(out_dir, "froc.png"), c_before, c_after, m_before, m_after, cfg.FROC_RATES)
    return m_after, m_before


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = configure(globals(), argv, choices=_CHOICES)
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    return run(cfg, given)


def run(cfg, given=()):
    """Stage 6 with the settings ``cfg`` (``given``: the names set on the command line) -> exit status."""
    import nasnet_v2  # noqa: F401  (first: TensorFlow's CPU allocator, before any tensor exists)
    t_start, failed = time.time(), []
    runfiles.refuse_old_layout(cfg.WORK_DIR)
    # 1. the settings: a scoring model's patch geometry, blob candidates and operating point
    cfg = with_model_settings(cfg, given)
    # 2. the folders and the scans: OUT_DIR, the candidates rescored, the scans of SCANS that stage 5 evaluated
    with runfiles.hold(_out_dir(cfg), "fp_reduction.py"):          # one run at a time in the folder
        return _run_held(cfg, output_folder(cfg), t_start, failed)


def _run_held(cfg, out_dir, t_start, failed):
    """Steps 2-5 of run(), with ``out_dir`` held by this run."""
    cand_path = candidates_file(cfg)
    paths = scans_to_score(cfg)
    # 3. the network: MODEL, or trained here on the training part; the settings saved as config.json
    cfg, model_path, record = scoring_model(cfg, out_dir, cand_path, failed)
    cfg = cfg.replace(PRED_DIR_USED=predictions_dir(cfg) if cfg.FINDINGS else "")
    save_config(cfg, out_dir)
    model = load_scoring_model(model_path, cfg.PATCH_SIDE)
    # 4. every candidate of the scans rescored: candidates.csv, candidates_detail.csv, findings/
    n_train_failed, t0 = len(failed), time.time()
    ev_before, ev_after, timing = fp_net.score_scans(model, model_path, paths, candidates.CandidateTable([cand_path]),
                                                     cfg.PATCH_SIDE, cfg.COMBINE_USED, out_dir, failed, cfg)
    timing["scoring_seconds"] = time.time() - t0
    # 5. before and after: metrics.json, froc.png, and the summary printed
    m_after, m_before = write_report(out_dir, cfg, (ev_before, ev_after), timing, failed, n_train_failed, record,
                                     t_start)
    print_summary(m_before, m_after, timing, record, out_dir, cfg)
    if failed:
        print(f"{len(failed)} scan(s) failed: " + "; ".join(os.path.basename(f["path"]) for f in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
