"""Stage 6's findings measured against the synthetic truth: diameter and volume errors by nodule size.

For every truth nodule of a run's scored scans (not excluded), the finding that hits it (a candidate above stage
6's THRESHOLD whose centre lies within the nodule's radius, as LUNA16 counts a hit; the highest-scored one when
several do) is compared with the exact truth of synthetic_ct.py (RUN/0_synthetic/truth/<uid>.h5):
- equivalent diameter (mm): the finding's ``equivalent_diameter_mm`` vs the truth's ``diameter_mm`` (the sphere
  of the painted nodule's volume);
- volume (mm^3): ``volume_mm3`` vs the truth's painted voxels x voxel volume;
- longest axial diameter (mm): ``axial_diameter_mm`` vs the same measure (findings.axial_diameter) of the truth
  mask.
Prints and writes OUT/findings_check.json and .md: per size bin the found nodules, the share within DIAMETER_TOL_MM
and VOLUME_TOL, the median and 90th-percentile absolute errors, and the share whose type (solid / part-solid /
ground-glass) is the one the truth drew.

    python benchmarks/findings_check.py --RUN=work/demo
    python benchmarks/findings_check.py --RUN=work/demo --FP_DIR=work/demo/6_fp_reduction --SIZE_BINS=(5.0,10.0)
"""
import csv
import json
import os
import sys

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

RUN = "work/demo"              # a synthetic run: 0_synthetic/truth and a stage-6 folder with findings
FP_DIR = ""                    # stage 6's folder (its candidates_detail.csv); "" = RUN/6_fp_reduction
OUT = ""                       # "" = FP_DIR
SIZE_BINS = (5.0, 10.0)        # truth diameter edges (mm) of the size rows
DIAMETER_TOL_MM = 1.5          # a diameter is right within this many mm
VOLUME_TOL = 0.25              # a volume is right within this share of the truth's


