"""Magic-wand segmentation of a roundish object from a center point (after Noah Apthorpe's CellMagicWand).

Library module (no side effects on import). Two entry points:

``cell_magic_wand(image, center, min_radius, max_radius, roughness=2, zoom_factor=1, center_range=2)``
    2-D: bool mask, same shape as ``image``, of the object around ``center`` (row, col).

``wand_nodule_mask(hu, center_zyx, diameter_mm, spacing_zyx, ...)``
    3-D: bool (Z, Y, X) label of one lung nodule in a CT volume in HU (the thesis's labelling method with
    its bugs fixed). ``wand_nodule_box`` returns the same label as a small box plus the slices that place
    it in the volume (what ``preprocess.py`` should use: ``nodule_mask[slices][box] = k``).
    Per slice: the wand on the negated, clipped HU (-1000..-500 by default) with radii in PIXELS from
    millimetres (max = cross-section radius + 2 mm margin), on every slice the nodule crosses (or the
    thesis's 3 slices); then a density floor (-500 HU, lowered for ground-glass / part-solid nodules), hole
    filling, the 3-D component at the center; the center voxel is always labelled (see the docstring).

The 2-D algorithm
-----------------
1. A square window around the center is cut from the image; where it leaves the image it is padded by
   repeating the border pixels, and the center is expressed in the window's coordinates (the original
   padded the image without shifting the center). The window is smoothed (Gaussian, ``sigma`` px) and,
   when ``zoom_factor != 1``, upsampled with ``scipy.ndimage.zoom`` (order 1); all radii and the
   multi-start offsets are scaled into the zoomed frame and the mask is sampled back at the original pixels.
2. Polar sampling (bilinear) at integer radii ``min_radius .. max_radius + 1`` and
   ``A = round(2 pi max_radius roughness)`` angles.
3. Edge strength ``E[a, k] = P[a, r_k + 1] - P[a, r_k]``: the radial derivative between radius r_k and
   r_k + 1, i.e. a boundary at ``r_k + 0.5``. POLARITY: the wand looks for an object that is DARK inside and
   BRIGHT outside (the value rises when leaving the object). A bright object (a nodule in HU) is segmented by
   passing the negated image, as the thesis did (``wand_nodule_mask`` does this for you).
4. Boundary: the closed path ``r[0..A-1]`` (one radius per angle) maximising ``sum E[a, r[a]]`` with
   ``|r[a+1] - r[a]| <= 1`` and ``|r[A-1] - r[0]| <= 1``, found EXACTLY by dynamic programming over the
   angles with the starting radius as an extra state (``best_closed_path``; O(A R^2), vectorised over R^2
   and over the starts). The original used a greedy look-ahead. Optional ``smoothness`` (default 0.05, 0
   = the plain criterion) charges each one-pixel radius step that fraction of the image's strong-edge
   level (99th percentile of E), so where no edge exists (a nodule against the chest wall or a vessel of
   the same density) the path continues as an arc instead of wandering on noise.
5. Mask: pixels whose distance to the center is <= the boundary radius at their angle (boundary radii
   interpolated linearly between the sampled angles). The region is star-shaped around the center, so it
   has no holes to fill.
6. Multi-start: the same from the center and its 8 neighbours ``center_range`` px away (the 3x3 grid);
   a pixel is kept when >= 5 of the 9 masks hold it.
"""
import math

import numpy as np
from scipy import ndimage

__all__ = ["cell_magic_wand", "best_closed_path", "wand_nodule_mask", "wand_nodule_box"]

_NEG = -1e30                     # "impossible" score in the dynamic program


# ----------------------------------------------------------------------------- dynamic program

