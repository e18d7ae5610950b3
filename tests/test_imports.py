"""The package's import structure, checked statically and by importing (fast tier: no training).

A module move must not leave a broken import for the slow tiers to find (most imports in this code base
sit inside functions, so importing a module proves little):

- every `import llmlab...` / `from llmlab... import ...` statement in llmlab/, tests/, bench/,
  experiments/ and hydra_plugins/, at any depth of the file (function bodies included: the AST is
  walked; code in string literals too, as `python -c` runs it), imports, and each imported name exists (as an attribute or a submodule); every llmlab module
  imports on its own;
- every dotted `_target_` (and the dotted `fn` / `rule_reward` functions of the reward settings) written
  in conf/, llmlab's task YAMLs, README.md, docs/, experiments/, bench/ and the tests' override strings
  is found by Hydra's own lookup (`hydra.utils.get_object`), and every `!function` of a shipped lm-eval
  task YAML exists;
- no import cycle among llmlab modules (module-level and function-level imports both);
- no llmlab module reaches another's private (`_x`) name, no library module imports an entry point
  (`python -m llmlab.<x>`: ENTRY_POINTS; llmlab.train is library, llmlab.run calls it), and entry
  points do not import each other. What breaks these rules today is listed below, by name: the lists
  only shrink (a fixed case must leave its list too).
"""
from __future__ import annotations

import ast
import collections
import importlib
import re
import textwrap
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("llmlab", "tests", "bench", "experiments", "hydra_plugins")
ENTRY_POINTS = {f"llmlab.{name}" for name in ("run", "pipeline", "report", "eval", "generate", "export", "prepare")}

# (importer, owner, private name): none may be added; a name two modules need is public
PRIVATE_NAME_EXCEPTIONS: set[tuple[str, str, str]] = set()
# (entry point, entry point it imports) in use today: none (llmlab.eval -> llmlab.generate went to models/load.py)
ENTRY_POINT_EXCEPTIONS: set[tuple[str, str]] = set()


# ------------------------------------------------------------------------------------------------
# The source: files, modules, import statements
# ------------------------------------------------------------------------------------------------


def _py_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@cache
def _llmlab_modules() -> dict[str, Path]:
    """Dotted name -> file for every module under llmlab/ (a package by its __init__.py)."""
    modules = {}
    for path in _py_files("llmlab"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


@cache
def _llmlab_packages() -> frozenset[str]:
    """Every folder of llmlab/ (regular or namespace package)."""
    folders = [p for p in (ROOT / "llmlab").rglob("*") if p.is_dir() and "__pycache__" not in p.parts]
    return frozenset({"llmlab"} | {".".join(p.relative_to(ROOT).parts) for p in folders})


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(path: Path) -> str:
    """The package a file's relative imports start from."""
    return _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]


def _statement_imports(node: ast.AST, package: str) -> list[tuple[str, str | None, str]]:
    """(module, imported name or None, local name bound) for one statement's llmlab imports; relative
    imports resolved against `package`."""
    if isinstance(node, ast.Import):
        return [(a.name, None, a.asname or a.name.split(".")[0])
                for a in node.names if a.name.split(".")[0] == "llmlab"]
    if not isinstance(node, ast.ImportFrom):
        return []
    module = node.module or ""
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([module] if module else []))
    if module.split(".")[0] != "llmlab":
        return []
    return [(module, a.name, a.asname or a.name) for a in node.names]


def _imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) for every llmlab import in the file, at any depth."""
    package = _package(path)
    return [(node.lineno, module, name) for node in ast.walk(_tree(path))
            for module, name, _ in _statement_imports(node, package)]


def _code_in_strings(path: Path) -> list[tuple[int, str, str | None]]:
    """The llmlab imports of Python code held in string literals (`python -c "from llmlab... import ..."`,
    scripts a test writes out), by the literal's line: what a subprocess will import."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "llmlab" in node.value \
                and re.search(r"^\s*(from|import)\s+llmlab|;\s*(from|import)\s+llmlab", node.value, re.MULTILINE):
            try:
                code = ast.parse(textwrap.dedent(node.value))
            except SyntaxError:
                continue
            found += [(node.lineno, module, name) for inner in ast.walk(code)
                      for module, name, _ in _statement_imports(inner, "llmlab")]
    return found


def _target(module: str, name: str | None) -> str:
    """The llmlab module an import statement makes its file depend on: the submodule when it names one."""
    if name is not None and f"{module}.{name}" in _llmlab_modules().keys() | _llmlab_packages():
        return f"{module}.{name}"
    return module


@cache
def _graph() -> dict[str, set[str]]:
    """llmlab module -> the llmlab modules it imports (anywhere in the file)."""
    edges = collections.defaultdict(set)
    for module, path in _llmlab_modules().items():
        for _, imported, name in _imports(path):
            edges[module].add(_target(imported, name))
    return edges


# ------------------------------------------------------------------------------------------------
# (a) every import statement imports
# ------------------------------------------------------------------------------------------------


