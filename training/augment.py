"""The two augmented views of MoCo: PIL pipelines for image files, batched ones for tensors.

Both follow the config's recipe: RandomResizedCrop, colour jitter, grayscale, Gaussian blur,
solarize, horizontal flip, normalise. That is the order of v2 and v3; v1's code converts to
grayscale before the jitter, which only changes what the jitter's saturation and hue factors
act on in the 20% of gray views. The batched version draws every random parameter per
image and runs on the batch's device, so an in-memory dataset (Fashion-MNIST) is augmented on
the GPU at the speed of the model instead of by CPU workers.

Kept rather than ``kornia.augmentation`` (benchmarks/augment_kornia.py, RESULTS.md 2026-11-29):
on the CPU kornia ran the same v2 view at ~0.8x our rate (4 vs 5 img/s, 32x224), with similar
output statistics (8 images), and it would be one more dependency; CUDA is still to be measured.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from .config import ConfigError, PretrainConfig

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L") and torchvision


def blur_sigma(cfg: PretrainConfig) -> tuple[float, float]:
    """The blur sigma range in pixels of ``cfg.input_size`` (the recipe's is for 224 px)."""
    scale = cfg.input_size / 224
    return cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale


# --- PIL pipelines (image folders, decoded by data-loader workers) -----------------------


class PILGaussianBlur:
    """Gaussian blur with sigma drawn uniformly from a range (SimCLR; MoCo v2 ``loader.py``)."""

    def __init__(self, sigma: Sequence[float]) -> None:
        self.sigma = tuple(sigma)

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILSolarize:
    """Inverts the pixels at or above 128 (BYOL; MoCo v3 ``loader.py``)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img)


class PILRotate:
    """Rotation by an angle drawn uniformly from [-degrees, degrees], the corners filled grey."""

    def __init__(self, degrees: float) -> None:
        self.degrees = degrees

    def __call__(self, img: Image.Image) -> Image.Image:
        angle = random.uniform(-self.degrees, self.degrees)
        return img.rotate(angle, resample=Image.BILINEAR, fillcolor=(124, 116, 104))


class PILDownscale:
    """Downscales to a side fraction drawn from ``scale`` and back: the detail a resized copy
    of a photo has lost."""

    def __init__(self, scale: Sequence[float]) -> None:
        self.scale = tuple(scale)

    def __call__(self, img: Image.Image) -> Image.Image:
        f = random.uniform(*self.scale)
        small = (max(1, round(img.width * f)), max(1, round(img.height * f)))
        return img.resize(small, Image.BILINEAR).resize(img.size, Image.BILINEAR)


class PILJpeg:
    """Re-encodes as JPEG at a quality drawn from ``quality`` (block and ringing artefacts)."""

    def __init__(self, quality: Sequence[int]) -> None:
        self.quality = tuple(quality)

    def __call__(self, img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=random.randint(*self.quality))
        buf.seek(0)
        return Image.open(buf).convert("RGB")


def pil_view_transform(
    cfg: PretrainConfig, view: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """The torchvision pipeline of view ``view`` (0 or 1) for PIL images."""
    from torchvision import transforms as T

    steps: list = [PILRotate(cfg.rotate_deg)] if cfg.rotate_deg > 0 else []
    steps.append(T.RandomResizedCrop(cfg.input_size, scale=(cfg.crop_min, 1.0)))
    if cfg.jitter_p > 0:
        steps.append(T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p))
    if cfg.grayscale_p > 0:
        steps.append(T.RandomGrayscale(p=cfg.grayscale_p))
    if cfg.blur_p[view] > 0:
        steps.append(T.RandomApply([PILGaussianBlur(blur_sigma(cfg))], p=cfg.blur_p[view]))
    if cfg.solarize_p[view] > 0:
        steps.append(T.RandomApply([PILSolarize()], p=cfg.solarize_p[view]))
    if cfg.flip_p > 0:
        steps.append(T.RandomHorizontalFlip(cfg.flip_p))
    if cfg.downscale_p > 0:
        steps.append(T.RandomApply([PILDownscale(cfg.downscale)], p=cfg.downscale_p))
    if cfg.jpeg_p > 0:
        steps.append(T.RandomApply([PILJpeg(cfg.jpeg_quality)], p=cfg.jpeg_p))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


# --- batched tensor pipeline -----------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) * (hi - lo) + lo


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) ITU-R 601 luma, as PIL's ``convert("L")``."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)  # (N, 1, H, W)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HSV in [0, 1]."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) HSV in [0, 1] -> RGB in [0, 1]."""
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], dim=1)
    table = table.view(x.shape[0], 3, 6, *x.shape[2:])  # (N, RGB, sector, H, W)
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


