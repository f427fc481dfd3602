"""The processes of the concurrency stress test: one writer running `mocoretrieval index`
round after round, and readers that keep one index open and search it, as `serve` does."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path


def writer(root: str, models: list[str], rounds: int, seed: int, out: str) -> None:
    """Each round adds and deletes a file, then re-indexes: every other round with
    ``--rebuild`` and the other model, else a plain update. Writes the exit codes to ``out``."""
    from factories import make_images

    from mocoretrieval.cli import main

    rng = random.Random(seed)
    codes = []
    for r in range(rounds):
        make_images(Path(root) / f"round{r}", 1, seed=100 + r)
        present = sorted(p for p in Path(root).rglob("img_*") if ".mocoretrieval" not in p.parts)
        if len(present) > 4:
            rng.choice(present).unlink()
        args = ["index", root, "--backend", "torch", "--device", "cpu", "--workers", "0", "-q"]
        if r % 2 == 0:
            args += ["--rebuild", "--model", models[(r // 2 + 1) % 2]]
        codes.append(main(args))
    Path(out).write_text(json.dumps({"codes": codes, "last_model": _last(models, rounds)}))


def _last(models: list[str], rounds: int) -> str:
    last_rebuild = max(r for r in range(rounds) if r % 2 == 0)
    return models[(last_rebuild // 2 + 1) % 2]


def reader(root: str, query: str, stop: str, out: str, seed: int) -> None:
    """Searches one long-lived index until ``stop`` exists, then once more; writes how many
    rounds it made and every error it met to ``out``."""
    import numpy as np

    from mocoretrieval.index import ImageIndex

    rng = np.random.default_rng(seed)
    errors: list[str] = []
    rounds = 0
    index = ImageIndex.open(root)
    last = False
    while True:
        last = os.path.exists(stop)
        try:
            index.search(query, k=3)
            index.search(rng.standard_normal(index.dim).astype(np.float32), k=3)
            len(index)
            index.info()
        except Exception as e:  # noqa: BLE001 - every error is a failure the test reports
            errors.append(f"{type(e).__name__}: {e}")
        rounds += 1
        if last:
            break
        time.sleep(0.05)
    index.close()
    Path(out).write_text(json.dumps({"rounds": rounds, "errors": errors}))
