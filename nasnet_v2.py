"""The segmentation network of the thesis's figure 3, its U-Net baseline, the loss and the Dice metric.

Library module of stage 4 (``nasnet_v2_train.py`` trains it, ``postprocess.py`` runs it). Reads nothing,
writes nothing.
Run (prints a summary of a network)
    python nasnet_v2.py [--INPUT_SIZE=400 --VARIANT=figure3 --CHANNELS=1 --WEIGHTS=path --FULL_SUMMARY=0]

Networks (``get_model(input_shape, variant, weights, bn_momentum)``), all (H, W, C) -> (H, W, 2) softmax,
H and W multiples of 32 (any size >= 32 builds; multiples of 32 keep every level an exact halving):

- ``figure3`` (default): NASNetMobile encoder (random init, or a weights file), four taps found by layer
  role, a Global Convolutional Network (GCN) block per tap, and the decoder of figure 3 (bilinear upsampling
  to the exact size of the next tap, concatenation, squeeze-and-excitation (SE), 3x3 conv + BN + ReLU).
- ``figure3_stem``: figure 3 plus a fifth tap, NASNet's stem convolution at 1/2 resolution (GCN of
  STEM_FILTERS, joined at the head by concatenation + SE): the finest level where small nodules keep pixels.
- ``thesis_code``: the heavier decoder of the thesis code (per level: SE, then a parallel 1x1 conv, two
  dilated separable 3x3 convs and a GCN, concatenated, SE, 1x1 conv + BN + ReLU).
- ``unet``: a plain U-Net of similar parameter count, the baseline a user would otherwise pick.

Encoder taps (at 400x400: 100x100x22, 50x50x88, 25x25x176, 13x13x1056). The first three are the inputs of
the ReLUs that open the separable-conv branches of the reduction cells ``stem_2``, ``reduce_4`` and
``reduce_8``: the outputs of Keras's layers named ``reduction_bn_1_<cell>`` (the cell's 1x1 conv + BN of its
input). Keras numbers unnamed layers per process (``activation_187``...), so the taps are chosen by that
name pattern AND by their spatial size (ceil(H/4), ceil(H/8), ceil(H/16)); the fourth is the encoder's output
(its final ReLU, ceil(H/32)). Never by layer index. ``tap_shapes(model)`` reads them back from any built or
loaded model (they are the inputs of the GCN blocks, which this file names).

Batch normalisation: Keras builds NASNetMobile's BN layers with momentum 0.9997, i.e. a moving average over
~3000 steps; after a short from-scratch training the moving statistics are still near their initial values
and the model predicts nothing in inference mode. ``get_model(bn_momentum=0.99)`` resets every BN layer
(encoder included) to the given momentum (``None`` keeps Keras's values, for reproduction), and
``reestimate_bn_statistics(model, batches)`` recomputes the moving means/variances from data after training
(cumulative average over the given batches; no other weight changes).

Loss (the thesis code's, all sums pooled over the whole batch, i = every pixel of every slice, c = class):
    GDL = 1 - 2 * sum_c w_c sum_i r_ic p_ic / sum_c w_c sum_i (r_ic + p_ic),   w_c = 1 / (sum_i r_ic)^2
    WCE = mean_i [ -sum_c v_c r_ic log p_ic ],  v = (1, 7),  p clipped to [1e-7, 1 - 1e-7]
    loss = GDL + WCE;   metric dice_coef = (2 sum(y p) + 1) / (sum y + sum p + 1) on the nodule channel.
Numerical safety: a class absent from the batch (no nodule pixel) has w_c = 1/0 = inf. Its weight is capped
to the largest finite weight (the rule of NiftyNet, from Sudre et al.'s group); on a batch without nodules
the GDL thus becomes a Dice of the background with the nodule probability mass counted as error. The
weights are divided by their maximum before use (the GDL is invariant to a common scale of w; this keeps
the ~1e-13 raw weights of 400x400x12 batches away from float32 round-off), and the final division has a
1e-7 epsilon in its denominator (which is >= 1 pixel whenever the batch is not empty). Loss and metric are
computed in float32 even under mixed precision.

Saving: the networks use built-in Keras layers only, so ``keras.saving.load_model(path, compile=False)``
works in any process. The loss and metric are registered (``package="nodules"``): loading a compiled
model WITH its loss and metric (``load_model(path)``) needs ``import nasnet_v2`` first in that process
(Keras only imports modules of its own packages when deserialising); without it Keras warns and returns
the model uncompiled.
"""
import math
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quieter TensorFlow start-up; set before keras imports it
# TensorFlow on the CPU allocates each tensor with malloc: tensors over glibc's 32 MB mmap ceiling are mapped
# and unmapped at every step, and the kernel zeroes their pages again each time (measured: ~500k page faults
# and ~45 % of the CPU time of a training step in the kernel). Its BFC allocator keeps the memory instead.
# TensorFlow reads this when it first allocates a tensor, so importing this module before any model runs is enough.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import numpy as np  # noqa: E402
import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

