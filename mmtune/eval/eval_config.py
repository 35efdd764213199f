"""Reading an eval config: its models, its tasks and each task's answer length.

Contract. `load_eval_config(path, overrides)` loads an `EvalConfig` (declared
with the other configs in `mmtune.config`) strictly, with "did you mean" on a
misspelt key. `model_entries(cfg)` gives name -> `ModelEntry` (a bare path
means `ModelEntry(path=...)`); `task_specs(cfg)` resolves every task entry
(preset name or mapping) to a `TaskSpec` and refuses a name used twice;
`max_new_tokens_by_task(cfg, specs)` applies the precedence the docs state:
the task's own config entry > `generation.max_new_tokens` > the task preset >
`DEFAULT_MAX_NEW_TOKENS`; `decode_settings(cfg.generation, n)` is the
`DecodeSettings` one (task, mode) generates with. Every failure is a one-line
`ConfigError` / `TaskError` naming the field.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mmtune.config import (
    ConfigError,
    EvalConfig,
    GenerationSettings,
    ModelEntry,
    from_dict,
    load_config,
)
from mmtune.eval.generate import DecodeSettings
from mmtune.eval.tasks import TaskError, TaskSpec, resolve_task

DEFAULT_MAX_NEW_TOKENS = 64


def load_eval_config(path: str | Path, overrides: Sequence[str] = ()) -> EvalConfig:
    """The eval config at `path`, with `key.sub=value` overrides applied."""
    return load_config(path, EvalConfig, list(overrides))


def model_entries(cfg: EvalConfig) -> dict[str, ModelEntry]:
    """name -> ModelEntry for every model the config lists (at least one, each with a path)."""
    if not cfg.models:
        raise ConfigError("models: list at least one model (name: path to a saved model or run folder)")
    out: dict[str, ModelEntry] = {}
    for name, value in cfg.models.items():
        entry = ModelEntry(path=str(value)) if isinstance(value, str | Path) else from_dict(
            ModelEntry, value, f"models.{name}")
        if not entry.path:
            raise ConfigError(f"models.{name}: needs a path")
        out[str(name)] = entry
    return out


def task_specs(cfg: EvalConfig) -> list[TaskSpec]:
    """The config's tasks as TaskSpecs, in config order; names must be unique."""
    if not cfg.tasks:
        raise ConfigError("tasks: list at least one task (a preset name or a mapping, see docs/eval.md)")
    specs = [resolve_task(t, f"tasks[{i}]") for i, t in enumerate(cfg.tasks)]
    twice = [n for n, c in Counter(s.name for s in specs).items() if c > 1]
    if twice:
        raise TaskError(f"task name {twice[0]!r} is used twice; give each task its own name")
    return specs


def max_new_tokens_by_task(cfg: EvalConfig, specs: Sequence[TaskSpec]) -> dict[str, int]:
    """Task name -> answer length (modes other than cot; cot uses `generation.cot_max_new_tokens`)."""
    g = cfg.generation
    return {s.name: (t["max_new_tokens"] if isinstance(t, dict) and t.get("max_new_tokens") is not None
                     else g.max_new_tokens or s.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
            for s, t in zip(specs, cfg.tasks, strict=True)}


def decode_settings(g: GenerationSettings, max_new_tokens: int) -> DecodeSettings:
    """How one (task, mode) is decoded: the config's generation section at that answer length.

    Greedy decoding takes no seed (it draws nothing); sampling takes `generation.seed`.
    """
    return DecodeSettings(batch_size=g.batch_size, max_new_tokens=max_new_tokens, do_sample=g.do_sample,
                          temperature=g.temperature, top_p=g.top_p, seed=g.seed if g.do_sample else None)