def best_closed_path(edge, smoothness=0.0):
    """Exact best closed path through polar edge images.

    edge: (A, R) or (S, A, R) array (S independent problems). Returns int radius indices (A,) or (S, A)
    maximising ``sum_a edge[a, r[a]] - smoothness * sum_a |r[a+1] - r[a]|`` (including the closing step
    from the last angle to the first) subject to ``|r[a+1] - r[a]| <= 1`` and ``|r[A-1] - r[0]| <= 1``.

    DP over the angles whose state is (starting radius, current radius): for each start the best open
    path is extended one angle at a time; at the end only states whose radius is within 1 of their start
    may close. Ties prefer staying at the same radius.
    """
    e = np.asarray(edge, dtype=np.float64)
    single = e.ndim == 2
    if single:
        e = e[None]
    S, A, R = e.shape
    if A < 1 or R < 1:
        raise ValueError(f"best_closed_path: empty polar image {e.shape}")
    pen = float(smoothness)
    idx = np.arange(R)
    # Vp[s, i, 1 + j]: best score of a path that started at radius i and is now at radius j; the two
    # padding columns stay "impossible" so that the +-1 moves never leave the radius range
    Vp = np.full((S, R, R + 2), _NEG)
    V = Vp[..., 1:-1]
    V[:, idx, idx] = e[:, 0, :]
    went_up = np.zeros((A, S, R, R), dtype=bool)     # reached j from j - 1
    went_down = np.zeros((A, S, R, R), dtype=bool)   # reached j from j + 1 (overrides went_up)
    # a move costs pen: equivalently staying earns pen and every step (move or not) is charged pen
    gain = e - pen
    best = np.empty((S, R, R))
    for a in range(1, A):
        np.add(V, pen, out=best)                      # stay
        np.greater(Vp[..., :-2], best, out=went_up[a])    # ties prefer staying
        np.maximum(best, Vp[..., :-2], out=best)
        np.greater(Vp[..., 2:], best, out=went_down[a])   # ties prefer staying, then coming from below
        np.maximum(best, Vp[..., 2:], out=best)
        np.add(best, gain[:, a, None, :], out=V)
    # closing step: last radius j within 1 of the start i, charged like any other step
    diff = np.abs(idx[:, None] - idx[None, :])
    close = np.where(diff <= 1, -pen * diff, _NEG)
    total = (V + close[None]).reshape(S, -1)
    flat = np.argmax(total, axis=1)
    start, end = np.divmod(flat, R)
    path = np.empty((S, A), dtype=np.int64)
    path[:, A - 1] = end
    s_idx = np.arange(S)
    for a in range(A - 1, 0, -1):
        j = path[:, a]
        step = np.where(went_down[a, s_idx, start, j], -1, went_up[a, s_idx, start, j].astype(np.int64))
        path[:, a - 1] = j - step
    assert np.array_equal(path[:, 0], start)
    return path[0] if single else path


# ----------------------------------------------------------------------------- 2-D wand

def _window(image, cy, cx, half):
    """Square window of side 2*half+1 centred on integer pixel (cy, cx); edge-padded outside the image.
    Returns the window and the (row, col) of its top-left corner in image coordinates (may be negative)."""
    H, W = image.shape
    y0, x0 = cy - half, cx - half
    y1, x1 = cy + half + 1, cx + half + 1
    sub = image[max(y0, 0):min(y1, H), max(x0, 0):min(x1, W)]
    if sub.size == 0:
        raise ValueError(f"cell_magic_wand: center ({cy}, {cx}) too far outside the image {image.shape}")
    pad = ((max(0, -y0), max(0, y1 - H)), (max(0, -x0), max(0, x1 - W)))
    if any(p for pp in pad for p in pp):
        sub = np.pad(sub, pad, mode="edge")
    return sub, y0, x0


