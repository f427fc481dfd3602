"""Backbones: the ResNets match torchvision's, and loading a saved encoder stays light."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torchvision

from mocoretrieval.backbones import ResNetBackbone


def torchvision_resnet(arch: str, small_stem: bool) -> torch.nn.Module:
    net = getattr(torchvision.models, arch)(weights=None)
    if small_stem:
        net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    return net


@pytest.mark.parametrize(
    ("arch", "small_stem"), [("resnet18", True), ("resnet34", False), ("resnet50", False)]
)
def test_resnet_is_torchvisions_parameter_for_parameter(arch, small_stem):
    ours = ResNetBackbone(arch, small_stem=small_stem).net.eval()
    ref = torchvision_resnet(arch, small_stem).eval()
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


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
