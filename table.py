"""Stage 2: per-scan files -> one PyTables slice table, the network's input.

Reads  ``IN_DIR/*.h5`` (stage 1, default ``WORK_DIR/1_preprocessed``; see ct_io.write_scan_h5).
Writes ``OUT_DIR/slices.h5`` (default ``WORK_DIR/2_table``) and ``OUT_DIR/config.json``:
- ``/data``  Float32 EArray (N, H, W), or (N, H, W, C) when CONTEXT_SLICES = C > 1: the network input;
- ``/truth`` UInt8 EArray (N, H, W): 1 where a (non-excluded) nodule is, the same crop;
- ``/slices`` Table, row i describing ``data[i]``: seriesuid, patient_id, source, LUNA16 subset fold,
  z index, number of nodule pixels, the scan pixels the input covers (y0, x0, height, width), why the slice
  was chosen, the scan's pixel and slice spacing;
- attributes: PIXEL_MM, CROP_MM, CONTEXT_MM, CROP, CONTEXT_SLICES (the input geometry), the constants used (JSON).
Compressed with blosc (COMPLIB, COMPLEVEL), one slice per chunk.

    python table.py                       # WORK_DIR=work
    python table.py --WORK_DIR=/data/run1 --NEG_PER_SCAN=20 --CONTEXT_SLICES=3
    python table.py --PIXEL_MM=0 --CROP=400                # the thesis's raw-pixel input

The network input: each HU slice z-scored with the mean and standard deviation of the whole slice, times the
lung mask (0 outside the lungs) -- the thesis's normalisation -- then, by default, resampled to square pixels
of PIXEL_MM mm over a square of CROP_MM mm on the slice's centre, with the CONTEXT_SLICES channels taken
CONTEXT_MM mm apart along z (interpolated between slices): a nodule of a given size in mm then has one size in
pixels whatever the scan's resolution, and a model trained on one cohort applies to another. The /truth
labels are resampled on the same grid. PIXEL_MM=0 keeps the thesis's raw pixels: the crop rows/cols 57:457 of
a 512-pixel slice (crop_box; CROP px), channels = neighbouring slices. The library network_input.py
(``InputGeometry``, ``network_input``, ``volume_inputs``) is the only code computing it: this stage and
stage 5's inference (inference.py) both use it (inference maps the probability back onto the scan's voxel grid with
the same geometry), so training and inference see the same numbers.

Which slices: every slice a nodule label crosses, plus NEG_PER_SCAN slices without nodule pixels drawn with
a seed (slices showing some lung first). THESIS_SLICES=True keeps the thesis's rule instead: the 3 slices
around the center of each nodule larger than 5 mm (plus the negatives; NEG_PER_SCAN=0 for the thesis's
table). Scans are streamed one at a time (N_WORKERS > 0: computed in a process pool, appended here), so
memory does not grow with the number of scans. A scan that cannot be used is reported in one line and
skipped; the run ends with a summary and exits non-zero if any failed. The table is written under a
temporary name and renamed when complete.
"""
import contextlib
import glob
import json
import os
import re
import sys
import time
import zlib
from collections import deque

import numpy as np

import runfiles
from configurator import configure, save_config
from ct_io import read_scan_h5
from network_input import InputGeometry, context_indexes, normalise_slices