def _wand_window(image, center, min_radius, max_radius, roughness=2, zoom_factor=1, center_range=2,
                 sigma=1.0, smoothness=0.05, votes=5):
    """The wand on a window around ``center``. Returns (mask, y0, x0): a bool window whose top-left pixel
    is image pixel (y0, x0) (it may reach outside the image; the caller crops)."""
    image, cy, cx, min_radius, max_radius, z, cr = _checked(image, center, min_radius, max_radius, zoom_factor,
                                                           center_range)
    win, zwin, zf, y0, x0 = _smoothed_window(image, cy, cx, max_radius + cr + 3 * max(sigma, 0) + 3, sigma, z)
    # center in the (zoomed) window frame: pixel p of the window is at (p + 0.5) * zf - 0.5
    wcy, wcx = (cy - y0 + 0.5) * zf - 0.5, (cx - x0 + 0.5) * zf - 0.5
    r_lo = int(math.floor(min_radius * zf))
    r_hi = max(int(math.ceil(max_radius * zf)), r_lo + 1)
    radii = np.arange(r_lo, r_hi + 2, dtype=np.float64)          # samples; edges between neighbours
    n_ang = max(16, int(round(2 * math.pi * r_hi * float(roughness))))
    theta = np.arange(n_ang) * (2 * math.pi / n_ang)
    d = cr * zf
    offs = np.array([(0, 0)] + [(dy, dx) for dy in (-d, 0, d) for dx in (-d, 0, d) if (dy, dx) != (0, 0)])
    if cr == 0:
        offs = offs[:1]
    starts = np.stack([wcy + offs[:, 0], wcx + offs[:, 1]], axis=1)
    edge = _polar_edges(zwin, starts, radii, theta)              # (S, A, R): boundary at radii[:-1] + 0.5
    pen = 0.0
    if smoothness > 0:
        level = np.percentile(edge, 99)
        pen = float(smoothness) * (level if level > 0 else 1.0)
    paths = best_closed_path(edge, pen)                          # (S, A)
    bound = radii[paths] + 0.5                                   # boundary radius, zoomed px
    count = _inside_counts(win.shape[0], zf, starts, theta, bound)
    need = min(votes, len(offs))
    return count >= need, y0, x0