# ---------------------------------------------------------------- constants (python nasnet_v2.py --NAME=value)
INPUT_SIZE = 400           # slice height = width fed to the network (the thesis: 400 = rows/cols 57:457)
CHANNELS = 1               # input channels: 1 = one slice (thesis); 3 = the slice and its 2 neighbours
VARIANT = "figure3"        # "figure3" (thesis figure), "thesis_code" (heavier decoder) or "unet" (baseline)
WEIGHTS = ""               # optional weights file: ImageNet NASNetMobile no-top .h5, a .weights.h5 or .keras
BN_MOMENTUM = 0.99         # momentum of every BN layer (Keras's NASNetMobile: 0.9997, too slow for short runs)
FULL_SUMMARY = False       # also print Keras's layer-by-layer summary (769+ lines for NASNet)
_SUMMARY_SETTINGS = ("INPUT_SIZE", "CHANNELS", "VARIANT", "WEIGHTS", "BN_MOMENTUM", "FULL_SUMMARY")
                           # what `python nasnet_v2.py` takes; the constants below define the networks

N_CLASSES = 2              # background, nodule (one-hot label channels, softmax output channels)
GCN_FILTERS = (16, 64, 128, 256)   # GCN filters at the 1/4, 1/8, 1/16, 1/32 taps (figure 3)
GCN_K_SKIP = 19            # GCN kernel length at the three skip levels (thesis code)
GCN_K_BOTTOM = 13          # GCN kernel length at the bottom (1/32) level (thesis code)
DECODER_FILTERS = (128, 64, 32)    # 3x3 conv filters after the 1/16, 1/8, 1/4 concatenations (figure 3)
HEAD_FILTERS = 32          # 3x3 conv filters at 1/2 resolution (figure 3)
STEM_FILTERS = 16          # figure3_stem: GCN filters on NASNet's stem (the 1/2-resolution tap figure 3 does not use)
GCN_K_STEM = 7             # figure3_stem: GCN kernel length at the stem (a 5 mm nodule is ~4 px wide there at 0.7 mm)
SE_RATIO = 8               # squeeze-and-excitation bottleneck: dense C/8 (relu) -> dense C (sigmoid)
THESIS_DILATIONS = (2, 4)  # dilation rates of the separable 3x3 branches of the thesis_code decoder
THESIS_GCN_MULT = 2        # thesis_code: the GCN branch has this many times the level's filters (~22 M in all)
UNET_BASE_FILTERS = 44     # U-Net: filters of the first level, doubled per level (14.8 M params; figure3 15.5 M)
UNET_DEPTH = 4             # U-Net: number of 2x poolings
WCE_WEIGHTS = (1.0, 7.0)   # cross-entropy class weights (background, nodule), thesis
CLIP_EPS = 1e-7            # probabilities clipped to [eps, 1 - eps] in the cross-entropy, thesis
DICE_SMOOTH = 1.0          # +1 in numerator and denominator of dice_coef, thesis
GDL_EPS = 1e-7             # added to the GDL denominator (see the module docstring)

