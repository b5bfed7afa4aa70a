"""Inference: a saved network applied to whole scans, on the input geometry it was trained with.

    predictor = inference.Predictor("work/4_model/best.keras", tta=4)
    prob, box = predictor.predict(hu, lung_mask, batch_size=8, spacing=spacing)   # (Z, Y, X) on the scan's grid

The model's input geometry (network_input.InputGeometry: PIXEL_MM, CROP_MM, CONTEXT_MM, or raw pixels with CROP;
CONTEXT_SLICES) is read from the model's config.json (``model_settings``), so a model trained at one scan
resolution is applied correctly to scans of another. The network is loaded on first use and, when its input
size is fixed, rebuilt at the size of the slices it must predict (``rebuild_model``). Test-time augmentation
averages the network's output over flips of each slice. Several model files separated by commas
("a.keras,b.keras") are an ensemble: their probabilities are averaged (the same input geometry required).
postprocess.py (stage 5) and the benchmarks use it.
"""
import os
import sys
import time

import numpy as np

import network_input
import runfiles


def rebuild_model(model, input_shape):
    """The same network as ``model`` (built by nasnet_v2.get_model) at another fixed input (H, W, C), with
    ``model``'s weights. The networks are fully convolutional, but their upsampling layers are built for
    exact sizes, so a model trained on crops of another size is rebuilt for the slices it must predict."""
    import nasnet_v2
    name = model.name
    if name == "unet":
        layer_names = [l.name for l in model.layers]
        kw = dict(variant="unet", base_filters=int(model.get_layer("enc0a_conv").filters),
                  depth=sum(1 for n in layer_names if n.startswith("pool")))
    elif name.startswith("nasnet_v2_") and name[len("nasnet_v2_"):] in nasnet_v2.VARIANTS:
        kw = dict(variant=name[len("nasnet_v2_"):])
    else:
        raise ValueError(f"model {name!r} has a fixed input {model.input_shape[1:3]} and is not a nasnet_v2 "
                         "network that could be rebuilt at the slices' size")
    new = nasnet_v2.get_model(tuple(int(v) for v in input_shape), bn_momentum=None, **kw)
    new.set_weights(model.get_weights())        # same architecture: same weights in the same order
    return new


def load_model(path):
    """The Keras model saved at ``path`` (not compiled); SystemExit with one line when it cannot be loaded."""
    import keras
    try:
        import nasnet_v2  # noqa: F401  (registers the loss and metric of compiled models)
    except ImportError:
        pass
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:            # not a scan's fault: stop the run with one line
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise SystemExit(f"{path}: cannot load the model ({type(e).__name__}: {msg})") from None


GEOMETRY_KEYS = ("CROP", "CONTEXT_SLICES", "PIXEL_MM", "CROP_MM", "CONTEXT_MM")   # what an ensemble must share


def model_files(model):
    """The model files of a MODEL setting: one path, or several separated by commas (an ensemble)."""
    return [p.strip() for p in str(model).split(",") if p.strip()]


def model_settings(model_path, config_path="", table_path=""):
    """The settings a model was trained with (UPPERCASE names: CROP, CONTEXT_SLICES, PIXEL_MM, ...): its
    ``config_path`` (default config.json beside the model), else the slice table's attributes (``table_path``,
    network_input.table_settings), else {} (raw pixels, the thesis crop, the model's input channels)."""
    config_path = config_path or os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
    cfg = runfiles.read_json(config_path) if os.path.isfile(config_path) else {}
    if "CROP" not in cfg and table_path and os.path.isfile(table_path):
        cfg = {k.upper(): v for k, v in network_input.table_settings(table_path).items()}
    return cfg


