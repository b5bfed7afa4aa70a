"""Compare the results of several trained runs in one markdown table (the demo vs its U-Net baseline, vs
CONTEXT_SLICES=1, vs the long preset, ...), or print one run's answer (--SUMMARY).

Each run is a NAME=REPORT_DIR pair: REPORT_DIR is a postprocess.py report folder (metrics.json); the model
that produced it (metrics.json's "model") gives its training record (config.json, state.json, history.csv
beside the model). Nothing is recomputed: the figures are the ones the stages wrote.

--SUMMARY=<run folder> prints what `make demo` ends with: the final candidates file (6_fp_reduction/candidates.csv),
CPM and the sensitivity at SUMMARY_AT false positives per scan by nodule size, before and after stage 6 (read from
6_fp_reduction/metrics.json; stage 5's 5_report/metrics.json alone when stage 6 has not run), the operating point
and the report folder.

Run
    python benchmarks/compare_runs.py "--RUNS=('figure3=work/demo/5_report','unet=work/demo/5_report_unet')"
    python benchmarks/compare_runs.py ... --OUT=benchmarks/results/compare.md
    python benchmarks/compare_runs.py --SUMMARY=work/demo
"""
import csv
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

RUNS = ("demo=work/demo/5_report",)   # NAME=REPORT_DIR pairs, in table order
OUT = ""                               # also write the table to this file ("" = print only)
FROC_AT = (1.0, 2.0, 4.0, 8.0)         # FP/scan rates of the by-size FROC table
SUMMARY = ""                           # a run folder: print its answer (stage 5 and stage 6) instead of a table
SUMMARY_AT = (1.0, 4.0)                # FP/scan rates the summary reads the sensitivity at


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f} %"


def run_row(name, report_dir):
    """One run's figures: training record (steps, minutes, input) and the test metrics by nodule size."""
    metrics_path = os.path.join(report_dir, "metrics.json")
    m = json.load(open(metrics_path))
    model_dir = os.path.dirname(m["model"])                              # absolute, as postprocess.py wrote it
    if os.path.getmtime(os.path.join(model_dir, "state.json")) > os.path.getmtime(metrics_path):
        print(f"WARNING: {name}: {model_dir} was trained again after {metrics_path} was written (a moved or "
              f"rerun folder?): its training record may not be the one that gave these metrics", file=sys.stderr)
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    state = json.load(open(os.path.join(model_dir, "state.json")))
    with open(os.path.join(model_dir, "history.csv")) as f:
        epochs = sum(1 for _ in csv.DictReader(f))
    big = [b for b in m["size_bins_mm"] if b.startswith(">=")][-1]     # the largest size bin (the demo's: >= 10 mm)
    sens_big = m["sensitivity"]["by_size"][big]
    return {
        "run": name,
        "variant": cfg["VARIANT"],
        "input": "x".join(str(v) for v in cfg["INPUT_SHAPE"]),
        "steps": epochs * cfg["STEPS_PER_EPOCH"] if cfg["STEPS_PER_EPOCH"] else None,
        "train_min": state["train_seconds"] / 60,
        "best_val_dice": state["best_val_dice"],
        "big_bin": big,
        "big_found": f"{sens_big['found']} / {sens_big['total']}",
        "big_dice_found": m["nodule_dice_found"]["by_size"][big],
        "sens_by_size": {b: m["sensitivity"]["by_size"][b]["value"] for b in m["size_bins_mm"]},
        "sensitivity": m["sensitivity"]["value"],
        "fp_per_scan": m["fp_per_scan"]["value"],
        "cpm": m["cpm"]["value"],
        "slice_dice": m["slice_dice"]["value"],
        "infer_s_per_scan": m["timing"]["seconds_per_scan"],
        "n_scans": m["n_scans"],
        "n_nodules": m["n_nodules"],
        "fp_rates": m["froc"]["fp_rates"],
        "froc": dict(m["froc"]["by_size"], all=m["froc"]["sensitivities"]),
        "cpm_by_size": dict(m["cpm"]["by_size"], all=m["cpm"]["value"]),
        "recall": {**{b: v["value"] for b, v in m["candidate_recall"]["by_size"].items()},
                   "all": m["candidate_recall"]["value"]} if "candidate_recall" in m else {},
    }


