"""Shared fixtures: the repository root on sys.path, and one synthetic cohort run through stage 1 per session."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """8 full-size LUNA16-format phantoms (every third one flipped, one without nodules) and 1 LIDC DICOM
    series, run through preprocess.py: LUNA16 with the default wand labels, LIDC with consensus labels.
    Returns a dict of folders: data (synthetic_ct output), luna (stage-1 work dir), lidc (stage-1 work dir)."""
    import preprocess
    import synthetic_ct
    base = tmp_path_factory.mktemp("cohort")
    data = str(base / "data")
    index, failures = synthetic_ct.generate_cohort(data, N_SCANS=8, N_LIDC_SCANS=1, SEED=3, LIDC_MAX_SLICES=130)
    assert not failures, failures
    luna, lidc = str(base / "luna"), str(base / "lidc")
    assert preprocess.main(["--DATASET=luna16", f"--INPUT_DIR={data}/luna16", f"--WORK_DIR={luna}",
                            "--N_WORKERS=2"]) == 0
    assert preprocess.main(["--DATASET=lidc", f"--INPUT_DIR={data}/lidc", f"--WORK_DIR={lidc}",
                            "--N_WORKERS=1", "--LABELS=consensus"]) == 0
    _restore(preprocess)
    return dict(data=data, luna=luna, lidc=lidc, index=index)


def _restore(module):
    """Put a stage module's constants back to the file's defaults after a main() call changed them."""
    import importlib
    importlib.reload(module)
