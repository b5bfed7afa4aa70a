"""Stage 2: per-scan files -> one PyTables slice table, the network's input.

Reads  ``IN_DIR/*.h5`` (stage 1, default ``WORK_DIR/1_preprocessed``; see ct_io.write_scan_h5).
Writes ``OUT_DIR/slices.h5`` (default ``WORK_DIR/2_table``) and ``OUT_DIR/config.json``:
- ``/data``  Float32 EArray (N, H, W), or (N, H, W, C) when CONTEXT_SLICES = C > 1: the network input;
- ``/truth`` UInt8 EArray (N, H, W): 1 where a (non-excluded) nodule is, the same crop;
- ``/slices`` Table, row i describing ``data[i]``: seriesuid, patient_id, source, LUNA16 subset fold,
  z index, number of nodule pixels, crop box (y0, x0, height, width), why the slice was chosen;
- attributes: CROP, CONTEXT_SLICES, the constants used (JSON).
Compressed with blosc (COMPLIB, COMPLEVEL), one slice per chunk.

    python table.py                       # WORK_DIR=work
    python table.py --WORK_DIR=/data/run1 --NEG_PER_SCAN=20 --CONTEXT_SLICES=3

The network input (the thesis's): each HU slice z-scored with the mean and standard deviation of the whole
slice, times the lung mask (0 outside the lungs), cropped by ``crop_box`` (rows/cols 57:457 for 512-pixel
slices). ``network_input`` / ``volume_inputs`` below are the only code computing it: postprocess.py imports
them for inference, so training and inference see the same numbers.

Which slices: every slice a nodule label crosses, plus NEG_PER_SCAN slices without nodule pixels drawn with
a seed (slices showing some lung first). THESIS_SLICES=True keeps the thesis's rule instead: the 3 slices
around the center of each nodule larger than 5 mm (plus the negatives; NEG_PER_SCAN=0 for the thesis's
table). Scans are streamed one at a time (N_WORKERS > 0: computed in a process pool, appended here), so
memory does not grow with the number of scans. A scan that cannot be used is reported in one line and
skipped; the run ends with a summary and exits non-zero if any failed. The table is written under a
temporary name and renamed when complete.
"""
import glob
import json
import os
import re
import sys
import time
import zlib
from collections import deque

import numpy as np

from configurator import configure, save_config
from ct_io import read_scan_h5

# ----------------------------------------------------------------------------- constants
WORK_DIR = "work"              # root of a run; every stage reads and writes below it
IN_DIR = ""                    # stage-1 per-scan files; "" = WORK_DIR/1_preprocessed
OUT_DIR = ""                   # "" = WORK_DIR/2_table
OUT_NAME = "slices.h5"         # the table's file name inside OUT_DIR
CROP = 0                       # side of the square network input (px); 0 = derived: round(400/512 * slice size)
CONTEXT_SLICES = 1             # input channels: 1 = the slice (thesis); 3 = the slice and its two neighbours
NEG_PER_SCAN = 10              # slices without nodule pixels drawn per scan (negatives)
NEG_MIN_LUNG_FRACTION = 0.02   # negatives are drawn first among slices whose crop is at least this much lung
THESIS_SLICES = False          # True = thesis rule: only the 3 slices around each nodule center (> THESIS_MIN_MM)
THESIS_MIN_MM = 5.0            # THESIS_SLICES: nodules up to this diameter (mm) are left out
SEED = 85                      # seed of the negative-slice draw (combined with each seriesuid)
COMPLIB = "blosc:lz4"          # blosc family; lz4: ~10x faster to write, 3x to read than zstd, files ~30 % larger
COMPLEVEL = 5                  # compression level (thesis: blosc 5)
N_WORKERS = 0                  # processes computing scans while this one appends (0 = all in this process)
LIMIT = 0                      # use only the first LIMIT scans (0 = all)

# thesis crop for 512-pixel slices: rows/cols 57:457 (400 px, centered on pixel 257)
_THESIS_SIZE, _THESIS_CROP, _THESIS_CENTER = 512, 400, 257
_UID_LEN = 64                  # DICOM UIDs are at most 64 characters


