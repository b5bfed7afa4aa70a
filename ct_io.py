"""Reading CT scans and their geometry: the one HU reader and the one world <-> voxel conversion.

Every stage and test goes through this module:
- ``read_mhd(path)``: a LUNA16 ``.mhd/.raw`` volume with SimpleITK.
- ``read_image(path)``: any CT volume file SimpleITK reads (.mhd/.mha, .nii/.nii.gz, .nrrd/.nhdr); NIfTI's
  RAS orientation comes back as ITK's LPS origin and direction (SimpleITK converts), like every other format.
- ``read_dicom_series(folder)``: a DICOM series with pydicom (slices sorted along the slice normal,
  RescaleSlope/Intercept, padding conventions, several series in one folder told apart by
  SeriesInstanceUID, gaps in z refused or resampled, non-CT series refused).
- ``world_to_voxel`` / ``voxel_to_world``: ITK's geometry, world = origin + D @ (spacing * index), with
  origin, spacing and direction in ITK's (x, y, z) order and voxel indices in this project's (z, y, x).
- ``read_scan_h5(path)``: a stage-1 per-scan file (``preprocess.py``'s output) as a dict.

Arrays are (z, y, x) everywhere; ITK's (x, y, z) vectors are converted here, at the reading boundary.
Errors about a file are raised as ``ScanError`` with one line naming the file and the problem.
"""
import glob
import os
from dataclasses import dataclass, field

import numpy as np

HU_AIR = -1024          # value given to padding / outside-field-of-view voxels
HU_MAX = 3071           # upper end of the 12-bit CT range


class ScanError(Exception):
    """A scan that cannot be read or used; the message names the file and the problem."""


@dataclass
class Scan:
    hu: np.ndarray                    # int16 (Z, Y, X)
    origin: tuple                     # world position of voxel (0, 0, 0), mm, (x, y, z)
    spacing: tuple                    # mm, (x, y, z)
    direction: tuple                  # 9 floats, row-major 3x3, columns = directions of the x, y, z index axes
    seriesuid: str
    patient_id: str = ""
    source: str = ""                  # "luna16" / "lidc" / "scans" (preprocess.py's DATASET)
    path: str = ""
    warnings: list = field(default_factory=list)
    annotated: bool = True            # False: no annotation file was given (own scans): no truth, not "no nodules"
    resampled_from: tuple = None      # the stored direction, when to_axial resampled a non-axial volume


# ----------------------------------------------------------------------------- geometry

def _geometry(origin, spacing, direction):
    o = np.asarray(origin, dtype=np.float64).reshape(3)
    s = np.asarray(spacing, dtype=np.float64).reshape(3)
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return o, s, d


def voxel_to_world(zyx, origin, spacing, direction):
    """Voxel index (z, y, x), (3,) or (N, 3), possibly fractional -> world (x, y, z) in mm."""
    o, s, d = _geometry(origin, spacing, direction)
    zyx = np.asarray(zyx, dtype=np.float64)
    ijk = zyx[..., ::-1]                              # (x, y, z) index order
    return o + (ijk * s) @ d.T


def world_to_voxel(xyz, origin, spacing, direction):
    """World (x, y, z) in mm, (3,) or (N, 3) -> fractional voxel index (z, y, x); round to get the voxel."""
    o, s, d = _geometry(origin, spacing, direction)
    xyz = np.asarray(xyz, dtype=np.float64)
    ijk = np.linalg.solve(d, (xyz - o).T if xyz.ndim > 1 else (xyz - o)).T / s
    return ijk[..., ::-1]


def is_axial(direction, tol=1e-3):
    """Whether the index axes run along world x, y, z (each possibly flipped): the only geometry the stages
    assume. Sheared, oblique, tilted or sagittally / coronally stored volumes are not."""
    d = np.asarray(direction, np.float64).reshape(3, 3)
    return bool(np.allclose(np.abs(d), np.eye(3), atol=tol))


