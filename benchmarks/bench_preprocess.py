"""Benchmark and score stage 1 on synthetic 512x512 scans: speed, peak memory and quality of the lung masks.

For each scan of a synthetic cohort (written here with synthetic_ct.py unless DATA_DIR holds one), each
variant runs in a fresh worker process (so its peak resident memory is its own):
- "reference": the thesis's lung mask written literally, slice by slice (scikit-learn K-means,
  scikit-image morphology and regionprops): lung_mask.lung_mask_thesis_reference;
- "thesis": the same algorithm over the whole volume at once (lung_mask.lung_mask_thesis);
- "refined": the default mask (lung_mask.lung_mask_refined).
Reports seconds per scan (one core), peak RSS per worker, the thesis variant's agreement with the reference
(Dice), and both variants' Dice against the true lungs and nodule coverage (share of each true nodule's
voxels inside the mask) with the wand labels' Dice. Writes benchmarks/results/bench_preprocess.json.

With COMPARE_WITH (a git commit) it times, instead, the whole of stage 1 (preprocess.process_scan: read, lung
mask, wand labels, compressed write) of that commit's code against this checkout's on the same scans, one
process each with one thread, ROUNDS rounds alternated (after one untimed scan, which imports pylidc), and
checks that both wrote the same /hu, /lung_mask and /nodule_mask; the lung mask alone is timed too (on each scan
after its stage 1). Writes bench_preprocess_compare.json.

    python benchmarks/bench_preprocess.py [--N_SCANS=3 --DATA_DIR=data/synthetic]
    python benchmarks/bench_preprocess.py --COMPARE_WITH=67bd675 --N_SCANS=4 --DATA_DIR=work/demo/0_synthetic
"""
import glob
import json
import os
import subprocess
import sys
import time
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")     # one core per worker, as in the process pool

import numpy as np  # noqa: E402

import configurator  # noqa: E402

N_SCANS = 3                    # scans benchmarked
SEED = 11                      # synthetic cohort seed
DATA_DIR = ""                  # an existing synthetic cohort (its luna16/ and truth/); "" = write one in OUT_DIR
OUT_DIR = "benchmarks/results"  # results folder
REFERENCE_SLICES = 0           # slices timed for the per-slice reference (0 = all; it is ~10x slower)
COMPARE_WITH = ""              # a git commit: time its stage 1 against this checkout's instead ("" = the variants)
ROUNDS = 2                     # rounds of that comparison, the two codes alternated [>= 1]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run in a fresh interpreter with a code folder first on sys.path: stage 1 of that code on each scan -> seconds
_TIME_STAGE1 = r"""
import json, os, sys
code, out_dir, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, code)
import preprocess
from annotations import read_annotations
cfg = {k: getattr(preprocess, k) for k in dir(preprocess) if k.isupper()}
cfg["OVERWRITE"] = True
luna = os.path.dirname(os.path.dirname(paths[0]))
files = [(os.path.join(luna, n), n != "annotations.csv") for n in ("annotations.csv", "annotations_excluded.csv")]
ann = read_annotations([f for f in files if os.path.isfile(f[0])],
                       {os.path.splitext(os.path.basename(p))[0] for p in paths})
os.makedirs(out_dir, exist_ok=True)
import time
import ct_io, lung_mask
secs, mask_secs = [], []
for p in paths[:1] + paths:                      # the first one untimed: it imports pylidc, once per worker
    r = preprocess.process_scan(p, out_dir, ann, cfg)
    if r[1] != "done":
        raise SystemExit(r[2])
    secs.append(r[3])
    scan = ct_io.read_mhd(p)
    t = time.perf_counter()
    lung_mask.lung_mask(scan.hu, scan.spacing, scan.direction, cfg["LUNG_MASK"],
                        lung_mask.LungMaskSettings.from_config(cfg))
    mask_secs.append(time.perf_counter() - t)
print(json.dumps([secs[1:], mask_secs[1:]]))
"""


def score_scan(stage1, truth, lung_mask=None):
    """Quality of a stage-1 result against the exact truth (dicts from ct_io.read_scan_h5 and
    synthetic_ct.read_truth). Returns the lung Dice, and per non-excluded truth nodule: coverage by the lung
    mask, Dice of the stage-1 label with the same index, whether its centre voxel is labelled."""
    from metrics import dice, dice_counts
    lm = (stage1["lung_mask"] if lung_mask is None else lung_mask) > 0
    truth_lungs = truth["lung_mask"] > 0
    out = {"lung_dice": dice(*dice_counts(lm, truth_lungs)), "nodules": []}
    for r in truth["nodules"]:
        if r["excluded"]:
            continue
        tn = truth["nodule_mask"] == r["k"]
        c = tuple(np.round([r["center_z"], r["center_y"], r["center_x"]]).astype(int))
        label = stage1["nodule_mask"] == r["k"]
        out["nodules"].append(dict(diameter_mm=float(r["diameter_mm"]), pleural=bool(r["touches_pleura"]),
                                   kind=r["kind"].decode(), coverage=float(lm[tn].mean()),
                                   label_dice=dice(*dice_counts(label, tn)), center_labelled=bool(label[c])))
    return out


