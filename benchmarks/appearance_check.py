"""A trained run on scans that look different: a held-out appearance setting never used in training.

Renders a new cohort with synthetic_ct.py at the demo's geometry but another SEED (other patients) and other
appearance ranges (HELDOUT: sharper kernels, more noise, wider margins, more spicules, denser and fainter
nodules, other lung density and vessels: partly outside the ranges the run was trained on), runs stage 1 on
it, stage 5 with the run's model (RUN/4_model/MODEL_FILE) and, when the run has one, stage 6 scoring only with
its false-positive model (RUN/6_fp_reduction/model.keras). Nothing is trained here.

Prints and writes OUT/compare.md: for the run's own test part (in distribution: RUN/5_report and
RUN/6_fp_reduction) and for the held-out cohort, by nodule size: sensitivity at the operating point, Dice on
the found nodules, FP/scan, CPM (stage 5's candidates and after stage 6), sensitivity at 1, 2, 4, 8 FP/scan.
The held-out figures are the ones that count.

    python benchmarks/appearance_check.py --RUN=work/demo
    python benchmarks/appearance_check.py --RUN=work/demo --N_SCANS=4 --OUT=work/heldout_small

Writes OUT (default RUN/appearance_heldout): 0_synthetic/, 1_preprocessed/, 5_predictions/, 5_report/,
6_fp_reduction/ (every held-out scan evaluated: --SCANS=all), compare.md.
"""
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

RUN = "work/demo"             # a trained run: 4_model/best.keras, 5_report (and 6_fp_reduction/model.keras)
OUT = ""                      # "" = RUN/appearance_heldout
MODEL_FILE = "best.keras"      # which checkpoint of RUN/4_model (make demo: last.keras)
TAG = ""                      # another model of the run: RUN/4_model_<TAG>/MODEL_FILE, its in-distribution
                              # report RUN/5_report_<TAG>, held-out folders OUT/5_predictions_<TAG>, ... (stage 6:
                              # the run's own model, rescoring this model's candidates)
SEED = 1                      # the held-out cohort's seed (the demo's is 0: other patients, other nodules)
N_SCANS = 8                   # held-out scans
N_WORKERS = 2                 # stage-1 processes
GEOMETRY = ("--IMAGE_SIZE=512",              # the demo cohort's geometry (synthetic_ct.py settings) ...
            "--PIXEL_SPACING_MM=(0.55,0.95)", "--MAX_NODULES=16", "--EMPTY_EVERY=0", "--N_LIDC_SCANS=0")
HELDOUT = (                                   # ... and another look (in brackets: the training cohort's values)
           "--NOISE_HU=(30.0,65.0)",          # (10, 45): lower doses
           "--NOISE_GRAIN_PX=(0.5,0.75)",      # (0.5, 1.0)
           "--BLUR_PX=(0.3,0.6)",              # (0.4, 1.1): sharp kernels ...
           "--SHARPEN=(0.8,1.6)",              # (0, 1.0): ... with strong edge overshoot
           "--BLUR_Z=(0.5,0.9)",               # (0.3, 0.7): more partial volume along z
           "--LUNG_HU=(-910.0,-850.0)",        # (-880, -820): deeper inspiration
           "--VESSEL_CALIBRE=(1.1,1.4)",       # (0.85, 1.2): wider vessels
           "--VESSEL_DEPTH=(11,12)",           # (9, 12): denser trees
           "--SOLID_HU=(-60.0,50.0)",          # (-20, 80): fainter solid nodules
           "--GGO_HU=(-700.0,-350.0)",         # (-750, -300)
           "--NODULE_TEXTURE_HU=(20.0,60.0)",  # (0, 40): rougher insides
           "--MARGIN_MM=(0.5,1.8)",            # (0, 1.0): vaguer margins
           "--P_SPICULATED=0.5",               # (0.2)
           "--KIND_WEIGHTS=(0.5,0.25,0.25)")   # (0.6, 0.2, 0.2): more subsolid nodules
POST_ARGS = ("--SIZE_BINS=(5.0,10.0)", "--MIN_COMPONENT_VOXELS=3", "--N_PICTURES=4", "--WRITE_MIP=0")  # as the demo
FP_ARGS = ("--PATCH_MM=30", "--VOXEL_MM=1.25", "--SIZE_BINS=(5.0,10.0)")                             # as the demo
FROC_AT = (1.0, 2.0, 4.0, 8.0)         # FP/scan rates of the sensitivities after stage 6


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f} %"