VARIANTS = ("figure3", "figure3_stem", "thesis_code", "unet")
_TAP_STRIDES = (4, 8, 16, 32)       # encoder taps: spatial size ceil(H / stride)
_TAP_CELL_PATTERN = re.compile(r"^reduction_bn_1_(.+)$")  # role of the skip taps inside NASNet's reduction cells


# ---------------------------------------------------------------- building blocks

def _conv_bn_relu(x, filters, kernel_size, name, dilation_rate=1, separable=False):
    """Conv (no bias) -> BatchNorm -> ReLU, every layer named from ``name``."""
    if separable:
        x = layers.SeparableConv2D(filters, kernel_size, padding="same", dilation_rate=dilation_rate,
                                   use_bias=False, name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel_size, padding="same", dilation_rate=dilation_rate, use_bias=False,
                          kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def gcn_block(x, filters, k, name):
    """Global Convolutional Network block (Peng et al. 2017): (k x 1 -> 1 x k) + (1 x k -> k x 1), summed.

    No BN or activation between or after the convolutions. The first layer of the block is named
    ``{name}_a_kx1``; its input is the encoder tap (``tap_shapes`` relies on it).
    """
    a = layers.Conv2D(filters, (k, 1), padding="same", name=f"{name}_a_kx1")(x)
    a = layers.Conv2D(filters, (1, k), padding="same", name=f"{name}_a_1xk")(a)
    b = layers.Conv2D(filters, (1, k), padding="same", name=f"{name}_b_1xk")(x)
    b = layers.Conv2D(filters, (k, 1), padding="same", name=f"{name}_b_kx1")(b)
    return layers.Add(name=f"{name}_sum")([a, b])


def se_block(x, name, ratio=None):
    """Squeeze-and-excitation: global average pool -> dense C/ratio relu -> dense C sigmoid -> x * s."""
    ratio = SE_RATIO if ratio is None else ratio
    c = x.shape[-1]
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_gap")(x)
    s = layers.Dense(max(c // ratio, 1), activation="relu", name=f"{name}_squeeze")(s)
    s = layers.Dense(c, activation="sigmoid", name=f"{name}_excite")(s)
    return layers.Multiply(name=f"{name}_scale")([x, s])


def upsample_to(x, size, name):
    """Bilinear resize to an exact (height, width), e.g. 13 -> 25 (not a factor of 2). Serialisable."""
    return layers.Resizing(int(size[0]), int(size[1]), interpolation="bilinear", name=name)(x)


def _thesis_code_level(x, filters, k, name):
    """The thesis code's heavier decoder level: SE -> [1x1 | dilated sep 3x3 (x2) | GCN] -> concat -> SE -> 1x1."""
    x = se_block(x, f"{name}_se_in")
    branches = [_conv_bn_relu(x, filters, 1, f"{name}_b1x1")]
    for d in THESIS_DILATIONS:
        branches.append(_conv_bn_relu(x, filters, 3, f"{name}_bsep_d{d}", dilation_rate=d, separable=True))
    branches.append(gcn_block(x, filters * THESIS_GCN_MULT, k, f"{name}_bgcn"))
    x = layers.Concatenate(name=f"{name}_concat_branches")(branches)
    x = se_block(x, f"{name}_se_out")
    return _conv_bn_relu(x, filters, 1, f"{name}_fuse")


def _spatial(t):
    return tuple(int(s) for s in t.shape[1:3])


# ---------------------------------------------------------------- the encoder and its taps

def _nasnet_encoder(inp):
    """NASNetMobile (random init, no top) on the Keras tensor ``inp``; its layers become part of our model."""
    shape = tuple(int(s) for s in inp.shape[1:])
    return keras.applications.NASNetMobile(include_top=False, weights=None, input_tensor=inp,
                                           input_shape=shape)


def find_encoder_taps(encoder, input_hw):
    """The four encoder tensors feeding the decoder, found by layer role and spatial size (never by index).

    Skip taps: outputs of the layers named ``reduction_bn_1_<cell>`` (the tensor entering the ReLUs of a
    reduction cell's separable branches) whose spatial size is ceil(H/4), ceil(H/8), ceil(H/16); exactly one
    must match each size. Bottom tap: the encoder's output (its final ReLU), ceil(H/32).
    """
    h, w = input_hw
    candidates = [l for l in encoder.layers if _TAP_CELL_PATTERN.match(l.name)]
    taps = []
    for stride in _TAP_STRIDES[:3]:
        want = (math.ceil(h / stride), math.ceil(w / stride))
        found = [l for l in candidates if _spatial(l.output) == want]
        if len(found) != 1:
            raise ValueError(f"encoder tap at 1/{stride} ({want}): expected one layer named reduction_bn_1_* "
                             f"of that size, found {[l.name for l in found]}")
        taps.append(found[0].output)
    bottom = encoder.output
    want = (math.ceil(h / 32), math.ceil(w / 32))
    if _spatial(bottom) != want:
        raise ValueError(f"encoder output is {_spatial(bottom)}, expected {want}")
    taps.append(bottom)
    return taps


def tap_shapes(model):
    """(H, W, C) of the four encoder taps of a figure3/thesis_code model (built or loaded), else []."""
    shapes = []
    for i in range(1, 5):
        try:
            layer = model.get_layer(f"gcn{i}_a_kx1")
        except ValueError:
            return []
        shapes.append(tuple(int(s) for s in layer.input.shape[1:]))
    return shapes


# ---------------------------------------------------------------- networks

def _check_input_shape(input_shape):
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {input_shape}")
    h, w, c = input_shape
    if h < 32 or w < 32 or c < 1:
        raise ValueError(f"input_shape {input_shape}: H and W must be >= 32 (multiples of 32), C >= 1")
    return input_shape


def _nasnet_gcn(input_shape, variant):
    inp = keras.Input(input_shape, name="image")
    encoder = _nasnet_encoder(inp)
    taps = find_encoder_taps(encoder, input_shape[:2])
    ks = (GCN_K_SKIP, GCN_K_SKIP, GCN_K_SKIP, GCN_K_BOTTOM)
    g = [gcn_block(t, f, k, f"gcn{i + 1}") for i, (t, f, k) in enumerate(zip(taps, GCN_FILTERS, ks))]

    x = g[3]
    for level, (skip, filters) in zip((3, 2, 1), zip(g[2::-1], DECODER_FILTERS)):
        x = upsample_to(x, _spatial(skip), f"dec{level}_up")
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skip])  # 256+128=384, 128+64=192, 64+16=80
        if variant in ("figure3", "figure3_stem"):
            x = se_block(x, f"dec{level}_se")
            x = _conv_bn_relu(x, filters, 3, f"dec{level}")
        else:
            x = _thesis_code_level(x, filters, GCN_K_SKIP, f"dec{level}")
    h1 = _spatial(g[0])
    if variant == "figure3_stem":
        # a fifth tap: the stem's 3x3 stride-2 convolution (1/2 resolution), where small nodules still have
        # a few pixels; its GCN joins the head like the other skips join their levels
        stem = encoder.get_layer("stem_bn1").output
        g0 = gcn_block(stem, STEM_FILTERS, GCN_K_STEM, "gcn0")
        x = upsample_to(x, _spatial(stem), "head_up1")
        x = layers.Concatenate(name="head_concat")([x, g0])
        x = se_block(x, "head_se")
    else:
        x = upsample_to(x, (2 * h1[0], 2 * h1[1]), "head_up1")
    x = _conv_bn_relu(x, HEAD_FILTERS, 3, "head")
    x = upsample_to(x, input_shape[:2], "head_up2")
    x = layers.Conv2D(N_CLASSES, 1, name="logits")(x)
    out = layers.Activation("softmax", dtype="float32", name="softmax")(x)
    return keras.Model(inp, out, name=f"nasnet_v2_{variant}")


def get_unet(input_shape=(400, 400, 1), base_filters=None, depth=None, bn_momentum=0.99):
    """Plain U-Net baseline: (conv3x3+BN+ReLU) x2 per level, max-pool, bilinear upsampling to the skip's exact
    size, concatenation; same (H, W, C) -> (H, W, 2) softmax contract as ``get_model``."""
    input_shape = _check_input_shape(input_shape)
    base_filters = UNET_BASE_FILTERS if base_filters is None else base_filters
    depth = UNET_DEPTH if depth is None else depth
    inp = keras.Input(input_shape, name="image")
    x, skips = inp, []
    for d in range(depth):
        x = _conv_bn_relu(x, base_filters * 2 ** d, 3, f"enc{d}a")
        x = _conv_bn_relu(x, base_filters * 2 ** d, 3, f"enc{d}b")
        skips.append(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"pool{d}")(x)
    x = _conv_bn_relu(x, base_filters * 2 ** depth, 3, "bottom_a")
    x = _conv_bn_relu(x, base_filters * 2 ** depth, 3, "bottom_b")
    for d in reversed(range(depth)):
        x = upsample_to(x, _spatial(skips[d]), f"up{d}")
        x = layers.Concatenate(name=f"up{d}_concat")([x, skips[d]])
        x = _conv_bn_relu(x, base_filters * 2 ** d, 3, f"dec{d}a")
        x = _conv_bn_relu(x, base_filters * 2 ** d, 3, f"dec{d}b")
    x = layers.Conv2D(N_CLASSES, 1, name="logits")(x)
    out = layers.Activation("softmax", dtype="float32", name="softmax")(x)
    model = keras.Model(inp, out, name="unet")
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    return model


def get_model(input_shape=(400, 400, 1), variant="figure3", weights=None, bn_momentum=0.99, **unet_kwargs):
    """Build a segmentation network (H, W, C) -> (H, W, 2) softmax (channel 1 = nodule probability).

    variant: "figure3" | "thesis_code" | "unet". weights: None (random init) or a path (see load_weights_file).
    bn_momentum: momentum given to every BatchNormalization layer (None keeps Keras's, 0.9997 in NASNet).
    unet_kwargs: base_filters, depth for the U-Net.
    """
    input_shape = _check_input_shape(input_shape)
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
    if variant == "unet":
        model = get_unet(input_shape, bn_momentum=None, **unet_kwargs)
    else:
        model = _nasnet_gcn(input_shape, variant)
    if weights:
        load_weights_file(model, weights)
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    return model


# ---------------------------------------------------------------- weights files

def _iter_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _iter_layers(layer)


def _legacy_h5_kernel(path, layer_name):
    """First weight array of ``layer_name`` in a legacy Keras .h5 weights or model file, or None."""
    import h5py
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if layer_name not in root:
            return None
        group = root[layer_name]
        names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs.get("weight_names", [])]
        return np.asarray(group[names[0]]) if names else None