def _checked(image, center, min_radius, max_radius, zoom_factor, center_range):
    """The wand's arguments checked (ValueError) and as numbers -> (image, cy, cx, min_radius, max_radius,
    zoom, center_range); max_radius is at least min_radius + 1."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"cell_magic_wand: expected a 2-D image, got shape {image.shape}")
    cy, cx = float(center[0]), float(center[1])
    if not (np.isfinite(cy) and np.isfinite(cx)):
        raise ValueError(f"cell_magic_wand: bad center {center}")
    min_radius = max(0.0, float(min_radius))
    max_radius = float(max_radius)
    if max_radius < min_radius + 1:
        max_radius = min_radius + 1
    z = float(zoom_factor)
    if not z > 0:
        raise ValueError(f"cell_magic_wand: zoom_factor must be > 0, got {zoom_factor}")
    return image, cy, cx, min_radius, max_radius, z, float(center_range)


def _smoothed_window(image, cy, cx, reach, sigma, z):
    """The window of half size ceil(``reach``) around the pixel nearest (cy, cx), smoothed (Gaussian ``sigma``)
    and zoomed by ``z`` -> (window, zoomed window, the exact zoom factor, y0, x0 of its top-left pixel)."""
    win, y0, x0 = _window(image, int(round(cy)), int(round(cx)), int(math.ceil(reach)))
    win = win.astype(np.float64)
    if sigma > 0:
        win = ndimage.gaussian_filter(win, sigma, mode="nearest")
    if z == 1:
        return win, win, 1.0, y0, x0
    zwin = ndimage.zoom(win, z, order=1, mode="nearest", grid_mode=True)
    return win, zwin, zwin.shape[0] / win.shape[0], y0, x0


def _polar_edges(zwin, starts, radii, theta):
    """Bilinear polar samples of ``zwin`` around each start (S, 2) at ``radii`` and angles ``theta`` -> their
    radial differences (S, A, R): the edge between radii[k] and radii[k + 1]."""
    sy = starts[:, 0, None, None] + radii[None, None, :] * np.sin(theta)[None, :, None]
    sx = starts[:, 1, None, None] + radii[None, None, :] * np.cos(theta)[None, :, None]
    polar = ndimage.map_coordinates(zwin, [sy.ravel(), sx.ravel()], order=1, mode="nearest")
    return np.diff(polar.reshape(sy.shape), axis=2)


def _inside_counts(n, zf, starts, theta, bound):
    """For each of the n x n original pixels of the window: how many starts' boundaries (radius ``bound`` (S, A)
    at angles ``theta``, zoomed frame) hold it (boundary radii interpolated between the sampled angles)."""
    py = (np.arange(n) + 0.5) * zf - 0.5
    px = py
    count = np.zeros((n, n), dtype=np.int16)
    for s in range(len(starts)):
        dy = py[:, None] - starts[s, 0]
        dx = px[None, :] - starts[s, 1]
        rho = np.hypot(dy, dx)
        ang = np.mod(np.arctan2(dy, dx), 2 * math.pi)
        rb = np.interp(ang, theta, bound[s], period=2 * math.pi)
        count += rho <= rb
    return count


def cell_magic_wand(image, center, min_radius, max_radius, roughness=2, zoom_factor=1, center_range=2,
                    sigma=1.0, smoothness=0.05, votes=5):
    """Bool mask (same shape as ``image``) of the dark-inside / bright-outside object around ``center``.

    image: 2-D array. center: (row, col), may be fractional and may lie near (or just beyond) the border.
    min_radius, max_radius: boundary radius bounds in pixels of ``image``. roughness: angles per pixel of
    circumference at max_radius. zoom_factor: work on the image upsampled by this factor. center_range:
    distance in pixels of the 8 extra starts (0 = single start). sigma: Gaussian pre-smoothing in pixels.
    smoothness: cost of a one-pixel radius step relative to a strong edge (0 = original criterion).
    votes: how many of the 9 starts must agree (5 = majority).

    To segment a BRIGHT object on a dark background (a nodule in HU), pass ``-image``.
    """
    image = np.asarray(image)
    m, y0, x0 = _wand_window(image, center, min_radius, max_radius, roughness, zoom_factor, center_range,
                             sigma, smoothness, votes)
    out = np.zeros(image.shape, dtype=bool)
    H, W = image.shape
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + m.shape[0], H), min(x0 + m.shape[1], W)
    if ye > ys and xe > xs:
        out[ys:ye, xs:xe] = m[ys - y0:ye - y0, xs - x0:xe - x0]
    return out


# ----------------------------------------------------------------------------- 3-D nodule labels

def wand_nodule_box(hu, center_zyx, diameter_mm, spacing_zyx, three_slice=False, hu_floor=-500,
                    margin_mm=2.0, min_radius_px=2, z_margin_mm=None, min_diameter_mm=0.0,
                    adaptive_floor=True, fill_holes=True, thesis_radius=False, roughness=2,
                    zoom_factor=1, center_range=2, smoothness=0.05, hu_window=(-1000, -500)):
    """Wand label of one nodule as (box, slices): ``box`` a bool array, ``slices`` a tuple of 3 slice
    objects so that ``hu[slices]`` is the region ``box`` covers (``mask[slices] |= box``).

    hu: (Z, Y, X) volume in HU. center_zyx: nodule center in voxels (fractional allowed). diameter_mm:
    nodule diameter. spacing_zyx: voxel size in mm, (z, y, x).

    Per slice, the wand runs on the NEGATED HU (a nodule is bright in HU, the wand wants dark-inside),
    clipped first to ``hu_window`` (default -1000..-500 HU; ``None`` = the thesis's plain negated HU), so
    that the strongest edge is the nodule/lung boundary and not a solid core inside a ground-glass rim;
    centred at the nodule's (y, x), with min radius ``min_radius_px`` and max radius
    ``(r_slice + margin_mm) / pixel size`` in pixels, where ``r_slice = sqrt(R^2 - dz^2)`` is the
    cross-section radius of a sphere of radius R = diameter/2 at the slice's distance dz (mm) from the
    center (pixel size = mean of the y and x spacings). Slices labelled: every slice with
    ``|dz| <= R + z_margin_mm`` (default ``z_margin_mm = margin_mm``; slices past R get max radius
    ``margin_mm``, so they keep only what the density floor leaves), or only c-1, c, c+1 with
    ``three_slice=True`` (the thesis rule; each of those gets the full radius R + margin).
    ``thesis_radius=True`` restores the thesis bug (max radius = diameter_mm + 2, in pixels).

    Then: voxels below the density floor are removed. The floor is ``hu_floor`` (-500, the thesis), or
    with ``adaptive_floor`` (default) ``min(hu_floor, (nodule + lung) / 2)`` where nodule = the 25th
    percentile HU inside the center slice's wand mask (eroded by 1 px to drop the partial-volume rim) and
    lung = the 25th percentile HU of the box outside the wand masks: it only ever LOWERS the floor, for
    ground-glass and part-solid nodules that -500 HU would erase. Enclosed holes are filled per slice
    (``fill_holes``), and the 3-D connected component (26-connectivity) holding the center voxel is kept.

    The center voxel is always labelled: when the above leaves it out (a cavity, a faint center, a wand
    that found nothing), the nearest remaining component within R of the center is kept and a disc of
    radius ``min(min_radius_px, R in px)`` (at least 1 px) around the center on the center slice is added.

    Nodules with ``diameter_mm < min_diameter_mm`` get an empty label (thesis: 5 mm; default 0 = all).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"wand_nodule_box: expected a (Z, Y, X) volume, got shape {hu.shape}")
    spacing_zyx = tuple(float(v) for v in spacing_zyx)
    s_xy, c = 0.5 * (spacing_zyx[1] + spacing_zyx[2]), np.asarray(center_zyx, dtype=np.float64)
    ci = np.clip(np.rint(c).astype(int), 0, np.array(hu.shape) - 1)
    R = 0.5 * float(diameter_mm)
    rmax = _slice_radii(c, ci, R, hu.shape[0], spacing_zyx[0], s_xy, three_slice, margin_mm,
                        margin_mm if z_margin_mm is None else z_margin_mm)
    if thesis_radius:
        rmax = {z: float(diameter_mm) + 2.0 for z in rmax}
    rmax = {z: max(r, min_radius_px + 1.0) for z, r in rmax.items()}        # at least min radius + 1
    slices = _box_slices(hu.shape, ci, rmax, float(center_range))
    box = np.zeros(tuple(sl.stop - sl.start for sl in slices), dtype=bool)
    if diameter_mm < min_diameter_mm:
        return box, slices
    wand = _wand_slices(hu, c, rmax, slices, min_radius_px, hu_window, dict(
        roughness=roughness, zoom_factor=zoom_factor, center_range=float(center_range), smoothness=smoothness))
    hub = hu[slices].astype(np.float32)
    cb = ci - np.array([sl.start for sl in slices])
    floor = _density_floor(wand, hub, cb[0], hu_floor) if adaptive_floor else float(hu_floor)
    box = wand & (hub >= floor)
    box = _fill_holes_per_slice(box) if fill_holes else box
    return _center_component(box, cb, R, spacing_zyx, max(1.0, min(float(min_radius_px), R / s_xy))), slices