def to_axial(scan):
    """``scan`` itself when it is axial (is_axial), else resampled (SimpleITK, linear) onto an axial grid with
    identity direction over the same world extent: each world axis gets the spacing of the index axis most
    along it, voxels outside the source are air (-1024 HU). A line in ``scan.warnings`` says so. World
    positions (annotations, candidates) keep their meaning; only the voxel grid changes."""
    if is_axial(scan.direction):
        return scan
    import SimpleITK as sitk
    o, s, d = _geometry(scan.origin, scan.spacing, scan.direction)
    if abs(np.linalg.det(d)) < 1e-6:
        raise ScanError(f"{scan.path}: degenerate direction matrix {tuple(np.round(d.reshape(-1), 4))}")
    img = sitk.GetImageFromArray(scan.hu)
    img.SetOrigin(tuple(o))
    img.SetSpacing(tuple(s))
    img.SetDirection(tuple(d.reshape(-1)))
    size = np.array(scan.hu.shape[::-1], np.float64)                # (x, y, z) index extent
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (size - 1)
    world = o + (corners * s) @ d.T
    out_spacing = s[np.argmax(np.abs(d), axis=1)]                    # world axis <- the index axis along it
    lo, hi = world.min(axis=0), world.max(axis=0)
    out_size = [int(np.floor((b - a) / sp + 1e-6)) + 1 for a, b, sp in zip(lo, hi, out_spacing)]
    out = sitk.Resample(img, out_size, sitk.Transform(), sitk.sitkLinear, tuple(lo), tuple(out_spacing),
                        (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), -1024.0, sitk.sitkInt16)
    scan.hu = sitk.GetArrayFromImage(out)
    scan.resampled_from = tuple(float(v) for v in d.reshape(-1))
    scan.warnings.append(f"{scan.path}: not stored as axial slices (direction "
                         f"{tuple(float(v) for v in np.round(d.reshape(-1), 3))}): resampled to an axial grid "
                         f"{'x'.join(map(str, out_size))} of {'/'.join(f'{v:.2f}' for v in out_spacing)} mm")
    scan.origin, scan.spacing, scan.direction = tuple(lo), tuple(float(v) for v in out_spacing), (1.0, 0, 0, 0, 1.0,
                                                                                                    0, 0, 0, 1.0)
    return scan


# ----------------------------------------------------------------------------- HU

def to_hu(raw, slope=1.0, intercept=0.0, padding_value=None, slab=16):
    """Stored values -> int16 HU. Padding (the stored ``padding_value``, or anything below -1024 HU after the
    rescale: -2000 stored, -3024 HU, out-of-field circles) becomes air; values are clipped to [-1024, 3071].
    A volume is converted ``slab`` slices at a time, so the float intermediate stays small."""
    raw = np.asarray(raw)
    if raw.ndim == 3 and raw.shape[0] > slab:
        out = np.empty(raw.shape, dtype=np.int16)
        for z in range(0, raw.shape[0], slab):
            out[z:z + slab] = to_hu(raw[z:z + slab], slope, intercept, padding_value)
        return out
    hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if padding_value is not None:
        hu[raw == padding_value] = HU_AIR
    np.clip(hu, HU_AIR, HU_MAX, out=hu)
    return np.rint(hu).astype(np.int16)


# ----------------------------------------------------------------------------- LUNA16 .mhd

_MET_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
              "MET_ULONG": 8, "MET_LONG": 8, "MET_ULONG_LONG": 8, "MET_LONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}
MAX_ABS_HU = 32768       # stored values beyond this magnitude (or NaN, inf) are not CT numbers: the scan is refused


