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
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mmtune.errors import MMTuneError
from mmtune.fileio import atomic_text


class ConfigError(MMTuneError, ValueError):
    """A config file or override that cannot be applied (one-line message)."""


# --------------------------------------------------------------------------- #
# The choices (checked when a config loads, with the closest valid value)
# --------------------------------------------------------------------------- #
# The registries these name (templates, projectors, towers, ...) live in higher
# layers; tests/test_config.py checks that each Literal equals its registry.

ModelMode = Literal["llm", "mllm"]
DtypeName = Literal["float32", "bfloat16", "float16", "auto", "fp32", "bf16", "fp16"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]
VisionBackend = Literal["open_clip", "hf"]
SelectStrategy = Literal["patch", "full"]
ProjectorType = Literal["mlp2x_gelu", "linear"]
TemplateName = Literal["alpaca", "vicuna_v1", "chatml", "plain", "tokenizer"]
Stage = Literal["align", "instruct"]
LrSchedule = Literal["cosine", "constant"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Distributed = Literal["auto", "ddp", "fsdp"]
QuantBits = Literal[4, 8]
QuantType = Literal["nf4", "fp4"]

# A value check yields (field, problem); the loader raises the first as "section.field: problem".
Problems = Iterator[tuple[str, str]]


def _at_least(name: str, value: float, low: float, what: str = "") -> Problems:
    if value < low:
        yield name, f"must be >= {low:g}{what}, got {value!r}"


def _finite_positive(name: str, value: float, *, allow_zero: bool = False) -> Problems:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        yield name, f"must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}"


def _heads_divide(name: str, conf: dict[str, Any] | None) -> Problems:
    """hidden_size % num_attention_heads (and heads % num_key_value_heads), unless head_dim is explicit."""
    if not isinstance(conf, dict):
        return
    hidden, heads, kv = conf.get("hidden_size"), conf.get("num_attention_heads"), conf.get("num_key_value_heads")
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (hidden, heads))
    if ints and "head_dim" not in conf:
        if heads < 1 or hidden % heads:
            yield f"{name}.hidden_size", f"{hidden} is not divisible by num_attention_heads {heads}"
    if ints and isinstance(kv, int) and (kv < 1 or heads % kv):
        yield f"{name}.num_key_value_heads", f"{kv} does not divide num_attention_heads {heads}"


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

    def validate(self) -> Problems:
        if self.train_vocab_size is not None:
            yield from _at_least("train_vocab_size", self.train_vocab_size, 1)


@dataclass
class QuantizationConfig:
    """Load the base LM quantized (QLoRA): `bits: 4` (bitsandbytes NF4/FP4) or `bits: 8`; null = not quantized.

    Needs CUDA and bitsandbytes; the LM itself is frozen and only a LoRA adapter
    trains (`train.lora.enabled: true`). `compute_dtype` is the dtype the
    de-quantized matmuls run in.
    """

    bits: QuantBits | None = None  # null | 4 | 8
    type: QuantType = "nf4"  # nf4 | fp4 (4-bit only)
    double_quant: bool = True
    compute_dtype: ComputeDtype = "bfloat16"


@dataclass
class LMConfig:
    """The causal language model: a pretrained one, or random weights from a config."""

    name_or_path: str | None = None
    # Random init: a transformers config as a dict, e.g. {"model_type": "llama", "hidden_size": 64, ...}.
    config: dict[str, Any] | None = None
    dtype: DtypeName = "float32"  # float32 | bfloat16 | float16 | auto
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    def validate(self) -> Problems:
        yield from _heads_divide("config", self.config)


@dataclass
class VisionConfig:
    """The vision tower (MLLM mode only)."""

    backend: VisionBackend = "open_clip"  # open_clip | hf
    model_name: str | None = None  # open_clip name (e.g. "ViT-L-14-336") or HF id / folder
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint path
    config: dict[str, Any] | None = None  # random init: open_clip model cfg or HF CLIPVisionConfig kwargs
    feature_layer: int = -2
    select_strategy: SelectStrategy = "patch"  # patch (drop CLS) | full
    pad_to_square: bool = True
    freeze: bool = True

    def validate(self) -> Problems:
        if self.backend == "hf":
            yield from _heads_divide("config", self.config)


@dataclass
class ProjectorConfig:
    type: ProjectorType = "mlp2x_gelu"  # mlp2x_gelu | linear
    checkpoint: str | None = None  # projector weights from an align run (safetensors)


