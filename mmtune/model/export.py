"""Export a checkpoint to Hugging Face formats that load with no mmtune installed.

    mmtune export runs/tiny_mllm --format hf-llava --out exported/tiny_llava
    mmtune export runs/tiny_llm  --format hf       --out exported/tiny_llm

`hf-llava` (MLLM checkpoints) writes a `LlavaForConditionalGeneration` folder:
weights (LoRA merged first), `config.json`, `generation_config.json`, the
tokenizer, a `LlavaImageProcessor` with the tower's size/mean/std and
LLaVA's pad-to-square (`do_pad`), and a `LlavaProcessor` whose chat template
renders exactly the prompt mmtune trained with and which expands `<image>`
into the same number of image tokens. `hf` (LLM checkpoints) writes the
(merged) causal LM with its tokenizer and chat template.

Weights are mapped onto the transformers model *in memory* and written with
its own `save_pretrained`, so the on-disk names are whatever this transformers
version writes. Nothing is trusted blindly: before the output folder appears
the export reloads it with `from_pretrained(..., output_loading_info=True)`
and fails (MMTuneError) on any missing, unexpected or mismatched weight, on a
reloaded tensor that differs from the exported one (per-tensor hashes), on a
processor that expands `<image>` differently, or on a chat template that
renders differently from mmtune's. Open_clip towers are converted to a
`CLIPVisionModel` and the conversion is checked numerically on an image.
Output is written to a temp folder next to `--out` and renamed into place.
"""

from __future__ import annotations

import copy
import gc
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtune.data.schema import IMAGE_PLACEHOLDER
from mmtune.data.templates import Template, get_template
from mmtune.errors import MMTuneError
from mmtune.fileio import atomic_dir
from mmtune.model.build import ModelBundle, resolve_dtype
from mmtune.model.mllm import MMTuneModel
from mmtune.model.towers import VisionTower
from mmtune.outputs import Out, check_outputs
from mmtune.runs import (
    RUN_CONFIG_FILE,
    resolve_model_folder,
    trained_template,
)

FORMATS = ("hf-llava", "hf")
EXPORT_INFO_FILE = "mmtune_export.json"

# The LLaVA chat templates take message contents as a list of parts
# ({"type": "image"} / {"type": "text", "text": ...}), the way processors are
# called. mmtune's templates render string contents in which "<image>\n" stands
# for each image (that is how mmtune trains and how `mmtune generate` prompts),
# so this prelude turns every list content into that string first; string
# contents pass through unchanged. Jinja scoping needs the namespace objects.
CONTENT_PRELUDE = (
    "{%- set mmtune_ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- set mmtune_part = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set mmtune_part.text = message['content'] -%}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set mmtune_part.text = mmtune_part.text + '"
    + IMAGE_PLACEHOLDER
    + "\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set mmtune_part.text = mmtune_part.text + item['text'] -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- set mmtune_ns.messages = mmtune_ns.messages + [{'role': message['role'], 'content': mmtune_part.text}] -%}"
    "{%- endfor -%}"
    "{%- set messages = mmtune_ns.messages -%}"
)

PROBE_PROMPT = "Describe the picture in one word."


class ExportError(MMTuneError):
    """A checkpoint that cannot be exported to the asked format (one-line message)."""


@dataclass
class ExportResult:
    """What `export_checkpoint` wrote."""

    out: Path
    format: str
    template: str
    num_parameters: int
    files: list[str] = field(default_factory=list)
    # The image-processor backend that reproduces mmtune's pixels exactly (hf-llava only).
    image_backend: str | None = None


# --------------------------------------------------------------------------- #
# Chat template
# --------------------------------------------------------------------------- #


def export_chat_template(template: Template) -> str:
    """The Jinja chat template of `template`, accepting list-of-parts contents too."""
    return CONTENT_PRELUDE + template.chat_template()


