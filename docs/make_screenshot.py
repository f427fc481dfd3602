"""Makes docs/screenshot.png: the app searching Debian's wallpapers, in headless Chromium.

    python docs/make_screenshot.py [--model SOURCE] [--query NAME] [--seed N]

The pictures are the JPEGs of ``plasma-workspace-wallpapers`` (apt), hard-linked into a
temporary folder and indexed with the default encoder (``--model`` for another). The query is
an edited copy of the wallpaper ``--query`` (a held-out photo of the default encoder's corpus:
never trained on): the ``combined`` edit of ``mocoretrieval eval copies``' standard preset
(crop, rotation, flip, colour, grayscale, downscale, JPEG), seeded by ``--seed``.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "screenshot.png"
WALLPAPERS = Path("/usr/share/wallpapers")
MAX_BYTES = 200_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="encoder source (default: the default model)")
    parser.add_argument("--query", default="Path", help="wallpaper to search an edited copy of")
    parser.add_argument("--seed", type=int, default=1, help="seed of the copy's edits")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from app.server import launch
    from app.ui import build_app
    from mocoretrieval import DEFAULT_MODEL, MoCoEncoder
    from mocoretrieval.edits import COMBINED, edit, get_preset, web_sized
    from mocoretrieval.index import ImageIndex

    encoder = MoCoEncoder.from_pretrained(args.model or DEFAULT_MODEL)
    files = sorted({p.resolve() for p in WALLPAPERS.rglob("*.jpg")})
    files = [p for p in files if "screenshot" not in p.name]  # previews of the wallpapers
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        for src in files:  # e.g. Flow/contents/images_dark/5120x2880.jpg -> Flow_dark_5120x2880.jpg
            parts = [
                p for p in src.relative_to(WALLPAPERS).parts if p not in ("contents", "images")
            ]
            os.link(src, root / "_".join(parts).replace("images_", ""))
        original = max(
            (p for p in root.iterdir() if p.name.startswith(f"{args.query}_")),
            key=lambda p: p.stat().st_size,
        )
        rng = np.random.default_rng(args.seed)
        copy, quality = edit(web_sized(Image.open(original).convert("RGB")), COMBINED,
                             get_preset("standard"), rng)  # fmt: skip
        query = Path(tmp) / f"edited-copy-of-{args.query}.jpg"
        copy.save(query, "JPEG", quality=quality)
        with ImageIndex.build(root, model=encoder, workers=0) as index:
            page_app = build_app(index, k_default=10)
            url = launch(page_app, port=None, block=False)
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path="/usr/bin/chromium",
                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
                )
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                page.goto(url)
                page.locator("#query input[type=file]").set_input_files(str(query))
                page.locator("#results .caption-label").nth(9).wait_for()
                page.wait_for_function(
                    "[...document.querySelectorAll('#results img, #query img')]"
                    ".every(i => i.complete && i.naturalWidth > 0)"
                )
                png = page.screenshot()
                browser.close()
            page_app.close()
    # A 256-colour palette keeps the README's image small (photos make a large true-colour PNG).
    image = Image.open(io.BytesIO(png)).convert("RGB")
    for width in (1280, 1100, 960):
        small = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        buf = io.BytesIO()
        small.quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
        if buf.tell() <= MAX_BYTES:
            break
    OUT.write_bytes(buf.getvalue())
    print(f"wrote {OUT} ({buf.tell() // 1000} kB, {small.width}x{small.height})")


if __name__ == "__main__":
    main()