@dataclass
class ModelConfig:
    mode: ModelMode = "mllm"  # llm | mllm
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

    def validate(self) -> Problems:
        yield from _finite_positive("weight", self.weight)


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
    template: TemplateName = "vicuna_v1"  # see mmtune.data.templates.TEMPLATES
    max_length: int = 512
    shuffle_buffer: int = 1000
    group_by_length: bool = True
    group_factor: int = 16  # length grouping sorts batch_size * group_factor examples at a time
    group_by_modality: bool = False  # image-only / text-only batches (LLaVA-1.5's group_by_modality_length)
    packing: bool = False
    num_workers: int = 0
    prefetch_factor: int | None = None  # blocks of examples (stream.WORKER_BLOCK) each DataLoader worker keeps queued (torch's default 2)
    jpeg_draft: bool = False  # decode JPEGs at a reduced DCT scale (>= the tower's input size); see docs/train.md
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

    def validate(self) -> Problems:
        yield from _at_least("max_length", self.max_length, 1, " token")
        yield from _at_least("shuffle_buffer", self.shuffle_buffer, 0)
        yield from _at_least("group_factor", self.group_factor, 1)
        yield from _at_least("num_workers", self.num_workers, 0)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"

    def validate(self) -> Problems:
        yield from _at_least("r", self.r, 1)
        yield from _finite_positive("alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            yield "dropout", f"must be in [0, 1), got {self.dropout!r}"


@dataclass
class TrainConfig:
    stage: Stage = "instruct"  # align | instruct
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
    lr_schedule: LrSchedule = "cosine"  # cosine | constant
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision = "auto"  # auto | no | bf16 | fp16 (autocast; trainable weights stay float32)
    distributed: Distributed = "auto"  # auto (DDP with several processes) | ddp | fsdp (FSDP2 sharding)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each LM decoder layer and vision block (mmtune/train/compiling.py)
    lora: LoraConfig = field(default_factory=LoraConfig)
    unfreeze_vision: bool = False
    # Stage align: also train the LM (or its LoRA adapter) on the captions, as ShareGPT4V's and Qwen-VL's
    # stage 1 do; LLaVA's leaves it frozen. Stage instruct always trains the LM.
    unfreeze_lm: bool = False
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

    def validate(self) -> Problems:
        # lr 0 is allowed: it keeps every weight where it is (e.g. to check a stage-2 start).
        yield from _finite_positive("lr", self.lr, allow_zero=True)
        for name in ("projector_lr", "vision_lr"):
            if getattr(self, name) is not None:
                yield from _finite_positive(name, getattr(self, name), allow_zero=True)
        yield from _finite_positive("num_epochs", self.num_epochs)
        if self.max_steps == 0 or self.max_steps < -1:
            yield "max_steps", f"must be > 0 (or -1 for num_epochs), got {self.max_steps}"
        yield from _at_least("batch_size", self.batch_size, 1)
        yield from _at_least("grad_accum", self.grad_accum, 1)
        yield from _finite_positive("weight_decay", self.weight_decay, allow_zero=True)
        if not 0 <= self.warmup_ratio <= 1:
            yield "warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio!r}"
        yield from _finite_positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        yield from _at_least("log_every", self.log_every, 1)
        for name in ("save_every", "save_total_limit", "eval_every", "eval_samples"):
            yield from _at_least(name, getattr(self, name), 0)
        if self.lora.enabled and self.stage != "instruct" and not self.unfreeze_lm:
            yield "lora.enabled", ("LoRA trains the LM: stage instruct, or stage align with train.unfreeze_lm "
                                   "(stage align otherwise trains the projector only)")


@dataclass
class RunConfig:
    """Everything `mmtune train` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- #
# mmtune select
# --------------------------------------------------------------------------- #

SelectMethod = Literal["random", "longest", "quality", "kmeans", "facility", "qdit", "deita", "dedup"]
QualityName = Literal["length", "reward", "judge", "field"]
JudgeScale = Literal["1-5", "0-5"]
DiversityNorm = Literal["step", "pool"]
TextField = Literal["instruction", "response", "both"]
Similarity = Literal["auto", "dense", "knn"]


@dataclass
class SelectConfig:
    """The options of `mmtune select` / `mmtune.select.select_records` (docs/select.md explains each).

    Values only: precomputed embeddings, encoder objects and quality scorers are
    arguments of `select_records`, not config.
    """

    k: int | None = None
    method: SelectMethod = "qdit"
    quality: QualityName | None = None  # default: length, or field with quality_field
    quality_model: str | None = None
    quality_field: str | None = None
    judge_scale: JudgeScale = "1-5"
    alpha: float = 0.5
    diversity_norm: DiversityNorm = "step"
    min_quality: float | None = None
    max_similarity: float | None = None
    clusters: int | None = None
    dedup_threshold: float | None = None
    text_encoder: str | None = None  # a sentence-transformers name / folder; None: all-MiniLM-L6-v2
    text_field: TextField = "instruction"
    text_only: bool = False
    image_root: str | None = None
    cache_path: str | None = None
    similarity: Similarity = "auto"
    neighbors: int | None = None
    seed: int = 0
    device: str | None = None
    report_dir: str | None = None
    progress: bool = False
    trust_remote_code: bool = False


# --------------------------------------------------------------------------- #
# mmtune eval
# --------------------------------------------------------------------------- #

EvalBackend = Literal["mmtune", "llava-hf", "causal-lm"]


@dataclass
class GenerationSettings:
    batch_size: int = 16
    # Every task's limit, unless its own config entry sets one; None: the task preset's, else 64.
    max_new_tokens: int | None = None
    cot_max_new_tokens: int = 256  # mode cot
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    device: str | None = None  # default: cuda when available, else cpu
    dtype: ComputeDtype | None = None  # float32 | bfloat16 | float16 (default: the model config's)

    def validate(self) -> Problems:
        yield from _at_least("batch_size", self.batch_size, 1)
        if self.max_new_tokens is not None:
            yield from _at_least("max_new_tokens", self.max_new_tokens, 1)
        yield from _at_least("cot_max_new_tokens", self.cot_max_new_tokens, 1)
        if self.do_sample:  # greedy decoding reads neither
            yield from _finite_positive("temperature", self.temperature)
            if not 0 < self.top_p <= 1:
                yield "top_p", f"must be in (0, 1] when sampling, got {self.top_p!r}"


@dataclass
class ModelEntry:
    path: str = ""
    # mmtune | llava-hf | causal-lm (mmtune.eval.backends.BACKENDS); default: detected from the folder
    backend: EvalBackend | None = None
    # default: mmtune runs: the eval template, else the one the model trained with; HF folders: their chat template
    template: TemplateName | None = None
    modes: list[str] | None = None  # default: the eval config's modes
    image_backend: Literal["pil", "torchvision"] | None = None  # llava-hf folders: the processor's image backend


@dataclass
class EvalConfig:
    """An eval run (`mmtune eval`, mmtune.eval.run). Paths are relative to the current directory."""

    models: dict[str, Any] = field(default_factory=dict)  # name -> path | {path, template, modes}
    tasks: list[Any] = field(default_factory=list)  # preset names or task mappings (see TaskSpec)
    pool: list[str] = field(default_factory=list)  # records for tasks without their own file
    image_root: str | None = None
    holdout_tasks: list[str] | None = None  # None: the models' training data.holdout_tasks
    holdout_clusters: list[str] = field(default_factory=list)
    shots_from: list[str] = field(default_factory=list)  # default: the pool (held-out records removed)
    shots_image_root: str | None = None
    modes: list[str] = field(default_factory=lambda: ["zero-shot"])
    k: int = 4
    seed: int = 0
    template: TemplateName | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    output_dir: str = "runs/eval"
    progress: bool = True
    plot: bool = True
    trust_remote_code: bool = False  # run code shipped with a checkpoint (only ever from the user)

    def validate(self) -> Problems:
        yield from _at_least("k", self.k, 0)


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
    obj = cls(**kwargs)
    _raise_first_problem(obj, where)
    return obj


def _raise_first_problem(obj: Any, where: str) -> None:
    """Run `obj.validate()` (this level only) and raise its first problem naming the full key."""
    check = getattr(obj, "validate", None)
    if check is None:
        return
    for key, problem in check():
        raise ConfigError(f"{where + '.' if where else ''}{key}: {problem}")


def validate_config(obj: Any, where: str = "") -> None:
    """Value-check a config built in code (what `from_dict` does while loading), nested sections included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                sub = f"{where + '.' if where else ''}{f.name}" + (f"[{i}]" if isinstance(value, list) else "")
                validate_config(item, sub)
    _raise_first_problem(obj, where)


def check_input_files(cfg: RunConfig) -> None:
    """The files a run reads before it builds anything must exist (checked by `mmtune train` at start).

    Not part of loading: a saved run_config.yaml / model_config.yaml stays readable
    after, say, its tokenizer training files are gone.
    """
    m = cfg.model
    for i, path in enumerate(m.tokenizer.train_files):
        if not Path(path).is_file():
            raise ConfigError(f"model.tokenizer.train_files[{i}]: file not found: {path}")
    if m.projector.checkpoint and not Path(m.projector.checkpoint).exists():
        raise ConfigError(f"model.projector.checkpoint: not found: {m.projector.checkpoint}")


def _literal(args: tuple[Any, ...], value: Any, where: str) -> Any:
    """One of a Literal's values; anything else fails naming the closest valid one."""
    for arg in args:
        if value == arg and type(value) is type(arg):
            return arg
    if isinstance(value, bool) and ("yes" if value else "no") in args:  # YAML 1.1 reads a bare `no` as false
        return "yes" if value else "no"
    if isinstance(value, str):  # an override like `model.lm.quantization.bits=4` arrives typed; a YAML string may not
        for arg in args:
            if str(arg) == value:
                return arg
    valid = [str(a) for a in args]
    close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{where}: {value!r} is not a valid choice{hint} (valid: {', '.join(valid)})")


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
    if origin is Literal:
        return _literal(args, value, where)
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
    """Write a config dataclass as YAML (what a run actually used), atomically: a failed write keeps the old file."""
    data = to_dict(obj)
    with atomic_text(path) as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
