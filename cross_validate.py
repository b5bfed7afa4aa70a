"""Cross-validation over LUNA16's folds: stages 3-6 once per fold (test fold k, validation fold the next one,
training the others), then one FROC over the pooled test folds, as published LUNA16 systems report it.

Reads  WORK_DIR/2_table/slices.h5 (stage 2: its /slices table's `subset` column, each scan's LUNA16 fold from its
       subsetK folder) and WORK_DIR/1_preprocessed/ (the scans and their truth)
Writes WORK_DIR/cv/fold<k>/ for each test fold k: 3_split/, 4_model/, 5_predictions/, 5_report/, 6_fp_reduction/
       (each stage's own output), cross_validate.json (each stage's settings and whether it finished: what a
       rerun compares), cross_validate.log (the stages' output), seriesuids.csv (the fold's test scans);
       WORK_DIR/cv/: pooled.json and pooled.md (CPM with its 95 % bootstrap interval, sensitivities at 1/8 ... 8
       FP/scan, by size, per fold, the models), candidates.csv (the folds' stage-6 candidates, concatenated),
       candidates_stage5.csv, annotations.csv, annotations_excluded.csv, seriesuids.csv (what metrics.py scored),
       models.txt (line 1: the folds' stage-4 models, line 2: their stage-6 models, each comma-joined: an
       ensemble's --MODEL= for postprocess.py and fp_reduction.py)
Run
    python cross_validate.py --WORK_DIR=/data/luna --TRAIN_ARGS="--EPOCHS=200 --SAMPLING=nodule"
    python cross_validate.py --WORK_DIR=work/cv3 "--FOLDS=(0,1,2)" --N_PARALLEL=2 --MODEL_FILE=last.keras
    python cross_validate.py --WORK_DIR=/shared/luna --DASK_SCHEDULER=tls://host0:8786   # a fold a task

Each fold runs the stage scripts as processes of their own (`python slice_idx.py --WORK_DIR=WORK_DIR/cv/fold<k>
...`), its settings first, then SPLIT_ARGS, TRAIN_ARGS, POST_ARGS or FP_ARGS; the folders a fold reads from the
run (1_preprocessed, 2_table) are links in its folder, so that every stage finds them under its WORK_DIR. The
settings that route the folders are cross_validate.py's own and refused in the *_ARGS.

Resume: a fold whose stages all finished with the settings it would run now (cross_validate.json) and whose
stage-6 candidates.csv exists is skipped; otherwise it restarts at its first stage that did not finish or whose
settings changed, and runs every stage after it (a training stage that was interrupted goes on from its last
epoch with --RESUME=1). A fold that fails is reported in one line with its log; the other folds still run and the
pooled result names the folds missing (exit status 1). Every figure comes from metrics.py (evaluate_files, as
`python metrics.py` scores a file): pooled.json's command line gives the same figures again.
"""
import ast
import os
import shlex
import subprocess
import sys
import threading
import time

import numpy as np

import candidates
import metrics
import runfiles
from configurator import configure

# ----------------------------------------------------------------------------- settings
WORK_DIR = "work"               # the run: its 1_preprocessed/ and 2_table/ are the input, cv/ the output
FOLDS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)   # LUNA16 folds (subsetK), each once the test fold; at least 3 [>= 0]
SPLIT_ARGS = ""                 # settings added to every fold's slice_idx.py, e.g. "--TEST_LUNA16_DIR=/data/LUNA16"
TRAIN_ARGS = ""                 # settings added to every fold's nasnet_v2_train.py, e.g. "--EPOCHS=200"
POST_ARGS = ""                  # settings added to every fold's postprocess.py, e.g. "--SCANS=all" (stage 6 then
                                # learns from the training scans' false candidates too)
FP_ARGS = ""                    # settings added to every fold's fp_reduction.py, e.g. "--BLOB_CANDIDATES=30"
MODEL_FILE = "best.keras"       # the stage-4 checkpoint each fold's stage 5 evaluates [one of: best.keras, last.keras]
N_PARALLEL = 1                  # folds run at once on this machine (each runs its stages one after another) [>= 1]
DASK_SCHEDULER = ""             # "" = folds run here; "tls://host:8786" = each fold a task on that dask cluster (its
                                # workers see WORK_DIR at the same path: docs/scale_out.md)
