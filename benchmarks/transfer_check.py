"""Transfer: a trained run's stage-5 and stage-6 models on held-out cohorts they never saw, scored by LUNA16's rules.

Renders each cohort of COHORTS with synthetic_ct.py (512 px at the geometry of real scans, a seed of its own: other
patients than the run's), runs stage 1 on it, stage 5 over every scan with the run's model (RUN/4_model/MODEL_FILE)
and stage 6, scoring only, with the run's false-positive model (RUN/6_fp_reduction/model.keras, which adds its
image blobs). Nothing is trained or tuned here. Every figure comes from metrics.py, per cohort and for all cohorts
pooled into one FROC: the candidate recall by size (the nodules the final list holds, at most 100 candidates a scan:
stage 6 cannot rank a nodule no candidate holds), candidates per scan, the CPM of stage 5's list and after stage 6
with 95 % bootstrap intervals over the scans, by size, and the sensitivity at 1 FP/scan.

The cohorts (synthetic_ct.py settings added to GEOMETRY; in brackets what the demo trains on):
- seed:  other patients, the training cohort's look and sizes (the in-distribution reference);
- look:  appearance outside the training ranges: noise, kernels, lung density, vessels, fainter and vaguer
         nodules (appearance_check.HELDOUT);
- small: small nodules, 3-11 mm (3.5-30), 70 % of them against a vessel (30 %), 20 % on the pleura (30 %).
SEED_OFFSET draws fresh cohorts (added to every cohort's seed); the defaults are the ones of benchmarks/RESULTS.md.

    python benchmarks/transfer_check.py --RUN=work/demo --MODEL_FILE=last.keras
    python benchmarks/transfer_check.py --RUN=work/long --MODEL_FILE=best.keras --OUT=work/long/transfer
    python benchmarks/transfer_check.py --RUN=work/demo "--COHORTS=('small',)" --N_SCANS=12 --SEED_OFFSET=100

Writes OUT (default RUN/transfer): <cohort>/ (0_synthetic, 1_preprocessed, 5_predictions, 5_report,
6_fp_reduction: the stages' own outputs; a rerun skips what is done with the same models), pooled/ (the pooled
candidates, annotations and scan list metrics.py scored), transfer.json (every figure), transfer.md (the table
and the targets: recall >= 95 % overall and >= 90 % under 5 mm, CPM >= 0.80 overall and >= 0.60 at 5-10 mm).
"""
import glob
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import appearance_check  # noqa: E402

RUN = "work/demo"             # a trained run: 4_model/MODEL_FILE and 6_fp_reduction/model.keras
MODEL_FILE = "last.keras"     # which checkpoint of RUN/4_model (make demo evaluates last.keras)
OUT = ""                      # "" = RUN/transfer
COHORTS = ("seed", "look", "small")   # the cohorts run, from the list above
N_SCANS = 6                   # scans per cohort [>= 1]
SEED_OFFSET = 0               # added to every cohort's seed: another draw of the same cohorts [>= 0]
N_WORKERS = 2                 # stage-0 and stage-1 processes [>= 1]
BOOTSTRAP = 1000              # bootstrap draws of the scans for the 95 % intervals [>= 0]
SIZE_BINS = (5.0, 10.0)       # nodule diameter bin edges (mm): < 5, 5-10, >= 10 [> 0]
POST_ARGS = ("--MIN_COMPONENT_VOXELS=3", "--N_PICTURES=0", "--WRITE_MIP=0", "--WRITE_NIFTI=0")  # stage 5 as the demo
FP_ARGS = ("--FINDINGS=0",)   # stage 6 scoring (its patch geometry, blobs and threshold come with its model)
# (figure, size bin, at least): what detection that transfers reaches
_TARGETS = (("candidate recall", "all", 0.95), ("candidate recall", "<5", 0.90), ("CPM after stage 6", "all", 0.80),
            ("CPM after stage 6", "5-10", 0.60))