# ----------------------------------------------------------------------------- constants
WORK_DIR = "work"              # root of a run; every stage reads and writes below it
IN_DIR = ""                    # stage-1 per-scan files; "" = WORK_DIR/1_preprocessed
OUT_DIR = ""                   # "" = WORK_DIR/2_table
OUT_NAME = "slices.h5"         # the table's file name inside OUT_DIR
PIXEL_MM = 0.7                 # network-input pixel size in mm (slices resampled to it); 0 = the scan's raw pixels (thesis) [>= 0]
CROP_MM = 300.0                # side of the square network input in mm (PIXEL_MM > 0; rounded up to 32-px blocks: 448 px) [> 0]
CROP = 0                       # PIXEL_MM=0 only: side of the input in raw px; 0 = the thesis's 57:457 scaled to the slice [>= 0]
CONTEXT_SLICES = 1             # input channels: 1 = the slice (thesis); 3 = the slice and two neighbours along z [odd >= 1]
CONTEXT_MM = 2.5               # PIXEL_MM > 0: distance in mm between neighbouring channels (interpolated between slices) [>= 0]
NEG_PER_SCAN = 10              # slices without nodule pixels drawn per scan (negatives) [>= 0]
NEG_MIN_LUNG_FRACTION = 0.02   # negatives are drawn first among slices whose crop is at least this much lung [0 .. 1]
THESIS_SLICES = False          # True = thesis rule: only the 3 slices around each nodule center (> THESIS_MIN_MM)
THESIS_MIN_MM = 5.0            # THESIS_SLICES: nodules up to this diameter (mm) are left out [>= 0]
SEED = 85                      # seed of the negative-slice draw (combined with each seriesuid)
COMPLIB = "blosc:lz4"          # blosc family; lz4: ~10x faster to write, 3x to read than zstd, files ~30 % larger
COMPLEVEL = 5                  # compression level (thesis: blosc 5) [0 .. 9]
N_WORKERS = 0                  # processes computing scans while this one appends (0 = all in this process) [>= 0]
LIMIT = 0                      # use only the first LIMIT scans (0 = all) [>= 0]

_UID_LEN = 64                  # DICOM UIDs are at most 64 characters
_MAX_IDS = 16                  # nodule labels listed per slice row (more on one slice are cut: sampling only)


# ----------------------------------------------------------------------------- slice selection

def luna16_subset(source_path):
    """The LUNA16 fold of a scan from its source path (``.../subsetK/<uid>.mhd`` -> K), -1 if none."""
    m = re.search(r"(?:^|[\\/])subset(\d+)(?:[\\/]|$)", str(source_path or ""))
    return int(m.group(1)) if m else -1


def select_slices(nodule_mask, lung_fraction, nodules, seriesuid, neg_per_scan=NEG_PER_SCAN, seed=SEED,
                  thesis_slices=False, thesis_min_mm=THESIS_MIN_MM, neg_min_lung=NEG_MIN_LUNG_FRACTION):
    """Which slices of a scan go into the table -> sorted list of (z, reason), reason b"nodule"/b"center"/
    b"negative". ``lung_fraction`` (Z,): share of each slice's crop that is lung."""
    n_z = nodule_mask.shape[0]
    has_nodule = nodule_mask.reshape(n_z, -1).max(axis=1) > 0
    chosen = {}
    if thesis_slices:
        for nod in nodules:
            if nod["excluded"] or not nod["diameter_mm"] > thesis_min_mm:
                continue
            c = int(round(float(nod["center_z"])))
            for z in (c - 1, c, c + 1):
                if 0 <= z < n_z:
                    chosen[z] = b"center"
    else:
        for z in np.nonzero(has_nodule)[0]:
            chosen[int(z)] = b"nodule"
    if neg_per_scan > 0:
        # the draw depends only on (seed, seriesuid): adding scans does not change other scans' negatives
        rng = np.random.default_rng([seed, zlib.crc32(seriesuid.encode())])
        free = ~has_nodule
        lungy = np.nonzero(free & (lung_fraction >= neg_min_lung))[0]
        other = np.nonzero(free & (lung_fraction < neg_min_lung))[0]
        picks = list(rng.permutation(lungy)[:neg_per_scan])
        if len(picks) < neg_per_scan:
            picks += list(rng.permutation(other)[:neg_per_scan - len(picks)])
        for z in picks:
            chosen.setdefault(int(z), b"negative")
    return sorted(chosen.items())


def _read_stage1(path):
    """A stage-1 file's masks, nodules and attributes -> (scan dict, seriesuid, patient_id, (x, y, z) spacing).
    Raises ValueError (one line naming the problem) for a file that cannot be used."""
    import tables
    if not os.path.isfile(path) or not tables.is_hdf5_file(path):
        raise ValueError("not an HDF5 file (truncated or not written by preprocess.py)")
    try:
        scan = read_scan_h5(path, arrays=("lung_mask", "nodule_mask"))
    except Exception as e:
        raise ValueError(f"unreadable stage-1 file ({type(e).__name__}: {runfiles.one_line(e, 160)})") from None
    attrs = scan["attrs"]
    seriesuid = str(attrs.get("seriesuid", "")) or os.path.splitext(os.path.basename(path))[0]
    patient_id = str(attrs.get("patient_id", "")) or seriesuid
    if len(seriesuid) > _UID_LEN or len(patient_id) > _UID_LEN:
        raise ValueError(f"seriesuid/patient_id longer than {_UID_LEN} characters")
    spacing = [float(v) for v in np.asarray(attrs.get("spacing", (0, 0, 0))).reshape(-1)]
    return scan, seriesuid, patient_id, spacing