BOOTSTRAP = 1000                # bootstrap draws of the pooled scans for the 95 % intervals; 0 = none [>= 0]
ANNOTATIONS = ""                # the truth scored against: "" = the stage-1 files' (what stages 5 and 6 measure), or
                                # LUNA16's annotations.csv [existing path]
EXCLUDED = ""                   # with ANNOTATIONS: LUNA16's annotations_excluded.csv ("" = none) [existing path]
SIZE_BINS = (5.0, 10.0, 20.0)   # diameter bin edges in mm of the pooled breakdowns [> 0]
MAX_CANDIDATES = 100            # candidates scored per scan, the highest (LUNA16's evaluation keeps 100) [>= 1]

_ROOT = os.path.dirname(os.path.abspath(__file__))
# each stage a fold runs: its folder, script, the file that marks it done (in its folder) and its resume setting
_STAGES = (("3_split", "slice_idx.py", "split.json", None),
           ("4_model", "nasnet_v2_train.py", None, "RESUME"),        # None: MODEL_FILE
           ("5_report", "postprocess.py", "candidates.csv", None),
           ("6_fp_reduction", "fp_reduction.py", "candidates.csv", "RESUME"))
# the settings cross_validate.py gives each stage itself (the folders, the fold, resuming): refused in the *_ARGS
_ROUTED = {"slice_idx.py": ("WORK_DIR", "IN_DIR", "TABLE_NAME", "OUT_DIR", "TEST_FOLDS", "VAL_FOLDS", "TEST_FROM"),
           "nasnet_v2_train.py": ("WORK_DIR", "TABLE", "SPLIT_DIR", "OUT_DIR", "RESUME"),
           "postprocess.py": ("WORK_DIR", "MODEL", "PRED_DIR", "REPORT_DIR"),
           "fp_reduction.py": ("WORK_DIR", "SCANS", "MODEL", "CANDIDATES_DIR", "OUT_DIR", "RESUME")}
_LINKED = ("1_preprocessed", "2_table")          # the run's folders each fold's folder links to
_RECORD, _LOG = "cross_validate.json", "cross_validate.log"
_STOP = threading.Event()      # set on Ctrl-C: the folds running in this process start no further stage
_CHILDREN = set()              # the stage processes running in this process (terminated on Ctrl-C)


# ----------------------------------------------------------------------------- the folds and their commands

def stage_settings(script):
    """The setting names of a stage script (its top-level UPPERCASE constants), read from its source."""
    tree = ast.parse(open(os.path.join(_ROOT, script), encoding="utf-8").read())
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name) and t.id.isupper() and not t.id.startswith("_")}


def extra_args(text, name, script):
    """A *_ARGS setting -> its list of --NAME=value arguments; SystemExit (one line) for a token that is not one,
    a name the script does not have, or one cross_validate.py sets itself."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise SystemExit(f"--{name}={text!r}: {e}") from None
    known = stage_settings(script)
    for tok in tokens:
        key = tok[2:].split("=", 1)[0] if tok.startswith("--") and "=" in tok else None
        if key is None:
            raise SystemExit(f"--{name}: {tok!r}: expected --NAME=value (settings of {script})")
        if key not in known:
            raise SystemExit(f"--{name}: {script} has no setting --{key} (python {script} --help)")
        if key in _ROUTED[script]:
            raise SystemExit(f"--{name}: --{key} is set by cross_validate.py for each fold")
    return tokens


def table_folds(table):
    """The LUNA16 folds of the slice table's scans -> {fold: number of scans}."""
    import tables
    if not os.path.isfile(table):
        raise SystemExit(f"{table}: no slice table (run table.py first)")
    with tables.open_file(table, "r") as h5:
        rows = h5.root.slices.read(field="subset"), h5.root.slices.read(field="seriesuid")
    folds = {}
    for fold, uid in set(zip(rows[0].tolist(), rows[1].tolist())):
        folds[int(fold)] = folds.get(int(fold), 0) + 1
    return folds