def _check_mhd_header(path):
    """The faults SimpleITK only reports as "ImageFileReader_Execute": a missing or short data file, zero
    spacing. Raises ScanError naming what is wrong; a header it cannot judge is left to SimpleITK."""
    try:
        with open(path, "r", errors="replace") as f:
            head = dict(ln.split("=", 1) for ln in f.read(65536).splitlines() if "=" in ln)
    except OSError as e:
        raise ScanError(f"{path}: unreadable header ({e.strerror})") from None
    head = {k.strip(): v.strip() for k, v in head.items()}
    try:
        spacing = [float(v) for v in head.get("ElementSpacing", head.get("ElementSize", "1 1 1")).split()]
        dims = [int(v) for v in head.get("DimSize", "").split()]
    except ValueError:
        return
    if any(v <= 0 for v in spacing):
        raise ScanError(f"{path}: zero or negative spacing {tuple(spacing)} (ElementSpacing)")
    name = head.get("ElementDataFile", "")
    if not name or name == "LOCAL" or name.startswith("LIST") or "%" in name:
        return
    data = os.path.join(os.path.dirname(path), name)
    if not os.path.isfile(data):
        raise ScanError(f"{path}: data file {name} not found")
    if head.get("CompressedData", "False").lower() == "true" or head.get("ElementType") not in _MET_BYTES or not dims:
        return
    expected = int(np.prod(dims)) * _MET_BYTES[head["ElementType"]] * int(head.get("ElementNumberOfChannels", "1"))
    actual = os.path.getsize(data) - max(int(head.get("HeaderSize", "0") or 0), 0)
    if actual < expected:
        raise ScanError(f"{path}: data file {name} is truncated: {actual} bytes, expected {expected} "
                        f"({' x '.join(map(str, dims))} {head['ElementType']})")


def _check_nifti_length(path):
    """A NIfTI-1 file whose voxel data ends early (ITK reads the missing part as 0 HU): ScanError naming the
    bytes found and expected. .nii.gz is decompressed to count (a cut gzip stream is refused too); a header
    that is not NIfTI-1 is left to SimpleITK."""
    import gzip
    import struct
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(348)
            if len(head) < 348:
                raise ScanError(f"{path}: truncated NIfTI header ({len(head)} of 348 bytes)")
            order = "<" if struct.unpack("<i", head[:4])[0] == 348 else ">"
            if struct.unpack(order + "i", head[:4])[0] != 348:
                return
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            n = int(np.prod([max(int(d), 1) for d in dims[1:1 + max(min(int(dims[0]), 7), 0)]]))
            expected = offset + n * max(int(bitpix), 8) // 8
            actual = 348
            while True:
                block = f.read(1 << 22)
                if not block:
                    break
                actual += len(block)
    except (OSError, EOFError) as e:                  # gzip: "Compressed file ended before the end-of-stream ..."
        raise ScanError(f"{path}: truncated or corrupt file ({' '.join(str(e).split())[:160]})") from None
    if actual < expected:
        raise ScanError(f"{path}: voxel data is truncated: {actual} bytes, expected {expected} "
                        f"({' x '.join(str(d) for d in dims[1:1 + int(dims[0])])}, {bitpix} bits)")


IMAGE_EXTENSIONS = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd", ".nhdr")   # volume files read_image takes


def image_id(path):
    """A volume file's scan id: its name without the extension (``a/b/scan.nii.gz`` -> ``scan``)."""
    name = os.path.basename(path)
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return os.path.splitext(name)[0]


def read_mhd(path):
    """A LUNA16 scan (.mhd header + .raw data, already HU) -> Scan."""
    return read_image(path, source="luna16")


