"""The package's import graph: every relative import, lazy ones included, points one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


# --- "done when" rules of the architecture issue ------------------------------------------------


def _serve_handler() -> str:
    """The name of the function `mocoretrieval serve` dispatches to (read from the parser, so
    a rename of the handler does not silently widen the rule)."""
    from mocoretrieval.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.choices)  # the subcommands
    return sub.choices["serve"].get_default("func").__name__


def _app_imports(path: Path) -> list[tuple[str | None, int]]:
    """``(enclosing function or None, line)`` of each import of the ``app`` package in ``path``."""
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name if function is None else function
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module or ""]
            else:
                names = []
            if any(name == "app" or name.startswith("app.") for name in names):
                found.append((inner, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), None)
    return found


def test_library_imports_app_only_in_the_serve_handler():
    """Done when: the library imports nothing from `app/` except in the `serve` command's
    handler (the Gradio/HTTP front end sits above the library, which never needs it)."""
    handler = _serve_handler()
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for function, line in _app_imports(path):
            if not (path.name == "cli.py" and function == handler):
                offending.append(f"{_module_name(path)}:{line} (in {function or 'module'})")
    assert offending == [], "mocoretrieval/ imports app/ outside `serve`: " + ", ".join(offending)
    assert _app_imports(PACKAGE / "cli.py"), "the serve handler no longer imports app: update"


def test_app_import_scan_sees_module_level_and_nested_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import app.views\n"
        "def _cmd_serve():\n"
        "    from app.server import serve\n"
        "    def inner():\n"
        "        import app\n"
        "from apple import pie\n"
    )
    assert _app_imports(sample) == [(None, 1), ("_cmd_serve", 3), ("_cmd_serve", 5)]


# The `index` command's path, as the issue names it: cli -> models -> index -> embed -> store.
# The index layer is ImageIndex, one class whose concerns live in one module each (index,
# encoder_pin, search, update). Modules outside these layers are left out of the order: helpers
# any layer may call and that call no layer (errors, layout, pathsafety, walk, data, formats,
# decode_pool, preprocess, store_db, faiss_file, ann, embedder), the front end's helpers
# (cli_common: its progress bar is handed down as a callback; cli_eval and others the parser
# imports), and the model code (sources, hub, encoder, backbones, heads, onnx_*), whose callers
# the model rules below check.
INDEX_LAYERS = {
    "cli": 0,
    "models": 1,
    "index": 2,
    "encoder_pin": 2,
    "search": 2,
    "update": 2,
    "embed": 3,
    "store": 4,
}


DEFERRED = "<deferred load>"


def _trace_index_command(argv: list[str]) -> list[tuple[str, str, str]]:
    """``(module, function, caller module)`` of each call into mocoretrieval while
    ``cli.main(argv)`` runs, ``mocoretrieval.`` dropped from the names."""
    import sys
    import threading

    from mocoretrieval.cli import main
    from mocoretrieval.embedder import DeferredModel

    calls = []
    deferred = set()  # code of the load functions of the DeferredModels made during the run
    make = DeferredModel.__init__

    def record(self, load, *args, **kwargs):
        deferred.add(getattr(load, "__code__", None))
        make(self, load, *args, **kwargs)

    def name(frame) -> str:
        module = frame.f_globals.get("__name__", "") if frame is not None else ""
        return module.removeprefix("mocoretrieval.") if module.startswith("mocoretrieval") else ""

    def profile(frame, event, arg):
        if event == "call" and name(frame):
            # A DeferredModel's load is called by the index, but is models' own resolution.
            caller = DEFERRED if frame.f_code in deferred else name(frame.f_back)
            calls.append((name(frame), frame.f_code.co_name, caller))

    DeferredModel.__init__ = record
    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        assert main(argv) == 0
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        DeferredModel.__init__ = make
    return calls


def _check_index_path(calls: list[tuple[str, str, str]], manifest_reads: int = 1) -> None:
    """The path rule of the issue, made precise (see the test's docstring)."""
    firsts = list(dict.fromkeys(INDEX_LAYERS[m] for m, _, _ in calls if m in INDEX_LAYERS))
    assert [f for f in firsts if f <= 2] == [0, 1, 2], f"layers first entered as {firsts}"
    upward = sorted(
        {
            f"{caller} -> {m}.{fn}"
            for m, fn, caller in calls
            if m in INDEX_LAYERS and INDEX_LAYERS.get(caller, -1) > INDEX_LAYERS[m]
        }
    )
    assert upward == [], "a call returns to a layer above: " + ", ".join(upward)
    # Model resolution does not bounce: no module of the index calls models or sources. (The
    # load of a DeferredModel that models made, recorded as DEFERRED, is the deferred half of
    # models' own resolution, run at most once and only when there is work.)
    bounced = sorted(
        {
            f"{caller} -> {m}.{fn}"
            for m, fn, caller in calls
            if m in ("models", "sources") and INDEX_LAYERS.get(caller, -1) >= 2
        }
    )
    assert bounced == [], "the index resolves a model itself: " + ", ".join(bounced)
    loads = [c for c in calls if c[2] == DEFERRED]
    assert len(loads) <= 1, f"{len(loads)} deferred model loads"
    sessions = [c for c in calls if c[0] == "onnx_backend" and c[1] == "__init__"]
    assert len(sessions) <= 1, f"{len(sessions)} onnxruntime sessions built"
    readers = _manifest_readers(calls)
    assert len(readers) <= manifest_reads, "the manifest is read more than once, by " + ", ".join(
        readers
    )


def _manifest_readers(calls: list[tuple[str, str, str]]) -> list[str]:
    return [caller for m, fn, caller in calls if (m, fn) == ("layout", "read_manifest")]


def test_index_command_runs_down_the_layers_without_bouncing(tmp_path):
    """Done when: `mocoretrieval index` runs cli -> models -> index -> embed -> store without
    returning to a module it has left.

    Made precise: calls are recorded with `sys.setprofile` while `cli.main` indexes a folder,
    each with the module that made it. (1) cli, models and the index are first entered in that
    order (models may call embed's device helper first; the index opens its store before it
    embeds: both are calls down, which (2) allows). (2) Every call between two layers goes down cli > models > index >
    embed > store: a layer is returned to only by returning, never by a call from below. The
    index and the store alternate per batch (update writes each embedded batch) and cli prints
    the report afterwards, both downwards. (3) No module of the index calls models or sources:
    models resolves the model and hands the index an embedder (or a DeferredModel it made), so
    no model name is resolved from below. (4) onnx_backend builds at most one session. (5) The
    manifest is read at most once.
    Run for a new index given a model, for the unchanged folder (no model loaded at all), and
    for the folder with new images (the index's own model, loaded once, deferred).
    """
    from factories import make_images, make_tiny_encoder

    make_tiny_encoder().save_pretrained(tmp_path / "enc")
    make_images(tmp_path / "photos", 3)
    own = ["index", str(tmp_path / "photos"), "--backend", "torch", "--workers", "0", "--quiet"]
    first = _trace_index_command([*own, "--model", str(tmp_path / "enc")])
    _check_index_path(first)
    assert any(m == "store" and fn == "add_batch" for m, fn, _ in first)

    unchanged = _trace_index_command(own)
    _check_index_path(unchanged)
    assert not any(m in ("sources", "encoder") for m, _, _ in unchanged), "loaded a model"

    make_images(tmp_path / "photos" / "new", 2, seed=1)
    changed = _trace_index_command(own)  # the index's own model, loaded because there is work
    _check_index_path(changed)
    assert [c for c in changed if c[2] == DEFERRED], "the own model was not deferred"


def test_indexing_with_the_index_own_model_reads_the_manifest_once(tmp_path):
    from factories import make_images, make_tiny_encoder

    make_tiny_encoder().save_pretrained(tmp_path / "enc")
    make_images(tmp_path / "photos", 2)
    own = ["index", str(tmp_path / "photos"), "--backend", "torch", "--workers", "0", "--quiet"]
    _trace_index_command([*own, "--model", str(tmp_path / "enc")])
    readers = _manifest_readers(_trace_index_command(own))
    assert len(readers) == 1, "the manifest is read by " + ", ".join(readers)


def test_path_check_sees_a_bounce():
    """The checks above fail on the flows they forbid (they are not vacuous)."""
    down = [("cli", "main", ""), ("models", "open_index", "cli"), ("index", "create", "models")]
    _check_index_path(down + [("update", "update", "cli"), ("store", "add_batch", "update")])
    _check_index_path(down + [("models", "<lambda>", DEFERRED)])  # a DeferredModel's load
    with pytest.raises(AssertionError, match="2 deferred model loads"):
        _check_index_path(down + [("models", "<lambda>", DEFERRED)] * 2)
    with pytest.raises(AssertionError, match="returns to a layer above"):
        _check_index_path(down + [("models", "_load_for_index", "encoder_pin")])
    with pytest.raises(AssertionError, match="resolves a model itself"):
        _check_index_path(down + [("sources", "load", "encoder_pin")])
    with pytest.raises(AssertionError, match="first entered as"):
        _check_index_path([("cli", "main", ""), ("index", "create", "cli")])
    with pytest.raises(AssertionError, match="read more than once"):
        _check_index_path(down + [("layout", "read_manifest", "models")] * 2)