class BatchAugment:
    """One view's augmentation of a whole (N, C, H, W) batch, per-image random parameters.

    Differences from the PIL pipeline, kept deliberately small: the four colour-jitter
    operations run in one random order per batch (per image in torchvision), and the crop is
    resampled bilinearly from the source pixels by ``grid_sample``.
    """

    def __init__(
        self, cfg: PretrainConfig, view: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        if cfg.rotate_deg > 0 or cfg.downscale_p > 0 or cfg.jpeg_p > 0:
            raise ConfigError(
                "rotate_deg, downscale_p and jpeg_p apply to image folders only; set them to 0 "
                "for in-memory data sets such as Fashion-MNIST"
            )
        self.cfg, self.view = cfg, view
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images, 1 or 3 channels -> normalised (N, 3, S, S) float32.

        A gray batch (1 channel) is augmented as one channel and repeated at the end: for gray
        pixels saturation, hue and grayscale change nothing, so they are skipped, and every
        other step costs a third.
        """
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        cfg, view = self.cfg, self.view
        x = self.resized_crop(x)
        if cfg.jitter_p > 0:
            x = self._where(cfg.jitter_p, self.color_jitter(x), x)
        if cfg.grayscale_p > 0 and x.shape[1] == 3:
            x = self._where(cfg.grayscale_p, luma(x).expand(-1, 3, -1, -1), x)
        if cfg.blur_p[view] > 0:
            x = self.blur(x, cfg.blur_p[view])
        if cfg.solarize_p[view] > 0:
            x = self._where(cfg.solarize_p[view], torch.where(x >= 0.5, 1.0 - x, x), x)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x.expand(-1, 3, -1, -1) - mean) / std

    @staticmethod
    def _where(p: float, changed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mask = torch.rand(x.shape[0], device=x.device) < p
        return torch.where(mask[:, None, None, None], changed, x)

    def resized_crop(self, x: torch.Tensor) -> torch.Tensor:
        """RandomResizedCrop(scale=(crop_min, 1), ratio=(3/4, 4/3)) and horizontal flip."""
        n, dev, size = x.shape[0], x.device, self.cfg.input_size
        tries = 10  # torchvision tries 10 crops and falls back to the whole image
        area = _uniform(n * tries, self.cfg.crop_min, 1.0, dev).view(n, tries)
        log_r = _uniform(n * tries, math.log(3 / 4), math.log(4 / 3), dev).view(n, tries)
        w, h = torch.sqrt(area * log_r.exp()), torch.sqrt(area / log_r.exp())  # side fractions
        ok = (w <= 1) & (h <= 1)
        first = ok.int().argmax(1, keepdim=True)
        w = torch.where(ok.any(1), w.gather(1, first).squeeze(1), torch.ones(n, device=dev))
        h = torch.where(ok.any(1), h.gather(1, first).squeeze(1), torch.ones(n, device=dev))
        cx = (torch.rand(n, device=dev) * 2 - 1) * (1 - w)  # centre, in [-1, 1] coordinates
        cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, device=dev) < self.cfg.flip_p, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """ColorJitter(brightness, contrast, saturation, hue), a factor per image."""
        b, c, s, hue = self.cfg.jitter
        n, dev = x.shape[0], x.device
        if x.shape[1] == 1:  # gray: its own luma, and no saturation or hue to change
            s = hue = 0.0

        def factor(v: float) -> torch.Tensor:
            return _uniform(n, max(0.0, 1 - v), 1 + v, dev)[:, None, None, None]

        for op in torch.randperm(4).tolist():
            if op == 0 and b > 0:
                x = (x * factor(b)).clamp(0, 1)
            elif op == 1 and c > 0:
                m = (x if x.shape[1] == 1 else luma(x)).mean(dim=(1, 2, 3), keepdim=True)
                f = factor(c)
                x = (f * x + (1 - f) * m).clamp(0, 1)
            elif op == 2 and s > 0:
                f = factor(s)
                x = (f * x + (1 - f) * luma(x)).clamp(0, 1)
            elif op == 3 and hue > 0:
                hsv = rgb_to_hsv(x)
                shift = _uniform(n, -hue, hue, dev)[:, None, None]
                hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
                x = hsv_to_rgb(hsv)
        return x

    def blur(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Separable Gaussian blur, sigma per image; images not drawn get a unit kernel."""
        n, c, hgt, wid = x.shape
        lo, hi = blur_sigma(self.cfg)
        radius = min(math.ceil(3 * hi), (min(hgt, wid) - 1) // 2)
        if radius < 1:
            return x
        sigma = _uniform(n, lo, hi, x.device)
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))  # (N, k)
        kernel = kernel / kernel.sum(1, keepdim=True)
        delta = (t == 0).to(x.dtype).expand(n, -1)
        keep = torch.rand(n, device=x.device) < p
        kernel = torch.where(keep[:, None], kernel, delta)
        kernel = kernel.repeat_interleave(c, dim=0)  # (N*C, k): one kernel per image channel
        k = kernel.shape[1]
        y = F.pad(x.reshape(1, n * c, hgt, wid), (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, kernel.view(n * c, 1, 1, k), groups=n * c)
        y = F.conv2d(y, kernel.view(n * c, 1, k, 1), groups=n * c)
        return y.view(n, c, hgt, wid)


def eval_batch(
    images: torch.Tensor, resize: int, crop: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The evaluation transform of a `MoCoEncoder` (resize short side, centre crop,
    normalise), batched on tensors."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    size = (max(resize, round(h * scale)), max(resize, round(w * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    x = x[..., top : top + crop, left : left + crop]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()