_COHORTS = {                  # name -> (seed, synthetic_ct.py settings added to GEOMETRY)
    "seed": (101, ()),
    "look": (102, appearance_check.HELDOUT),
    "small": (103, ("--NODULE_DIAMETER_MM=(3.0,11.0)", "--P_VESSEL=0.7", "--P_PLEURAL=0.2")),
}


def cohort_args(name, n_scans, seed_offset=0):
    """synthetic_ct.py's settings of cohort ``name``."""
    if name not in _COHORTS:
        raise SystemExit(f"--COHORTS: unknown cohort {name!r} (known: {', '.join(_COHORTS)})")
    seed, extra = _COHORTS[name]
    return [f"--N_SCANS={n_scans}", f"--SEED={seed + seed_offset}", *appearance_check.GEOMETRY, *extra]


def _done(folder, model):
    """Whether a stage's output folder holds its candidates, made with ``model`` (its config.json's MODEL)."""
    cfg = os.path.join(folder, "config.json")
    if not (os.path.isfile(os.path.join(folder, "candidates.csv")) and os.path.isfile(cfg)):
        return False
    return json.load(open(cfg)).get("MODEL") == model


def run_cohort(cfg, name, work, model5, model6):
    """Stages 0, 1, 5 and 6 (scoring) of one cohort in ``work``; each skipped when its output is there."""
    import fp_reduction
    import postprocess
    import preprocess
    import synthetic_ct
    if not os.path.isfile(os.path.join(work, "0_synthetic", "truth", "index.csv")):
        if synthetic_ct.main([f"--WORK_DIR={work}", f"--N_WORKERS={cfg.N_WORKERS}",
                              *cohort_args(name, cfg.N_SCANS, cfg.SEED_OFFSET)]):
            raise SystemExit(f"{name}: stage 0 failed in {work}")
    if preprocess.main([f"--WORK_DIR={work}", f"--N_WORKERS={cfg.N_WORKERS}"]):
        raise SystemExit(f"{name}: stage 1 failed in {work}")
    bins = f"--SIZE_BINS={tuple(cfg.SIZE_BINS)}"
    if not _done(os.path.join(work, "5_report"), model5):
        postprocess.main([f"--WORK_DIR={work}", "--SCANS=all", f"--MODEL={model5}", bins, *cfg.POST_ARGS])
    if not _done(os.path.join(work, "6_fp_reduction"), model6):
        fp_reduction.main([f"--WORK_DIR={work}", "--SCANS=all", f"--MODEL={model6}", bins, *cfg.FP_ARGS])


def stage1_uids(work):
    """The seriesuids of a cohort's stage-1 files (the scans scored: one that failed later still counts)."""
    import runfiles
    return sorted(runfiles.uid_of(p) for p in glob.glob(os.path.join(work, "1_preprocessed", "*.h5")))


def score(works, folder, n_boot, size_bins):
    """metrics.py's figures of the cohorts ``works`` pooled (one cohort: its own) -> {"stage5": ..., "stage6": ...,
    "scans": n}; the pooled files are written to ``folder``."""
    import candidates
    import metrics
    os.makedirs(folder, exist_ok=True)
    uids = [u for w in works for u in stage1_uids(w)]
    truth = candidates.write_truth(folder, [os.path.join(w, "1_preprocessed") for w in works], uids)
    scans = candidates.write_scan_list(os.path.join(folder, "seriesuids.csv"), uids)
    out = {"scans": len(uids)}
    for key, sub in (("stage5", "5_report"), ("stage6", "6_fp_reduction")):
        path = os.path.join(folder, f"candidates_{key}.csv")
        candidates.pool_files(path, [os.path.join(w, sub, "candidates.csv") for w in works])
        out[key] = metrics.evaluate_paths(truth[0], path, truth[1], scans, n_boot, size_bins)
    return out


def _pct(f):
    return "-" if not f["total"] else f"{100 * f['value']:.0f} % ({f['found']}/{f['total']})"


