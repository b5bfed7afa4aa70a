"""The manual's commands and figures against the code: README.md, docs/*.md and the Makefile's presets.

- every command line that runs a project script (`python preprocess.py --DATASET=lidc ...`, in a code block or an
  inline code span; `$(PY) script.py ...` and the preset variables of the Makefile) names a script that exists
  and only settings that script has (its top constants, read from the source with ast);
- every default the docs state in the form "`NAME` (default `value`)" equals the code's; the script it belongs to
  is the page's own script on a stage page (docs/stageN_*.md), else the script named last before it in the same
  table row or paragraph;
- the files and links the docs name exist, and nothing refers to the old stage folders or to anything outside
  the repository;
- `python SCRIPT.py --help` exits 0 and lists every setting with its comment, for every stage script and benchmark
  (a constant meant for the program only is named with a leading underscore and not listed).
"""
import ast
import glob
import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
ALL_MARKDOWN = DOCS + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.md")))
README_MAX_BYTES = 12_000
HELP_TIMEOUT_S = 300

SCRIPT_RE = re.compile(r"(?<![\w./<>-])((?:[\w-]+/)*[\w-]+\.py)(?![\w.])")
DEFAULT_RE = re.compile(r"`([A-Z][A-Z0-9_]*)` \(default `([^`]*)`")
PYTHONS = ("python", "python3", "$(PY)", "$(PYTHON)")
_UNREADABLE = object()                      # a constant whose value is an expression, not a literal


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------- a script's settings

_SETTINGS = {}


def settings(path):
    """{NAME: default} of the top-level UPPERCASE constants of the script at ``path`` (not starting with "_"),
    as configurator.configure accepts them; a default that is no literal is _UNREADABLE."""
    if path not in _SETTINGS:
        tree = ast.parse(open(path, encoding="utf-8").read())
        out = {}
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                names = [target] if isinstance(target, ast.Name) else getattr(target, "elts", [])
                values = [node.value] if isinstance(target, ast.Name) else getattr(node.value, "elts", [None] * len(names))
                for name, value in zip(names, values):
                    if isinstance(name, ast.Name) and name.id.isupper() and not name.id.startswith("_"):
                        try:
                            out[name.id] = ast.literal_eval(value)
                        except (ValueError, TypeError, SyntaxError):
                            out[name.id] = _UNREADABLE
        _SETTINGS[path] = out
    return _SETTINGS[path]


# ----------------------------------------------------------------------------- commands in the docs

def command_texts(text):
    """(line number, text) of each piece of a markdown text that can hold a command: every line of a fenced code
    block (backslash continuations joined) and every inline code span elsewhere."""
    lines, out, fenced, i = text.splitlines(), [], False, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            out.append((start, line))
        else:
            out += [(start, span) for span in re.findall(r"`([^`]+)`", line)]
        i += 1
    return out


def _tokens(rest):
    try:
        return shlex.split(rest, comments=True)
    except ValueError:                      # unbalanced quotes in a prose fragment
        return rest.split()


def options(rest):
    """The option names right after a script on a command line: ``--NAME=value`` / ``--NAME`` tokens up to the
    first token that is not one (``...`` is passed over)."""
    names = []
    for tok in _tokens(rest):
        tok = tok.strip("[]")
        if tok in ("...", ""):
            continue
        if tok == "-h":
            names.append("h")
        elif tok.startswith("--"):
            names.append(tok[2:].split("=", 1)[0])
        else:
            break
    return names


def check_command(cmd, where):
    """Problems of the scripts run on one command line (a list of strings; empty when all is well)."""
    problems = []
    for m in SCRIPT_RE.finditer(cmd):
        script, rest = m.group(1), cmd[m.end():]
        names = options(rest)
        before = cmd[:m.start()].split()
        runs = bool(names) or (before and (before[-1] in PYTHONS or before[-1].endswith("/python")))
        if not runs:
            continue
        path = os.path.join(ROOT, script)
        if not os.path.isfile(path):
            problems.append(f"{where}: {script}: no such script")
            continue
        known = settings(path)
        for name in names:
            if name not in known and name not in ("help", "h"):
                problems.append(f"{where}: {script} has no setting --{name}")
    return problems


def check_markdown_commands(text, name):
    return [p for line_no, cmd in command_texts(text) for p in check_command(cmd, f"{name}:{line_no}")]


# ----------------------------------------------------------------------------- the Makefile's presets

def _logical_lines(text):
    out, buf = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
        else:
            out.append(buf + line)
            buf = ""
    return out