def load_weights_file(model, path):
    """Load a user's weights into ``model`` where layer names and shapes match; return the count of layers set.

    - ``*.keras``: a saved model (e.g. a previous training's best.keras): weights copied layer by layer by name.
    - ``*.weights.h5``: Keras 3 weights of the same architecture (structural, mismatches skipped).
    - other ``*.h5``: a legacy Keras weights file such as ImageNet's ``nasnet_mobile_no_top.h5``, loaded by
      layer name, mismatches skipped. With a 1-channel input the RGB stem kernel (3x3x3x32) is summed over its
      3 input channels (a grey image seen as R = G = B); with 3 channels it is loaded as is.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.endswith(".keras"):
        src = {l.name: l for l in _iter_layers(keras.saving.load_model(path, compile=False))}
        n = 0
        for layer in _iter_layers(model):
            other = src.get(layer.name)
            if other is None or not layer.weights or len(other.weights) != len(layer.weights):
                continue
            values = [w.numpy() if hasattr(w, "numpy") else np.asarray(w) for w in other.weights]
            if all(tuple(v.shape) == tuple(w.shape) for v, w in zip(values, layer.weights)):
                layer.set_weights(values)
                n += 1
        return n
    if path.endswith(".weights.h5"):
        model.load_weights(path, skip_mismatch=True)
        return len([l for l in model.layers if l.weights])
    model.load_weights(path, skip_mismatch=True, by_name=True)
    n = len([l for l in model.layers if l.weights])
    try:
        stem = model.get_layer("stem_conv1")
    except ValueError:
        return n
    kernel = _legacy_h5_kernel(path, "stem_conv1")
    want = tuple(stem.kernel.shape)
    if kernel is not None and kernel.shape != want and kernel.shape[:2] == want[:2] \
            and kernel.shape[3] == want[3] and want[2] == 1:
        stem.kernel.assign(kernel.sum(axis=2, keepdims=True))
    return n


# ---------------------------------------------------------------- batch normalisation

def batchnorm_layers(model):
    return [l for l in _iter_layers(model) if isinstance(l, layers.BatchNormalization)]


def set_bn_momentum(model, momentum):
    """Set the moving-average momentum of every BatchNormalization layer; return how many were set.

    Call it before compile()/fit(): a traced training step keeps the momentum it was traced with.
    """
    bns = batchnorm_layers(model)
    for layer in bns:
        layer.momentum = float(momentum)
    return len(bns)


def reestimate_bn_statistics(model, batches, max_batches=None):
    """Recompute every trainable BN layer's moving mean and variance from ``batches``; return the batch count.

    ``batches``: one array of images (N, H, W, C), or an iterable of such arrays or of (images, labels[, ...])
    tuples, or a Keras PyDataset / Sequence (the training generator). Each batch is run forward in training
    mode, eagerly, with the BN momentum of batch k set to k / (k + 1), so the moving statistics become the
    plain average of the per-batch statistics over all the batches (the first batch overwrites the stale
    values). No other weight changes; the layers' momentum is restored afterwards. Use batches of the
    training size and augmentation; max_batches limits the count (e.g. 50-200 batches of a PyDataset).
    """
    if isinstance(batches, np.ndarray) or hasattr(batches, "shape"):
        batches = [batches]                      # one array of images = one batch
    elif hasattr(batches, "__getitem__") and hasattr(batches, "__len__") and not isinstance(batches, (list, tuple)):
        batches = (batches[i] for i in range(len(batches)))   # a Keras PyDataset / Sequence
    bns = [l for l in batchnorm_layers(model) if l.trainable]
    saved = [l.momentum for l in bns]
    k = 0
    try:
        for batch in batches:
            if max_batches is not None and k >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for layer in bns:
                layer.momentum = k / (k + 1.0)
            model(x, training=True)
            k += 1
    finally:
        for layer, m in zip(bns, saved):
            layer.momentum = m
    if k == 0:
        raise ValueError("reestimate_bn_statistics: no batches given")
    return k


# ---------------------------------------------------------------- loss and metric

def _as_one_hot(y_true, y_pred):
    """Float32 (y_true, y_pred); a 1-channel mask y_true is turned into (background, nodule) channels."""
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    if y_true.shape[-1] == 1 and y_pred.shape[-1] == 2:
        y_true = ops.concatenate([1.0 - y_true, y_true], axis=-1)
    return y_true, y_pred


@keras.saving.register_keras_serializable(package="nodules")
def generalized_dice_loss(y_true, y_pred):
    """Generalized Dice Loss (Sudre et al. 2017) pooled over the batch; an absent class gets the largest finite weight."""
    r, p = _as_one_hot(y_true, y_pred)
    axes = tuple(range(len(r.shape) - 1))
    sum_r = ops.sum(r, axis=axes)
    sum_p = ops.sum(p, axis=axes)
    sum_rp = ops.sum(r * p, axis=axes)
    present = sum_r > 0
    w = ops.where(present, 1.0 / ops.square(ops.where(present, sum_r, 1.0)), 0.0)
    w_max = ops.max(w)
    w = ops.where(present, w / ops.maximum(w_max, 1e-30), 1.0)   # scaled to max 1; absent class -> max (= 1)
    numerator = 2.0 * ops.sum(w * sum_rp)
    denominator = ops.sum(w * (sum_r + sum_p)) + GDL_EPS
    return 1.0 - numerator / denominator


@keras.saving.register_keras_serializable(package="nodules")
def weighted_cross_entropy(y_true, y_pred):
    """Mean over all pixels of the batch of -sum_c w_c r_c log p_c, w = (1, 7), p clipped to [1e-7, 1 - 1e-7]."""
    r, p = _as_one_hot(y_true, y_pred)
    p = ops.clip(p, CLIP_EPS, 1.0 - CLIP_EPS)
    w = ops.convert_to_tensor(np.asarray(WCE_WEIGHTS, dtype="float32"))
    return ops.mean(-ops.sum(w * r * ops.log(p), axis=-1))


@keras.saving.register_keras_serializable(package="nodules")
def gdl_wce_loss(y_true, y_pred):
    """The training loss: generalized_dice_loss + weighted_cross_entropy."""
    return generalized_dice_loss(y_true, y_pred) + weighted_cross_entropy(y_true, y_pred)


@keras.saving.register_keras_serializable(package="nodules")
def dice_coef(y_true, y_pred):
    """Soft Dice of the nodule channel pooled over the batch: (2 sum(y p) + 1) / (sum y + sum p + 1)."""
    r, p = _as_one_hot(y_true, y_pred)
    y, q = r[..., 1], p[..., 1]
    return (2.0 * ops.sum(y * q) + DICE_SMOOTH) / (ops.sum(y) + ops.sum(q) + DICE_SMOOTH)


# ---------------------------------------------------------------- summary

def describe(model):
    """Dict: layer count, parameters, tap shapes, input and output shapes."""
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    return {
        "name": model.name,
        "layers": len(list(_iter_layers(model))),
        "params_total": total,
        "params_trainable": trainable,
        "params_non_trainable": total - trainable,
        "bn_layers": len(batchnorm_layers(model)),
        "input_shape": tuple(int(s) for s in model.input_shape[1:]),
        "output_shape": tuple(int(s) for s in model.output_shape[1:]),
        "tap_shapes": tap_shapes(model),
    }


def main(argv=None):
    """Print the summary of the network the settings ``_SUMMARY_SETTINGS`` (``--NAME=value``) describe."""
    from configurator import configure
    namespace = {k: v for k, v in globals().items() if k in _SUMMARY_SETTINGS + ("__doc__", "__file__")}
    cfg = configure(namespace, sys.argv[1:] if argv is None else argv, choices={"VARIANT": VARIANTS})
    model = get_model((cfg.INPUT_SIZE, cfg.INPUT_SIZE, cfg.CHANNELS), variant=cfg.VARIANT,
                      weights=cfg.WEIGHTS or None, bn_momentum=cfg.BN_MOMENTUM)
    if cfg.FULL_SUMMARY:
        model.summary(line_length=120)
    d = describe(model)
    print(f"network        {d['name']}  (variant {cfg.VARIANT})")
    print(f"input -> output {d['input_shape']} -> {d['output_shape']}")
    print(f"layers         {d['layers']}  (BatchNorm: {d['bn_layers']}, momentum {cfg.BN_MOMENTUM})")
    print(f"parameters     {d['params_total']:,}  (trainable {d['params_trainable']:,}, "
          f"non-trainable {d['params_non_trainable']:,})")
    for i, s in enumerate(d["tap_shapes"]):
        print(f"encoder tap {i + 1}  1/{_TAP_STRIDES[i]:<3d} {s[0]} x {s[1]} x {s[2]}")
    return cfg


if __name__ == "__main__":
    main()
