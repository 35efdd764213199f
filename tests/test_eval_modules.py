"""eval/ split by job: one generation settings object, stable cache keys, config reading (no model, < 1 s)."""

from __future__ import annotations

import inspect

import pytest

from mmtune.config import EvalConfig, GenerationSettings
from mmtune.errors import MMTuneError
from mmtune.eval.backends import BACKENDS, EvalModel
from mmtune.eval.cache import cache_key, cache_settings
from mmtune.eval.eval_config import decode_settings, max_new_tokens_by_task, task_specs
from mmtune.eval.generate import DecodeSettings, generate_file, generate_prompts, generate_tokenized
from mmtune.eval.tasks import TaskError

DECODE_FIELDS = {"batch_size", "max_new_tokens", "do_sample", "temperature", "top_p", "seed"}


def test_every_generation_entry_point_takes_one_settings_object():
    entry_points = [generate_tokenized, generate_prompts, generate_file, EvalModel.generate,
                    *(cls.generate for cls in BACKENDS.values())]
    for fn in entry_points:
        params = inspect.signature(fn).parameters
        assert "settings" in params, fn.__qualname__
        assert not DECODE_FIELDS & set(params), f"{fn.__qualname__} still spells out {DECODE_FIELDS & set(params)}"


def test_decode_settings_check_and_replace():
    with pytest.raises(MMTuneError, match="batch_size must be >= 1, got 0"):
        DecodeSettings(batch_size=0)
    with pytest.raises(MMTuneError, match="batch_size must be >= 1"):
        DecodeSettings.of(DecodeSettings(), batch_size=-1)
    with pytest.raises(TypeError, match=r"unknown generation setting\(s\) \['max_tokens'\]"):
        DecodeSettings.of(max_tokens=8)
    base = DecodeSettings(batch_size=4, do_sample=True, temperature=0.5, seed=1)
    assert DecodeSettings.of(base, max_new_tokens=8) == DecodeSettings(4, 8, True, 0.5, 1.0, 1)
    assert DecodeSettings.of(base) is base and DecodeSettings.of() == DecodeSettings()


def test_decode_settings_from_the_eval_config():
    greedy = decode_settings(GenerationSettings(batch_size=3, seed=7), 12)
    assert greedy == DecodeSettings(batch_size=3, max_new_tokens=12, seed=None)  # greedy draws nothing
    sampled = decode_settings(GenerationSettings(do_sample=True, temperature=0.7, top_p=0.9, seed=7), 5)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.seed) == (True, 0.7, 0.9, 7)


# Keys computed by the code before the split (eval/run.py's cache_key and _generation_settings):
# a changed key would silently regenerate every answer a user has cached.
PROMPT = "USER: <image>\nQ? ASSISTANT:"


def test_cache_keys_are_unchanged_by_the_split():
    greedy = decode_settings(GenerationSettings(), 16)
    assert cache_key("fp", "vqa", "r1", PROMPT, ["/a.png"], cache_settings(greedy, "float32")) == \
        "e08016f785252878aecdfd16860907b5e6c243f559401d1d2de6d0d25a5f327a"
    sampled = decode_settings(GenerationSettings(do_sample=True, temperature=0.7, top_p=0.9, seed=3), 16)
    assert cache_key("fp", "vqa", "r1", PROMPT, ["/a.png"], cache_settings(sampled, "bfloat16")) == \
        "a4ba05d12aaa338ba1656ed4266b71ebe59331627dfa24aca9ca02b68081c953"
    # The batch size changes speed only, never the key.
    assert cache_settings(DecodeSettings.of(greedy, batch_size=1), "float32") == cache_settings(greedy, "float32")


def test_answer_length_precedence_and_unique_task_names():
    cfg = EvalConfig(tasks=["pope", {"preset": "vqav2", "name": "own", "max_new_tokens": 3}, "mme"],
                     generation=GenerationSettings(max_new_tokens=None))
    specs = task_specs(cfg)
    lengths = max_new_tokens_by_task(cfg, specs)
    assert lengths["own"] == 3  # the task's own entry first
    assert lengths["pope"] == (specs[0].max_new_tokens or 64)  # then the preset's, then 64
    cfg.generation.max_new_tokens = 9  # generation.max_new_tokens beats the preset, not the task entry
    assert max_new_tokens_by_task(cfg, specs) == {"pope": 9, "own": 3, "mme": 9}
    with pytest.raises(TaskError, match="task name 'pope' is used twice"):
        task_specs(EvalConfig(tasks=["pope", "pope"]))
