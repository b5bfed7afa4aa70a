"""Tests of nasnet_v2.py: encoder taps and output at 400x400, other input sizes, loss vs NumPy, save/load,
weights files, a short real training, batch-norm statistics. About 2-3 minutes on a 2-core CPU: the NASNet
trainings run eagerly at 64x64 (tracing NASNet's training graph alone takes ~90 s)."""
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402

import nasnet_v2 as nv  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 __array__ notes from Keras

EXPECTED_TAPS_400 = [(100, 100, 22), (50, 50, 88), (25, 25, 176), (13, 13, 1056)]


# ---------------------------------------------------------------- helpers

def synthetic_slices(n, size=64, seed=0):
    """n noisy slices with one bright disk each (the 'nodule'); labels one-hot (n, size, size, 2)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.3, (n, size, size, 1)).astype("float32")
    y = np.zeros((n, size, size), "uint8")
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        r = rng.uniform(4, 8)
        cy, cx = rng.uniform(r + 2, size - r - 2, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        x[i, disk, 0] += 2.0
        y[i][disk] = 1
    return x, np.eye(2, dtype="float32")[y]


def np_gdl(r, p):
    """The thesis code's GDL, literally, in float64; an absent class's infinite weight capped to the largest finite one."""
    r = r.reshape(-1, r.shape[-1]).astype("float64")
    p = p.reshape(-1, p.shape[-1]).astype("float64")
    sr = r.sum(0)
    with np.errstate(divide="ignore"):
        w = 1.0 / sr ** 2
    finite = np.isfinite(w)
    w[~finite] = w[finite].max() if finite.any() else 1.0
    return 1.0 - 2.0 * (w * (r * p).sum(0)).sum() / (w * (sr + p.sum(0))).sum()


def np_wce(r, p, w=(1.0, 7.0), eps=1e-7):
    p = np.clip(p.astype("float64"), eps, 1 - eps)
    return float(np.mean(-(np.asarray(w) * r * np.log(p)).sum(-1)))


def np_dice(r, p):
    y, q = r[..., 1].astype("float64"), p[..., 1].astype("float64")
    return (2 * (y * q).sum() + 1) / (y.sum() + q.sum() + 1)


def soft_dice(model, x, y, training):
    return float(nv.dice_coef(y, np.asarray(model(x, training=training))))


# ---------------------------------------------------------------- the 400x400 network (built once, never trained)

@pytest.fixture(scope="module")
def model400():
    return nv.get_model((400, 400, 1), variant="figure3")


def test_taps_at_400(model400):
    assert nv.tap_shapes(model400) == EXPECTED_TAPS_400
    # the skip taps are the outputs of the reduction cells' 1x1 conv + BN (role), not of numbered layers
    names = [model400.get_layer(f"gcn{i}_a_kx1").input._keras_history[0].name for i in (1, 2, 3)]
    assert names == ["reduction_bn_1_stem_2", "reduction_bn_1_reduce_4", "reduction_bn_1_reduce_8"]
    gcn_out = [tuple(model400.get_layer(f"gcn{i}_sum").output.shape[1:]) for i in (1, 2, 3, 4)]
    assert gcn_out == [(100, 100, 16), (50, 50, 64), (25, 25, 128), (13, 13, 256)]
    concat = [model400.get_layer(f"dec{i}_concat").output.shape[-1] for i in (3, 2, 1)]
    assert concat == [384, 192, 80]


def test_output_400_is_a_distribution(model400):
    assert model400.output_shape == (None, 400, 400, 2)
    x = np.random.default_rng(1).normal(size=(1, 400, 400, 1)).astype("float32")
    out = np.asarray(model400(x, training=False))
    assert out.shape == (1, 400, 400, 2)
    assert np.all(out >= 0) and np.allclose(out.sum(-1), 1.0, atol=1e-5)


def test_bn_momentum_reset_everywhere(model400):
    bns = nv.batchnorm_layers(model400)
    assert len(bns) > 190 and all(layer.momentum == 0.99 for layer in bns)   # encoder's 0.9997 replaced
    assert nv.set_bn_momentum(model400, 0.9) == len(bns) and bns[0].momentum == 0.9


@pytest.mark.parametrize("size", [96, 256])
def test_any_multiple_of_32_builds(size):
    m = nv.get_model((size, size, 3), variant="figure3")
    want = [(-(-size // s), -(-size // s)) for s in (4, 8, 16, 32)]
    assert [t[:2] for t in nv.tap_shapes(m)] == want
    assert [t[2] for t in nv.tap_shapes(m)] == [22, 88, 176, 1056]
    assert m.output_shape == (None, size, size, 2)


def test_thesis_code_and_unet_build():
    m = nv.get_model((64, 64, 1), variant="thesis_code")
    assert m.output_shape == (None, 64, 64, 2) and len(nv.tap_shapes(m)) == 4
    u = nv.get_model((64, 64, 1), variant="unet")
    assert u.output_shape == (None, 64, 64, 2) and nv.tap_shapes(u) == []
    with pytest.raises(ValueError):
        nv.get_model((64, 64, 1), variant="resnet")


# ---------------------------------------------------------------- loss and metric vs NumPy

def _cases():
    rng = np.random.default_rng(3)
    truth = np.zeros((2, 8, 8), "uint8")
    truth[0, 2:5, 3:6] = 1
    truth[1, 6, 6] = 1
    r = np.eye(2, dtype="float32")[truth]
    empty = np.eye(2, dtype="float32")[np.zeros((2, 8, 8), "uint8")]
    soft = rng.uniform(0.05, 0.95, (2, 8, 8)).astype("float32")
    soft = np.stack([1 - soft, soft], -1)
    return {
        "perfect": (r, r.copy()),
        "all_wrong": (r, 1.0 - r),
        "soft": (r, soft),
        "empty_truth_soft": (empty, soft),
        "empty_truth_perfect": (empty, empty.copy()),
        "empty_truth_all_nodule": (empty, 1.0 - empty),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_loss_matches_numpy(case):
    r, p = _cases()[case]
    gdl = float(nv.generalized_dice_loss(r, p))
    wce = float(nv.weighted_cross_entropy(r, p))
    total = float(nv.gdl_wce_loss(r, p))
    dice = float(nv.dice_coef(r, p))
    assert np.isfinite([gdl, wce, total, dice]).all()
    assert gdl == pytest.approx(np_gdl(r, p), abs=1e-5)
    assert wce == pytest.approx(np_wce(r, p), rel=1e-4, abs=1e-6)
    assert total == pytest.approx(gdl + wce, abs=1e-5)
    assert dice == pytest.approx(np_dice(r, p), abs=1e-5)


def test_loss_hand_values():
    c = _cases()
    r, p = c["perfect"]
    assert float(nv.generalized_dice_loss(r, p)) == pytest.approx(0.0, abs=1e-6)
    assert float(nv.weighted_cross_entropy(r, p)) == pytest.approx(0.0, abs=1e-5)
    assert float(nv.dice_coef(r, p)) == pytest.approx(1.0)
    r, p = c["all_wrong"]
    assert float(nv.generalized_dice_loss(r, p)) == pytest.approx(1.0, abs=1e-6)
    n_nod = r[..., 1].sum()
    want = -np.log(1e-7) * (n_nod * 7.0 + (r.shape[0] * 64 - n_nod) * 1.0) / (r.shape[0] * 64)
    assert float(nv.weighted_cross_entropy(r, p)) == pytest.approx(want, rel=1e-4)
    assert float(nv.dice_coef(r, p)) == pytest.approx(1.0 / (r.shape[0] * 64 + 1))   # sum y + sum p = N
    # no nodule pixel in the batch: finite; a perfect empty prediction costs nothing, an all-nodule one the most
    r, p = c["empty_truth_perfect"]
    assert float(nv.gdl_wce_loss(r, p)) == pytest.approx(0.0, abs=1e-5)
    r, p = c["empty_truth_all_nodule"]
    assert float(nv.generalized_dice_loss(r, p)) == pytest.approx(1.0, abs=1e-6)


def test_loss_accepts_a_mask_channel_and_gradients_are_finite():
    import tensorflow as tf   # test only: the gradient check needs the backend
    r, p = _cases()["empty_truth_soft"]
    assert float(nv.gdl_wce_loss(r[..., 1:], p)) == pytest.approx(float(nv.gdl_wce_loss(r, p)), abs=1e-6)
    pv = tf.Variable(p)
    with tf.GradientTape() as tape:
        loss = nv.gdl_wce_loss(tf.constant(r), pv)
    assert np.isfinite(tape.gradient(loss, pv).numpy()).all()


# ---------------------------------------------------------------- saving and weights files

def test_save_load_same_predictions_in_fresh_process(tmp_path):
    keras.utils.set_random_seed(0)
    m = nv.get_model((64, 64, 1), variant="figure3")
    m.compile(optimizer="adam", loss=nv.gdl_wce_loss, metrics=[nv.dice_coef])
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", np.asarray(m(x, training=False)))
    path = tmp_path / "m.keras"
    m.save(path)
    script = textwrap.dedent(f"""
        import sys, numpy as np, keras
        x = np.load({str(tmp_path / 'x.npy')!r}); want = np.load({str(tmp_path / 'want.npy')!r})
        m = keras.saving.load_model({str(path)!r}, compile=False)      # without importing nasnet_v2
        assert np.allclose(np.asarray(m(x, training=False)), want, atol=1e-5), "compile=False differs"
        sys.path.insert(0, {ROOT!r}); import nasnet_v2
        m = keras.saving.load_model({str(path)!r})                     # with the loss and metric
        assert np.allclose(np.asarray(m(x, training=False)), want, atol=1e-5), "compiled differs"
        assert m.loss is nasnet_v2.gdl_wce_loss, m.loss
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_weights_file_imagenet_style_h5(tmp_path):
    """A legacy no-top NASNetMobile .h5 (as ImageNet's) loads by name; 1 channel: RGB stem kernel summed."""
    from keras.src.legacy.saving import legacy_h5_format   # test only: writes the legacy format
    src = keras.applications.NASNetMobile(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "nasnet_mobile_no_top.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, src)
    m = nv.get_model((64, 64, 1), weights=str(path))
    for name in ("normal_conv_1_5", "reduction_bn_1_reduce_8", "separable_conv_1_normal_left1_11"):
        for a, b in zip(src.get_layer(name).get_weights(), m.get_layer(name).get_weights()):
            np.testing.assert_allclose(a, b)
    stem = src.get_layer("stem_conv1").kernel.numpy()
    np.testing.assert_allclose(m.get_layer("stem_conv1").kernel.numpy(), stem.sum(2, keepdims=True), rtol=1e-6)


# ---------------------------------------------------------------- short real trainings

def _train(model, x, y, steps, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=nv.gdl_wce_loss, metrics=[nv.dice_coef],
                  run_eagerly=True)
    losses = [float(model.train_on_batch(x, y, return_dict=True)["loss"]) for _ in range(steps)]
    return losses


def test_short_training_unet_loss_falls_dice_rises():
    keras.utils.set_random_seed(0)
    x, y = synthetic_slices(8)
    m = nv.get_unet((64, 64, 1), base_filters=8, depth=3, bn_momentum=0.9)
    dice0 = soft_dice(m, x, y, training=True)
    losses = _train(m, x, y, steps=25, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0], losses
    dice1 = soft_dice(m, x, y, training=True)
    assert dice1 > dice0 + 0.1, (dice0, dice1)


def test_figure3_training_and_bn_reestimation():
    """NASNet trains (loss falls, Dice rises); after re-estimating the BN statistics, inference-mode Dice on
    the training slices is close to the training-mode Dice, and no other weight has changed."""
    keras.utils.set_random_seed(0)
    x, y = synthetic_slices(8)
    m = nv.get_model((64, 64, 1), variant="figure3", bn_momentum=0.9)
    dice0 = soft_dice(m, x, y, training=True)
    losses = _train(m, x, y, steps=8, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0], losses
    dice_train = soft_dice(m, x, y, training=True)
    assert dice_train > dice0 + 0.1, (dice0, dice_train)

    before = [w.numpy().copy() for w in m.trainable_weights]
    n = nv.reestimate_bn_statistics(m, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert n == 2
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, m.trainable_weights))
    assert all(layer.momentum == 0.9 for layer in nv.batchnorm_layers(m))
    dice_inf = soft_dice(m, x, y, training=False)
    assert abs(dice_inf - dice_train) < 0.05, (dice_train, dice_inf)