def check_folds(folds, present, table):
    """SystemExit (one line) unless FOLDS has >= 3 distinct folds, each with scans in the table."""
    if len(set(folds)) != len(folds) or len(folds) < 3:
        raise SystemExit(f"--FOLDS={tuple(folds)}: expected at least 3 distinct folds (test, validation, training)")
    missing = [f for f in folds if f not in present]
    if missing:
        raise SystemExit(f"--FOLDS={tuple(folds)}: no scan of {table} is in fold(s) {missing} (folds present: "
                         f"{sorted(k for k in present if k >= 0) or 'none'}; scans outside subsetK folders have "
                         f"fold -1)")


def fold_commands(cfg, run, work, k, val, args):
    """The stage commands of fold ``k`` (validation fold ``val``) in its folder ``work``: a list of (folder,
    script, arguments, the file that marks it done, its resume setting)."""
    split, model, report = (os.path.join(work, d) for d in ("3_split", "4_model", "5_report"))
    own = {"slice_idx.py": [f"--IN_DIR={os.path.join(run, '2_table')}", f"--OUT_DIR={split}",
                            f"--TEST_FOLDS=({k},)", f"--VAL_FOLDS=({val},)"],
           "nasnet_v2_train.py": [f"--TABLE={os.path.join(run, '2_table', 'slices.h5')}", f"--SPLIT_DIR={split}",
                                  f"--OUT_DIR={model}"],
           "postprocess.py": [f"--MODEL={os.path.join(model, cfg.MODEL_FILE)}",
                              f"--PRED_DIR={os.path.join(work, '5_predictions')}", f"--REPORT_DIR={report}",
                              "--SCANS=test"],
           "fp_reduction.py": [f"--CANDIDATES_DIR={report}", f"--OUT_DIR={os.path.join(work, '6_fp_reduction')}",
                               "--SCANS=test"]}
    out = []
    for folder, script, done, resume in _STAGES:
        done = os.path.join(work, folder, done or cfg.MODEL_FILE)
        out.append((folder, script, [f"--WORK_DIR={work}"] + own[script] + args[script], done, resume))
    return out


def fold_tasks(cfg):
    """One task per fold (a plain dict: what run_fold needs, on this machine or a cluster's worker)."""
    args = {script: extra_args(cfg[name], name, script) for name, script in
            (("SPLIT_ARGS", "slice_idx.py"), ("TRAIN_ARGS", "nasnet_v2_train.py"), ("POST_ARGS", "postprocess.py"),
             ("FP_ARGS", "fp_reduction.py"))}
    run = os.path.abspath(cfg.WORK_DIR)
    table = os.path.join(run, "2_table", "slices.h5")
    check_folds(list(cfg.FOLDS), table_folds(table), table)
    if not os.path.isdir(os.path.join(run, "1_preprocessed")):
        raise SystemExit(f"{run}/1_preprocessed: no stage-1 folder (run preprocess.py first)")
    st = os.stat(table)
    tasks, folds = [], list(cfg.FOLDS)
    for i, k in enumerate(folds):
        val = folds[(i + 1) % len(folds)]
        work = os.path.join(run, "cv", f"fold{k}")
        tasks.append({"fold": k, "val_fold": val, "train_folds": [f for f in folds if f not in (k, val)],
                      "work": work, "run": run, "table_signature": [st.st_size, int(st.st_mtime)],
                      "stages": fold_commands(cfg, run, work, k, val, args)})
    return tasks


def link_inputs(task):
    """The fold's folder, with links to the run's stage-1 and stage-2 folders (relative: the run can move)."""
    os.makedirs(task["work"], exist_ok=True)
    for name in _LINKED:
        link = os.path.join(task["work"], name)
        target = os.path.relpath(os.path.join(task["run"], name), task["work"])
        if os.path.islink(link) and os.readlink(link) != target:
            os.remove(link)
        if not os.path.lexists(link):
            os.symlink(target, link)


