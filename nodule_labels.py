"""Nodule labels of a scan: each annotated nodule drawn into a (Z, Y, X) label volume (k = nodule k) and
listed as a row of ct_io.NODULE_DTYPE (stage 1's /nodule_mask and /nodules).

    mask, rows = label_nodules(scan, found, LabelSettings.from_config(cfg))

``found``: the scan's annotations as dicts (world (x, y, z) mm, diameter mm, n_readers, excluded, and for LIDC
the readers' ``consensus`` mask), as annotations.read_luna16_annotations and annotations.lidc_nodules give them.
A label is drawn by the magic wand (cell_magic_wand.wand_nodule_box), from the LIDC consensus mask, or as a
sphere of the annotated diameter.
"""
from dataclasses import dataclass

import numpy as np

from ct_io import NODULE_DTYPE, ScanError, world_to_voxel

METHODS = ("wand", "consensus", "sphere")


@dataclass(frozen=True)
class LabelSettings:
    """How nodules are drawn (stage 1's constants LABELS, THREE_SLICE_LABELS, MIN_DIAMETER_MM, WAND_*)."""
    method: str = "wand"                        # "wand", "consensus" (LIDC; a sphere where none), "sphere"
    three_slice: bool = False                   # thesis rule: only slices c-1, c, c+1 around the centre
    min_diameter_mm: float = 0.0                # only nodules larger than this are drawn (the others listed)
    wand_hu_floor: float = -500                 # wand: voxels below this HU are removed
    wand_adaptive_floor: bool = True            # wand: that floor lowered for faint nodules
    wand_thesis_radius: bool = False            # wand: the thesis's max radius bug

    @classmethod
    def from_config(cls, cfg):
        """From stage 1's settings (a dict with LABELS, THREE_SLICE_LABELS, ...)."""
        return cls(method=cfg["LABELS"], three_slice=cfg["THREE_SLICE_LABELS"],
                   min_diameter_mm=cfg["MIN_DIAMETER_MM"], wand_hu_floor=cfg["WAND_HU_FLOOR"],
                   wand_adaptive_floor=cfg["WAND_ADAPTIVE_FLOOR"], wand_thesis_radius=cfg["WAND_THESIS_RADIUS"])


def sphere_mask(shape, center_zyx, diameter_mm, spacing_zyx):
    """Voxels within diameter/2 mm of the centre, as (box, slices): ``box`` bool, ``mask[slices]`` its region."""
    r = diameter_mm / 2.0
    c = np.asarray(center_zyx, dtype=np.float64)
    s = np.asarray(spacing_zyx, dtype=np.float64)
    lo = np.maximum(np.floor(c - r / s).astype(int), 0)
    hi = np.maximum(np.minimum(np.ceil(c + r / s).astype(int) + 1, shape), lo)
    g = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    d2 = sum(((g[i] - c[i]) * s[i]) ** 2 for i in range(3))
    return d2 <= r * r, tuple(slice(a, b) for a, b in zip(lo, hi))


def nodule_row(index, center_zyx, world_xyz, diameter, n_readers, source, excluded):
    """One /nodules row (NODULE_DTYPE)."""
    row = np.zeros((), dtype=NODULE_DTYPE)
    row["index"] = index
    row["center_z"], row["center_y"], row["center_x"] = center_zyx
    row["world_x"], row["world_y"], row["world_z"] = world_xyz
    row["diameter_mm"], row["n_readers"], row["label_source"], row["excluded"] = diameter, n_readers, source, excluded
    return row


def check_inside(scan, center_zyx, world_xyz):
    """ScanError when an annotation's centre voxel lies outside the scan's volume."""
    if np.any(np.round(center_zyx) < 0) or np.any(np.round(center_zyx) > np.array(scan.hu.shape) - 1):
        x, y, z = world_xyz
        raise ScanError(f"{scan.path}: annotation at world ({x:.1f}, {y:.1f}, {z:.1f}) mm lies outside the volume "
                        f"(voxel z,y,x = {np.round(center_zyx, 1).tolist()}, shape {list(scan.hu.shape)})")


def _draw_box(scan, nod, center, method, s):
    """The label of one nodule as (box, slices) by ``method``: the wand, its consensus mask or a sphere; with
    ``s.three_slice`` only the slices c-1, c, c+1 (the wand applies that rule itself)."""
    from cell_magic_wand import wand_nodule_box
    spacing_zyx = tuple(scan.spacing)[::-1]
    if method == "wand":
        box, where = wand_nodule_box(scan.hu, center, nod["diameter"], spacing_zyx,
                                     three_slice=s.three_slice, hu_floor=s.wand_hu_floor,
                                     adaptive_floor=s.wand_adaptive_floor, thesis_radius=s.wand_thesis_radius)
    elif method == "consensus":
        box, (z0, y0, x0) = nod["consensus"]
        where = (slice(z0, z0 + box.shape[0]), slice(y0, y0 + box.shape[1]), slice(x0, x0 + box.shape[2]))
    elif method == "sphere":
        box, where = sphere_mask(scan.hu.shape, center, nod["diameter"], spacing_zyx)
    else:
        raise ValueError(f"LABELS must be 'wand', 'consensus' or 'sphere', not {s.method!r}")
    if s.three_slice and method != "wand":
        c = int(round(center[0])) - where[0].start
        box = box.copy()
        box[:max(c - 1, 0)] = False
        box[c + 2:] = False
    return box, where


def label_nodules(scan, found, settings=None):
    """Draw the labels. ``found``: list of dicts with world (x, y, z), diameter, n_readers, excluded and
    optionally ``consensus`` = (bool mask, (z0, y0, x0)) in the scan's voxel grid; ``settings``: a
    LabelSettings (default LabelSettings()). Excluded nodules and those not above min_diameter_mm are listed,
    not drawn; "consensus" falls back to a sphere for a nodule without a consensus mask. Returns (mask, rows)."""
    s = LabelSettings() if settings is None else settings
    mask = np.zeros(scan.hu.shape, dtype=np.uint8)
    rows = []
    for k, nod in enumerate(found, start=1):
        center = world_to_voxel(nod["world"], scan.origin, scan.spacing, scan.direction)
        check_inside(scan, center, nod["world"])
        method = s.method if not (s.method == "consensus" and "consensus" not in nod) else "sphere"
        draw = not nod["excluded"] and nod["diameter"] > s.min_diameter_mm
        if draw:
            box, where = _draw_box(scan, nod, center, method, s)
            region = mask[where]
            region[box & (region == 0)] = k
        rows.append(nodule_row(k, center, nod["world"], nod["diameter"], nod.get("n_readers", -1),
                               method if draw else "none", int(nod["excluded"])))
    return mask, np.array(rows, dtype=NODULE_DTYPE)