def _cpm(fig, b="all"):
    cpm = fig["cpm"]
    v, ci = (cpm["value"], cpm.get("ci95")) if b == "all" else (cpm["by_size"].get(b), cpm.get("ci95_by_size", {}).get(b))
    if v is None:
        return "-"
    return f"{v:.3f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def row_cells(name, res, bins):
    """One table row: the cohort, scans, nodules, candidates a scan, recall of the final list (all and by size),
    CPM of stage 5 and after stage 6 (all and by size), sensitivity at 1 FP/scan after stage 6."""
    s5, s6 = res["stage5"], res["stage6"]
    c = s6["counts"]
    rec = s6["candidate_recall"]
    one = s6["froc"]["sensitivities"][s6["froc"]["fp_rates"].index(1.0)]
    return ([name, str(res["scans"]), str(c["nodules"]), f"{c['candidates'] / max(res['scans'], 1):.0f}", _pct(rec)]
            + [_pct(rec["by_size"][b]) for b in bins] + [_cpm(s5), _cpm(s6)] + [_cpm(s6, b) for b in bins]
            + [f"{one:.2f}"])


def targets(res):
    """The targets of _TARGETS on a result (the pooled one) -> [(text, value, met)]."""
    out = []
    for what, b, goal in _TARGETS:
        fig = res["stage6"]
        if what == "candidate recall":
            v = fig["candidate_recall"]["value"] if b == "all" else fig["candidate_recall"]["by_size"][b]["value"]
        else:
            v = fig["cpm"]["value"] if b == "all" else fig["cpm"]["by_size"].get(b)
        v = float("nan") if v is None else float(v)
        out.append((f"{what} ({b} mm) >= {goal:.2f}", v, v >= goal))
    return out


def markdown(results, run, model5, model6, bins):
    head = (["cohort", "scans", "nodules", "candidates / scan", "recall (all)"] + [f"recall {b} mm" for b in bins]
            + ["CPM stage 5", "CPM after stage 6"] + [f"CPM {b} mm" for b in bins] + ["sens. @ 1 FP/scan"])
    lines = [f"Models: {model5} (stage 5), {model6} (stage 6); run {run}. CPM with 95 % bootstrap intervals "
             "(scans resampled); recall = nodules hit by a candidate of the final list (<= 100 a scan).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row_cells(n, r, bins)) + " |" for n, r in results.items()]
    lines += ["", "Targets (pooled): " + "; ".join(f"{t} {v:.3f} {'met' if ok else 'NOT met'}"
                                                   for t, v, ok in targets(results["pooled"]))]
    return "\n".join(lines) + "\n"


def main(argv=None):
    import configurator
    import metrics
    import runfiles
    cfg = configurator.configure(globals(), argv)
    run = cfg.RUN
    out = cfg.OUT or os.path.join(run, "transfer")
    model5 = os.path.abspath(os.path.join(run, "4_model", cfg.MODEL_FILE))
    model6 = os.path.abspath(os.path.join(run, "6_fp_reduction", "model.keras"))
    for m in (model5, model6):
        if not os.path.isfile(m):
            raise SystemExit(f"{m}: no trained model (run make demo first)")
    for name in cfg.COHORTS:
        cohort_args(name, cfg.N_SCANS)                      # unknown names refused before any work
    works = {n: os.path.join(out, n) for n in cfg.COHORTS}
    for name, work in works.items():
        run_cohort(cfg, name, work, model5, model6)
    bins = list(metrics.size_bin_names(cfg.SIZE_BINS))
    results = {n: score([w], os.path.join(w, "scored"), cfg.BOOTSTRAP, cfg.SIZE_BINS) for n, w in works.items()}
    results["pooled"] = score(list(works.values()), os.path.join(out, "pooled"), cfg.BOOTSTRAP, cfg.SIZE_BINS)
    md = markdown(results, run, model5, model6, bins)
    print(md)
    runfiles.write_json(os.path.join(out, "transfer.json"), {"results": results, "settings": dict(cfg),
                                                              "models": [model5, model6],
                                                              "cohorts": {n: cohort_args(n, cfg.N_SCANS,
                                                                                         cfg.SEED_OFFSET)
                                                                          for n in cfg.COHORTS}})
    with open(os.path.join(out, "transfer.md"), "w") as f:
        f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