def _option_names(value):
    return re.findall(r"""(?:^|[\s"'])--([A-Za-z_][A-Za-z0-9_]*)""", value)


def check_makefile(text, name="Makefile"):
    """Problems of the Makefile: each preset variable's --NAME belongs to the script it is run with (the stage
    macro's `$(call stage,LABEL,SCRIPT,VARIABLE)`, followed through the variables that use it); recipe commands
    `$(PY) script.py --NAME=...` are checked like the docs' commands."""
    lines = _logical_lines(text)
    defs = {}
    recipe_assignments = []
    for line in lines:
        m = re.match(r"^([A-Z][A-Z0-9_]*)\s*(?:\?=|:=|=)\s*(.*)$", line)
        if m:
            defs[m.group(1)] = m.group(2)
        if line.startswith("\t"):
            recipe_assignments += re.findall(r"\b([A-Z][A-Z0-9_]*)='([^']*)'", line)
    runs = defaultdict(set)
    for var_script in re.findall(r"\$\(call stage,[^,]*,([\w/.-]+\.py),([A-Z][A-Z0-9_]*)\)", text):
        runs[var_script[1]].add(var_script[0])
    uses = {var: value for var, value in list(defs.items()) + recipe_assignments}
    changed = True
    while changed:                          # a variable used inside a run variable runs with the same script
        changed = False
        for var, value in uses.items():
            for ref in re.findall(r"\$\((?:call )?([A-Z][A-Z0-9_]*)", value):
                if runs[var] - runs[ref]:
                    runs[ref] |= runs[var]
                    changed = True
    problems = []
    for var, value in list(defs.items()) + recipe_assignments:
        names = _option_names(value)
        if names and not runs[var]:
            problems.append(f"{name}: {var}: no stage runs it, so its settings cannot be checked")
        for script in sorted(runs[var]):
            path = os.path.join(ROOT, script)
            if not os.path.isfile(path):
                problems.append(f"{name}: {var}: {script}: no such script")
                continue
            problems += [f"{name}: {var}: {script} has no setting --{n}" for n in names if n not in settings(path)]
    for i, line in enumerate(lines):
        if line.startswith("\t") and "$(PY) " in line:
            problems += check_command(line.split("$(PY) ", 1)[1].join(["python ", ""]), f"{name}: recipe {i + 1}")
    return problems


# ----------------------------------------------------------------------------- stated defaults

