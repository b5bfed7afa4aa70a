"""Stage 3: train / validation / test indexes of the slice table, split by PATIENT.

Reads  ``IN_DIR/slices.h5`` (stage 2, default ``WORK_DIR/2_table``): its ``/slices`` table only.
Writes ``OUT_DIR/train_idx.npy``, ``val_idx.npy``, ``test_idx.npy`` (sorted int64 rows of the table) and
``OUT_DIR/split.json`` (default ``WORK_DIR/3_split``): the patients and series of each part, the seed, the
counts, what the leakage guard removed; and ``OUT_DIR/config.json``.

    python slice_idx.py                                   # WORK_DIR=work
    python slice_idx.py --TEST_FOLDS=(8,9) --SEED=1
    python slice_idx.py --WORK_DIR=work_lidc --TEST_LUNA16_DIR=data/luna16   # train on LIDC, test on LUNA16
    python slice_idx.py --TEST_FOLDS=(3,) --VAL_FOLDS=(4,)     # one fold of a 10-fold cross-validation

How patients are split:
- LUNA16 tables (source paths in ``subsetK`` folders, the official 10 folds) with TEST_FOLDS non-empty: the
  test part is the scans of those folds; validation is VAL_FRACTION of the other patients, drawn with SEED,
  or, with VAL_FOLDS non-empty, the patients of those folds (cross_validate.py: test fold k, validation fold
  k + 1, training the rest).
- TEST_FROM=<another run's split.json>: its test patients are the test part (two runs, one test set).
- Otherwise (LIDC, or TEST_FOLDS=()): patients are shuffled with SEED; TEST_FRACTION and VAL_FRACTION of them
  go to test and validation (STRATIFY: patients with and without nodule slices are split separately, so
  each part gets nodules), the rest to training.
A patient's slices are all in one part (the thesis split by slice and leaked neighbouring slices of a nodule).

Leakage guard (TEST_LUNA16_DIR): when training on LIDC-IDRI and testing on LUNA16 (the thesis's set-up; LUNA16
is a subset of LIDC-IDRI, same SeriesInstanceUIDs), every LUNA16 test series is removed from training and
validation. TEST_LUNA16_DIR is a LUNA16 folder (its ``subsetK/<seriesuid>.mhd`` files; the folds in
TEST_FOLDS, or all of them when TEST_FOLDS is empty), a CSV with a ``seriesuid`` column (annotations.csv), or
a text file with one SeriesInstanceUID per line. GUARD_BY_PATIENT also removes the other series of the same
patients. The run prints how many series, patients and slices it removed; split.json records them.
"""
import csv
import glob
import json
import os
import re
import sys

import numpy as np

import runfiles
from configurator import configure, save_config

# ----------------------------------------------------------------------------- constants
WORK_DIR = "work"              # root of a run; every stage reads and writes below it
IN_DIR = ""                    # the slice table's folder; "" = WORK_DIR/2_table
TABLE_NAME = "slices.h5"       # the table's file name inside IN_DIR
OUT_DIR = ""                   # "" = WORK_DIR/3_split
VAL_FRACTION = 0.1             # share of patients in validation (of those not in test, for LUNA16 folds) [0 .. 1]
TEST_FRACTION = 0.1            # share of patients in test (random split only) [0 .. 1]
SEED = 85                      # seed of the patient shuffle (the thesis's slice shuffle used 85)
STRATIFY = True                # split patients with and without nodule slices separately
TEST_FOLDS = (9,)              # LUNA16 subset folds forming the test part; () = random patient split
VAL_FOLDS = ()                 # LUNA16 subset folds forming the validation part (not in TEST_FOLDS); () = VAL_FRACTION
TEST_FROM = ""                 # a split.json whose test patients are this split's test part ("" = off)
TEST_LUNA16_DIR = ""           # leakage guard: LUNA16 folder, CSV (seriesuid column) or UID list; "" = off
GUARD_BY_PATIENT = True        # guard: also remove the other series of a guarded series' patient


# ----------------------------------------------------------------------------- leakage guard

def guard_series(source, test_folds=TEST_FOLDS):
    """The SeriesInstanceUIDs the leakage guard keeps out of training and validation -> set of str.

    ``source``: a LUNA16 folder (``subsetK/<uid>.mhd``; only the folds in ``test_folds`` unless it is empty),
    a .csv file with a ``seriesuid`` column, or a text file with one UID per line."""
    if os.path.isdir(source):
        found = glob.glob(os.path.join(source, "**", "*.mhd"), recursive=True)
        uids = set()
        for p in found:
            m = re.search(r"(?:^|[\\/])subset(\d+)[\\/]", p)
            if test_folds and (m is None or int(m.group(1)) not in test_folds):
                continue
            uids.add(os.path.splitext(os.path.basename(p))[0])
        if not found:
            raise SystemExit(f"TEST_LUNA16_DIR={source}: no .mhd files found")
        return uids
    if not os.path.isfile(source):
        raise SystemExit(f"TEST_LUNA16_DIR={source}: no such file or folder")
    if source.lower().endswith(".csv"):
        with open(source, newline="") as f:
            rows = csv.DictReader(f)
            if "seriesuid" not in (rows.fieldnames or []):
                raise SystemExit(f"TEST_LUNA16_DIR={source}: no 'seriesuid' column")
            return {r["seriesuid"].strip() for r in rows if r["seriesuid"].strip()}
    with open(source) as f:
        return {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}


