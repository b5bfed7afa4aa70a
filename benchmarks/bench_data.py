"""Benchmark of stages 2-3's data path: building the slice table, its memory, and the training data source.

Reads nothing: writes random-ish stage-1 files (512 x 512 slices: body, lungs with vessels, spherical
nodules) under a temporary folder (or WORK_DIR), then measures
- table.py: slices per second and peak resident memory (a fresh process each) on 10 and on 50 scans;
- SliceTableDataset: batches per second at batch 12, 400 x 400, augmentation on (flips, +-6 degree
  rotation), with 0 workers (in this process) and 2 worker processes (through Keras's PyDataset adapter,
  as fit() reads it);
- optionally (MODEL_STEP=True) one training step of a NASNetMobile-encoder network at 400 x 400, batch 12,
  as a stand-in for nasnet_v2's step (MODEL_STEP_S: the model benchmark's figure, if known);
and the ratio (data batches per second) x (seconds per training step), which must be >= 3.
Writes ``OUT_DIR/bench_data.json`` and prints it.

    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --MODEL_STEP=True        # also time a training step (slow on CPU)
    python benchmarks/bench_data.py --MODEL_STEP_S=4.2       # the model benchmark's seconds per step
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------- constants
OUT_DIR = os.path.join(_ROOT, "benchmarks", "results")   # where bench_data.json goes
WORK_DIR = ""                  # scratch folder for the stage-1 files and tables; "" = a temporary one, removed
SIZE = 512                     # slice side (px): 512 gives the thesis's 400 x 400 input
N_Z = 40                       # slices per scan
MEM_SCANS = (10, 50)           # table.py runs (numbers of scans) compared for memory
NEG_PER_SCAN = 10              # table.py's negatives per scan
BATCH_SIZE = 12                # thesis batch
N_BATCHES = 30                 # batches timed per data-source setting
WORKERS = (0, 2)               # data-source settings timed (0 = in this process; n > 0 = n worker processes)
THREADS = (2,)                 # also timed with n worker threads (use_multiprocessing=False)
MODEL_STEP = False             # time a NASNetMobile-encoder training step here (minutes on a CPU)
MODEL_STEP_S = 0.0             # seconds per training step from the model benchmark (0 = unknown)
SEED = 0                       # seed of the random-ish scans


def make_scans(folder, n, size, n_z, seed):
    """n random-ish stage-1 files: an elliptic body, two lungs (-850 HU) with vessels, 2 nodules each."""
    from ct_io import NODULE_DTYPE, Scan, write_scan_h5
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[:size, :size] / size
    body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.47) ** 2 <= 1
    lungs = [((yy - 0.48) / 0.3) ** 2 + ((xx - cx) / 0.16) ** 2 <= 1 for cx in (0.3, 0.7)]
    lung2d = lungs[0] | lungs[1]
    lung_px, lung_px_k = np.argwhere(lung2d), [np.argwhere(m) for m in lungs]
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        hu = np.full((n_z, size, size), -1000, np.int16)
        hu[:, body] = 40
        noise = rng.normal(0, 25, (n_z, size, size)).astype(np.float32)
        hu = (hu + noise).astype(np.int16)
        lung = np.zeros((n_z, size, size), np.uint8)
        lung[:, lung2d] = 1
        hu[:, lung2d] = (-850 + noise[:, lung2d]).astype(np.int16)
        for _ in range(30):                                   # vessels: bright blobs inside the lungs
            zc, (yc, xc) = rng.integers(0, n_z), lung_px[rng.integers(len(lung_px))]
            r = rng.uniform(2, 5)
            z0, z1 = max(zc - 2, 0), min(zc + 3, n_z)
            sl = (slice(z0, z1), slice(max(yc - 6, 0), yc + 7), slice(max(xc - 6, 0), xc + 7))
            g = np.mgrid[sl]
            hu[sl][((g[1] - yc) ** 2 + (g[2] - xc) ** 2) <= r * r] = -50
        mask = np.zeros((n_z, size, size), np.uint8)
        nod = np.zeros(2, NODULE_DTYPE)
        for k in (1, 2):
            zc, (yc, xc) = int(rng.integers(4, n_z - 4)), lung_px_k[k - 1][rng.integers(len(lung_px_k[k - 1]))]
            r = rng.uniform(4, 12)
            z0, z1 = max(zc - 4, 0), min(zc + 5, n_z)
            sl = (slice(z0, z1), slice(max(yc - 13, 0), yc + 14), slice(max(xc - 13, 0), xc + 14))
            g = np.mgrid[sl]
            ball = ((g[0] - zc) * 2.5) ** 2 + (g[1] - yc) ** 2 + (g[2] - xc) ** 2 <= r * r
            mask[sl][ball] = k
            hu[sl][ball] = 30
            nod[k - 1]["index"], nod[k - 1]["diameter_mm"] = k, 2 * r * 0.7
            nod[k - 1]["center_z"], nod[k - 1]["center_y"], nod[k - 1]["center_x"] = zc, yc, xc
        uid = f"1.2.826.0.1.{seed}.{i:04d}"
        scan = Scan(hu=hu, origin=(0.0, 0.0, 0.0), spacing=(0.7, 0.7, 2.5), direction=tuple(np.eye(3).ravel()),
                    seriesuid=uid, patient_id=f"BENCH-{i:04d}", source="luna16",
                    path=f"/bench/subset{i % 10}/{uid}.mhd")
        write_scan_h5(os.path.join(folder, uid + ".h5"), scan, lung, mask, nod)


def run_table(in_dir, out_dir, limit, neg_per_scan):
    """table.py in a fresh process -> (rows, slices/s, peak RSS MiB)."""
    # VmHWM: this process's own peak (ru_maxrss would include the parent's memory, kept across fork + exec)
    code = ("import re, sys, table; rc = table.main(sys.argv[1:]); "
            "print('PEAK_RSS_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "sys.exit(rc)")
    cmd = [sys.executable, "-c", code, f"--IN_DIR={in_dir}", f"--OUT_DIR={out_dir}", f"--LIMIT={limit}",
           f"--NEG_PER_SCAN={neg_per_scan}"]
    p = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"table.py failed:\n{p.stderr[-2000:]}")
    rows = int(re.search(r": (\d+) slices", p.stdout).group(1))
    rate = float(re.search(r"([\d.]+) slices/s", p.stdout).group(1))
    peak = int(re.search(r"PEAK_RSS_KB (\d+)", p.stdout).group(1)) / 1024
    return rows, rate, peak


def time_source(table, rows, workers, processes, cfg):
    """Batches per second of SliceTableDataset (augmentation on) read as fit() reads it."""
    from data_generator_sequence_table import SliceTableDataset
    kw = dict(batch_size=cfg.BATCH_SIZE, augment=True, rot_deg=6.0, seed=cfg.SEED)
    n = min(cfg.N_BATCHES, len(rows) // cfg.BATCH_SIZE - 1)  # within one epoch, after a first untimed batch
    if workers:
        from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
        ds = SliceTableDataset(table, rows, workers=workers, use_multiprocessing=processes, **kw)
        adapter = PyDatasetAdapter(ds, shuffle=False)
        adapter.on_epoch_begin()
        it = adapter.get_numpy_iterator()
        next(it)                                             # pool start-up not timed
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        dt = time.perf_counter() - t0
        adapter.on_epoch_end()
    else:
        ds = SliceTableDataset(table, rows, workers=0, **kw)
        ds[0]
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            ds[i]
        dt = time.perf_counter() - t0
    return n / dt


def time_model_step(batch, side=400, steps=2):
    """Seconds per training step of NASNetMobile (random init, 1 channel) + a small upsampling head."""
    import keras
    inp = keras.Input((side, side, 1))
    enc = keras.applications.NASNetMobile(input_tensor=inp, weights=None, include_top=False)
    x = keras.layers.Conv2D(32, 1, activation="relu")(enc.output)
    x = keras.layers.Resizing(side, side, interpolation="bilinear")(x)
    out = keras.layers.Conv2D(2, 1, activation="softmax")(x)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(batch, side, side, 1)).astype(np.float32)
    yb = keras.utils.to_categorical(rng.random((batch, side, side)) > 0.98, 2).astype(np.float32)
    model.train_on_batch(xb, yb)                             # graph building not timed
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(xb, yb)
    return (time.perf_counter() - t0) / steps


def measure_table(cfg, work, res):
    """table.py on MEM_SCANS scans of random-ish stage-1 files: slices/s and peak memory -> the largest table."""
    stage1 = os.path.join(work, "1_preprocessed")
    n_max = max(cfg.MEM_SCANS)
    t0 = time.time()
    make_scans(stage1, n_max, cfg.SIZE, cfg.N_Z, cfg.SEED)
    print(f"{n_max} random-ish stage-1 files ({cfg.SIZE}x{cfg.SIZE}x{cfg.N_Z}) in {time.time() - t0:.0f} s")
    res["table"] = {}
    for n in cfg.MEM_SCANS:
        rows, rate, peak = run_table(stage1, os.path.join(work, f"2_table_{n}"), n, cfg.NEG_PER_SCAN)
        res["table"][str(n)] = dict(scans=n, slices=rows, slices_per_s=round(rate, 1), peak_rss_mib=round(peak, 1))
        print(f"table.py, {n} scans: {rows} slices, {rate:.1f} slices/s, peak RSS {peak:.0f} MiB")
    peaks = [res["table"][str(n)]["peak_rss_mib"] for n in cfg.MEM_SCANS]
    res["table_memory_growth"] = round(peaks[-1] / peaks[0] - 1, 3)
    return os.path.join(work, f"2_table_{n_max}", "slices.h5")


def measure_source(cfg, table, res):
    """SliceTableDataset's batches per second in this process, with WORKERS processes and THREADS threads."""
    import tables
    with tables.open_file(table) as h5:
        n_rows, shape = len(h5.root.slices), tuple(int(s) for s in h5.root.data.shape[1:])
    rows = np.arange(n_rows)
    res["source"] = dict(input_shape=list(shape))
    settings = [(f"workers{w}", w, True) for w in cfg.WORKERS] + [(f"threads{w}", w, False) for w in cfg.THREADS]
    for name, w, proc in settings:
        bps = time_source(table, rows, w, proc, cfg)
        res["source"][f"batches_per_s_{name}"] = round(bps, 2)
        what = "in this process" if not w else f"{w} worker {'processes' if proc else 'threads'}"
        print(f"data source, batch {cfg.BATCH_SIZE}, {shape}, augmentation on, {what}: {bps:.2f} batches/s "
              f"({1000 / bps:.0f} ms per batch)")


