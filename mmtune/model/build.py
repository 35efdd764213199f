"""build_model: a ModelConfig -> tokenizer + MMTuneModel + image transform.

LLM mode: any transformers causal LM, pretrained (`lm.name_or_path`, a hub id
or folder) or random from `lm.config` (a transformers config dict with
`model_type`). MLLM mode adds a vision tower (open_clip or hf) and a projector.
Random parts are seeded by the caller (`torch.manual_seed` before building).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtune.config import LMConfig, ModelConfig
from mmtune.data.encode import image_token_id
from mmtune.data.tokenizer import build_tokenizer
from mmtune.errors import MMTuneError
from mmtune.model.mllm import MMTuneModel
from mmtune.model.projector import build_projector
from mmtune.model.towers import build_vision_tower

MODES = ("llm", "mllm")
LLAVA_PROJECTOR_FILE = "mm_projector.bin"  # what LLaVA's stage 1 (--tune_mm_mlp_adapter) writes
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class ModelBundle:
    """Everything a trainer or generator needs besides data."""

    model: MMTuneModel
    tokenizer: Any
    image_transform: Callable[[Any], torch.Tensor] | None  # PIL -> normalised float [3, H, W]
    num_image_tokens: int
    config: ModelConfig
    # PIL -> what the training loader ships: uint8 [3, H, W] that the tower normalises on the device
    # (towers with a pixel_norm), else the same as image_transform. None in llm mode.
    pixel_transform: Callable[[Any], torch.Tensor] | None = None


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical config name of a torch dtype (`torch.bfloat16` -> "bfloat16"), a key of DTYPES."""
    name = str(dtype).removeprefix("torch.")
    if DTYPES.get(name) is not dtype:
        raise MMTuneError(f"dtype {dtype} has no mmtune name (have: float32, bfloat16, float16)")
    return name


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    """Config dtype string -> torch dtype ("auto" passes through to from_pretrained)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise MMTuneError(f"model.lm.dtype must be one of float32, bfloat16, float16, auto; got {name!r}")
    return DTYPES[name]


QUANT_TYPES = ("nf4", "fp4")


def check_quantization(cfg: LMConfig) -> None:
    """Refuse a `model.lm.quantization` that cannot load here, before anything is loaded (one line)."""
    q = cfg.quantization
    if not q.bits:
        return
    if q.bits not in (4, 8):
        raise MMTuneError(f"model.lm.quantization.bits must be 4 or 8 (or null), got {q.bits}")
    if q.bits == 4 and q.type not in QUANT_TYPES:
        raise MMTuneError(f"model.lm.quantization.type must be one of {', '.join(QUANT_TYPES)}, got {q.type!r}")
    if not torch.cuda.is_available():
        raise MMTuneError(f"model.lm.quantization.bits={q.bits} needs a CUDA GPU (bitsandbytes kernels) and this "
                          "machine has none: remove model.lm.quantization, or run on a GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MMTuneError("model.lm.quantization needs bitsandbytes: pip install 'mmtune[qlora]'") from None


def quantization_config(cfg: LMConfig) -> Any:
    """transformers' BitsAndBytesConfig for `model.lm.quantization` (None when not quantized)."""
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    if not q.bits:
        return None
    compute = resolve_dtype(q.compute_dtype)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=compute)