def read_image(path, source="scans"):
    """A CT volume file SimpleITK reads (.mhd/.mha, .nii/.nii.gz, .nrrd/.nhdr), values in HU -> Scan with
    ITK's (LPS) origin, spacing and direction; the scan id (seriesuid) is the file name without extension.
    A 4-D file with one volume is read as 3-D; anything else that is not one 3-D grey-value volume is refused."""
    import SimpleITK as sitk
    if not os.path.isfile(path):
        raise ScanError(f"{path}: file not found")
    if path.lower().endswith(".mhd"):
        _check_mhd_header(path)
    if path.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_length(path)
    try:
        img = sitk.ReadImage(path)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "rror" in ln or "xception" in ln or "read" in ln.lower()), first[-1] if first else "")
        raise ScanError(f"{path}: unreadable image ({detail.strip()[:200]})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ScanError(f"{path}: {img.GetNumberOfComponentsPerPixel()} values per voxel: not a grey-value CT volume")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])     # a 4-D NIfTI of one volume
    if img.GetDimension() != 3:
        raise ScanError(f"{path}: expected a 3-D volume, got {img.GetDimension()}-D")
    arr = sitk.GetArrayFromImage(img)              # (z, y, x)
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~(np.abs(arr) <= MAX_ABS_HU)))      # NaN compares False: counted too
        if bad:
            raise ScanError(f"{path}: {bad} of {arr.size} voxels are NaN, infinite or beyond +-{MAX_ABS_HU} HU")
    seriesuid = image_id(path)
    return to_axial(Scan(hu=to_hu(arr), origin=tuple(img.GetOrigin()), spacing=tuple(img.GetSpacing()),
                         direction=tuple(img.GetDirection()), seriesuid=seriesuid, patient_id=seriesuid,
                         source=source, path=path))


# ----------------------------------------------------------------------------- DICOM

def _dicom_headers(folder):
    import pydicom
    files = sorted(f for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(f))
    headers, bad = [], []
    for f in files:
        if os.path.basename(f).upper() == "DICOMDIR":   # a media directory (hospital exports), not an image
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:                      # not DICOM, truncated header, ...
            if f.lower().endswith(".dcm"):
                bad.append(f"{os.path.basename(f)}: {type(e).__name__}")
            continue
        if "SOPClassUID" in ds and not hasattr(ds, "ImagePositionPatient"):
            continue                                # not an image (e.g. a structured report)
        headers.append((f, ds))
    return headers, bad


def dicom_series_in_folder(folder):
    """{SeriesInstanceUID: number of image files} of the DICOM images under ``folder`` (headers only)."""
    headers, _ = _dicom_headers(folder)
    out = {}
    for _, ds in headers:
        uid = str(ds.get("SeriesInstanceUID", ""))
        out[uid] = out.get(uid, 0) + 1
    return out


