"""Stage 4: train the network of figure 3 (or a variant, or the U-Net baseline) on the slice table.

Reads  WORK_DIR/2_table/slices.h5 (table.py) and WORK_DIR/3_split/{train,val}_idx.npy (slice_idx.py).
Writes WORK_DIR/4_model/: best.keras (best validation Dice), last.keras (every epoch, with the optimiser
state), history.csv, state.json (epoch reached, best Dice: what --RESUME=1 continues from), config.json
(every constant used, plus the table's input geometry that postprocess.py feeds the model with: CROP,
CONTEXT_SLICES, PIXEL_MM, CROP_MM, CONTEXT_MM, and PIXEL_MM_RANGE, the scans' pixel sizes),
TensorBoard logs in tensorboard/.
Run
    python nasnet_v2_train.py                                   # thesis-like defaults
    python nasnet_v2_train.py --EPOCHS=50 --TRAIN_CROP=192      # crops of the slices, whole slices at inference
    python nasnet_v2_train.py --RESUME=1                        # continue a killed run from last.keras
    python nasnet_v2_train.py --DISTRIBUTE=data_parallel        # BATCH_SIZE split over all GPUs of this machine

Each epoch: the fit over the training batches (augmented, reshuffled per epoch with SEED), then the batch-
normalisation statistics are re-estimated from BN_REESTIMATE_BATCHES training batches (Keras's NASNetMobile
uses BN momentum 0.9997: after a short from-scratch training its moving statistics are still at their
initial values and the model predicts nothing in inference mode; see nasnet_v2.py), then the validation
slices are predicted in inference mode and the pooled Dice (prob > 0.5, the thesis's slice Dice, metrics.py's,
as postprocess.py reports it) decides the best checkpoint. Throughput (slices per second) is printed per
epoch. With TRAIN_CROP > 0 the network trains (and validates) on crops of that side, sampled so that most
hold a nodule; it is fully convolutional and postprocess.py rebuilds it at the whole-slice size.
LR_DECAY_EPOCHS > 0 cools the learning rate down linearly over the last epochs (constant before: the thesis's
schedule), so that last.keras is taken at a low rate rather than wherever the last steps of a constant rate left it.
Checkpoints (last.keras, history.csv, state.json) are written and recovered by checkpoints.py: a run killed in
the middle of one resumes with --RESUME=1 as if it had not been.
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import checkpoints  # noqa: E402
import configurator  # noqa: E402
import runfiles  # noqa: E402
from metrics import dice, dice_counts  # noqa: E402
from network_input import table_settings  # noqa: E402

# ----------------------------------------------------------------------------- constants
WORK_DIR = "work"              # root of a run
TABLE = ""                     # "" = WORK_DIR/2_table/slices.h5
SPLIT_DIR = ""                 # "" = WORK_DIR/3_split
OUT_DIR = ""                   # "" = WORK_DIR/4_model
VARIANT = "figure3"            # "figure3" (thesis figure), "thesis_code" (heavier decoder), "unet" (baseline)
UNET_BASE_FILTERS = 44         # VARIANT=unet: filters of the first level, doubled per level (44: 14.8 M parameters) [>= 1]
UNET_DEPTH = 4                 # VARIANT=unet: number of 2x poolings [>= 1]
WEIGHTS = ""                   # optional weights file to start from (ImageNet NASNetMobile .h5, .weights.h5, .keras)
OPTIMIZER = "adam"             # "adam", or "sgd" (the thesis's surviving script: SGD + momentum 0.9)
LR = 1e-3                      # learning rate (the thesis's fine-tuning script: 1e-7 with SGD) [> 0]
MOMENTUM = 0.9                 # SGD momentum [0 .. 1]
BATCH_SIZE = 12                # slices per batch (thesis: 12) [>= 1]
EPOCHS = 30                    # epochs (an epoch = STEPS_PER_EPOCH batches, or the whole training index) [>= 1]
STEPS_PER_EPOCH = 0            # batches per epoch; 0 = all training rows once [>= 0]
VAL_MAX_BATCHES = 0            # validation batches per epoch; 0 = the whole validation index [>= 0]
VAL_EVERY = 1                  # BN re-estimation, validation and best.keras every this many epochs and at the last one
                               # (the training steps are the same whatever it is; last.keras is saved every epoch) [>= 1]
MAX_MINUTES = 0.0              # stop after the epoch that passes this much training time (0 = no limit) [>= 0]
AUGMENT = True                 # flips + rotation (thesis)
ROT_DEG = 6.0                  # rotation uniform in +-ROT_DEG degrees (thesis: 6) [>= 0]
ZOOM = 0.0                     # zoom uniform in [1 - ZOOM, 1 + ZOOM] (thesis: none) [0 .. 1]
LABEL_INTERP = "nearest"       # rotated labels: "nearest", "threshold" (bilinear >= 0.5), "truncate" (thesis bug)
TRAIN_CROP = 0                 # train on random crops of this side (px, multiple of 32); 0 = whole slices (thesis) [>= 0]
CROP_NODULE_P = 0.8            # share of training crops placed on a nodule [0 .. 1]
INTENSITY = True               # intensity augmentation (blur, sharpen, noise, contrast, brightness, gamma in HU,
                               # each (probability, low, high) below); False = geometry only, as the thesis
AUG_BLUR = (0.15, 0.3, 1.0)    # (probability, low, high): Gaussian blur sigma, px (a softer reconstruction kernel)
AUG_SHARPEN = (0.15, 0.3, 1.5) # unsharp-mask gain, sigma 1.5 px (a sharper kernel)
AUG_NOISE = (0.3, 5.0, 40.0)   # added correlated noise SD, HU, 0.7 px grain (a lower dose)
AUG_CONTRAST = (0.3, 0.75, 1.3)    # contrast factor about -850 HU (denser or fainter nodules and vessels)
AUG_BRIGHTNESS = (0.3, -50.0, 50.0)  # HU shift (calibration, depth of inspiration)
AUG_GAMMA = (0.3, 0.7, 1.4)    # gamma on the [-1000, 400] HU window (values outside it left alone)
SAMPLING = "slice"             # "slice": every table row once per epoch (thesis); "nodule": each nodule equally likely
                               # (small ones as often as large), crops on one nodule / on vessel look-alikes
NEG_FRACTION = 0.3             # SAMPLING="nodule": share of each epoch drawn among slices without nodules [0 .. 1]
BN_MOMENTUM = 0.99             # momentum of every BN layer (Keras's NASNetMobile: 0.9997); 0 = keep Keras's [0 .. 1]
BN_REESTIMATE_BATCHES = 8      # training batches used to re-estimate BN statistics each epoch (0 = off) [>= 0]
REDUCE_LR_PATIENCE = 0         # halve the learning rate after this many validations without a better val Dice (0 = off) [>= 0]
LR_DECAY_EPOCHS = 0            # the last this many epochs cool the learning rate linearly towards 0 (LR x k / (n + 1),
                               # k = n ... 1; set at each epoch's start, so a resumed run gets the same); 0 = constant LR [>= 0]
EARLY_STOP_PATIENCE = 0        # stop after this many validations without a better val Dice (0 = off) [>= 0]
RESUME = False                 # continue from OUT_DIR/last.keras and state.json
SEED = 85                      # weights init, shuffling and augmentation (thesis split seed: 85)
MIXED_PRECISION = "auto"       # float16 compute: "auto" = on a GPU, off on the CPU; "on" (a GPU only); "off" [one of: auto, on, off]
JIT_COMPILE = "auto"           # XLA compilation of the training step: "auto" = on a GPU, off on the CPU (where it
                               # made inference 7x slower: benchmarks/RESULTS.md); "on"; "off" [one of: auto, on, off]
RUN_EAGERLY = False            # steps run op by op, no graph traced: for runs of a few steps (tests), where tracing
                               # the NASNet graph (~100-150 s) costs more than the steps; same maths, slower steps
WORKERS = 2                    # threads computing batches (0 = in the training process) [>= 0]
USE_MULTIPROCESSING = False    # processes instead of threads (each batch is then pickled back: slower here)
LOG_EVERY = 0                  # print the loss every this many batches (0 = Keras's progress bar only) [>= 0]
DISTRIBUTE = ""                # "" = one device; "data_parallel" = BATCH_SIZE split over all visible devices
                               # (JAX: keras.distribution.DataParallel; TensorFlow: MirroredStrategy; see distribute())


def _has_gpu():
    try:
        import tensorflow as tf
        return bool(tf.config.list_physical_devices("GPU"))
    except ImportError:
        return False


# ----------------------------------------------------------------------------- devices

def distribute(cfg):
    """Start DISTRIBUTE's device layout (before any model exists); return the number of devices the global
    batch is split over.

    "data_parallel" on the JAX backend: Keras's distribution API, keras.distribution.DataParallel over all
    devices of this host (keras.distribution.initialize() is called when KERAS_DISTRIBUTION_JOB_ADDRESSES is
    set, but a run over several hosts is refused until the data loader shards the table per host). A step is
    one program over the global batch, so BN statistics and the batch-pooled GDL are the whole batch's.
    On the TensorFlow backend: tf.distribute.MirroredStrategy over the GPUs (else the logical CPU devices),
    set as the current strategy; each device runs its share, so the BN layers are synchronised and the loss
    gathers the whole batch (gdl_wce_loss_global_batch): the step is again the one-device step."""
    import nasnet_v2  # noqa: F401  (first: it sets TensorFlow's CPU allocator before any tensor exists)
    import keras
    how = cfg.DISTRIBUTE
    if not how:
        devices = 1
    elif how != "data_parallel":
        raise SystemExit(f"--DISTRIBUTE={how!r}: expected '' (one device) or 'data_parallel'")
    elif keras.backend.backend() == "jax":
        if os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES"):
            keras.distribution.initialize()
            import jax
            if jax.process_count() > 1:        # SliceTableDataset feeds every process the same whole batch
                raise SystemExit(f"DISTRIBUTE=data_parallel over {jax.process_count()} hosts: the slice table is not "
                                 "sharded per host yet; use one host with several GPUs")
        listed = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=listed))
        devices = len(listed)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        listed = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in listed])
        tf.distribute.experimental_set_strategy(strategy)
        devices = strategy.num_replicas_in_sync
    else:
        raise SystemExit(f"--DISTRIBUTE=data_parallel needs the jax or tensorflow backend, not {keras.backend.backend()}")
    if cfg.BATCH_SIZE % devices:
        raise SystemExit(f"--BATCH_SIZE={cfg.BATCH_SIZE} does not split over {devices} devices (use a multiple)")
    return devices


def undistribute(cfg):
    """Back to one device (a second main() in one process, tests)."""
    import keras
    if cfg.DISTRIBUTE and keras.backend.backend() == "jax":
        keras.distribution.set_distribution(None)
    elif cfg.DISTRIBUTE and keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        tf.distribute.experimental_set_strategy(None)


def _mirrored(devices):
    """True when TensorFlow splits each batch over several replicas (DISTRIBUTE on the TensorFlow backend)."""
    import keras
    if keras.backend.backend() != "tensorflow" or devices == 1:
        return False
    import tensorflow as tf
    return tf.distribute.has_strategy()


def _register_global_batch_loss():
    """gdl_wce_loss over the global batch under MirroredStrategy: each replica gathers every replica's labels
    and predictions (all_gather's gradient hands each replica its share back), so the GDL, pooled over the
    batch, is the one-device loss. Each replica returns it divided by the replica count, as Keras expects
    (it scales only per-sample losses itself, not a scalar one) before summing the replicas' gradients."""
    import keras
    import nasnet_v2

    @keras.saving.register_keras_serializable(package="nodules")
    def gdl_wce_loss_global_batch(y_true, y_pred):
        import tensorflow as tf
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            y_true, y_pred = ctx.all_gather(y_true, axis=0), ctx.all_gather(y_pred, axis=0)
            return nasnet_v2.gdl_wce_loss(y_true, y_pred) / ctx.num_replicas_in_sync
        return nasnet_v2.gdl_wce_loss(y_true, y_pred)
    return gdl_wce_loss_global_batch


# ----------------------------------------------------------------------------- the network

def gpu_switch(value):
    """A MIXED_PRECISION / JIT_COMPILE setting -> bool: "auto" = whether TensorFlow sees a GPU."""
    return _has_gpu() if value == "auto" else value == "on"


def build_model(image_shape, cfg, devices=1):
    """A compiled model for (H, W, C) inputs: VARIANT (WEIGHTS, BN_MOMENTUM), OPTIMIZER at LR, the GDL + WCE loss
    (over the global batch when split over ``devices`` by TensorFlow)."""
    import keras
    import nasnet_v2
    mixed = gpu_switch(cfg.MIXED_PRECISION) and _has_gpu()
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    unet = dict(base_filters=cfg.UNET_BASE_FILTERS, depth=cfg.UNET_DEPTH) if cfg.VARIANT == "unet" else {}
    model = nasnet_v2.get_model(image_shape, variant=cfg.VARIANT, weights=cfg.WEIGHTS or None,
                                bn_momentum=cfg.BN_MOMENTUM or None, **unet)
    if cfg.OPTIMIZER == "adam":
        opt = keras.optimizers.Adam(learning_rate=cfg.LR)
    elif cfg.OPTIMIZER == "sgd":
        opt = keras.optimizers.SGD(learning_rate=cfg.LR, momentum=cfg.MOMENTUM)
    else:
        raise SystemExit(f"OPTIMIZER must be 'adam' or 'sgd', not {cfg.OPTIMIZER!r}")
    if mixed:
        opt = keras.mixed_precision.LossScaleOptimizer(opt)
    loss = nasnet_v2.gdl_wce_loss
    if _mirrored(devices):                           # each replica sees its share: global BN and loss
        for layer in nasnet_v2.batchnorm_layers(model):
            layer.synchronized = True
        loss = _register_global_batch_loss()
    model.compile(optimizer=opt, loss=loss, metrics=[nasnet_v2.dice_coef],
                  jit_compile=gpu_switch(cfg.JIT_COMPILE) and not cfg.RUN_EAGERLY, run_eagerly=cfg.RUN_EAGERLY)
    return model


def _predict(model, x, devices=1):
    """model.predict_on_batch(x), the batch padded to a multiple of the devices it is split over."""
    pad = -len(x) % devices
    if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    return np.asarray(model.predict_on_batch(x))[:len(x) - pad]


def pooled_dice(model, dataset, max_batches=0, devices=1):
    """The thesis's slice Dice over a dataset in inference mode: 2|P & T| / (|P| + |T|), P = prob > 0.5."""
    inter = n_pred = n_true = 0
    for k in range(len(dataset)):
        if max_batches and k >= max_batches:
            break
        x, y = dataset[k]
        p = _predict(model, x, devices)[..., 1] > 0.5
        i, a, b = dice_counts(p, y[..., 1] > 0.5)
        inter, n_pred, n_true = inter + i, n_pred + a, n_true + b
    return dice(inter, n_pred, n_true)


# ----------------------------------------------------------------------------- per epoch

def epoch_lr(epoch, cfg):
    """The learning rate of a (0-based) epoch in the cool-down window of LR_DECAY_EPOCHS, else None (left as is):
    LR x (EPOCHS - epoch) / (LR_DECAY_EPOCHS + 1), e.g. 16 epochs, 4 cooling: LR x 4/5, 3/5, 2/5, 1/5 in the last four."""
    start = cfg.EPOCHS - cfg.LR_DECAY_EPOCHS
    if cfg.LR_DECAY_EPOCHS <= 0 or epoch < start:
        return None
    return cfg.LR * (cfg.EPOCHS - epoch) / (cfg.LR_DECAY_EPOCHS + 1)


def make_callback(model, train_bn, val, folder, state, cfg, devices=1, history=None):
    """Per epoch: BN re-estimation, validation Dice, checkpoints, state.json, throughput, LR schedule, stop rules."""
    import keras
    import nasnet_v2

    rows = history if history is not None else []

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0, self.steps = time.time(), 0
            if epoch_lr(epoch, cfg) is not None:
                model.optimizer.learning_rate.assign(epoch_lr(epoch, cfg))

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if cfg.LOG_EVERY and self.steps % cfg.LOG_EVERY == 0:
                print(f"  batch {self.steps}: loss {logs.get('loss', float('nan')):.4f} "
                      f"dice {logs.get('dice_coef', float('nan')):.3f}", flush=True)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            train_s = time.time() - self.t0
            state["train_seconds"] = state.get("train_seconds", 0.0) + train_s
            logs["slices_per_s"] = self.steps * cfg.BATCH_SIZE / max(train_s, 1e-9)
            out_of_time = bool(cfg.MAX_MINUTES) and state["train_seconds"] >= cfg.MAX_MINUTES * 60
            validate = (epoch + 1) % cfg.VAL_EVERY == 0 or epoch + 1 >= cfg.EPOCHS or out_of_time
            if validate and cfg.BN_REESTIMATE_BATCHES:
                nasnet_v2.reestimate_bn_statistics(model, (train_bn[i] for i in range(len(train_bn))),
                                                   max_batches=cfg.BN_REESTIMATE_BATCHES)
            logs["val_dice"] = pooled_dice(model, val, cfg.VAL_MAX_BATCHES, devices) if validate else float("nan")
            logs["lr"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
            improved = validate and logs["val_dice"] > state.get("best_val_dice", -1.0)
            if improved:
                state["best_val_dice"], state["best_epoch"], state["stale"] = logs["val_dice"], epoch, 0
            elif validate:
                state["stale"] = state.get("stale", 0) + 1
                if cfg.REDUCE_LR_PATIENCE and state["stale"] % cfg.REDUCE_LR_PATIENCE == 0:
                    model.optimizer.learning_rate.assign(logs["lr"] / 2)
            state["epoch"] = epoch
            rows.append(dict({k: float(v) for k, v in logs.items() if np.ndim(v) == 0}, epoch=epoch))
            best = os.path.join(folder, "best.keras") if improved else ""
            checkpoints.save_checkpoint(model, folder, state, rows, best)
            val_txt = f"{logs['val_dice']:.3f}" if validate else "-"
            print(f"epoch {epoch + 1}: loss {logs.get('loss', float('nan')):.4f} train dice "
                  f"{logs.get('dice_coef', float('nan')):.3f} val dice {val_txt}"
                  f"{' (best)' if improved else ''} | {logs['slices_per_s']:.1f} slices/s, {train_s:.0f} s",
                  flush=True)
            if cfg.EARLY_STOP_PATIENCE and state["stale"] >= cfg.EARLY_STOP_PATIENCE:
                print(f"early stop: no better val dice for {state['stale']} validations")
                model.stop_training = True
            if out_of_time:
                print(f"time budget of {cfg.MAX_MINUTES} min reached")
                model.stop_training = True

    return EpochEnd()


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    cfg = configurator.configure(globals(), argv)
    devices = distribute(cfg)
    try:
        return train(cfg, devices)
    finally:
        undistribute(cfg)


def run_paths(cfg):
    """(slice table, split folder, output folder) of the run; refuses a missing input."""
    table_path = cfg.TABLE or os.path.join(cfg.WORK_DIR, "2_table", "slices.h5")
    split_dir = cfg.SPLIT_DIR or os.path.join(cfg.WORK_DIR, "3_split")
    for p in (table_path, os.path.join(split_dir, "train_idx.npy"), os.path.join(split_dir, "val_idx.npy")):
        if not os.path.isfile(p):
            raise SystemExit(f"{p}: not found (run table.py and slice_idx.py first)")
    return table_path, split_dir, cfg.OUT_DIR or os.path.join(cfg.WORK_DIR, "4_model")


def datasets(cfg, table_path, split_dir):
    """The training batches (augmented, shuffled per epoch), the BN re-estimation batches (unaugmented) and the
    validation batches -> (train, train_bn, val)."""
    from data_generator_sequence_table import INTENSITY_NAMES, SliceTableDataset, intensity_settings
    train_idx = np.load(os.path.join(split_dir, "train_idx.npy"))
    val_idx = np.load(os.path.join(split_dir, "val_idx.npy"))
    if len(train_idx) < cfg.BATCH_SIZE or len(val_idx) == 0:
        raise SystemExit(f"{split_dir}: {len(train_idx)} training and {len(val_idx)} validation rows; "
                         f"need >= BATCH_SIZE ({cfg.BATCH_SIZE}) and >= 1")
    workers = dict(workers=cfg.WORKERS, use_multiprocessing=cfg.USE_MULTIPROCESSING) if cfg.WORKERS else {}
    intensity = intensity_settings(**{n: cfg["AUG_" + n.upper()] for n in INTENSITY_NAMES})
    crop = dict(crop=cfg.TRAIN_CROP, crop_nodule_p=cfg.CROP_NODULE_P)
    train = SliceTableDataset(table_path, train_idx, batch_size=cfg.BATCH_SIZE, augment=cfg.AUGMENT,
                              rot_deg=cfg.ROT_DEG, zoom=cfg.ZOOM, label_interp=cfg.LABEL_INTERP, shuffle=True,
                              seed=cfg.SEED, max_batches=cfg.STEPS_PER_EPOCH, sampling=cfg.SAMPLING,
                              neg_fraction=cfg.NEG_FRACTION, intensity=intensity if cfg.INTENSITY else None,
                              **crop, **workers)
    train_bn = SliceTableDataset(table_path, train_idx, batch_size=cfg.BATCH_SIZE, augment=False, shuffle=True,
                                 seed=cfg.SEED + 1, **crop)
    val = SliceTableDataset(table_path, val_idx, batch_size=cfg.BATCH_SIZE, augment=False, shuffle=False,
                            drop_last=False, seed=cfg.SEED, **crop)
    return train, train_bn, val


def with_input_geometry(cfg, table_path, train):
    """``cfg`` with the table's settings (TABLE_*) and the input geometry postprocess.py must rebuild
    (network_input.InputGeometry: CROP, PIXEL_MM, CROP_MM, CONTEXT_MM, CONTEXT_SLICES, INPUT_SHAPE; and for a
    raw-pixel model PIXEL_MM_RANGE, the range of scan pixel sizes it saw, so that inference can say when a scan
    lies outside it): what config.json records."""
    settings = table_settings(table_path)
    return cfg.replace(**{"TABLE_" + k.upper(): v for k, v in settings.items()},
                       CROP=int(settings.get("crop", train.height)), PIXEL_MM=settings["pixel_mm"],
                       CROP_MM=settings["crop_mm"], CONTEXT_MM=settings["context_mm"],
                       PIXEL_MM_RANGE=settings.get("pixel_mm_range"), CONTEXT_SLICES=int(train.context_slices),
                       INPUT_SHAPE=list(train.image_shape))


def start_or_resume(cfg, folder, image_shape, devices):
    """The model to train and where it stands -> (model, state, history rows, first epoch): with RESUME,
    last.keras and its checkpoint (checkpoints.recover_checkpoint: a commit a kill interrupted is finished),
    else a new model."""
    import keras
    state, initial_epoch, history, model = {}, 0, [], None
    last = os.path.join(folder, "last.keras")
    if cfg.RESUME and os.path.isfile(last):
        import nasnet_v2  # noqa: F401  (registers the loss and metric)
        if _mirrored(devices):
            _register_global_batch_loss()
        model = keras.saving.load_model(last)
        state, history = checkpoints.recover_checkpoint(folder, model)
        if state is None:
            print(f"RESUME=1 but {folder}/state.json does not match {last}: starting from scratch")
            state, history, model = {}, [], None
        else:
            initial_epoch = state["epoch"] + 1
            print(f"resuming from {last}: epoch {initial_epoch + 1}, best val dice {state.get('best_val_dice', 0):.3f}")
    elif cfg.RESUME:
        print(f"RESUME=1 but {last} does not exist: starting from scratch")
    runfiles.clean_stale(folder)
    if model is None:
        model = build_model(image_shape, cfg, devices)
    return model, state, history, initial_epoch


def train(cfg, devices=1):
    """Stage 4 with the settings ``cfg`` on ``devices`` (distribute) -> exit status."""
    import nasnet_v2  # noqa: F401  (first: it sets TensorFlow's CPU allocator before any tensor exists)
    # 1. the inputs (stages 2 and 3) and the output folder
    table_path, split_dir, folder = run_paths(cfg)
    with runfiles.hold(folder, "nasnet_v2_train.py"):             # one run at a time in the folder
        return _train_held(cfg, devices, table_path, split_dir, folder)


def _train_held(cfg, devices, table_path, split_dir, folder):
    """Steps 2-5 of train(), with the output folder held by this run."""
    import keras
    keras.utils.set_random_seed(cfg.SEED)
    # 2. the batches: training (augmented), BN re-estimation, validation
    train_ds, train_bn, val = datasets(cfg, table_path, split_dir)
    # 3. the settings with the table's input geometry, saved as config.json
    cfg = with_input_geometry(cfg, table_path, train_ds)
    configurator.save_config(cfg, folder)
    # 4. the model: resumed from last.keras (RESUME), or new
    model, state, history, initial_epoch = start_or_resume(cfg, folder, train_ds.image_shape, devices)
    if initial_epoch >= cfg.EPOCHS:
        print(f"nothing to do: {initial_epoch} of {cfg.EPOCHS} epochs done")
        return 0
    # 5. the epochs, each ending with BN re-estimation, validation and a checkpoint (make_callback)
    train_ds.set_epoch(initial_epoch)
    print(f"training {cfg.VARIANT} on {len(train_ds.indexes)} slices ({len(train_ds)} batches of {cfg.BATCH_SIZE}"
          f"{f' split over {devices} devices' if devices > 1 else ''}, input "
          f"{train_ds.image_shape}), validating on {len(val.indexes)}; {model.count_params():,} parameters")
    callbacks = [make_callback(model, train_bn, val, folder, state, cfg, devices, history)]
    try:
        import tensorboard  # noqa: F401
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(folder, "tensorboard"), write_graph=False))
    except ImportError:
        pass
    t0 = time.time()
    model.fit(train_ds, epochs=cfg.EPOCHS, initial_epoch=initial_epoch,
              callbacks=callbacks, verbose=2 if cfg.LOG_EVERY == 0 else 0,
              shuffle=False)          # the dataset orders its batches itself (seeded); Keras's shuffle is not
    print(f"trained in {time.time() - t0:.0f} s; best val dice {state.get('best_val_dice', 0):.3f} "
          f"(epoch {state.get('best_epoch', 0) + 1}) -> {os.path.join(folder, 'best.keras')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