def probe_messages(with_image: bool, prompt: str = PROBE_PROMPT) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """One user turn as a processor takes it (list of parts) and as mmtune renders it (string)."""
    parts: list[dict[str, str]] = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    text = (f"{IMAGE_PLACEHOLDER}\n" if with_image else "") + prompt
    return [{"role": "user", "content": parts}], [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- #
# Vision tower -> transformers vision model
# --------------------------------------------------------------------------- #


@torch.no_grad()
def _check_tower_conversion(tower: VisionTower, hf_model: nn.Module) -> None:
    """Run both towers (float32 copies) on a random image; the selected hidden state must agree."""
    size = int(hf_model.config.image_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen)
    ours = copy.deepcopy(tower).float().eval().to("cpu")
    theirs = hf_model.float().eval().to("cpu")
    a = ours.hidden_states(x, upto=ours.layer_index)[ours.layer_index]
    b = theirs(pixel_values=x, output_hidden_states=True).hidden_states[tower.feature_layer]
    err = float((a - b).abs().max())
    scale = max(float(a.abs().max()), 1.0)
    if not err <= 1e-4 * scale:
        raise ExportError(
            f"converted vision tower does not reproduce the open_clip features (max abs diff {err:.3g}); "
            "this open_clip ViT variant has no exact HF CLIPVisionModel equivalent"
        )


def hf_vision(tower: VisionTower, *, check: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """The tower as a transformers vision config + that model's state dict (tensors shared, not copied).

    The tower says what it is in transformers terms (`to_hf`); a tower whose weights are
    converted (open_clip -> `CLIPVisionModel`) is checked structurally and, with `check`, numerically.
    """
    try:
        conf, state = tower.to_hf()
    except MMTuneError as exc:
        raise ExportError(str(exc)) from None
    if check and tower.converted_for_hf:
        hf_model = tower.hf_model_class()(conf)
        _load_exact(hf_model, {k: v.float() for k, v in state.items()}, what="converted vision tower")
        _check_tower_conversion(tower, hf_model)
        del hf_model
    return conf, state


def hf_feature_layer(tower: VisionTower) -> int:
    """`feature_layer` as a negative hidden-state index (same state; both index hidden states alike).

    Negative because transformers' LLaVA passes the index on as `output_hidden_states`,
    and index 0 (the embedding output) would read as False there and capture nothing.
    """
    return tower.layer_index - (tower.num_layers + 1)


def hf_select_strategy(tower: VisionTower) -> str:
    """mmtune's select_strategy as LLaVA's: 'default' drops the first (CLS) token, 'full' keeps all."""
    return "default" if (tower.has_cls and tower.select_strategy == "patch") else "full"


# --------------------------------------------------------------------------- #
# LLaVA config and weights
# --------------------------------------------------------------------------- #


def _plain_lm(model: MMTuneModel) -> nn.Module:
    if model.has_lora:
        raise ExportError("merge the LoRA adapter first (mmtune.model.merge_lora)")
    return model.lm


def llava_config(bundle: ModelBundle, *, check: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """A `LlavaConfig` equivalent to `bundle`'s model, and the state dict of
    `LlavaForConditionalGeneration` holding its weights (shared tensors, in-memory names).

    Raises ExportError for what HF LLaVA cannot express (text-only model, linear
    projector, a tower with no HF equivalent).
    """
    from transformers import LlavaConfig

    model = bundle.model
    if model.vision is None or model.projector is None:
        raise ExportError("format hf-llava needs an MLLM checkpoint (model.mode mllm); use --format hf for an LLM")
    if model.projector.kind != "mlp2x_gelu":
        raise ExportError(
            f"projector type {model.projector.kind!r} cannot be exported: transformers' LLaVA projector is always "
            "linear_1 -> GELU -> linear_2 (mmtune's mlp2x_gelu); train with model.projector.type: mlp2x_gelu"
        )
    if not isinstance(model.projector.act, nn.GELU) or model.projector.act.approximate != "none":
        raise ExportError(f"projector activation {model.projector.act!r} is not exact GELU")
    tower = model.vision
    vision_config, vision_state = hf_vision(tower, check=check)
    lm = _plain_lm(model)
    text_config = copy.deepcopy(lm.config.get_text_config())
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=hf_select_strategy(tower),
        vision_feature_layer=hf_feature_layer(tower),
        multimodal_projector_bias=True,
    )
    state: dict[str, torch.Tensor] = {f"model.vision_tower.{k}": v for k, v in vision_state.items()}
    state.update({f"model.multi_modal_projector.{k}": v for k, v in model.projector.state_dict().items()})
    prefix = lm.base_model_prefix + "."
    for key, value in lm.state_dict().items():
        if key.startswith(prefix):
            state["model.language_model." + key[len(prefix) :]] = value
        else:  # the output head (lm_head.weight)
            state[key] = value
    return config, state


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], *, what: str, assign: bool = False) -> None:
    """load_state_dict that names missing / unexpected / mis-shaped weights in one line."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", shapes)):
        if keys:
            problems.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    if problems:
        raise ExportError(f"{what}: the weights do not map onto the transformers model: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True, assign=assign)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def hf_llava_model(
    bundle: ModelBundle,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    share_weights: bool = False,
    check: bool = True,
) -> nn.Module:
    """`bundle`'s MLLM as a transformers `LlavaForConditionalGeneration` with the same weights.

    `share_weights=True` builds it on the meta device and assigns mmtune's
    tensors (no copy, for saving only: non-persistent buffers stay on meta).
    Otherwise a runnable copy is made on `device` (what the throughput benchmark uses).
    `dtype`: cast every floating tensor (default: the LM's dtype).
    """
    from transformers import LlavaForConditionalGeneration

    config, state = llava_config(bundle, check=check)
    lm = _plain_lm(bundle.model)
    dtype = dtype or next(lm.parameters()).dtype
    state = _cast(state, dtype)
    config.dtype = dtype
    attn = getattr(lm.config, "_attn_implementation", None)
    if share_weights:
        with torch.device("meta"):
            hf = LlavaForConditionalGeneration(config)
        _load_exact(hf, state, what="LLaVA export", assign=True)
    else:
        kwargs = {"attn_implementation": attn} if attn else {}
        hf = LlavaForConditionalGeneration._from_config(config, dtype=dtype, **kwargs)
        _load_exact(hf, state, what="LLaVA export")
        if device is not None:
            hf = hf.to(device)
    hf.tie_weights()
    hf.generation_config = _generation_config(lm, bundle.tokenizer)
    return hf


def _generation_config(lm: nn.Module, tokenizer: Any) -> Any:
    """The LM's generation config, stopping and padding the way `mmtune generate` does."""
    from transformers import GenerationConfig

    gen = copy.deepcopy(getattr(lm, "generation_config", None) or GenerationConfig())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = pad
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen


# --------------------------------------------------------------------------- #
# Image processor and LlavaProcessor
# --------------------------------------------------------------------------- #

def image_processor_kwargs(tower: VisionTower, pad_to_square: bool) -> dict[str, Any]:
    """`LlavaImageProcessor` settings equivalent to the tower's mmtune image transform.

    The tower gives its own (`hf_processor_kwargs`); LLaVA's pad-to-square is `do_pad`
    (same centring and mean-colour fill as mmtune's `expand_to_square`). The PIL backend
    (`tower.image_backend == "pil"`) reproduces open_clip's pixels exactly; the default
    torchvision backend resizes with a slightly different bicubic kernel (see docs/export.md).
    """
    try:
        kwargs = tower.hf_processor_kwargs()
    except MMTuneError as exc:
        raise ExportError(str(exc)) from None
    kwargs["do_pad"] = bool(pad_to_square)
    return kwargs


def image_backend(tower: VisionTower) -> str:
    """The `AutoProcessor.from_pretrained(..., backend=...)` that reproduces mmtune's pixels exactly."""
    return tower.image_backend


def build_processor(bundle: ModelBundle, template: Template) -> Any:
    """The `LlavaProcessor` (tokenizer + image processor + chat template) for `bundle`."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    tower = bundle.model.vision
    tokenizer = copy.deepcopy(bundle.tokenizer)
    chat = export_chat_template(template)
    tokenizer.chat_template = chat
    image_processor = LlavaImageProcessor(**image_processor_kwargs(tower, bundle.config.vision.pad_to_square))
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(tower.patch_size),
        vision_feature_select_strategy=hf_select_strategy(tower),
        chat_template=chat,
        image_token=bundle.config.image_token,
        num_additional_image_tokens=1 if tower.has_cls else 0,
    )


# --------------------------------------------------------------------------- #
# Writing and verifying
# --------------------------------------------------------------------------- #


def _digest(t: torch.Tensor) -> str:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha1(flat.view(torch.uint8).numpy().tobytes()).hexdigest() + str(t.dtype)


def _digests(module: nn.Module) -> dict[str, str]:
    return {k: _digest(v) for k, v in module.state_dict().items()}


def _check_loaded(loaded: nn.Module, info: dict[str, Any], expected: dict[str, str], what: str) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        bad = sorted(map(str, info.get(key) or ()))
        if bad:
            label = key.replace("_keys", "")
            raise ExportError(
                f"{what}: transformers reports {len(bad)} {label} weight(s) when loading the export (e.g. {bad[0]})"
            )
    if info.get("error_msgs"):
        raise ExportError(f"{what}: transformers reports errors loading the export: {info['error_msgs'][0]}")
    got = _digests(loaded)
    if set(got) != set(expected):
        diff = sorted(set(got) ^ set(expected))
        raise ExportError(f"{what}: reloaded model has different weight names (e.g. {diff[0]})")
    changed = sorted(k for k in expected if got[k] != expected[k])
    if changed:
        raise ExportError(f"{what}: {len(changed)} reloaded weight(s) differ from the exported ones (e.g. {changed[0]})")


def _check_chat_template(render: Any, template: Template, tokenizer: Any, with_image: bool, what: str) -> None:
    parts, plain = probe_messages(with_image)
    got = render(parts, add_generation_prompt=True, tokenize=False)
    want = template.render_text(plain, add_generation_prompt=True, eos_token=tokenizer.eos_token or "")
    if got != want:
        raise ExportError(f"{what}: the exported chat template renders {got!r}, mmtune renders {want!r}")


def _write_hf_llava(bundle: ModelBundle, template: Template, folder: Path, dtype: torch.dtype | None) -> dict[str, str]:
    hf = hf_llava_model(bundle, dtype=dtype, share_weights=True)
    expected = _digests(hf)
    hf.save_pretrained(str(folder))
    build_processor(bundle, template).save_pretrained(str(folder))
    # What `model.init_from` needs to reproduce mmtune's pixels exactly (mmtune.model.hf_llava reads it).
    from mmtune.fileio import write_json_atomic

    write_json_atomic({"image_backend": image_backend(bundle.model.vision), "template": template.name},
                      folder / EXPORT_INFO_FILE)
    del hf
    return expected


def _verify_hf_llava(folder: Path, expected: dict[str, str], template: Template, num_image_tokens: int) -> int:
    from PIL import Image
    from transformers import (
        AutoProcessor,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    loaded, info = LlavaForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True, dtype="auto")
    _check_loaded(loaded, info, expected, "hf-llava export")
    n_params = sum(p.numel() for p in loaded.parameters())
    del loaded
    processor = AutoProcessor.from_pretrained(str(folder))
    if not isinstance(processor, LlavaProcessor):
        raise ExportError(f"hf-llava export: AutoProcessor loads a {type(processor).__name__}, not a LlavaProcessor")
    _check_chat_template(processor.apply_chat_template, template, processor.tokenizer, True, "hf-llava export")
    image = Image.new("RGB", (48, 40), (120, 30, 200))
    out = processor(text=IMAGE_PLACEHOLDER, images=[image], return_tensors="pt")
    n = int((out["input_ids"] == processor.image_token_id).sum())
    if n != num_image_tokens:
        raise ExportError(
            f"hf-llava export: the processor expands {IMAGE_PLACEHOLDER} into {n} tokens, the model takes {num_image_tokens}"
        )
    return n_params


def _write_hf_causal_lm(bundle: ModelBundle, template: Template, folder: Path, dtype: torch.dtype | None) -> dict[str, str]:
    lm = _plain_lm(bundle.model)
    if dtype is not None and dtype != next(lm.parameters()).dtype:
        lm = lm.to(dtype)
    lm.generation_config = _generation_config(lm, bundle.tokenizer)
    expected = _digests(lm)
    lm.save_pretrained(str(folder))
    tokenizer = copy.deepcopy(bundle.tokenizer)
    tokenizer.chat_template = export_chat_template(template)
    tokenizer.save_pretrained(str(folder))
    return expected


def _verify_hf_causal_lm(folder: Path, expected: dict[str, str], template: Template, trust_remote_code: bool) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"trust_remote_code": True} if trust_remote_code else {}
    loaded, info = AutoModelForCausalLM.from_pretrained(
        str(folder), output_loading_info=True, dtype="auto", **extra
    )
    _check_loaded(loaded, info, expected, "hf export")
    n_params = sum(p.numel() for p in loaded.parameters())
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
    _check_chat_template(tokenizer.apply_chat_template, template, tokenizer, False, "hf export")
    return n_params


def export_bundle(
    bundle: ModelBundle,
    out: str | Path,
    *,
    template: str | Template,
    fmt: str = "hf-llava",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export an in-memory model to `out`, atomically and verified.

    The model is changed in place: a LoRA adapter is merged, and for `hf`
    a `dtype` other than the LM's casts the LM.
    """
    return _export(lambda: bundle, out, template=template, fmt=fmt, dtype=dtype, overwrite=overwrite)


def _export(
    get_bundle: Any,
    out: str | Path,
    *,
    template: str | Template,
    fmt: str,
    dtype: str | torch.dtype | None,
    overwrite: bool,
) -> ExportResult:
    """Write, then verify. `get_bundle()` is called once; when the caller holds no other
    reference (export_checkpoint), the mmtune model is freed before the export is reloaded,
    so peak memory is one copy of the weights, not two."""
    from mmtune.model.lora import merge_lora

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    torch_dtype = resolve_dtype(dtype) if dtype is not None else None
    if torch_dtype == "auto":
        torch_dtype = None
    bundle = get_bundle()
    tmpl = template if isinstance(template, Template) else get_template(template, bundle.tokenizer)
    export_chat_template(tmpl)  # fails early when the template has no Jinja form
    model = bundle.model
    mllm = model.vision is not None
    if fmt == "hf-llava" and not mllm:
        raise ExportError("format hf-llava needs an MLLM checkpoint (model.mode mllm); use --format hf for an LLM")
    if fmt == "hf" and mllm:
        raise ExportError("format hf exports text-only (model.mode llm) checkpoints; use --format hf-llava for an MLLM")
    if model.has_lora:
        merge_lora(model)
    model.eval()
    num_image_tokens = model.num_image_tokens
    backend = image_backend(model.vision) if mllm else None
    trust = bool(bundle.config.lm.trust_remote_code)
    with atomic_dir(out) as tmp:  # an existing `out` is replaced only once the new one is verified
        with torch.no_grad():
            if fmt == "hf-llava":
                expected = _write_hf_llava(bundle, tmpl, tmp, torch_dtype)
            else:
                expected = _write_hf_causal_lm(bundle, tmpl, tmp, torch_dtype)
        del bundle, model
        gc.collect()
        if fmt == "hf-llava":
            n_params = _verify_hf_llava(tmp, expected, tmpl, num_image_tokens)
        else:
            n_params = _verify_hf_causal_lm(tmp, expected, tmpl, trust)
        _check_no_pickles(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        if out.exists() and not overwrite:  # it appeared while we wrote
            raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    return ExportResult(
        out=out, format=fmt, template=tmpl.name, num_parameters=n_params, files=files, image_backend=backend
    )


def _check_no_pickles(folder: Path) -> None:
    bad = [p.name for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if bad:
        raise ExportError(f"export wrote pickled weight files ({bad[0]}); only safetensors are allowed")


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    fmt: str | None = None,
    template: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Export a saved model / checkpoint folder (a run folder means its latest checkpoint-*).

    `fmt`: hf-llava (MLLM) or hf (LLM); None picks by the checkpoint's mode.
    `template`: the chat template to ship (default: data.template of the run's run_config.yaml).
    """
    from mmtune.model.io import load_model, load_model_config

    if fmt is not None and fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ckpt = resolve_model_folder(source)
    out = Path(out)
    # Never the checkpoint or the run it came from, nor inside or above them (--overwrite would delete them).
    check_outputs([Out(out, "--out", "folder", whole=True)],
                  runs=[("checkpoint", ckpt), *([("run folder", Path(source))] if Path(source) != ckpt else [])])
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    name = template or trained_template(ckpt)
    if name is None:
        raise ExportError(
            f"{ckpt}: no {RUN_CONFIG_FILE} with data.template here or in its run folder; "
            "pass --template (the template the model was trained with)"
        )
    if name != "tokenizer":
        get_template(name)  # one-line error on an unknown name before loading any weights
    mode = load_model_config(ckpt, trust_remote_code=trust_remote_code).mode  # refuses remote code not asked for
    fmt = fmt or ("hf-llava" if mode == "mllm" else "hf")
    if (fmt == "hf-llava") != (mode == "mllm"):
        want = "hf-llava" if mode == "mllm" else "hf"
        raise ExportError(f"{ckpt} is a model.mode {mode} checkpoint: export it with --format {want}")
    # No local reference to the loaded model: _export frees it before reloading the export.
    return _export(
        lambda: load_model(ckpt, device="cpu", dequantize=True, trust_remote_code=trust_remote_code), out,
        template=name, fmt=fmt, dtype=dtype, overwrite=overwrite
    )
