"""Video files as a few keyframes, decoded with PyAV (the optional ``video`` extra).

The keyframe rule (:func:`load_keyframes`), each frame becoming one vector of the video's file:

- Up to :data:`MAX_KEYFRAMES` frames, at evenly spaced times: the video's duration is cut into
  ``2 * MAX_KEYFRAMES`` equal spans and the candidates are their midpoints; frame ``i`` is the
  first usable candidate from candidate ``2 * i`` on (and after the one frame ``i - 1`` took).
- A near-uniform frame (a black opening or closing, a fade: pixel standard deviation below
  :data:`UNIFORM_STD` of 255) is not usable: the next candidate is taken instead. A video
  whose candidates are all uniform is skipped with that reason.
- Each seek lands on the keyframe at or before the candidate's time (fast), and frames are
  decoded forward to the first at or after it: the timestamp stored is that frame's own.
- Rotation metadata (a phone held upright) is applied when PyAV exposes it
  (``VideoFrame.rotation``, PyAV >= 13).

Without PyAV a video is skipped with the reason :data:`INSTALL_HINT`, as a RAW file is without
rawpy; a broken or truncated video is skipped with its reason, never fatal.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ImageError

logger = logging.getLogger(__name__)

# Four frames tell a clip apart from another without making a long video cost much more than
# a photo to embed; the store and the duplicate rule hold any number.
MAX_KEYFRAMES = 4
# Pixel standard deviation (0-255 grey levels) under which a frame is near-uniform: encoded
# black frames measure ~0-1, the darkest real scenes well above 5.
UNIFORM_STD = 4.0
INSTALL_HINT = 'video needs PyAV: pip install "mocoretrieval[video]"'
VIDEO_EXTENSIONS: frozenset[str] = frozenset({
    "mp4", "m4v", "mov", "mkv", "webm", "avi", "3gp", "mts", "m2ts", "mpg", "mpeg", "wmv",
})  # fmt: skip


def is_video_name(name: str | os.PathLike) -> bool:
    """Whether a file name has a video extension, in any case."""
    return os.path.splitext(os.fspath(name))[1][1:].lower() in VIDEO_EXTENSIONS


@dataclass
class Keyframe:
    """One frame kept of a video: its time in seconds from the start, and the picture."""

    timestamp: float
    image: Image.Image


@dataclass
class VideoFrames:
    """A decoded video as the decoding workers hand it on: one transformed frame per keyframe.

    Attributes:
        pixels: the transform's output per keyframe, in time order.
        timestamps: seconds from the start, aligned with ``pixels``.
        duration: the video's length in seconds.
    """

    pixels: list[Any]
    timestamps: list[float]
    duration: float


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise ImageError(INSTALL_HINT) from None
    return av


def is_uniform(img: Image.Image, threshold: float = UNIFORM_STD) -> bool:
    """Whether ``img`` is near-uniform (a black or a flat frame): grey-level std < threshold."""
    small = img.convert("L")
    small.thumbnail((64, 64))
    return float(np.asarray(small, dtype=np.float32).std()) < threshold


def candidate_times(duration: float, n: int = MAX_KEYFRAMES) -> list[float]:
    """The ``2 * n`` candidate times over ``duration`` seconds: midpoints of equal spans."""
    m = 2 * n
    return [duration * (j + 0.5) / m for j in range(m)]


def _rotation(frame: Any) -> int:
    """Degrees counterclockwise to turn ``frame`` upright (0 when PyAV says nothing)."""
    try:
        return round(float(getattr(frame, "rotation", 0) or 0)) % 360
    except (TypeError, ValueError):
        return 0


def _to_image(frame: Any, min_side: int | None) -> Image.Image:
    """The frame as an RGB image, scaled down (by swscale) to a short side of ``min_side``."""
    w, h = frame.width, frame.height
    if min_side and min(w, h) > min_side:
        scale = min_side / min(w, h)
        frame = frame.reformat(width=max(1, round(w * scale)), height=max(1, round(h * scale)))
    img = frame.to_image()  # RGB
    angle = _rotation(frame)
    # PyAV's rotation is the display matrix's counterclockwise angle; PIL turns counterclockwise
    # for a positive angle too, so a phone video stored sideways (-90) is turned clockwise.
    return img.rotate(angle, expand=True) if angle else img


def _frame_at(container: Any, stream: Any, t: float) -> Any | None:
    """The first frame at or after ``t`` seconds, decoded from the keyframe before it."""
    tb = stream.time_base
    start = stream.start_time or 0
    container.seek(start + int(t / tb), stream=stream, backward=True, any_frame=False)
    last = None
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        last = frame
        if float((frame.pts - start) * tb) >= t - 1e-3:
            return frame
    return last  # the end came first (a truncated file): its last frame


def _duration(container: Any, stream: Any) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    return 0.0


def load_keyframes(
    path: str | Path, min_side: int | None = None, max_frames: int = MAX_KEYFRAMES
) -> tuple[list[Keyframe], float]:
    """Decodes up to ``max_frames`` keyframes of a video by the module's rule.

    Args:
        path: the video file.
        min_side: scale frames down to this short side (the model's resize size); None keeps
            them whole.
        max_frames: frames to keep at most.

    Returns:
        ``(keyframes in time order, duration in seconds)``.

    Raises:
        ImageError: PyAV is missing (:data:`INSTALL_HINT`), or the file is no readable video,
            truncated, or has only uniform frames; ``reason`` says which.
    """
    av = _import_av()
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise ImageError("no video stream")
            stream = container.streams.video[0]
            # One thread: the decoding workers are the parallelism (as torch's one thread in
            # each), and frame threads must refill their pipeline after every seek: AUTO cost
            # 28% more CPU per video (1280x720 H.264, benchmarks/decode_formats.py's video).
            stream.thread_count = 1
            duration = _duration(container, stream)
            start = stream.start_time or 0
            frames: list[Keyframe] = []
            seen: set[int] = set()
            candidates = candidate_times(duration, max_frames)
            j = 0
            for i in range(max_frames):
                j = max(j, 2 * i)
                while j < len(candidates):
                    frame = _frame_at(container, stream, candidates[j])
                    j += 1
                    if frame is None or frame.pts in seen:
                        continue
                    img = _to_image(frame, min_side)
                    if is_uniform(img):
                        continue
                    seen.add(frame.pts)
                    frames.append(Keyframe(float((frame.pts - start) * stream.time_base), img))
                    break
    except ImageError:
        raise
    except av.FFmpegError as e:
        raise ImageError(_reason(e)) from e
    except (OSError, ValueError, MemoryError) as e:
        raise ImageError(f"not a readable video: {str(e)[:80] or type(e).__name__}") from e
    if not frames:
        raise ImageError("truncated or blank video: no usable frame")
    frames.sort(key=lambda f: f.timestamp)
    return frames, duration


def _reason(e: Exception) -> str:
    """A short reason for an FFmpeg error, in the words :func:`.data.load_image` uses."""
    text = str(e).lower()
    if "invalid data" in text or "end of file" in text or "moov atom" in text:
        return "truncated or not a video"
    return f"corrupt video: {str(e)[:80] or type(e).__name__}"