def test_every_llmlab_import_statement_resolves():
    where: dict[tuple[str, str | None], list[str]] = collections.defaultdict(list)
    for path in _py_files(*SCANNED):
        for line, module, name in _imports(path) + _code_in_strings(path):
            where[(module, name)].append(f"{path.relative_to(ROOT)}:{line}")
    assert len(where) > 300, "the scan found too few imports: is it still reading the files?"
    broken = []
    for (module, name), places in sorted(where.items(), key=str):
        try:
            imported = importlib.import_module(module)
            if name not in (None, "*") and not hasattr(imported, name):
                importlib.import_module(f"{module}.{name}")
        except Exception as err:  # noqa: BLE001 - reported with where it is used
            statement = f"from {module} import {name}" if name else f"import {module}"
            broken.append(f"{statement}: {type(err).__name__}: {err}  (in {', '.join(places[:3])})")
    assert not broken, "imports that no longer resolve:\n" + "\n".join(broken)


def test_every_llmlab_module_imports():
    """Modules nothing imports yet (a new entry point, a task helper) included."""
    broken = []
    for module in sorted(_llmlab_modules()):
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            broken.append(f"{module}: {type(err).__name__}: {err}")
    assert not broken, "\n".join(broken)


# ------------------------------------------------------------------------------------------------
# (b) every written target resolves
# ------------------------------------------------------------------------------------------------

_DOTTED = r"[A-Za-z_]\w*(?:\.\w+)+"
TARGET = re.compile(rf"""_target_["']?\s*[:=]\s*["']?({_DOTTED}(?::\w+)?|[A-Za-z_]\w*:\w+)""")
# reward functions: `module:function` (UserReward) or a dotted llmlab path (TaskReward, stage.rule_reward)
FUNCTION = re.compile(rf"""\b(?:fn|rule_reward)["']?\s*[:=]\s*["']?((?:{_DOTTED}|[A-Za-z_]\w*):\w+|llmlab(?:\.\w+)+)""")
# written on purpose not to resolve: the catalogs of refused inputs, the README's stand-in for user code,
# and the misspellings tests feed to see them refused
REFUSAL_CATALOGS = {"tests/test_bad_inputs.py", "tests/test_settings_checks.py", "tests/test_imports.py"}
USER_CODE_EXAMPLES = {"my_module", "my_rewards"}
DELIBERATELY_MISSING = re.compile(r"no_?such|nowhere|nope|bogus", re.IGNORECASE)


def _target_sources() -> list[Path]:
    patterns = ["conf/**/*.yaml", "llmlab/**/*.yaml", "README.md", "docs/**/*.md", "experiments/**/*",
                "bench/**/*", "hydra_plugins/**/*.md", "tests/**/*.py", "tests/**/*.yaml"]
    suffixes = {".yaml", ".yml", ".md", ".txt", ".sh", ".py"}
    files = {p for pattern in patterns for p in ROOT.glob(pattern)
             if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts}
    return sorted(p for p in files if str(p.relative_to(ROOT)) not in REFUSAL_CATALOGS)


def _written_targets() -> dict[str, list[str]]:
    found: dict[str, list[str]] = collections.defaultdict(list)
    for path in _target_sources():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for pattern in (TARGET, FUNCTION):
                for match in pattern.finditer(line):
                    value = match.group(1)
                    if value.split(".")[0].split(":")[0] in USER_CODE_EXAMPLES or DELIBERATELY_MISSING.search(value):
                        continue
                    found[value].append(f"{path.relative_to(ROOT)}:{number}")
    return found


def _defines(path: Path, name: str) -> bool:
    """The file binds `name` at its top level (class, function, assignment or import)."""
    for node in _tree(path).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def _local_file(parts: list[str]) -> tuple[Path, str] | None:
    """A target in the repository's own scripts (tests.*, bench.*, or a bench script on PYTHONPATH=.:bench,
    as bench/RESULTS.md runs them): its file and the name it must define, read without importing it."""
    for base in (ROOT, ROOT / "bench", ROOT / "experiments"):
        for k in range(len(parts) - 1, 0, -1):
            path = base.joinpath(*parts[:k]).with_suffix(".py")
            if path.is_file() and (base != ROOT or parts[0] in {"tests", "bench", "experiments"}):
                return path, parts[k]
    return None


def _resolve(value: str) -> None:
    from hydra.utils import get_object

    dotted = value.replace(":", ".")
    local = _local_file(dotted.split("."))
    if local is not None:
        path, name = local
        assert _defines(path, name), f"{path.relative_to(ROOT)} defines no {name}"
        return
    get_object(dotted)  # hydra's _locate: what instantiate and the reward builders do


def test_every_written_target_resolves():
    found = _written_targets()
    assert len(found) > 40, "the scan found too few targets: is it still reading the files?"
    assert any(v.startswith("llmlab.stages.") for v in found) and "llmlab.data.builtin.rule_reward" in found
    broken = []
    for value, places in sorted(found.items()):
        try:
            _resolve(value)
        except Exception as err:  # noqa: BLE001
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            broken.append(f"{value}: {message}  (in {', '.join(places[:3])})")
    assert not broken, "targets that no longer resolve:\n" + "\n".join(broken)


