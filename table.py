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
a 512-pixel slice (crop_box; CROP px), channels = neighbouring slices. ``InputGeometry``, ``network_input``
and ``volume_inputs`` below are the only code computing it: postprocess.py imports them for inference (and
maps the probability back onto the scan's voxel grid with the same geometry), so training and inference see
the same numbers.

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
PIXEL_MM = 0.7                 # network-input pixel size in mm (slices resampled to it); 0 = the scan's raw pixels (thesis)
CROP_MM = 300.0                # side of the square network input in mm (PIXEL_MM > 0; rounded up to 32-px blocks: 448 px)
CROP = 0                       # PIXEL_MM=0 only: side of the input in raw px; 0 = the thesis's 57:457 scaled to the slice
CONTEXT_SLICES = 1             # input channels: 1 = the slice (thesis); 3 = the slice and two neighbours along z
CONTEXT_MM = 2.5               # PIXEL_MM > 0: distance in mm between neighbouring channels (interpolated between slices)
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
_MAX_IDS = 16                  # nodule labels listed per slice row (more on one slice are cut: sampling only)


# ----------------------------------------------------------------------------- the network input

def crop_box(shape, crop=0):
    """The raw-pixel crop (PIXEL_MM=0) of slices of ``shape`` (Y, X) (or (Z, Y, X)) -> (y0, x0, height, width).

    ``crop`` 0 = the thesis's crop scaled to the slice size (57:457 on 512 px: 400 px); otherwise a square of
    ``crop`` px (at most the slice), on the same center, clipped to the slice."""
    ys, xs = int(shape[-2]), int(shape[-1])
    box = []
    for n in (ys, xs):
        size = int(round(_THESIS_CROP * n / _THESIS_SIZE)) if not crop else min(int(crop), n)
        start = int(round(_THESIS_CENTER * n / _THESIS_SIZE - size / 2.0))
        box.append((min(max(start, 0), n - size), size))
    return box[0][0], box[1][0], box[0][1], box[1][1]


def axis_weights(n_out, n_in, start, step):
    """(n_out, n_in) sparse (CSR) float32 linear-interpolation weights along one axis: output sample i lies at
    input coordinate start + i * step (pixel centres). When step > 1 (fewer output samples than input pixels)
    the tent widens to step input pixels, so a sample averages the pixels it covers (anti-aliasing). Samples
    more than a tent away from the input get weight 0 (the value outside a slice and outside the lungs)."""
    from scipy import sparse
    pos = float(start) + float(step) * np.arange(n_out)
    width = max(1.0, float(step))
    reach = int(np.ceil(width))
    cols = np.floor(pos)[:, None].astype(np.int64) + np.arange(-reach, reach + 2)[None, :]
    w = np.clip(1.0 - np.abs(pos[:, None] - cols) / width, 0.0, None)
    w[(cols < 0) | (cols >= n_in)] = 0.0
    total = w.sum(axis=1, keepdims=True)
    w = w / np.where(total > 0, total, 1.0)
    rows = np.repeat(np.arange(n_out), cols.shape[1])
    keep = w.ravel() > 0
    return sparse.csr_matrix((w.ravel()[keep].astype(np.float32), (rows[keep], cols.ravel()[keep])),
                             shape=(n_out, n_in))


class InputGeometry:
    """Where the network input of one scan comes from: the in-plane grid and the slices behind each channel.

    PIXEL_MM > 0 (millimetre input): every slice resampled to square pixels of ``pixel_mm`` over a square of
    ``crop_mm`` mm (rounded up to a multiple of 32 pixels) on the slice's centre (the thesis's raw crop is
    centred half a pixel off it, which would shift a flipped scan's input by a pixel); channel c of slice z taken ``(c - C // 2) * context_mm`` mm
    from it along z, linearly interpolated between the two nearest slices (clamped to the volume). A model
    trained so sees a nodule of a given size in millimetres at one size in pixels, whatever the scan.
    PIXEL_MM = 0 (the thesis's raw pixels): ``crop_box`` px of the slice itself, channels = neighbouring slices.
    ``spacing`` is the scan's (x, y, z) spacing in mm as ITK gives it (only used for millimetre input)."""

    def __init__(self, shape, spacing=None, crop=0, context_slices=1, pixel_mm=0.0, crop_mm=0.0, context_mm=0.0):
        if context_slices < 1 or context_slices % 2 == 0:
            raise ValueError(f"CONTEXT_SLICES must be odd and >= 1, got {context_slices}")
        n_z, n_y, n_x = (int(v) for v in shape[-3:])
        self.shape, self.context_slices = (n_z, n_y, n_x), int(context_slices)
        self.pixel_mm = float(pixel_mm)
        if self.pixel_mm > 0:
            if spacing is None or min(float(v) for v in spacing) <= 0:
                raise ValueError(f"millimetre input (PIXEL_MM={pixel_mm}) needs the scan's spacing, got {spacing}")
            if crop_mm <= 0:
                raise ValueError(f"CROP_MM must be > 0 with PIXEL_MM > 0, got {crop_mm}")
            sx, sy, sz = (float(v) for v in spacing)
            # whole 32-pixel blocks: the network halves its input five times (NASNet's taps need exact sizes)
            side = max(int(np.ceil(round(crop_mm / self.pixel_mm, 6) / 32.0)) * 32, 32)
            axes = []
            for n, s in ((n_y, sy), (n_x, sx)):
                step = self.pixel_mm / s                                      # input pixels per output pixel
                center = (n - 1) / 2.0                                        # the slice's centre (pixels)
                axes.append((side, center - step * (side - 1) / 2.0, step))
            z_step = float(context_mm) / sz if context_mm > 0 else 1.0       # channel distance in slices
        else:
            y0, x0, h, w = crop_box((n_y, n_x), crop)
            axes = [(h, float(y0), 1.0), (w, float(x0), 1.0)]
            z_step = 1.0
        (self.h, y_start, y_step), (self.w, x_start, x_step) = axes
        self.wy = axis_weights(self.h, n_y, y_start, y_step)                 # input = wy @ slice @ wx.T
        self.wx = axis_weights(self.w, n_x, x_start, x_step)
        self.vy = axis_weights(n_y, self.h, -y_start / y_step, 1.0 / y_step)  # scan = vy @ input @ vx.T
        self.vx = axis_weights(n_x, self.w, -x_start / x_step, 1.0 / x_step)
        self.offsets = z_step * (np.arange(self.context_slices) - self.context_slices // 2)
        # the scan pixels the input covers (y0, x0, height, width): the raw crop itself for PIXEL_MM = 0
        ys, xs = np.unique(self.wy.indices), np.unique(self.wx.indices)
        self.box = (int(ys[0]), int(xs[0]), int(ys[-1] - ys[0] + 1), int(xs[-1] - xs[0] + 1))

    def channels(self, z):
        """The channels of slice z as (k0, k1, t): (1 - t) * slice k0 + t * slice k1."""
        out = []
        for f in np.clip(int(z) + self.offsets, 0, self.shape[0] - 1):
            k0 = int(np.floor(f))
            k1, t = min(k0 + 1, self.shape[0] - 1), float(f - k0)
            out.append((k0, k1, t) if t > 1e-6 else (k0, k0, 0.0))
        return out

    def slices_needed(self, z0, z1):
        """The slice range [lo, hi) whose normalised slices the channels of slices z0 .. z1-1 read."""
        lo = min(k0 for z in (z0, z1 - 1) for k0, _, _ in self.channels(z))
        hi = max(k1 for z in (z0, z1 - 1) for _, k1, _ in self.channels(z)) + 1
        return lo, hi

    @staticmethod
    def _apply(ay, ax, arr):
        """ay @ slice @ ax.T for every slice of (k, n, m), ay and ax sparse -> float32 (k, ay rows, ax rows)."""
        a = np.asarray(arr, np.float32)
        k, n, m = a.shape
        t = ay @ a.transpose(1, 0, 2).reshape(n, k * m)                   # (p, k*m): rows of every slice
        t = t.reshape(-1, k, m).transpose(1, 0, 2).reshape(-1, m)          # (k*p, m)
        out = (ax @ t.T).T                                                 # (k*p, q)
        return np.ascontiguousarray(out.reshape(k, -1, ax.shape[0]), dtype=np.float32)

    def to_input(self, arr):
        """(k, Y, X) scan slices -> float32 (k, h, w) on the input grid."""
        return self._apply(self.wy, self.wx, arr)

    def to_scan(self, arr):
        """(k, h, w) on the input grid (a probability, say) -> float32 (k, Y, X) on the scan's pixel grid
        (0 outside what the input covers)."""
        return self._apply(self.vy, self.vx, arr)

    def stack(self, norm, lo, z):
        """The (h, w, C) input of slice z from ``norm``: normalised input-grid slices lo, lo+1, ..."""
        return np.stack([norm[k0 - lo] if t == 0 else (1 - t) * norm[k0 - lo] + t * norm[k1 - lo]
                         for k0, k1, t in self.channels(z)], axis=-1)


def normalise_slices(hu_slices, lung_slices, return_stats=False):
    """HU slices (k, Y, X) and their lung masks -> float32 (k, Y, X): each slice z-scored with the mean and
    standard deviation of the WHOLE slice, times the lung mask (the thesis's input, before the crop).
    ``return_stats``: also the slices' HU means and SDs (k,) (what converts the input back to HU)."""
    hu = np.asarray(hu_slices)
    lung = np.asarray(lung_slices)
    if hu.ndim == 2:
        hu, lung = hu[None], lung[None]
    flat = hu.reshape(hu.shape[0], -1)
    mean = flat.mean(axis=1, dtype=np.float64)
    std = flat.std(axis=1, dtype=np.float64)
    std[std == 0] = 1.0                                   # a uniform slice: zeros, not NaN
    out = hu.astype(np.float32)
    out -= mean.astype(np.float32)[:, None, None]
    out /= std.astype(np.float32)[:, None, None]
    out *= lung > 0
    return (out, mean, std) if return_stats else out


def context_indexes(z, n_z, context_slices=1):
    """The slices feeding the channels of slice z in raw-pixel input: z itself (1), or z-r..z+r clamped."""
    if context_slices < 1 or context_slices % 2 == 0:
        raise ValueError(f"CONTEXT_SLICES must be odd and >= 1, got {context_slices}")
    r = context_slices // 2
    return [min(max(z + d, 0), n_z - 1) for d in range(-r, r + 1)]


def network_input(hu, lung_mask, z, crop=0, context_slices=1, spacing=None, pixel_mm=0.0, crop_mm=0.0,
                  context_mm=0.0):
    """The network input of slice z -> float32 (h, w, C), C = context_slices (see InputGeometry).

    ``hu`` (Z, Y, X) and ``lung_mask`` (Z, Y, X) may be numpy arrays or PyTables/h5py datasets (only the
    slices needed are read)."""
    g = InputGeometry(hu.shape, spacing, crop, context_slices, pixel_mm, crop_mm, context_mm)
    lo, hi = g.slices_needed(int(z), int(z) + 1)
    norm = g.to_input(normalise_slices(np.asarray(hu[lo:hi]), np.asarray(lung_mask[lo:hi])))
    return g.stack(norm, lo, int(z))


def volume_inputs(hu, lung_mask, crop=0, context_slices=1, batch_size=16, spacing=None, pixel_mm=0.0,
                  crop_mm=0.0, context_mm=0.0, slices=None):
    """Network inputs of a whole volume, in order: yields (zs, x), zs the slice indexes of a batch and x float32
    (len(zs), h, w, C) their inputs; the same numbers as ``network_input`` for each slice, each slice
    normalised once. ``slices``: the slice indexes wanted (ascending; None = all)."""
    g = InputGeometry(hu.shape, spacing, crop, context_slices, pixel_mm, crop_mm, context_mm)
    wanted = np.arange(g.shape[0]) if slices is None else np.asarray(slices, int)
    for b in range(0, len(wanted), batch_size):
        zs = wanted[b:b + batch_size]
        lo, hi = g.slices_needed(int(zs[0]), int(zs[-1]) + 1)
        norm = g.to_input(normalise_slices(np.asarray(hu[lo:hi]), np.asarray(lung_mask[lo:hi])))
        yield zs, np.stack([g.stack(norm, lo, int(z)) for z in zs])


def table_settings(path):
    """The input geometry a table was built with (what training records and inference must use): dict of
    crop, context_slices, pixel_mm, crop_mm, context_mm, and the range of the scans' in-plane pixel sizes
    (pixel_mm_range: what a raw-pixel model was trained on)."""
    import tables
    with tables.open_file(path, "r") as h5:
        a = h5.root._v_attrs
        names = a._v_attrnamesuser
        out = dict(crop=int(a.CROP), context_slices=int(a.CONTEXT_SLICES),
                   pixel_mm=float(a.PIXEL_MM) if "PIXEL_MM" in names else 0.0,
                   crop_mm=float(a.CROP_MM) if "CROP_MM" in names else 0.0,
                   context_mm=float(a.CONTEXT_MM) if "CONTEXT_MM" in names else 0.0)
        rows = h5.root.slices
        if rows.nrows and "scan_pixel_mm" in rows.colnames:
            px = rows.col("scan_pixel_mm")
            out["pixel_mm_range"] = [float(px.min()), float(px.max())]
        return out


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
              thesis_slices=THESIS_SLICES, thesis_min_mm=THESIS_MIN_MM, neg_min_lung=NEG_MIN_LUNG_FRACTION,
              pixel_mm=PIXEL_MM, crop_mm=CROP_MM, context_mm=CONTEXT_MM):
    """One stage-1 file -> (meta rows, data (k, h, w[, C]) float32, truth (k, h, w) uint8). Raises ValueError
    (one line naming the problem) for a file that cannot be used. Inputs and truth on the InputGeometry grid."""
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
    spacing = [float(v) for v in np.asarray(attrs.get("spacing", (0, 0, 0))).reshape(-1)]
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
            raise OSError(_first_line(e)) from None
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
            raise OSError(_first_line(e)) from None


def _first_line(e):
    """An error's message in one line (of HDF5's back traces, the innermost cause)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("File ", "HDF5 error back trace", "End of HDF5"))]
    return lines[-1][:200] if lines else type(e).__name__


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
    out_path = os.path.join(out_dir, OUT_NAME)
    tmp = out_path + ".tmp"
    try:
        os.makedirs(out_dir, exist_ok=True)
        stale = glob.glob(os.path.join(out_dir, "*.tmp"))
        for p in stale:                                # left by an interrupted run (kill -9)
            os.remove(p)
        open(tmp, "wb").close()
    except OSError as e:
        print(f"{out_dir}: cannot write the output folder ({e.strerror or e})", file=sys.stderr)
        return 2
    if stale:
        print(f"{out_dir}: removed {len(stale)} temporary file(s) left by an interrupted run", file=sys.stderr)
    kw = dict(crop=CROP, context_slices=CONTEXT_SLICES, neg_per_scan=NEG_PER_SCAN, seed=SEED,
              thesis_slices=THESIS_SLICES, thesis_min_mm=THESIS_MIN_MM, neg_min_lung=NEG_MIN_LUNG_FRACTION,
              pixel_mm=PIXEL_MM, crop_mm=CROP_MM, context_mm=CONTEXT_MM)
    where = (f"resampled to {PIXEL_MM} mm pixels over {CROP_MM} mm, channels {CONTEXT_MM} mm apart" if PIXEL_MM > 0
             else "cropped by crop_box, channels = neighbouring slices")
    attrs = dict(CROP=CROP, CONTEXT_SLICES=CONTEXT_SLICES, PIXEL_MM=PIXEL_MM, CROP_MM=CROP_MM, CONTEXT_MM=CONTEXT_MM,
                 constants=json.dumps(cfg, default=str),
                 input_definition=f"(hu - mean(hu slice)) / std(hu slice) * (lung_mask > 0), {where}")
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
        if pool is not None:           # forked workers hold the file's descriptor (and its lock): end them first,
            pool.shutdown()            # or the read-back in close() cannot open the file
            pool = None
        writer.attrs.update(n_scans=n_scans, n_failed=len(failed))
        writer.close()
        os.replace(tmp, out_path)
    except OSError as e:                               # disk full or I/O error: one line, nothing left behind
        if writer.h5.isopen:
            writer.h5.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        print(f"{out_path}: writing failed, nothing written ({e})", file=sys.stderr)
        return 1
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
