"""Lung masks of a CT volume in HU: the thesis's algorithm and the refined default (stage 1's LUNG_MASK).

    mask = lung_mask(hu, spacing_xyz, direction, "refined", LungMaskSettings.from_config(cfg))

- "thesis": the thesis's per-slice algorithm with its numbers scaled to the slice size, computed for the whole
  volume at once (exact 1-D two-cluster K-means from a histogram, morphology over the stacked slices).
  Identical to the literal per-slice version ``lung_mask_thesis_reference``.
- "refined": air-like voxels inside the body, 3-D lung components only (no stomach or bowel gas, no outside
  air or table), trachea and main bronchi removed, a closing at the pleura and hole filling so that vessels
  and nodules touching the wall stay inside the mask.

Arrays are (Z, Y, X); the masks are uint8 (1 = lung).
"""
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

METHODS = ("refined", "thesis")


@dataclass(frozen=True)
class LungMaskSettings:
    """The refined mask's settings (stage 1's constants of the same names; millimetres, HU)."""
    air_hu: float = -400                        # lung/air threshold
    outside_air_hu: float = -970                # border-touching air regions with a lower mean HU are outside
    airway_hu: float = -950                     # mean HU below which a small inner air region is an airway
    airway_max_area_mm2: float = 700.0          # largest cross-section of trachea / main bronchus
    min_lung_fraction: float = 0.2              # 3-D air components below this share of the largest are not lung
    closing_mm: float = 6.0                     # closing radius at the pleura
    max_hole_mm2: float = 1500.0                # holes inside the lungs up to this area are filled
    max_dent_mm2: float = 1000.0                # dents of a lung's outline up to this area are filled
    min_dent_lung_mm2: float = 100.0            # lung regions of a slice smaller than this get no dents
    min_dent_radius_px: float = 1.0             # dents of a smaller inscribed radius (px) are left
    dent_compactness: float = 10.0              # a dent is filled only if area <= this x (inscribed radius)^2

    @classmethod
    def from_config(cls, cfg):
        """From stage 1's settings (a dict with AIR_HU, OUTSIDE_AIR_HU, ...)."""
        return cls(air_hu=cfg["AIR_HU"], outside_air_hu=cfg["OUTSIDE_AIR_HU"], airway_hu=cfg["AIRWAY_HU"],
                   airway_max_area_mm2=cfg["AIRWAY_MAX_AREA_MM2"], min_lung_fraction=cfg["MIN_LUNG_FRACTION"],
                   closing_mm=cfg["CLOSING_MM"], max_hole_mm2=cfg["MAX_HOLE_MM2"], max_dent_mm2=cfg["MAX_DENT_MM2"],
                   min_dent_lung_mm2=cfg["MIN_DENT_LUNG_MM2"], min_dent_radius_px=cfg["MIN_DENT_RADIUS_PX"],
                   dent_compactness=cfg["DENT_COMPACTNESS"])


def lung_mask(hu, spacing_xyz, direction, method="refined", settings=None):
    """Lung mask (uint8, Z, Y, X) of a scan by ``method`` ("refined" with ``settings``, a LungMaskSettings,
    default LungMaskSettings(); or "thesis"), computed in the canonical orientation (flipped-direction scans
    are flipped, masked, and flipped back: the thesis's row rules assume the patient's back at the bottom of
    the image)."""
    flips = canonical_flips(direction)
    view = np.flip(hu, flips) if flips else hu
    if method == "thesis":
        m = lung_mask_thesis(view)
    elif method == "refined":
        m = lung_mask_refined(view, tuple(spacing_xyz)[::-1], settings)
    else:
        raise ValueError(f"LUNG_MASK must be 'refined' or 'thesis', not {method!r}")
    return np.ascontiguousarray(np.flip(m, flips)) if flips else m