def part_rows(name, report_dir, fp_dir, froc_at=FROC_AT):
    """Rows (one per size bin and 'all') of one evaluated part: stage 5's metrics.json (+ stage 6's), the
    sensitivities after stage 6 at the FP/scan rates ``froc_at``."""
    m = json.load(open(os.path.join(report_dir, "metrics.json")))
    fp = None
    if fp_dir and os.path.isfile(os.path.join(fp_dir, "metrics.json")):
        fp = json.load(open(os.path.join(fp_dir, "metrics.json")))
    rows = []
    for b in list(m["size_bins_mm"]) + ["all"]:
        sens = m["sensitivity"] if b == "all" else m["sensitivity"]["by_size"][b]
        dice = m["nodule_dice_found"]["value"] if b == "all" else m["nodule_dice_found"]["by_size"][b]
        cpm5 = m["cpm"]["value"] if b == "all" else m["cpm"]["by_size"].get(b)
        row = dict(part=name, size=b, found=f"{sens['found']} / {sens['total']}", sens=sens["value"], dice=dice,
                   fp=m["fp_per_scan"]["value"], cpm5=cpm5, cpm6=None, froc6=None)
        if fp:
            after = fp["after"]
            row["cpm6"] = after["cpm"]["value"] if b == "all" else after["cpm"]["by_size"].get(b)
            curve = after["froc"]["sensitivities"] if b == "all" else after["froc"]["by_size"].get(b)
            if curve:
                row["froc6"] = [curve[after["froc"]["fp_rates"].index(r)] for r in froc_at]
        rows.append(row)
    return rows, m


def table(rows, froc_at=FROC_AT):
    head = (["part", "size (mm)", "found (threshold)", "sensitivity", "Dice on found", "FP / scan", "CPM stage 5",
             "CPM stage 6"] + [f"sens. @ {r:g} FP/scan (stage 6)" for r in froc_at])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["part"], r["size"], r["found"], _pct(r["sens"]), _pct(r["dice"]), f"{r['fp']:.2f}",
                 "-" if r["cpm5"] is None else f"{r['cpm5']:.3f}", "-" if r["cpm6"] is None else f"{r['cpm6']:.3f}"]
        cells += [_pct(v) for v in r["froc6"]] if r["froc6"] else ["-"] * len(froc_at)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    import configurator
    import fp_reduction
    import postprocess
    import preprocess
    import synthetic_ct
    cfg = configurator.configure(globals(), argv)
    run = cfg.RUN
    out = cfg.OUT or os.path.join(run, "appearance_heldout")
    sfx = f"_{cfg.TAG}" if cfg.TAG else ""
    model = os.path.join(run, "4_model" + sfx, cfg.MODEL_FILE)
    if not os.path.isfile(model):
        raise SystemExit(f"{model}: no trained model (run make demo first)")
    if not os.path.isfile(os.path.join(out, "0_synthetic", "truth", "index.csv")):
        rc = synthetic_ct.main([f"--WORK_DIR={out}", f"--N_SCANS={cfg.N_SCANS}", f"--SEED={cfg.SEED}", *cfg.GEOMETRY,
                                *cfg.HELDOUT])
        if rc:
            raise SystemExit(f"stage 0 failed on {out}")
    rc = preprocess.main([f"--WORK_DIR={out}", f"--N_WORKERS={cfg.N_WORKERS}"])
    if rc:
        raise SystemExit(f"stage 1 failed on {out}")
    report = os.path.join(out, "5_report" + sfx)
    postprocess.main([f"--WORK_DIR={out}", "--SCANS=all", f"--MODEL={model}", f"--PRED_DIR={out}/5_predictions{sfx}",
                      f"--REPORT_DIR={report}", *cfg.POST_ARGS])
    fp_model = os.path.join(run, "6_fp_reduction", "model.keras")
    if os.path.isfile(fp_model):
        fp_reduction.main([f"--WORK_DIR={out}", "--SCANS=all", f"--MODEL={fp_model}", f"--CANDIDATES_DIR={report}",
                           f"--OUT_DIR={out}/6_fp_reduction{sfx}", *cfg.FP_ARGS])
    rows, m_in = part_rows(f"in distribution {cfg.TAG}".strip(), os.path.join(run, "5_report" + sfx),
                           os.path.join(run, "6_fp_reduction" + sfx), cfg.FROC_AT)
    held, m_out = part_rows(f"held-out {cfg.TAG}".strip(), report, os.path.join(out, "6_fp_reduction" + sfx),
                            cfg.FROC_AT)
    md = (f"Run {run}: in distribution {m_in['n_scans']} scans / {m_in['n_nodules']} nodules; held-out "
          f"(SEED={cfg.SEED}, {' '.join(cfg.HELDOUT)}) {m_out['n_scans']} scans / {m_out['n_nodules']} nodules.\n\n"
          + table(rows + held, cfg.FROC_AT))
    print(md)
    with open(os.path.join(out, f"compare{sfx}.md"), "w") as f:
        f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
