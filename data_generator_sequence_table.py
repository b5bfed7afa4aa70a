"""Keras data source reading (image, one-hot label) batches from the slice table, with augmentation.

Reads ``WORK_DIR/2_table/slices.h5`` (table.py) and a row index (``WORK_DIR/3_split/train_idx.npy``, ...).
Writes nothing. Used by nasnet_v2_train.py:

    from data_generator_sequence_table import SliceTableDataset
    train = SliceTableDataset("work/2_table/slices.h5", np.load("work/3_split/train_idx.npy"),
                              batch_size=12, augment=True, shuffle=True, seed=85, workers=2,
                              use_multiprocessing=True)
    val = SliceTableDataset(path, np.load(".../val_idx.npy"), augment=False, shuffle=False, drop_last=False)
    model.fit(train, validation_data=val, epochs=..., shuffle=False)   # the dataset shuffles itself (seeded);
                                                  # fit's shuffle=True would reorder batches with an unseeded RNG

benchmarks/bench_generator.py reads a run's table with it and prints the batches' shapes and speed.

Each batch: x float32 (B, H, W, C) (C = the table's CONTEXT_SLICES), y float32 (B, H, W, 2) one-hot
(background, nodule). Augmentation (the thesis's, label bug fixed): flips of each axis with p = 0.5, rotation
uniform in +-ROT_DEG degrees, optional zoom; one affine matrix per sample moves image and label together
(cv2.warpAffine, border replicated), the image bilinear, the label nearest ("nearest"), bilinear then >= 0.5
("threshold"), or bilinear then truncated to int ("truncate": the thesis's bug, which shrinks nodules at every
non-zero angle; for reproduction only). Optional random crops (``crop`` px) holding a nodule with
probability ``crop_nodule_p``, the rest placed uniformly (negatives). Intensity augmentation (``intensity``:
{name: (p, low, high)}, e.g. ``intensity_settings()``, whose arguments' defaults are the ranges used; or None =
off) on top: blur, sharpening, noise, contrast, brightness, gamma, each with a probability, worked in HU
through the table's per-row slice mean and SD; the lung mask (the zeros of the input) and the label are left
as they are.

Determinism: the epoch's order is a permutation drawn from (seed, epoch) and each batch's augmentation from
(seed, epoch, batch index), so the same seed gives the same batches whichever worker computes them and in
whatever order. ``on_epoch_end`` moves to the next epoch; ``set_epoch(k)`` jumps to epoch k (resume).

Workers: PyTables is not thread-safe, so the file is opened lazily, once per process (the handle is keyed by
the process id and reopened after a fork; it is never pickled), and threads of one process (workers > 1
without multiprocessing) read under a lock. ``workers=2, use_multiprocessing=True`` (Keras 3 PyDataset
arguments) computes batches in two processes.
"""
import os
import threading

import numpy as np

try:
    import keras
    _PyDataset = keras.utils.PyDataset
except ImportError:                                    # the table tools work without keras
    _PyDataset = object

# ----------------------------------------------------------------------------- intensity augmentation
PIVOT_HU = -850.0                    # contrast pivot: lung parenchyma stays where it is
INTENSITY_NAMES = ("blur", "sharpen", "noise", "contrast", "brightness", "gamma")   # in the order applied
_GAMMA_WINDOW = (-1000.0, 400.0)     # the HU window gamma works on (values outside it left alone)


def intensity_settings(blur=(0.15, 0.3, 1.0), sharpen=(0.15, 0.3, 1.5), noise=(0.3, 5.0, 40.0),
                       contrast=(0.3, 0.75, 1.3), brightness=(0.3, -50.0, 50.0), gamma=(0.3, 0.7, 1.4)):
    """The intensity augmentation, {name: (probability, low, high)} in INTENSITY_NAMES's order: each transform
    applied with its probability, its value uniform in [low, high] (see intensity_augment). The defaults:
    blur, Gaussian sigma in px (a softer reconstruction kernel); sharpen, unsharp-mask gain at sigma 1.5 px (a
    sharper kernel); noise, SD in HU of correlated noise of 0.7 px grain (a lower dose); contrast, factor about
    PIVOT_HU (denser or fainter nodules and vessels); brightness, HU shift (calibration, depth of inspiration);
    gamma on the [-1000, 400] HU window."""
    return {"blur": blur, "sharpen": sharpen, "noise": noise, "contrast": contrast, "brightness": brightness,
            "gamma": gamma}