def canonical_flips(direction):
    """Array axes (z, y, x) to flip so the patient is seen in the usual orientation (direction cosines >= 0)."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return tuple(ax for ax, j in ((0, 2), (1, 1), (2, 0)) if d[j, j] < 0)


def _plane_structure(connectivity):
    """3-D structuring element connecting pixels within a slice only (4- or 8-connectivity)."""
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1] = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    return s


# ----------------------------------------------------------------------------- the thesis's

def _scaled(v, size):
    """A thesis pixel number (written for 512-pixel slices) scaled to a slice of ``size`` pixels."""
    return max(1, int(round(v * size / 512.0)))


def _kmeans2_thresholds(values, counts):
    """Exact 1-D two-cluster K-means on histograms: values (V,) sorted, counts (Z, V) -> threshold per row
    (mean of the two cluster centres of the split minimising the within-cluster sum of squares)."""
    n1 = np.cumsum(counts, axis=1, dtype=np.float64)
    s1 = np.cumsum(counts * values, axis=1, dtype=np.float64)
    n, s = n1[:, -1:], s1[:, -1:]
    n2, s2 = n - n1, s - s1
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((n1 > 0) & (n2 > 0), s1 ** 2 / n1 + s2 ** 2 / n2, -np.inf)
    k = np.argmax(between, axis=1)
    rows = np.arange(len(k))
    c1 = s1[rows, k] / np.maximum(n1[rows, k], 1)
    c2 = (s[:, 0] - s1[rows, k]) / np.maximum(n[:, 0] - n1[rows, k], 1)
    return (c1 + c2) / 2.0


def _thresholds_with_extra(vals, counts, extra_val, extra_n):
    """Two-cluster K-means threshold per slice for the histogram ``counts`` (Z, V) over ``vals`` plus
    ``extra_n`` samples at the non-integer value ``extra_val`` (the replaced max/min pixels)."""
    thr = np.empty(len(counts))
    for zi in range(len(counts)):
        pos = np.searchsorted(vals, extra_val[zi])
        v = np.insert(vals, pos, extra_val[zi])
        c = np.insert(counts[zi].astype(np.float64), pos, extra_n[zi])
        nz = c > 0
        thr[zi] = _kmeans2_thresholds(v[nz], c[nz][None, :])[0]
    return thr


def _square(vol, k, op):
    """Erosion (minimum_filter) or dilation (maximum_filter) of every slice with a k x k square, anchored
    as scikit-image anchors even-sized squares."""
    o = -1 if k % 2 == 0 else 0
    return op(vol, size=(1, k, k), origin=(0, o, o))


def lung_mask_thesis(hu, slab=32):
    """The thesis's lung mask (see _lung_mask_thesis_slab), ``slab`` slices at a time (bounded memory)."""
    return np.concatenate([_lung_mask_thesis_slab(hu[z:z + slab]) for z in range(0, hu.shape[0], slab)])


def _air_below_threshold(hu32, size):
    """The thesis's K-means step for every slice of ``hu32`` (int32, Z, Y, X) -> uint8 foreground (air). Per
    slice: values equal to the slice max/min are replaced by the central region's mean, a 2-cluster K-means on
    the central region gives the threshold, below = air. The K-means split and the threshold are invariant to
    the thesis's per-slice z-scoring, so they are computed on HU, exactly, from a histogram."""
    z = hu32.shape[0]
    a, b = _scaled(100, size), _scaled(400, size)
    mid = hu32[:, a:b, a:b].reshape(z, -1)
    mid_mean = mid.mean(axis=1)
    vmax = hu32.reshape(z, -1).max(axis=1)
    vmin = hu32.reshape(z, -1).min(axis=1)
    replaced_mid = (mid == vmax[:, None]) | (mid == vmin[:, None])
    lo, hi = int(mid.min()), int(mid.max())
    nv = hi - lo + 1
    rows = np.broadcast_to(np.arange(z)[:, None], mid.shape)
    counts = np.bincount((rows * nv + (mid - lo))[~replaced_mid], minlength=z * nv).reshape(z, nv)
    thr = _thresholds_with_extra(np.arange(lo, hi + 1, dtype=np.float64), counts, mid_mean,
                                 replaced_mid.sum(axis=1))
    replaced = (hu32 == vmax[:, None, None]) | (hu32 == vmin[:, None, None])
    return np.where(replaced, (mid_mean < thr)[:, None, None], hu32 < thr[:, None, None]).astype(np.uint8)


