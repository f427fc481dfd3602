"""Web-app latency: query upload -> results rendered in a real browser, on a 10k-image index.

What is measured, per query, in headless Chromium driven by Playwright: from handing the file
to the page's upload input until the gallery shows k new captions and every result image has
loaded (``img.complete``). That covers the upload, decoding the query, embedding it, the FAISS
search, making k thumbnails, Gradio's round trip and the browser fetching and drawing them.
In the same run the server-side part alone (``app.views.search_upload``) and its pieces
(decoding the query, the encoder, the FAISS search, the k thumbnails) are timed on the same
queries, right after each browser query, so the table shows where the time goes.

The index: 10,000 files in a temporary folder, hard links to a pool of real JPEG photos
(Debian's plasma-workspace-wallpapers, 1-15 MPix, 5 of 24 progressive), so thumbnails decode
real photos. Embedding 10,000 images with ResNet-50 would take ~20 minutes here, so each file
gets a random unit vector, written through the index's store; `ImageIndex.update` then finds
every file up to date (no model work) and builds the FAISS index as it would for real. Each file
also gets the thumbnail `ImageIndex.update` would store for it, made as the decoding workers
make it (`load_image` at the encoder's resize size, then `encode_thumbnail`), once per pool
photo; `--no-thumbnails` leaves them out (an index built before thumbnails were stored). Random
vectors make each query's k results a random mix of the pool photos, as in a real collection
(nearest neighbours of one photo are not k copies of one file). The encoder is a ResNet-50 with
random weights, saved and loaded like any model source: the same compute as the official
MoCo v3 ResNet-50 (use --model to load real weights).

    python benchmarks/app_latency.py [--n 10000] [--queries 50] [--k 10] [--backend torch]
        [--baseline-only] [--no-thumbnails]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results import append_section

REPO = Path(__file__).resolve().parents[1]
WALLPAPERS = Path("/usr/share/wallpapers")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
# True once the gallery shows k captions that differ from the previous query's and every
# result image has finished loading.
RENDERED_JS = """([previous, k]) => {
  const caps = [...document.querySelectorAll('#results .caption-label')].map(e => e.textContent);
  const imgs = [...document.querySelectorAll('#results img')];
  return caps.length === k && caps.join('|') !== previous && imgs.length >= k
    && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


def photo_pool(limit: int, baseline_only: bool = False) -> list[Path]:
    from PIL import Image

    # Resolved and deduplicated (many wallpaper sizes are symlinks to one file); photo-sized
    # only (at least 1 MPix), not the small previews.
    files = {p.resolve() for p in WALLPAPERS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")}
    pool = sorted(p for p in files if np.prod(Image.open(p).size) >= 1_000_000)
    if baseline_only:  # as cameras and phones write them; progressive JPEGs decode much slower
        pool = [p for p in pool if not Image.open(p).info.get("progressive")]
    if not pool:
        sys.exit(f"no JPEGs under {WALLPAPERS}: apt-get install plasma-workspace-wallpapers")
    return pool[:limit]


def pool_thumbnails(pool: list[Path], encoder) -> dict[Path, bytes]:
    """The thumbnail the indexer stores for each pool photo, made as its workers make it."""
    from mocoretrieval.data import encode_thumbnail, load_image
    from mocoretrieval.embed import DEFAULT_THUMBNAIL_SIZE

    side = int(encoder.resize_size)
    return {p: encode_thumbnail(load_image(p, side), DEFAULT_THUMBNAIL_SIZE) for p in pool}


def build_index(
    root: Path, pool: list[Path], n: int, encoder, seed: int = 0, thumbnails: bool = True
):
    """n hard links to the pool photos, indexed with random unit vectors (and thumbnails)."""
    from mocoretrieval.index import ImageIndex
    from mocoretrieval.store import FileStat

    thumbs = pool_thumbnails(pool, encoder) if thumbnails else {}

    root.mkdir(parents=True)
    rels = []
    for i in range(n):
        rel = f"{i // 1000:02d}/photo_{i:05d}.jpg"
        (root / rel).parent.mkdir(exist_ok=True)
        os.link(pool[i % len(pool)], root / rel)  # same inode: a real file inside the root
        rels.append(rel)
    encoder_dir = root.parent / "encoder"  # a model source on disk, as `serve` loads it
    encoder.save_pretrained(encoder_dir)
    index = ImageIndex.create(root, model=str(encoder_dir))
    rng = np.random.default_rng(seed)
    for start in range(0, n, 1000):
        chunk = rels[start : start + 1000]
        vectors = rng.standard_normal((len(chunk), int(encoder.dim))).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        stats = [FileStat(st.st_size, st.st_mtime_ns) for st in (os.stat(root / r) for r in chunk)]
        sources = [pool[(start + j) % len(pool)] for j in range(len(chunk))]
        index.store.add_batch(
            chunk, vectors, stats, thumbnails=[thumbs[p] for p in sources] if thumbs else []
        )
    report = index.update()  # every file is up to date: builds FAISS, no model work
    assert not report.added and not report.updated, "the benchmark index was re-embedded"
    info = index.info()
    index.close()
    return info


def p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="images in the index")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--pool", type=int, default=100, help="most distinct photos to use")
    parser.add_argument("--model", help="encoder source (default: random-weight ResNet-50)")
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx", "auto"),
        default="torch",
        help="query encoder (default torch; `serve` defaults to auto)",
    )
    parser.add_argument(
        "--baseline-only", action="store_true", help="leave out the progressive JPEGs"
    )
    parser.add_argument(
        "--no-thumbnails",
        action="store_true",
        help="store no thumbnails in the index: the app decodes every result file",
    )
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from app import views
    from app.server import launch, open_index
    from app.ui import build_app
    from mocoretrieval import MoCoEncoder
    from mocoretrieval.data import load_image

    torch.manual_seed(0)
    pool = photo_pool(args.pool, args.baseline_only)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = (
            MoCoEncoder.from_pretrained(args.model) if args.model else MoCoEncoder(arch="resnet50")
        )
        t0 = time.perf_counter()
        info = build_index(
            Path(tmp) / "photos", pool, args.n, encoder, thumbnails=not args.no_thumbnails
        )
        build_s = time.perf_counter() - t0
        print(f"index: {info['count']} images, {info['index_type']}, built in {build_s:.0f} s")

        t0 = time.perf_counter()
        index = open_index(Path(tmp) / "photos", args.backend)  # as `serve` does
        encoder_kind = type(index.encoder).__name__  # what `auto` chose
        print(f"encoder loaded ({encoder_kind}) in {time.perf_counter() - t0:.0f} s")
        page_app = build_app(index, k_default=args.k)
        url = launch(page_app, port=None, block=False)
        queries = [pool[(7 * i) % len(pool)] for i in range(args.queries + 5)]

        # Per query, every timing back to back, so that they share the machine's load.
        stages = ("e2e", "server", "decode", "embed", "search", "thumbs", "decoded")
        times: dict[str, list[float]] = {name: [] for name in stages}
        load_before = os.getloadavg()[0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url)
            upload = page.locator("#query input[type=file]")
            upload.wait_for(state="attached")
            previous = ""
            for i, q in enumerate(queries):
                views.clear_thumbnail_cache()  # a new query: nothing seen before
                t = time.perf_counter()
                upload.set_input_files(str(q))
                page.wait_for_function(RENDERED_JS, arg=[previous, args.k], polling="raf")
                t_e2e = time.perf_counter() - t
                previous = "|".join(page.locator("#results .caption-label").all_inner_texts())
                views.clear_thumbnail_cache()  # cold, as the browser query was
                t = [time.perf_counter()]
                out = views.search_upload(index, q, args.k)
                t.append(time.perf_counter())
                image = load_image(q, min_side=int(index.encoder.resize_size))
                t.append(time.perf_counter())
                vector = index.encoder.embed([image])[0]
                t.append(time.perf_counter())
                results = index.search(vector, k=args.k)
                views.clear_thumbnail_cache()
                t.append(time.perf_counter())
                views.gallery_items(index.root, results, index)  # as the page makes them
                t.append(time.perf_counter())
                views.clear_thumbnail_cache()
                t_decoded = time.perf_counter()
                views.gallery_items(index.root, results)  # every file decoded: the fallback
                t_decoded = time.perf_counter() - t_decoded
                views.clear_thumbnail_cache()
                assert len(out.items) == args.k, out.message
                if i >= 5:  # the first few warm up caches and thread pools
                    times["e2e"].append(t_e2e)
                    times["decoded"].append(t_decoded)
                    for name, a, b in zip(stages[1:-1], t, t[1:]):
                        times[name].append(b - a)
            browser.close()
        load_after = os.getloadavg()[0]
        page_app.close()
        index.close()

    e2e = times["e2e"]
    total = p50(e2e)
    labels = {
        "e2e": "query -> rendered in Chromium (end to end)",
        "server": "server: `views.search_upload` (decode + embed + search + thumbnails)",
        "decode": "... decode the query (JPEG draft mode)",
        "embed": "... encoder forward (preprocess included)",
        "search": "... FAISS search + paths",
        "thumbs": f"... {args.k} thumbnails as served ("
        + ("decoded from the files)" if args.no_thumbnails else "stored in the index)"),
        "decoded": f"(not in the above) the same {args.k} decoded from the files, cold",
    }
    rows = [(labels[name], p50(times[name])) for name in stages]
    backend = f"{args.backend} ({encoder_kind})"
    title = (
        f"app latency: {args.n} images ({info['index_type']}), k={args.k}, "
        f"{len(e2e)} queries, {len(pool)} {'baseline' if args.baseline_only else 'mixed'} JPEG "
        f"photos, {backend} backend, {torch.get_num_threads()} threads, "
        f"{platform.machine()} CPU"
    )
    lines = ["| stage | p50 ms | share of end to end |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {ms:.0f} | {ms / total:.2f} |" for name, ms in rows]
    ratio = p50(times["decoded"]) / max(p50(times["thumbs"]), 1e-9)
    verdict = "met" if total < 500 else "NOT met"
    load = (
        f"load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} cores"
    )
    table = "\n".join(lines)
    print(
        f"\n{title}\n{table}\ngoal p50 < 500 ms: {verdict} (p90 "
        f"{np.percentile(e2e, 90) * 1000:.0f} ms); thumbnails as served {ratio:.1f}x faster "
        f"than decoded; {load}"
    )
    if not args.no_append:
        append_section(
            "app_latency",
            (
                f"{title}; files are hard "
                f"links to real JPEG photos with random vectors (see the script); {load}\n\n"
                f"{table}\n\nGoal p50 < 500 ms: {verdict}; p90 "
                f"{np.percentile(e2e, 90) * 1000:.0f} ms. Thumbnails as served: {ratio:.1f}x "
                "faster than decoded from the files (p50s, same queries).\n"
            ),
        )


if __name__ == "__main__":
    main()