class Predictor:
    """The network, loaded on first use, and the input geometry it was trained with (``model_settings``). A
    raw-pixel model (PIXEL_MM = 0) applied to a scan whose pixels are outside the range it was trained on
    (PIXEL_MM_RANGE) is named in one line. ``tta``: how many flips of each input are averaged (1 = none,
    2 = + left-right, 4 = + up-down and both)."""

    def __init__(self, model_path, config_path="", table_path="", tta=1):
        if tta not in (1, 2, 4):
            raise ValueError(f"TTA must be 1, 2 or 4, got {tta!r}")
        self.model_paths, self.tta = model_files(model_path), int(tta)
        self.model_path = ",".join(self.model_paths)
        cfgs = [model_settings(p, config_path, table_path) for p in self.model_paths]
        cfg = cfgs[0]
        for p, c in zip(self.model_paths[1:], cfgs[1:]):
            if any(c.get(k) != cfg.get(k) for k in GEOMETRY_KEYS):
                raise SystemExit(f"{p}: an ensemble's models need the same input geometry ({', '.join(GEOMETRY_KEYS)}); "
                                 f"{self.model_paths[0]} has {[cfg.get(k) for k in GEOMETRY_KEYS]}, this one "
                                 f"{[c.get(k) for k in GEOMETRY_KEYS]}")
        self.crop = int(cfg.get("CROP", 0))                        # 0: the thesis's crop (network_input.crop_box)
        self.pixel_mm = float(cfg.get("PIXEL_MM", 0.0))           # models from before millimetre input: raw pixels
        self.crop_mm = float(cfg.get("CROP_MM", 0.0))
        self.context_mm = float(cfg.get("CONTEXT_MM", 0.0))
        self.pixel_range = cfg.get("PIXEL_MM_RANGE")               # raw-pixel models: pixel sizes trained on
        self.context = int(cfg["CONTEXT_SLICES"]) if "CONTEXT_SLICES" in cfg else None   # None: the model's channels
        self._context_cfg = self.context
        self._loaded, self._models = None, {}     # the loaded models (one per file); per (h, w): those at that size
        self.load_seconds = 0.0           # time spent loading / rebuilding the model (not inference)
        self.outside_range = []           # scans a raw-pixel model was applied to outside its pixel range

    def signature(self):
        """What identifies a prediction: the model file(s) (path, size, time) and the input settings."""
        st = [os.stat(p) for p in self.model_paths]
        one = len(st) == 1
        return {"model": os.path.abspath(self.model_paths[0]) if one else [os.path.abspath(p) for p in self.model_paths],
                "model_bytes": st[0].st_size if one else [s.st_size for s in st],
                "model_mtime_ns": st[0].st_mtime_ns if one else [s.st_mtime_ns for s in st],
                "crop": self.crop, "context_slices": self._context_cfg,
                "pixel_mm": self.pixel_mm, "crop_mm": self.crop_mm, "context_mm": self.context_mm,
                **({"tta": self.tta} if self.tta > 1 else {})}

    def geometry(self, shape, spacing=None):
        """The network_input.InputGeometry of a scan of ``shape`` (Z, Y, X) and (x, y, z) ``spacing``."""
        return network_input.InputGeometry(shape, spacing, self.crop, self.context or 1, self.pixel_mm,
                                           self.crop_mm, self.context_mm)

    def _load(self):
        if self._loaded is None:
            t0 = time.perf_counter()
            self._loaded = [load_model(p) for p in self.model_paths]
            self.load_seconds += time.perf_counter() - t0
        return self._loaded

    def check(self):
        """Load the model(s) and check them against the settings they come with (the input channels against
        CONTEXT_SLICES) before any scan: SystemExit with one line when they disagree."""
        for path, model in zip(self.model_paths, self._load()):
            shape = model.input_shape
            if len(shape) != 4:
                raise SystemExit(f"{path}: not a stage-4 model (input {shape[1:]}; expected slices "
                                 f"(height, width, channels))")
            if self.context is None:
                self.context = int(shape[-1])
            if int(shape[-1]) != self.context:
                raise SystemExit(f"{path}: the model takes {shape[-1]} channel(s), its settings say "
                                 f"CONTEXT_SLICES={self.context}: give --MODEL_CONFIG=<the config.json it was trained with>")

    def model_for(self, hw):
        """The models taking (h, w) slices (one per file): the saved one when its input size is free or equal,
        else rebuilt at that size."""
        hw = tuple(int(v) for v in hw)
        if hw not in self._models:
            loaded = self._load()
            t0 = time.perf_counter()
            models = []
            for path, model in zip(self.model_paths, loaded):
                shape = model.input_shape
                if tuple(shape[1:3]) not in ((None, None), hw):
                    model = rebuild_model(model, (hw[0], hw[1], shape[-1]))
                if self.context is None:
                    self.context = int(shape[-1])
                if shape[-1] != self.context:
                    raise ValueError(f"{path}: the model takes {shape[-1]} channel(s), CONTEXT_SLICES is "
                                     f"{self.context}")
                models.append(model)
            self._models[hw] = models
            self.load_seconds += time.perf_counter() - t0
        return self._models[hw]

    def _check_pixels(self, spacing):
        """One line when a raw-pixel model meets a scan whose pixel size it was not trained on (> 10 % off)."""
        if self.pixel_mm > 0 or not self.pixel_range or spacing is None:
            return
        lo, hi = (float(v) for v in self.pixel_range)
        from tqdm import tqdm
        px = float(spacing[0])
        if not 0.9 * lo <= px <= 1.1 * hi:
            if not self.outside_range:
                tqdm.write(f"{self.model_path}: a raw-pixel model (PIXEL_MM=0) trained on {lo:.2f}-{hi:.2f} mm "
                           f"pixels is applied to {px:.2f} mm pixels: nodules look {px and lo / px:.1f}-"
                           f"{px and hi / px:.1f}x their training size (retrain with PIXEL_MM > 0)", file=sys.stderr)
            self.outside_range.append(px)

    def _forward(self, models, x):
        """Nodule probability (B, h, w) of a batch of inputs (B, h, w, C): the mean over the models and over the
        first ``tta`` of (as is, left-right, up-down, both), each flipped back; the flips go through a network
        as one batch."""
        flips = ((), (2,), (1,), (1, 2))[:self.tta]
        batch = np.concatenate([np.flip(x, axes) if axes else x for axes in flips]) if self.tta > 1 else x
        total = None
        for model in models:
            y = np.asarray(model.predict_on_batch(batch))
            if y.ndim == 4:
                y = y[..., 1] if y.shape[-1] >= 2 else y[..., 0]
            y = y.astype(np.float32).reshape((len(flips), len(x)) + y.shape[1:])
            for k, axes in enumerate(flips):
                yk = np.flip(y[k], axes) if axes else y[k]
                total = yk if total is None else total + yk
        n = self.tta * len(models)
        return total / n if n > 1 else total

    def lung_window(self, g, lung_mask, slices, margin_mm):
        """``g`` restricted to the lungs of the slices predicted (InputGeometry.lung_window with ``margin_mm``):
        the rest of the input is 0 (the input is 0 outside the lung mask), so the network spends its time where
        a nodule can be. ``g`` itself for raw-pixel input, a negative margin, or no lung."""
        if margin_mm < 0 or self.pixel_mm <= 0:
            return g
        lung = np.asarray(lung_mask if slices is None else lung_mask[slices])
        rows, cols = np.nonzero(lung.any(axis=(0, 2)))[0], np.nonzero(lung.any(axis=(0, 1)))[0]
        if not len(rows):
            return g
        window = g.lung_window((rows[0], rows[-1]), (cols[0], cols[-1]), margin_mm)
        return g if window == ((0, g.h), (0, g.w)) else g.window(*window)

    def predict(self, hu, lung_mask, batch_size=8, spacing=None, lung_slices_only=False, window_mm=-1.0):
        """Nodule probability float32 (Z, Y, X) on the scan's full voxel grid (0 outside what the input covers)
        and the scan pixels the input covers as (row slice, column slice). The inputs come from
        network_input.volume_inputs (the training table's own code); the output is mapped back by the same
        InputGeometry. ``lung_slices_only``: slices without lung inside the input's box are not predicted (0),
        which is what the lung gate would make of them anyway. ``window_mm`` >= 0: only the part of the input
        holding the lungs, with that margin, is predicted (``lung_window``; millimetre input)."""
        self._check_pixels(spacing)
        if self.context is None:                      # the input channels are the saved model's
            self.check()
        g = self.geometry(hu.shape, spacing)
        y0, x0, bh, bw = g.box
        box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
        prob = np.zeros(hu.shape, np.float32)
        slices = None
        if lung_slices_only:
            slices = np.nonzero(np.asarray(lung_mask[:, box[0], box[1]]).reshape(hu.shape[0], -1).any(axis=1))[0]
            if not len(slices):
                return prob, box
        g = self.lung_window(g, lung_mask, slices, window_mm)
        models = self.model_for((g.h, g.w))
        for zs, x in network_input.volume_inputs(hu, lung_mask, self.crop, self.context, batch_size, spacing,
                                                 self.pixel_mm, self.crop_mm, self.context_mm, slices, geometry=g):
            n = len(x)
            if n < batch_size:                        # the last batch padded: one traced shape per model, not two
                x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
            y = self._forward(models, x)[:n]
            if y.shape[1:] != (g.h, g.w):
                raise ValueError(f"model output {y.shape[1:]} differs from its input {(g.h, g.w)}")
            prob[zs] = np.clip(g.to_scan(y), 0.0, 1.0)
        return prob, box
