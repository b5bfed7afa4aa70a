"""Past one machine: DISTRIBUTE="data_parallel" training on two virtual CPU devices (TensorFlow: logical devices;
JAX: --xla_force_host_platform_device_count) gives the one-device weights; stages 1 and 5 on a dask.distributed
LocalCluster give the local runs' files, and a worker killed mid-scan loses no scan."""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few steps of a small U-Net (4 filters, depth 2, 32x32) through nasnet_v2_train's own code, on one device
# and then with DISTRIBUTE="data_parallel" over 2, in one process that sees 2 devices: build_model, fit, BN
# re-estimation, save_checkpoint, reload + recover_checkpoint (--RESUME=1), fit again, and a prediction of an
# odd batch (padded to the devices). Writes each run's weights and prediction.
PROBE = r"""
import os, sys
backend, out, folder = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ["KERAS_BACKEND"] = backend
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.getcwd())
import numpy as np
import nasnet_v2
import checkpoints
import configurator
import nasnet_v2_train as T
if backend == "tensorflow":
    import tensorflow as tf
    tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                               [tf.config.LogicalDeviceConfiguration() for _ in range(2)])
import keras
cfg = configurator.configure(vars(T), ["--VARIANT=unet", "--BATCH_SIZE=4", "--BN_MOMENTUM=0.9", "--OPTIMIZER=sgd",
                                        "--LR=1e-2"])
get_model = nasnet_v2.get_model
nasnet_v2.get_model = lambda shape, **kw: get_model(shape, **dict(kw, base_filters=4, depth=2))
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 32, 32, 1)).astype("float32")
yy, xx = np.mgrid[:32, :32]
m = np.stack([((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < c[2] ** 2) for c in rng.integers(4, 28, (16, 3))])
x += 2.0 * m[..., None]
y = np.stack([1 - m, m], -1).astype("float32")
runs = {}
for name, distribute in (("one", ""), ("two", "data_parallel")):
    cfg = cfg.replace(DISTRIBUTE=distribute)
    devices = T.distribute(cfg)
    keras.utils.set_random_seed(0)
    model = T.build_model((32, 32, 1), cfg, devices)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    nasnet_v2.reestimate_bn_statistics(model, [x[:4], x[4:8]])
    ckpt = os.path.join(folder, name)
    os.makedirs(ckpt)
    checkpoints.save_checkpoint(model, ckpt, {"epoch": 0}, [{"epoch": 0}])
    if T._mirrored(devices):
        T._register_global_batch_loss()
    model = keras.saving.load_model(os.path.join(ckpt, "last.keras"))
    state, _ = checkpoints.recover_checkpoint(ckpt, model)
    assert state["epoch"] == 0, state
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    runs[f"{name}_devices"] = devices
    runs[f"{name}_pred"] = T._predict(model, x[:3], devices)
    runs.update({f"{name}_w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())})
    T.undistribute(cfg)
np.savez(out, **runs)
"""


def _same_training(tmp_path, backend):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = tmp_path / f"{backend}.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, str(script), backend, str(out), str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = dict(np.load(out))
    assert int(r.pop("one_devices")) == 1 and int(r.pop("two_devices")) == 2
    one = {k[4:]: v for k, v in r.items() if k.startswith("one_")}
    two = {k[4:]: v for k, v in r.items() if k.startswith("two_")}
    assert one.keys() == two.keys() and len(one) > 20 and one["pred"].shape == (3, 32, 32, 2)
    for k in one:
        scale = float(np.abs(one[k]).max()) + 1e-6
        assert np.abs(one[k] - two[k]).max() <= 2e-4 * scale, f"{backend}: {k} differs between 1 and 2 devices"


def test_data_parallel_tensorflow_two_devices_match_one(tmp_path):
    """MirroredStrategy over 2 logical CPUs: synchronised BN, the loss over the whole batch -> one-device weights."""
    _same_training(tmp_path, "tensorflow")


def test_data_parallel_jax_two_devices_match_one(tmp_path):
    """keras.distribution.DataParallel over 2 host devices -> one-device weights."""
    pytest.importorskip("jax")
    _same_training(tmp_path, "jax")


# ----------------------------------------------------------------------------- stages 1 and 5 on a cluster

