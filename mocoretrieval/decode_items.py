"""What decoding one file gives (an image's tensor and thumbnail, a video's keyframes, or the
reason it failed) and how a chunk of them becomes one :class:`DecodedBatch`; where they are
decoded (worker processes, deadlines, crashes) is :mod:`.decode_pool`'s part."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import default_collate

from . import data, video
from .errors import ImageError

logger = logging.getLogger(__name__)


class DecodedBatch(NamedTuple):
    """What :func:`collate` makes of a chunk of :class:`ImageFileDataset` items."""

    indices: list[int]  # dataset indices of the decoded images, in order
    images: torch.Tensor | None  # (n, 3, H, W), None when every image failed
    failed: list[tuple[int, str]]  # (dataset index, reason)
    thumbnails: list[bytes | None]  # aligned with indices; empty when not asked for
    # (timestamp s, duration s) of each video keyframe, None for an image, aligned with
    # indices (a video's index repeats once per keyframe); empty when the chunk has no video.
    frames: Sequence[tuple[float, float] | None] = ()


@dataclass
class ImageFileDataset:
    """Files under a root, decoded and transformed; a bad file yields its reason, not an error.

    Item ``i`` is ``(i, tensor, None, thumbnail)`` or ``(i, None, reason, None)``, where
    ``thumbnail`` is a JPEG (see :func:`~mocoretrieval.data.encode_thumbnail`) made from the
    decoded image, or None when ``thumbnail_size`` is None or it could not be made. A video's
    item holds a :class:`~mocoretrieval.video.VideoFrames` (its keyframes, each transformed) in
    place of the tensor; :func:`collate` makes a row of each keyframe.

    Attributes:
        root: the folder ``relpaths`` are relative to.
        relpaths: image paths relative to ``root``.
        transform: PIL RGB image -> tensor or array (e.g. ``encoder.preprocess`` or its
            ``pixels``).
        min_side: passed to :func:`~mocoretrieval.data.load_image` (JPEG draft mode).
        thumbnail_size: the thumbnail's longest side; None makes none. It is made from the image
            as decoded for ``min_side``, so it is smaller when that image is.
    """

    root: str | Path
    relpaths: Sequence[str]
    transform: Callable[[Image.Image], Any]
    min_side: int | None = None
    thumbnail_size: int | None = None

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None, bytes | None]:
        path = os.path.join(self.root, self.relpaths[i])
        if video.is_video_name(path):
            return self._video_item(i, path)
        try:  # looked up on the module: tests replace it to inject crashes and hangs
            img = data.load_image(path, self.min_side)
        except ImageError as e:
            return i, None, e.reason, None
        except Exception as e:  # noqa: BLE001 - load_image raises ImageError; be sure anyway
            return i, None, data.failure_reason(e), None
        try:
            x = self.transform(img)
        except Exception as e:  # noqa: BLE001 - one odd image must not end the run
            return i, None, f"transform failed: {str(e)[:80] or type(e).__name__}", None
        thumb = None
        if self.thumbnail_size:
            try:  # after the transform: thumbnailing works on the image in place
                thumb = data.encode_thumbnail(img, self.thumbnail_size)
            except Exception as e:  # noqa: BLE001 - the app falls back to decoding the file
                logger.debug("%s: no thumbnail: %s", path, e)
        return i, x, None, thumb

    def _video_item(self, i: int, path: str) -> tuple[int, Any, str | None, bytes | None]:
        """A video's keyframes (see :mod:`.video`), transformed, as one item; the thumbnail is
        made from its first keyframe."""
        try:
            keyframes, duration = video.load_keyframes(path, self.min_side)
            pixels = [self.transform(f.image) for f in keyframes]
        except ImageError as e:
            return i, None, e.reason, None
        except Exception as e:  # noqa: BLE001 - one odd video must not end the run
            return i, None, data.failure_reason(e), None
        thumb = None
        if self.thumbnail_size:
            try:
                thumb = data.encode_thumbnail(keyframes[0].image, self.thumbnail_size)
            except Exception as e:  # noqa: BLE001 - the app falls back to no thumbnail
                logger.debug("%s: no thumbnail: %s", path, e)
        frames = video.VideoFrames(pixels, [f.timestamp for f in keyframes], duration)
        return i, frames, None, thumb


def collate(items: Sequence[tuple[int, Any, str | None, bytes | None]]) -> DecodedBatch:
    """Stacks the decoded items of a chunk and keeps the failed ones aside; a video's keyframes
    become one row each, under the video's index (its thumbnail on the first)."""
    failed = [(i, reason) for i, _, reason, _ in items if reason is not None]
    ok: list[tuple[int, Any, bytes | None, tuple[float, float] | None]] = []
    for i, x, reason, thumb in items:
        if reason is not None:
            continue
        if isinstance(x, video.VideoFrames):
            for j, (pixels, t) in enumerate(zip(x.pixels, x.timestamps)):
                ok.append((i, pixels, thumb if j == 0 else None, (t, x.duration)))
        else:
            ok.append((i, x, thumb, None))
    images = default_collate([x for _, x, _, _ in ok]) if ok else None
    thumbnails = [t for _, _, t, _ in ok] if any(t is not None for _, _, t, _ in ok) else []
    frames = [f for *_, f in ok] if any(f is not None for *_, f in ok) else []
    return DecodedBatch([i for i, *_ in ok], images, failed, thumbnails, frames)
