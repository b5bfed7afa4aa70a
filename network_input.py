"""The network's input geometry: what one slice of a scan looks like to the network, in training and inference.

Each HU slice is z-scored with the mean and standard deviation of the whole slice, times the lung mask (0
outside the lungs) -- the thesis's normalisation -- then either resampled to square pixels of PIXEL_MM mm over
a square of CROP_MM mm on the slice's centre, with the CONTEXT_SLICES channels taken CONTEXT_MM mm apart along
z (interpolated between slices), or, with PIXEL_MM = 0, cropped in the scan's raw pixels (the thesis's rows/cols
57:457 of a 512-pixel slice; ``crop_box``), channels = neighbouring slices. ``InputGeometry``,
``network_input`` and ``volume_inputs`` are the only code computing it: table.py (stage 2) builds the training
table with them, inference.py (stage 5's predictor) feeds the network with them and maps the probability back
onto the scan's voxel grid with the same geometry, so training and inference see the same numbers. ``table_settings``
reads the geometry a table was built with (what a model's config.json records).
"""
import numpy as np

# thesis crop for 512-pixel slices: rows/cols 57:457 (400 px, centered on pixel 257)
_THESIS_SIZE, _THESIS_CROP, _THESIS_CENTER = 512, 400, 257


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
        self.starts, self.steps = (y_start, x_start), (y_step, x_step)    # input pixel i lies at start + i * step
        self.wy = axis_weights(self.h, n_y, y_start, y_step)                 # input = wy @ slice @ wx.T
        self.wx = axis_weights(self.w, n_x, x_start, x_step)
        self.vy = axis_weights(n_y, self.h, -y_start / y_step, 1.0 / y_step)  # scan = vy @ input @ vx.T
        self.vx = axis_weights(n_x, self.w, -x_start / x_step, 1.0 / x_step)
        self.offsets = z_step * (np.arange(self.context_slices) - self.context_slices // 2)
        # the scan pixels the input covers (y0, x0, height, width): the raw crop itself for PIXEL_MM = 0
        ys, xs = np.unique(self.wy.indices), np.unique(self.wx.indices)
        self.box = (int(ys[0]), int(xs[0]), int(ys[-1] - ys[0] + 1), int(xs[-1] - xs[0] + 1))

    def window(self, rows, cols):
        """This geometry restricted to input rows [r0, r1) and columns [c0, c1) (the same input pixels, fewer of
        them): the network sees the part of its input that holds the lungs; the probability maps back to the
        same scan pixels, 0 outside the window."""
        import copy
        (r0, r1), (c0, c1) = rows, cols
        g = copy.copy(self)
        g.h, g.w = r1 - r0, c1 - c0
        g.wy, g.wx = self.wy[r0:r1], self.wx[c0:c1]
        g.vy, g.vx = self.vy[:, r0:r1], self.vx[:, c0:c1]
        g.starts = (self.starts[0] + r0 * self.steps[0], self.starts[1] + c0 * self.steps[1])
        ys, xs = np.unique(g.wy.indices), np.unique(g.wx.indices)
        g.box = (int(ys[0]), int(xs[0]), int(ys[-1] - ys[0] + 1), int(xs[-1] - xs[0] + 1))
        return g

    def lung_window(self, lung_rows, lung_cols, margin_mm, block=32, size_step=64):
        """The input rows and columns that hold scan rows ``lung_rows`` and columns ``lung_cols`` ((first, last)
        scan pixels of the lungs) with ``margin_mm`` around them -> ((r0, r1), (c0, c1)): starts on the
        ``block``-pixel grid of the whole input (the network halves its input five times, so a window on that
        grid sees the same pixels at every level as the whole input), sizes rounded up to ``size_step`` pixels
        (few distinct sizes: each one is a network built once). Millimetre input only (``pixel_mm`` > 0)."""
        out = []
        for (first, last), start, step, n in zip((lung_rows, lung_cols), self.starts, self.steps, (self.h, self.w)):
            margin = margin_mm / self.pixel_mm
            lo = min(max(int(np.floor((first - start) / step - margin)), 0), n - 1) // block * block
            hi = min(max(int(np.ceil((last - start) / step + margin)) + 1, lo + 1), n)
            size = min(int(np.ceil((hi - lo) / size_step)) * size_step, n)
            lo = min(lo, (n - size) // block * block)
            out.append((lo, lo + size))
        return tuple(out)

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
                  crop_mm=0.0, context_mm=0.0, slices=None, geometry=None):
    """Network inputs of a whole volume, in order: yields (zs, x), zs the slice indexes of a batch and x float32
    (len(zs), h, w, C) their inputs; the same numbers as ``network_input`` for each slice, each slice
    normalised once. ``slices``: the slice indexes wanted (ascending; None = all). ``geometry``: an
    InputGeometry to use instead of the one of these settings (a window of it, say)."""
    g = geometry or InputGeometry(hu.shape, spacing, crop, context_slices, pixel_mm, crop_mm, context_mm)
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