def peak_mb():
    """This process's peak resident memory (MB) since its exec: /proc's VmHWM. (getrusage's ru_maxrss of a
    spawned worker starts at its parent's size at fork time, so it would report the parent's.)"""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_variant(args):
    import ct_io
    import lung_mask
    path, variant, n_ref = args
    scan = ct_io.read_mhd(path)
    t0 = time.process_time()
    if variant == "reference":
        flips = lung_mask.canonical_flips(scan.direction)
        hu = np.flip(scan.hu, flips) if flips else scan.hu
        zs = range(hu.shape[0]) if not n_ref else np.linspace(0, hu.shape[0] - 1, n_ref).astype(int)
        mask = np.zeros(hu.shape, np.uint8)
        for z in zs:
            mask[z] = lung_mask.lung_mask_thesis_reference(hu[z])
        mask = np.flip(mask, flips) if flips else mask
        secs = (time.process_time() - t0) * hu.shape[0] / len(zs)
        zs = list(zs)
    else:
        mask = lung_mask.lung_mask(scan.hu, scan.spacing, scan.direction, variant)
        secs = time.process_time() - t0
        zs = list(range(mask.shape[0]))
    peak = peak_mb()
    return (dict(variant=variant, seconds=secs, peak_mb=peak, shape=list(scan.hu.shape), slices=[int(z) for z in zs]),
            np.packbits(mask))


