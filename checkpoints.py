"""Training checkpoints that survive a kill: the one resume scheme of stages 4 and 6.

    checkpoints.save_checkpoint(model, folder, state, history)   # at the end of every epoch
    state, history = checkpoints.recover_checkpoint(folder, model)   # on --RESUME=1, model = last.keras loaded

An epoch's checkpoint is three files in ``folder``: ``last.keras`` (the model with its optimiser state),
``history.csv`` (one row per epoch) and ``state.json`` (what the run needs to go on: the epoch reached, the best
score, ...; plus the optimiser's step count, and the state of the model's random generators (dropout), which
Keras does not save in the model file, so that a resumed run draws the masks the uninterrupted one would).
All three are first written under their temporary names (runfiles.tmp_name), then renamed in that order:
state.json is the commit. A kill before its rename leaves the previous state.json, which no longer matches
last.keras when last.keras was already renamed: the pending state.json.tmp does, and ``recover_checkpoint``
finishes the commit instead of throwing the epoch away. The temporary files left over are then removed with
runfiles.clean_stale.
"""
import csv
import json
import os
import shutil

import numpy as np

import runfiles

CHECKPOINT = ("last.keras", "history.csv", "state.json")      # renamed in this order; state.json is the commit


def iterations(model):
    """The optimiser's step count of a compiled model."""
    import keras
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _seed_variables(model):
    """The states of the model's random generators (dropout), in layer order."""
    return [v for v in model.variables if getattr(v, "path", v.name).endswith("seed_generator_state")]


def _json_default(o):
    return o.item() if hasattr(o, "item") else str(o)


def write_history(path, rows):
    """history.csv (one row per epoch: epoch, then the other keys sorted, as Keras's CSVLogger writes it)."""
    keys = sorted({k for r in rows for k in r} - {"epoch"})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch"] + keys, restval="")
        w.writeheader()
        w.writerows(rows)


def save_checkpoint(model, folder, state, history, best=""):
    """last.keras, history.csv and state.json of an epoch, each written to its temporary name first, then
    renamed in that order. state.json records the optimiser's step count, so that a kill between the renames is
    recognised on resume (see recover_checkpoint) and no epoch is replayed on a model that moved on. ``best``: a
    path that also gets this epoch's model (the best so far): a copy of the model file written once, committed
    before the checkpoint's renames (one save instead of two, ~1 s or more each)."""
    paths = [os.path.join(folder, n) for n in CHECKPOINT]
    tmps = [runfiles.tmp_name(p) for p in paths]
    model.save(tmps[0])
    if best:
        with runfiles.atomic(best) as tmp:
            shutil.copyfile(tmps[0], tmp)
    write_history(tmps[1], history)
    with open(tmps[2], "w") as f:
        seeds = [[int(k) for k in np.asarray(v)] for v in _seed_variables(model)]
        json.dump(dict(state, iterations=iterations(model), seed_generators=seeds), f, indent=2,
                  default=_json_default)
    for tmp, path in zip(tmps, paths):
        runfiles.commit(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def recover_checkpoint(folder, model):
    """On resume, with last.keras loaded as ``model``: finish a commit that a kill interrupted (last.keras
    renamed, state.json's temporary written but not renamed), then read state.json; history.csv's rows are cut to
    the epochs state.json counts (as strings, as csv reads them), and the model's random generators are set to
    where they were. Returns (state, history rows), or (None, []) when no state matches the model."""
    state_path, hist_path = os.path.join(folder, "state.json"), os.path.join(folder, "history.csv")
    pending = _read_json(runfiles.tmp_name(state_path))
    if pending is not None and pending.get("iterations") == iterations(model):
        if os.path.isfile(runfiles.tmp_name(hist_path)):
            runfiles.commit(runfiles.tmp_name(hist_path), hist_path)
        runfiles.commit(runfiles.tmp_name(state_path), state_path)
    state = _read_json(state_path)
    if state is None or state.get("iterations", iterations(model)) != iterations(model):
        return None, []
    for v, seed in zip(_seed_variables(model), state.get("seed_generators", [])):
        v.assign(np.asarray(seed, dtype=v.dtype))
    rows = []
    if os.path.isfile(hist_path):
        with open(hist_path, newline="") as f:
            rows = list(csv.DictReader(f))
    return state, [r for r in rows if int(r["epoch"]) <= state["epoch"]]