def _findings(detail_csv):
    """{seriesuid: [row, ...]} of the findings (rows with a finding number) of a candidates_detail.csv."""
    out = {}
    with open(detail_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("finding") and r.get("volume_mm3"):
                out.setdefault(r["seriesuid"], []).append(r)
    return out


def _truth_axial(truth, k):
    import findings
    from scipy import ndimage
    region = truth["nodule_mask"] == k
    box = ndimage.find_objects(region.astype(np.uint8))[0]
    return findings.axial_diameter(region[box], truth["attrs"]["spacing"][::-1])[0]


def match_scan(truth, rows):
    """[(truth nodule, finding row or None)] for one scan's non-excluded truth nodules."""
    spacing_xyz = np.asarray(truth["attrs"]["spacing"], float)
    out = []
    for n in truth["nodules"]:
        if n["excluded"]:
            continue
        c = np.array([n["world_x"], n["world_y"], n["world_z"]])
        hits = [r for r in rows if np.linalg.norm(np.array([float(r[f"coord{a}"]) for a in "XYZ"]) - c)
                <= n["diameter_mm"] / 2.0]
        best = max(hits, key=lambda r: float(r["probability"])) if hits else None
        entry = {"diameter_mm": float(n["diameter_mm"]), "volume_mm3": float(n["n_voxels"] * np.prod(spacing_xyz)),
                 "kind": n["kind"].decode() if isinstance(n["kind"], bytes) else str(n["kind"])}
        if best is not None:
            entry["axial_mm"] = _truth_axial(truth, int(n["k"]))
            entry["found"] = {k: float(best[k]) for k in ("equivalent_diameter_mm", "volume_mm3", "axial_diameter_mm")}
            entry["found"]["nodule_type"] = best["nodule_type"]
        out.append(entry)
    return out


def size_label(d, bins):
    edges = (0.0,) + tuple(bins) + (np.inf,)
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo <= d < hi:
            return f"{lo:g}-{hi:g} mm" if np.isfinite(hi) else f">= {lo:g} mm"


def summarize(entries, bins, d_tol, v_tol):
    """Per size bin (and "all >= first edge"): counts, shares within tolerance, errors -> {label: dict}."""
    groups = {}
    for e in entries:
        groups.setdefault(size_label(e["diameter_mm"], bins), []).append(e)
        if e["diameter_mm"] >= bins[0]:
            groups.setdefault(f">= {bins[0]:g} mm (all)", []).append(e)
    out = {}
    for label, es in groups.items():
        found = [e for e in es if "found" in e]
        d_err = np.array([abs(e["found"]["equivalent_diameter_mm"] - e["diameter_mm"]) for e in found])
        a_err = np.array([abs(e["found"]["axial_diameter_mm"] - e["axial_mm"]) for e in found])
        v_err = np.array([abs(e["found"]["volume_mm3"] - e["volume_mm3"]) / e["volume_mm3"] for e in found])
        q = (lambda a, p: round(float(np.percentile(a, p)), 3) if len(a) else None)
        out[label] = {"nodules": len(es), "found": len(found),
                      "diameter_within_tol": round(float(np.mean(d_err <= d_tol)), 3) if len(found) else None,
                      "axial_within_tol": round(float(np.mean(a_err <= d_tol)), 3) if len(found) else None,
                      "volume_within_tol": round(float(np.mean(v_err <= v_tol)), 3) if len(found) else None,
                      "diameter_err_mm_median_p90": [q(d_err, 50), q(d_err, 90)],
                      "axial_err_mm_median_p90": [q(a_err, 50), q(a_err, 90)],
                      "volume_err_rel_median_p90": [q(v_err, 50), q(v_err, 90)],
                      "type_agreement": round(float(np.mean([e["found"]["nodule_type"] == e["kind"] for e in found])), 3)
                      if found else None,
                      "signed_diameter_err_mm_mean": round(float(np.mean(
                          [e["found"]["equivalent_diameter_mm"] - e["diameter_mm"] for e in found])), 3) if found else None}
    return dict(sorted(out.items()))


def table(summary, d_tol, v_tol):
    lines = [f"| truth size | nodules | found | eq. diameter within {d_tol:g} mm | axial diameter within {d_tol:g} mm "
             f"| volume within {100 * v_tol:g} % | eq. diameter error median / p90 (mm) | volume error median / p90 "
             f"| type = truth's |", "|---|---|---|---|---|---|---|---|---|"]
    pct = (lambda v: "-" if v is None else f"{100 * v:.0f} %")
    for label, s in summary.items():
        d, v = s["diameter_err_mm_median_p90"], s["volume_err_rel_median_p90"]
        lines.append(f"| {label} | {s['nodules']} | {s['found']} | {pct(s['diameter_within_tol'])} | "
                     f"{pct(s['axial_within_tol'])} | {pct(s['volume_within_tol'])} | {d[0]} / {d[1]} | "
                     f"{pct(v[0])} / {pct(v[1])} | {pct(s['type_agreement'])} |")
    return "\n".join(lines)


def main(argv=None):
    import configurator
    import synthetic_ct
    cfg = configurator.configure(globals(), sys.argv[1:] if argv is None else argv)
    fp_dir = cfg.FP_DIR or os.path.join(cfg.RUN, "6_fp_reduction")
    detail = os.path.join(fp_dir, "candidates_detail.csv")
    if not os.path.isfile(detail):
        print(f"{detail}: not found (run stage 6 with FINDINGS=True first)", file=sys.stderr)
        return 1
    found = _findings(detail)
    scans = sorted({r["seriesuid"] for r in csv.DictReader(open(detail, newline=""))})
    entries = []
    for uid in scans:
        truth = synthetic_ct.read_truth(os.path.join(cfg.RUN, "0_synthetic", "truth", uid + ".h5"))
        entries += match_scan(truth, found.get(uid, []))
    summary = summarize(entries, cfg.SIZE_BINS, cfg.DIAMETER_TOL_MM, cfg.VOLUME_TOL)
    out = cfg.OUT or fp_dir
    text = (f"Findings vs synthetic truth: {len(scans)} scans, {len(entries)} nodules ({fp_dir})\n\n"
            + table(summary, cfg.DIAMETER_TOL_MM, cfg.VOLUME_TOL))
    print(text)
    with open(os.path.join(out, "findings_check.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "findings_check.json"), "w") as f:
        json.dump({"scans": scans, "summary": summary, "nodules": entries}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
