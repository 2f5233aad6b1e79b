"""The package's layout stays readable: no import cycle between its modules, no module over 400 lines (#14)."""
from __future__ import annotations

import ast
import gc
from pathlib import Path

PACKAGE = "dist_awenc"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 400

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
    """``ast.parse`` with the garbage collector held off while it builds the tree.

    Python 3.11.7 keeps the AST constructor's recursion depth in state shared by the interpreter. A collection in
    the middle of the construction runs finalizers (FFCV's numba dispatchers, left over from earlier tests, have
    them); one that lets another thread parse meanwhile leaves the count off, and the parse ends in
    ``SystemError: AST constructor recursion depth mismatch`` (seen once in CI; reproduced here with finalizers
    that sleep and a second thread that parses: 20 of 20 parses failed unguarded, none guarded). With the collector
    paused no Python code runs inside the construction; the tree is the same.
    """
    source = path.read_text()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, str(path))
    finally:
        if was_enabled:
            gc.enable()


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
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
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