# ----------------------------------------------------------------------------- one fold (here or on a worker)

def _key(task, folder, args):
    """What a stage's record must hold for it to count as done: its arguments (the run's path written as
    $WORK_DIR, so that a moved run still matches) and, for the split, the slice table's size and time."""
    return {"args": [a.replace(task["run"], "$WORK_DIR") for a in args],
            "table": task["table_signature"] if folder == "3_split" else None}


def _run_stage(task, script, args, log):
    """One stage as its own process, its output appended to ``log`` -> (exit status, seconds)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, os.path.join(_ROOT, script)] + args
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} fold {task['fold']}: {shlex.join(cmd)}\n")
        f.flush()
        child = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _CHILDREN.add(child)
        try:
            rc = child.wait()
        finally:
            _CHILDREN.discard(child)
        f.write(f"== exit {rc} after {time.time() - t0:.0f} s\n")
    return rc, time.time() - t0


def _last_line(log):
    """The last line a failed stage wrote before its exit line (its one-line error)."""
    with open(log, errors="replace") as f:
        lines = [ln.strip() for ln in f.read().splitlines()[-60:] if ln.strip() and not ln.startswith("== exit")]
    return runfiles.one_line(lines[-1]) if lines else "no output"


def _save_record(path, task, stages):
    """The fold's cross_validate.json: its folds and each stage's key, done or not, seconds."""
    runfiles.write_json(path, {"fold": task["fold"], "val_fold": task["val_fold"], "train_folds": task["train_folds"],
                               "stages": stages})


def run_fold(task):
    """Run a fold's stages that are not done with these settings -> {fold, status (done, skipped, failed),
    ran (the stages run), error, log, seconds}. Never raises: an error is the fold's one line."""
    t0, ran = time.time(), []
    log = os.path.join(task["work"], _LOG)
    out = {"fold": task["fold"], "status": "failed", "ran": ran, "error": None, "log": log}
    try:
        link_inputs(task)
        path = os.path.join(task["work"], _RECORD)
        record = runfiles.read_json(path) if os.path.isfile(path) else {}
        stages = record.get("stages", {})
        redo = False
        for folder, script, args, done, resume in task["stages"]:
            key, prev = _key(task, folder, args), stages.get(folder) or {}
            same = prev.get("key") == key and not redo
            if same and prev.get("done") and os.path.isfile(done):
                continue
            if _STOP.is_set():
                out["error"] = "interrupted before stage " + folder
                break
            redo = True
            for later, *_ in task["stages"][[s[0] for s in task["stages"]].index(folder):]:
                stages.pop(later, None)
            stages[folder] = {"key": key, "done": False, "script": script}
            _save_record(path, task, stages)
            interrupted = resume and same and not prev.get("done")        # a training that started goes on
            more = [f"--{resume}=1"] if interrupted else []
            rc, seconds = _run_stage(task, script, args + more, log)
            ran.append(folder)
            if rc != 0:
                how = f"killed by signal {-rc}" if rc < 0 else f"exited {rc}: {_last_line(log)}"
                out["error"] = f"stage {folder} ({script}) {how}"
                return dict(out, seconds=time.time() - t0)
            stages[folder].update(done=True, seconds=round(seconds, 1))
            _save_record(path, task, stages)
        else:
            out["status"] = "done" if ran else "skipped"
    except Exception as e:                          # the fold's folder unwritable, a record unreadable, ...
        out["error"] = f"{type(e).__name__}: {runfiles.one_line(e)}"
    return dict(out, seconds=time.time() - t0)