def _lung_mask_thesis_slab(hu):
    """The thesis's lung mask for every slice of ``hu`` (Z, Y, X) at once; the same result as the literal
    per-slice version ``lung_mask_thesis_reference``. Air below the K-means threshold (_air_below_threshold);
    erosion 4x4, dilation 10x10, regions kept by bounding box (not touching the top/bottom rows, smaller than
    the slice), union dilated 10x10."""
    size = min(hu.shape[1:])
    fg = _air_below_threshold(hu.astype(np.int32), size)
    e, d = _scaled(4, size), _scaled(10, size)
    fg = _square(fg, e, ndi.minimum_filter)
    fg = _square(fg, d, ndi.maximum_filter)
    labels, n = ndi.label(fg, structure=_plane_structure(8))
    keep = np.zeros(n + 1, dtype=bool)
    big, top, bottom = _scaled(475, size), _scaled(40, size), _scaled(472, size)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is not None:
            r0, r1, c0, c1 = sl[1].start, sl[1].stop, sl[2].start, sl[2].stop
            keep[i] = (r1 - r0 < big) and (c1 - c0 < big) and (r0 > top) and (r1 < bottom)
    return _square(keep[labels].astype(np.uint8), d, ndi.maximum_filter)


def lung_mask_thesis_reference(hu_slice):
    """The thesis's lung mask of ONE slice written literally (z-score, scikit-learn K-means, scikit-image
    morphology and regionprops), for verification and benchmarks only: the pipeline uses lung_mask_thesis."""
    from skimage import measure, morphology
    from sklearn.cluster import KMeans
    size = min(hu_slice.shape)
    a, b = _scaled(100, size), _scaled(400, size)
    img = hu_slice.astype(np.float64)
    img = (img - img.mean()) / (img.std() + 1e-12)
    middle = img[a:b, a:b]
    mean = middle.mean()
    vmax, vmin = img.max(), img.min()
    img[img == vmax] = mean
    img[img == vmin] = mean
    km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(middle.reshape(-1, 1))
    threshold = float(np.mean(km.cluster_centers_))
    thresh = np.where(img < threshold, 1.0, 0.0)
    e, d = _scaled(4, size), _scaled(10, size)
    dil = morphology.dilation(morphology.erosion(thresh, np.ones((e, e))), np.ones((d, d)))
    labels = measure.label(dil)
    mask = np.zeros(hu_slice.shape, dtype=np.uint8)
    for prop in measure.regionprops(labels):
        r0, c0, r1, c1 = prop.bbox
        if r1 - r0 < _scaled(475, size) and c1 - c0 < _scaled(475, size) and r0 > _scaled(40, size) and r1 < _scaled(472, size):
            mask[labels == prop.label] = 1
    return morphology.dilation(mask, np.ones((d, d))).astype(np.uint8)


# ----------------------------------------------------------------------------- refined

