"""Stage 1 throughput (scans per minute) with N_WORKERS CPU workers: the local process pool against a
dask.distributed LocalCluster of as many worker processes (one thread each), on the same cohort, each run
into its own fresh folder. The cluster's start-up is timed apart; the scans/min are of the runs alone.

    python synthetic_ct.py --OUT_DIR=work/scaleout/0_synthetic --N_SCANS=8 --N_LIDC_SCANS=0 --SEED=11
    python benchmarks/bench_scale_out.py --INPUT_DIR=work/scaleout/0_synthetic/luna16 --OUT=work/scaleout

Prints one line per run and writes OUT/bench_scale_out.json. Measure on a quiet machine: on a shared one
the figures move with the other load (the load average is recorded).
"""
import glob
import json
import os
import shutil
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

INPUT_DIR = "work/scaleout/0_synthetic/luna16"   # a LUNA16-format cohort (synthetic_ct.py)
OUT = "work/scaleout"                            # run folders and bench_scale_out.json go here
N_WORKERS = 2                                    # pool processes = dask worker processes


def _run(cfg, name, extra):
    import preprocess
    work = os.path.join(cfg.OUT, name)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    rc = preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={cfg.INPUT_DIR}", f"--WORK_DIR={work}",
                          f"--N_WORKERS={cfg.N_WORKERS}"] + extra)
    secs = time.perf_counter() - t0
    n = len(glob.glob(os.path.join(work, "1_preprocessed", "*.h5")))
    row = {"run": name, "rc": rc, "scans": n, "seconds": round(secs, 1), "scans_per_min": round(60 * n / secs, 2),
           "load_average_1min": round(os.getloadavg()[0], 2)}
    print(row, flush=True)
    return row


def main(argv=None):
    from configurator import configure
    cfg = configure(globals(), argv)
    from distributed import LocalCluster
    rows = [_run(cfg, "pool", [])]
    t0 = time.perf_counter()
    with LocalCluster(n_workers=cfg.N_WORKERS, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster:
        start = time.perf_counter() - t0
        row = _run(cfg, "dask_localcluster", [f"--DASK_SCHEDULER={cluster.scheduler_address}"])
        row["cluster_start_seconds"] = round(start, 1)
        rows.append(row)
    with open(os.path.join(cfg.OUT, "bench_scale_out.json"), "w") as f:
        json.dump({"config": cfg, "cpus": os.cpu_count(), "runs": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
