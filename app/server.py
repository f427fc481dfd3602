"""Starting the app safely: local-only by default, no share link, nothing from disk exposed."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from mocoretrieval.index import ImageIndex

from . import views

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
) -> None:
    """Opens the index (loading its encoder once) and serves the app until interrupted.

    Args:
        index_path, backend, device, notify: see :func:`open_index`.
        host, port, share, max_upload_mb: see :func:`launch_options`.
        k: how many results the page shows at first.
    """
    from .ui import build_app

    index = open_index(index_path, backend, device, notify)
    try:
        with private_cache():
            page = build_app(index, k_default=k, max_upload_mb=max_upload_mb)
            launch(page, host, port, share, max_upload_mb, block=True)
    finally:
        index.close()