def scan_rows(path, crop=CROP, context_slices=CONTEXT_SLICES, neg_per_scan=NEG_PER_SCAN, seed=SEED,
              thesis_slices=THESIS_SLICES, thesis_min_mm=THESIS_MIN_MM, neg_min_lung=NEG_MIN_LUNG_FRACTION,
              pixel_mm=PIXEL_MM, crop_mm=CROP_MM, context_mm=CONTEXT_MM):
    """One stage-1 file -> (meta rows, data (k, h, w[, C]) float32, truth (k, h, w) uint8). Raises ValueError
    (one line naming the problem) for a file that cannot be used. Inputs and truth on the InputGeometry grid."""
    import tables
    scan, seriesuid, patient_id, spacing = _read_stage1(path)
    lung, nod_mask, attrs = scan["lung_mask"], scan["nodule_mask"], scan["attrs"]
    with tables.open_file(path, "r") as h5:
        hu = h5.root.hu
        if hu.ndim != 3 or hu.shape != lung.shape or hu.shape != nod_mask.shape:
            raise ValueError(f"shapes differ or are not 3-D: hu {hu.shape}, lung_mask {lung.shape}, "
                             f"nodule_mask {nod_mask.shape}")
        n_z = hu.shape[0]
        g = InputGeometry(hu.shape, spacing, crop, context_slices, pixel_mm, crop_mm, context_mm)
        y0, x0, bh, bw = g.box
        lung_fraction = (lung[:, y0:y0 + bh, x0:x0 + bw] > 0).reshape(n_z, -1).mean(axis=1)
        chosen = select_slices(nod_mask, lung_fraction, scan["nodules"], seriesuid, neg_per_scan, seed,
                               thesis_slices, thesis_min_mm, neg_min_lung)
        h, w = g.h, g.w
        shape = (len(chosen), h, w) + ((context_slices,) if context_slices > 1 else ())
        data = np.empty(shape, np.float32)
        truth = np.empty((len(chosen), h, w), np.uint8)
        cache, stats = {}, {}                          # normalised input-grid slices, each HU slice read once
        meta = []
        for i, (z, reason) in enumerate(chosen):
            lo, hi = g.slices_needed(z, z + 1)
            for k in range(lo, hi):
                if k not in cache:
                    norm, mean, std = normalise_slices(hu[k], lung[k], return_stats=True)
                    cache[k], stats[k] = g.to_input(norm)[0], (float(mean[0]), float(std[0]))
            x = g.stack(cache, 0, z)                   # cache is keyed by slice index: offset 0
            data[i] = x[..., 0] if context_slices == 1 else x
            truth[i] = g.to_input((nod_mask[z] > 0)[None])[0] >= 0.5
            ids = np.zeros(_MAX_IDS, np.int16)
            labels = np.unique(nod_mask[z])[1:][:_MAX_IDS]     # the nodules this slice crosses (0 = none)
            ids[:len(labels)] = labels
            meta.append(dict(seriesuid=seriesuid, patient_id=patient_id, source=str(attrs.get("source", "")),
                             subset=luna16_subset(attrs.get("source_path", "")), z=z, n_z=n_z,
                             n_nodule_pixels=int(truth[i].sum()), n_lung_pixels=int(round(lung_fraction[z] * h * w)),
                             y0=y0, x0=x0, height=bh, width=bw, reason=reason,
                             scan_pixel_mm=spacing[0], scan_slice_mm=spacing[2], nodule_ids=ids,
                             hu_mean=stats[z][0], hu_std=stats[z][1]))
            for k in [k for k in cache if k < lo - 1]:
                del cache[k], stats[k]
    return meta, data, truth


# ----------------------------------------------------------------------------- the table file