def table(rows):
    bins = list(rows[0]["sens_by_size"])
    head = (["run", "network, input", "steps (min)", "best val Dice", f"{rows[0]['big_bin']} mm found",
             "Dice (found)"] + [f"sens. {b} mm" for b in bins] +
            ["sens. all", "FP / scan", "CPM", "slice Dice", "inference s / scan"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        steps = "-" if r["steps"] is None else str(r["steps"])
        cells = ([r["run"], f"{r['variant']}, {r['input']}", f"{steps} ({r['train_min']:.1f})", f"{r['best_val_dice']:.3f}",
                  r["big_found"], _pct(r["big_dice_found"])] + [_pct(r["sens_by_size"][b]) for b in bins] +
                 [_pct(r["sensitivity"]), f"{r['fp_per_scan']:.2f}", "-" if r["cpm"] is None else f"{r['cpm']:.3f}",
                  _pct(r["slice_dice"]), f"{r['infer_s_per_scan']:.1f}"])
        lines.append("| " + " | ".join(cells) + " |")
    n = {(r["n_scans"], r["n_nodules"]) for r in rows}
    note = (f"Test scans / nodules: {rows[0]['n_scans']} / {rows[0]['n_nodules']}" if len(n) == 1
            else "WARNING: the runs were tested on different scans: " + ", ".join(f"{r['run']} {r['n_scans']}/{r['n_nodules']}" for r in rows))
    return "\n".join(lines) + "\n\n" + note + "\n"


def froc_table(rows, rates=None):
    """Sensitivity at some FROC rates (FP/scan over the candidates; default FROC_AT), CPM and candidate recall,
    by nodule size."""
    rates = FROC_AT if rates is None else rates
    bins = list(rows[0]["sens_by_size"]) + ["all"]
    head = ["run", "size (mm)"] + [f"sens. @ {r:g} FP/scan" for r in rates] + ["CPM", "candidate recall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for b in bins:
            sens = r["froc"].get(b)
            cells = [r["run"], b] + [_pct(sens[r["fp_rates"].index(rate)]) if sens else "-" for rate in rates]
            cpm = r["cpm_by_size"].get(b)
            cells += ["-" if cpm is None else f"{cpm:.3f}", _pct(r["recall"].get(b))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _at(m, size, rate):
    """Sensitivity of metrics ``m`` (a froc_summary block) at ``rate`` FP/scan for a size bin (or "all")."""
    froc = m["froc"]
    sens = froc["sensitivities"] if size == "all" else froc["by_size"].get(size)
    if not sens or rate not in froc["fp_rates"]:
        return None
    return sens[froc["fp_rates"].index(rate)]


def _cpm(m, size):
    return m["cpm"]["value"] if size == "all" else m["cpm"]["by_size"].get(size)


def _ci(block, size):
    """' (lo-hi)': the CPM's 95 % bootstrap interval of a size bin ('all' = overall), '' when not recorded."""
    c = block.get("cpm", {})
    ci = c.get("ci95") if size == "all" else (c.get("ci95_by_size") or {}).get(size)
    return f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""


def summary(run, rates=SUMMARY_AT):
    """The answer of the run in folder ``run`` as text: the final candidates file, CPM and sensitivity at ``rates``
    FP/scan by nodule size before and after stage 6, the operating point, the report folder."""
    fp_path = os.path.join(run, "6_fp_reduction", "metrics.json")
    report = os.path.join(run, "5_report")
    if os.path.isfile(fp_path):
        m = json.load(open(fp_path))
        blocks = [("stage 5", m["before"]), ("after stage 6", m["after"])]
        final = os.path.join(run, "6_fp_reduction", "candidates.csv")
    elif os.path.isfile(os.path.join(report, "metrics.json")):
        m = json.load(open(os.path.join(report, "metrics.json")))
        blocks = [("stage 5", m)]
        final = os.path.join(report, "candidates.csv")
    else:
        raise SystemExit(f"{run}: no 6_fp_reduction/metrics.json and no 5_report/metrics.json (run the stages first)")
    last = blocks[-1][1]
    if last is None or "froc" not in last:
        raise SystemExit(f"{run}: no FROC in its metrics (scans without annotations?)")
    sizes = list(last["candidate_recall"]["by_size"]) + ["all"]
    count = lambda b: (last["candidate_recall"]["by_size"][b]["total"] if b != "all"
                       else last["candidate_recall"]["total"])
    cpm = lambda blk, b: "-" if blk is None or _cpm(blk, b) is None else f"{_cpm(blk, b):.3f}" + _ci(blk, b)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"
    head = ["size (mm)", "nodules"]
    for name, _ in blocks:
        head += [f"CPM {name}"] + [f"@{r:g} FP/scan" for r in rates]
    rows = [head]
    for b in sizes:
        row = [b, str(count(b))]
        for _, blk in blocks:
            row += [cpm(blk, b)] + [pct(_at(blk, b, r) if blk else None) for r in rates]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"The pipeline's answer ({run}):",
             f"  final candidates: {final}",
             f"  report:           {report}  (metrics.json, nodules.csv, candidates.csv, froc.png, pictures/)",
             f"  {m.get('n_scans')} scans, {m.get('n_nodules')} nodules; CPM (LUNA16's FROC) and sensitivity at "
             + ", ".join(f"{r:g}" for r in rates) + " FP/scan by nodule diameter (CPM's 95 % bootstrap interval "
             "over the scans in brackets):"]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    op = last.get("operating_point")
    if op:
        lines.append(f"  operating point ({blocks[-1][0]}, score > {op['threshold']:g}): sensitivity "
                     f"{pct(op['sensitivity']['value'])} at {op['fp_per_scan']:.2f} FP/scan")
    return "\n".join(lines)


def main(argv=None):
    import configurator
    cfg = configurator.configure(globals(), argv)
    if cfg.SUMMARY:
        print(summary(cfg.SUMMARY, tuple(cfg.SUMMARY_AT)))
        return 0
    rows = []
    for pair in cfg.RUNS:
        name, _, folder = pair.partition("=")
        if not folder:
            raise SystemExit(f"--RUNS: expected NAME=REPORT_DIR, got {pair!r}")
        if not os.path.isfile(os.path.join(folder, "metrics.json")):
            raise SystemExit(f"{name}: no metrics.json in {folder} (run postprocess.py first)")
        rows.append(run_row(name, folder))
    md = table(rows) + "\n" + froc_table(rows, tuple(cfg.FROC_AT))
    print(md)
    if cfg.OUT:
        import runfiles
        os.makedirs(os.path.dirname(os.path.abspath(cfg.OUT)), exist_ok=True)
        with runfiles.atomic(cfg.OUT) as tmp:
            open(tmp, "w").write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
