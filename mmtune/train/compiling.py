"""`train.compile`: torch.compile each transformer block of the model, in place.

Contract:
- `compile_blocks(model)` compiles every LM decoder layer and every vision-tower
  block (the same blocks `mmtune.train.sharding.wrap_plan` makes FSDP units of)
  with `nn.Module.compile`, and returns how many it compiled. The module tree,
  parameter names and state dict are unchanged, so checkpoints, resume, FSDP
  and export see the same model; only the blocks' forward is replaced by a
  compiled one (fused norms, activations and rotary embeddings).
- Call it after gradient checkpointing is enabled and before `shard_model`
  (per-block compile under FSDP2, as torchtitan does); a whole-model compile
  would recompile on every new batch shape, block compile only per sequence length
  (`dynamic=None`: torch marks a dimension dynamic after it first changes).
- `BACKEND` is torch's default (inductor); tests swap it for `aot_eager`, which
  traces the same graphs without generating kernels.
"""

from __future__ import annotations

from torch import nn

BACKEND = "inductor"


def compile_blocks(model: nn.Module) -> int:
    """Compile each LM decoder layer and vision block of `model` in place; the number compiled."""
    from mmtune.train.sharding import wrap_plan

    blocks = [module for what, module in wrap_plan(model) if what.startswith(("lm layer", "vision block"))]
    for block in blocks:
        block.compile(backend=BACKEND)
    return len(blocks)
