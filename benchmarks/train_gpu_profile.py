"""Where a MoCo v2 training step's time goes on one device (a GPU, or a CPU with small
settings), in one run:

1. the losses' precision under bf16 autocast: the dtype of every einsum inside them and their
   distance to a float64 reference (they must stay float32 whatever the autocast);
2. step times of ``train_gpu.py``'s v2 recipe and of variants (no augmentation; one BN group,
   i.e. no shuffle-BN), median over ``--steps`` steps after 5;
3. a profile of 3 steps: the operators and kernels with the most device time.

    python benchmarks/train_gpu_profile.py --batch-size 512      # on the GPU machine

Prints only (no RESULTS.md section: quote what it prints with its command).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_gpu import recipe, sync

from training.augment import BatchAugment
from training.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from training.losses import info_nce_batch, info_nce_queue
from training.moco import build_moco
from training.optim import build_optimizer
from training.pretrain import train_step


def loss_precision(device: torch.device) -> bool:
    """Prints the losses' einsum dtypes under bf16 autocast and their float64 distance."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(256, 128, generator=g), dim=1)
    k = F.normalize(q + 0.3 * torch.randn(256, 128, generator=g), dim=1)
    queue = F.normalize(torch.randn(128, 65536, generator=g), dim=0)
    T = 0.07
    logits = torch.cat(
        [(q.double() * k.double()).sum(1, keepdim=True), q.double() @ queue.double()], 1
    )
    ref_queue = F.cross_entropy(logits / T, torch.zeros(256, dtype=torch.long)).item()
    ref_batch = 2 * F.cross_entropy(q.double() @ k.double().T, torch.arange(256)).item()
    seen, einsum = [], torch.einsum

    def recording(*args, **kwargs):
        out = einsum(*args, **kwargs)
        seen.append(out.dtype)
        return out

    qd, kd, queued = q.to(device), k.to(device), queue.to(device)
    torch.einsum = recording
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got_queue = info_nce_queue(qd, kd, queued, T).item()
            got_batch = info_nce_batch(qd, kd, 1.0).item()
            bare = torch.einsum("nc,ck->nk", qd, queued).dtype
    finally:
        torch.einsum = einsum
    inside = seen[:-1]
    print(
        f"losses under {device.type} bf16 autocast: einsum dtypes {inside}; a bare einsum: {bare}"
    )
    print(
        f"info_nce_queue {got_queue:.6f} vs float64 {ref_queue:.6f} ({abs(got_queue - ref_queue):.1e})"
    )
    print(
        f"info_nce_batch {got_batch:.6f} vs float64 {ref_batch:.6f} ({abs(got_batch - ref_batch):.1e})"
    )
    return (
        all(d == torch.float32 for d in inside)
        and max(abs(got_queue - ref_queue), abs(got_batch - ref_batch)) < 1e-3
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device, batch = torch.device(args.device), args.batch_size
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    print(torch.cuda.get_device_name(device) if cuda else "CPU", torch.__version__)
    ok = loss_precision(device)
    images = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, device=device)

    def build(**overrides):
        cfg = recipe("v2", batch, 10)
        for name, value in overrides.items():
            setattr(cfg, name, value)
        model = build_moco(cfg).to(device).to(memory_format=torch.channels_last)
        opt = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        augs = [BatchAugment(cfg, v, FASHION_MNIST_MEAN, FASHION_MNIST_STD) for v in (0, 1)]
        fixed = (augs[0](images), augs[1](images))

        def step(augment: bool = True):
            x1, x2 = (augs[0](images), augs[1](images)) if augment else fixed
            return train_step(model, opt, x1, x2, 0.1, 0.99, "bf16", True)

        return step

    def seconds(step, **kw) -> float:
        for _ in range(5):
            step(**kw)
        times = []
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            step(**kw)
            sync(device)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    recipe_step = build()
    for name, step, kw in [
        ("recipe (8 shuffle-BN groups), augmentation included", recipe_step, {}),
        ("the same without the augmentation", recipe_step, {"augment": False}),
        ("1 BN group (no shuffle-BN)", build(shuffle_bn_groups=1), {}),
    ]:
        s = seconds(step, **kw)
        print(f"{name}: {s * 1e3:.1f} ms/step, {batch / s:,.0f} images/s", flush=True)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            recipe_step()
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 3 / 1e3
        print(f"per step: {len(kernels) / 3:.0f} kernels, {busy:.1f} ms of GPU time")
    print("losses stay float32:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
