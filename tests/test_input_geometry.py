"""Millimetre network input (network_input.InputGeometry): one model for every scan resolution.

The same analytic phantom (a lung with a nodule at known world coordinates) is rendered at two resolutions
(512 px of 0.7 mm and 320 px of 1.12 mm, slices 1.25 and 2.5 mm, one of them in LUNA16's flipped direction):
- the network inputs agree within interpolation error, the nodule at the same input pixel;
- the input grid maps back onto each scan's own voxel grid, where the nodule lands at its world coordinates;
- a tiny model trained on one resolution finds the nodule at the other (inference.Predictor, config.json);
- PIXEL_MM=0 is the thesis's raw crop, exactly.
"""
import json

import numpy as np
import pytest

import ct_io
import network_input

FOV_MM = 358.4                  # both renderings cover the same field of view, centred on world (0, 0)
NODULE_XYZ = (42.0, -30.0, 10.0)  # world mm of the nodule centre
NODULE_R = 5.0                  # mm
SETTINGS = dict(context_slices=3, pixel_mm=0.7, crop_mm=300.0, context_mm=2.5)


def render(n, sz, flipped=False, n_z=None, fov=FOV_MM):
    """HU and lung mask of the phantom on an n x n grid of fov/n mm pixels, slices sz mm apart; smooth edges
    (1 mm) so that resampling errors stay small. Returns hu, lung, (origin, spacing, direction) for ct_io."""
    sxy = fov / n
    n_z = n_z or int(round(40.0 / sz)) + 1
    d = -1.0 if flipped else 1.0
    direction = (d, 0.0, 0.0, 0.0, d, 0.0, 0.0, 0.0, 1.0)
    # voxel centres at world -fov/2 + (i + 0.5) * sxy along x and y (reversed when flipped), z centred on 10 mm
    origin = (d * (-fov / 2 + sxy / 2), d * (-fov / 2 + sxy / 2), NODULE_XYZ[2] - sz * (n_z // 2))
    spacing = (sxy, sxy, sz)
    # the direction is diagonal, so each world axis depends on one voxel axis: convert the three index lines
    ax = [ct_io.voxel_to_world(np.eye(3)[k] * np.arange(m)[:, None], origin, spacing, direction)[:, 2 - k]
          for k, m in enumerate((n_z, n, n))]
    wz, wy, wx = np.meshgrid(*ax, indexing="ij")
    body = 1 / (1 + np.exp(-((150.0 - np.hypot(wx, wy * 1.3)) / 1.0)))
    lung_p = 1 / (1 + np.exp(-((1.0 - np.hypot(np.abs(wx) / 110.0 - 0.5, wy / 90.0) * 2.0) * 60.0)))
    r = np.sqrt((wx - NODULE_XYZ[0]) ** 2 + (wy - NODULE_XYZ[1]) ** 2 + (wz - NODULE_XYZ[2]) ** 2)
    nodule = 1 / (1 + np.exp(-(NODULE_R - r) / 0.7))
    hu = -1000 + body * 1040                                  # air outside, soft tissue inside the body
    hu = hu - lung_p * 880                                    # lungs at -840
    hu = hu + nodule * lung_p * 880                           # the nodule back to soft tissue
    lung = (lung_p > 0.5).astype(np.uint8)
    return hu.astype(np.int16), lung, (origin, spacing, direction)


@pytest.fixture(scope="module")
def two_resolutions():
    fine = render(512, 1.25)                                  # 0.7 mm pixels
    coarse = render(320, 2.5, flipped=True)                   # 1.12 mm pixels, LUNA16's flipped direction
    return fine, coarse


def _centre_slice(geom):
    origin, spacing, direction = geom
    return int(round(ct_io.world_to_voxel(np.array([NODULE_XYZ]), origin, spacing, direction)[0][0]))


def _expected_pixel(side, pixel_mm, flipped=False):
    """Where the nodule's centre must be on the input grid: world (x, y) mm from the field of view's centre
    (world 0, 0 here), in input pixels from the grid's centre; a flipped scan's arrays run the other way."""
    d = -1.0 if flipped else 1.0
    return np.array([d * NODULE_XYZ[1], d * NODULE_XYZ[0]]) / pixel_mm + (side - 1) / 2.0


def _blob_centre(x, near, r=12):
    """Centroid (row, col) of the pixels within r px of ``near`` brighter than midway between the lung's level
    and the brightest pixel there (the lung's edge elsewhere is bright too)."""
    rows, cols = np.ogrid[:x.shape[0], :x.shape[1]]
    window = (rows - near[0]) ** 2 + (cols - near[1]) ** 2 <= r * r
    vals = x[window & (x != 0)]
    m = window & (x > (np.median(vals) + vals.max()) / 2)
    return np.argwhere(m).mean(axis=0)


def test_same_input_at_two_resolutions(two_resolutions):
    """The network input of the nodule's slice is the same picture at 0.7 and 1.12 mm pixels (the flipped scan
    shows it rotated by 180 degrees, as the network sees any flipped scan), within interpolation error."""
    (hu_a, lung_a, g_a), (hu_b, lung_b, g_b) = two_resolutions
    xa = network_input.network_input(hu_a, lung_a, _centre_slice(g_a), spacing=g_a[1], **SETTINGS)
    xb = network_input.network_input(hu_b, lung_b, _centre_slice(g_b), spacing=g_b[1], **SETTINGS)
    assert xa.shape == xb.shape == (448, 448, 3)                # 300 mm / 0.7 mm, up to 32-px blocks
    xb = xb[::-1, ::-1]                                        # undo the flip: same orientation as the first
    # the nodule: brightest lung structure, at the same input pixel in both (within a pixel)
    want = _expected_pixel(xa.shape[0], SETTINGS["pixel_mm"])
    pa, pb = _blob_centre(xa[..., 1], want), _blob_centre(xb[..., 1], want)
    assert np.abs(pa - want).max() <= 0.5 and np.abs(pb - want).max() <= 0.5
    # whole pictures: the same up to resampling of edges (lung border, nodule rim)
    diff = np.abs(xa - xb)
    assert np.median(diff) < 0.02 and np.mean(diff > 0.5) < 0.02
    # the channels are CONTEXT_MM = 2.5 mm apart whatever the slice spacing: at 1.25 mm slices channel 0 is two
    # slices away, at 2.5 mm one; the nodule (radius 5 mm) is smaller 2.5 mm off its centre in both
    za = _centre_slice(g_a)
    ref = network_input.network_input(hu_a, lung_a, za - 2, spacing=g_a[1], **dict(SETTINGS, context_slices=1))
    np.testing.assert_allclose(xa[..., 0], ref[..., 0], atol=1e-5)
    ia, ib = tuple(np.round(pa).astype(int)), tuple(np.round(pb).astype(int))
    assert xa[ia][0] < xa[ia][1] and xb[ib][0] < xb[ib][1]


def test_input_grid_maps_back_to_world(two_resolutions):
    """A marker at the nodule's input pixel, mapped back onto each scan's own grid (as postprocess does with the
    probability), lands on the voxel of the nodule's world coordinates (flipped scan included)."""
    for hu, lung, (origin, spacing, direction) in two_resolutions:
        g = network_input.InputGeometry(hu.shape, spacing, **SETTINGS)
        z = _centre_slice((origin, spacing, direction))
        x = network_input.network_input(hu, lung, z, spacing=spacing, **SETTINGS)[..., 1]
        marker = np.zeros((1, g.h, g.w), np.float32)
        near = _expected_pixel(g.h, SETTINGS["pixel_mm"], flipped=direction[0] < 0)
        marker[(0,) + tuple(np.round(_blob_centre(x, near)).astype(int))] = 1.0
        back = g.to_scan(marker)[0]
        assert back.shape == hu.shape[1:]
        yx = np.argwhere(back > 0).mean(axis=0)              # the input pixel's footprint on the scan grid
        world = ct_io.voxel_to_world(np.array([[z, yx[0], yx[1]]]), origin, spacing, direction)[0]
        assert np.abs(world[:2] - NODULE_XYZ[:2]).max() <= max(spacing[0], SETTINGS["pixel_mm"]) + 1e-6
        # mapping an all-ones input back gives ones over the covered box and zeros outside it
        ones = g.to_scan(np.ones((1, g.h, g.w), np.float32))[0]
        y0, x0, h, w = g.box
        assert np.allclose(ones[y0 + 1:y0 + h - 1, x0 + 1:x0 + w - 1], 1.0, atol=1e-5)
        assert ones[:y0].max(initial=0) == 0 and ones[y0 + h:].max(initial=0) == 0


def test_raw_pixels_are_the_thesis_crop():
    """PIXEL_MM=0: the input is the thesis's crop of the z-scored slice itself, and maps back exactly."""
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 400, (4, 64, 64)).astype(np.int16)
    lung = np.ones(hu.shape, np.uint8)
    g = network_input.InputGeometry(hu.shape, None, crop=0, context_slices=3)
    assert g.box == network_input.crop_box(hu.shape) == (7, 7, 50, 50)
    x = network_input.network_input(hu, lung, 2, context_slices=3)
    norm = network_input.normalise_slices(hu, lung)
    for c, k in enumerate((1, 2, 3)):
        np.testing.assert_array_equal(x[..., c], norm[k, 7:57, 7:57])
    back = g.to_scan(x[..., 1][None])[0]
    np.testing.assert_array_equal(back[7:57, 7:57], x[..., 1])
    assert back[:7].max() == 0 and back[:, 57:].max() == 0


def test_mm_input_needs_the_spacing():
    with pytest.raises(ValueError, match="spacing"):
        network_input.InputGeometry((3, 64, 64), None, pixel_mm=0.7, crop_mm=100.0)


def test_model_trained_at_one_resolution_finds_the_nodule_at_the_other(tmp_path):
    """A tiny network trained on the coarse rendering (1.25 mm pixels) for a few hundred steps; inference's
    Predictor (geometry from config.json) finds the nodule on a fine rendering (0.625 mm pixels) at its world
    position, and the probability maps of both renderings agree in world space."""
    import keras
    import inference
    keras.utils.set_random_seed(0)
    st = dict(context_slices=3, pixel_mm=1.5, crop_mm=150.0, context_mm=2.5)    # small: 100 px inputs
    coarse = render(128, 2.5, fov=160.0)
    fine = render(256, 1.25, fov=160.0, flipped=True)
    hu, lung, geom = coarse
    zc = _centre_slice(geom)
    g = network_input.InputGeometry(hu.shape, geom[1], **st)
    zs = [zc - 1, zc, zc + 1, 0, hu.shape[0] - 1]
    x = np.stack([network_input.network_input(hu, lung, z, spacing=geom[1], **st) for z in zs])
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    w = ct_io.voxel_to_world(np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1), *geom)
    truth = (np.linalg.norm(w - np.array(NODULE_XYZ), axis=1) <= NODULE_R).reshape(hu.shape).astype(np.float32)
    y = (g.to_input(truth[zs]) >= 0.5).astype(np.float32)
    y = np.stack([1 - y, y], -1)
    inp = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(8, 5, padding="same", activation="relu")(inp)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(h)
    out = keras.layers.Conv2D(2, 1, activation="softmax")(h)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(0.01), "categorical_crossentropy")
    model.fit(x, y, epochs=150, batch_size=len(x), verbose=0,
              sample_weight=1 + 30 * y[..., 1])
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    (tmp_path / "config.json").write_text(json.dumps({"CROP": 0, "CONTEXT_SLICES": 3, "PIXEL_MM": 1.5,
                                                      "CROP_MM": 150.0, "CONTEXT_MM": 2.5}))
    pred = inference.Predictor(path)
    centres = []
    for hu_r, lung_r, geom_r in (coarse, fine):
        prob, _ = pred.predict(hu_r, lung_r, batch_size=4, spacing=geom_r[1])
        assert prob.shape == hu_r.shape and 0 <= prob.min() and prob.max() <= 1
        m = prob > 0.5
        assert m.sum() > 0
        vox = np.argwhere(m).mean(axis=0)
        centres.append(ct_io.voxel_to_world(vox[None], *geom_r)[0])
    for c in centres:
        assert np.linalg.norm(c - np.array(NODULE_XYZ)) < NODULE_R / 2       # found at its world position
    assert np.linalg.norm(centres[0] - centres[1]) < 2.0


