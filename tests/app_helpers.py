"""Helpers for the web-app tests: a real index built with the tiny encoder, and the app
launched on 127.0.0.1 at a free port."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from factories import make_images, make_tiny_encoder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_photo_index(base: Path) -> Any:
    """An index of 16 generated images, an exact copy of one (a near-duplicate pair) and a
    symlink inside the root to an image outside it; the root's parent holds a secret file."""
    from mocoretrieval.index import ImageIndex

    root = base / "photos"
    make_images(root, 12)
    make_images(root / "sub", 4, seed=1)
    shutil.copy(root / "img_0004.jpg", root / "sub" / "copy_of_4.jpg")
    outside = make_images(base / "outside", 1, seed=7)[0]
    (root / "link_out.png").symlink_to(outside)
    (base / "secret.txt").write_text("not for the browser")
    torch.manual_seed(0)  # the same random encoder whichever test builds first
    return ImageIndex.build(root, model=make_tiny_encoder(), workers=0)


def shown_paths(index: Any, results: Any) -> list[str]:
    """What the page shows of ``ImageIndex.search`` results: relative paths, minus the symlink
    that points outside the root."""
    paths = [r.relpath for r in results]
    return [p for p in paths if p != "link_out.png"]


def launch_app(index: Any, max_upload_mb: float = 1) -> tuple[str, Any]:
    """``(base url, page)`` of the app launched without blocking; close the page when done."""
    from app.server import launch
    from app.ui import build_app

    page = build_app(index, k_default=5, max_upload_mb=max_upload_mb)
    url = launch(page, port=free_port(), max_upload_mb=max_upload_mb, block=False)
    return url.rstrip("/"), page
