"""A trained model on the same test patients at two scan resolutions: does it find the same nodules?

Takes a run's test scans (LUNA16-format .mhd of ``RUN/0_synthetic/luna16``, the series of the test part of
``RUN/3_split/split.json``), resamples each in-plane by FACTOR with SimpleITK (coarser pixels over the same
field of view, linear interpolation: the same patient, the same nodules at the same world coordinates, as a
scanner with larger pixels would show them), copies the annotations, and runs stages 1 and 5 on the copy
with the run's model. The run's own report (``RUN/5_report``) is the native-resolution result. Prints and
writes a by-size table of both (benchmarks/compare_runs.py's columns).

    python benchmarks/resolution_check.py --RUN=work/demo --FACTOR=1.6      # 512 px of ~0.75 mm -> 320 px of ~1.2 mm

Writes OUT (default RUN/resolution_x<FACTOR>): luna16/ (the resampled scans), 1_preprocessed/, 5_predictions/,
5_report/, and compare.md.
"""
import csv
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

RUN = "work/demo"             # a run with 0_synthetic/luna16, 3_split/split.json, 4_model/MODEL_FILE, 5_report
MODEL_FILE = "best.keras"     # which checkpoint of RUN/4_model (make demo evaluates last.keras)
FACTOR = 1.6                  # in-plane pixel size multiplied by this (matrix divided by it)
OUT = ""                      # "" = RUN/resolution_x<FACTOR>
PART = "test"                 # which part of the split is resampled and evaluated
N_WORKERS = 2                 # stage-1 processes
POST_ARGS = ("--SIZE_BINS=(5.0,10.0)", "--MIN_COMPONENT_VOXELS=3", "--N_PICTURES=0", "--WRITE_MIP=0")  # as the demo


def resample_inplane(src, dst, factor):
    """Write ``src`` (.mhd) resampled in-plane by ``factor`` to ``dst`` (.mhd), same field of view and z."""
    import numpy as np
    import SimpleITK as sitk
    img = sitk.ReadImage(src)
    sp = np.array(img.GetSpacing(), float)
    size = np.array(img.GetSize(), int)
    new_sp = sp * np.array([factor, factor, 1.0])
    new_size = np.maximum(np.round(size * sp / new_sp).astype(int), 1)
    d = np.array(img.GetDirection(), float).reshape(3, 3)
    # first new pixel centre: the old field of view's edge plus half a new pixel
    shift = (new_sp - sp) / 2.0 * np.array([1.0, 1.0, 0.0])
    origin = np.array(img.GetOrigin(), float) + d @ shift
    out = sitk.Resample(img, [int(v) for v in new_size], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                        new_sp.tolist(), img.GetDirection(), -1024, img.GetPixelID())
    sitk.WriteImage(out, dst)


def main(argv=None):
    import configurator
    import preprocess
    import postprocess
    from benchmarks import compare_runs
    cfg = configurator.configure(globals(), argv)
    run, factor = cfg.RUN, cfg.FACTOR
    out = cfg.OUT or os.path.join(run, f"resolution_x{factor:g}")
    src = os.path.join(run, "0_synthetic", "luna16")
    series = set(json.load(open(os.path.join(run, "3_split", "split.json")))[cfg.PART]["series"])
    scans = [os.path.join(dp, f) for dp, _, fs in os.walk(src) for f in fs
             if f.endswith(".mhd") and f[:-4] in series]
    if not scans:
        raise SystemExit(f"{src}: none of the {len(series)} {cfg.PART} series found")
    dst = os.path.join(out, "luna16", "subset0")
    os.makedirs(dst, exist_ok=True)
    for path in sorted(scans):
        target = os.path.join(dst, os.path.basename(path))
        if not os.path.isfile(target):
            resample_inplane(path, target, factor)
    for name in ("annotations.csv", "annotations_excluded.csv"):
        if os.path.isfile(os.path.join(src, name)):
            with open(os.path.join(src, name)) as f:
                rows = list(csv.reader(f))
            with open(os.path.join(out, "luna16", name), "w", newline="") as f:
                csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if r and r[0] in series])
    rc = preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={out}/luna16", f"--WORK_DIR={out}",
                          f"--N_WORKERS={cfg.N_WORKERS}"])
    if rc:
        raise SystemExit(f"stage 1 failed on {out}/luna16")
    model = os.path.join(run, "4_model", cfg.MODEL_FILE)
    postprocess.main([f"--WORK_DIR={out}", "--SCANS=all", f"--MODEL={model}", *cfg.POST_ARGS])
    md = os.path.join(out, "compare.md")
    compare_runs.main([f"--RUNS=('native={run}/5_report','x{factor:g}={out}/5_report')", f"--OUT={md}"])
    print(open(md).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
