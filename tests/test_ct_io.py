"""ct_io: world <-> voxel against ITK itself, the .mhd reader, HU conversion, the DICOM reader on a real slice."""
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

import ct_io
import lung_mask

FLIP = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
OBLIQUE = tuple(np.array([[0.8660254, -0.5, 0], [0.5, 0.8660254, 0], [0, 0, 1]]).reshape(-1))


@pytest.mark.parametrize("direction", [IDENTITY, FLIP, OBLIQUE])
def test_world_voxel_matches_itk(direction):
    img = sitk.Image(40, 30, 20, sitk.sitkInt16)          # x, y, z sizes
    origin, spacing = (-120.5, 80.25, -300.0), (0.7, 0.8, 2.5)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    rng = np.random.default_rng(0)
    zyx = rng.uniform(0, 19, size=(10, 3))
    world = ct_io.voxel_to_world(zyx, origin, spacing, direction)
    for p, w in zip(zyx, world):
        expect = img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in p[::-1]))
        np.testing.assert_allclose(w, expect, atol=1e-9)
    np.testing.assert_allclose(ct_io.world_to_voxel(world, origin, spacing, direction), zyx, atol=1e-9)
    np.testing.assert_allclose(ct_io.world_to_voxel(world[0], origin, spacing, direction), zyx[0], atol=1e-9)


@pytest.mark.parametrize("direction", [IDENTITY, FLIP])
def test_mhd_bright_voxel_at_known_world_point(tmp_path, direction):
    """A voxel written at a known world point is found there by read_mhd + world_to_voxel."""
    arr = np.full((12, 30, 40), -1000, dtype=np.int16)
    arr[5, 7, 31] = 500
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin((10.0, -20.0, -100.0))
    img.SetSpacing((0.75, 0.75, 2.0))
    img.SetDirection(direction)
    world = img.TransformIndexToPhysicalPoint((31, 7, 5))
    path = str(tmp_path / "1.2.3.mhd")
    sitk.WriteImage(img, path)
    scan = ct_io.read_mhd(path)
    assert scan.seriesuid == "1.2.3" and scan.hu.shape == (12, 30, 40)
    z, y, x = np.round(ct_io.world_to_voxel(world, scan.origin, scan.spacing, scan.direction)).astype(int)
    assert scan.hu[z, y, x] == 500
    if direction == FLIP:   # x and y run backwards: ignoring the direction gives negative indices
        naive = (np.array(world) - scan.origin) / scan.spacing
        assert naive[0] < 0 and naive[1] < 0


def test_truncated_raw_is_a_clear_error(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((8, 16, 16), dtype=np.int16))
    path = str(tmp_path / "scan.mhd")
    sitk.WriteImage(img, path)
    raw = str(tmp_path / "scan.raw")
    with open(raw, "r+b") as f:
        f.truncate(os.path.getsize(raw) // 2)
    with pytest.raises(ct_io.ScanError, match="scan.mhd"):
        ct_io.read_mhd(path)


def test_to_hu_padding_conventions():
    raw = np.array([-2000, 0, 1024, 2000, 5000], dtype=np.int16)
    np.testing.assert_array_equal(ct_io.to_hu(raw, 1, -1024), [-1024, -1024, 0, 976, 3071])
    np.testing.assert_array_equal(ct_io.to_hu(np.array([-3024, -1000, 40]), 1, 0), [-1024, -1000, 40])
    np.testing.assert_array_equal(ct_io.to_hu(np.array([63536, 1000], dtype=np.uint16), 1, -1024, 63536),
                                  [-1024, -24])


@pytest.fixture()
def ct_small_dir(tmp_path):
    from pydicom.data import get_testdata_file
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "CT_small.dcm")
    return str(tmp_path)