_LOCK = threading.Lock()       # serialises HDF5 reads of the threads of one process


def _reset_lock():
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock)   # a lock held by a thread at fork time would never free


_OPEN = []                     # handles opened by this process, closed quietly at exit


def _close_open_files():
    for h5 in _OPEN:
        if h5.isopen:
            h5.close()


def _register_for_exit(h5):
    if not _OPEN:
        import atexit
        atexit.register(_close_open_files)   # runs before PyTables' own handler, which warns about open files
    _OPEN.append(h5)


class SliceTableDataset(_PyDataset):
    """Batches of rows ``indexes`` of the slice table at ``path``.

    Args: batch_size; augment (flips, rotation, zoom); flip; rot_deg; zoom; label_interp ("nearest",
    "threshold", "truncate"); shuffle (reshuffle every epoch); drop_last (drop the last partial batch: True
    for training); seed; crop (random crop side, 0 = whole slice) and crop_nodule_p; one_hot (y with 2
    channels, else (B, H, W, 1) 0/1); max_batches (> 0: each epoch is the first max_batches batches of that
    epoch's order, so short epochs still see every row over the epochs: Keras's own steps_per_epoch would
    carry one iterator across epochs); workers, use_multiprocessing, max_queue_size (Keras PyDataset)."""

    def __init__(self, path, indexes, batch_size=12, augment=True, flip=True, rot_deg=6.0, zoom=0.0,
                 label_interp="nearest", shuffle=True, drop_last=True, seed=85, crop=0, crop_nodule_p=0.8,
                 one_hot=True, max_batches=0, sampling="slice", neg_fraction=0.3, intensity=None, **kwargs):
        if _PyDataset is not object:
            super().__init__(**kwargs)
        if label_interp not in ("nearest", "threshold", "truncate"):
            raise ValueError(f"label_interp: 'nearest', 'threshold' or 'truncate', got {label_interp!r}")
        import tables
        self.path = os.path.abspath(path)
        if sampling not in ("slice", "nodule"):
            raise ValueError(f"sampling: 'slice' or 'nodule', got {sampling!r}")
        with tables.open_file(self.path, "r") as h5:     # metadata only; the reading handle opens lazily
            n_rows = h5.root.data.shape[0]
            tail = tuple(int(s) for s in h5.root.data.shape[1:])
            self.context_slices = int(getattr(h5.root._v_attrs, "CONTEXT_SLICES", 1))
            rows = h5.root.slices
            if sampling == "nodule" and "nodule_ids" not in rows.colnames:
                raise ValueError(f"{path}: SAMPLING='nodule' needs the table's nodule_ids column (rebuild it "
                                 "with this table.py)")
            if sampling == "nodule":
                meta = (rows.col("seriesuid"), rows.col("nodule_ids"), rows.col("n_nodule_pixels"))
            if intensity and "hu_std" not in rows.colnames:
                raise ValueError(f"{path}: intensity augmentation needs the table's hu_mean/hu_std columns "
                                 "(rebuild it with this table.py, or set INTENSITY=False)")
            self.hu_stats = (np.stack([rows.col("hu_mean"), rows.col("hu_std")], 1).astype(np.float32)
                             if intensity else None)
        self.indexes = np.asarray(indexes, dtype=np.int64).ravel()
        if len(self.indexes) and (self.indexes.min() < 0 or self.indexes.max() >= n_rows):
            raise ValueError(f"{path}: indexes outside the table's {n_rows} rows")
        self.height, self.width = tail[0], tail[1]
        self.batch_size, self.augment, self.flip = int(batch_size), augment, flip
        self.rot_deg, self.zoom, self.label_interp = float(rot_deg), float(zoom), label_interp
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        self.crop = int(crop) if crop and crop < min(self.height, self.width) else 0
        self.crop_nodule_p, self.one_hot = float(crop_nodule_p), one_hot
        self.max_batches = int(max_batches)         # > 0: an epoch is the first max_batches batches of its order
        self.sampling, self.neg_fraction = sampling, float(neg_fraction)
        self.intensity = check_intensity(intensity) if intensity else None
        if sampling == "nodule":
            self._row_weights(*meta)
        self._h5, self._pid = None, None
        self.set_epoch(0)

    def _row_weights(self, seriesuids, nodule_ids, n_nodule_pixels):
        """SAMPLING='nodule': each nodule equally likely, whatever its size. A nodule crossing n slices gives
        each of them 1/n; a slice's weight is the sum over its nodules. Negatives (no nodule pixel in the
        input) are drawn uniformly, ``neg_fraction`` of each epoch."""
        idx = self.indexes
        ids = nodule_ids[idx]
        pos = (n_nodule_pixels[idx] > 0) & (ids > 0).any(axis=1)
        keys = [(seriesuids[r], int(k)) for r, row in zip(idx, ids) for k in row if k > 0]
        uniq, counts = np.unique(np.array([f"{u!r}/{k}" for u, k in keys]), return_counts=True)
        n_slices = dict(zip(uniq, counts))
        w = np.zeros(len(idx))
        for i in np.nonzero(pos)[0]:
            w[i] = sum(1.0 / n_slices[f"{seriesuids[idx[i]]!r}/{int(k)}"] for k in ids[i] if k > 0)
        self._pos = np.nonzero(pos)[0]
        self._pos_p = w[self._pos] / w[self._pos].sum() if len(self._pos) else None
        self._neg = np.nonzero(~pos)[0]
        self.n_nodules = len(uniq)

    # ------------------------------------------------------------------ shape and order
    @property
    def image_shape(self):
        """(H, W, C) of x (without the batch axis)."""
        side = (self.crop, self.crop) if self.crop else (self.height, self.width)
        return side + (self.context_slices,)

    def __len__(self):
        n = len(self.indexes)
        full = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return min(full, self.max_batches) if self.max_batches > 0 else full

    def set_epoch(self, epoch):
        """Use epoch ``epoch``'s order and augmentation (epochs count from 0)."""
        self.epoch = int(epoch)
        if self.shuffle and self.sampling == "nodule" and len(self._pos):
            # as many draws as rows: (1 - neg_fraction) by nodule, the rest uniform among negatives
            rng = np.random.default_rng([self.seed, self.epoch])
            n = len(self.indexes)
            n_neg = int(round(self.neg_fraction * n)) if len(self._neg) else 0
            order = np.concatenate([rng.choice(self._pos, n - n_neg, p=self._pos_p),
                                    rng.choice(self._neg, n_neg) if n_neg else np.zeros(0, np.int64)])
            self.order = rng.permutation(order)
        elif self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            self.order = rng.permutation(len(self.indexes))
        else:
            self.order = np.arange(len(self.indexes))

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)

    # ------------------------------------------------------------------ reading
    def _file(self):
        if self._h5 is None or self._pid != os.getpid():
            import tables
            self._h5 = tables.open_file(self.path, "r")   # after a fork: a new handle, the parent's is left alone
            self._pid = os.getpid()
            _register_for_exit(self._h5)
        return self._h5

    def __getstate__(self):                                # spawn / pickling: never ship an open handle
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None
        return state

    def close(self):
        if self._h5 is not None and self._pid == os.getpid() and self._h5.isopen:
            self._h5.close()
        self._h5 = None

    def read_rows(self, rows):
        """Table rows -> (images (k, H, W, C) float32, labels (k, H, W) uint8), unaugmented."""
        rows = np.asarray(rows, dtype=np.int64)
        x = np.empty((len(rows), self.height, self.width, self.context_slices), np.float32)
        y = np.empty((len(rows), self.height, self.width), np.uint8)
        with _LOCK:
            h5 = self._file()
            for i in np.argsort(rows, kind="stable"):     # in file order
                d = h5.root.data[rows[i]]
                x[i] = d[..., None] if d.ndim == 2 else d
                y[i] = h5.root.truth[rows[i]]
        return x, y

    # ------------------------------------------------------------------ augmentation
    def _matrix(self, rng):
        """Draw one sample's flips, angle and zoom -> 2x3 affine matrix (output <- input) or None (identity)."""
        fy, fx = (rng.random(2) < 0.5) if self.flip else (False, False)
        angle = rng.uniform(-self.rot_deg, self.rot_deg) if self.rot_deg > 0 else 0.0
        scale = rng.uniform(1 - self.zoom, 1 + self.zoom) if self.zoom > 0 else 1.0
        if not (fy or fx or angle or scale != 1.0):
            return None
        cy, cx = (self.height - 1) / 2.0, (self.width - 1) / 2.0
        import cv2
        rot = np.vstack([cv2.getRotationMatrix2D((cx, cy), angle, scale), [0, 0, 1]])
        flip = np.array([[-1 if fx else 1, 0, 2 * cx if fx else 0],
                         [0, -1 if fy else 1, 2 * cy if fy else 0], [0, 0, 1]], np.float64)
        return (rot @ flip)[:2]

    def _crop_origin(self, m, image, label, rng):
        """Top-left corner (y, x) of a random crop in output coordinates, on a nodule with p = crop_nodule_p.
        SAMPLING='nodule': the nodule is one of the slice's nodules with equal chance (not by its area), and
        the other crops are placed on a bright lung pixel off the nodules (mostly a vessel: the look-alikes)."""
        c, hh, ww = self.crop, self.height, self.width
        on_nodule = rng.random() < self.crop_nodule_p
        pick = rng.random()
        uy, ux = rng.random(2)
        if on_nodule:
            ys, xs = np.nonzero(label)
            if len(ys) and self.sampling == "nodule":
                import cv2
                n_comp, comp = cv2.connectedComponents(label.astype(np.uint8), connectivity=8)
                ys, xs = np.nonzero(comp == 1 + min(int(rng.random() * (n_comp - 1)), n_comp - 2))
        elif self.sampling == "nodule":
            img = image[..., image.shape[-1] // 2] if image.ndim == 3 else image
            inside = img[(img != 0) & (label == 0)]
            ys = xs = ()
            if inside.size:
                ys, xs = np.nonzero((img > np.percentile(inside, 98)) & (label == 0))
        else:
            ys = xs = ()
        if len(ys) == 0:
            return int(uy * (hh - c + 1)), int(ux * (ww - c + 1))
        k = min(int(pick * len(ys)), len(ys) - 1)
        py, px = float(ys[k]), float(xs[k])
        if m is not None:
            px, py = m @ np.array([px, py, 1.0])
        py = min(max(int(round(py)), 0), hh - 1)
        px = min(max(int(round(px)), 0), ww - 1)
        # a uniform corner such that the chosen pixel lies inside the crop
        y_lo, y_hi = max(py - c + 1, 0), min(py, hh - c)
        x_lo, x_hi = max(px - c + 1, 0), min(px, ww - c)
        return y_lo + int(uy * (y_hi - y_lo + 1)), x_lo + int(ux * (x_hi - x_lo + 1))

    def augment_sample(self, image, label, rng):
        """One (H, W, C) image and its (H, W) 0/1 label -> augmented (h, w, C) float32, (h, w) uint8."""
        import cv2
        m = self._matrix(rng) if self.augment else None
        if self.crop:
            y0, x0 = self._crop_origin(m, image, label, rng)
            shift = np.array([[1, 0, -x0], [0, 1, -y0]], np.float64)
            m = (np.vstack([m, [0, 0, 1]]) if m is not None else np.eye(3))
            m = shift @ m                                # warp only the crop's pixels
            size = (self.crop, self.crop)
        else:
            size = (self.width, self.height)
        if m is None:
            return image, label
        img = cv2.warpAffine(image, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if img.ndim == 2:
            img = img[..., None]
        if self.label_interp == "nearest":
            lab = cv2.warpAffine(label, m, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
        else:
            soft = cv2.warpAffine(label.astype(np.float32), m, size, flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
            lab = (soft >= 0.5) if self.label_interp == "threshold" else soft.astype(np.int32)
            lab = lab.astype(np.uint8)
        return img, lab

    # ------------------------------------------------------------------ batches
    def batch_rows(self, index):
        """The table rows of batch ``index`` in the current epoch."""
        return self.indexes[self.order[index * self.batch_size:(index + 1) * self.batch_size]]

    def __getitem__(self, index):
        if index < 0 or index >= len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        rows = self.batch_rows(index)
        images, labels = self.read_rows(rows)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        h, w, c = self.image_shape
        x = np.empty((len(rows), h, w, c), np.float32)
        y = np.empty((len(rows), h, w), np.uint8)
        irng = np.random.default_rng([self.seed, self.epoch, int(index), 1])   # its own stream: the geometry
        for i in range(len(rows)):                                            # is the same with it on or off
            x[i], y[i] = self.augment_sample(images[i], labels[i], rng)
            if self.augment and self.intensity:
                x[i] = intensity_augment(x[i], *self.hu_stats[rows[i]], self.intensity, irng)
        if not self.one_hot:
            return x, y[..., None].astype(np.float32)
        onehot = np.empty((len(rows), h, w, 2), np.float32)
        onehot[..., 1] = y
        onehot[..., 0] = 1.0 - onehot[..., 1]
        return x, onehot


def check_intensity(aug):
    """{name: (p, low, high)} -> the same with float tuples; refuses unknown names and bad ranges."""
    out = {}
    for name, v in dict(aug).items():
        if name not in INTENSITY_NAMES:
            raise ValueError(f"intensity augmentation {name!r}: expected one of {', '.join(INTENSITY_NAMES)}")
        if len(v) != 3 or not 0.0 <= float(v[0]) <= 1.0 or float(v[1]) > float(v[2]):
            raise ValueError(f"intensity augmentation {name}={v!r}: expected (probability in [0, 1], low, high)")
        out[name] = tuple(float(t) for t in v)
    return out


def intensity_augment(image, hu_mean, hu_std, aug, rng):
    """The intensity augmentation of one input (h, w[, C]) float32 (z-scored HU times the lung mask): each
    transform of ``aug`` ({name: (p, low, high)}) applied with probability p, its value uniform in [low, high],
    in INTENSITY_NAMES's order. Works in HU: hu = x * hu_std + hu_mean; pixels that were 0 (outside the lungs)
    stay 0. Returns a new float32 array."""
    from scipy import ndimage as ndi
    x = np.asarray(image, np.float32)
    inside = x != 0
    hu = x * np.float32(hu_std) + np.float32(hu_mean)
    plane = (1.5, 1.5) + (0,) * (hu.ndim - 2)
    for name in INTENSITY_NAMES:
        if name not in aug:
            continue
        p, lo, hi = aug[name]
        if rng.random() >= p:
            continue
        v = rng.uniform(lo, hi)
        if name == "blur":
            hu = ndi.gaussian_filter(hu, (v, v) + (0,) * (hu.ndim - 2), truncate=2.5)
        elif name == "sharpen":
            hu = hu + v * (hu - ndi.gaussian_filter(hu, plane, truncate=2.5))
        elif name == "noise":
            n = ndi.gaussian_filter(rng.standard_normal(hu.shape[:2]).astype(np.float32), 0.7, truncate=2.5)
            n /= max(float(n.std()), 1e-6)
            hu = hu + v * (n if hu.ndim == 2 else n[..., None])
        elif name == "contrast":
            hu = PIVOT_HU + v * (hu - PIVOT_HU)
        elif name == "brightness":
            hu = hu + v
        elif name == "gamma":
            a, b = _GAMMA_WINDOW
            u = (hu - a) / (b - a)
            win = (u > 0) & (u < 1)
            hu = np.where(win, a + (b - a) * np.clip(u, 0, 1) ** v, hu)
    out = (hu - np.float32(hu_mean)) / np.float32(hu_std if hu_std else 1.0)
    return np.where(inside, out, 0.0).astype(np.float32)