def _blocks(text):
    """(line number, text) of each table row and each paragraph (lines between blank lines, not table rows)."""
    out, buf, start = [], [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("|"):
            if buf:
                out.append((start, "\n".join(buf)))
                buf = []
            out.append((n, line))
        elif not line.strip():
            if buf:
                out.append((start, "\n".join(buf)))
                buf = []
        else:
            if not buf:
                start = n
            buf.append(line)
    if buf:
        out.append((start, "\n".join(buf)))
    return out


def page_script(text, name):
    """The script a stage page documents: the first script its title names (docs/stageN_*.md), else None."""
    if not re.match(r"docs/stage\d", name):
        return None
    m = SCRIPT_RE.search(text.splitlines()[0])
    return m.group(1) if m else None


def _same(doc, code):
    norm = lambda v: tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else v
    doc, code = norm(doc), norm(code)
    if isinstance(doc, (int, float)) and isinstance(code, (int, float)) and not isinstance(doc, bool) \
            and not isinstance(code, bool):
        return float(doc) == float(code)
    return type(doc) is type(code) and doc == code


def check_defaults(text, name):
    """Problems of the defaults the text states as "`NAME` (default `value`)"."""
    problems, own = [], page_script(text, name)
    for line_no, block in _blocks(text):
        for m in DEFAULT_RE.finditer(block):
            setting, stated = m.group(1), m.group(2)
            script = own or next((s.group(1) for s in reversed(list(SCRIPT_RE.finditer(block[:m.start()])))), None)
            where = f"{name}:{line_no}: `{setting}` (default `{stated}`)"
            if script is None:
                problems.append(f"{where}: no script named before it in its row or paragraph")
                continue
            path = os.path.join(ROOT, script)
            known = settings(path) if os.path.isfile(path) else {}
            if setting not in known:
                problems.append(f"{where}: {script} has no setting {setting}")
                continue
            try:
                value = ast.literal_eval(stated)
            except (ValueError, SyntaxError):
                value = stated
            if known[setting] is _UNREADABLE:
                problems.append(f"{where}: {script}'s default is no literal")
            elif not _same(value, known[setting]):
                problems.append(f"{where}: {script} says {known[setting]!r}")
    return problems


# ----------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("name", DOCS)
def test_commands_name_real_scripts_and_settings(name):
    problems = check_markdown_commands(read(name), name)
    assert not problems, "\n".join(problems)


def test_makefile_presets_name_real_settings():
    problems = check_makefile(read("Makefile"))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", DOCS)
def test_stated_defaults_equal_the_code(name):
    problems = check_defaults(read(name), name)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_mistakes():
    """A misspelled flag or script, a wrong stated default, a misspelled preset: each is caught."""
    text = "```\n.venv/bin/python preprocess.py --DATSET=luna16 --INPUT_DIR=/data \\\n    --N_WORKER=2\n```\n"
    problems = check_markdown_commands(text, "x.md")
    assert len(problems) == 2 and "--DATSET" in problems[0] and "--N_WORKER" in problems[1], problems
    assert check_markdown_commands("run `python preprocesss.py --DATASET=lidc`", "x.md") == \
        ["x.md:1: preprocesss.py: no such script"]
    assert check_markdown_commands("`python table.py --CONTEXT_SLICES=3` and `python nasnet_v2.py`", "x.md") == []
    assert check_markdown_commands("`preprocess.py` (stage 1) and `ct_io.py`", "x.md") == []     # named, not run

    wrong = "| 2 | `table.py` | `CONTEXT_SLICES` (default `3`), `PIXEL_MM` (default `0.7`) |"
    problems = check_defaults(wrong, "README.md")
    assert len(problems) == 1 and "CONTEXT_SLICES" in problems[0] and "says 1" in problems[0], problems
    assert check_defaults("`CONTEXT_SLICES` (default `1`) alone", "README.md")[0].endswith("no script named "
                                                                                          "before it in its row or paragraph")
    page = "# Stage 2: `table.py`, x\n\nText `NEG_PER_SCAN` (default `10`) and `SEED` (default `86`).\n"
    problems = check_defaults(page, "docs/stage2_table.md")
    assert len(problems) == 1 and "SEED" in problems[0], problems

    make = ("DEMO_PRE ?= --N_WORKRS=2\nDEMO_X ?= $(DEMO_PRE) --LIMIT=1\ndemo:\n"
            "\t$(call stage,1 preprocess,preprocess.py,DEMO_X)\n\t$(PY) benchmarks/compare_runs.py --SUMMRY=work\n")
    problems = check_makefile(make, "Makefile")
    assert any("DEMO_PRE: preprocess.py has no setting --N_WORKRS" in p for p in problems), problems
    assert any("compare_runs.py has no setting --SUMMRY" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_readme_is_a_short_guide():
    text = read("README.md")
    assert len(text.encode("utf-8")) <= README_MAX_BYTES
    first_screen = "\n".join(text.splitlines()[:45])
    for what in ("make demo", "make test", " min", "work/demo", "6_fp_reduction/candidates.csv", "CPM"):
        assert what in first_screen, what
    headings = [h for h in re.findall(r"^## (.+)$", text, flags=re.M)]
    assert headings[0] == "Two commands" and headings[-1] == "Deviations from the thesis", headings
    for stage in ("stage0_synthetic", "stage1_preprocess", "stage2_table", "stage3_split", "stage4_training",
                  "stage5_postprocess", "stage6_fp_reduction"):
        assert f"(docs/{stage}.md)" in text, stage


@pytest.mark.parametrize("name", ALL_MARKDOWN)
def test_links_and_named_files_exist(name):
    text, folder = read(name), os.path.dirname(os.path.join(ROOT, name))
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target) and not os.path.exists(os.path.join(folder, target)):
            missing.append(f"link {target}")
    for span in re.findall(r"`([^`\s]+)`", text):
        if re.fullmatch(r"(?:[\w.-]+/)*[\w-]+\.(?:py|md|ipynb)", span) and not os.path.exists(os.path.join(ROOT, span)) \
                and not os.path.exists(os.path.join(folder, span)):
            missing.append(f"file {span}")
    assert not missing, f"{name}: " + ", ".join(missing)


@pytest.mark.parametrize("name", ALL_MARKDOWN + ["Makefile", "notebooks/inspect_outputs.ipynb"])
def test_nothing_outside_the_repository_and_no_old_folders(name):
    bad = []
    for n, line in enumerate(read(name).splitlines(), 1):
        for pattern in (r"SEED_NOTES", r"DESIGN\.md", r"\.\./shared", r"LUNA16_PRACTICE", r"work/demo19",
                        r"\b[Ii]ssue[ -]?#?\d", r"\bthis session\b"):
            if re.search(pattern, line):
                bad.append(f"{name}:{n}: {pattern}")
        if re.search(r"\b(?:6_report|7_fp_reduction)\b", line) and "earlier version" not in line:
            bad.append(f"{name}:{n}: an old stage folder")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- --help of every script

def _scripts():
    """Every stage script and benchmark: a file at the root or in benchmarks/ with a __main__ block calling
    configurator's configure()."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))):
        src = open(path, encoding="utf-8").read()
        if re.search(r"""__name__ == ["']__main__["']""", src) and "configure(" in src:
            out.append(os.path.relpath(path, ROOT))
    return out


def _help(script):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    try:
        p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=HELP_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return script, None, f"no answer in {HELP_TIMEOUT_S} s"
    return script, p.returncode, p.stdout + p.stderr


def test_help_of_every_script_lists_its_settings():
    scripts = _scripts()
    for needed in ("synthetic_ct.py", "preprocess.py", "table.py", "slice_idx.py", "nasnet_v2_train.py",
                   "postprocess.py", "fp_reduction.py", "benchmarks/run_all.py", "benchmarks/compare_runs.py"):
        assert needed in scripts, needed
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(_help, scripts))
    problems = []
    for script, rc, out in answers:
        if rc != 0:
            problems.append(f"{script} --help: exit {rc}: {out[-300:]}")
            continue
        doc = ast.get_docstring(ast.parse(read(script))) or ""
        if doc and doc.splitlines()[0] not in out:
            problems.append(f"{script} --help: the docstring's first line is not printed")
        if f"python {os.path.basename(script)}" not in out:
            problems.append(f"{script} --help: no usage line (python {os.path.basename(script)} ...)")
        whole = re.search(r"configure\(\s*globals\(\)", read(script))     # else a chosen few are the settings
        missing = [n for n, v in settings(os.path.join(ROOT, script)).items()
                   if whole and v is not _UNREADABLE and f"--{n}=" not in out]
        if missing:
            problems.append(f"{script} --help: settings not listed: {', '.join(missing)}")
        if re.search(r"^  --_", out, flags=re.M):
            problems.append(f"{script} --help: lists a constant meant for the program (leading underscore)")
        bare = re.findall(r"^  --(\w+)=.*\n(?!      \S)", out + "\n", flags=re.M)
        if bare:                            # a user setting says what it does; a program constant starts with "_"
            problems.append(f"{script} --help: settings without a comment: {', '.join(bare)}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- what `make demo` ends with

def test_demo_summary_prints_the_answer(tmp_path):
    """`python benchmarks/compare_runs.py --SUMMARY=<run>` (the Makefile's last demo step): the final file, CPM and
    the sensitivity at 1 and 4 FP/scan by size before and after stage 6, the operating point, the report."""
    import json

    import numpy as np

    import metrics
    rng = np.random.default_rng(0)
    diam, score, fp = rng.uniform(3, 30, 40), rng.uniform(0, 1, 40), rng.uniform(0, 1, 200)
    before, _ = metrics.froc_summary(diam, score, fp, 7, (5.0, 10.0))
    after, _ = metrics.froc_summary(diam, np.minimum(score + 0.5, 1.0), fp, 7, (5.0, 10.0))
    after["operating_point"] = {"threshold": 0.9, "sensitivity": {"value": 0.718}, "fp_per_scan": 2.29}
    (tmp_path / "6_fp_reduction").mkdir()
    (tmp_path / "6_fp_reduction" / "metrics.json").write_text(json.dumps(
        {"n_scans": 7, "n_nodules": 40, "before": before, "after": after}))
    p = subprocess.run([sys.executable, "benchmarks/compare_runs.py", f"--SUMMARY={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"final candidates: {tmp_path}/6_fp_reduction/candidates.csv" in out
    assert f"report:           {tmp_path}/5_report" in out
    assert "CPM stage 5" in out and "CPM after stage 6" in out and "@1 FP/scan" in out and "@4 FP/scan" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith(("<5", "5-10", ">=10", "all"))}
    assert set(rows) == {"<5", "5-10", ">=10", "all"} and rows["all"][1] == "40"
    assert f"{after['cpm']['value']:.3f}" in rows["all"] and f"{before['cpm']['value']:.3f}" in rows["all"]
    assert "operating point (after stage 6, score > 0.9): sensitivity 71.8 % at 2.29 FP/scan" in out