def test_real_dicom_slice_hu_and_both_lungs(ct_small_dir):
    """pydicom's CT_small.dcm (a real thoracic slice, 128 x 128 around the spine): HU right, both lungs found."""
    scan = ct_io.read_dicom_series(ct_small_dir)
    assert scan.hu.shape == (1, 128, 128) and scan.source == "lidc"
    assert scan.spacing[:2] == pytest.approx((0.661468, 0.661468))
    hu = scan.hu[0]
    assert -1024 <= hu.min() < -800           # lung air
    assert 900 < hu.max() <= 3071              # bone
    assert -100 < np.median(hu) < 200           # soft tissue dominates this crop
    mask = lung_mask.lung_mask(scan.hu, scan.spacing, scan.direction)[0].astype(bool)
    from skimage import measure
    regions = measure.regionprops(measure.label(mask))
    assert len(regions) == 2                     # left and right lung
    left, right = sorted(regions, key=lambda r: r.centroid[1])
    assert left.centroid[1] < 40 and right.centroid[1] > 88 and min(left.area, right.area) > 600
    assert hu[mask].mean() < -500 and np.median(hu[~mask]) > -200
    assert not mask[60:, 40:90].any()           # spine and back muscles are not lung


def test_corrupt_dicom_named(ct_small_dir, tmp_path):
    with open(os.path.join(ct_small_dir, "broken.dcm"), "wb") as f:
        f.write(b"DICM" + os.urandom(64))
    with pytest.raises(ct_io.ScanError, match="corrupt DICOM.*broken.dcm"):
        ct_io.read_dicom_series(ct_small_dir)