def measure_ratio(cfg, res):
    """The data source's speed against a training step's (MODEL_STEP_S, or measured with MODEL_STEP)."""
    step = cfg.MODEL_STEP_S or None
    res["model_step_s_source"] = "MODEL_STEP_S (model benchmark)" if step else None
    if cfg.MODEL_STEP:
        step = time_model_step(cfg.BATCH_SIZE)
        res["model_step_s_source"] = "NASNetMobile encoder + 1x1 head, measured here (lower bound of nasnet_v2)"
        print(f"training step (NASNetMobile encoder, batch {cfg.BATCH_SIZE}, 400x400): {step:.2f} s")
    res["model_step_s"] = round(step, 3) if step else None
    rates = {k[len("batches_per_s_"):]: v for k, v in res["source"].items() if k.startswith("batches_per_s_")}
    best = max(rates.values())
    if step:
        res["ratio_source_vs_step"] = {k: round(v * step, 1) for k, v in rates.items()}
        print("data source / training step speed ratio (must be >= 3): "
              + ", ".join(f"{k} {v * step:.1f}" for k, v in rates.items()))
    else:
        res["ratio_source_vs_step"] = None
        print(f"training step time unknown: the ratio is {best:.2f} x (seconds per step); >= 3 needs a step of "
              f">= {3 / best:.2f} s")


def main(argv=None):
    import runfiles
    cfg = configure(globals(), argv)
    work = cfg.WORK_DIR or tempfile.mkdtemp(prefix="bench_data_")
    res = dict(machine=dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine(),
                            python=platform.python_version()),
               settings=dict(size=cfg.SIZE, n_z=cfg.N_Z, neg_per_scan=cfg.NEG_PER_SCAN, batch_size=cfg.BATCH_SIZE,
                             n_batches=cfg.N_BATCHES))
    try:
        table = measure_table(cfg, work, res)
        measure_source(cfg, table, res)
        measure_ratio(cfg, res)
    finally:
        if not cfg.WORK_DIR:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(cfg.OUT_DIR, exist_ok=True)
    path = os.path.join(cfg.OUT_DIR, "bench_data.json")
    with runfiles.atomic(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
