"""Backbones: the ResNets match torchvision's (tiny maps as matrix products included), and
loading a saved encoder stays light."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torchvision

from mocoretrieval.backbones import Conv2d, ResNetBackbone


def torchvision_resnet(arch: str, small_stem: bool) -> torch.nn.Module:
    if arch == "resnet10":  # not among torchvision's named models: its ResNet with one block each
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    else:
        net = getattr(torchvision.models, arch)(weights=None)
    if small_stem:
        net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    return net


@pytest.mark.parametrize(
    ("arch", "small_stem"),
    [("resnet10", False), ("resnet18", True), ("resnet34", False), ("resnet50", False)],
)
def test_resnet_is_torchvisions_parameter_for_parameter(arch, small_stem):
    ours = ResNetBackbone(arch, small_stem=small_stem).net.eval()
    ref = torchvision_resnet(arch, small_stem).eval()
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    for size in (64, 32):  # 32 px: the last stages' tiny maps take Conv2d's matrix product
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-3, atol=1e-4)


def test_resnet_initialisation_is_torchvisions():
    torch.manual_seed(0)
    net = ResNetBackbone("resnet50").net
    w = net.layer3[0].conv2.weight  # fan_out = 256 * 3 * 3
    assert math.isclose(w.std().item(), math.sqrt(2 / (256 * 9)), rel_tol=0.02)
    assert torch.all(net.layer3[0].bn2.weight == 1) and torch.all(net.layer3[0].bn2.bias == 0)


def test_loading_a_saved_resnet_imports_neither_torchvision_nor_dynamo(tiny_encoder_dir):
    # torchvision (through its ops) and torch._dynamo cost ~1.5 s each at every command's start.
    code = (
        "import sys\n"
        "from mocoretrieval import MoCoEncoder\n"
        "import mocoretrieval.cli, mocoretrieval.index, mocoretrieval.onnx_backend\n"
        f"e = MoCoEncoder.from_pretrained({str(tiny_encoder_dir)!r})\n"
        "assert not any(p.is_meta for p in e.parameters())\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torchvision', 'torch._dynamo'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _refuse_plain_conv(monkeypatch) -> list[tuple[int, ...]]:
    """Makes nn.Conv2d's own convolution record its input shape and, on a map no larger than
    the kernel, fail: the convs that must take Conv2d's matrix product."""
    seen = []
    plain = torch.nn.Conv2d._conv_forward

    def conv_forward(self, x, weight, bias):
        seen.append(tuple(x.shape))
        if x.shape[-2] * x.shape[-1] <= weight.shape[-2] * weight.shape[-1]:
            raise AssertionError(f"plain conv over a {tuple(x.shape[-2:])} map")
        return plain(self, x, weight, bias)

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", conv_forward)
    return seen


@pytest.mark.parametrize(
    ("k", "stride", "hw"),
    [
        (3, 1, (1, 1)),  # layer4 of a ResNet at 32 px: only the centre tap meets the input
        (3, 2, (2, 2)),  # layer4's strided first conv at 32 px
        (3, 1, (2, 2)),  # layer3 at 32 px: every tap meets some output pixel
        (3, 2, (3, 3)),  # layer4's strided conv at 48 px: some taps land on padding only
        (3, 1, (1, 2)),
        (3, 2, (3, 2)),
        (1, 2, (1, 1)),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_map_conv_is_the_conv_in_value_and_gradient(
    monkeypatch, k, stride, hw, channels_last
):
    """Breaking it, tried: with the output pixel's term dropped from the tap index (``rows =
    arange(h) + ph``), every case with more than one output pixel fails (and torchvision's
    ResNet-34/50 at 32 px above); with the matrix-product branch removed, every case fails on
    the refusing ``_conv_forward``."""
    torch.manual_seed(0)
    conv = Conv2d(5, 4, k, stride, padding=k // 2, bias=True).double()
    x = torch.randn(3, 5, *hw, dtype=torch.float64, requires_grad=True)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride, k // 2)
    _refuse_plain_conv(monkeypatch)
    out = conv(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out * g).sum(), (x, conv.weight, conv.bias))
    ref_grads = torch.autograd.grad((ref * g).sum(), (x, conv.weight, conv.bias))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_resnet18_at_32px_convolves_only_maps_larger_than_the_kernel(monkeypatch):
    net = ResNetBackbone("resnet18").eval()
    seen = _refuse_plain_conv(monkeypatch)
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    # 20 convs: layer3's three 3x3 convs on 2x2 maps and layer4's four 3x3 convs (on 2x2 and
    # 1x1 maps) are matrix products; the strided 1x1 shortcuts and larger maps are convs.
    assert len(seen) == 13


def test_a_traced_small_map_conv_holds_at_every_size():
    conv = Conv2d(4, 6, 3, 1, padding=1, bias=False).eval()
    traced = torch.jit.trace(conv, torch.randn(2, 4, 1, 1))
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(traced(x), conv(x))
