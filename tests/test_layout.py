"""The package's layout stays readable: no import cycle between its modules, no module over 400 lines (#14), and
the "never" rules of the house (#28): verify/ never imports attacks/, nothing below watermark/ imports it, data/
and encoders/ (and the floor they use) never import engine/, results/ holds no programs.

The rules read the imports written in the package's source, at module level or inside functions (first line of each
imported module per importing module); an import through another module is that module's import.
"""
from __future__ import annotations

import ast
import functools
import gc
from pathlib import Path

PACKAGE = "dist_awenc"
REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / PACKAGE
MAX_LINES = 400

# The floor: what every room may import. Torch-light, no run state: typed config sections and their checks, YAML
# loading, errors, file writes and hashing, rank-0 printing.
FLOOR = ("config", "config_ablation", "config_checks", "config_loading", "errors", "files", "log")
# What watermark/ builds on (the floor, run folders, and the rooms under it); none of it may import watermark/.
BELOW_WATERMARK = FLOOR + ("runs", "data", "encoders", "engine", "ssl")

# Known exceptions (path -> why), to be split (#14); none at present. An entry that is short enough fails the test.
LONG_FILES_ALLOWED: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (itself, or the module that defines the name), or None if external."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _parse(path: Path) -> ast.Module:
    """``ast.parse``; call it with the garbage collector paused (``_graph`` does, once for every file).

    Python 3.11.7 keeps the AST constructor's recursion depth in state shared by the interpreter. A collection in
    the middle of the construction runs finalizers (FFCV's numba dispatchers, left over from earlier tests, have
    them); one that lets another thread parse meanwhile leaves the count off, and the parse ends in
    ``SystemError: AST constructor recursion depth mismatch`` (seen once in CI; reproduced here with finalizers
    that sleep and a second thread that parses: 20 of 20 parses failed unguarded, none guarded). With the collector
    paused no Python code runs inside the construction; the tree is the same.
    """
    assert not gc.isenabled(), "parse with the garbage collector paused"
    return ast.parse(path.read_text(), str(path))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Internal modules that ``name`` imports, at module level or inside functions -> first line."""
    is_package = path.name == "__init__.py"
    out: dict[str, int] = {}
    for node in ast.walk(_parse(path)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package holding this module
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub where there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                dep = _resolve(t, modules)
                if dep and dep != name:
                    out.setdefault(dep, node.lineno)
    return out


@functools.lru_cache(maxsize=1)
def _graph() -> dict[str, dict[str, int]]:
    """Every package module -> the package modules it imports -> the first line of that import."""
    modules = _modules()
    gc.collect()  # once, not before every file: late in a long session one collection takes a few hundred ms
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return {name: _imports(name, path, modules) for name, path in modules.items()}
    finally:
        if was_enabled:
            gc.enable()


def _within(module: str, parts: tuple[str, ...]) -> bool:
    """``module`` is one of ``parts`` (modules or packages, relative to the package) or inside one of them."""
    return any(module == f"{PACKAGE}.{p}" or module.startswith(f"{PACKAGE}.{p}.") for p in parts)


def _offending(sources: tuple[str, ...], targets: tuple[str, ...]) -> list[str]:
    """Imports of a module in ``targets`` by a module in ``sources``: ``path:line: a imports b``, sorted."""
    out = []
    for name, deps in sorted(_graph().items()):
        if not _within(name, sources):
            continue
        path = _modules()[name].relative_to(REPO).as_posix()
        out += [f"{path}:{line}: {name} imports {dep}" for dep, line in sorted(deps.items(), key=lambda d: d[1])
                if _within(dep, targets) and not _within(dep, sources)]
    return out


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        stack.append(n)
        for m in sorted(graph[n]):
            if color[m] == GREY:
                return stack[stack.index(m):] + [m]
            if color[m] == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(graph):
        if color[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_between_modules():
    graph = _graph()
    cycle = _find_cycle(graph)
    if cycle:
        steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle:\n  " + "\n  ".join(steps))


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_no_module_is_over_400_lines():
    long = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in LONG_FILES_ALLOWED:
            long[rel] = n
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"
    stale = [rel for rel in LONG_FILES_ALLOWED
             if not (ROOT.parent / rel).exists() or len((ROOT.parent / rel).read_text().splitlines()) <= MAX_LINES]
    assert not stale, f"remove these from LONG_FILES_ALLOWED, they are short now: {stale}"


def _reaches(sources: tuple[str, ...], targets: tuple[str, ...]) -> list[str]:
    """Modules in ``targets`` that modules in ``sources`` import directly or through others, each with its chain."""
    graph, parent = _graph(), {}
    stack = [m for m in graph if _within(m, sources)]
    while stack:
        m = stack.pop()
        for dep in graph.get(m, {}):
            if dep not in parent and not _within(dep, sources):
                parent[dep] = m
                stack.append(dep)
    out = []
    for t in sorted(d for d in parent if _within(d, targets)):
        chain = [t]
        while chain[-1] in parent:
            chain.append(parent[chain[-1]])
        out.append(" <- ".join(chain))
    return out


def test_verify_never_imports_the_attacks():
    """verify/ measures (statistics, queries, verdicts, evidence); what attacks encoders lives in attacks/ and the
    stages that combine both (stages/calibrate.py, stages/robustness.py). Not directly, and not through what it
    imports (the pirate's serving path it rebuilds lives in evaluate/serving.py, not among the attacks)."""
    bad = _offending(("verify",), ("attacks",))
    assert not bad, "verify/ imports attacks/ (move the code that attacks into stages/):\n  " + "\n  ".join(bad)
    reached = _reaches(("verify",), ("attacks",))
    assert not reached, "verify/ reaches attacks/ through its imports:\n  " + "\n  ".join(reached)


def test_nothing_below_watermark_imports_it():
    """The floor (config.py, config_checks.py, config_loading.py, errors.py, files.py, log.py), runs.py, data/,
    encoders/, engine/ and ssl/ never import dist_awenc.watermark: a section's checks live in the config layer
    (config_checks.py), and watermark/ imports them from there."""
    bad = _offending(BELOW_WATERMARK, ("watermark",))
    assert not bad, "modules below watermark/ import it:\n  " + "\n  ".join(bad)


def test_data_encoders_and_the_floor_never_import_the_engine():
    """data/, encoders/ and the floor they use import nothing from engine/ (printing is dist_awenc/log.py)."""
    bad = _offending(("data", "encoders") + FLOOR, ("engine",))
    assert not bad, "data/, encoders/ or the floor import engine/:\n  " + "\n  ".join(bad)


def test_the_rules_see_an_offending_import():
    """_offending finds a function-level import and names its file and line (the check the rules rely on)."""
    bad = _offending(("cli",), ("config",))
    assert any(b.startswith("dist_awenc/cli.py:") and b.endswith("dist_awenc.cli imports dist_awenc.config")
               for b in bad), bad
    assert not _offending(("verify",), ("verify",))  # a room's imports of itself are not crossings


def test_results_hold_no_programs():
    """results/ is the record (data and READMEs); the programs that make it live in scripts/ or the package."""
    programs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "results").rglob("*.py"))
    assert not programs, f"programs under results/ (move them to scripts/ and update the READMEs): {programs}"


def test_torch_distributed_stays_in_the_engine():
    """Every collective lives in engine/ (dist.py): no module outside it imports or names ``torch.distributed``
    (the floor's rank-0 printing asks engine/dist.py through a registered function)."""
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(f"{PACKAGE}/engine/"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(t in code for t in ("import torch.distributed", "from torch.distributed", "torch.distributed.",
                                       '"torch.distributed"', "'torch.distributed'")):
                bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "torch.distributed outside engine/:\n  " + "\n  ".join(bad)
