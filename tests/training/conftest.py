"""Training tests run single-threaded: on a shared CPU box, intra-op threads that spin-wait on
each other are many times slower than one thread (measured 10x on 2 busy cores)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
