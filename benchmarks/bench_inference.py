"""Inference seconds per scan and peak memory of stage 5's predictor (inference.Predictor) (the network over every slice of a
512x512 scan, input geometry = table.py's defaults: PIXEL_MM mm pixels over CROP_MM mm, or the thesis's
400x400 raw-pixel crop with --PIXEL_MM=0), for the figure-3 network (random weights: speed does not depend on
them) and optionally the U-Net, at two settings measured in the same run: stage 5's defaults (postprocess.py's
TTA and LUNG_WINDOW_MM) and the previous ones (PREVIOUS: 4 flips over the whole input); prints the ratio.

Writes a synthetic 512 x 512 phantom (synthetic_ct.py) through stage 1 in a scratch folder, saves an
untrained model per variant, and times inference.Predictor.predict on the scan in a fresh process each
(so peak RSS is that of one inference process). Writes benchmarks/results/bench_inference.json.

    python benchmarks/bench_inference.py [--VARIANTS=('figure3',) --N_SLICES=130]
"""
import json
import os
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = ("figure3",)        # networks timed
N_SLICES = 130                 # slices of the benchmark scan (512 x 512 each)
BATCH_SIZE = 8                 # slices per prediction call (postprocess.py's default)
PIXEL_MM = 0.7                 # network-input geometry written beside the model (table.py's meaning; 0 = raw pixels)
CROP_MM = 300.0                # input side in mm (PIXEL_MM > 0)
CONTEXT_SLICES = 3             # input channels (the demo's)
CONTEXT_MM = 2.5               # channel distance in mm (PIXEL_MM > 0)
PREVIOUS = (4, -1.0)           # (TTA, LUNG_WINDOW_MM) of stage 5 before the lung window: 4 flips, the whole input
OUT_DIR = os.path.join(_ROOT, "benchmarks", "results")   # where bench_inference.json goes


def _child(work, model_path, tta, batch_size, window_mm):
    """Time one scan's prediction in this (fresh) process; print a RESULT line."""
    import glob
    import inference
    from bench_preprocess import peak_mb      # VmHWM: this process's own peak, not its parent's
    import ct_io
    path = sorted(glob.glob(os.path.join(work, "1_preprocessed", "*.h5")))[0]
    scan = ct_io.read_scan_h5(path, arrays=("hu", "lung_mask"))
    predictor = inference.Predictor(model_path, tta=int(tta))
    t0 = time.perf_counter()
    spacing = scan["attrs"]["spacing"]
    predictor.check()
    load_s = time.perf_counter() - t0
    args = (scan["hu"], scan["lung_mask"], int(batch_size), spacing, True, float(window_mm))  # lung slices only
    t0 = time.perf_counter()
    predictor.predict(*args)
    first_s = time.perf_counter() - t0             # includes building the network at its input and tracing it
    t0 = time.perf_counter()
    predictor.predict(*args)
    second_s = time.perf_counter() - t0
    g = predictor.lung_window(predictor.geometry(scan["hu"].shape, spacing), scan["lung_mask"], None, float(window_mm))
    print("RESULT " + json.dumps({"tta": predictor.tta, "lung_window_mm": float(window_mm), "input": [g.h, g.w],
                                  "load_s": load_s, "first_scan_s": first_s, "scan_s": second_s,
                                  "s_per_slice": second_s / scan["hu"].shape[0], "shape": list(scan["hu"].shape),
                                  "peak_rss_mb": peak_mb()}))


def main(argv=None):
    import configurator
    cfg = configurator.configure(globals(), argv)
    os.makedirs(cfg.OUT_DIR, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        import synthetic_ct
        import preprocess
        data = os.path.join(work, "data")
        synthetic_ct.generate_cohort(data, N_SCANS=1, N_LIDC_SCANS=0, SEED=1, N_SLICES=(cfg.N_SLICES, cfg.N_SLICES))
        preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={data}/luna16", f"--WORK_DIR={work}", "--N_WORKERS=1"])
        for variant in cfg.VARIANTS:
            model_path = os.path.join(work, f"{variant}.keras")
            build = (f"import sys; sys.path.insert(0, {_ROOT!r}); import nasnet_v2 as n; "
                     f"n.get_model((400, 400, {cfg.CONTEXT_SLICES}), variant={variant!r}).save({model_path!r})")
            subprocess.run([sys.executable, "-c", build], check=True)
            with open(os.path.join(work, "config.json"), "w") as f:      # what training would record
                json.dump({"CROP": 0, "CONTEXT_SLICES": cfg.CONTEXT_SLICES, "PIXEL_MM": cfg.PIXEL_MM,
                           "CROP_MM": cfg.CROP_MM, "CONTEXT_MM": cfg.CONTEXT_MM}, f)
            import postprocess
            for name, (tta, window) in (("previous", cfg.PREVIOUS), ("default", (postprocess.TTA,
                                                                                 postprocess.LUNG_WINDOW_MM))):
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", work, model_path, str(tta),
                                    str(cfg.BATCH_SIZE), str(window)], capture_output=True, text=True)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                r = json.loads(line[-1][7:]) if line else {"error": (p.stderr or p.stdout)[-500:]}
                results[f"{variant} {name}"] = r
                print(variant, name, json.dumps(r))
            old, new = results[f"{variant} previous"], results[f"{variant} default"]
            if "scan_s" in old and "scan_s" in new:
                print(f"{variant}: default {new['scan_s']:.1f} s a scan vs previous {old['scan_s']:.1f} s: "
                      f"{old['scan_s'] / new['scan_s']:.2f}x faster")
    doc = {"machine": f"{os.cpu_count()} cores", "config": cfg, "results": results}
    with open(os.path.join(cfg.OUT_DIR, "bench_inference.json"), "w") as f:
        json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        sys.exit(main())