def run_folds(tasks, cfg):
    """Every fold's task, N_PARALLEL at once here or each a task on DASK_SCHEDULER -> {fold: run_fold's result},
    each printed in one line as it ends."""
    results = {}

    def report(res):
        results[res["fold"]] = res
        if res["status"] == "failed":
            print(f"fold {res['fold']}: FAILED: {res['error']}; log: {res['log']}", flush=True)
        elif res["status"] == "skipped":
            print(f"fold {res['fold']}: skipped (finished with the same settings)", flush=True)
        else:
            print(f"fold {res['fold']}: done in {res['seconds']:.0f} s ({', '.join(res['ran'])})", flush=True)

    print(f"cross-validation over folds {', '.join(map(str, cfg.FOLDS))}: "
          + (f"each a task on {cfg.DASK_SCHEDULER}" if cfg.DASK_SCHEDULER else f"{cfg.N_PARALLEL} at once here"),
          flush=True)
    if cfg.DASK_SCHEDULER:
        import dask_tasks
        for task, res, error in dask_tasks.run_on_cluster(cfg.DASK_SCHEDULER, run_fold, tasks,
                                                          [f"fold {t['fold']}" for t in tasks]):
            report(res if error is None else {"fold": task["fold"], "status": "failed", "error": error,
                                              "log": os.path.join(task["work"], _LOG), "ran": [], "seconds": 0})
    else:
        from concurrent.futures import ThreadPoolExecutor, as_completed
        with ThreadPoolExecutor(max_workers=cfg.N_PARALLEL) as pool:     # the stages are processes: threads wait
            try:
                for f in as_completed([pool.submit(run_fold, t) for t in tasks]):
                    report(f.result())
            except KeyboardInterrupt:                 # no further stage; the running ones ended, then waited for
                _STOP.set()
                for child in list(_CHILDREN):
                    child.terminate()
                raise
    return results


# ----------------------------------------------------------------------------- the pooled test folds

def score(cfg, candidates_file, truth, scans, n_boot):
    """metrics.py's figures (the dict `python metrics.py --OUT=` writes) of a candidates file."""
    return metrics.evaluate_paths(truth[0], candidates_file, truth[1], scans, n_boot, cfg.SIZE_BINS,
                                  cfg.MAX_CANDIDATES)


def fold_parts(task):
    """A finished fold's test scans, its stage-5 and stage-6 candidates files and models."""
    work = task["work"]
    split = runfiles.read_json(os.path.join(work, "3_split", "split.json"))
    return {"uids": runfiles.series_of_part(split, "test"),
            "stage5": os.path.join(work, "5_report", "candidates.csv"),
            "stage6": os.path.join(work, "6_fp_reduction", "candidates.csv"),
            "model5": [a.split("=", 1)[1] for a in task["stages"][2][2] if a.startswith("--MODEL=")][-1],
            "model6": os.path.join(work, "6_fp_reduction", "model.keras")}


