"""The package's structure: no import cycle, no backend importing another, no citation outside the repo."""

import ast
import collections
import pathlib
import re

import pytest

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


#: The library's public modules: what the SAE toolkit (spade_kernels.sae) may import.
PUBLIC = {
    "spade_kernels",
    "spade_kernels.backends",
    "spade_kernels.bench",
    "spade_kernels.distributed",
    "spade_kernels.files",
    "spade_kernels.layer",
    "spade_kernels.ops",
    "spade_kernels.reference",
    "spade_kernels.testing",
}


def test_two_floors_the_library_never_imports_the_toolkit():
    _, graph = _import_graph()
    # (spade_kernels.__main__ is the command's entry point, `python -m spade_kernels`: the toolkit's door.)
    library = {m for m in graph if not m.startswith("spade_kernels.sae") and m != "spade_kernels.__main__"}
    offenders = {m: sorted(t for t in graph[m] if t.startswith("spade_kernels.sae")) for m in library}
    assert not {m: t for m, t in offenders.items() if t}, offenders


def test_two_floors_the_toolkit_uses_the_library_public_api_only():
    _, graph = _import_graph()
    offenders = {}
    for module, targets in graph.items():
        if not module.startswith("spade_kernels.sae"):
            continue
        bad = sorted(t for t in targets if not t.startswith("spade_kernels.sae") and t not in PUBLIC)
        if bad:
            offenders[module] = bad
    assert not offenders, offenders


@pytest.mark.parametrize("module", ["spade_kernels", "spade_kernels.sae.cli", "spade_kernels.cli"])
def test_every_path_to_the_command_line_runs_it_with_python_dash_m(module):
    """``python -m`` on the package, the CLI module and its former path runs the CLI (the former
    path used to fail in runpy: the moved-path loader had no get_code; the module had no main guard)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-m", module, "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if module == "spade_kernels.cli":
        assert done.returncode == 1 and "spade_kernels.cli moved to spade_kernels.sae.cli" in done.stderr
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: spade-kernels"), done.stdout
    # a command's own parser too (it names the program from sys.argv[0], which runpy sets)
    done = subprocess.run(
        [sys.executable, "-m", module, "train", "--d-sae", "0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "argument --d-sae: must be finite and > 0" in done.stderr, done.stderr


def test_former_import_paths_keep_working_and_say_where_they_moved():
    import subprocess
    import sys

    code = (
        "import warnings, importlib\n"
        "warnings.simplefilter('error')\n"
        "import spade_kernels\n"
        "from spade_kernels._moved import MOVED\n"
        "for old, new in MOVED.items():\n"
        "    if old.endswith(('sae_lens', 'dictionary_learning', 'overcomplete')):\n"
        "        continue  # they import their trainer library\n"
        "    try:\n"
        "        importlib.import_module(old)\n"
        "    except DeprecationWarning as w:\n"
        "        assert f'{old} moved to {new}' in str(w), w\n"
        "    else:\n"
        "        raise AssertionError(old + ' imported without a warning')\n"
        "warnings.simplefilter('ignore')\n"
        "import spade_kernels.train as t, spade_kernels.sae.train as s\n"
        "assert t is s and t.__name__ == 'spade_kernels.sae.train'\n"
        "from spade_kernels.cli import main\n"
        "from spade_kernels.integrations import _wrapped\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_relative_link_in_the_readme_and_docs_resolves():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in link.findall(page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert not broken, broken


def test_the_readme_stays_short_and_cites_no_issue_numbers():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    texts = [readme, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    texts += [p.read_text() for p in PACKAGE.rglob("*.py")]
    assert not [t for t in texts if re.search(r"\bissue (#?\d+)", t, re.I)]


def test_eager_cpu_work_imports_neither_dynamo_nor_triton():
    # A custom_op's kernel wrapper imports torch._dynamo (and triton through it) on a process's first
    # call, ~0.7 s that eager CPU work never needs, and torch.fx's symbolic shapes cost ~0.2 s at import.
    # The first encode and a layer's forward and backward stay clear of all three, `spade-kernels
    # info`/`--help` of the first two.
    import subprocess
    import sys

    code = (
        "import contextlib, io, sys, torch\n"
        "import spade_kernels as sk\n"
        "x, a = torch.randn(64, 16), torch.randn(32, 16)\n"
        "sk.spade_encode(x, a, torch.tensor(0.1))\n"
        "layer = sk.SpaDE(16, 32)\n"
        "layer(x).loss.backward()\n"
        "assert 'torch.fx.experimental.symbolic_shapes' not in sys.modules\n"
        "from spade_kernels.sae.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['info'])\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "loaded = [m for m in ('torch._dynamo', 'triton', 'torch.distributed.checkpoint') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_torch_free_backend_names_are_the_registrys():
    from spade_kernels import BACKEND_NAMES
    from spade_kernels.backends import BACKENDS

    assert tuple(BACKENDS) == BACKEND_NAMES


def test_the_package_lists_its_modules_once_and_raises_for_names_it_lacks(monkeypatch):
    """A miss (a library probing ``hasattr(sk, "__wrapped__")``) raises AttributeError without
    reading the package directory again; a submodule is still found by its name."""
    import pkgutil

    import spade_kernels as sk

    sk._submodules()  # listed (and cached) before the directory listing is counted
    calls = []
    listing = pkgutil.iter_modules
    monkeypatch.setattr(pkgutil, "iter_modules", lambda *a, **k: calls.append(a) or listing(*a, **k))
    for _ in range(3):
        assert not hasattr(sk, "__wrapped__")
    with pytest.raises(AttributeError, match="no attribute 'not_a_module'"):
        sk.not_a_module  # noqa: B018
    assert sk.reference.__name__ == "spade_kernels.reference"
    assert calls == []
