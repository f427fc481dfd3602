"""The evaluation transform (resize, centre crop, normalise), split for a fast decoding pipeline.

torchvision's ``Compose([Resize(r), CenterCrop(s), ToTensor(), Normalize(mean, std)])`` resizes
the whole image and then throws most of it away, and hands float32 tensors (4 bytes a channel)
between processes. :class:`Preprocess` gives the same pixels in two steps:

- :meth:`Preprocess.pixels`, in the decoding workers: one bilinear resize of only the region
  the crop keeps (Pillow's ``box``), to a uint8 (S, S, 3) array; about 0.9 ms instead of 2.2 ms
  per image (measured on draft-decoded 4-14 MPix JPEGs, one core);
- :meth:`Preprocess.normalize`, in the model's process, on a whole batch at once: to float,
  scaled and normalised in channels_last order, the layout ResNets run fastest in on CPU.

Resampling a box gives the same filter taps as resizing everything and cropping afterwards
(each output pixel's centre and the filter's support are the same), so the result matches
torchvision's transform within one intensity level (the box's float coordinates round a few
pixels the other way); tests compare the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError

# The largest model input side accepted from a config. Official MoCo models take 224; 1024
# already makes a batch of 32 images 400 MB of float32, and 6000 would need 4.6 GB per two.
MAX_INPUT_SIZE = 1024
MIN_INPUT_SIZE = 8


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_preprocessing(
    resize_size: Any, input_size: Any, mean: Any, std: Any, where: str = "the model config"
) -> None:
    """Raises :class:`ConfigError`, naming the field and the fix, for a value that would crash
    later or silently give NaN embeddings (``std`` 0, a 2-value ``mean``, a huge input)."""
    for name, value in (("input_size", input_size), ("resize_size", resize_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
    if not MIN_INPUT_SIZE <= input_size <= MAX_INPUT_SIZE:
        raise ConfigError(
            f"{where}: input_size {input_size} is outside [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}]; "
            "official MoCo models use 224"
        )
    if not MIN_INPUT_SIZE <= resize_size <= 2 * MAX_INPUT_SIZE:
        raise ConfigError(
            f"{where}: resize_size {resize_size} is outside [{MIN_INPUT_SIZE}, "
            f"{2 * MAX_INPUT_SIZE}]; official MoCo models use 256"
        )
    for name, value in (("mean", mean), ("std", std)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
            raise ConfigError(f"{where}: {name} must be 3 numbers (R, G, B), got {value!r}")
        if not all(_number(v) for v in value):
            raise ConfigError(f"{where}: {name} must be 3 finite numbers, got {value!r}")
    if not all(v > 0 for v in std):
        raise ConfigError(
            f"{where}: every std must be > 0 (it divides the pixels), got {list(std)}; "
            "ImageNet's is [0.229, 0.224, 0.225]"
        )


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """The (width, height) torchvision's ``Resize(short_side)`` gives: short side to size."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


class Preprocess:
    """Resize the short side (bilinear), centre-crop a square, scale to [0, 1] and normalise.

    Calling it on a PIL RGB image gives the (3, S, S) float tensor torchvision's transform gives;
    the pipeline uses its two halves, :meth:`pixels` and :meth:`normalize`, instead.

    Args:
        resize_size: the short side after resizing.
        input_size: the side of the centre crop, the model's input.
        mean: per-channel mean, on the [0, 1] scale.
        std: per-channel standard deviation, on the [0, 1] scale.
    """

    def __init__(
        self,
        resize_size: int,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        check_preprocessing(resize_size, input_size, mean, std)
        self.resize_size = int(resize_size)
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def pixels(self, img: Image.Image) -> np.ndarray:
        """The resized, centre-cropped image as a (S, S, 3) uint8 array; ``img`` must be RGB."""
        w, h = img.size
        s = self.input_size
        rw, rh = resized_size(w, h, self.resize_size)
        if rw < s or rh < s:  # a resize smaller than the crop: torchvision pads with zeros
            return self._padded(np.asarray(img.resize((rw, rh), Image.BILINEAR)))
        # CenterCrop's offsets in the resized image, rounded as torchvision rounds them.
        left, top = round((rw - s) / 2.0), round((rh - s) / 2.0)
        sx, sy = w / rw, h / rh  # source pixels per resized pixel
        box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
        # np.array, not asarray: a writable copy, which torch.from_numpy wants (150 kB, ~20 us).
        return np.array(img.resize((s, s), Image.BILINEAR, box=box))

    def _padded(self, arr: np.ndarray) -> np.ndarray:
        s = self.input_size
        out = np.zeros((s, s, 3), np.uint8)
        rh, rw = arr.shape[:2]
        ch, cw = min(rh, s), min(rw, s)
        # As torchvision's center_crop: pad to at least S (extra on the bottom/right), then crop.
        top, left = round((rh - ch) / 2.0), round((rw - cw) / 2.0)
        ph, pw = (s - ch) // 2, (s - cw) // 2
        out[ph : ph + ch, pw : pw + cw] = arr[top : top + ch, left : left + cw]
        return out

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) uint8 -> (N, 3, S, S) float32, normalised, in channels_last memory."""
        x = pixels.permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory: channels_last
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        # The order of torchvision's ToTensor then Normalize, so that the floats are the same.
        return x.div_(255.0).sub_(mean).div_(std)

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images of any mode -> (N, 3, S, S) float32, normalised together, channels_last."""
        pixels = np.stack([self.pixels(im.convert("RGB")) for im in images])
        return self.normalize(torch.from_numpy(pixels))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """A PIL RGB image -> (3, S, S) float32 tensor, as torchvision's transform gives it."""
        pixels = torch.from_numpy(self.pixels(img))[None]
        return self.normalize(pixels)[0].contiguous()

    def __repr__(self) -> str:
        return (
            f"Preprocess(resize_size={self.resize_size}, input_size={self.input_size}, "
            f"mean={self.mean}, std={self.std})"
        )