def _slice_radii(c, ci, R, n_slices, sz, s_xy, three_slice, margin_mm, z_margin_mm):
    """{slice z: the wand's max radius (px)} of the slices labelled: c-1, c, c+1 with the full radius R + margin
    (``three_slice``), else every slice within R + ``z_margin_mm`` of the centre (and the centre slice) with
    the cross-section radius of the sphere there + margin."""
    if three_slice:
        zs = [z for z in (ci[0] - 1, ci[0], ci[0] + 1) if 0 <= z < n_slices]
        return {z: (R + margin_mm) / s_xy for z in zs}
    nz = int(math.floor((R + z_margin_mm) / sz + 1e-9))
    zs = [z for z in range(ci[0] - nz, ci[0] + nz + 1) if 0 <= z < n_slices]
    rmax = {}
    for z in zs:
        dz = (z - c[0]) * sz
        r_sl = math.sqrt(max(R * R - dz * dz, 0.0))
        rmax[z] = (r_sl + margin_mm) / s_xy
    return {z: rmax[z] for z in zs if abs((z - c[0]) * sz) <= R + z_margin_mm or z == ci[0]}


def _box_slices(shape, ci, rmax, cr):
    """The label's box in the volume: the labelled slices, and in-plane the largest max radius + the multi-start
    distance ``cr`` + 1 around the centre voxel ``ci``, clipped to the volume -> 3 slice objects."""
    Z, Y, X = shape
    half = int(math.ceil(max(rmax.values()) + cr + 1))
    y0, y1 = max(ci[1] - half, 0), min(ci[1] + half + 1, Y)
    x0, x1 = max(ci[2] - half, 0), min(ci[2] + half + 1, X)
    return slice(min(rmax), max(rmax) + 1), slice(y0, y1), slice(x0, x1)


