"""Benchmark of TensorFlow's CPU allocator: minor page faults and time per training step with the BFC allocator
that ``import nasnet_v2`` switches on (TF_CPU_ALLOCATOR_USE_BFC=true) against TensorFlow's default malloc.

On the machine the demo was measured on, glibc maps tensors over its 32 MB mmap ceiling afresh at every step
and the kernel zeroes their pages each time (~500k page faults, ~45 % of a training step's CPU time); the BFC
allocator keeps the memory. The effect depends on the host's kernel and malloc, so it is measured here, not
asserted by a test (tests/test_model.py checks that the variable is set before TensorFlow allocates).

Reads nothing; writes benchmarks/results/bench_allocator.json and prints a table.

    python benchmarks/bench_allocator.py [--SIZE=192 --BATCH=8 --STEPS=3]
"""
import os
import subprocess
import sys
import textwrap

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

# ---------------------------------------------------------------- constants
SIZE = 192                        # input side of the toy network (8 x 192 x 192 x 64 float32 = 75 MB activations)
BATCH = 8                         # slices per training step
STEPS = 3                         # timed steps after 2 warm-up steps
SETTINGS = ("true", "false")      # TF_CPU_ALLOCATOR_USE_BFC values compared ("true" = what nasnet_v2 sets)
TIMEOUT_S = 600                   # limit per measurement process
OUT = os.path.join(_ROOT, "benchmarks", "results", "bench_allocator.json")  # JSON written here

_CHILD = textwrap.dedent("""
    import resource, sys, time
    sys.path.insert(0, {root!r}); import nasnet_v2
    import keras, numpy as np
    x = keras.Input(({size}, {size}, 3)); y = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(y)
    m = keras.Model(x, keras.layers.Conv2D(2, 1, activation="softmax")(y)); m.compile("adam", "mse")
    xb = np.ones(({batch}, {size}, {size}, 3), "float32"); yb = np.full(({batch}, {size}, {size}, 2), 0.5, "float32")
    for _ in range(2): m.train_on_batch(xb, yb)
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range({steps}): m.train_on_batch(xb, yb)
    dt = (time.perf_counter() - t0) / {steps}
    print("RESULT", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / {steps}, dt)
""")


def measure(setting, cfg):
    """Page faults and seconds per step in a fresh process with TF_CPU_ALLOCATOR_USE_BFC=setting."""
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC=setting, TF_CPP_MIN_LOG_LEVEL="2")
    code = _CHILD.format(root=_ROOT, size=cfg.SIZE, batch=cfg.BATCH, steps=cfg.STEPS)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=cfg.TIMEOUT_S, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        return {"error": (p.stderr or p.stdout)[-500:]}
    faults, secs = line[-1].split()[1:]
    return {"page_faults_per_step": float(faults), "s_per_step": float(secs)}


def main(argv=None):
    import configurator
    import runfiles
    cfg = configurator.configure(globals(), argv)
    results = {s: measure(s, cfg) for s in cfg.SETTINGS}
    print(f"{'TF_CPU_ALLOCATOR_USE_BFC':>26} | page faults / step | s / step")
    for s, r in results.items():
        if "error" in r:
            print(f"{s:>26} | failed: {r['error'].splitlines()[-1] if r['error'] else ''}")
        else:
            print(f"{s:>26} | {r['page_faults_per_step']:18.0f} | {r['s_per_step']:.3f}")
    os.makedirs(os.path.dirname(cfg.OUT), exist_ok=True)
    runfiles.write_json(cfg.OUT, {"machine": f"{os.cpu_count()} cores", "config": cfg, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