def build_lm(cfg: LMConfig, *, vocab_size: int | None = None, from_folder: str | Path | None = None) -> nn.Module:
    """The causal LM: `from_folder` (a saved copy) > `name_or_path` > random from `config`.

    With `quantization.bits` the pretrained weights load in 4/8-bit through
    bitsandbytes onto this process's GPU (QLoRA); `check_quantization` runs first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype)
    extra: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization.bits and from_folder is None:
        check_quantization(cfg)
        import os

        extra["quantization_config"] = quantization_config(cfg)
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        dtype = resolve_dtype(cfg.quantization.compute_dtype)
    source = str(from_folder) if from_folder is not None else cfg.name_or_path
    if cfg.quantization.bits and not source:
        raise MMTuneError("model.lm.quantization loads pretrained weights in k-bit: set model.lm.name_or_path")
    if source:
        try:
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
        except (OSError, ValueError) as exc:
            raise MMTuneError(f"cannot load causal LM {source!r}: {str(exc).splitlines()[0]}") from None
    if not cfg.config:
        raise MMTuneError("model.lm needs name_or_path (hub id or folder) or config (a transformers config dict)")
    conf_dict = dict(cfg.config)
    model_type = conf_dict.pop("model_type", None)
    if not model_type:
        raise MMTuneError("model.lm.config needs model_type (e.g. llama, qwen2, gpt2)")
    try:
        conf = AutoConfig.for_model(model_type, **conf_dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise MMTuneError(f"model.lm.config: {str(exc).splitlines()[0]}") from None
    if vocab_size is not None and "vocab_size" not in conf_dict:
        conf.vocab_size = vocab_size
    try:
        return AutoModelForCausalLM.from_config(conf, dtype=torch.float32 if dtype == "auto" else dtype, **extra)
    except ValueError as exc:
        raise MMTuneError(f"model.lm.config: {str(exc).splitlines()[0]}") from None


def fit_vocab(lm: nn.Module, tokenizer: Any) -> None:
    """Grow the LM's embeddings to the tokenizer's length, new rows = mean of the old ones.

    The mean (not transformers' random sampling) keeps the result a pure
    function of the pretrained weights, so a checkpoint that did not train
    the LM can rebuild it exactly without saving it.
    """
    n = len(tokenizer)
    emb = lm.get_input_embeddings()
    old = emb.num_embeddings
    if old >= n:
        return
    lm.resize_token_embeddings(n, mean_resizing=False)
    with torch.no_grad():
        new_in = lm.get_input_embeddings().weight
        new_in[old:] = new_in[:old].mean(dim=0, keepdim=True)
        out = lm.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != new_in.data_ptr():
            out.weight[old:] = out.weight[:old].mean(dim=0, keepdim=True)
            if getattr(out, "bias", None) is not None and out.bias.shape[0] == n:
                out.bias[old:] = out.bias[:old].mean()


def _set_special_ids(lm: nn.Module, tokenizer: Any, random_init: bool) -> None:
    """Point the LM (and its generation config) at the tokenizer's pad/bos/eos ids."""
    conf = lm.config
    ids = {"pad_token_id": tokenizer.pad_token_id}
    if random_init or getattr(conf, "eos_token_id", None) is None:
        ids["eos_token_id"] = tokenizer.eos_token_id
    if random_init or getattr(conf, "bos_token_id", None) is None:
        ids["bos_token_id"] = tokenizer.bos_token_id
    for key, value in ids.items():
        if value is None:
            continue
        setattr(conf, key, value)
        gen = getattr(lm, "generation_config", None)
        if gen is not None:
            setattr(gen, key, value)


def build_model(
    cfg: ModelConfig,
    *,
    tokenizer: Any = None,
    corpus: Iterable[str] | None = None,
    lm_folder: str | Path | None = None,
    vision_state: dict[str, torch.Tensor] | None = None,
    projector_state: dict[str, torch.Tensor] | None = None,
) -> ModelBundle:
    """Build tokenizer, LM, tower, projector as `cfg` says.

    `tokenizer`: use this one instead of building it from `cfg.tokenizer`
    (which, with no name_or_path and no train_vocab_size, defaults to the
    LM's own tokenizer). `corpus`: extra texts for a trained byte-level BPE.
    `lm_folder`, `vision_state`, `projector_state` are how `load_model`
    substitutes saved weights; leave them out otherwise.
    """
    if cfg.mode not in MODES:
        raise MMTuneError(f"model.mode must be llm or mllm, got {cfg.mode!r}")
    if lm_folder is None:
        check_quantization(cfg.lm)  # before the tokenizer or any weight is loaded
    init = None
    if cfg.init_from:
        init, cfg = _read_init_from(cfg, lm_folder is None)
    if tokenizer is None:
        tok_cfg = copy.deepcopy(cfg.tokenizer)
        if not tok_cfg.name_or_path and not tok_cfg.train_vocab_size:
            if init is None and not cfg.lm.name_or_path:
                raise MMTuneError("model.tokenizer needs name_or_path or train_vocab_size (the LM is random-init)")
            tok_cfg.name_or_path = str(init.folder) if init is not None else cfg.lm.name_or_path
            tok_cfg.trust_remote_code = cfg.lm.trust_remote_code
        tokenizer = build_tokenizer(tok_cfg, corpus)
    img_id = image_token_id(tokenizer)

    if init is not None and img_id != init.image_token_index:
        raise MMTuneError(f"model.init_from: {init.folder}: image_token_index is {init.image_token_index} but the "
                          f"tokenizer's {cfg.image_token} is {img_id}")

    owned: set[str] = set()
    lm_random = lm_folder is None and not cfg.lm.name_or_path and init is None
    if init is not None and init.lm is not None:
        lm = init.lm
    else:
        lm = build_lm(cfg.lm, vocab_size=len(tokenizer), from_folder=lm_folder)
    if lm_random or lm_folder is not None:
        owned.add("lm")
    fit_vocab(lm, tokenizer)
    _set_special_ids(lm, tokenizer, random_init=lm_random)

    vision = projector = None
    transform = pixel_transform = None
    if cfg.mode == "mllm":
        dtype = resolve_dtype(cfg.lm.dtype)
        tower_dtype = None if dtype in (None, "auto") else dtype
        vcfg = cfg.vision
        # open_clip's hf-hub: / local-dir: names carry their own weights (the pretrained tag is ignored).
        schema_weights = (vcfg.model_name or "").startswith(("hf-hub:", "local-dir:"))
        vision_random = bool(vcfg.config and not vcfg.pretrained) or (
            vcfg.backend == "open_clip" and not vcfg.config and not vcfg.pretrained and not schema_weights
        )
        if init is not None:
            from mmtune.model.towers import HFVisionTower

            base = init.vision_model.to(tower_dtype) if tower_dtype is not None else init.vision_model
            vision = HFVisionTower(base, init.processor_cfg, vcfg.feature_layer, vcfg.select_strategy)
        else:
            vision = build_vision_tower(vcfg, load_weights=vision_state is None, dtype=tower_dtype)
        if vision_state is not None:
            _load_state(vision, vision_state, "vision")
        if vision_random or vision_state is not None:
            owned.add("vision")
        lm_dim = int(lm.config.get_text_config().hidden_size)
        projector = build_projector(cfg.projector, vision.hidden_size, lm_dim)
        if projector_state is None and cfg.projector.checkpoint:
            projector_state = _projector_checkpoint(cfg.projector.checkpoint, cfg.projector.type)
        if projector_state is None and init is not None:
            projector_state = init.projector_state
        if projector_state is not None:
            _load_state(projector, projector_state, "projector")
        transform = vision.image_transform(vcfg.pad_to_square)
        pixel_transform = vision.image_transform(vcfg.pad_to_square, normalize=False)
        vision.eval()
        for p in vision.parameters():
            p.requires_grad_(False)

    model = MMTuneModel(lm, config=cfg, image_token_id=img_id, vision=vision, projector=projector, owned_parts=owned)
    return ModelBundle(model, tokenizer, transform, model.num_image_tokens, cfg, pixel_transform)


def _read_init_from(cfg: ModelConfig, load_lm: bool) -> tuple[Any, ModelConfig]:
    """`model.init_from`: the LLaVA folder's parts, and a copy of `cfg` describing them."""
    from mmtune.model.hf_llava import read_llava_folder

    if cfg.lm.name_or_path or cfg.lm.config:
        raise MMTuneError("model.init_from takes the LM from the LLaVA folder: leave model.lm.name_or_path and "
                          "model.lm.config unset")
    if cfg.vision.model_name or cfg.vision.config or cfg.vision.pretrained:
        raise MMTuneError("model.init_from takes the vision tower from the LLaVA folder: leave model.vision.model_name, "
                          "config and pretrained unset")
    dtype = resolve_dtype(cfg.lm.dtype)
    init = read_llava_folder(cfg.init_from, dtype=None if dtype == "auto" else dtype, load_lm=load_lm)
    cfg = copy.deepcopy(cfg)
    init.apply_to(cfg)
    return init, cfg


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise MMTuneError(f"saved {what} weights do not fit the configured {what}: {first}") from None


def _projector_checkpoint(path: str, kind: str = "mlp2x_gelu") -> dict[str, torch.Tensor]:
    """Projector weights: mmtune's projector.safetensors (file, model or run folder) or LLaVA's mm_projector.bin.

    LLaVA's file (a folder holding it, or the file itself) is read with
    `torch.load(weights_only=True)`, which unpickles tensors only, and its
    `model.mm_projector.{0,2}.*` keys are renamed onto mmtune's projector.
    """
    from mmtune.model.projector import (
        from_llava_projector_state,
        is_llava_projector_state,
    )
    from mmtune.runs import PROJECTOR_FILE, resolve_model_folder

    where = "model.projector.checkpoint"
    p = Path(path)
    if p.is_dir():
        p = p / LLAVA_PROJECTOR_FILE if (p / LLAVA_PROJECTOR_FILE).is_file() else resolve_model_folder(p) / PROJECTOR_FILE
    if not p.is_file():
        raise MMTuneError(f"{where}: {p} not found")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError) as exc:
            raise MMTuneError(f"{where}: {p} is not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
            # weights_only refusals and truncated zips: one line naming the file
            raise MMTuneError(f"{where}: {p} cannot be read as torch weights ({' '.join(str(exc).split())[:200]})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MMTuneError(f"{where}: {p} does not hold a dict of tensors")
    if is_llava_projector_state(state):
        state = from_llava_projector_state(state, kind, f"{where} {p}")
    return state
