"""The package's structure: no import cycle, no backend importing another, no citation outside the repo."""

import ast
import collections
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spade_kernels"
BACKEND_MODULES = {
    "spade_kernels.backends.torch_",
    "spade_kernels.backends.native",
    "spade_kernels.backends.triton_",
}


def _modules():
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _import_graph():
    """module → the package modules it imports (anywhere in its body, functions included)."""
    mods = _modules()
    graph = collections.defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                # `from pkg import mod` imports pkg.mod; `from pkg.mod import name` imports pkg.mod.
                targets = [
                    f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names
                ]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return mods, graph


def test_no_import_cycle():
    mods, graph = _import_graph()
    state, cycles = {}, []

    def visit(u, path):
        state[u] = "open"
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append([*path[path.index(v) :], v])
            elif v not in state:
                visit(v, [*path, v])
        state[u] = "done"

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_backend_imports_another():
    _, graph = _import_graph()
    for backend in BACKEND_MODULES:
        assert not (graph[backend] & (BACKEND_MODULES - {backend})), (backend, graph[backend])


def test_nothing_cites_a_document_outside_the_repository():
    pattern = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared|shared/(DESIGN|STYLE)")
    offenders = []
    for path in ROOT.rglob("*"):
        if (
            path.is_dir()
            or any(p.startswith(".") for p in path.relative_to(ROOT).parts)
            or path.suffix in (".png", ".so")
        ):
            continue
        if path.name == "test_structure.py" or "build" in path.relative_to(ROOT).parts:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [
            f"{path.relative_to(ROOT)}:{i}"
            for i, line in enumerate(text.splitlines(), 1)
            if pattern.search(line)
        ]
    assert not offenders, offenders
