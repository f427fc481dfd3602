"""Starting the app safely: local-only by default, no share link, nothing from disk exposed.

The page and the HTTP API (`app.api`) are served by one FastAPI app (`build_server`); with
``api_only`` the page is left out and Gradio is never imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from mocoretrieval.errors import MoCoRetrievalError
from mocoretrieval.index import ImageIndex

from . import views
from .api import API_PREFIX, add_json_errors, build_api

if TYPE_CHECKING:  # imported where the page is built: `serve --api-only` runs without Gradio
    import gradio as gr
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # the user's own machine only; --host 0.0.0.0 opts into the LAN
DEFAULT_PORT = 7860


def launch_options(
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    max_upload_mb: float = views.MAX_UPLOAD_MB,
) -> dict[str, Any]:
    """Keyword arguments for ``gr.Blocks.launch`` that keep a private photo library private.

    - binds ``127.0.0.1`` unless a host is given; no public share link unless ``share``;
    - ``allowed_paths`` is empty: Gradio then serves only its own upload and cache folders.
      Result images reach the browser as thumbnails made by `app.views` after
      `views.resolve_in_root` checked them, so no URL can name a file on disk (not the
      indexed root, not the index database, not a symlink's target);
    - uploads above ``max_upload_mb`` are refused by the server before they are stored;
    - no telemetry, no MCP server, no server-side rendering (which would start Node).
    """
    return {
        "server_name": host or DEFAULT_HOST,
        "server_port": port,
        "share": bool(share),
        "allowed_paths": [],
        "max_file_size": f"{max_upload_mb:g}mb",
        "show_error": False,  # our handlers write their own messages; never echo exceptions
        "mcp_server": False,
        "ssr_mode": False,
        "enable_monitoring": False,
        "pwa": False,
    }


@contextlib.contextmanager
def private_cache() -> Iterator[Path]:
    """A private folder (mode 0700) for Gradio's uploads and result thumbnails, removed at exit.

    Gradio's default, ``<tmp>/gradio``, is shared by every user of the machine and the files in
    it are world-readable: thumbnails of private photos would be readable by anyone logged in.
    Set while the page is built and served (Gradio reads ``GRADIO_TEMP_DIR`` then).
    """
    folder = Path(tempfile.mkdtemp(prefix="mocoretrieval-app-"))  # 0700, this user's only
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
        shutil.rmtree(folder, ignore_errors=True)


def launch(
    page: gr.Blocks,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    max_upload_mb: float = views.MAX_UPLOAD_MB,
    block: bool = True,
    theme: Any = None,
) -> str:
    """Launches ``page`` with :func:`launch_options`; returns its local URL.

    Args:
        page: from :func:`app.ui.build_app`.
        host, port, share, max_upload_mb: see :func:`launch_options`; port None picks the first
            free one from 7860.
        block: serve until interrupted (the CLI); False returns at once (tests, notebooks).
        theme: a Gradio theme; default :data:`app.ui.THEME` (local fonts only).
    """
    from .ui import THEME

    opts = launch_options(host, port, share, max_upload_mb)
    _, url, _ = page.launch(
        prevent_thread_lock=not block, quiet=not block, theme=theme or THEME, **opts
    )
    return url


def open_index(
    path: str | Path | None = None,
    backend: str = "auto",
    device: str | None = None,
    notify: Callable[[str], None] | None = None,
) -> ImageIndex:
    """Opens the index and loads its query encoder now, so the first query is not the slow one
    and a missing model is reported at start-up rather than in the page.

    Args:
        path: an index directory or an indexed root; None looks in the current folder and its
            parents.
        backend: ``torch``, ``onnx`` or ``auto`` (onnxruntime on a CPU, torch on a GPU), as
            for ``mocoretrieval search``; the index checks the weights hash either way.
        device: torch device; None picks one.
        notify: told before a one-time ONNX export starts (an index built with torch, served
            with onnxruntime), so that the command can say why start-up waits.
    """
    from mocoretrieval.models import open_index as open_with_model

    index = open_with_model(path, backend=backend, device=device, notify=notify)
    encoder = index.encoder
    side = int(encoder.config.input_size)
    encoder.embed([Image.new("RGB", (side, side))])  # warm-up: allocations, thread pools
    return index


def mount_options(max_upload_mb: float = views.MAX_UPLOAD_MB) -> dict[str, Any]:
    """:func:`launch_options` that apply to ``gr.mount_gradio_app`` (the address is the
    server's, and a mounted page has no share link)."""
    opts = launch_options(max_upload_mb=max_upload_mb)
    for key in ("server_name", "server_port", "share"):
        del opts[key]
    return opts


def build_server(
    index: ImageIndex,
    page: gr.Blocks | None = None,
    k: int = 10,
    max_upload_mb: float = views.MAX_UPLOAD_MB,
) -> FastAPI:
    """One FastAPI app: the HTTP API at ``/api/v1`` and, given a ``page``, the page at ``/``.

    Args:
        index: an open index (see :func:`open_index`).
        page: from :func:`app.ui.build_app`, mounted with :func:`mount_options`; None serves
            the API alone, and every other path is a JSON 404.
        k, max_upload_mb: the API's default k and upload limit (the page's are its own).
    """
    from fastapi import FastAPI

    app = FastAPI(title="mocoretrieval", docs_url=None, redoc_url=None, openapi_url=None)
    add_json_errors(app, unexpected_too=False)  # the API's own handlers log and answer those
    app.mount(API_PREFIX, build_api(index, k_default=k, max_upload_mb=max_upload_mb))
    if page is not None:
        import gradio as gr

        from .ui import THEME

        gr.mount_gradio_app(app, page, path="/", theme=THEME, **mount_options(max_upload_mb))
    return app


def free_port(host: str, first: int = DEFAULT_PORT, tries: int = 100) -> int:
    """The first port from ``first`` that ``host`` can bind now, as Gradio picks one."""
    for port in range(first, first + tries):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise MoCoRetrievalError(f"no free port in {first}-{first + tries - 1}: pass --port")


def run(app: FastAPI, host: str | None = None, port: int | None = None) -> None:
    """Serves ``app`` with uvicorn until interrupted, on 127.0.0.1 unless a host is given."""
    import uvicorn

    host = host or DEFAULT_HOST
    port = port or free_port(host)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving http://{shown}:{port} (API: {API_PREFIX}); Ctrl+C stops", flush=True)
    # Access logs are off: they would list the paths of private photos on the console.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def serve(
    index_path: str | Path | None = None,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    k: int = 10,
    backend: str = "auto",
    max_upload_mb: float = views.MAX_UPLOAD_MB,
    device: str | None = None,
    notify: Callable[[str], None] | None = None,
    api_only: bool = False,
) -> None:
    """Opens the index (loading its encoder once) and serves the page and the HTTP API, or the
    API alone, until interrupted.

    Args:
        index_path, backend, device, notify: see :func:`open_index`.
        host, port, max_upload_mb: see :func:`launch_options`.
        share: serve the page through Gradio's own launcher with a public gradio.live link;
            the API, which has no sign-in, is then not served at all.
        k: how many results the page shows at first, and the API's default k.
        api_only: serve the API without the page (and without importing Gradio).

    Raises:
        MoCoRetrievalError: ``share`` with ``api_only``; no index; no free port.
    """
    if share and api_only:
        raise MoCoRetrievalError(
            "--share makes a public link to the page, and the API has no sign-in: drop "
            "--share, and use --host to reach the API from your network"
        )
    index = open_index(index_path, backend, device, notify)
    try:
        if api_only:
            run(build_server(index, k=k, max_upload_mb=max_upload_mb), host, port)
            return
        from .ui import build_app

        with private_cache():
            page = build_app(index, k_default=k, max_upload_mb=max_upload_mb)
            if share:
                launch(page, host, port, share, max_upload_mb, block=True)
            else:
                app = build_server(index, page, k=k, max_upload_mb=max_upload_mb)
                run(app, host, port)
    finally:
        index.close()