def read_dicom_series(folder, series_uid=None, allow_z_gaps=False):
    """A DICOM CT series (one folder, or a folder holding several series) -> Scan in HU.

    Slices are sorted by their position along the slice normal. When several series share the folder the
    one named ``series_uid`` is read, else the CT series with the most slices (the others are reported in
    ``Scan.warnings``). Corrupt files, non-CT series, inconsistent slices raise ScanError;
    so does a gap in z (missing slices), unless ``allow_z_gaps``: the slices are then resampled (linearly,
    from their true positions) onto an even grid of the median slice step."""
    headers, bad = _dicom_headers(folder)
    if bad:
        raise ScanError(f"{folder}: corrupt DICOM file(s): {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    if not headers:
        raise ScanError(f"{folder}: no DICOM image found")
    uid, items, warnings = _pick_series(folder, headers, series_uid)
    first = items[0][1]
    if str(first.get("Modality", "")) != "CT":
        raise ScanError(f"{folder}: not a CT series (Modality {first.get('Modality', '?')})")
    _check_grey_ct(folder, first)
    items, along, pos, (row, col, normal), dz = _sorted_slices(folder, items)
    gap = _gap(folder, along, dz)
    if gap and not allow_z_gaps:
        raise ScanError(f"{gap}; refused (ALLOW_Z_GAPS=1 resamples onto an even grid)")
    hu = _pixels_hu(items, int(first.Rows), int(first.Columns))
    if gap:
        hu = _resample_z(hu, along - along[0], dz)
        warnings.append(f"{gap}; resampled onto {hu.shape[0]} slices {dz:.2f} mm apart")
    ps = [float(v) for v in first.PixelSpacing]     # (row spacing = dy, column spacing = dx)
    step, dz = _slice_step(pos, normal, dz)           # along the normal, or tilted (gantry tilt: sheared)
    direction = tuple(np.stack([row, col, step], axis=1).reshape(-1))
    return to_axial(Scan(hu=hu, origin=tuple(pos[0]), spacing=(ps[1], ps[0], dz), direction=direction,
                         seriesuid=uid, patient_id=str(first.get("PatientID", "")), source="lidc", path=folder,
                         warnings=warnings))


def _slice_step(pos, normal, dz):
    """The direction and length of one slice step -> (unit vector, mm): the slice normal and ``dz``, unless the
    positions move sideways as well (a gantry-tilted series), then the true step from first to last slice."""
    if len(pos) < 2:
        return normal, dz
    total = pos[-1] - pos[0]
    sideways = total - (total @ normal) * normal
    if np.linalg.norm(sideways) / (len(pos) - 1) < 1e-3 * max(dz, 1e-6):
        return normal, dz
    step = total / (len(pos) - 1)
    return step / np.linalg.norm(step), float(np.linalg.norm(step))


_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"     # SOP classes 1.2.840.10008.5.1.4.1.1.7[.x]


def _check_grey_ct(folder, ds):
    """A series of screenshots (secondary capture) or colour images is no CT volume: one line saying which."""
    samples, photometric = int(ds.get("SamplesPerPixel", 1) or 1), str(ds.get("PhotometricInterpretation", ""))
    if str(ds.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE):
        raise ScanError(f"{folder}: a secondary-capture series (screenshots, {photometric or 'no photometry'}), "
                        f"not CT image data")
    if samples != 1 or (photometric and not photometric.startswith("MONOCHROME")):
        raise ScanError(f"{folder}: {samples} values per pixel ({photometric}): a colour image, not grey-value CT")


def _pick_series(folder, headers, series_uid):
    """The series to read among ``headers`` [(file, header)]: ``series_uid``, else the CT series with the most
    slices -> (uid, its [(file, header)], warnings)."""
    series = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    warnings = []
    if series_uid is not None:
        if series_uid not in series:
            raise ScanError(f"{folder}: series {series_uid} not found (found {len(series)} series)")
        return series_uid, series[series_uid], warnings
    ct = {u: s for u, s in series.items() if str(s[0][1].get("Modality", "")) == "CT"}
    if not ct:
        mods = sorted({str(s[0][1].get("Modality", "?")) for s in series.values()})
        raise ScanError(f"{folder}: not a CT series (Modality {', '.join(mods)})")
    uid = max(ct, key=lambda u: len(ct[u]))
    if len(series) > 1:
        warnings.append(f"{folder}: {len(series)} series in folder, read {uid} ({len(series[uid])} slices)")
    return uid, series[uid], warnings


def _sorted_slices(folder, items):
    """The slices sorted along the slice normal -> (items, position along the normal (mm), positions (N, 3),
    (row, column, normal) cosines, slice step dz (median step; SliceThickness for one slice))."""
    first = items[0][1]
    try:
        orient = np.array([float(v) for v in first.ImageOrientationPatient])
        row, col = orient[:3], orient[3:]
        normal = np.cross(row, col)
        pos = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    except (AttributeError, ValueError) as e:
        raise ScanError(f"{folder}: missing or bad geometry tags ({e})") from None
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    items = [items[i] for i in order]
    along, pos = along[order], pos[order]
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        raise ScanError(f"{folder}: {int(np.sum(steps < 1e-3))} duplicate slice position(s)")
    dz = float(np.median(steps)) if len(items) > 1 else float(first.get("SliceThickness", 1.0))
    return items, along, pos, (row, col, normal), dz


def _gap(folder, along, dz):
    """One line describing the gaps in z (steps over 1.5 dz: missing slices), or "" when there are none."""
    steps = np.diff(along)
    gaps = np.nonzero(steps > 1.5 * dz)[0]
    if not len(gaps):
        return ""
    return (f"{folder}: {len(gaps)} gap(s) in z, first after slice {gaps[0]} ({steps[gaps[0]]:.2f} mm "
            f"vs {dz:.2f} mm, about {int(round(steps[gaps[0]] / dz)) - 1} slice(s) missing)")


def _pixels_hu(items, rows, cols):
    """The slices' pixel data in HU (RescaleSlope/Intercept, PixelPaddingValue) -> int16 (Z, Y, X); each slice
    must be ``rows`` x ``cols``."""
    import pydicom
    hu = np.empty((len(items), rows, cols), dtype=np.int16)
    for k, (f, _) in enumerate(items):
        try:
            ds = pydicom.dcmread(f)
            raw = ds.pixel_array
        except Exception as e:
            raise ScanError(f"{f}: unreadable pixel data ({type(e).__name__}: {str(e)[:120]})") from None
        if raw.shape != (rows, cols):
            raise ScanError(f"{f}: slice size {raw.shape} differs from the series' {(rows, cols)}")
        pad = ds.get("PixelPaddingValue", None)
        hu[k] = to_hu(raw, float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0)),
                      int(pad) if pad is not None else None)
    return hu