def test_volume_inputs_equal_network_input_in_mm(two_resolutions):
    """Inference's batched inputs (volume_inputs, all slices or a chosen few) = the table's per-slice inputs."""
    hu, lung, (origin, spacing, direction) = two_resolutions[1]
    st = dict(SETTINGS, crop_mm=120.0)
    want = np.stack([network_input.network_input(hu, lung, z, spacing=spacing, **st) for z in range(hu.shape[0])])
    got = np.concatenate([x for _, x in network_input.volume_inputs(hu, lung, batch_size=4, spacing=spacing, **st)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    pick = [0, 3, 4, 9, hu.shape[0] - 1]
    parts = list(network_input.volume_inputs(hu, lung, batch_size=2, spacing=spacing, slices=pick, **st))
    assert [list(zs) for zs, _ in parts] == [[0, 3], [4, 9], [hu.shape[0] - 1]]
    np.testing.assert_allclose(np.concatenate([x for _, x in parts]), want[pick], atol=1e-6)


def test_raw_pixel_model_outside_its_pixel_range_is_named_once(tmp_path, capsys):
    """A raw-pixel model (PIXEL_MM=0) trained on 1.1-1.8 mm pixels, applied to 0.7 mm scans: one line says so
    (not one per scan); scans inside the range say nothing."""
    import keras
    import inference
    inp = keras.Input((None, None, 1))
    model = keras.Model(inp, keras.layers.Conv2D(2, 1, activation="softmax")(inp))
    path = str(tmp_path / "raw.keras")
    model.save(path)
    (tmp_path / "config.json").write_text(json.dumps({"CROP": 0, "CONTEXT_SLICES": 1, "PIXEL_MM": 0,
                                                      "PIXEL_MM_RANGE": [1.1, 1.8]}))
    pred = inference.Predictor(path)
    hu = np.full((2, 64, 64), -800, np.int16)
    lung = np.ones(hu.shape, np.uint8)
    pred.predict(hu, lung, spacing=(1.4, 1.4, 2.5))
    assert "raw-pixel" not in capsys.readouterr().err
    for _ in range(3):
        pred.predict(hu, lung, spacing=(0.7, 0.7, 1.0))
    err = capsys.readouterr().err
    assert err.count("raw-pixel model (PIXEL_MM=0) trained on 1.10-1.80 mm pixels") == 1 and "0.70 mm" in err
    assert pred.outside_range == [0.7, 0.7, 0.7]


def test_lung_window_predicts_the_same_lungs_in_less_input(two_resolutions, tmp_path):
    """LUNG_WINDOW_MM: the window of the input that holds the lungs (margin 10 mm) starts on the 32-px grid,
    covers every lung pixel of the scan with its margin, is smaller than the whole input, and a local network
    gives the same probability there as on the whole input (normal and flipped scans)."""
    import keras
    import inference
    inp = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    model = keras.Model(inp, keras.layers.Conv2D(2, 3, padding="same", activation="softmax")(h))
    path = str(tmp_path / "local.keras")
    model.save(path)
    (tmp_path / "config.json").write_text(json.dumps({"CROP": 0, "CONTEXT_SLICES": 3, "PIXEL_MM": 0.7,
                                                      "CROP_MM": 300.0, "CONTEXT_MM": 2.5}))
    for hu, lung, (origin, spacing, direction) in two_resolutions:
        pred = inference.Predictor(path)
        g = network_input.InputGeometry(hu.shape, spacing, **SETTINGS)
        w = pred.lung_window(g, lung, None, 10.0)
        (r0, r1), (c0, c1) = [(int(round((s - s0) / st)), int(round((s - s0) / st)) + n)
                              for s, s0, st, n in zip(w.starts, g.starts, g.steps, (w.h, w.w))]
        assert r0 % 32 == 0 and c0 % 32 == 0 and w.h % 32 == 0 and w.w % 32 == 0
        assert w.h * w.w < 0.8 * g.h * g.w
        cover = w.to_scan(np.ones((1, w.h, w.w), np.float32))[0]
        inside = cover > 0.999
        rows, cols = np.nonzero(lung.any(axis=0))
        margin = int(10.0 / spacing[0]) - 1
        for r, c in ((rows.min() - margin, cols.min() - margin), (rows.max() + margin, cols.max() + margin)):
            assert inside[r, c], (r, c)
        whole, box = pred.predict(hu, lung, batch_size=8, spacing=spacing, window_mm=-1.0)
        part, box_w = pred.predict(hu, lung, batch_size=8, spacing=spacing, window_mm=10.0)
        assert box_w == box
        np.testing.assert_allclose(part[lung > 0], whole[lung > 0], atol=1e-5)
        assert part[:, cover == 0].max(initial=0) == 0                   # nothing predicted outside it
