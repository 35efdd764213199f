"""MMTuneModel: an optional vision tower and projector in front of a causal LM.

LLM mode is the LM alone. MLLM mode (LLaVA-style) embeds the token ids, then
writes each image's projected features over that image's run of `<image>`
tokens (tokenization already expanded every placeholder into
`num_image_tokens` copies and set their labels to -100), and runs the LM on
the embeddings. Images fill the runs in reading order: row 0 left to right,
then row 1, ..., which is the order `collate_examples` stacks them in.

The LM stays a plain transformers causal LM (peft-wrapped under LoRA), the
projector mirrors `LlavaMultiModalProjector`, so export to Hugging Face
formats is a renaming of weights.

Distributed training note: when a batch has no image and the tower or
projector is trainable, `forward` adds 0 x (sum of those trainable
parameters) to the loss. The result is unchanged and their gradients are
exactly zero, but every rank's backward now touches the same parameters, so
DDP's gradient all-reduce does not wait forever for a rank whose batch was
text-only. No dummy image is ever run through the model.

Under FSDP (`mmtune.train.sharding`) parameters are sharded and every process
must run every tower/projector unit's forward (each one all-gathers), so with
`run_tower_on_text_batches` set a text-only batch runs the tower and projector
on an EMPTY image batch (0 images) and adds 0 x the (empty) result's sum:
the same zero contribution, collectives matched, still no dummy image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmtune.config import ModelConfig
from mmtune.errors import MMTuneError
from mmtune.model.projector import Projector
from mmtune.model.towers import VisionTower

STAGES = ("align", "instruct")


def is_peft(module: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, PeftModel)


class MMTuneModel(nn.Module):
    """Vision tower (or None) + projector (or None) + causal LM."""

    def __init__(
        self,
        lm: nn.Module,
        *,
        config: ModelConfig,
        image_token_id: int,
        vision: VisionTower | None = None,
        projector: Projector | None = None,
        owned_parts: set[str] | None = None,
    ) -> None:
        super().__init__()
        if (vision is None) != (projector is None):
            raise ValueError("vision and projector come together (mllm) or not at all (llm)")
        self.vision = vision
        self.projector = projector
        self.lm = lm
        self.config = config
        self.image_token_id = int(image_token_id)
        # Parts whose weights cannot be rebuilt from the config alone (random
        # init, trained, or loaded from a checkpoint): `save_model` writes these.
        self.owned_parts: set[str] = set(owned_parts or ())
        if projector is not None:
            self.owned_parts.add("projector")
        # Set by FSDP sharding (see module docstring).
        self.run_tower_on_text_batches = False

    # ------------------------------------------------------------------ info
    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens if self.vision is not None else 0

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def has_lora(self) -> bool:
        return is_peft(self.lm)

    def base_lm(self) -> nn.Module:
        """The transformers model under any peft wrapper."""
        return self.lm.get_base_model() if self.has_lora else self.lm

    # -------------------------------------------------------------- embedding
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, lm hidden]."""
        if self.vision is None or self.projector is None:
            raise MMTuneError("this model has no vision tower (mode llm) but the batch has pixel_values")
        return self.projector(self.vision(pixel_values))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written over the image-token runs."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        if self.vision is None:
            if pixel_values is not None:
                raise MMTuneError("this model has no vision tower (mode llm) but the batch has pixel_values")
            return embeds
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        if pixel_values is None:
            if n_slots:
                raise MMTuneError(f"batch has {n_slots} image token(s) but no pixel_values")
            return embeds
        feats = self.encode_images(pixel_values)
        if n_slots != feats.shape[0] * feats.shape[1]:
            raise MMTuneError(
                f"batch has {n_slots} image token(s) but {feats.shape[0]} image(s) x {feats.shape[1]} "
                "tokens each; were the records tokenized with this model's num_image_tokens?"
            )
        # Boolean-mask order is row-major, i.e. reading order, like the stacked images.
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype))

    def _zero_participation(self) -> torch.Tensor | None:
        """0 x sum of the tower's and projector's trainable parameters (see module docstring)."""
        params = [
            p
            for part in (self.vision, self.projector)
            if part is not None
            for p in part.parameters()
            if p.requires_grad
        ]
        if not params:
            return None
        return sum(p.sum() for p in params) * 0.0

    def _empty_image_participation(self) -> torch.Tensor | None:
        """Tower + projector on 0 images (FSDP: every unit's forward runs on every process); sums to 0."""
        if self.vision is None or self.projector is None:
            return None
        size = tower_image_size(self.vision)
        empty = torch.zeros(0, 3, *size, device=self.device)
        return self.encode_images(empty).sum() * 0.0

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits and (with labels) the mean CE over labels != -100, shifted as transformers does."""
        zero = None
        if pixel_values is None and self.run_tower_on_text_batches and self.vision is not None:
            # Before the LM, where an image batch runs the tower: the same collectives in the same order.
            zero = self._empty_image_participation()
        embeds = self.embed_inputs(input_ids, pixel_values)
        kwargs.setdefault("use_cache", False)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            labels=labels,
            position_ids=position_ids,
            **kwargs,
        )
        if out.loss is not None and pixel_values is None and torch.is_grad_enabled():
            if zero is None:
                zero = self._zero_participation()
            if zero is not None:
                out.loss = out.loss + zero.to(out.loss.dtype)
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """New token ids only, [B, <= max_new_tokens], KV-cached, for LEFT-padded prompts.

        Rows that finish early are filled with `pad_token_id`.
        """
        from transformers import GenerationConfig

        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise MMTuneError("generate needs left-padded prompts (a row ends with padding)")
        embeds = self.embed_inputs(input_ids, pixel_values)
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=None,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=True,
        )
        # With inputs_embeds and no input_ids, transformers returns only the new tokens.
        return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, generation_config=gen)

    # ------------------------------------------------------------- training
    def set_trainable(self, stage: str, unfreeze_vision: bool | None = False, unfreeze_lm: bool = False) -> None:
        """Freeze everything, then unfreeze what `stage` trains.

        align: the projector only, plus the LM when `unfreeze_lm` (ShareGPT4V's
        stage 1). instruct: projector + LM. The LM trains as its LoRA adapter
        only when LoRA is applied. The tower's feature-producing layers are
        trained in instruct when `unfreeze_vision` or `model.vision.freeze: false`.
        """
        if stage not in STAGES:
            raise MMTuneError(f"train.stage must be one of {', '.join(STAGES)}, got {stage!r}")
        unfreeze = bool(unfreeze_vision) or (self.vision is not None and not self.config.vision.freeze)
        if stage == "align":
            if self.projector is None:
                raise MMTuneError(
                    "train.stage 'align' trains the projector, but model.mode is 'llm' (use stage instruct)"
                )
            if unfreeze:
                raise MMTuneError(
                    "stage 'align' trains the projector only; unfreeze the vision tower in stage instruct"
                )
        if unfreeze and self.vision is None:
            raise MMTuneError("train.unfreeze_vision is set but model.mode is 'llm' (no vision tower)")
        for p in self.parameters():
            p.requires_grad_(False)
        if self.projector is not None:
            for p in self.projector.parameters():
                p.requires_grad_(True)
        if stage == "instruct" or unfreeze_lm:
            if self.has_lora:
                for name, p in self.lm.named_parameters():
                    if "lora_" in name:
                        p.requires_grad_(True)
                self.owned_parts.add("adapter")
            else:
                for p in self.lm.parameters():
                    p.requires_grad_(True)
                self.owned_parts.add("lm")
        if stage == "instruct" and unfreeze:
            for _, p in self.vision.feature_parameters():
                p.requires_grad_(True)
            self.owned_parts.add("vision")
        self.train(self.training)

    def train(self, mode: bool = True) -> MMTuneModel:
        """Like nn.Module.train, but a frozen tower stays in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        if self.vision is not None and not any(p.requires_grad for p in self.vision.parameters()):
            self.vision.eval()
        return self

    def trainable_summary(self) -> str:
        """One line per part: trainable / total parameters."""
        rows = []
        parts: list[tuple[str, nn.Module | None]] = [
            ("vision", self.vision),
            ("projector", self.projector),
            ("lm" + (" (lora)" if self.has_lora else ""), self.lm),
        ]
        total_t = total_n = 0
        for name, mod in parts:
            if mod is None:
                continue
            n = sum(p.numel() for p in mod.parameters())
            t = sum(p.numel() for p in mod.parameters() if p.requires_grad)
            total_t, total_n = total_t + t, total_n + n
            rows.append(f"  {name:<12} {t:>14,} / {n:>14,} trainable ({100.0 * t / max(n, 1):.2f}%)")
        rows.append(
            f"  {'total':<12} {total_t:>14,} / {total_n:>14,} trainable ({100.0 * total_t / max(total_n, 1):.2f}%)"
        )
        return "\n".join(rows)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute LM activations in backward (non-reentrant, so frozen inputs are fine)."""
        lm = self.base_lm()
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        lm = self.base_lm()
        if hasattr(lm, "activation_checkpointing_disable"):
            lm.activation_checkpointing_disable()
        else:
            lm.gradient_checkpointing_disable()

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the LM recomputes activations in backward."""
        lm = self.base_lm()
        if hasattr(lm, "is_activation_checkpointing"):
            return bool(lm.is_activation_checkpointing)
        return bool(lm.is_gradient_checkpointing)


def tower_image_size(tower: nn.Module) -> tuple[int, int]:
    """(H, W) the tower expects: open_clip's `visual.image_size`, or an HF vision config's `image_size`."""
    visual = getattr(tower, "visual", None)
    size = getattr(visual, "image_size", None) if visual is not None else None
    if size is None:
        size = getattr(getattr(getattr(tower, "model", None), "config", None), "image_size", None)
    if size is None:
        raise MMTuneError(f"cannot tell the image size {type(tower).__name__} expects")
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
