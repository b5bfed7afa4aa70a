"""The scans of a dataset folder: which files and DICOM series are scans, their ids, and reading your own.

    paths = find_scans("luna16", input_dir)             # .mhd files; "lidc": folders holding .dcm files;
                                                        # "scans": volume files and DICOM folders
    tasks = dicom_tasks(folders)                        # (folder, SeriesInstanceUID) per DICOM series
    tasks = scans_tasks(paths)                          # DATASET="scans": (path, series uid or None)
    scan = read_own_scan(path, series_uid)              # a ct_io.Scan with source "scans" and a patient id

A scan's id (the name of its stage-1 file) is the SeriesInstanceUID for DICOM, else the file name without its
extension. Each DICOM series is one scan, read once from the first folder holding it.
"""
import glob
import os

from ct_io import IMAGE_EXTENSIONS, ScanError, dicom_series_in_folder, image_id, read_dicom_series, read_image

DATASETS = ("luna16", "lidc", "scans")


def find_scans(dataset, input_dir):
    """Paths of the scans of a dataset: LUNA16 .mhd files, LIDC folders holding .dcm files (see dicom_tasks
    for the series in them), or your own scans (find_own_scans)."""
    if dataset == "luna16":
        return sorted(glob.glob(os.path.join(input_dir, "**", "*.mhd"), recursive=True))
    if dataset == "lidc":
        folders = {os.path.dirname(p) for p in glob.glob(os.path.join(input_dir, "**", "*.dcm"), recursive=True)}
        return sorted(folders)
    if dataset == "scans":
        return find_own_scans(input_dir)
    raise SystemExit(f"DATASET must be 'luna16', 'lidc' or 'scans', not {dataset!r}")


def _is_dicom(path):
    """A .dcm file, or any file with DICOM's "DICM" marker after its 128-byte preamble (exports often have no
    extension)."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def find_own_scans(input_dir):
    """DATASET="scans": the volume files under ``input_dir`` (IMAGE_EXTENSIONS), then the folders directly
    holding DICOM files (see scans_tasks for the series in them). Symbolic links to folders are followed (each
    real folder once, so a link back up does not loop)."""
    files, folders, seen = [], [], set()
    for root, dirs, names in os.walk(input_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:                              # reached again through a link: already listed
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(path)
            elif root not in folders and not name.startswith(".") and _is_dicom(path):
                folders.append(root)
    if not files and not folders:
        raise SystemExit(f"{input_dir}: no CT found (no {'/'.join(IMAGE_EXTENSIONS)} file, no DICOM file)")
    return files + folders


def scan_id(path, series_uid=None):
    """The scan id of a DATASET="scans" task: the DICOM SeriesInstanceUID, else the file name without extension
    (None for a DICOM folder whose series is not known yet)."""
    if series_uid:
        return series_uid
    return image_id(path) if os.path.isfile(path) else None


def dicom_tasks(folders, pool=None, log=None):
    """(folder, SeriesInstanceUID) per DICOM series of ``folders``: each series is its own scan, read once
    from the first folder holding it (a folder whose files hold no readable series is kept as (folder, None):
    reading it then says what is wrong). ``pool``: a process pool to read the headers with; ``log``: a
    function given one line per series found again in another folder."""
    found = (pool.imap if pool is not None else map)(dicom_series_in_folder, folders)
    tasks, where = [], {}
    for folder, series in zip(folders, found):
        if not series:
            tasks.append((folder, None))
        for uid in sorted(series):
            if uid in where:
                if log is not None:
                    log(f"{folder}: series {uid} already read from {where[uid]}; not read again")
                continue
            where[uid] = folder
            tasks.append((folder, uid))
    return tasks


def scans_tasks(paths, pool=None, log=None):
    """(path, SeriesInstanceUID or None) per scan of DATASET="scans": each volume file, and each DICOM series of
    the folders once (dicom_tasks). Two scans with one id would write one output file: refused, naming both."""
    files = [p for p in paths if os.path.isfile(p)]
    tasks = [(p, None) for p in files] + dicom_tasks([p for p in paths if os.path.isdir(p)], pool, log)
    seen = {}
    for path, uid in tasks:
        sid = scan_id(path, uid)
        if sid is None:
            continue
        if sid in seen:
            raise SystemExit(f"{path}: scan id {sid!r} is also that of {seen[sid]} (the id is the SeriesInstanceUID, "
                             "else the file name without extension): rename one of them")
        seen[sid] = path
    return tasks


def read_own_scan(path, series_uid=None, allow_z_gaps=False):
    """One scan of DATASET="scans": a volume file through ct_io.read_image, or the DICOM series ``series_uid`` of
    a folder through ct_io.read_dicom_series -> Scan with source "scans" and a patient id (DICOM's PatientID,
    else the scan id)."""
    if os.path.isfile(path):
        scan = read_image(path)
    else:
        scan = read_dicom_series(path, series_uid, allow_z_gaps=allow_z_gaps)
    if scan.hu.shape[0] < 2:
        raise ScanError(f"{path}: scan {scan.seriesuid}: 1 slice: not a volume")
    scan.source = "scans"
    scan.patient_id = scan.patient_id.strip() or scan.seriesuid
    return scan