# ----------------------------------------------------------------------------- split

def _draw(patients, fraction, at_least_one):
    """``fraction`` of ``patients`` (a shuffled list is consumed from its front) -> (drawn, rest)."""
    n = int(round(fraction * len(patients)))
    if at_least_one and fraction > 0 and n == 0 and len(patients) > 1:
        n = 1
    return patients[:n], patients[n:]


def split_patients(patients, has_nodule, val_fraction, test_fraction, seed, stratify=True, test=(), val=()):
    """Patients -> dict part -> sorted list. ``test``: patients fixed in the test part (LUNA16 folds); when
    given, test_fraction is not used. ``val``: patients fixed in the validation part (VAL_FOLDS; those also in
    ``test`` stay in test); when given, val_fraction is not used. ``has_nodule``: dict patient -> bool (for
    STRATIFY)."""
    rng = np.random.default_rng(seed)
    test = set(test)
    val = set(val) - test
    pool = sorted(set(patients) - test - val)
    groups = [[p for p in pool if has_nodule[p]], [p for p in pool if not has_nodule[p]]] if stratify else [pool]
    parts = {"train": [], "val": sorted(val), "test": sorted(test)}
    for gi, g in enumerate(groups):                 # group 0 (nodule patients) gets at least one in each part
        g = [g[i] for i in rng.permutation(len(g))]
        if not test:
            drawn, g = _draw(g, test_fraction, gi == 0)
            parts["test"] += drawn
        if not val:
            drawn, g = _draw(g, val_fraction, gi == 0)
            parts["val"] += drawn
        parts["train"] += g
    return {k: sorted(v) for k, v in parts.items()}


def make_split(slices, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION, seed=SEED, stratify=STRATIFY,
               test_folds=TEST_FOLDS, guard=None, guard_by_patient=GUARD_BY_PATIENT, test_patients=None,
               val_folds=VAL_FOLDS):
    """The split of a table's ``/slices`` rows (structured array) -> (idx dict part -> int64 rows, info dict).

    ``guard``: set of SeriesInstanceUIDs to remove from train and val (None = no guard). ``test_patients``:
    patients fixed in the test part (another run's test part, TEST_FROM), before TEST_FOLDS. ``val_folds``:
    LUNA16 folds whose patients are the validation part (not drawn with val_fraction); SystemExit when the
    table has no scan in them or they overlap the test folds."""
    pid = np.char.decode(slices["patient_id"].astype("S"), "utf-8") if len(slices) else np.array([], str)
    uid = np.char.decode(slices["seriesuid"].astype("S"), "utf-8") if len(slices) else np.array([], str)
    subset = slices["subset"].astype(int) if len(slices) else np.array([], int)
    has_nodule = {p: False for p in pid}
    for p in pid[slices["n_nodule_pixels"] > 0]:
        has_nodule[p] = True
    folds = sorted({int(s) for s in subset if s >= 0})
    if test_patients is not None:
        fold_test = sorted(set(pid) & set(test_patients))
        missing = sorted(set(test_patients) - set(pid))
        if missing:
            print(f"TEST_FROM: {len(missing)} of its {len(set(test_patients))} test patients are not in this table")
        mode = "fixed" if fold_test else "random"
    else:
        fold_test = sorted(set(pid[np.isin(subset, list(test_folds))])) if test_folds else []
        mode = "folds" if fold_test else "random"
    if test_folds and not fold_test and test_patients is None:
        print(f"TEST_FOLDS={tuple(test_folds)}: no scan of the table is in these LUNA16 folds (folds present: "
              f"{folds or 'none'}); random patient split instead")
    fold_val = _fold_patients(pid, subset, val_folds, test_folds if mode == "folds" else (), folds)
    parts = split_patients(sorted(has_nodule), has_nodule, val_fraction, test_fraction, seed, stratify, fold_test,
                           fold_val)
    part_of = {p: k for k, v in parts.items() for p in v}
    row_part = np.array([part_of[p] for p in pid], dtype=object)
    info = dict(mode=mode, seed=seed, val_fraction=None if val_folds else val_fraction,
                test_fraction=test_fraction if mode == "random" else None,
                test_folds=list(test_folds) if mode == "folds" else [], folds_in_table=folds, stratify=stratify)
    if val_folds:
        info["val_folds"] = list(val_folds)
    if mode == "fixed":
        info["test_patients_fixed"] = fold_test
    keep = np.ones(len(slices), bool)
    if guard is not None:
        keep &= ~_guarded_rows(pid, uid, row_part, guard, guard_by_patient, info)
    idx = {k: np.nonzero((row_part == k) & keep)[0].astype(np.int64) for k in ("train", "val", "test")}
    for k in idx:
        rows = idx[k]
        info[k] = dict(patients=sorted(set(pid[rows])), series=sorted(set(uid[rows])), rows=int(len(rows)),
                       nodule_rows=int((slices["n_nodule_pixels"][rows] > 0).sum()) if len(rows) else 0)
    return idx, info


