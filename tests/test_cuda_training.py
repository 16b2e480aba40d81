"""Training on a GPU: a whole training step (forward with labels, loss with the router's aux loss,
backward) runs without a host sync, so nothing stalls the CUDA stream between steps. Runs only where
CUDA is present."""
from __future__ import annotations

import pytest
import torch

from models import ids, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_step_does_no_host_sync():
    model = tiny_model(dtype=torch.float32).cuda()
    x = ids(3, 70).cuda()
    mask = torch.ones_like(x)
    mask[1, :9] = 0
    model(x, attention_mask=mask, labels=x).loss.backward()  # first call: lazy init, autotune
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(x, attention_mask=mask, labels=x)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item() and out.aux_loss.item() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
