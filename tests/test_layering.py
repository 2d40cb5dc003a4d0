"""Layering points one way: the library (speed_kernels) never imports the application built on it
(speed_train), the library's modules import each other without cycles, and speed_train's modules
import only lower layers of the order its __init__ writes down (function-level imports included)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "speed_kernels"


def _module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    mod = _module_name(path, root)
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


APP = ROOT / "python"


def test_speed_train_imports_only_lower_layers():
    import speed_train

    layer_of = {f"speed_train.{m}": i for i, (_, mods) in enumerate(speed_train.LAYERS) for m in mods}
    files = {_module_name(p, APP): p for p in (APP / "speed_train").glob("*.py") if p.name != "__init__.py"}
    assert set(files) == set(layer_of), ("every module of speed_train has one layer in speed_train.LAYERS",
                                         sorted(set(files) ^ set(layer_of)))
    offenders = []
    for mod, path in sorted(files.items()):
        for dep in sorted(_imports(path, APP)):
            if dep in layer_of and dep != mod and layer_of[dep] >= layer_of[mod]:
                offenders.append(f"{mod} (layer {speed_train.LAYERS[layer_of[mod]][0]}) imports {dep} "
                                 f"(layer {speed_train.LAYERS[layer_of[dep]][0]})")
    assert not offenders, "\n".join(offenders)