def _wand_slices(hu, c, rmax, slices, min_radius_px, hu_window, wand_kw):
    """The 2-D wand on each labelled slice (the negated HU clipped to ``hu_window``, centred at the nodule's
    (y, x)) -> the wand masks pasted into a bool box of ``slices``. The wand sees a region a few pixels wider
    than the box (for its smoothing), in that region's frame."""
    Z, Y, X = hu.shape
    (z0, z1), (y0, y1), (x0, x1) = ((sl.start, sl.stop) for sl in slices)
    box = np.zeros((z1 - z0, y1 - y0, x1 - x0), dtype=bool)
    lo, hi = (-np.inf, np.inf) if hu_window is None else (float(hu_window[0]), float(hu_window[1]))
    gy0, gy1 = max(y0 - 8, 0), min(y1 + 8, Y)
    gx0, gx1 = max(x0 - 8, 0), min(x1 + 8, X)
    for z in rmax:
        img = -np.clip(hu[z, gy0:gy1, gx0:gx1].astype(np.float32), lo, hi)
        m, wy, wx = _wand_window(img, (c[1] - gy0, c[2] - gx0), min_radius_px, rmax[z], wand_kw["roughness"],
                                 wand_kw["zoom_factor"], wand_kw["center_range"], smoothness=wand_kw["smoothness"])
        wy, wx = wy + gy0, wx + gx0
        # paste window (top-left at image (wy, wx)) into the box (top-left at (y0, x0))
        ys, xs = max(wy, y0), max(wx, x0)
        ye, xe = min(wy + m.shape[0], y1), min(wx + m.shape[1], x1)
        if ye > ys and xe > xs:
            box[z - z0, ys - y0:ye - y0, xs - x0:xe - x0] = m[ys - wy:ye - wy, xs - wx:xe - wx]
    return box


def _density_floor(wand, hub, cz, hu_floor):
    """The adaptive density floor: ``min(hu_floor, (nodule + lung) / 2)``, nodule = the 25th percentile HU inside
    the centre slice's (``cz``) wand mask (eroded by 1 px to drop the partial-volume rim), lung = the 25th
    percentile HU of the box ``hub`` outside the wand masks; ``hu_floor`` when either is not there or the
    nodule is not denser."""
    floor = float(hu_floor)
    if not wand[cz].any() or wand.all():
        return floor
    inner = wand[cz]
    er = ndimage.binary_erosion(inner)               # drop the partial-volume rim
    if er.sum() >= 5:
        inner = er
    nod = float(np.percentile(hub[cz][inner], 25))
    bg = float(np.percentile(hub[~wand], 25))
    if nod > bg:
        floor = min(floor, 0.5 * (nod + bg))
    return floor


def _fill_holes_per_slice(box):
    """``box`` with the enclosed holes of each slice filled."""
    for k in range(box.shape[0]):
        if box[k].any():
            box[k] = ndimage.binary_fill_holes(box[k])
    return box


def _center_component(box, cb, R, spacing_zyx, rf):
    """The 3-D component (26-connectivity) of ``box`` holding the centre voxel ``cb``. When the centre is not in
    the box: the nearest component within R (mm) of it, if any, plus a disc of radius ``rf`` px around the
    centre on its slice (the centre voxel is always labelled)."""
    lab, n = ndimage.label(box, structure=np.ones((3, 3, 3), dtype=bool))
    keep = lab[tuple(cb)]
    if keep > 0:
        return lab == keep
    out = np.zeros_like(box)
    if n > 0:
        pts = np.argwhere(lab > 0)
        d2 = (((pts - cb) * np.array(spacing_zyx)) ** 2).sum(axis=1)
        j = int(np.argmin(d2))
        if d2[j] <= R * R:
            out = lab == lab[tuple(pts[j])]
    yy, xx = np.ogrid[:box.shape[1], :box.shape[2]]
    out[cb[0]] |= (yy - cb[1]) ** 2 + (xx - cb[2]) ** 2 <= rf * rf
    return out


def wand_nodule_mask(hu, center_zyx, diameter_mm, spacing_zyx, three_slice=False, hu_floor=-500, **kw):
    """Wand label of one nodule as a full-size bool (Z, Y, X) mask. Same arguments as ``wand_nodule_box``
    (which returns the label as a small box; prefer it for large volumes)."""
    box, slices = wand_nodule_box(hu, center_zyx, diameter_mm, spacing_zyx, three_slice=three_slice,
                                  hu_floor=hu_floor, **kw)
    out = np.zeros(np.shape(hu), dtype=bool)
    out[slices] = box
    return out