def pool(cfg, tasks, results):
    """The pooled FROC of the finished folds: the pooled files, metrics.py's figures, per fold CPM -> the dict
    written to pooled.json (None when no fold finished)."""
    cv = os.path.join(os.path.abspath(cfg.WORK_DIR), "cv")
    ok = [t for t in tasks if results.get(t["fold"], {}).get("status") in ("done", "skipped")]
    missing = [t["fold"] for t in tasks if t not in ok]
    if not ok:
        return None
    parts = [fold_parts(t) for t in ok]
    uids = [u for p in parts for u in p["uids"]]
    truth = (cfg.ANNOTATIONS, cfg.EXCLUDED) if cfg.ANNOTATIONS else candidates.write_truth(cv, os.path.join(tasks[0]["run"], "1_preprocessed"), uids)
    if cfg.ANNOTATIONS and not cfg.EXCLUDED:
        truth = (cfg.ANNOTATIONS, runfiles.write_csv(os.path.join(cv, "annotations_excluded.csv"), [],
                                                     ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")))
    scans = candidates.write_scan_list(os.path.join(cv, "seriesuids.csv"), uids)
    files = {"candidates": os.path.join(cv, "candidates.csv"),
             "candidates_stage5": os.path.join(cv, "candidates_stage5.csv"),
             "annotations": truth[0], "excluded": truth[1], "scans": scans}
    candidates.pool_files(files["candidates"], [p["stage6"] for p in parts])
    candidates.pool_files(files["candidates_stage5"], [p["stage5"] for p in parts], [set(p["uids"]) for p in parts])
    after, before = (score(cfg, files[k], truth, scans, cfg.BOOTSTRAP) for k in ("candidates", "candidates_stage5"))
    per_fold = []
    for t, p in zip(ok, parts):
        fold_scans = candidates.write_scan_list(os.path.join(t["work"], "seriesuids.csv"), p["uids"])
        f6, f5 = (score(cfg, p[k], truth, fold_scans, 0) for k in ("stage6", "stage5"))
        per_fold.append({"test_fold": t["fold"], "val_fold": t["val_fold"], "train_folds": t["train_folds"],
                         "n_scans": f6["counts"]["scans"], "n_nodules": f6["counts"]["nodules"],
                         "cpm_stage5": f5["cpm"]["value"], "cpm_after_stage6": f6["cpm"]["value"],
                         "candidates": p["stage6"], "scans": fold_scans})
    models = {"stage5": [p["model5"] for p in parts], "stage6": [p["model6"] for p in parts]}
    return {"folds": list(cfg.FOLDS), "folds_pooled": [t["fold"] for t in ok], "folds_missing": missing,
            "failed": [{k: results[f][k] for k in ("fold", "error", "log")} for f in missing if f in results],
            "after_stage6": after, "stage5": before, "per_fold": per_fold, "models": models, "files": files,
            "evaluation": metrics.evaluation_statement(after["counts"]["excluded"], after["n_boot"]),
            "command": shlex.join(["python", "metrics.py", f"--ANNOTATIONS={truth[0]}",
                                   f"--CANDIDATES={files['candidates']}", f"--EXCLUDED={truth[1]}",
                                   f"--SCANS={scans}", f"--BOOTSTRAP={int(cfg.BOOTSTRAP)}",
                                   f"--SIZE_BINS={tuple(cfg.SIZE_BINS)}", f"--MAX_CANDIDATES={cfg.MAX_CANDIDATES}"]),
            "settings": dict(cfg)}


# ----------------------------------------------------------------------------- pooled.md, models.txt

def _num(v, digits=3):
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _ci(bounds):
    return f" ({_num(bounds[0])}-{_num(bounds[1])})" if bounds else ""


def markdown(p):
    """pooled.md: the pooled FROC before and after stage 6, by size, per fold, the models, the evaluation."""
    a, rates = p["after_stage6"], p["after_stage6"]["froc"]["fp_rates"]
    head = "| | CPM (95 % interval) | " + " | ".join(f"{r:g}" for r in rates) + " |"
    rule = "|---|---|" + "---|" * len(rates)
    row = lambda name, r: (f"| {name} | {_num(r['cpm']['value'])}{_ci(r['cpm'].get('ci95'))} | "
                           + " | ".join(_num(s) for s in r["froc"]["sensitivities"]) + " |")
    c = a["counts"]
    out = [f"# Cross-validation, {len(p['folds_pooled'])} test folds pooled", "",
           f"Folds pooled: {', '.join(map(str, p['folds_pooled']))}; missing: "
           f"{', '.join(map(str, p['folds_missing'])) or 'none'}. {c['scans']} scans, {c['nodules']} nodules, "
           f"{c['excluded']} excluded findings; {c['candidates']} candidates after stage 6 "
           f"({c['found']} nodules hit, {c['false_positives']} false positives).", "",
           "Sensitivity at FP/scan:", "", head, rule, row("stage 5", p["stage5"]), row("after stage 6", a)]
    if a["froc"].get("sensitivities_ci95"):
        out.append("| 95 % interval | | " + " | ".join(_ci(b).strip(" ()") or "n/a"
                                                     for b in a["froc"]["sensitivities_ci95"]) + " |")
    out += ["", "After stage 6, by nodule diameter (mm):", "", head.replace("| |", "| nodules |", 1), rule]
    for k, sens in a["froc"]["by_size"].items():
        out.append(f"| {k} ({c['nodules_by_size'][k]}) | {_num(a['cpm']['by_size'][k])}"
                   f"{_ci(a['cpm'].get('ci95_by_size', {}).get(k))} | " + " | ".join(_num(s) for s in sens) + " |")
    out += ["", "Per fold (each test fold scored alone):", "",
            "| test fold | validation fold | training folds | scans | nodules | CPM stage 5 | CPM after stage 6 |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {f['test_fold']} | {f['val_fold']} | {', '.join(map(str, f['train_folds']))} | {f['n_scans']} | "
            f"{f['n_nodules']} | {_num(f['cpm_stage5'])} | {_num(f['cpm_after_stage6'])} |" for f in p["per_fold"]]
    out += [f"- fold {f['fold']} failed: {f['error']} (log: {f['log']})" for f in p["failed"]]
    out += ["", "Models (models.txt: line 1 for postprocess.py --MODEL=, line 2 for fp_reduction.py --MODEL=):", ""]
    out += [f"- fold {k}: `{m5}`, `{m6}`" for k, m5, m6 in zip(p["folds_pooled"], p["models"]["stage5"],
                                                                 p["models"]["stage6"])]
    out += ["", "Evaluation: " + "; ".join(f"{k}: {v}" for k, v in p["evaluation"].items()) + ".", "",
            "The same figures again:", "", "```", p["command"], "```", ""]
    return "\n".join(out)


def write_outputs(cv, p):
    """pooled.json, pooled.md and models.txt in ``cv`` -> their paths."""
    paths = [os.path.join(cv, n) for n in ("pooled.json", "pooled.md", "models.txt")]
    runfiles.write_json(paths[0], p)
    for path, text in ((paths[1], markdown(p)),
                       (paths[2], ",".join(p["models"]["stage5"]) + "\n" + ",".join(p["models"]["stage6"]) + "\n")):
        with runfiles.atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return paths


def print_summary(p, paths):
    """The pooled figures (metrics.py's table), stage 5's CPM, each fold's, the files."""
    print(f"\npooled test folds {', '.join(map(str, p['folds_pooled']))}"
          + (f" (missing: {', '.join(map(str, p['folds_missing']))})" if p["folds_missing"] else "")
          + f"; after stage 6 ({p['files']['candidates']}):")
    print(metrics.report_text(p["after_stage6"]))
    s5 = p["stage5"]["cpm"]
    print(f"stage 5 alone: CPM {_num(s5['value'])}{_ci(s5.get('ci95'))}")
    for f in p["per_fold"]:
        print(f"fold {f['test_fold']}: {f['n_scans']} scans, {f['n_nodules']} nodules, CPM stage 5 "
              f"{_num(f['cpm_stage5'])}, after stage 6 {_num(f['cpm_after_stage6'])}")
    print("written: " + ", ".join(paths))


def main(argv=None):
    cfg = configure(globals(), argv)
    if cfg.EXCLUDED and not cfg.ANNOTATIONS:
        raise SystemExit("--EXCLUDED goes with --ANNOTATIONS (without them the stage-1 files' truth is used, "
                         "excluded findings included)")
    runfiles.refuse_old_layout(cfg.WORK_DIR)
    tasks = fold_tasks(cfg)                                           # 1. the folds, checked before any work
    cv = os.path.join(os.path.abspath(cfg.WORK_DIR), "cv")
    with runfiles.hold(cv, "cross_validate.py"):                      # one cross-validation at a time in the run
        try:
            results = run_folds(tasks, cfg)                           # 2. each fold's stages 3-6
        except KeyboardInterrupt:
            print("interrupted: the same command resumes each fold at its first stage not done", file=sys.stderr)
            return 130
        pooled = pool(cfg, tasks, results)                            # 3. the pooled FROC
        if pooled is None:
            print(f"no fold finished: nothing to pool (logs: {cv}/fold<k>/{_LOG})", file=sys.stderr)
            return 1
        print_summary(pooled, write_outputs(cv, pooled))              # 4. pooled.json, pooled.md, models.txt
    if pooled["folds_missing"]:
        print(f"{len(pooled['folds_missing'])} fold(s) missing from the pooled result: "
              f"{', '.join(map(str, pooled['folds_missing']))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