def _disc(radius_px):
    r = max(1, int(round(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy ** 2 + xx ** 2 <= r * r).astype(np.uint8)


def _components(slice_mask):
    """4-connected components of a 2-D uint8 mask -> (labels int32, n + 1 labels with 0 the background,
    areas (n + 1,), touches-the-border flags (n + 1,)). OpenCV's labelling (the same partition as
    scipy.ndimage.label with 4-connectivity, ~10x faster on 512 x 512 slices) without its statistics: areas by
    bincount and border flags from the four edges take half the time of connectedComponentsWithStats."""
    import cv2
    n, lab = cv2.connectedComponents(slice_mask, connectivity=4, ltype=cv2.CV_32S)
    area = np.bincount(lab.ravel(), minlength=n)
    border = np.zeros(n, dtype=bool)
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        border[edge] = True
    return lab, n, area, border


def fill_small_holes(mask, max_area_px):
    """Fill, slice by slice, the holes of ``mask`` (Z, Y, X bool) whose area is at most ``max_area_px``
    (a hole: a background region of the slice, 4-connected, that does not touch the slice's border). Computed
    within the mask's bounding box: outside it all is background connected to the slice's border, so a region
    touching the box's edge touches the border, and a hole lies inside the box whole."""
    out = mask.copy()
    box = _bounding_box(mask)
    if box is None:
        return out
    sub, osub = mask[box], out[box]
    for z in np.nonzero(sub.reshape(sub.shape[0], -1).any(axis=1))[0]:
        lab, n, area, border = _components(np.ascontiguousarray(~sub[z]).view(np.uint8))
        fill = (area <= max_area_px) & ~border
        fill[0] = False
        if fill.any():
            osub[z] |= fill[lab]
    return out


def _inner_air(hu, px_area, s):
    """The air regions of the refined mask before the closing -> bool (Z, Y, X): air-like voxels (< air_hu)
    not connected, within their slice, to the image border (outside air, table gap, field-of-view padding; a
    region touching the border but as dense as lung is kept: a small field of view can cut through the lungs);
    the 3-D components that are lungs (>= min_lung_fraction of the largest: drops stomach and bowel gas); small,
    nearly pure-air regions of a slice (trachea, main bronchi) removed. None when there is no inner air."""
    inner = np.zeros(hu.shape, dtype=bool)
    airway = np.zeros(hu.shape, dtype=bool)
    for z in range(hu.shape[0]):                                    # in-plane air regions, a slice at a time
        air = hu[z] < s.air_hu
        lab, n, area, border = _components(air.view(np.uint8))
        mean_hu = np.bincount(lab.ravel(), weights=hu[z].ravel(), minlength=n) / np.maximum(area, 1)
        outside = border & (mean_hu <= s.outside_air_hu)
        small_air = (area * px_area <= s.airway_max_area_mm2) & (mean_hu < s.airway_hu)
        outside[0] = small_air[0] = True
        np.logical_not(np.take(outside, lab), out=inner[z])
        if small_air[1:].any():
            np.take(small_air, lab, out=airway[z])
    box = _bounding_box(inner)
    if box is None:
        return None
    lab3, n3 = ndi.label(inner[box])                                # 3-D: lungs vs stomach / bowel gas
    size = np.bincount(lab3[inner[box]], minlength=n3 + 1)
    size[0] = 0
    lungs = size >= s.min_lung_fraction * size.max()
    lungs[0] = False
    out = np.zeros(hu.shape, dtype=bool)
    out[box] = np.take(lungs, lab3) & ~airway[box]                 # the mask's regions are whole air regions
    return out


def _bounding_box(mask):
    """The (z, y, x) slices of the smallest box holding every True voxel of ``mask``; None when there is none."""
    box = []
    for axis in range(3):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        if not len(hit):
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def lung_mask_refined(hu, spacing_zyx, settings=None):
    """The default lung mask of ``hu`` (Z, Y, X) with ``settings`` (a LungMaskSettings; default
    LungMaskSettings()): the inner air regions that are lungs (_inner_air); a closing of closing_mm at the
    pleura; holes (vessels, nodules) up to max_hole_mm2 filled; dents of each lung's outline up to
    max_dent_mm2 filled (larger nodules on the pleura)."""
    import cv2
    s = LungMaskSettings() if settings is None else settings
    sz, sy, sx = spacing_zyx
    px_area = sy * sx
    mask = _inner_air(hu, px_area, s)
    if mask is None:
        return np.zeros(hu.shape, dtype=np.uint8)
    kernel = _disc(s.closing_mm / sy)
    out = np.zeros(mask.shape, dtype=bool)
    for k, sl in _closing_windows(mask, kernel.shape[0] // 2):
        out[k][sl] = cv2.morphologyEx(mask[k][sl].view(np.uint8), cv2.MORPH_CLOSE, kernel)
    out = fill_small_holes(out, s.max_hole_mm2 / px_area)
    return fill_small_dents(out, s.max_dent_mm2 / px_area, s.min_dent_lung_mm2 / px_area,
                            s.dent_compactness, s.min_dent_radius_px).astype(np.uint8)


def _closing_windows(mask, r):
    """(slice index, in-plane window) of each non-empty slice of ``mask``: its mask's box widened by 2r + 1 px
    (clipped to the slice). A closing by a disc of radius ``r`` is zero outside the window and the same inside
    it as on the whole slice: within r of the window's edge the dilation is already zero."""
    pad = 2 * r + 1
    for k in np.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0]:
        rows, cols = np.nonzero(mask[k].any(axis=1))[0], np.nonzero(mask[k].any(axis=0))[0]
        yield k, (slice(max(rows[0] - pad, 0), rows[-1] + 1 + pad), slice(max(cols[0] - pad, 0), cols[-1] + 1 + pad))


def fill_small_dents(mask, max_area_px, min_region_px, compactness=10.0, min_radius_px=1.0):
    """Fill, slice by slice, the dents of ``mask`` (Z, Y, X bool): the connected parts of the convex hull of
    the slice's lungs (both together) outside the mask whose area is at most ``max_area_px`` and which are
    blobs, not slivers (area <= ``compactness`` x inscribed radius^2, inscribed radius >= ``min_radius_px``).
    A nodule on the pleura is a dent of the lung's outline that the closing cannot fill when it is larger than
    the closing's disc; with one hull around both lungs, the mediastinum, heart and spine form one large
    region that stays out. Lung regions of a slice smaller than ``min_region_px`` are not given dents. The hulls
    lie within the mask's bounding box: computed there."""
    out = mask.copy()
    box = _bounding_box(mask)
    if box is None:
        return out
    sub, osub = mask[box], out[box]
    for z in np.nonzero(sub.reshape(sub.shape[0], -1).any(axis=1))[0]:
        dent, sl = _hull_dent(np.ascontiguousarray(sub[z]), min_region_px)
        if dent is None:
            continue
        dlab, dn, darea, _ = _components(dent.view(np.uint8))
        if dn <= 1:
            continue
        inner = _inscribed_radius(dent, dlab, dn)
        keep = (darea <= max_area_px) & (darea <= compactness * inner ** 2) & (inner >= min_radius_px)
        keep[0] = False
        osub[z][sl] |= keep[dlab]
    return out


def _inscribed_radius(region, lab, n):
    """The largest Euclidean distance (px) from a pixel of each label of ``lab`` to the nearest pixel outside
    ``region`` (n labels, 0 = outside: 0): the inscribed radius, 1 = one pixel thick. OpenCV's exact distance
    transform, squared distances rounded to the integers they are, so the values equal scipy's
    distance_transform_edt to the last bit."""
    import cv2
    dist = cv2.distanceTransform(region.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    inside = lab > 0
    out = np.zeros(n)
    np.maximum.at(out, lab[inside], np.sqrt(np.rint(dist[inside].astype(np.float64) ** 2)))
    return out


def _hull_dent(mask2d, min_region_px):
    """(dent, sl): the convex hull of a slice's lung regions of at least ``min_region_px`` minus the mask,
    within the hull's bounding box ``sl``; (None, None) when the slice has no such region."""
    import cv2
    lab, n, area, _ = _components(mask2d.view(np.uint8))
    big = area >= min_region_px
    big[0] = False
    if not big.any():
        return None, None
    lungs = big[lab]
    ys, xs = np.nonzero(lungs)
    sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    crop = np.ascontiguousarray(lungs[sl], dtype=np.uint8)
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = np.zeros_like(crop)
    cv2.fillPoly(hull, [cv2.convexHull(np.concatenate(contours))], 1)
    return hull.astype(bool) & ~mask2d[sl], sl
