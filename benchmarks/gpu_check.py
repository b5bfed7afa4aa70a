"""GPU throughput check of the figure-3 network: training slices per second at 400x400, batch 12 (the thesis's
batch), float32 vs mixed precision; then, time permitting, mixed precision with XLA (jit_compile=True).

Reads nothing (random slices with disk labels); prints one JSON document and writes it to
$OUT/gpu_check.json when $OUT is set, else benchmarks/results/gpu_check.json.

    python benchmarks/gpu_check.py [--MODES=(('float32',0,1),('mixed_float16',0,1)) --STEPS=20]
    (a mode = (precision policy, jit_compile 0/1, grappler 0/1))

Each mode runs in its own process (the precision policy is process-wide; GPU memory is released between
modes) under a common time budget (TIME_BUDGET_S, ~4 min): a mode that would start with too little time left
is skipped and reported as skipped. Every mode's result is printed as soon as it is known.
"""
import json
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

# ---------------------------------------------------------------- constants
SIZE = 400                 # input height = width
BATCH = 12                 # slices per step (thesis)
VARIANT = "figure3"        # nasnet_v2 variant
STEPS = 20                 # timed training steps (after the first step and the warm-up)
WARMUP = 3                 # untimed steps after the first
MODES = (("float32", 0, 1), ("mixed_float16", 0, 1), ("mixed_float16", 1, 1))
                           # (precision policy, jit_compile, grappler). grappler 0 disables TensorFlow's graph
                           # optimiser: on the 2-core CPU it cut NASNet's first step by ~14 % but made each step
                           # ~1.7x slower; add ("mixed_float16", 0, 0) to see it on a GPU. XLA comes last: its
                           # compile of NASNet's training step may not fit the time budget.
TIME_BUDGET_S = 230        # all modes together, seconds
MIN_LEFT_S = 60            # do not start a mode with less time left than this
MODE_MAX_S = 0             # at most this many seconds per mode (0 = whatever is left of the budget)


def _random_batch(size, batch):
    """Random slices (batch, size, size, 1) and one-hot labels of a disk on each."""
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 1)).astype("float32")
    yy, xx = np.mgrid[:size, :size]
    y = np.zeros((batch, size, size), "uint8")
    for i in range(batch):
        cy, cx = rng.uniform(30, size - 30, 2)
        y[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 150] = 1
    return x, np.eye(2, dtype="float32")[y]


def worker(policy, jit, grappler, cfg):
    """One mode in this process, with the settings ``cfg`` (a dict) the parent ran with. Works with Keras's TensorFlow backend (default) or JAX backend
    (KERAS_BACKEND=jax, e.g. on a GPU machine with a CUDA build of JAX and no TensorFlow)."""
    t0 = time.perf_counter()
    import numpy as np
    import keras
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        if not grappler:
            tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
        gpus = tf.config.list_physical_devices("GPU")
        for g in gpus:
            tf.config.experimental.set_memory_growth(g, True)
        gpu_names = [g.name for g in gpus]
    elif backend == "jax":
        import jax
        gpu_names = [str(d) for d in jax.devices() if d.platform == "gpu"]
    else:
        gpu_names = []
    import nasnet_v2 as nv
    keras.mixed_precision.set_global_policy(policy)
    size, batch, variant = cfg["SIZE"], cfg["BATCH"], cfg["VARIANT"]
    x, y = _random_batch(size, batch)
    keras.utils.set_random_seed(0)
    t = time.perf_counter()
    model = nv.get_model((size, size, 1), variant=variant)
    build_s = time.perf_counter() - t
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=nv.gdl_wce_loss, metrics=[nv.dice_coef],
                  jit_compile=bool(jit) if backend == "tensorflow" else True)
    t = time.perf_counter()
    model.train_on_batch(x, y)
    first_s = time.perf_counter() - t
    for _ in range(cfg["WARMUP"]):
        model.train_on_batch(x, y)
    times = []
    for _ in range(cfg["STEPS"]):
        t = time.perf_counter()
        logs = model.train_on_batch(x, y, return_dict=True)   # returns numbers: the step has finished
        times.append(time.perf_counter() - t)
    step = float(np.median(times))
    out = {"backend": backend, "policy": policy, "jit_compile": bool(jit) if backend == "tensorflow" else True,
           "grappler": bool(grappler), "size": size, "batch": batch, "variant": variant,
           "build_s": round(build_s, 2), "first_step_s": round(first_s, 2), "ms_per_step": round(1000 * step, 2),
           "slices_per_s": round(batch / step, 1), "mean_ms_per_step": round(1000 * float(np.mean(times)), 2),
           "loss_finite": bool(np.isfinite(float(logs["loss"]))), "process_s": round(time.perf_counter() - t0, 1),
           "gpus": gpu_names}
    if backend == "tensorflow" and gpu_names:
        try:
            out["gpu"] = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0]).get("device_name", "")
            out["peak_gpu_mem_mib"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)
        except Exception as e:  # noqa: BLE001 - informative only
            out["gpu_info_error"] = str(e)[:200]
    print("RESULT " + json.dumps(out), flush=True)


def main(argv=None):
    import runfiles
    from configurator import configure
    cfg = configure(globals(), sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    results = []
    for policy, jit, grappler in cfg.MODES:
        left = cfg.TIME_BUDGET_S - (time.perf_counter() - t_start)
        if left < cfg.MIN_LEFT_S:
            results.append({"policy": policy, "jit_compile": bool(jit), "grappler": bool(grappler),
                            "skipped": f"only {left:.0f} s left"})
            print(json.dumps(results[-1]), flush=True)
            continue
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p))
        try:
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", policy, str(int(jit)),
                                  str(int(grappler)), json.dumps(cfg)],
                                 capture_output=True, text=True, timeout=min(left, cfg.MODE_MAX_S or left), env=env)
            lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
            if lines:
                r = json.loads(lines[-1][7:])
            else:
                r = {"policy": policy, "jit_compile": bool(jit), "grappler": bool(grappler),
                     "error": ((res.stderr or res.stdout).strip().splitlines() or ["no output"])[-1][:400]}
        except subprocess.TimeoutExpired:
            r = {"policy": policy, "jit_compile": bool(jit), "grappler": bool(grappler),
                 "error": f"timed out after {min(left, cfg.MODE_MAX_S or left):.0f} s"}
        results.append(r)
        print(json.dumps(r), flush=True)
    doc = {"config": cfg, "results": results, "total_s": round(time.perf_counter() - t_start, 1)}
    base = os.environ.get("OUT") or os.path.join(_ROOT, "benchmarks", "results")
    os.makedirs(base, exist_ok=True)
    runfiles.write_json(os.path.join(base, "gpu_check.json"), doc)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]))
    else:
        main()