def _resample_z(hu, z_mm, dz):
    """Slices at positions ``z_mm`` (increasing, z_mm[0] = 0) -> slices every ``dz`` mm from 0, linear in z."""
    grid = np.arange(int(np.floor(z_mm[-1] / dz + 1e-6)) + 1) * dz
    hi = np.clip(np.searchsorted(z_mm, grid, side="right"), 1, len(z_mm) - 1)
    lo = hi - 1
    w = ((grid - z_mm[lo]) / (z_mm[hi] - z_mm[lo])).astype(np.float32)[:, None, None]
    out = np.empty((len(grid),) + hu.shape[1:], dtype=np.int16)
    for k in range(len(grid)):
        out[k] = np.rint(hu[lo[k]] * (1 - w[k]) + hu[hi[k]] * w[k])
    return out


# ----------------------------------------------------------------------------- stage-1 files

def read_scan_h5(path, arrays=("hu", "lung_mask", "nodule_mask")):
    """A stage-1 per-scan file -> dict with the requested arrays, ``nodules`` (structured array) and ``attrs``."""
    import tables
    with tables.open_file(path, "r") as h5:
        out = {name: h5.get_node("/" + name).read() for name in arrays}
        out["nodules"] = h5.root.nodules.read()
        a = h5.root._v_attrs
        out["attrs"] = {k: a[k] for k in a._v_attrnamesuser}
    return out


def read_stage1(path, arrays=("hu", "lung_mask", "nodule_mask")):
    """read_scan_h5 for the stages that read stage-1 files (5, 6): a missing, truncated or corrupt file, or
    arrays that are not 3-D or differ in shape, raise ScanError with one line naming the file and the problem."""
    import tables
    if not os.path.isfile(path):
        raise ScanError(f"{path}: no such stage-1 file")
    try:
        is_hdf5 = tables.is_hdf5_file(path)
    except Exception:
        is_hdf5 = False
    if not is_hdf5:
        raise ScanError(f"{path}: not an HDF5 file (corrupt or truncated)")
    try:
        scan = read_scan_h5(path, arrays=arrays)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ScanError(f"{path}: unreadable stage-1 file ({type(e).__name__}: {first})") from None
    shapes = {k: scan[k].shape for k in arrays}
    if len(set(shapes.values())) > 1 or any(len(v) != 3 for v in shapes.values()):
        raise ScanError(f"{path}: arrays differ in shape or are not 3-D: {shapes}")
    return scan