def test_task_yaml_functions_exist():
    """lm-eval's `!function utils.name` in llmlab's shipped task YAMLs: utils.py beside them defines it."""
    seen = 0
    for path in (ROOT / "llmlab").rglob("*.yaml"):
        for module, name in re.findall(r"!function\s+(\w+)\.(\w+)", path.read_text()):
            seen += 1
            assert _defines(path.parent / f"{module}.py", name), f"{path.relative_to(ROOT)}: !function {module}.{name}"
    assert seen >= 3


# ------------------------------------------------------------------------------------------------
# (c) no cycles, (d) no private names across modules, no library -> entry point imports
# ------------------------------------------------------------------------------------------------


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself): Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]] and _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_llmlab_modules():
    edges = _graph()
    assert sum(map(len, edges.values())) > 100, "the import graph is nearly empty: is the scan still working?"
    cycles = _cycles(edges)
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(edges[a] & set(c)))
              for c in cycles]
    assert not cycles, "import cycles among llmlab modules:\n" + "\n".join(detail)


def _private_uses(importer: str, tree: ast.Module, package: str) -> set[tuple[str, str, str]]:
    """(importer, owner, name) for each `from owner import _name`, or `alias._name` where alias is bound to
    an llmlab module `owner` (by `import llmlab.x as alias`, `from llmlab.x import module`, ...)."""
    found, aliases = set(), {}  # aliases: local name -> the llmlab module bound to it
    for node in ast.walk(tree):
        for module, name, local in _statement_imports(node, package):
            if name is None:  # `import llmlab.x.y` binds llmlab; `import llmlab.x.y as z` binds z to llmlab.x.y
                aliases[local] = "llmlab" if local == "llmlab" else module
            elif _target(module, name) != module:  # `from llmlab.x import y`, y a module
                aliases[local] = _target(module, name)
            elif name.startswith("_") and not name.startswith("__") and module != importer:
                found.add((importer, module, name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                owner = ".".join([aliases[value.id], *reversed(chain)])
                if owner in _llmlab_modules() and owner != importer:
                    found.add((importer, owner, node.attr))
    return found


def test_no_llmlab_module_uses_another_modules_private_names():
    found = set().union(*(_private_uses(m, _tree(p), _package(p)) for m, p in _llmlab_modules().items()))
    new, fixed = found - PRIVATE_NAME_EXCEPTIONS, PRIVATE_NAME_EXCEPTIONS - found
    assert not new, ("private names used across llmlab modules (make the name public, or keep it in its module):\n"
                     + "\n".join(f"{i} uses {o}.{n}" for i, o, n in sorted(new)))
    assert not fixed, f"no longer used, strike from PRIVATE_NAME_EXCEPTIONS: {sorted(fixed)}"


def test_library_modules_do_not_import_entry_points():
    edges = _graph()
    assert ENTRY_POINTS <= set(_llmlab_modules()), "an entry point moved: update ENTRY_POINTS"
    library = {(m, e) for m, targets in edges.items() if m not in ENTRY_POINTS for e in targets & ENTRY_POINTS}
    assert not library, ("library modules importing an entry point (move what they need into the library):\n"
                         + "\n".join(f"{m} -> {e}" for m, e in sorted(library)))
    between = {(m, e) for m, targets in edges.items() if m in ENTRY_POINTS for e in targets & ENTRY_POINTS if e != m}
    new, fixed = between - ENTRY_POINT_EXCEPTIONS, ENTRY_POINT_EXCEPTIONS - between
    assert not new, "entry points importing each other:\n" + "\n".join(f"{m} -> {e}" for m, e in sorted(new))
    assert not fixed, f"no longer imported, strike from ENTRY_POINT_EXCEPTIONS: {sorted(fixed)}"


@pytest.mark.parametrize("source", [
    "from llmlab import errors\nerrors._bad_key('x')\n",
    "from llmlab.errors import _bad_key\n",
    "from ..errors import _bad_key\n",
    "import llmlab.errors as e\ne._bad_key('x')\n",
    "import llmlab.errors\nllmlab.errors._bad_key('x')\n",
    "def f():\n    from llmlab import errors\n    return errors._bad_key\n",
])
def test_private_name_scan_sees_each_spelling(source):
    """The (d) scan is not vacuous: each way of reaching another module's private name is seen."""
    found = _private_uses("llmlab.checks.probe", ast.parse(source), "llmlab.checks")
    assert found == {("llmlab.checks.probe", "llmlab.errors", "_bad_key")}
    assert not _private_uses("llmlab.errors", ast.parse(source), "llmlab")  # its own name


def test_every_llmlab_folder_with_code_is_a_regular_package():
    """setuptools' find_packages (pyproject.toml) skips folders without __init__.py: a `pip install .` (not
    editable) would leave such a folder out and every import of it would fail on the user's machine."""
    folders = {p.parent for p in (ROOT / "llmlab").rglob("*.py") if "__pycache__" not in p.parts}
    folders -= {ROOT / "llmlab" / "evaluation" / "tasks"}  # lm-eval task YAMLs + their functions: package data
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []
