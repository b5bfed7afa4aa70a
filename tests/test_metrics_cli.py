"""`python metrics.py` (the evaluation command) against LUNA16's official evaluation script: the script's figures
on the fixture CSVs of tests/fixtures/luna16_eval/ (expected.json says how they were measured) are matched to
1e-6: CPM, the sensitivities at the 7 rates and the script's counts, case by case (excluded findings, ties,
scans not in the list, scans without candidates, several hits on a nodule, the 100-candidate cut, no false
positive, a seeded random cohort). Where the project deliberately differs (no nodule hit: the script's NaN,
here 0) both numbers are asserted."""
import json
import math
import os
import subprocess
import sys

import pytest

import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "luna16_eval")
EXPECTED = json.load(open(os.path.join(FIX, "expected.json")))
CASES = EXPECTED["cases"]


def args(case, *more):
    c = CASES[case]
    at = lambda key: os.path.join(FIX, c[key])
    return [f"--ANNOTATIONS={at('annotations')}", f"--CANDIDATES={at('candidates')}", f"--EXCLUDED={at('excluded')}",
            f"--SCANS={at('scans')}", *more]


def run(case, tmp_path, *more):
    out = tmp_path / f"{case}.json"
    assert metrics.main(args(case, f"--OUT={out}", *more)) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", [c for c in CASES if c != "all_missed"])
def test_cpm_and_sensitivities_equal_the_official_script(case, tmp_path, capsys):
    official, res = CASES[case]["official"], run(case, tmp_path, "--BOOTSTRAP=0")
    assert res["cpm"]["value"] == pytest.approx(official["cpm"], abs=1e-6)
    assert res["froc"]["sensitivities"] == pytest.approx(official["sensitivities"], abs=1e-6)
    c, o = res["counts"], official["counts"]
    assert (c["found"], c["nodules"] - c["found"], c["nodules"], c["false_positives"], c["candidates"],
            c["ignored_on_excluded"], c["further_hits"]) == \
        (o["found"], o["missed"], o["nodules"], o["false_positives"], o["candidates"], o["ignored_on_excluded"],
         o["further_hits"])
    assert c["scans"] == official["n_scans"]
    assert f"CPM {official['cpm']:.3f}" in capsys.readouterr().out


def test_the_plotted_grid_reading_differs_only_where_the_curve_steps_at_a_rate():
    """The script's own 10001-point curve read at its nearest grid points: equal for most cases, lower where the
    curve jumps exactly at a rate (excluded, top100), off by < 1e-4 where a sloped segment crosses a rate."""
    diff = {k: c["official"]["grid_cpm"] - c["official"]["cpm"] for k, c in CASES.items()
            if c["official"]["cpm"] is not None}
    assert diff["excluded"] == pytest.approx(0.476190476 - 0.523809524, abs=1e-6)
    assert diff["top100"] < -0.02
    assert all(abs(d) < 1e-4 for k, d in diff.items() if k not in ("excluded", "top100")), diff


def test_no_nodule_hit_is_cpm_0_where_the_official_script_gives_nan(tmp_path):
    official, project = CASES["all_missed"]["official"], CASES["all_missed"]["project"]
    assert official["cpm"] is None and all(s is None for s in official["sensitivities"])   # NaN in the script
    res = run("all_missed", tmp_path, "--BOOTSTRAP=0")
    assert res["cpm"]["value"] == project["cpm"] == 0.0
    assert res["froc"]["sensitivities"] == project["sensitivities"]
    assert res["counts"]["false_positives"] == official["counts"]["false_positives"]


def test_bootstrap_interval_over_the_scans(tmp_path):
    """Seeded, so a rerun gives the same interval; it holds the CPM; the official script's pointwise interval
    (other draws, its own percentile rule) is of the same width within the draws' noise."""
    a, b = run("random", tmp_path, "--BOOTSTRAP=1000"), run("random", tmp_path, "--BOOTSTRAP=1000")
    lo, hi = a["cpm"]["ci95"]
    assert a["cpm"]["ci95"] == b["cpm"]["ci95"] and lo < a["cpm"]["value"] < hi and a["n_boot"] == 1000
    ours = a["froc"]["sensitivities_ci95"]
    official = CASES["random"]["official"]["bootstrap"]
    for (l, u), ol, ou in zip(ours, official["lower"], official["upper"]):
        assert abs(l - ol) < 0.05 and abs(u - ou) < 0.05
    assert "ci95" not in run("random", tmp_path, "--BOOTSTRAP=0")["cpm"]