def test_non_ct_series_refused(ct_small_dir):
    import pydicom
    path = os.path.join(ct_small_dir, "CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.Modality = "MR"
    ds.save_as(path)
    with pytest.raises(ct_io.ScanError, match="not a CT series"):
        ct_io.read_dicom_series(ct_small_dir)


def test_thesis_mask_vectorised_equals_per_slice_reference(ct_small_dir):
    """The whole-volume thesis mask equals the literal per-slice version (scikit-learn K-means, skimage)."""
    import cv2
    scan = ct_io.read_dicom_series(ct_small_dir)
    big = cv2.resize(scan.hu[0].astype(np.float32), (512, 512), interpolation=cv2.INTER_LINEAR)
    body = np.full((512, 512), -1000, np.float32)
    body[60:452, 60:452] = cv2.resize(big, (392, 392))    # a body inside outside air, so regions survive the rules
    vol = np.stack([body, np.roll(body, 7, axis=1), np.fliplr(body)]).astype(np.int16)
    fast = lung_mask.lung_mask_thesis(vol)
    ref = np.stack([lung_mask.lung_mask_thesis_reference(s) for s in vol])
    assert ref.sum() > 1000
    dice = 2 * np.sum(fast & ref) / (fast.sum() + ref.sum())
    assert dice >= 0.99      # scikit-learn's Lloyd iterations stop a hair off the exact 2-means split


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_a_truncated_nifti_is_refused_not_read_as_zeros(tmp_path, ext):
    """A NIfTI file cut in half: one line saying it is truncated (SimpleITK alone reads the missing half as 0 HU);
    the whole file reads back exactly."""
    import SimpleITK as sitk
    hu = (np.random.default_rng(0).random((20, 64, 64)) * 1000 - 1000).astype(np.int16)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing((0.7, 0.7, 2.0))
    whole, cut = str(tmp_path / f"whole{ext}"), str(tmp_path / f"cut{ext}")
    sitk.WriteImage(img, whole)
    data = open(whole, "rb").read()
    open(cut, "wb").write(data[:len(data) // 2])
    assert np.array_equal(ct_io.read_image(whole).hu, hu)
    with pytest.raises(ct_io.ScanError, match=f"^{cut}: .*truncated"):
        ct_io.read_image(cut)


def _ball_in_grid(shape, origin, spacing, direction, centre, radius=6.0):
    """int16 HU volume (Z, Y, X) of a stored grid (any direction, sheared too): a 100 HU ball of ``radius`` mm
    at world ``centre`` in -900 HU lung."""
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = ct_io.voxel_to_world(zyx.astype(float), origin, spacing, direction).reshape(*shape, 3)
    inside = ((world - np.asarray(centre)) ** 2).sum(-1) <= radius ** 2
    return np.where(inside, 100, -900).astype(np.int16)


def _ball_centre_world(scan):
    from scipy import ndimage
    c = np.array(ndimage.center_of_mass(scan.hu > -400))
    return ct_io.voxel_to_world(c, scan.origin, scan.spacing, scan.direction)


SHEARED = (1.0, 0.0, 0.0, 0.0, 1.0, 0.25, 0.0, 0.0, 0.97)           # z steps move along y: a 14-degree shear
SAGITTAL = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)            # index x along world y, y along z, z along x


@pytest.mark.parametrize("direction", [SHEARED, SAGITTAL], ids=["sheared", "sagittal"])
def test_a_volume_not_stored_axially_is_resampled_and_the_nodule_stays_at_its_world_point(tmp_path, direction):
    """A sheared direction matrix or slices stored along x: read onto an axial grid (identity direction, said in
    the scan's warnings); the ball lands at its world position within a voxel (it used to land 24 mm off)."""
    shape, origin, spacing = (40, 60, 50), (-20.0, -30.0, -40.0), (1.0, 1.0, 2.0)
    centre = ct_io.voxel_to_world(np.array([20.0, 30.0, 25.0]), origin, spacing, direction)
    img = sitk.GetImageFromArray(_ball_in_grid(shape, origin, spacing, direction, centre))
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    path = str(tmp_path / "scan.mha")
    sitk.WriteImage(img, path)
    scan = ct_io.read_image(path)
    assert ct_io.is_axial(scan.direction) and scan.resampled_from is not None
    assert any("resampled to an axial grid" in w for w in scan.warnings)
    assert np.linalg.norm(_ball_centre_world(scan) - centre) < 1.0


def test_an_axial_volume_flipped_or_not_is_read_as_stored(tmp_path):
    direction = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    hu = _ball_in_grid((20, 30, 30), (10.0, 10.0, 0.0), (1.0, 1.0, 2.0), direction, (-5.0, -5.0, 20.0))
    img = sitk.GetImageFromArray(hu)
    img.SetOrigin((10.0, 10.0, 0.0))
    img.SetSpacing((1.0, 1.0, 2.0))
    img.SetDirection(direction)
    sitk.WriteImage(img, str(tmp_path / "flipped.mha"))
    scan = ct_io.read_image(str(tmp_path / "flipped.mha"))
    assert np.array_equal(scan.hu, hu) and scan.direction == direction and not scan.warnings


def test_a_gantry_tilted_dicom_series_is_resampled_and_the_nodule_stays_at_its_world_point(tmp_path):
    """Slices whose positions also move sideways (gantry tilt, 15 degrees): read onto an axial grid, the ball at
    its world position within a voxel (read along the slice normal alone it landed far off)."""
    import pydicom
    from pydicom.data import get_testdata_file
    n, rows, cols, ps, dz, tilt = 30, 64, 64, 1.0, 2.0, np.tan(np.radians(15))
    origin = np.array([-32.0, -32.0, -30.0])
    step = np.array([0.0, dz * tilt, dz])                        # each slice 2 mm up and 0.54 mm along y
    direction = np.stack([[1.0, 0, 0], [0, 1.0, 0], step / np.linalg.norm(step)], axis=1).reshape(-1)
    centre = origin + np.array([30.0, 28.0, 0.0]) + 15 * step
    hu = _ball_in_grid((n, rows, cols), origin, (ps, ps, float(np.linalg.norm(step))), direction, centre)
    folder = tmp_path / "tilted"
    folder.mkdir()
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.Rows, ds.Columns, ds.PixelSpacing = rows, cols, [ps, ps]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(v) for v in origin + k * step]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.InstanceNumber, ds.SOPInstanceUID = k + 1, f"1.2.3.4.{k + 1}"
        ds.save_as(folder / f"{k:03d}.dcm")
    scan = ct_io.read_dicom_series(str(folder))
    assert ct_io.is_axial(scan.direction) and any("resampled to an axial grid" in w for w in scan.warnings)
    assert np.linalg.norm(_ball_centre_world(scan) - centre) < 1.0


@pytest.mark.parametrize("kind", ["rgb", "secondary_capture"])
def test_colour_and_secondary_capture_dicom_are_named_as_such(tmp_path, kind):
    import pydicom
    from pydicom.data import get_testdata_file
    folder = tmp_path / kind
    folder.mkdir()
    for k in range(2):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.SOPInstanceUID = f"1.2.3.9.{k + 1}"
        if kind == "rgb":
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
        else:
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.save_as(folder / f"{k}.dcm")
    expected = "a colour image, not grey-value CT" if kind == "rgb" else "a secondary-capture series"
    with pytest.raises(ct_io.ScanError, match=f"^{folder}: .*{expected}"):
        ct_io.read_dicom_series(str(folder))
