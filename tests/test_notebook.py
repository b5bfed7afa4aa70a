"""notebooks/inspect_outputs.ipynb runs headless on a real run of every stage and shows each stage's output.

The notebook is executed with nbclient in a kernel of THIS interpreter (the venv's Python: see ``_kernel_manager_class``),
with ``WORK_DIR`` in the kernel's environment and the notebook's folder as its working directory, as Jupyter runs it.

Re-execute the committed copy against a run and save its outputs in place (what to do after changing it):

    .venv/bin/python tests/test_notebook.py work/demo
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "inspect_outputs.ipynb")
CELL_TIMEOUT_S = 120


def _kernel_manager_class():
    """A kernel manager class whose "python3" is ipykernel in THIS interpreter (sys.executable).

    Its KernelSpecManager looks in no kernel folder, so no installed kernelspec is used (a python3 spec in
    ~/.local/share/jupyter may point at another Python), and it falls back to ipykernel's own spec, built from
    sys.executable: the kernel is the venv's Python whenever the test or this script runs from the venv."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)

    return ThisPythonKernelManager


def execute_notebook(work_dir, path=NOTEBOOK, save_to=None, timeout=CELL_TIMEOUT_S):
    """Execute the notebook on the run in ``work_dir`` -> the executed notebook (nbformat node).

    Raises nbclient's CellExecutionError at the first failing cell. ``save_to``: write the result there."""
    import nbclient
    import nbformat
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}   # the notebook draws inline
    env["WORK_DIR"] = work_dir
    client = nbclient.NotebookClient(nb, kernel_name="python3", kernel_manager_class=_kernel_manager_class(),
                                     timeout=timeout, record_timing=False,
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute(env=env)
    if save_to:
        nbformat.write(nb, save_to)
    return nb


def tagged(nb, tag):
    """The code cell carrying ``tag`` in its metadata."""
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{len(cells)} cells tagged {tag!r}"
    return cells[0]


def text_of(cell):
    """Everything a cell printed (stdout, stderr, text/plain results)."""
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", ""))
        elif "data" in o:
            out.append(o["data"].get("text/plain", ""))
    return "".join(out)


def n_images(cell):
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_notebook_runs_on_the_pipeline_run(pipeline_run, tmp_path):
    work, _ = pipeline_run
    nb = execute_notebook(work, save_to=str(tmp_path / "executed.ipynb"))

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    everything = "".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert "missing:" not in everything and "MISSING" not in everything, everything[:3000]
    assert "Traceback" not in everything

    setup = text_of(tagged(nb, "setup"))
    assert f"WORK_DIR = {work}" in setup
    assert re.search(r"5_report +present", setup), setup       # stage 5's report folder (stage N writes N_...)

    # 1: the stage-1 file: datasets, geometry, nodule table, and the slice figure with its contours
    s1 = text_of(tagged(nb, "stage1-read"))
    for word in ("/hu", "/lung_mask", "/nodule_mask", "origin", "spacing", "direction", "diameter_mm"):
        assert word in s1, word
    fig1 = tagged(nb, "stage1-figure")
    assert "stage 1 figure: slice z=" in text_of(fig1) and "mm)" in text_of(fig1)     # at a nodule
    assert n_images(fig1) == 1
    # 2: the slice table, 3 channels in the pipeline run (CONTEXT_SLICES=3)
    t = text_of(tagged(nb, "table-read"))
    assert "CONTEXT_SLICES = 3" in t and "read_where" in t and "(96, 96, 3)" in t
    assert n_images(tagged(nb, "table-figure")) == 1
    # 3: the split, each part with its patients and index rows
    s = text_of(tagged(nb, "split"))
    for part in ("train", "val", "test"):
        assert part in s
    assert "patients in two parts: none" in s
    # 4: training history
    h = tagged(nb, "history")
    assert re.search(r"\b[1-9]\d* epochs", text_of(h)) and "val_dice" in text_of(h) and n_images(h) == 1
    # 5: a prediction over its scan, the headline metrics and nodules.csv
    p = tagged(nb, "prediction")
    assert "prediction figure: slice z=" in text_of(p) and n_images(p) == 1
    r = text_of(tagged(nb, "report"))
    for word in ("sensitivity (LUNA16 rule)", "per-nodule Dice", "slice Dice", "false positives per scan",
                 "CPM", "nodules.csv:", "by nodule diameter"):
        assert word in r, word
    assert n_images(tagged(nb, "report")) == 1       # the FROC curve


def test_notebook_reports_missing_stages(tmp_path):
    """On a run folder holding no stage at all, every section says what is missing and nothing fails."""
    nb = execute_notebook(str(tmp_path / "no_run_here"))
    everything = "".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    for missing in ("1_preprocessed", "2_table", "3_split", "history.csv", "5_predictions", "metrics.json"):
        assert f"missing: {tmp_path / 'no_run_here'}" in everything and missing in everything, missing
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if o.get("output_type") == "error"]


def test_kernel_is_this_python():
    """The notebook's kernel runs in the interpreter running the tests (the venv), whatever is installed."""
    km = _kernel_manager_class()(kernel_name="python3")
    assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv


def test_committed_notebook_is_executed_and_small():
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source.splitlines()[1].startswith('WORK_DIR = os.environ.get("WORK_DIR", "../work/demo")')
    assert all(c.get("execution_count") for c in code), "the committed notebook is not executed"
    assert sum(n_images(c) for c in code) >= 5
    assert os.path.getsize(NOTEBOOK) < 1.5e6
    text = open(NOTEBOOK, encoding="utf-8").read()
    assert "6_report" not in text and "7_fp_reduction" not in text      # the folders follow the stage numbers
    assert "6_fp_reduction/" in text and "5_report/" in text


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} WORK_DIR   (re-executes {os.path.relpath(NOTEBOOK)} in place)")
    run = os.path.abspath(sys.argv[1])
    if not os.path.isdir(run):
        sys.exit(f"{sys.argv[1]}: no such run folder")
    # written as the notebook sees it: relative to its folder when the run is inside the repository
    inside = os.path.commonpath([run, ROOT]) == ROOT
    execute_notebook(os.path.relpath(run, os.path.dirname(NOTEBOOK)) if inside else run, save_to=NOTEBOOK)
    print(f"{os.path.relpath(NOTEBOOK)} executed on {run}: {os.path.getsize(NOTEBOOK) / 1e3:.0f} kB")