def _fold_patients(pid, subset, val_folds, test_folds, folds):
    """The patients of the LUNA16 folds ``val_folds`` (sorted; [] when none are asked for); SystemExit when a
    fold is also a test fold or the table has no scan in them."""
    if not val_folds:
        return []
    both = sorted(set(val_folds) & set(test_folds))
    if both:
        raise SystemExit(f"VAL_FOLDS={tuple(val_folds)}: fold(s) {both} are also in TEST_FOLDS")
    found = sorted(set(pid[np.isin(subset, list(val_folds))]))
    if not found:
        raise SystemExit(f"VAL_FOLDS={tuple(val_folds)}: no scan of the table is in these LUNA16 folds (folds "
                         f"present: {folds or 'none'})")
    return found


def _guarded_rows(pid, uid, row_part, guard, guard_by_patient, info):
    """The training and validation rows the leakage guard removes (bool per row); info["guard"] records them."""
    hit_series = set(uid) & set(guard)
    hit_rows = np.isin(uid, list(hit_series))
    hit_patients = set(pid[hit_rows])
    if guard_by_patient:
        hit_rows = np.isin(pid, list(hit_patients))
    trainval = (row_part == "train") | (row_part == "val")
    removed_rows = hit_rows & trainval
    removed_series = sorted(set(uid[removed_rows]))
    info["guard"] = dict(
        guard_series=len(set(guard)), guard_series_in_table=len(hit_series), by_patient=guard_by_patient,
        removed_series=removed_series, removed_patients=sorted(set(pid[removed_rows])),
        removed_rows=int(removed_rows.sum()),
        removed_sibling_series=sorted(set(removed_series) - hit_series))
    print(f"leakage guard: removed {len(removed_series)} series ({len(info['guard']['removed_patients'])} "
          f"patients, {int(removed_rows.sum())} slices) from train/val; {len(hit_series)} of the "
          f"{len(set(guard))} guarded series are in this table")
    return removed_rows


def _read_slices(path):
    """The ``/slices`` rows of the table at ``path``, or None after saying (stderr) why there are none."""
    import tables
    if not os.path.isfile(path):
        print(f"{path}: no slice table; run table.py first", file=sys.stderr)
        return None
    with tables.open_file(path, "r") as h5:
        slices = h5.root.slices.read()
    if not len(slices):
        print(f"{path}: the table has no rows", file=sys.stderr)
        return None
    return slices


def _write_split(out_dir, idx, info):
    """The parts' row indexes, then split.json (written last: it marks the split complete), each atomically."""
    os.makedirs(out_dir, exist_ok=True)
    for k in ("train", "val", "test"):
        with runfiles.atomic(os.path.join(out_dir, f"{k}_idx.npy")) as tmp:
            np.save(tmp, idx[k])
    with runfiles.atomic(os.path.join(out_dir, "split.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(info, f, indent=1)


def main(argv=None):
    cfg = configure(globals(), argv)
    in_dir = cfg.IN_DIR or os.path.join(cfg.WORK_DIR, "2_table")
    out_dir = cfg.OUT_DIR or os.path.join(cfg.WORK_DIR, "3_split")
    path = os.path.join(in_dir, cfg.TABLE_NAME)
    slices = _read_slices(path)                                   # 1. the table's rows
    if slices is None:
        return 2
    guard = guard_series(cfg.TEST_LUNA16_DIR, cfg.TEST_FOLDS) if cfg.TEST_LUNA16_DIR else None   # 2. guard
    test_patients = runfiles.read_json(cfg.TEST_FROM)["test"]["patients"] if cfg.TEST_FROM else None
    idx, info = make_split(slices, cfg.VAL_FRACTION, cfg.TEST_FRACTION, cfg.SEED, cfg.STRATIFY,   # 3. split
                           tuple(cfg.TEST_FOLDS), guard, cfg.GUARD_BY_PATIENT, test_patients, tuple(cfg.VAL_FOLDS))
    info["test_from"] = os.path.abspath(cfg.TEST_FROM) if cfg.TEST_FROM else None
    info["table"] = os.path.abspath(path)
    info["guard_source"] = cfg.TEST_LUNA16_DIR or None
    with runfiles.hold(out_dir, "slice_idx.py"):                  # 4. indexes, split.json, config.json
        _write_split(out_dir, idx, info)
        save_config(cfg, out_dir)
    for k in ("train", "val", "test"):
        print(f"{k:5s}: {len(info[k]['patients']):4d} patients, {len(info[k]['series']):4d} series, "
              f"{info[k]['rows']:6d} slices ({info[k]['nodule_rows']} with nodule pixels)")
    if not len(idx["train"]):
        print("the training part is empty", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