# One row per annotated nodule in a stage-1 file (``/nodules``). Excluded annotations (LUNA16's
# annotations_excluded.csv) are listed with excluded=1 and are NOT drawn in /nodule_mask.
NODULE_DTYPE = np.dtype([
    ("index", np.int32),            # label k of this nodule in /nodule_mask (1-based)
    ("center_z", np.float32), ("center_y", np.float32), ("center_x", np.float32),   # voxel (z, y, x)
    ("world_x", np.float64), ("world_y", np.float64), ("world_z", np.float64),      # mm
    ("diameter_mm", np.float32),
    ("n_readers", np.int8),         # LIDC readers who marked it; -1 if unknown
    ("label_source", "S16"),        # b"wand", b"consensus", b"sphere"
    ("excluded", np.uint8),
])


def write_scan_h5(path, scan, lung_mask, nodule_mask, nodules, constants=None):
    """Write a stage-1 file atomically: to ``path + '.tmp'``, read back and compared with what was written
    (a full disk can fail silently at close), then renamed. A failed write raises ScanError and leaves no
    file behind. ``nodules``: array of NODULE_DTYPE."""
    import runfiles
    arrays = (("hu", scan.hu.astype(np.int16)), ("lung_mask", lung_mask.astype(np.uint8)),
              ("nodule_mask", nodule_mask.astype(np.uint8)))
    nodules = np.asarray(nodules, dtype=NODULE_DTYPE)
    try:
        with runfiles.atomic(path) as tmp:
            _write_h5(tmp, scan, arrays, nodules, constants)
            _check_read_back(tmp, scan, arrays, nodules)
    except Exception as e:                          # disk full, I/O error, HDF5 error: nothing left behind
        import shutil
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20
        raise ScanError(f"{path}: writing failed, nothing written ({runfiles.one_line(e, 200)}; "
                        f"{free:.1f} MiB free there)") from None


def _write_h5(tmp, scan, arrays, nodules, constants):
    """The stage-1 file's arrays, /nodules table and attributes written to ``tmp`` (closed even on failure)."""
    import json
    import tables
    # blosc's LZ4: on a 512 x 512 x 160 scan 0.3 s to write and 0.08 s to read, 43 MiB; zstd level 5 gave
    # 36 MiB in 4.9 s / 0.5 s (benchmarks/RESULTS.md, "Speed"). Every later stage reads these files.
    filters = tables.Filters(complevel=5, complib="blosc:lz4", shuffle=True)
    h5 = tables.open_file(tmp, "w")
    try:
        for name, arr in arrays:
            h5.create_carray("/", name, obj=arr, filters=filters, chunkshape=(1,) + arr.shape[1:])
        h5.create_table("/", "nodules", nodules, title="annotated nodules")
        a = h5.root._v_attrs
        a.seriesuid, a.patient_id, a.source = scan.seriesuid, scan.patient_id, scan.source
        a.annotated = int(scan.annotated)           # 0: no annotations were given: no truth, not "no nodules"
        a.origin = np.asarray(scan.origin, np.float64)
        a.spacing = np.asarray(scan.spacing, np.float64)
        a.direction = np.asarray(scan.direction, np.float64)
        a.source_path = scan.path
        a.constants = json.dumps(constants or {}, default=str)
        h5.close()
    finally:
        try:
            if h5.isopen:
                h5.close()
        except Exception:                           # closing flushes, and the disk may still be full
            pass


def _check_read_back(tmp, scan, arrays, nodules):
    """Read ``tmp`` back with h5py and compare it with what was written (OSError naming what differs). h5py,
    not PyTables: PyTables, opening a damaged file, can leave it open (on a full disk, its space stays held)."""
    import h5py
    import hdf5plugin  # noqa: F401  (blosc for h5py)
    with h5py.File(tmp, "r") as f:
        bad = [name for name, arr in arrays if not np.array_equal(f[name][()], arr)]
        bad += [] if np.array_equal(f["nodules"][()], nodules) else ["nodules"]
        uid = f.attrs.get("seriesuid")
        bad += [] if (uid.decode() if isinstance(uid, bytes) else str(uid)) == scan.seriesuid else ["attributes"]
    if bad:
        raise OSError(f"{', '.join(bad)} read back differently")
