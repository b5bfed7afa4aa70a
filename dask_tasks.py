"""Run a stage's per-scan tasks on a dask.distributed cluster (the DASK_SCHEDULER setting of preprocess.py,
postprocess.py and fp_reduction.py).

    for task, result, error in run_on_cluster("tcp://host:8786", preprocess._task, tasks):
        ...

Each task is one call ``fn(task)`` on some worker; results come back as they finish (any order). A worker
that dies mid-task (killed, out of memory, node lost) has its task rerun on another worker by the scheduler;
a task that killed more workers than the scheduler allows (its ``distributed.scheduler.allowed-failures``,
3 by default), or that raised, comes back with ``error`` set (one line), its result None. The stage scripts write each scan's file atomically (temporary name, then
rename), so a rerun task never leaves a half-written file looking complete.

``fn`` must be importable on the workers under its module's name (start the workers with this project's
environment and ``PYTHONPATH`` set to this folder); a function of a script run as ``__main__`` is imported again by its file name
(see ``importable``). The cluster's workers need the stage's input and output folders at the same paths
(a shared file system).
"""
import importlib
import os
import sys

DASK_CONNECT_S = 10            # seconds to wait for the scheduler at the address given
_ROOT = os.path.dirname(os.path.abspath(__file__))


def plain_tcp_warning(address):
    """A one-line warning when ``address`` is a plain tcp:// scheduler on another host (whoever reaches a Dask
    scheduler runs code on its workers: use tls:// with Dask's security configuration, or a private network);
    None for tls://, inproc, or this host."""
    import socket
    from urllib.parse import urlsplit
    if not address.startswith("tcp://"):
        return None
    host = urlsplit(address).hostname or ""
    local = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname(), socket.getfqdn()}
    if host in local or host.startswith("127."):
        return None
    return (f"warning: DASK_SCHEDULER {address} is plain tcp:// to another host: anyone who can reach it can run "
            f"code on the workers; use tls:// (docs/scale_out.md) or a private network")


def check_workers(client, module, address):
    """Exit with one line saying what to do when the cluster's workers cannot import ``module`` (started without
    this project on their path): checked once, before any task is sent."""
    try:
        client.run(importlib.import_module, module)          # a standard-library function: any worker has it
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise SystemExit(f"DASK_SCHEDULER {address}: the workers cannot import {module} ({type(e).__name__}: "
                         f"{msg}); start each worker in this project's environment with PYTHONPATH={_ROOT} "
                         f"(docs/scale_out.md), then run again") from None


def importable(fn):
    """``fn`` itself, or, when it was defined in a script run as __main__, the same function from the script
    imported under its file name, so that the workers import it instead of receiving a pickled copy."""
    if fn.__module__ != "__main__":
        return fn
    name = os.path.splitext(os.path.basename(sys.modules["__main__"].__file__))[0]
    return getattr(importlib.import_module(name), fn.__name__)


def run_on_cluster(address, fn, tasks, names=None):
    """Yield (task, result, error) for each task of ``tasks`` run as ``fn(task)`` on the dask.distributed
    scheduler at ``address`` (e.g. 'tcp://10.0.0.5:8786'), as they finish; ``names``: one label per task for
    the error lines (default: str(task))."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise SystemExit("DASK_SCHEDULER is set but dask.distributed is not installed "
                         "(pip install -r requirements.txt)") from None
    tasks = list(tasks)
    names = list(names) if names is not None else [str(t) for t in tasks]
    warning = plain_tcp_warning(address)
    if warning:
        print(warning, file=sys.stderr)
    try:
        client = Client(address, timeout=DASK_CONNECT_S)     # tls://: certificates from Dask's configuration
    except OSError as e:
        raise SystemExit(f"DASK_SCHEDULER {address}: cannot connect ({e})") from None
    except (TypeError, ValueError) as e:              # tls:// without certificates: "TLS expects a ssl_context ..."
        raise SystemExit(f"DASK_SCHEDULER {address}: no TLS certificates in Dask's configuration "
                         f"(distributed.comm.tls.ca-file, .client.cert, .client.key; docs/scale_out.md): "
                         f"{' '.join(str(e).split())[:120]}") from None
    try:
        fn = importable(fn)
        check_workers(client, fn.__module__, address)
        futures = client.map(fn, tasks, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        for f in as_completed(futures):
            i = index[f.key]
            try:
                yield tasks[i], f.result(), None
            except Exception as e:                 # KilledWorker, or fn raised: one line for this task
                msg = " ".join(str(e).split())[:300]
                yield tasks[i], None, f"{names[i]}: {type(e).__name__} on the cluster: {msg}"
            f.release()
    finally:
        client.close()


def run_in_order(address, fn, tasks, names=None):
    """``run_on_cluster``'s (task, result, error) triples, yielded in the order of ``tasks`` (as a local run
    gives them), each as soon as it and every task before it have finished."""
    tasks = list(tasks)
    done, next_i = {}, 0
    for i, (task, result, error) in enumerate_results(run_on_cluster(address, fn, tasks, names), tasks):
        done[i] = (task, result, error)
        while next_i in done:
            yield done.pop(next_i)
            next_i += 1


def enumerate_results(results, tasks):
    """(index of the task in ``tasks``, triple) for ``run_on_cluster``'s triples (tasks compared by identity)."""
    index = {id(t): i for i, t in enumerate(tasks)}
    for triple in results:
        yield index[id(triple[0])], triple
