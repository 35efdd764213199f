"""Typed run configuration: dataclasses, YAML on disk, `key.sub=value` overrides.

Every YAML config in `configs/` loads into one of these dataclasses through
`load_config`, which is also the one place where command-line overrides are
applied. An unknown key is an error naming the key and its closest valid
spelling, so a typo never silently falls back to a default.

This module imports nothing from mmtune but `errors`, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mmtune.errors import MMTuneError


class ConfigError(MMTuneError, ValueError):
    """A config file or override that cannot be applied (one-line message)."""


# --------------------------------------------------------------------------- #
# The config dataclasses
# --------------------------------------------------------------------------- #


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from.

    `name_or_path` loads a Hugging Face tokenizer (hub id or local folder; no
    download happens offline, so tests use local folders). When it is empty and
    `train_vocab_size` is set, a byte-level BPE tokenizer is trained on the
    training records at build time, which needs no download at all.
    """

    name_or_path: str | None = None
    train_vocab_size: int | None = None
    train_files: list[str] = field(default_factory=list)
    trust_remote_code: bool = False


@dataclass
class QuantizationConfig:
    """Load the base LM quantized (QLoRA): `bits: 4` (bitsandbytes NF4/FP4) or `bits: 8`; null = not quantized.

    Needs CUDA and bitsandbytes; the LM itself is frozen and only a LoRA adapter
    trains (`train.lora.enabled: true`). `compute_dtype` is the dtype the
    de-quantized matmuls run in.
    """

    bits: int | None = None  # null | 4 | 8
    type: str = "nf4"  # nf4 | fp4 (4-bit only)
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass
class LMConfig:
    """The causal language model: a pretrained one, or random weights from a config."""

    name_or_path: str | None = None
    # Random init: a transformers config as a dict, e.g. {"model_type": "llama", "hidden_size": 64, ...}.
    config: dict[str, Any] | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)


@dataclass
class VisionConfig:
    """The vision tower (MLLM mode only)."""

    backend: str = "open_clip"  # open_clip | hf
    model_name: str | None = None  # open_clip name (e.g. "ViT-L-14-336") or HF id / folder
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint path
    config: dict[str, Any] | None = None  # random init: open_clip model cfg or HF CLIPVisionConfig kwargs
    feature_layer: int = -2
    select_strategy: str = "patch"  # patch (drop CLS) | full
    pad_to_square: bool = True
    freeze: bool = True


@dataclass
class ProjectorConfig:
    type: str = "mlp2x_gelu"  # mlp2x_gelu | linear
    checkpoint: str | None = None  # projector weights from an align run (safetensors)


@dataclass
class ModelConfig:
    mode: str = "mllm"  # llm | mllm
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    image_token: str = "<image>"
    # A LlavaForConditionalGeneration folder (llava-hf, or an hf-llava export): tower, projector, LM,
    # tokenizer and image settings all come from it (mmtune.model.hf_llava); leave lm/vision unset.
    init_from: str | None = None


@dataclass
class DataSource:
    """One weighted entry of `data.train`: `{path: a.jsonl, weight: 0.7}` (see mmtune.data.mixture)."""

    path: str
    weight: float = 1.0


@dataclass
class DataConfig:
    """Training data: unified-record JSONL files or webdataset shard patterns.

    `train` entries are paths, or `{path, weight}` mappings: with any mapping
    among them the sources are mixed in proportion to their weights (a plain
    path weighs 1.0), each streaming on its own (`mmtune.data.mixture`).
    """

    train: list[DataSource | str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)  # validation records / shards (loss every train.eval_every steps)
    image_root: str | None = None
    template: str = "vicuna_v1"  # see mmtune.data.templates.TEMPLATES
    max_length: int = 512
    shuffle_buffer: int = 1000
    group_by_length: bool = True
    group_factor: int = 16  # length grouping sorts batch_size * group_factor examples at a time
    group_by_modality: bool = False  # image-only / text-only batches (LLaVA-1.5's group_by_modality_length)
    packing: bool = False
    num_workers: int = 0
    prefetch_factor: int | None = None  # items each DataLoader worker keeps queued (torch's default 2)
    jpeg_draft: bool = False  # decode JPEGs at a reduced DCT scale (>= the tower's input size); see docs/data.md
    holdout_tasks: list[str] = field(default_factory=list)

    @property
    def is_mixture(self) -> bool:
        """True when some `train` entry is a `{path, weight}` mapping."""
        return any(isinstance(s, DataSource) for s in self.train)

    def train_sources(self) -> list[tuple[str, float]]:
        """(path, weight) for every `train` entry (a plain path weighs 1.0)."""
        return [(s.path, s.weight) if isinstance(s, DataSource) else (s, 1.0) for s in self.train]

    def train_paths(self) -> list[str]:
        return [p for p, _ in self.train_sources()]


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass
class TrainConfig:
    stage: str = "instruct"  # align | instruct
    output_dir: str = "runs/default"
    max_steps: int = -1  # -1: run num_epochs
    num_epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5  # the LM's (and every part's without its own rate)
    projector_lr: float | None = None  # LLaVA's mm_projector_lr; null = train.lr
    vision_lr: float | None = None  # the tower's, when it trains; null = train.lr
    weight_decay: float = 0.0  # matrices only; never biases, norms or embeddings' 1-D gains
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"  # cosine | constant
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16 (autocast; trainable weights stay float32)
    distributed: str = "auto"  # auto (DDP with several processes) | ddp | fsdp (FSDP2 sharding)
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    unfreeze_vision: bool = False
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    save_total_limit: int = 3
    eval_every: int = 0  # validation loss on data.eval every N steps (0: at the end only)
    eval_samples: int = 0  # validate on the first N eval examples (0: all of data.eval)
    save_best: bool = False  # keep the model with the lowest validation loss in output_dir/best
    report_to: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb, mlflow, trackio
    resume_from: str | None = None  # a checkpoint folder or "latest"
    progress: bool = True


@dataclass
class RunConfig:
    """Everything `mmtune train` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- #
# Loading and overrides
# --------------------------------------------------------------------------- #

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with `yaml.safe_load`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is parsed as YAML (so 1e-3, true, [a, b] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (in place, returned for chaining)."""
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a nested dict, strictly: unknown keys and wrong types fail."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {dotted!r}{hint} (valid here: {valid})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:  # an exact type match wins over coercion (str vs list[str])
            if isinstance(arg, type) and isinstance(value, arg) and not (isinstance(value, bool) and arg is not bool):
                return value
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(obj)


def load_config(
    path: str | Path | None, cls: type[T] = RunConfig, overrides: list[str] | None = None
) -> T:
    """Load `path` (YAML) into `cls`, then apply `key.sub=value` overrides."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def save_config(obj: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (what a run actually used)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False), encoding="utf-8")
