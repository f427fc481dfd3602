"""The package's import graph: every relative import, lazy ones included, points one way."""

from __future__ import annotations

import ast
from pathlib import Path

import mocoretrieval

PACKAGE = Path(mocoretrieval.__file__).parent


def _module_name(path: Path) -> str:
    return path.with_suffix("").relative_to(PACKAGE).as_posix().replace("/", ".")


def _relative_imports(path: Path, modules: set[str]) -> set[str]:
    """Sibling modules that `path` imports relatively, at module level or inside functions."""
    package = _module_name(path).rpartition(".")[0]  # "" for top-level modules
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package.split(".") if package else []
        base = base[: len(base) - (node.level - 1)]
        if node.module:
            base += node.module.split(".")
        target = ".".join(base)
        for alias in node.names:
            sub = ".".join([*base, alias.name])
            if sub in modules:  # `from . import ann` imports the module ann
                found.add(sub)
            elif target in modules:  # `from .sources import load` imports from sources
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    names = {_module_name(p) for p in paths}
    # `__init__` re-exports the public API; an import of the package itself means `__init__`.
    modules = names | {""}
    graph = {}
    for path in paths:
        deps = _relative_imports(path, modules)
        graph[_module_name(path)] = {"__init__" if d == "" else d for d in deps} - {
            _module_name(path)
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None; depth-first search with an explicit path."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path = [start], {start}
        stack = [iter(sorted(graph.get(start, ())))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                finished = path.pop()
                done.add(finished)
                on_path.discard(finished)
            elif nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_lazy_imports_inside_functions():
    assert "sources" in import_graph()["index"]  # index.py imports sources only in functions


def test_package_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in mocoretrieval/: " + " -> ".join(cycle)


# Calls that read or write files or the Hub. `encoder.py` holds the architecture, its config and
# `embed`; the Hub mixin's hooks there delegate to `hub.py`, which does the I/O (timm's `_hub.py`).
IO_CALLS = {
    "open",
    "read_text",
    "read_bytes",
    "write_text",
    "write_bytes",
    "mkdir",
    "unlink",
    "save",  # torch.save, ModelCard.save
    "load",  # torch.load, json.load
    "dump",
    "save_model",
    "save_file",
    "load_file",
    "safe_open",
    "hf_hub_download",
    "snapshot_download",
    "upload_folder",
    "upload_file",
}


def _io_calls(path: Path) -> list[str]:
    """``name (line N)`` for each call in ``path`` whose callee ends in an I/O name; a name
    imported from the ``hub`` module is a delegation to it, not I/O of this file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    delegated = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == "hub"
        for alias in node.names
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute):
            name = func.attr
        else:
            name = getattr(func, "id", "")
            if name in delegated:
                continue
        if name in IO_CALLS:
            found.append(f"{name} (line {node.lineno})")
    return found


def test_encoder_module_does_no_file_or_hub_io():
    path = PACKAGE / "encoder.py"
    assert _io_calls(path) == [], "encoder.py does file or Hub I/O: move it to hub.py"
    functions = {
        node.name
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef)
    }
    assert "save_pretrained" not in functions, "use the mixin's _save_pretrained hook"
    assert "_save_pretrained" in functions
    graph = import_graph()
    assert "hub" in graph["encoder"] and "encoder" not in graph["hub"]


def test_io_scan_sees_io_and_lets_hub_delegations_pass(tmp_path):
    """The scan above is not vacuous: it sees writes, reads and downloads."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(p, m):\n"
        "    from .hub import save\n"
        "    save(m, p)\n"
        "    p.write_text('x')\n"
        "    open(p)\n"
        "    torch.save(m, p)\n"
        "    hf_hub_download('a/b', 'c')\n"
    )
    assert _io_calls(sample) == [
        "write_text (line 4)",
        "open (line 5)",
        "save (line 6)",
        "hf_hub_download (line 7)",
    ]