def _slice_description():
    import tables

    class SliceRow(tables.IsDescription):
        seriesuid = tables.StringCol(_UID_LEN, pos=0)       # scan (SeriesInstanceUID)
        patient_id = tables.StringCol(_UID_LEN, pos=1)      # patient (LIDC PatientID; LUNA16: the seriesuid)
        source = tables.StringCol(16, pos=2)                # "luna16" / "lidc"
        subset = tables.Int8Col(pos=3)                      # LUNA16 fold from the subsetK folder, -1 if none
        z = tables.Int32Col(pos=4)                          # slice index in the scan's /hu
        n_z = tables.Int32Col(pos=5)                        # number of slices of the scan
        n_nodule_pixels = tables.Int32Col(pos=6)            # nodule pixels in /truth[i]
        n_lung_pixels = tables.Int32Col(pos=7)              # lung pixels in the crop
        y0 = tables.Int32Col(pos=8)                         # the scan pixels data[i] covers: [y0:y0+height, x0:x0+width]
        x0 = tables.Int32Col(pos=9)
        height = tables.Int32Col(pos=10)
        width = tables.Int32Col(pos=11)
        reason = tables.StringCol(8, pos=12)                # b"nodule", b"center" (THESIS_SLICES), b"negative"
        scan_pixel_mm = tables.Float32Col(pos=13)           # the scan's in-plane pixel size (x spacing), mm
        scan_slice_mm = tables.Float32Col(pos=14)           # the scan's slice spacing, mm
        nodule_ids = tables.Int16Col(shape=(_MAX_IDS,), pos=15)  # stage-1 labels k of the nodules on the slice, 0-padded
        hu_mean = tables.Float32Col(pos=16)                 # HU mean and SD of slice z (its input = (HU - mean) / SD
        hu_std = tables.Float32Col(pos=17)                  # in the lungs): what intensity augmentation works in
    return SliceRow


class _TableWriter:
    """Appends scans' rows to a new slice table (created on the first scan, whose crop fixes H and W)."""

    def __init__(self, path, context_slices, complib, complevel, attrs):
        import tables
        self.tables, self.path = tables, path
        self.h5 = tables.open_file(path, "w", title="network input slices")
        self.filters = tables.Filters(complevel=complevel, complib=complib, shuffle=True)
        self.context_slices, self.attrs = context_slices, attrs
        self.data = self.truth = None
        self.n_rows, self.truth_sum = 0, 0             # what was appended, checked when the file is read back
        self.slices = self.h5.create_table("/", "slices", _slice_description(), "row i describes data[i]",
                                           filters=self.filters)

    def _create(self, h, w):
        t, c = self.tables, self.context_slices
        tail = (h, w) + ((c,) if c > 1 else ())
        self.data = self.h5.create_earray("/", "data", t.Float32Atom(), (0,) + tail, "network input",
                                          filters=self.filters, chunkshape=(1,) + tail)
        self.truth = self.h5.create_earray("/", "truth", t.UInt8Atom(), (0, h, w), "nodule mask (0/1)",
                                           filters=self.filters, chunkshape=(1, h, w))

    def append(self, meta, data, truth):
        if not meta:
            return
        if self.data is None:
            self._create(truth.shape[1], truth.shape[2])
        if data.shape[1:] != self.data.shape[1:]:
            raise ValueError(f"input size {data.shape[1:]} differs from the table's {self.data.shape[1:]} "
                             f"(slices of another size: set --CROP to a fixed size)")
        try:
            self.data.append(data)
            self.truth.append(truth)
            row = self.slices.row
            for m in meta:
                for k, v in m.items():
                    row[k] = v
                row.append()
            self.slices.flush()
        except (OSError, RuntimeError) as e:           # disk full, I/O error (HDF5ExtError is a RuntimeError)
            raise OSError(runfiles.one_line(e, 200)) from None
        self.n_rows += len(truth)
        self.truth_sum += int(np.count_nonzero(truth))

    def close(self):
        """Close the file, then read it back whole: a full disk can fail silently at close (OSError if so)."""
        try:
            if self.data is None:                      # no rows: still a valid, empty table
                self._create(1, 1)
            a = self.h5.root._v_attrs
            for k, v in self.attrs.items():
                a[k] = v
            self.h5.close()
            import h5py
            import hdf5plugin  # noqa: F401  (blosc for h5py)
            with h5py.File(self.path, "r") as h5:      # read back with h5py: PyTables can leave a damaged file open
                n, truth_sum = h5["data"].shape[0], 0
                if h5["truth"].shape[0] != n or h5["slices"].shape[0] != n or n != self.n_rows:
                    raise OSError(f"{n} rows read back, {self.n_rows} written")
                for i in range(0, n, 256):
                    h5["data"][i:i + 256]
                    truth_sum += int(np.count_nonzero(h5["truth"][i:i + 256]))
                h5["slices"][()]
                if truth_sum != self.truth_sum:
                    raise OSError("the nodule masks read back differently")
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise OSError(runfiles.one_line(e, 200)) from None


