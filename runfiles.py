"""Run files: the one place where the stages write a file safely, clean up what a killed run left, list the
scans of a part, and turn an error into one line.

    with runfiles.atomic(path) as tmp:          # write to tmp; it becomes ``path`` only if the block succeeds
        np.save(tmp, arr)
    runfiles.write_json(path, obj)              # JSON / CSV in one call, atomically
    runfiles.clean_stale(folder)                # temporary files a killed run left behind
    runfiles.part_scans(work_dir, "test")       # stage-1 files of a part of 3_split/split.json (or "all")
    runfiles.one_line(e)                        # an exception as one short line for a log or a summary

Every temporary file is named ``<path>.tmp`` (``<path>.tmp<ext>`` for the extensions a writer insists on:
.keras, .nii.gz, .npy, ...), in the folder of the file it becomes, so the final rename is atomic on every
file system and a stale one is recognised by its name. ``commit`` holds the project's one rename.
"""
import contextlib
import csv
import json
import os
import re
import shutil

import numpy as np

# writers that choose the format by the file name's ending keep that ending on the temporary name
_KEEP_EXT = (".nii.gz", ".keras", ".nii", ".mha", ".mhd", ".nrrd", ".npy", ".npz")
# what a temporary name looks like (current and earlier forms), for the cleaners
_STALE = ("*.tmp", "*.tmp.*", ".*.tmp*")


def tmp_name(path):
    """The temporary name under which ``path`` is written before ``commit`` renames it."""
    ext = next((e for e in _KEEP_EXT if path.endswith(e)), "")
    return path + ".tmp" + ext


def commit(tmp, path):
    """Rename the finished ``tmp`` to ``path`` (atomic: a reader sees the old file or the new, never half)."""
    os.replace(tmp, path)


def _remove(p):
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        os.remove(p)


@contextlib.contextmanager
def atomic(path):
    """Yield the temporary name of ``path`` (a file, or a folder the block creates); renamed to ``path`` when the
    block succeeds, removed when it raises."""
    tmp = tmp_name(path)
    _remove(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):
            shutil.rmtree(path)                    # a folder replaces a folder of the same name
        commit(tmp, path)
    finally:
        _remove(tmp)


def _plain(o):
    """``o`` made JSON-friendly: numpy numbers to Python numbers, NaN / inf to null, keys starting with '_'
    (a result's private arrays) left out."""
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items() if not str(k).startswith("_")}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return _plain(o.tolist())
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    if o is None or isinstance(o, str):
        return o
    return str(o)