# ----------------------------------------------------------------------------- the network input

def crop_box(shape, crop=0):
    """The network-input crop of slices of ``shape`` (Y, X) (or (Z, Y, X)) -> (y0, x0, height, width).

    ``crop`` 0 = the thesis's crop scaled to the slice size (57:457 on 512 px: 400 px); otherwise a square of
    ``crop`` px (at most the slice), on the same center, clipped to the slice."""
    ys, xs = int(shape[-2]), int(shape[-1])
    box = []
    for n in (ys, xs):
        size = int(round(_THESIS_CROP * n / _THESIS_SIZE)) if not crop else min(int(crop), n)
        start = int(round(_THESIS_CENTER * n / _THESIS_SIZE - size / 2.0))
        box.append((min(max(start, 0), n - size), size))
    return box[0][0], box[1][0], box[0][1], box[1][1]


def normalise_slices(hu_slices, lung_slices, box):
    """HU slices (k, Y, X) and their lung masks -> float32 (k, h, w): each slice z-scored with the mean and
    standard deviation of the WHOLE slice, times the lung mask, cropped to ``box`` = (y0, x0, h, w)."""
    hu = np.asarray(hu_slices)
    lung = np.asarray(lung_slices)
    if hu.ndim == 2:
        hu, lung = hu[None], lung[None]
    flat = hu.reshape(hu.shape[0], -1)
    mean = flat.mean(axis=1, dtype=np.float64)
    std = flat.std(axis=1, dtype=np.float64)
    std[std == 0] = 1.0                                   # a uniform slice: zeros, not NaN
    y0, x0, h, w = box
    out = hu[:, y0:y0 + h, x0:x0 + w].astype(np.float32)
    out -= mean.astype(np.float32)[:, None, None]
    out /= std.astype(np.float32)[:, None, None]
    out *= lung[:, y0:y0 + h, x0:x0 + w] > 0
    return out


def context_indexes(z, n_z, context_slices=1):
    """The slices feeding the channels of slice z: z itself (1), or z-r..z+r clamped to the volume."""
    if context_slices < 1 or context_slices % 2 == 0:
        raise ValueError(f"CONTEXT_SLICES must be odd and >= 1, got {context_slices}")
    r = context_slices // 2
    return [min(max(z + d, 0), n_z - 1) for d in range(-r, r + 1)]


def network_input(hu, lung_mask, z, crop=0, context_slices=1):
    """The network input of slice z -> float32 (h, w, C), C = context_slices.

    ``hu`` (Z, Y, X) and ``lung_mask`` (Z, Y, X) may be numpy arrays or PyTables/h5py datasets (only the
    slices needed are read)."""
    box = crop_box(hu.shape, crop)
    zs = context_indexes(int(z), hu.shape[0], context_slices)
    hu_s = np.stack([np.asarray(hu[k]) for k in zs])
    lung_s = np.stack([np.asarray(lung_mask[k]) for k in zs])
    return np.moveaxis(normalise_slices(hu_s, lung_s, box), 0, -1)


def volume_inputs(hu, lung_mask, crop=0, context_slices=1, batch_size=16):
    """Network inputs of a whole volume, in order: yields (z0, x) with x float32 (b, h, w, C) holding slices
    z0 .. z0+b-1; the same numbers as ``network_input`` for each slice, each slice normalised once."""
    n_z = hu.shape[0]
    box = crop_box(hu.shape, crop)
    r = context_slices // 2
    context_indexes(0, n_z, context_slices)               # validates context_slices
    for z0 in range(0, n_z, batch_size):
        z1 = min(z0 + batch_size, n_z)
        lo, hi = max(z0 - r, 0), min(z1 + r, n_z)          # slices needed, each normalised once
        norm = normalise_slices(np.asarray(hu[lo:hi]), np.asarray(lung_mask[lo:hi]), box)
        x = np.empty((z1 - z0, box[2], box[3], context_slices), np.float32)
        for i, z in enumerate(range(z0, z1)):
            for c, k in enumerate(context_indexes(z, n_z, context_slices)):
                x[i, :, :, c] = norm[k - lo]
        yield z0, x