def test_stale_bn_statistics_are_the_problem_reestimation_solves():
    """With Keras's NASNet momentum (0.9997), a short training leaves inference mode far from training mode."""
    keras.utils.set_random_seed(0)
    x, y = synthetic_slices(8)
    m = nv.get_unet((64, 64, 1), base_filters=8, depth=3, bn_momentum=0.9997)
    _train(m, x, y, steps=25, lr=1e-2)
    dice_train = soft_dice(m, x, y, training=True)
    stale = soft_dice(m, x, y, training=False)
    nv.reestimate_bn_statistics(m, [x])
    fixed = soft_dice(m, x, y, training=False)
    assert abs(fixed - dice_train) < 0.05 < abs(stale - dice_train), (dice_train, stale, fixed)


def test_importing_nasnet_v2_sets_the_bfc_allocator_before_tensorflow_allocates():
    """``import nasnet_v2`` sets TF_CPU_ALLOCATOR_USE_BFC=true (a user's own setting is kept), and it is set
    when TensorFlow is first imported, both by nasnet_v2 itself and by nasnet_v2_train.main (which imports
    nasnet_v2 before keras). What the allocator saves is host-dependent: benchmarks/bench_allocator.py."""
    script = textwrap.dedent(f"""
        import os, sys
        seen = {{}}
        class Watch:                      # records the variable when tensorflow is first imported
            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow" and name not in seen:
                    seen[name] = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC")
                return None
        sys.meta_path.insert(0, Watch())
        sys.path.insert(0, {ROOT!r})
        if sys.argv[1] == "train":
            import nasnet_v2_train
            assert "tensorflow" not in sys.modules and "nasnet_v2" not in sys.modules
            try:
                nasnet_v2_train.main(["--WORK_DIR=/nonexistent/run"])
            except SystemExit as e:
                assert "not found" in str(e), e
        else:
            import nasnet_v2
        assert "tensorflow" in sys.modules
        print("AT_IMPORT", seen.get("tensorflow"), "NOW", os.environ.get("TF_CPU_ALLOCATOR_USE_BFC"))
    """)
    for how, preset, want in (("import", None, "true"), ("train", None, "true"), ("import", "false", "false")):
        env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
        if preset is not None:
            env["TF_CPU_ALLOCATOR_USE_BFC"] = preset
        res = subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, timeout=300,
                             env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"AT_IMPORT {want} NOW {want}" in res.stdout, (how, preset, res.stdout)