# ----------------------------------------------------------------------------- main

def _release_freed_memory():
    """Give the heap memory freed after a scan back to the OS (glibc keeps it otherwise, and the resident size
    then creeps up with the number of scans although nothing is kept)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):                  # not glibc: nothing to do
        pass


def _scan_job(args):
    path, kw = args
    _release_freed_memory()                            # in a pool worker: what the previous scan freed
    try:
        return path, scan_rows(path, **kw), None
    except Exception as e:                              # reported by the main process, scan skipped
        return path, None, runfiles.one_line(e)


def _computed_scans(paths, kw, n_workers):
    """(path, scan_rows' result or None, error line or None) per scan, in the order of ``paths``: computed here
    (n_workers = 0) or by a pool of n_workers processes, at most 2 scans per worker in flight (memory stays
    flat). The pool is shut down when the last result has been taken (use with contextlib.closing)."""
    jobs = ((p, kw) for p in paths)
    if n_workers <= 0:
        yield from map(_scan_job, jobs)
        return
    from concurrent.futures import ProcessPoolExecutor
    pool = ProcessPoolExecutor(n_workers)
    try:
        pending = deque()
        for job in jobs:
            pending.append(pool.submit(_scan_job, job))
            if len(pending) >= 2 * n_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        pool.shutdown()                # forked workers hold the table's descriptor (and its lock): end them before
    finally:                           # the table is closed, or the read-back in close() cannot open the file
        pool.shutdown(cancel_futures=True)


def _scan_settings(cfg):
    """scan_rows' keyword arguments from the run's settings."""
    return dict(crop=cfg.CROP, context_slices=cfg.CONTEXT_SLICES, neg_per_scan=cfg.NEG_PER_SCAN, seed=cfg.SEED,
                thesis_slices=cfg.THESIS_SLICES, thesis_min_mm=cfg.THESIS_MIN_MM,
                neg_min_lung=cfg.NEG_MIN_LUNG_FRACTION, pixel_mm=cfg.PIXEL_MM, crop_mm=cfg.CROP_MM,
                context_mm=cfg.CONTEXT_MM)


def _table_attrs(cfg):
    """The table file's attributes: the input geometry, the settings (JSON) and the input's definition."""
    where = (f"resampled to {cfg.PIXEL_MM} mm pixels over {cfg.CROP_MM} mm, channels {cfg.CONTEXT_MM} mm apart"
             if cfg.PIXEL_MM > 0 else "cropped by crop_box, channels = neighbouring slices")
    return dict(CROP=cfg.CROP, CONTEXT_SLICES=cfg.CONTEXT_SLICES, PIXEL_MM=cfg.PIXEL_MM, CROP_MM=cfg.CROP_MM,
                CONTEXT_MM=cfg.CONTEXT_MM, constants=json.dumps(cfg, default=str),
                input_definition=f"(hu - mean(hu slice)) / std(hu slice) * (lung_mask > 0), {where}")


def _stage1_files(cfg):
    """(the stage-1 folder, its *.h5 files in name order, the first LIMIT when LIMIT > 0)."""
    in_dir = cfg.IN_DIR or os.path.join(cfg.WORK_DIR, "1_preprocessed")
    paths = sorted(glob.glob(os.path.join(in_dir, "*.h5")))
    return in_dir, paths[:cfg.LIMIT] if cfg.LIMIT else paths


def _prepare_output(out_dir, out_path):
    """Create the output folder, remove the temporary files an interrupted run left there, and check that the
    table's temporary file can be written. False (after one line on stderr) when the folder is not writable."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        open(os.path.join(out_dir, ".write_check"), "wb").close()
        os.remove(os.path.join(out_dir, ".write_check"))
    except OSError as e:
        print(f"{out_dir}: cannot write the output folder ({e.strerror or e})", file=sys.stderr)
        return False
    stale = runfiles.clean_stale(out_dir)
    if stale:
        print(f"{out_dir}: removed {len(stale)} temporary file(s) left by an interrupted run", file=sys.stderr)
    return True


def _append_scans(writer, paths, cfg):
    """Compute every scan's rows and append them to ``writer``; a scan that fails is reported in one line and
    skipped -> counts dict: n_scans, n_rows, n_nodule_rows, failed (paths)."""
    from tqdm import tqdm
    counts = dict(n_scans=0, n_rows=0, n_nodule_rows=0, failed=[])
    with contextlib.closing(_computed_scans(paths, _scan_settings(cfg), cfg.N_WORKERS)) as stream:
        for path, res, err in tqdm(stream, total=len(paths), desc="table", unit="scan"):
            if err is None:
                try:
                    writer.append(*res)
                except ValueError as e:
                    err = str(e)
            if err is not None:
                counts["failed"].append(path)
                tqdm.write(f"{path}: {err}; skipped", file=sys.stderr)
                continue
            counts["n_scans"] += 1
            counts["n_rows"] += len(res[0])
            counts["n_nodule_rows"] += sum(m["n_nodule_pixels"] > 0 for m in res[0])
            del res
            _release_freed_memory()
    return counts


def _write_table(out_path, paths, cfg):
    """The table of every scan, written under a temporary name and renamed to ``out_path`` when complete and
    read back whole (nothing is left when it fails: OSError) -> _append_scans' counts."""
    with runfiles.atomic(out_path) as tmp:
        writer = _TableWriter(tmp, cfg.CONTEXT_SLICES, cfg.COMPLIB, cfg.COMPLEVEL, _table_attrs(cfg))
        try:
            counts = _append_scans(writer, paths, cfg)
            writer.attrs.update(n_scans=counts["n_scans"], n_failed=len(counts["failed"]))
            writer.close()
        finally:
            if writer.h5.isopen:
                writer.h5.close()
    return counts


def main(argv=None):
    cfg = configure(globals(), argv)
    in_dir, paths = _stage1_files(cfg)                   # 1. the stage-1 files
    if not paths:
        print(f"{in_dir}: no stage-1 files (*.h5); run preprocess.py first", file=sys.stderr)
        return 2
    context_indexes(0, 1, cfg.CONTEXT_SLICES)           # refuses an even CONTEXT_SLICES before any work
    out_dir = cfg.OUT_DIR or os.path.join(cfg.WORK_DIR, "2_table")
    out_path = os.path.join(out_dir, cfg.OUT_NAME)
    try:
        with runfiles.hold(out_dir, "table.py"):
            return _make_table(cfg, out_dir, out_path, paths)
    except SystemExit as e:                             # the folder is held by another run: one line, exit 2
        print(e.code, file=sys.stderr)
        return 2


def _make_table(cfg, out_dir, out_path, paths):
    """Steps 2-4 of main(), with the output folder held by this run."""
    if not _prepare_output(out_dir, out_path):          # 2. the output folder, writable and without stale files
        return 2
    t0 = time.time()
    try:
        counts = _write_table(out_path, paths, cfg)     # 3. every scan's rows into the table
    except OSError as e:                                # disk full or I/O error: one line, nothing left behind
        print(f"{out_path}: writing failed, nothing written ({e})", file=sys.stderr)
        return 1
    save_config(cfg, out_dir)                           # 4. the settings beside the table
    dt = time.time() - t0
    print(f"{out_path}: {counts['n_rows']} slices ({counts['n_nodule_rows']} with nodule pixels) from "
          f"{counts['n_scans']} scans in {dt:.1f} s ({counts['n_rows'] / max(dt, 1e-9):.1f} slices/s); "
          f"{len(counts['failed'])} scan(s) failed")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