def uncrop(arr, shape, box, fill=0):
    """Put a cropped (..., h, w) array back into a full (..., Y, X) slice grid of ``shape`` (Y, X)."""
    y0, x0, h, w = box
    out = np.full(arr.shape[:-2] + (int(shape[-2]), int(shape[-1])), fill, dtype=arr.dtype)
    out[..., y0:y0 + h, x0:x0 + w] = arr
    return out


def table_settings(path):
    """CROP and CONTEXT_SLICES a table was built with (what inference must use): dict(crop=, context_slices=)."""
    import tables
    with tables.open_file(path, "r") as h5:
        a = h5.root._v_attrs
        return dict(crop=int(a.CROP), context_slices=int(a.CONTEXT_SLICES))


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


def scan_rows(path, crop=CROP, context_slices=CONTEXT_SLICES, neg_per_scan=NEG_PER_SCAN, seed=SEED,
              thesis_slices=THESIS_SLICES, thesis_min_mm=THESIS_MIN_MM, neg_min_lung=NEG_MIN_LUNG_FRACTION):
    """One stage-1 file -> (meta rows, data (k, h, w[, C]) float32, truth (k, h, w) uint8). Raises ValueError
    (one line naming the problem) for a file that cannot be used."""
    import tables
    if not os.path.isfile(path) or not tables.is_hdf5_file(path):
        raise ValueError("not an HDF5 file (truncated or not written by preprocess.py)")
    try:
        scan = read_scan_h5(path, arrays=("lung_mask", "nodule_mask"))
    except Exception as e:                             # HDF5 messages end with their most specific line
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        detail = lines[-1] if isinstance(e, tables.HDF5ExtError) else lines[0]
        raise ValueError(f"unreadable stage-1 file ({type(e).__name__}: {detail[:160]})") from None
    lung, nod_mask, attrs = scan["lung_mask"], scan["nodule_mask"], scan["attrs"]
    seriesuid = str(attrs.get("seriesuid", "")) or os.path.splitext(os.path.basename(path))[0]
    patient_id = str(attrs.get("patient_id", "")) or seriesuid
    if len(seriesuid) > _UID_LEN or len(patient_id) > _UID_LEN:
        raise ValueError(f"seriesuid/patient_id longer than {_UID_LEN} characters")
    with tables.open_file(path, "r") as h5:
        hu = h5.root.hu
        if hu.ndim != 3 or hu.shape != lung.shape or hu.shape != nod_mask.shape:
            raise ValueError(f"shapes differ or are not 3-D: hu {hu.shape}, lung_mask {lung.shape}, "
                             f"nodule_mask {nod_mask.shape}")
        n_z = hu.shape[0]
        box = crop_box(hu.shape, crop)
        y0, x0, h, w = box
        lung_fraction = (lung[:, y0:y0 + h, x0:x0 + w] > 0).reshape(n_z, -1).mean(axis=1)
        chosen = select_slices(nod_mask, lung_fraction, scan["nodules"], seriesuid, neg_per_scan, seed,
                               thesis_slices, thesis_min_mm, neg_min_lung)
        shape = (len(chosen), h, w) + ((context_slices,) if context_slices > 1 else ())
        data = np.empty(shape, np.float32)
        truth = np.empty((len(chosen), h, w), np.uint8)
        cache = {}                                     # normalised slices, each HU slice read once
        meta = []
        for i, (z, reason) in enumerate(chosen):
            chans = []
            for k in context_indexes(z, n_z, context_slices):
                if k not in cache:
                    cache[k] = network_input(hu, lung, k, crop, 1)[..., 0]
                chans.append(cache[k])
            data[i] = chans[0] if context_slices == 1 else np.stack(chans, axis=-1)
            truth[i] = nod_mask[z, y0:y0 + h, x0:x0 + w] > 0
            meta.append(dict(seriesuid=seriesuid, patient_id=patient_id, source=str(attrs.get("source", "")),
                             subset=luna16_subset(attrs.get("source_path", "")), z=z, n_z=n_z,
                             n_nodule_pixels=int(truth[i].sum()), n_lung_pixels=int(round(lung_fraction[z] * h * w)),
                             y0=y0, x0=x0, height=h, width=w, reason=reason))
            for k in [k for k in cache if k < z - context_slices]:
                del cache[k]
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
        y0 = tables.Int32Col(pos=8)                         # crop offsets: data[i] = slice[y0:y0+height, x0:x0+width]
        x0 = tables.Int32Col(pos=9)
        height = tables.Int32Col(pos=10)
        width = tables.Int32Col(pos=11)
        reason = tables.StringCol(8, pos=12)                # b"nodule", b"center" (THESIS_SLICES), b"negative"
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
        self.data.append(data)
        self.truth.append(truth)
        row = self.slices.row
        for m in meta:
            for k, v in m.items():
                row[k] = v
            row.append()
        self.slices.flush()

    def close(self):
        if self.data is None:                          # no rows: still a valid, empty table
            self._create(1, 1)
        a = self.h5.root._v_attrs
        for k, v in self.attrs.items():
            a[k] = v
        self.h5.close()


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
        return path, None, str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv=None):
    from tqdm import tqdm
    cfg = configure(globals(), argv)
    in_dir = IN_DIR or os.path.join(WORK_DIR, "1_preprocessed")
    out_dir = OUT_DIR or os.path.join(WORK_DIR, "2_table")
    paths = sorted(glob.glob(os.path.join(in_dir, "*.h5")))
    if LIMIT:
        paths = paths[:LIMIT]
    if not paths:
        print(f"{in_dir}: no stage-1 files (*.h5); run preprocess.py first", file=sys.stderr)
        return 2
    context_indexes(0, 1, CONTEXT_SLICES)               # refuses an even CONTEXT_SLICES before any work
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, OUT_NAME)
    tmp = out_path + ".tmp"
    kw = dict(crop=CROP, context_slices=CONTEXT_SLICES, neg_per_scan=NEG_PER_SCAN, seed=SEED,
              thesis_slices=THESIS_SLICES, thesis_min_mm=THESIS_MIN_MM, neg_min_lung=NEG_MIN_LUNG_FRACTION)
    attrs = dict(CROP=CROP, CONTEXT_SLICES=CONTEXT_SLICES, constants=json.dumps(cfg, default=str),
                 input_definition="(hu - mean(hu slice)) / std(hu slice) * (lung_mask > 0), cropped by crop_box")
    failed, n_rows, n_nod_rows, n_scans = [], 0, 0, 0
    t0 = time.time()
    writer = _TableWriter(tmp, CONTEXT_SLICES, COMPLIB, COMPLEVEL, attrs)
    pool = None
    try:
        jobs = ((p, kw) for p in paths)
        if N_WORKERS > 0:
            from concurrent.futures import ProcessPoolExecutor
            pool = ProcessPoolExecutor(N_WORKERS)
            pending = deque()                          # at most 2 scans per worker in flight: memory stays flat

            def results():
                for job in jobs:
                    pending.append(pool.submit(_scan_job, job))
                    if len(pending) >= 2 * N_WORKERS:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            stream = results()
        else:
            stream = map(_scan_job, jobs)
        for path, res, err in tqdm(stream, total=len(paths), desc="table", unit="scan"):
            if err is None:
                try:
                    writer.append(*res)
                except ValueError as e:
                    err = str(e)
            if err is not None:
                failed.append(path)
                tqdm.write(f"{path}: {err}; skipped", file=sys.stderr)
                continue
            n_scans += 1
            n_rows += len(res[0])
            n_nod_rows += sum(m["n_nodule_pixels"] > 0 for m in res[0])
            del res
            _release_freed_memory()
        writer.attrs.update(n_scans=n_scans, n_failed=len(failed))
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        if writer.h5.isopen:
            writer.h5.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    save_config(cfg, out_dir)
    dt = time.time() - t0
    print(f"{out_path}: {n_rows} slices ({n_nod_rows} with nodule pixels) from {n_scans} scans "
          f"in {dt:.1f} s ({n_rows / max(dt, 1e-9):.1f} slices/s); {len(failed)} scan(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
