"""The code's layout: stages import libraries only, libraries never import stages, no import cycle, one home for
the atomic rename, and files / functions of a readable size."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["synthetic_ct.py", "preprocess.py", "table.py", "slice_idx.py", "nasnet_v2_train.py", "postprocess.py",
          "fp_reduction.py"]
MODULES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))


def project_imports(path):
    """The project modules (file names) that the file at ``path`` imports, anywhere in it."""
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names.add(node.args[0].value.split(".")[0])
    return {n + ".py" for n in names if n + ".py" in MODULES}


GRAPH = {m: project_imports(os.path.join(ROOT, m)) for m in MODULES}


def test_every_stage_exists():
    assert set(STAGES) <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_stages_import_libraries_and_libraries_never_import_stages(module):
    stages_imported = GRAPH[module] & set(STAGES) - {module}
    assert not stages_imported, f"{module} imports the stage(s) {sorted(stages_imported)}"


def test_no_import_cycle():
    def visit(m, path):
        for n in GRAPH[m]:
            if n in path:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            visit(n, path + [n])
    for m in MODULES:
        visit(m, [m])


def test_the_atomic_rename_has_one_home():
    ignored = ("tests/", ".venv/", "work/", "data/", "benchmarks/results/")   # .gitignore's: runs' copies of code
    files = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)]
    users = [p for p in files if not p.startswith(ignored) and "os.replace(" in open(os.path.join(ROOT, p)).read()]
    assert users == ["runfiles.py"]


def test_no_code_rewrites_module_constants():
    for m in MODULES:
        src = open(os.path.join(ROOT, m)).read()
        assert "globals().update" not in src and "globals()[" not in src, m


@pytest.mark.parametrize("module", [m for m in MODULES if m != "synthetic_ct.py"])
def test_files_and_functions_of_a_readable_size(module):
    """No file over 600 lines (the synthetic cohort's generator excepted); no function over 60 lines unless a
    comment on the line above its ``def`` says why."""
    src = open(os.path.join(ROOT, module)).read()
    assert src.count("\n") <= 600, f"{module}: {src.count(chr(10))} lines"
    lines = src.splitlines()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
            first = node.lineno - len(node.decorator_list) - 1          # the def's (or its decorator's) line
            assert first > 0 and lines[first - 1].strip().startswith("#"), f"{module}:{node.lineno} {node.name} is {node.end_lineno - node.lineno + 1} lines"


def test_tests_sharing_a_costly_fixture_run_on_one_worker():
    """``make test`` (-n 2 --dist loadgroup): the tests of one shared session fixture carry one xdist group
    (appended to their node ids), so the fixture is built once, not on both workers (tests/conftest.py)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "--setup-plan",
                          "-p", "no:cacheprovider", "tests/test_notebook.py", "tests/test_pipeline_e2e.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    assert "test_notebook_runs_on_the_pipeline_run@pipeline_run" in out, out[-2000:]
    assert "test_every_stage_output_exists_and_fits@pipeline_run" in out, out[-2000:]
