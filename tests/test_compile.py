"""`train.compile`: each LM decoder layer and vision block is compiled in place, and training computes the same.

The compile backend is swapped for `aot_eager` (dynamo + AOT autograd, no kernel
generation) so the test stays fast on CPU; the GPU benchmark
(`scripts/bench_train_throughput.py --gpu --compile`) uses inductor.
"""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny, make_batch, mixed_records

from mmtune.train import compiling

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_train_like_the_plain_model(monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    plain, _ = build_tiny("tiny_mllm")
    compiled, _ = build_tiny("tiny_mllm")
    for bundle in (plain, compiled):
        bundle.model.set_trainable("instruct", True)
        bundle.model.gradient_checkpointing_enable()
        bundle.model.train()
    batch, _ = make_batch(plain, mixed_records())
    want_loss, want_grads = _loss_and_grads(plain.model, batch)

    keys_before = list(compiled.model.state_dict())
    n = compiling.compile_blocks(compiled.model)
    lm_layers = compiled.model.base_lm().config.num_hidden_layers
    assert n > lm_layers  # every LM decoder layer, and the tower's blocks
    assert list(compiled.model.state_dict()) == keys_before  # checkpoints and export see the same names
    torch._dynamo.reset()
    got_loss, got_grads = _loss_and_grads(compiled.model, batch)
    assert got_loss == pytest.approx(want_loss, abs=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, atol=1e-5), name
    # the compiled forward really ran: dynamo counted frames it compiled
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] > 0