@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as c, distributed.Client(c) as client:
        yield c.scheduler_address, client


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory):
    """6 small LUNA16-format scans through stage 1 in the local process pool -> (input folder, work folder)."""
    import preprocess
    import synthetic_ct
    base = tmp_path_factory.mktemp("scaleout")
    data = str(base / "data")
    synthetic_ct.generate_cohort(data, N_SCANS=6, N_LIDC_SCANS=0, SEED=7, IMAGE_SIZE=128, N_SLICES=(30, 30),
                                 PIXEL_SPACING_MM=(2.4, 2.6), SLICE_SPACINGS_MM=(2.5,), SHAPE_LIBRARY_SCANS=4,
                                 EMPTY_EVERY=3)
    work = str(base / "pool")
    assert preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={data}/luna16", f"--WORK_DIR={work}",
                            "--N_WORKERS=2"]) == 0
    return os.path.join(data, "luna16"), work


def test_stage1_on_dask_matches_the_pool_and_survives_a_killed_worker(pool_run, cluster, tmp_path):
    """preprocess.py --DASK_SCHEDULER=<LocalCluster>: a worker is SIGKILLed while it runs a scan; the scheduler
    reruns that scan elsewhere, the run exits 0 and every file equals the process pool's, array for array."""
    import ct_io
    luna, pool_work = pool_run
    address, client = cluster
    work = str(tmp_path / "dask")
    proc = subprocess.Popen([sys.executable, "preprocess.py", "--DATASET=luna16", f"--INPUT_DIR={luna}",
                             f"--WORK_DIR={work}", f"--DASK_SCHEDULER={address}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids, killed, deadline = client.run(os.getpid), None, time.time() + 120
    while killed is None and proc.poll() is None and time.time() < deadline:
        running = {w: keys for w, keys in client.call_stack().items() if keys}
        if running:
            worker, keys = next(iter(running.items()))
            os.kill(pids[worker], signal.SIGKILL)
            killed = worker, next(iter(keys))
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert killed, "no scan was seen running on a worker"
    assert killed[0] not in client.run(os.getpid), "the killed worker is still there"
    assert proc.returncode == 0, err[-3000:]
    story = [e for e in client.story(killed[1]) if e[0] == "scheduler"]
    assert sum(e[3] == "processing" for e in story) >= 2, "the killed worker's scan was not run again"
    want = sorted(os.path.basename(p) for p in glob.glob(os.path.join(pool_work, "1_preprocessed", "*.h5")))
    got = sorted(os.path.basename(p) for p in glob.glob(os.path.join(work, "1_preprocessed", "*.h5")))
    assert len(want) == 6 and got == want
    for name in want:
        a = ct_io.read_scan_h5(os.path.join(pool_work, "1_preprocessed", name))
        b = ct_io.read_scan_h5(os.path.join(work, "1_preprocessed", name))
        for k in ("hu", "lung_mask", "nodule_mask", "nodules"):
            assert np.array_equal(a[k], b[k]), f"{name}: /{k} differs"
        for k in ("seriesuid", "origin", "spacing", "direction"):
            assert np.array_equal(a["attrs"][k], b["attrs"][k]), f"{name}: {k} differs"


def test_stage1_on_dask_reports_failed_scans(pool_run, cluster, tmp_path):
    """A truncated .raw on the cluster: one FAILED line naming it, the others written, exit status 1."""
    import shutil
    import preprocess
    luna, _ = pool_run
    data = str(tmp_path / "luna16")
    shutil.copytree(luna, data)
    mhds = sorted(glob.glob(os.path.join(data, "subset0", "*.mhd")))[:2]
    for extra in sorted(glob.glob(os.path.join(data, "subset0", "*.mhd")))[2:]:
        os.remove(extra)
        os.remove(extra[:-4] + ".raw")
    raw = mhds[0][:-4] + ".raw"
    with open(raw, "r+b") as f:
        f.truncate(os.path.getsize(raw) // 3)
    work = str(tmp_path / "work")
    assert preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={data}", f"--WORK_DIR={work}",
                            f"--DASK_SCHEDULER={cluster[0]}"]) == 1
    log = open(os.path.join(work, "1_preprocessed", "preprocess.log")).read()
    failed = [line for line in log.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and os.path.basename(mhds[0]) in failed[0], log
    assert os.listdir(os.path.join(work, "1_preprocessed")).count(os.path.basename(mhds[1])[:-4] + ".h5") == 1


def test_stage5_on_dask_matches_the_local_run(pool_run, cluster, tmp_path):
    """postprocess.py --DASK_SCHEDULER: predictions, candidates, nodules and metrics equal the local run's."""
    import nasnet_v2
    import postprocess
    from report import read_prediction
    _, work = pool_run
    model = nasnet_v2.get_model((128, 128, 1), variant="unet", base_filters=4, depth=2, bn_momentum=None)
    path = str(tmp_path / "model.keras")
    model.save(path)
    json.dump({"CROP": 128, "CONTEXT_SLICES": 1, "PIXEL_MM": 0.0}, open(tmp_path / "config.json", "w"))
    common = [f"--WORK_DIR={work}", f"--MODEL={path}", "--SCANS=all", "--N_PICTURES=2", "--WRITE_MIP=0",
              "--WRITE_NIFTI=0"]
    runs = {}
    for name, extra in (("local", []), ("dask", [f"--DASK_SCHEDULER={cluster[0]}"])):
        pred, report = str(tmp_path / f"pred_{name}"), str(tmp_path / f"report_{name}")
        assert postprocess.main(common + [f"--PRED_DIR={pred}", f"--REPORT_DIR={report}"] + extra) == 0
        runs[name] = pred, report
    (pl, rl), (pd, rd) = runs["local"], runs["dask"]
    uids = sorted(os.listdir(pl))
    assert len(uids) == 6 and sorted(os.listdir(pd)) == uids
    for u in uids:
        a, b = read_prediction(os.path.join(pl, u)), read_prediction(os.path.join(pd, u))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), f"{u}: prediction differs"
    for name in ("candidates.csv", "nodules.csv"):
        assert list(csv.reader(open(os.path.join(rl, name)))) == list(csv.reader(open(os.path.join(rd, name))))
    ml, md = (json.load(open(os.path.join(r, "metrics.json"))) for r in (rl, rd))
    assert md["timing"]["scans_predicted"] == 6 and md["timing"]["model_load_seconds"] > 0
    for m in (ml, md):
        m.pop("timing")
    assert ml == md
    assert sorted(os.listdir(os.path.join(rl, "pictures"))) == sorted(os.listdir(os.path.join(rd, "pictures")))


def test_workers_that_cannot_import_the_stage_are_one_line_before_any_task(cluster, tmp_path):
    """A stage module the workers cannot import (they were started without it on their path): one line that says
    how to start them, before any task is sent; no Dask deserialisation error per task."""
    import dask_tasks
    (tmp_path / "only_here_stage.py").write_text("def work(task):\n    return task * 2\n")
    sys.path.insert(0, str(tmp_path))                  # on this process's path only, not on the workers'
    try:
        import only_here_stage
        with pytest.raises(SystemExit, match=r"the workers cannot import only_here_stage .*start each worker .*"
                                             r"PYTHONPATH="):
            list(dask_tasks.run_on_cluster(cluster[0], only_here_stage.work, [1, 2, 3]))
        assert [r for _, r, _ in dask_tasks.run_in_order(cluster[0], dask_tasks.importable, [len])] == [len]
    finally:
        sys.path.remove(str(tmp_path))


def test_plain_tcp_to_another_host_is_warned_tls_and_local_are_not():
    import dask_tasks
    assert "plain tcp://" in dask_tasks.plain_tcp_warning("tcp://10.0.0.5:8786")
    for quiet in ("tcp://127.0.0.1:8786", "tcp://localhost:8786", "tls://10.0.0.5:8786", "inproc://x"):
        assert dask_tasks.plain_tcp_warning(quiet) is None, quiet


def test_a_tls_scheduler_with_dasks_certificates(tmp_path):
    """tls:// addresses: the certificates come from Dask's own configuration (distributed.comm.tls.*); without
    them, one line says what to configure."""
    import shutil
    import subprocess
    import dask
    import dask_tasks
    distributed = pytest.importorskip("distributed")
    from distributed.security import Security
    if not shutil.which("openssl"):
        pytest.skip("no openssl to make a test certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-nodes", "-newkey", "rsa:2048", "-days", "1", "-keyout", key, "-out",
                    cert, "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    sec = Security(tls_ca_file=cert, tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert,
                   tls_worker_key=key, tls_client_cert=cert, tls_client_key=key, require_encryption=True)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, protocol="tls://", security=sec,
                                  dashboard_address=None, silence_logs=40) as c:
        assert c.scheduler_address.startswith("tls://")
        config = {"distributed.comm.tls.ca-file": cert, "distributed.comm.tls.client.cert": cert,
                  "distributed.comm.tls.client.key": key, "distributed.comm.require-encryption": True}
        with dask.config.set(config):
            assert [r for _, r, _ in dask_tasks.run_in_order(c.scheduler_address, abs, [-1, -2])] == [1, 2]
        with pytest.raises(SystemExit, match="no TLS certificates in Dask's configuration"):
            list(dask_tasks.run_on_cluster(c.scheduler_address, abs, [-1]))
