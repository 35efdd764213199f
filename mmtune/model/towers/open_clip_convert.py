"""Export-only: an open_clip ViT as a transformers `CLIPVisionModel` (config + state dict).

Kept out of the tower itself: only `mmtune export` (through `OpenClipTower.to_hf`)
and the tests that check both backends index hidden states alike need it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmtune.errors import MMTuneError
from mmtune.model.towers.base import (
    VisionTower,  # an OpenClipTower (which imports this module lazily)
)


def check_open_clip_convertible(tower: VisionTower) -> None:
    """Name the first feature of this open_clip ViT that a plain `CLIPVisionModel` cannot express."""
    from open_clip.transformer import (
        LayerNorm,
        LayerNormFp32,
        QuickGELU,
        ResidualAttentionBlock,
    )

    v = tower.visual
    where = "open_clip tower"
    if getattr(v, "class_embedding", None) is None:
        raise MMTuneError(f"{where} has no class token; HF CLIPVisionModel always has one")
    if not isinstance(v.ln_pre, nn.LayerNorm):
        raise MMTuneError(f"{where} has no pre-layernorm (no_ln_pre); HF CLIPVisionModel always applies one")
    if v.conv1.bias is not None:
        raise MMTuneError(f"{where} has a patch-embedding bias; HF CLIPVisionModel's patch embedding has none")
    if v.grid_size[0] != v.grid_size[1] or v.patch_size[0] != v.patch_size[1]:
        raise MMTuneError(f"{where} has a non-square grid or patch; HF CLIPVisionModel needs square ones")
    norms = [v.ln_pre]
    acts = set()
    for i, blk in enumerate(v.transformer.resblocks):
        here = f"{where} block {i}"
        if type(blk) is not ResidualAttentionBlock:
            raise MMTuneError(
                f"{here} is a {type(blk).__name__} (qk-norm / scaled-cosine / extra-norm attention); "
                "only plain ResidualAttentionBlock ViTs convert to HF CLIPVisionModel"
            )
        if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
            raise MMTuneError(f"{here} uses LayerScale, which HF CLIPVisionModel does not have")
        if hasattr(blk, "ln_1_kv"):
            raise MMTuneError(f"{here} is a cross-attention block")
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None or attn.in_proj_bias is None:
            raise MMTuneError(f"{here}: attention is not a biased nn.MultiheadAttention with packed q/k/v")
        if list(dict(blk.mlp.named_children())) != ["c_fc", "gelu", "c_proj"]:
            raise MMTuneError(f"{here}: MLP is not c_fc -> act -> c_proj")
        act = blk.mlp.gelu
        if isinstance(act, QuickGELU):
            acts.add("quick_gelu")
        elif isinstance(act, nn.GELU) and act.approximate == "none":
            acts.add("gelu")
        else:
            raise MMTuneError(f"{here}: activation {act!r} has no HF CLIP equivalent (gelu or quick_gelu)")
        norms += [blk.ln_1, blk.ln_2]
    if len(acts) > 1:
        raise MMTuneError(f"{where} mixes activations {sorted(acts)} across blocks")
    for norm in norms:
        if not isinstance(norm, LayerNorm | LayerNormFp32 | nn.LayerNorm) or not norm.elementwise_affine:
            raise MMTuneError(f"{where}: norm {type(norm).__name__} is not an affine LayerNorm")
    if len({n.eps for n in norms}) != 1:
        raise MMTuneError(f"{where}: its LayerNorms use different eps; HF CLIP has one layer_norm_eps")


def open_clip_to_hf_clip(tower: VisionTower) -> tuple[Any, dict[str, torch.Tensor]]:
    """A `CLIPVisionConfig` and `CLIPVisionModel` state dict holding the same ViT.

    Covers the plain open_clip ViT (learnable positions, CLS pooling, no
    layer scale / qk-norm / patch-embedding bias); anything else raises.
    Used for HF export and to check the two backends' hidden-state indexing.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    check_open_clip_convertible(tower)
    v = tower.visual
    blk0 = v.transformer.resblocks[0]
    act = blk0.mlp.gelu
    hidden_act = "quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu"
    width = tower.hidden_size
    conf = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=blk0.mlp.c_fc.out_features,
        num_hidden_layers=tower.num_layers,
        num_attention_heads=blk0.attn.num_heads,
        image_size=v.image_size[0],
        patch_size=v.patch_size[0],
        hidden_act=hidden_act,
        layer_norm_eps=v.ln_pre.eps,
        projection_dim=v.output_dim,
    )
    sd: dict[str, torch.Tensor] = {
        "embeddings.class_embedding": v.class_embedding,
        "embeddings.patch_embedding.weight": v.conv1.weight,
        "embeddings.position_embedding.weight": v.positional_embedding,
        "pre_layrnorm.weight": v.ln_pre.weight,
        "pre_layrnorm.bias": v.ln_pre.bias,
        "post_layernorm.weight": v.ln_post.weight,
        "post_layernorm.bias": v.ln_post.bias,
    }
    for i, blk in enumerate(v.transformer.resblocks):
        p = f"encoder.layers.{i}."
        q, k, val = blk.attn.in_proj_weight.chunk(3, dim=0)
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3, dim=0)
        sd.update(
            {
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.q_proj.bias": qb,
                p + "self_attn.k_proj.weight": k,
                p + "self_attn.k_proj.bias": kb,
                p + "self_attn.v_proj.weight": val,
                p + "self_attn.v_proj.bias": vb,
                p + "self_attn.out_proj.weight": blk.attn.out_proj.weight,
                p + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
                p + "layer_norm1.weight": blk.ln_1.weight,
                p + "layer_norm1.bias": blk.ln_1.bias,
                p + "layer_norm2.weight": blk.ln_2.weight,
                p + "layer_norm2.bias": blk.ln_2.bias,
                p + "mlp.fc1.weight": blk.mlp.c_fc.weight,
                p + "mlp.fc1.bias": blk.mlp.c_fc.bias,
                p + "mlp.fc2.weight": blk.mlp.c_proj.weight,
                p + "mlp.fc2.bias": blk.mlp.c_proj.bias,
            }
        )
    sd = {k: t.detach().clone().contiguous() for k, t in sd.items()}
    # Name the keys as this transformers version's CLIPVisionModel does (some nest them under vision_model.).
    with torch.device("meta"):
        expected = set(CLIPVisionModel(conf).state_dict())
    if not set(sd) <= expected:
        sd = {f"vision_model.{k}": t for k, t in sd.items()}
    return conf, sd