def write_json(path, obj):
    """``obj`` as indented JSON at ``path``, atomically (see ``_plain`` for the conversions)."""
    with atomic(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(_plain(obj), f, indent=2)
    return path


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_csv(path, rows, fields, restval=""):
    """``rows`` (dicts) as CSV with the columns ``fields`` (others ignored), atomically."""
    with atomic(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore", restval=restval)
            w.writeheader()
            w.writerows(rows)
    return path


def stale_files(folder):
    """The temporary files (and folders) a killed run left in ``folder``."""
    import glob
    found = set()
    for pattern in _STALE:
        found.update(glob.glob(os.path.join(glob.escape(folder), pattern)))
    return sorted(found)


def clean_stale(folder, log=None):
    """Remove what ``stale_files`` finds; ``log``: a function given one line when anything was removed.
    Returns the removed paths."""
    stale = stale_files(folder) if os.path.isdir(folder) else []
    for p in stale:
        _remove(p)
    if stale and log is not None:
        log(f"removed {len(stale)} temporary file(s) of an interrupted run in {folder}")
    return stale


def one_line(e, limit=300):
    """An exception as one line: HDF5's and Dask's multi-line messages reduced to the innermost cause."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("File ", "HDF5 error back trace", "End of HDF5"))]
    text = lines[-1] if len(lines) > 1 and str(e).lstrip().startswith("HDF5") else " ".join(lines)
    return text[:limit] if text else type(e).__name__


# ----------------------------------------------------------------------------- the scans of a part

def uid_of(path):
    """The series uid of a stage-1 / stage-5 file: its name without .h5."""
    name = os.path.basename(path)
    return name[:-3] if name.endswith(".h5") else name


def series_of_part(split, part):
    """The series uids of one part in split.json; tolerant of {'test': {'series': [...]}} and
    {'series': {'test': [...]}} layouts. None when the part is not there."""
    entry = split.get(part)
    if isinstance(entry, dict):
        for key in ("series", "seriesuids", "series_uids"):
            if key in entry:
                return sorted(entry[key])
    for key in ("series", "seriesuids", "series_uids"):
        if isinstance(split.get(key), dict) and part in split[key]:
            return sorted(split[key][part])
    return None


def part_scans(work_dir, part):
    """Stage-1 files of the scans in ``part`` ('all', or a part of 3_split/split.json) -> list of paths."""
    folder = os.path.join(work_dir, "1_preprocessed")
    if part == "all":
        if not os.path.isdir(folder):
            raise SystemExit(f"{folder}: no stage-1 folder (run preprocess.py)")
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".h5"))
    split_path = os.path.join(work_dir, "3_split", "split.json")
    if not os.path.isfile(split_path):
        raise SystemExit(f"{split_path}: no split (run slice_idx.py, or use --SCANS=all)")
    uids = series_of_part(read_json(split_path), part)
    if uids is None:
        raise SystemExit(f"{split_path}: no part {part!r} with its series")
    try:
        return [file_in(folder, uid, ".h5") for uid in uids]
    except ValueError as e:
        raise SystemExit(f"{split_path}: {e}") from None


# ----------------------------------------------------------------------------- the run folder's layout

# folders of the earlier layout (stage 5's report in 6_..., stage 6 in 7_...) -> today's name
_RENAMED = {"6_report": "5_report", "7_fp_reduction": "6_fp_reduction"}


def refuse_old_layout(work_dir):
    """Exit with one line when ``work_dir`` was written by the earlier layout (stage 5's report in 6_report/,
    stage 6 in 7_fp_reduction/): saying how to rename it, instead of silently running everything again."""
    for old, new in _RENAMED.items():
        if os.path.isdir(os.path.join(work_dir, old)) and not os.path.exists(os.path.join(work_dir, new)):
            moves = " && ".join(f"mv {os.path.join(work_dir, o)} {os.path.join(work_dir, n)}"
                                for o, n in _RENAMED.items() if os.path.isdir(os.path.join(work_dir, o)))
            raise SystemExit(f"{work_dir}: made by an earlier version ({old}/ is now {new}/); rename its folders "
                             f"first: {moves}")


# ----------------------------------------------------------------------------- one run at a time in a folder

@contextlib.contextmanager
def hold(folder, what):
    """Hold ``folder`` for this process while the block runs: a second run that wants it exits with one line
    naming the holder (host, pid, what it runs). A lock left by a run that died (same host, pid gone) is taken
    over. The lock is ``folder/.lock``, created exclusively (O_EXCL), removed at the end."""
    import socket
    import time
    path = os.path.join(folder, ".lock")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and not _dead(holder, me["host"]):
                raise SystemExit(f"{folder}: in use by {holder.get('what', 'another run')} (pid {holder.get('pid')} on "
                                 f"{holder.get('host')} since {holder.get('since')}); wait for it to end, or use "
                                 f"another WORK_DIR") from None
            _remove(path)                            # a crashed run's lock: taken over
            continue
        except OSError as e:
            raise SystemExit(f"{folder}: cannot write the output folder ({e.strerror or e})") from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError as e:                             # disk full: no half-written lock left
            _remove(path)
            raise SystemExit(f"{folder}: cannot write the output folder ({e.strerror or e})") from None
        break
    else:
        raise SystemExit(f"{folder}: cannot take the lock {path}")
    try:
        yield
    finally:
        if (_lock_holder(path) or {}).get("pid") == me["pid"]:
            _remove(path)


def _lock_holder(path):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}                                     # unreadable: half-written by a run that died at that moment


def _dead(holder, host):
    """Whether the run that wrote ``holder`` is gone: on this host, its pid no longer exists."""
    if holder.get("host") != host:
        return False                                  # another machine's run: cannot tell, assume alive
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):
        return not isinstance(holder.get("pid"), int)
    return False


# ----------------------------------------------------------------------------- identifiers that become file names

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def file_in(folder, ident, ext):
    """``folder/<ident><ext>`` for an identifier that comes from the data (a SeriesInstanceUID, a file name, a
    scan id of a CSV). Refused (ValueError, one line) unless it is a plain name: letters, digits, '.', '_' and
    '-', not starting with '.', at most 128 characters (a DICOM UID is digits and dots, at most 64), so that no
    identifier can point outside ``folder``."""
    ident = str(ident)
    if not _SAFE_NAME.fullmatch(ident):
        raise ValueError(f"identifier {ident[:80]!r} cannot be a file name (letters, digits, '.', '_', '-' only, "
                         f"not starting with '.', <= 128 characters)")
    return os.path.join(folder, ident + ext)
