"""The package's layout holds: imports go down only (core -> engine -> analysis -> experiments,
cli.py on top) with no cycles at import time, analysis starts nothing, core loads no Ray /
MLflow / Optuna, functions and modules stay short, and README's Layout lists every module
exactly once. Each rule's checker is also run on a made-up failing input, so a rule that could
never fail shows up here."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"  # holds the package; never itself a package (it would shadow `platform`)
PACKAGE = "lora_diffusion"
# A module may import its own layer and those before it. The root __init__ is loaded by every
# import of the package, so it counts as core; top-level modules (cli.py) are the top.
# analysis reads trials back; experiments launch sweeps and read them back through analysis, so
# they sit above it (analysis imports no experiment: reading a record never starts a sweep).
LAYERS = ("core", "engine", "analysis", "experiments", "top")
# The engine modules that start Ray or a sweep: analysis reaches none of them, even indirectly.
LAUNCHERS = ("lora_diffusion.engine.sweep", "lora_diffusion.engine.tuner", "lora_diffusion.engine.trial")
HEAVY = ("ray", "mlflow", "optuna")  # the engine's dependencies, never loaded by core
MAX_FUNCTION_LINES = 59  # def line through last line
MAX_MODULE_LINES = 400


# ----------------------------------------------------------------------------------------------
# Checkers (each takes the folder holding the package, so the tests below can feed them others)


def modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file for every module of `package` under root (a package by its __init__)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(node: ast.Import | ast.ImportFrom, module: str, here: str, known: dict) -> set[str]:
    """The known modules one import statement in `module` loads; `here` is the package `.`
    points to. Importing a.b.c runs the __init__ of a and a.b too, unless they are packages
    around `module` (those are loaded before `module` runs)."""
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:
            parts = here.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
        # `from a import b` loads module a.b if there is one, else takes the name b from module a
        targets = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                   for alias in node.names}
    around = set(_ancestors(module))
    packages = {p for t in targets for p in _ancestors(t) if p not in around}
    return (targets | packages) & known.keys()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST):
    """Every import statement that can run: at module level or inside functions, but not in an
    `if TYPE_CHECKING:` block (read by type checkers only, never at import time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (package __init__s included), at module level
    or inside functions."""
    known = modules(root, package)
    graph = {}
    for name, path in known.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = {m for node in runtime_imports(tree) for m in _imported(node, name, here, known)} - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def launchers_reached_by_analysis(graph: dict[str, set[str]]) -> list[str]:
    """'module -> launcher' for each analysis module that reaches a LAUNCHERS module."""
    return sorted(f"{name} -> {hit}" for name in graph if layer(name) == "analysis"
                  for hit in sorted(reachable(graph, name) & set(LAUNCHERS)))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state, path = {}, []

    def visit(node):
        state[node] = "grey"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "grey":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "black"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "core"
    return parts[1] if parts[1] in LAYERS[:-1] else "top"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, as 'importer -> imported'."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts
                  if rank[layer(dst)] > rank[layer(src)])


def heavy_modules_loaded(root: Path, names: list[str]) -> list[str]:
    """The HEAVY modules in sys.modules of a fresh interpreter after importing `names`."""
    script = ("import importlib, json, sys\n"
              f"for name in {names!r}: importlib.import_module(name)\n"
              f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    paths = [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions and methods (nested ones too) longer than `limit` lines, def line to last line."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def long_modules(root: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            out.append(f"{path.relative_to(root)} ({lines} lines)")
    return out


def layout_section(readme: str) -> str:
    """README's text between '## Layout' and the next '## ' heading."""
    match = re.search(r"^## Layout[ \t]*\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert match, "README.md has no '## Layout' section"
    return match.group(1)


def layout_entries(section: str) -> list[str]:
    """The module paths, relative to lora_diffusion/, that a Layout section's lines list, once
    per line: a line whose first word is a path (`core/config.py`) or a file (`config.py`) in a
    tree, where a line whose first word is a directory (`core/`) encloses the more indented
    lines below it. Other lines (descriptions, their continuation lines) are skipped."""
    found = []
    enclosing = []  # (indent, "dir/") of the directory lines around the current line
    for line in section.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match or not match[2].endswith(("/", ".py")):
            continue
        indent, word = len(match[1]), match[2]
        while enclosing and enclosing[-1][0] >= indent:
            enclosing.pop()
        if word.endswith("/"):
            enclosing.append((indent, word))
        else:
            found.append("".join(d for _, d in enclosing) + word)
    return [p.split(f"{PACKAGE}/", 1)[-1] for p in found]


def listed_modules(section: str) -> set[str]:
    """The module paths a Layout section names: its entries, and paths written out anywhere
    in it (`engine/tuner.py`, `platform/lora_diffusion/cli.py`)."""
    written = {p.split(f"{PACKAGE}/", 1)[-1] for p in re.findall(r"[\w./]+\.py\b", section)}
    return written | set(layout_entries(section))


def unlisted_modules(package_dir: Path, readme: str) -> list[str]:
    listed = listed_modules(layout_section(readme))
    paths = (p.relative_to(package_dir).as_posix() for p in sorted(package_dir.rglob("*.py"))
             if p.name != "__init__.py")
    return [p for p in paths if p not in listed]


def modules_listed_twice(readme: str) -> list[str]:
    entries = layout_entries(layout_section(readme))
    return sorted({p for p in entries if entries.count(p) > 1})


# ----------------------------------------------------------------------------------------------
# The rules, on this checkout


def test_import_graph_has_no_cycles():
    cycle = find_cycle(import_graph(PLATFORM))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_imports_go_down_only_core_engine_analysis_experiments_cli():
    """core imports nothing from engine, analysis, experiments or cli.py; engine nothing from
    analysis, experiments or cli.py; analysis nothing from experiments or cli.py; experiments
    nothing from cli.py."""
    upward = upward_imports(import_graph(PLATFORM))
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_analysis_reaches_no_module_that_starts_ray_or_a_sweep():
    found = launchers_reached_by_analysis(import_graph(PLATFORM))
    assert not found, "analysis reaches a launcher:\n" + "\n".join(found)


def test_importing_all_of_core_loads_no_ray_mlflow_or_optuna():
    core = [name for name in modules(PLATFORM) if layer(name) == "core"]
    assert len(core) > 10  # the walk found the package
    assert heavy_modules_loaded(PLATFORM, core) == []


def test_no_function_longer_than_59_lines():
    found = long_functions(PLATFORM)
    assert not found, f"over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)


def test_no_module_longer_than_400_lines():
    found = long_modules(PLATFORM)
    assert not found, f"over {MAX_MODULE_LINES} lines:\n" + "\n".join(found)


def test_readme_layout_names_every_module_exactly_once():
    """README's Layout (the text from '## Layout' to the next '## ' heading) names each module
    by its path under platform/lora_diffusion, either written out (`engine/tuner.py`) or as a
    tree, one line each:

        platform/lora_diffusion/
          core/                    no Ray, no MLflow
            config.py              the run configuration and its validation
          cli.py                   `lora-diffusion`
    """
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = unlisted_modules(PLATFORM / PACKAGE, readme)
    assert not missing, "modules missing from README's Layout:\n" + "\n".join(missing)
    twice = modules_listed_twice(readme)
    assert not twice, "modules listed more than once in README's Layout:\n" + "\n".join(twice)


# ----------------------------------------------------------------------------------------------
# Each checker fails on input made to break its rule


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cycle_check_follows_relative_and_function_level_imports(tmp_path):
    root = _write(tmp_path, {
        "lora_diffusion/__init__.py": "",
        "lora_diffusion/core/__init__.py": "",
        "lora_diffusion/core/a.py": "from . import b\n",
        "lora_diffusion/core/b.py": "def f():\n    from ..core.c import g\n",
        "lora_diffusion/core/c.py": "import json\nfrom lora_diffusion.core.a import x\n",
        "lora_diffusion/core/d.py": "from .a import x\n"})
    graph = import_graph(root)
    assert graph["lora_diffusion.core.d"] == {"lora_diffusion.core.a"}
    assert find_cycle(graph) == ["lora_diffusion.core.a", "lora_diffusion.core.b",
                                 "lora_diffusion.core.c", "lora_diffusion.core.a"]
    (root / "lora_diffusion/core/c.py").write_text("import json\n")
    assert find_cycle(import_graph(root)) is None


def test_cycle_check_counts_a_package_as_its_init_and_skips_type_checking_imports(tmp_path):
    """config -> methods.registry runs methods/__init__, which imports lora; lora's import of
    config under TYPE_CHECKING never runs, its import at run time closes a circle."""
    root = _write(tmp_path, {
        "lora_diffusion/__init__.py": "",
        "lora_diffusion/core/__init__.py": "",
        "lora_diffusion/core/config.py": "from .methods import registry\n",
        "lora_diffusion/core/methods/__init__.py": "from . import registry\nfrom .lora import L\n",
        "lora_diffusion/core/methods/registry.py": "",
        "lora_diffusion/core/methods/lora.py": ("from typing import TYPE_CHECKING\n"
                                                "from . import registry\n"
                                                "if TYPE_CHECKING:\n    from ..config import Config\n")})
    graph = import_graph(root)
    assert graph["lora_diffusion.core.config"] == {"lora_diffusion.core.methods",
                                                   "lora_diffusion.core.methods.registry"}
    # a sibling's import does not re-run the package it sits in
    assert graph["lora_diffusion.core.methods.lora"] == {"lora_diffusion.core.methods.registry"}
    assert find_cycle(graph) is None
    (root / "lora_diffusion/core/methods/lora.py").write_text("def f():\n    from ..config import Config\n")
    assert find_cycle(import_graph(root)) == [
        "lora_diffusion.core.config", "lora_diffusion.core.methods", "lora_diffusion.core.methods.lora",
        "lora_diffusion.core.config"]


def test_layer_check_finds_upward_imports_also_inside_functions(tmp_path):
    root = _write(tmp_path, {
        "lora_diffusion/__init__.py": "",
        "lora_diffusion/cli.py": "from .analysis import report\nfrom .core import config\n",
        "lora_diffusion/core/__init__.py": "",
        "lora_diffusion/core/config.py": "def f():\n    from lora_diffusion.engine import sweep\n",
        "lora_diffusion/engine/__init__.py": "",
        "lora_diffusion/engine/sweep.py": "from ..core import config\nfrom ..analysis.report import r\n",
        "lora_diffusion/analysis/__init__.py": "",
        "lora_diffusion/analysis/report.py": ("from ..engine import sweep\nfrom .. import cli\n"
                                              "def f():\n    from ..experiments.retrain import main\n"),
        "lora_diffusion/experiments/__init__.py": "",
        "lora_diffusion/experiments/retrain.py": "from ..analysis.report import f\nfrom ..engine import sweep\n"})
    assert upward_imports(import_graph(root)) == [
        "lora_diffusion.analysis.report -> lora_diffusion.cli",
        "lora_diffusion.analysis.report -> lora_diffusion.experiments",
        "lora_diffusion.analysis.report -> lora_diffusion.experiments.retrain",
        "lora_diffusion.core.config -> lora_diffusion.engine",
        "lora_diffusion.core.config -> lora_diffusion.engine.sweep",
        "lora_diffusion.engine.sweep -> lora_diffusion.analysis",
        "lora_diffusion.engine.sweep -> lora_diffusion.analysis.report"]


def test_launcher_check_follows_analysis_through_the_engine(tmp_path):
    root = _write(tmp_path, {
        "lora_diffusion/__init__.py": "",
        "lora_diffusion/engine/__init__.py": "",
        "lora_diffusion/engine/tracking.py": "",
        "lora_diffusion/engine/tuner.py": "",
        "lora_diffusion/engine/callbacks.py": "from .tuner import init_ray\n",
        "lora_diffusion/analysis/__init__.py": "",
        "lora_diffusion/analysis/trials.py": "from ..engine.tracking import prepare_uri\n",
        "lora_diffusion/analysis/plots.py": "def f():\n    from ..engine import callbacks\n"})
    assert launchers_reached_by_analysis(import_graph(root)) == [
        "lora_diffusion.analysis.plots -> lora_diffusion.engine.tuner"]


def test_heavy_import_check_sees_a_core_module_that_loads_ray(tmp_path):
    root = _write(tmp_path, {  # a stand-in `ray` that imports in no time
        "ray/__init__.py": "", "ray/tune.py": "",
        "lora_diffusion/__init__.py": "",
        "lora_diffusion/core/__init__.py": "",
        "lora_diffusion/core/fine.py": "import json\n",
        "lora_diffusion/core/bad.py": "import ray.tune\n"})
    assert heavy_modules_loaded(root, ["lora_diffusion.core.fine"]) == []
    assert heavy_modules_loaded(root, ["lora_diffusion.core.bad"]) == ["ray", "ray.tune"]


def _function(name: str, lines: int, indent: str = "") -> str:
    return f"{indent}def {name}():\n" + "".join(f"{indent}    x = {i}\n" for i in range(lines - 1))


def test_length_checks_count_def_line_through_last_line(tmp_path):
    root = _write(tmp_path, {"ok.py": "@staticmethod\n" + _function("ok", 59),
                             "long.py": "class A:\n" + _function("long", 60, indent="    ")})
    assert long_functions(root) == ["long.py:2 long (60 lines)"]
    (root / "big.py").write_text("x = 1\n" * 401)
    (root / "fits.py").write_text("x = 1\n" * 400)
    assert long_modules(root) == ["big.py (401 lines)"]


def test_layout_check_reads_the_tree_and_written_out_paths(tmp_path):
    package = _write(tmp_path, {f"lora_diffusion/{p}": "" for p in (
        "__init__.py", "cli.py", "core/__init__.py", "core/config.py", "core/methods/lora.py",
        "engine/tuner.py", "analysis/report.py")}) / PACKAGE
    readme = ("# x\n\n## Layout\n\n"
              "    platform/lora_diffusion/   the package\n"
              "      core/                    no Ray: config, methods/ (one file per\n"
              "                               method), see methods/lora.py\n"
              "        config.py              the run configuration\n"
              "        methods/\n"
              "          lora.py              LoRA\n"
              "      cli.py                   `lora-diffusion`\n"
              "    tests/\n"
              "      tuner.py\n"
              "\nThe tuner lives in `engine/tuner.py`.\n\n"
              "## Next\n\n    analysis/report.py\n")
    assert unlisted_modules(package, readme) == ["analysis/report.py"]
    assert unlisted_modules(package, readme.replace("`engine/tuner.py`", "the engine")) == [
        "analysis/report.py", "engine/tuner.py"]
    assert modules_listed_twice(readme) == []
    twice = readme.replace("      cli.py ", "        config.py   again\n      cli.py ")
    assert modules_listed_twice(twice) == ["core/config.py"]
