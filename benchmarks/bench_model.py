"""Benchmark of the networks of nasnet_v2.py on this machine's CPU: time to the first training step (graph
building), ms per step, slices per second and peak memory, for figure3 and the U-Net, at 256 and 400; and
what shortens NASNet's first step (XLA on/off, eager execution, TensorFlow's graph optimiser, Keras's JAX
backend).

Reads nothing (random slices with blob labels); writes benchmarks/results/bench_model.json and prints a table.

    python benchmarks/bench_model.py [--MODELS=('figure3','unet') --SIZES=(256,400) --BATCH=4 --STEPS=5
                                      --MODES=('graph','xla','eager','graph_no_grappler','jax') --MODE_SIZE=256]

Every measurement runs in its own fresh Python process (the first step includes tracing, which a process
does once; TensorFlow's graph options are process-wide; the Keras backend is chosen at import).
Modes: graph = Keras's default tf.function, jit_compile=False; xla = jit_compile=True; eager =
run_eagerly=True; graph_no_grappler = graph with TensorFlow's grappler meta-optimiser disabled
(tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})); jax = KERAS_BACKEND=jax
(jit-compiled by XLA), only when jax is importable (JAX_PATH adds a folder holding it to PYTHONPATH); bf16 =
graph with Keras's "mixed_bfloat16" policy (bfloat16 compute, float32 weights: what a CPU with AVX-512 BF16 could
gain).
Throughput at every size in SIZES uses the mode THROUGHPUT_MODE; the mode comparison runs at MODE_SIZE.
"""
import json
import os
import platform
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

# ---------------------------------------------------------------- constants
MODELS = ("figure3", "unet")      # networks to time (nasnet_v2 variants)
SIZES = (256, 400)                # input sizes for the throughput table
BATCH = 4                         # slices per training step
STEPS = 5                         # timed training steps after the first one
THROUGHPUT_MODE = "graph"         # execution mode of the throughput table (the training script's default)
MODES = ("graph", "xla", "eager", "graph_no_grappler", "jax")   # first-step comparison (figure3 only; also "bf16")
MODE_SIZE = 256                   # input size of the first-step comparison
MODE_STEPS = 2                    # timed steps after the first in the comparison
JAX_PATH = "/tmp/jaxenv"          # folder with jax/jaxlib (pip install --target); "" = only if in the venv
TIMEOUT_S = 900                   # limit per measurement process
OUT = os.path.join(_ROOT, "benchmarks", "results", "bench_model.json")  # JSON written here


def worker(spec):
    """Run one measurement in this process and print its result as one JSON line."""
    import resource
    t0 = time.perf_counter()
    if spec["mode"] == "graph_no_grappler":
        import tensorflow as tf
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    import numpy as np
    import keras
    import nasnet_v2 as nv
    t_import = time.perf_counter() - t0

    size, batch = spec["size"], spec["batch"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 1)).astype("float32")
    yy, xx = np.mgrid[:size, :size]
    y = np.zeros((batch, size, size), "uint8")
    for i in range(batch):
        cy, cx = rng.uniform(20, size - 20, 2)
        y[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 1
    y = np.eye(2, dtype="float32")[y]

    keras.utils.set_random_seed(0)
    if spec["mode"] == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    t = time.perf_counter()
    model = nv.get_model((size, size, 1), variant=spec["model"])
    t_build = time.perf_counter() - t
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=nv.gdl_wce_loss, metrics=[nv.dice_coef],
                  jit_compile=spec["mode"] in ("xla", "jax"), run_eagerly=spec["mode"] == "eager")
    t = time.perf_counter()
    model.train_on_batch(x, y)
    t_first = time.perf_counter() - t
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t)
    step = float(np.median(times)) if times else float("nan")
    print("RESULT " + json.dumps({
        **spec, "backend": keras.backend.backend(), "params": int(model.count_params()),
        "layers": len(model.layers), "import_s": round(t_import, 2), "build_s": round(t_build, 2),
        "first_step_s": round(t_first, 2), "ms_per_step": round(1000 * step, 1),
        "slices_per_s": round(batch / step, 2), "step_times_s": [round(s, 3) for s in times],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),   # other processes on the machine inflate the times
    }), flush=True)


def run_one(spec, cfg):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=_ROOT)
    if spec["mode"] == "jax":
        env["KERAS_BACKEND"] = "jax"
        if cfg.JAX_PATH:
            env["PYTHONPATH"] = _ROOT + os.pathsep + cfg.JAX_PATH
    t = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                             capture_output=True, text=True, timeout=cfg.TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {cfg.TIMEOUT_S} s"}
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["process_s"] = round(time.perf_counter() - t, 1)
            return out
    tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
    return {**spec, "error": tail[0][:300]}


def jax_available(jax_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, jax_path) if p))
    return subprocess.run([sys.executable, "-c", "import jax"], env=env, capture_output=True).returncode == 0


def fmt(r):
    if "error" in r:
        return f"{r['model']:<8} {r['size']:>4} {r['mode']:<18} ERROR: {r['error']}"
    return (f"{r['model']:<8} {r['size']:>4} {r['mode']:<18} {r['build_s']:>7.1f} {r['first_step_s']:>9.1f} "
            f"{r['ms_per_step']:>9.0f} {r['slices_per_s']:>8.2f} {r['peak_rss_mib']:>9.0f} "
            f"{r.get('load_avg_1min', 0):>5.1f}")


def main(argv=None):
    from configurator import configure
    cfg = configure(globals(), sys.argv[1:] if argv is None else argv)
    import psutil
    import runfiles
    specs = [dict(model=m, size=s, batch=cfg.BATCH, steps=cfg.STEPS, mode=cfg.THROUGHPUT_MODE)
             for m in cfg.MODELS for s in cfg.SIZES]
    for mode in cfg.MODES:
        if mode == cfg.THROUGHPUT_MODE and cfg.MODE_SIZE in cfg.SIZES and "figure3" in cfg.MODELS:
            continue  # already in the table
        if mode == "jax" and not jax_available(cfg.JAX_PATH):
            print("jax not importable: mode 'jax' skipped (pip install --target DIR jax; --JAX_PATH=DIR)")
            continue
        specs.append(dict(model="figure3", size=cfg.MODE_SIZE, batch=cfg.BATCH, steps=cfg.MODE_STEPS, mode=mode))

    header = (f"{'model':<8} {'size':>4} {'mode':<18} {'build_s':>7} {'first_s':>9} {'ms/step':>9} "
              f"{'slices/s':>8} {'peak_MiB':>9} {'load':>5}")
    print(f"batch {cfg.BATCH}; {psutil.cpu_count()} CPUs; each row a fresh process\n{header}")
    results = []
    for spec in specs:
        r = run_one(spec, cfg)
        results.append(r)
        print(fmt(r), flush=True)
    info = {"python": platform.python_version(), "cpus": psutil.cpu_count(),
            "load_avg_at_end": os.getloadavg(), "machine": platform.machine()}
    try:
        import tensorflow as tf
        import keras
        info.update(tensorflow=tf.__version__, keras=keras.__version__)
    except ImportError:
        pass
    os.makedirs(os.path.dirname(cfg.OUT), exist_ok=True)
    runfiles.write_json(cfg.OUT, {"config": cfg, "machine": info, "results": results})
    print(f"wrote {cfg.OUT}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
