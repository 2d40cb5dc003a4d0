"""Layering points one way: the library (speed_kernels) never imports the application built on it
(speed_train), and its modules import each other without cycles (function-level imports included)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "speed_kernels"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out |= set(names)
    return out


def _graph():
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = {d for d in _imports(path) if d in files and d != mod and d != "speed_kernels"}
        graph[mod] = deps
    return graph, files


def test_library_never_imports_the_application():
    offenders = {}
    for path in PKG.rglob("*.py"):
        bad = sorted(d for d in _imports(path) if d.split(".")[0] == "speed_train")
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"speed_kernels imports speed_train: {offenders}"


def test_no_import_cycle_inside_the_library():
    graph, _ = _graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # the edge this rule was written for: analysis uses strategies, never the reverse
    assert "speed_kernels.analysis" not in graph["speed_kernels.strategies"]