def compare_stage1(cfg, paths):
    """Stage 1 of commit COMPARE_WITH against this checkout's on ``paths``, ROUNDS rounds alternated -> summary."""
    import ct_io
    old_code = os.path.abspath(os.path.join(cfg.OUT_DIR, f"code_{cfg.COMPARE_WITH}"))
    if not os.path.isfile(os.path.join(old_code, "preprocess.py")):
        os.makedirs(old_code, exist_ok=True)
        archive = subprocess.run(["git", "archive", cfg.COMPARE_WITH], cwd=_ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", old_code], input=archive.stdout, check=True)
    codes = {"before": old_code, "after": _ROOT}
    secs, mask_secs = {k: [] for k in codes}, {k: [] for k in codes}
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for r in range(cfg.ROUNDS):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            out = subprocess.run([sys.executable, "-c", _TIME_STAGE1, codes[name], _out(cfg, name), json.dumps(paths)],
                                 capture_output=True, text=True, env=env, cwd=codes[name])
            if out.returncode:
                raise SystemExit(f"{name}: {out.stderr[-2000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            secs[name] += got[0]
            mask_secs[name] += got[1]
            print(f"round {r + 1} {name:6s} stage 1 " + " ".join(f"{t:.2f}" for t in got[0]) + " s; lung mask "
                  + " ".join(f"{t:.2f}" for t in got[1]) + " s")
    same = []
    for p in paths:
        uid = os.path.splitext(os.path.basename(p))[0]
        a, b = (ct_io.read_scan_h5(os.path.join(_out(cfg, k), uid + ".h5")) for k in codes)
        same.append(all(np.array_equal(a[k], b[k]) for k in ("hu", "lung_mask", "nodule_mask")))
    shapes = ["x".join(str(n) for n in ct_io.read_scan_h5(os.path.join(_out(cfg, "after"), os.path.splitext(
        os.path.basename(p))[0] + ".h5"))["hu"].shape) for p in paths]
    summary = {"machine": f"{os.cpu_count()} cores", "before": cfg.COMPARE_WITH, "scans": shapes,
               "rounds": cfg.ROUNDS, "before_s_per_scan": float(np.mean(secs["before"])),
               "after_s_per_scan": float(np.mean(secs["after"])), "all_seconds": secs,
               "before_mask_s_per_scan": float(np.mean(mask_secs["before"])),
               "after_mask_s_per_scan": float(np.mean(mask_secs["after"])), "all_mask_seconds": mask_secs,
               "same_outputs": bool(all(same))}
    summary["speedup"] = summary["before_s_per_scan"] / summary["after_s_per_scan"]
    summary["mask_speedup"] = summary["before_mask_s_per_scan"] / summary["after_mask_s_per_scan"]
    with open(os.path.join(cfg.OUT_DIR, "bench_preprocess_compare.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("all_")}, indent=2))
    return 0 if summary["same_outputs"] else 1


def _out(cfg, name):
    return os.path.abspath(os.path.join(cfg.OUT_DIR, "compare_work", name))


def main(argv=None):
    cfg = configurator.configure(globals(), argv)
    import ct_io
    import preprocess
    import synthetic_ct
    from metrics import dice, dice_counts
    os.makedirs(cfg.OUT_DIR, exist_ok=True)
    data = cfg.DATA_DIR
    if not data:
        data = os.path.join(cfg.OUT_DIR, "bench_cohort")
        if len(glob.glob(os.path.join(data, "luna16", "subset*", "*.mhd"))) < cfg.N_SCANS:
            synthetic_ct.generate_cohort(data, N_SCANS=cfg.N_SCANS, N_LIDC_SCANS=0, SEED=cfg.SEED)
    paths = sorted(glob.glob(os.path.join(data, "luna16", "subset*", "*.mhd")))[:cfg.N_SCANS]
    if cfg.COMPARE_WITH:
        return compare_stage1(cfg, [os.path.abspath(p) for p in paths])
    work = os.path.join(cfg.OUT_DIR, "bench_work")
    t0 = time.time()
    preprocess.main([f"--DATASET=luna16", f"--INPUT_DIR={os.path.join(data, 'luna16')}", f"--WORK_DIR={work}",
                     "--N_WORKERS=1", f"--LIMIT={cfg.N_SCANS}", "--OVERWRITE=1"])
    stage1_s = (time.time() - t0) / len(paths)
    rows, per_scan = {v: [] for v in ("reference", "thesis", "refined")}, []
    ctx = get_context("spawn")
    for path in paths:
        scan_row = {"scan": os.path.basename(path)}
        masks = {}
        for variant in rows:
            with ctx.Pool(1) as pool:         # a fresh process per variant: its own peak memory
                info, packed = pool.map(_run_variant, [(path, variant, cfg.REFERENCE_SLICES)])[0]
            shape = info["shape"]
            masks[variant] = np.unpackbits(packed)[:np.prod(shape)].reshape(shape).astype(bool)
            rows[variant].append(info)
            print(f"{os.path.basename(path)[-12:]} {variant:9s} {info['seconds']:6.2f} s  {info['peak_mb']:6.0f} MB")
        uid = os.path.splitext(os.path.basename(path))[0]
        stage1 = ct_io.read_scan_h5(os.path.join(work, "1_preprocessed", uid + ".h5"))
        truth = synthetic_ct.read_truth(os.path.join(data, "truth", uid + ".h5"))
        zs = rows["reference"][-1]["slices"]           # the slices the reference computed
        scan_row["thesis_vs_reference_dice"] = dice(*dice_counts(masks["thesis"][zs], masks["reference"][zs]))
        for variant in ("thesis", "refined"):
            scan_row[variant] = score_scan(stage1, truth, masks[variant])
        per_scan.append(scan_row)

    def mean(v, key):
        return float(np.mean([r[key] for r in rows[v]]))

    summary = {"machine": f"{os.cpu_count()} cores", "n_scans": len(paths), "stage1_wall_s_per_scan": stage1_s}
    for v in rows:
        summary[v] = {"s_per_scan": mean(v, "seconds"), "peak_mb": float(np.max([r["peak_mb"] for r in rows[v]]))}
    summary["speedup_thesis_vs_reference"] = summary["reference"]["s_per_scan"] / summary["thesis"]["s_per_scan"]
    summary["thesis_vs_reference_dice_min"] = float(np.min([r["thesis_vs_reference_dice"] for r in per_scan]))
    for v in ("thesis", "refined"):
        nods = [n for r in per_scan for n in r[v]["nodules"]]
        summary[v].update(
            lung_dice_mean=float(np.mean([r[v]["lung_dice"] for r in per_scan])),
            lung_dice_min=float(np.min([r[v]["lung_dice"] for r in per_scan])),
            coverage_mean=float(np.mean([n["coverage"] for n in nods])) if nods else None,
            coverage_min_pleural=float(np.min([n["coverage"] for n in nods if n["pleural"]]))
            if any(n["pleural"] for n in nods) else None)
    nods = [n for r in per_scan for n in r["refined"]["nodules"]]
    big = [n["label_dice"] for n in nods if n["diameter_mm"] >= 5]
    summary["wand_dice_mean_ge5mm"] = float(np.mean(big)) if big else None
    summary["wand_center_labelled"] = float(np.mean([n["center_labelled"] for n in nods])) if nods else None
    with open(os.path.join(cfg.OUT_DIR, "bench_preprocess.json"), "w") as f:
        json.dump({"summary": summary, "scans": per_scan, "config": cfg}, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
