"""Decode cost of `load_image` per format, in images per CPU second: JPEG, PNG, HEIC, AVIF, DNG;
and of `video.load_keyframes` for a video, in keyframes (and videos) per CPU second.

Each format is written once from the same generated photo-like image (smooth colour fields, edges
and sensor-like noise, so that no codec gets an easy ride), then decoded repeatedly for about
``--seconds``, as the index does (``--min-side``, the encoder's resize size) and, with ``--full``,
at full size (``min_side`` None; a DNG then takes a preview of 512 px or more whole). DNGs come
in two kinds: with a 1620 px embedded preview (used) and with a 160 px one (too small: LibRaw
demosaics at half size). The video (``--video``, WxH and seconds) pans over the same photo at
25 fps, H.264 (or MPEG-4 Part 2 where this PyAV cannot encode H.264) with a keyframe every
second, as phones and cameras write. The rate is per CPU second of the whole process, every decoder thread
included: the cost on one core, which other jobs on the machine do not change.
Prints a table and appends it to benchmarks/RESULTS.md.

    python benchmarks/decode_formats.py --size 3000x2000 --seconds 1
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # before numpy/torch load their thread pools

import numpy as np
import pillow_heif
from PIL import Image
from results import append_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dng import write_dng  # the tests' DNG writer

from mocoretrieval import video
from mocoretrieval.data import load_image

VIDEO_FPS = 25


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: smooth fields, hard edges, sensor-like noise."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
    img = np.array(base.resize((w, h), Image.BICUBIC), dtype=np.int16)
    for _ in range(12):  # rectangles: edges for the codecs to keep
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        img[y0 : y0 + h // 5, x0 : x0 + w // 7] = rng.integers(0, 256, 3)
    img += rng.integers(-6, 7, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_all(folder: Path, w: int, h: int) -> dict[str, Path]:
    """The same photo in every format; encoder settings favour encoding speed (the benchmark
    measures decoding, whose speed they barely change)."""
    img = Image.fromarray(photo(w, h))
    out = {"JPEG (q90)": folder / "a.jpg", "PNG": folder / "a.png"}
    img.save(out["JPEG (q90)"], quality=90)
    img.save(out["PNG"], compress_level=1)
    out["HEIC (q85)"] = folder / "a.heic"
    pillow_heif.from_pillow(img).save(
        out["HEIC (q85)"], quality=85, enc_params={"preset": "ultrafast"}
    )
    out["AVIF (q80)"] = folder / "a.avif"
    img.save(out["AVIF (q80)"], quality=80, speed=10)
    # Linear sensor values; a preview of the size cameras embed (1620 px wide for 3:2).
    preview = img.resize((1620, 1620 * h // w), Image.BILINEAR)
    linear = (np.asarray(img, np.float32) / 255) ** 2.2
    out["DNG (preview)"] = write_dng(folder / "preview.dng", linear, preview)
    out["DNG (demosaic)"] = write_dng(folder / "demosaic.dng", linear, img.resize((160, 107)))
    return out


def write_video(path: Path, w: int, h: int, seconds: float) -> tuple[Path, str]:
    """A ``seconds`` long video panning over :func:`photo`; returns it and its codec."""
    import av

    frame = photo(w + VIDEO_FPS * int(seconds) * 4, h)
    codec = next(c for c in ("libx264", "h264", "mpeg4") if _can_encode(av, c))
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.gop_size = VIDEO_FPS  # a keyframe a second
        stream.bit_rate = 4_000_000
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        for i in range(round(seconds * VIDEO_FPS)):
            arr = np.ascontiguousarray(frame[:, i * 4 : i * 4 + w])
            out.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(stream.encode())
    return path, codec


def _can_encode(av, name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except (av.FFmpegError, ValueError):
        return False
    return True


def video_rate(path: Path, min_side: int | None, seconds: float) -> tuple[float, int, tuple]:
    """Videos per CPU second decoding ``path``'s keyframes (at least 2 decodes), the keyframes
    of one, and their size."""
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while n < 2 or time.perf_counter() - start < seconds:
        frames, _ = video.load_keyframes(path, min_side)
        n += 1
    return n / (time.process_time() - cpu), len(frames), frames[0].image.size


def rate(path: Path, min_side: int | None, seconds: float) -> tuple[float, tuple[int, int]]:
    """Images per CPU second decoding ``path`` for about ``seconds`` (at least 2 decodes).

    CPU time of the process, every thread included: other jobs on the machine lengthen the
    wall time, not this.
    """
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while n < 2 or time.perf_counter() - start < seconds:
        size = load_image(path, min_side).size
        n += 1
    return n / (time.process_time() - cpu), size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="3000x2000", help="WxH of the generated images")
    p.add_argument("--min-side", type=int, default=256, help="what the index asks of load_image")
    p.add_argument("--seconds", type=float, default=2.0, help="decoding time per cell")
    p.add_argument("--full", action="store_true", help="also decode at full size (min_side None)")
    p.add_argument("--video", default="1280x720x10", help="WxHxSECONDS of the video; '' for none")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    import torch

    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = write_all(Path(tmp), w, h)
        made = time.perf_counter() - t0
        rows = []
        for name, path in files.items():
            load_image(path, args.min_side)  # warm-up: plugin and library loading (rawpy)
            fast, fast_size = rate(path, args.min_side, args.seconds)
            row = f"| {name} | {path.stat().st_size / 1e3:.0f} | {fast:.1f} | {_wxh(fast_size)} |"
            if args.full:
                full, full_size = rate(path, None, args.seconds)
                row += f" {full:.1f} | {_wxh(full_size)} |"
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
        if args.video:
            vw, vh, vs = (int(v) for v in args.video.lower().split("x"))
            t0 = time.perf_counter()
            path, codec = write_video(Path(tmp) / "a.mp4", vw, vh, vs)
            made += time.perf_counter() - t0
            per_s, k, size = video_rate(path, args.min_side, args.seconds)
            name = f"video {vw}x{vh} {vs} s ({codec}, GOP 1 s): keyframes (videos)"
            kb = path.stat().st_size / 1e3
            row = f"| {name} | {kb:.0f} | {per_s * k:.1f} ({per_s:.2f}) | {_wxh(size)} |"
            if args.full:
                full, _, full_size = video_rate(path, None, args.seconds)
                row += f" {full * k:.1f} ({full:.2f}) | {_wxh(full_size)} |"
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    header = (
        f"{w}x{h} generated photo, decoded by `data.load_image` on one core "
        f"({platform.processor() or platform.machine()}, Pillow {Image.__version__}, "
        f"pillow-heif {pillow_heif.__version__}, rawpy {_rawpy_version()}, PyAV "
        f"{_av_version()}); files written in "
        f"{made:.1f} s, {args.seconds:g} s of decoding per cell; images per CPU second (the "
        "video: `video.load_keyframes`, keyframes and, in brackets, videos per CPU second)."
    )
    columns = f"| format | kB | img/s, min_side={args.min_side} | decoded size |"
    rule = "|---|---:|---:|---|"
    if args.full:
        columns, rule = columns + " img/s, full size | decoded size |", rule + "---:|---|"
    table = "\n".join([columns, rule, *rows])
    print(header, table, sep="\n\n")
    if not args.no_append:
        append_section("decode_formats", f"{header}\n\n{table}\n")


def _wxh(size: tuple[int, int]) -> str:
    return "x".join(map(str, size))


def _av_version() -> str:
    try:
        import av
    except ImportError:
        return "none"
    return av.__version__


def _rawpy_version() -> str:
    import rawpy

    return rawpy.__version__


if __name__ == "__main__":
    main()