def test_scans_default_to_those_named_and_a_header_in_the_scan_list_is_skipped(tmp_path):
    with_list = run("ordinary", tmp_path, "--BOOTSTRAP=0")
    scans = tmp_path / "scans.csv"
    scans.write_text("seriesuid\n" + open(os.path.join(FIX, "seriesuids.csv")).read())
    c = CASES["ordinary"]
    headed = run("ordinary", tmp_path, "--BOOTSTRAP=0", f"--SCANS={scans}")
    assert headed["cpm"] == with_list["cpm"] and headed["counts"]["scans"] == 6
    named = tmp_path / "named.json"
    metrics.main([f"--ANNOTATIONS={os.path.join(FIX, c['annotations'])}",
                  f"--CANDIDATES={os.path.join(FIX, c['candidates'])}", "--BOOTSTRAP=0", f"--OUT={named}"])
    assert json.loads(named.read_text())["counts"]["scans"] == 6          # S1..S5 and scan 7 (S6 is named nowhere)


def test_bad_input_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "candidates.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ\n1,0,0,0\n")
    with pytest.raises(SystemExit, match=r"candidates.csv: the candidates have no column probability"):
        metrics.main(args("ordinary", f"--CANDIDATES={bad}"))
    bad.write_text("seriesuid,coordX,coordY,coordZ,probability\n1,0,0,zero\n")
    with pytest.raises(SystemExit, match=r"candidates.csv:2: expected numbers"):
        metrics.main(args("ordinary", f"--CANDIDATES={bad}"))
    with pytest.raises(SystemExit, match="needs --ANNOTATIONS"):
        metrics.main([])


def test_the_command_runs_as_a_script(tmp_path):
    out = tmp_path / "evaluation.json"
    p = subprocess.run([sys.executable, "metrics.py", *args("multi_hit", "--BOOTSTRAP=50", f"--OUT={out}")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    official = CASES["multi_hit"]["official"]
    assert f"CPM {official['cpm']:.3f} (95 % interval" in p.stdout and "<5 mm" in p.stdout
    res = json.loads(out.read_text())
    assert math.isclose(res["cpm"]["value"], official["cpm"], abs_tol=1e-6) and res["cpm"]["ci95"]
    assert set(res["cpm"]["by_size"]) == set(metrics.size_bin_names())


def test_compare_gives_the_cpm_difference_with_a_paired_interval(tmp_path, capsys):
    """COMPARE: the second list's CPM minus the first's, each as scored alone; a list against itself differs by 0
    in every draw; a list whose nodule hits all score 0 (ranked below every false positive) is lower in every
    draw, and the paired interval is narrower than the two lists' own intervals side by side."""
    c = CASES["random"]
    cand = os.path.join(FIX, c["candidates"])
    same = run("random", tmp_path, "--BOOTSTRAP=200", f"--COMPARE={cand}")["compare"]
    assert same["difference"] == 0 and same["ci95"] == [0, 0] and same["b_higher"] == 0 and same["n_boot"] == 200
    ann = metrics.read_table(os.path.join(FIX, c["annotations"]), ("coordX", "coordY", "coordZ", "diameter_mm"), "a")
    lines = open(cand).read().splitlines()
    worse = tmp_path / "worse.csv"
    with open(worse, "w") as f:                    # every candidate hitting an annotation scored 0
        f.write(lines[0] + "\n")
        for line in lines[1:]:
            uid, x, y, z, p = line.split(",")
            near = [a for a in ann.get(uid, []) if math.dist(a[:3], (float(x), float(y), float(z))) < a[3] / 2]
            f.write(",".join([uid, x, y, z, "0" if near else p]) + "\n")
    res = run("random", tmp_path, "--BOOTSTRAP=200", f"--COMPARE={worse}")
    alone = run("random", tmp_path, "--BOOTSTRAP=200", f"--CANDIDATES={worse}")
    cmp = res["compare"]
    assert cmp["a"] == pytest.approx(res["cpm"]["value"]) and cmp["b"] == pytest.approx(alone["cpm"]["value"])
    assert cmp["difference"] < 0 and cmp["ci95"][1] < 0 and cmp["b_higher"] == 0
    side_by_side = res["cpm"]["ci95"][1] - alone["cpm"]["ci95"][0]
    assert cmp["ci95"][1] - cmp["ci95"][0] < side_by_side
    assert "paired 95 % interval" in capsys.readouterr().out
