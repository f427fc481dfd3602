"""Backbone architectures: ResNets as torchvision's and timm ViTs in MoCo v3's configuration.

Modules only; nothing here touches the filesystem or the Hub.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

# resnet10: one BasicBlock per stage instead of ResNet-18's two (torchvision's ResNet class
# with layers [1, 1, 1, 1]): ~1.6x a ResNet-18's forward+backward rate at 32 px on 2 CPU cores.
RESNETS = {"resnet10": 512, "resnet18": 512, "resnet34": 512, "resnet50": 2048}
# MoCo v3 (vits.py): ViT-S uses 12 heads, not the 6 of timm's default vit_small.
VITS = {
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 12},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}
ARCHS = tuple(RESNETS) + tuple(VITS)


def feature_dim(arch: str) -> int:
    """Dimension of the pooled backbone features of ``arch``."""
    if arch in RESNETS:
        return RESNETS[arch]
    if arch in VITS:
        return VITS[arch]["embed_dim"]
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def sincos_pos_embed_2d(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of MoCo v3 (Sec. 4.3), a zero row for the cls token.

    Returns:
        Tensor of shape (1, 1 + grid * grid, dim).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = grid_w.flatten()[:, None] * omega[None]  # (G*G, D/4)
    out_h = grid_h.flatten()[:, None] * omega[None]  # (G*G, D/4)
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb], dim=0)[None]  # (1, 1+G*G, D)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes a conv over a map no larger than its kernel as one matrix
    product: the same function and gradients, far faster where the map is tiny.

    At 32 px the last stages of a standard-stem ResNet see 2x2 and 1x1 maps; oneDNN still runs
    there a padded 3x3 conv, mostly multiplying padding, and its backward is slow: on 2 cores
    layer4 took 42% of a ResNet-18 forward+backward (benchmarks/RESULTS.md). Each output pixel
    of such a conv is a linear map of the whole input, so the conv is the linear layer whose
    weight gathers, for each output pixel, the kernel taps that land on the input (taps over
    padding contribute zero, and get zero gradient, either way). Used when the input has at
    most as many pixels as the kernel and the output at most 4; ``torch.jit.trace`` takes the
    plain conv, whose graph, unlike this branch's, holds for every input size.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        kh, kw = self.kernel_size
        if (
            torch.jit.is_tracing()  # first: a traced shape is a tensor, not an int
            or h * w > kh * kw
            or self.groups != 1
            or self.dilation != (1, 1)
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
        ):
            return super().forward(x)
        (sh, sw), (ph, pw) = self.stride, self.padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if ho * wo > 4 or ho < 1 or wo < 1:
            return super().forward(x)
        # weight[o, c, i - a*sh + ph, j - b*sw + pw] for output pixel (a, b) and input pixel
        # (i, j); a tap off the kernel lands on padding: zero.
        rows = torch.arange(h)[None, :] - torch.arange(ho)[:, None] * sh + ph  # (ho, h)
        cols = torch.arange(w)[None, :] - torch.arange(wo)[:, None] * sw + pw  # (wo, w)
        r, c = rows[:, None, :, None], cols[None, :, None, :]  # (ho, 1, h, 1), (1, wo, 1, w)
        tap = r * kw + c  # (ho, wo, h, w)
        # (O, kh*kw, C): a view of a channels_last weight, the layout training uses.
        taps = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, kh * kw, -1)
        off = (r < 0) | (r >= kh) | (c < 0) | (c >= kw)
        if off.any():
            taps = nn.functional.pad(taps, (0, 0, 0, 1))  # a last, zero tap
            tap = torch.where(off, kh * kw, tap)
        weight = taps.index_select(1, tap.flatten().to(taps.device))  # (O, ho*wo*h*w, C)
        # Rows ordered (a, b, o), columns (i, j, c): the channels_last layout on both sides.
        weight = weight.view(self.out_channels, ho * wo, -1).transpose(0, 1)
        weight = weight.reshape(ho * wo * self.out_channels, -1)
        out = nn.functional.linear(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1), weight)
        out = out.view(x.shape[0], ho, wo, self.out_channels).permute(0, 3, 1, 2)  # (N, O, ho, wo)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return Conv2d(c_in, c_out, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs and a shortcut (He et al., CVPR 2016, Fig. 2)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, width, 3, stride)
        self.conv2, self.bn2 = _conv_bn(width, width, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, width * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1, 3x3 (strided: "ResNet v1.5", as torchvision), 1x1 x4, shortcut."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, width * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, width * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))  # keys downsample.0 / .1


_RESNET_LAYOUT = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """torchvision's ResNet, parameter for parameter (same names, shapes and initialisation);
    ``resnet10`` is torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])``.

    Written out here because importing torchvision costs ~1.5 s (its ops pull in
    torch._dynamo), paid by every `mocoretrieval` command; tests check it against torchvision.
    ``fc`` is the identity: the output is the pooled (N, C) features.
    """

    def __init__(self, arch: str, small_stem: bool = False) -> None:
        super().__init__()
        block, depths = _RESNET_LAYOUT[arch]
        if small_stem:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (
            nn.Identity() if small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        c_in = 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        for m in self.modules():  # torchvision's initialisation
            # The small stem keeps PyTorch's default init, as the MoCo CIFAR demo, which swaps
            # it into a torchvision ResNet after construction. On the meta device (a model about
            # to receive saved weights) there is nothing to initialise, and normal_ there would
            # import torch._dynamo (~1.5 s).
            if not isinstance(m, nn.Conv2d) or m.weight.is_meta:
                continue
            if not (small_stem and m is self.conv1):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (N, C)


class ResNetBackbone(nn.Module):
    """A ResNet without its classifier: (N, 3, H, W) -> (N, C) pooled features.

    ``small_stem`` swaps the 7x7/2 conv and max-pool for a 3x3/1 conv and no pooling, the usual
    stem for inputs of 64 px or less (as in the MoCo CIFAR demo).
    """

    def __init__(self, arch: str = "resnet50", small_stem: bool = False) -> None:
        super().__init__()
        if arch not in RESNETS:
            raise ValueError(f"unknown ResNet {arch!r}; choose one of {', '.join(RESNETS)}")
        self.net = ResNet(arch, small_stem=small_stem)
        self.num_features = RESNETS[arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, C)


class ViTBackbone(nn.Module):
    """A timm VisionTransformer as configured by MoCo v3: (N, 3, H, W) -> (N, D) cls token."""

    def __init__(self, arch: str = "vit_small", img_size: int = 224, patch_size: int = 16) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if arch not in VITS:
            raise ValueError(f"unknown ViT {arch!r}; choose one of {', '.join(VITS)}")
        cfg = VITS[arch]
        net = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            **cfg,
        )
        grid = img_size // patch_size
        with torch.no_grad():
            net.pos_embed.copy_(sincos_pos_embed_2d(grid, cfg["embed_dim"]))
        net.pos_embed.requires_grad = False  # fixed, not learned (MoCo v3, Sec. 4.3)
        if not net.cls_token.is_meta:  # on meta, saved weights are on their way (see ResNet)
            self._init_like_moco_v3(net, cfg["embed_dim"], patch_size)
        self.net = net
        self.num_features = cfg["embed_dim"]

    @staticmethod
    def _init_like_moco_v3(net: nn.Module, dim: int, patch_size: int) -> None:
        # Xavier-uniform everywhere, qkv split in three for the fan (moco-v3 vits.py), and the
        # patch projection initialised like a linear layer over its 3*P*P inputs.
        for name, m in net.named_modules():
            if isinstance(m, nn.Linear):
                if "qkv" in name:
                    val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -val, val)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(net.cls_token, std=1e-6)
        val = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
        nn.init.uniform_(net.patch_embed.proj.weight, -val, val)
        nn.init.zeros_(net.patch_embed.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, D): cls token after the final norm


def build_backbone(arch: str, img_size: int = 224, small_stem: bool = False) -> nn.Module:
    """Builds the backbone named ``arch`` (one of :data:`ARCHS`) with random weights."""
    if arch in RESNETS:
        return ResNetBackbone(arch, small_stem=small_stem)
    if arch in VITS:
        return ViTBackbone(arch, img_size=img_size)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
