"""`make bench`: run the stage benchmarks one after another and write one table (markdown and JSON).

Runs bench_preprocess.py, bench_data.py, bench_model.py, bench_inference.py and bench_allocator.py (each writes its own JSON in
benchmarks/results/), then collects the figures, each with its reference measured in the same run where one
exists, into benchmarks/results/bench_table.md and bench_table.json.

Run
    python benchmarks/run_all.py [--SKIP=('model',)]     # SKIP: benchmarks not rerun (their last JSON is used)
"""
import json
import os
import platform
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
_RESULTS = os.path.join(_ROOT, "benchmarks", "results")

SKIP = ()                      # names among preprocess, data, model, inference, allocator not to rerun
MODEL_ARGS = ("--MODES=('graph','eager')",)   # bench_model.py arguments (the full mode comparison takes ~25 min)


def _load(name):
    path = os.path.join(_RESULTS, f"bench_{name}.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def table(pre, data, model, inf):
    rows = []
    if pre:
        s = pre["summary"]
        rows += [
            ("preprocess: thesis lung mask, s/scan (1 core)", s["thesis"]["s_per_scan"],
             "slice-by-slice reference", s["reference"]["s_per_scan"], s["reference"]["s_per_scan"] / s["thesis"]["s_per_scan"]),
            ("preprocess: thesis mask agreement with the reference (min Dice)", s["thesis_vs_reference_dice_min"], "", None, None),
            ("preprocess: refined lung mask, s/scan", s["refined"]["s_per_scan"], "thesis mask", s["thesis"]["s_per_scan"],
             s["refined"]["s_per_scan"] / s["thesis"]["s_per_scan"]),
            ("preprocess: peak memory per worker, MB (thesis / refined)", f"{s['thesis']['peak_mb']:.0f} / {s['refined']['peak_mb']:.0f}",
             "reference", s["reference"]["peak_mb"], None),
            ("preprocess: whole stage 1 (read, mask, wand labels, write), s/scan", s["stage1_wall_s_per_scan"], "", None, None),
            ("lung Dice vs truth, refined (mean / min)", f"{s['refined']['lung_dice_mean']:.3f} / {s['refined']['lung_dice_min']:.3f}",
             "thesis", f"{s['thesis']['lung_dice_mean']:.3f} / {s['thesis']['lung_dice_min']:.3f}", None),
        ]
    if data:
        t10, t50 = data["table"]["10"], data["table"]["50"]
        rows.append(("table.py: slices/s (512 px scans)", t10["slices_per_s"], "", None, None))
        rows.append(("table.py: peak memory, MiB, 50 scans", t50["peak_rss_mib"], "10 scans", t10["peak_rss_mib"],
                     t50["peak_rss_mib"] / t10["peak_rss_mib"]))
        src_ = data["source"]
        best = max(src_["batches_per_s_workers0"], src_.get("batches_per_s_threads2", 0))
        step = data.get("model_step_s") or 0
        rows.append(("data source: batches/s (batch 12, 400x400, augmented)", best,
                     f"training steps/s ({data.get('model_step_s_source', '')})", 1 / step if step else None,
                     best * step if step else None))
    if model:
        for m in model.get("results", []):
            if "ms_per_step" not in m:
                continue
            rows.append((f"train {m['model']} {m['size']} px, batch {m['batch']}, {m['mode']}: ms/step "
                         f"(first step s, peak MiB)", f"{m['ms_per_step']:.0f} ({m['first_step_s']:.0f}, "
                         f"{m.get('peak_rss_mib', 0):.0f})", "", None, None))
    if inf:
        for v, r in inf["results"].items():
            if "scan_s" in r:
                rows.append((f"inference {v} 400x400: s per {r['shape'][0]}-slice scan (peak MB)",
                             f"{r['scan_s']:.1f} ({r['peak_rss_mb']:.0f})", "", None, None))
    return rows


def _commit():
    """The checked-out commit (short hash, "+changes" when the tree differs from it), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+changes" if dirty else "")) or "unknown"


def main(argv=None):
    import configurator
    cfg = configurator.configure(globals(), argv)
    os.makedirs(_RESULTS, exist_ok=True)
    runs = {"preprocess": [], "data": ["--MODEL_STEP=True"], "model": list(cfg.MODEL_ARGS), "inference": [],
            "allocator": []}
    times = {}
    for name, args in runs.items():
        if name in cfg.SKIP:
            continue
        t0 = time.time()
        print(f"== bench_{name}.py {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, os.path.join(_ROOT, "benchmarks", f"bench_{name}.py"), *args], cwd=_ROOT, check=True)
        times[name] = time.time() - t0
    rows = table(_load("preprocess"), _load("data"), _load("model"), _load("inference"))
    alloc = (_load("allocator") or {}).get("results", {})
    if "page_faults_per_step" in alloc.get("true", {}) and "page_faults_per_step" in alloc.get("false", {}):
        t, f = alloc["true"], alloc["false"]
        rows.append(("TensorFlow BFC allocator (import nasnet_v2): page faults per step (s/step)",
                     f"{t['page_faults_per_step']:.0f} ({t['s_per_step']:.3f})", "malloc (USE_BFC=false)",
                     f"{f['page_faults_per_step']:.0f} ({f['s_per_step']:.3f})", None))

    def fmt(v):
        return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    import runfiles
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    when = f"{time.strftime('%Y-%m-%d')}, commit {_commit()}"
    lines = [f"Measured on: {machine}; {when}", "", "| figure | value | reference | reference value | ratio |",
             "|---|---|---|---|---|"]
    lines += [f"| {a} | {fmt(b)} | {c} | {fmt(d)} | {fmt(e)} |" for a, b, c, d, e in rows]
    md = "\n".join(lines) + "\n"
    with runfiles.atomic(os.path.join(_RESULTS, "bench_table.md")) as tmp:
        open(tmp, "w").write(md)
    runfiles.write_json(os.path.join(_RESULTS, "bench_table.json"),
                        {"machine": machine, "measured": when, "rows": rows, "bench_seconds": times, "config": cfg})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
