"""The demo's probe scripts (scripts/probe_demo_*.py) behind README's analysis of what the demo's model learns."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from mmtune.demo import DEMO_BASES

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scene_prompts_state_the_scene_and_ask_for_one_derived_fact() -> None:
    probe = _script("probe_demo_lm")
    prompts = probe.scene_prompts(5)
    assert set(prompts) == {"position", "colour", "count", "shape"}
    for pairs in prompts.values():
        assert len(pairs) == 5
        for prompt, answer in pairs:
            assert prompt.startswith("The picture shows a ") and not prompt.endswith(".")
            assert "?" not in prompt  # the corpus's prose, not a question
            assert answer and answer not in prompt.split(".")[1]  # the answer is derived, not restated
    assert {a for _, a in prompts["position"]} <= {"left", "right"}
    assert probe.scene_prompts(5) == prompts  # seeded


def test_the_shipped_lm_reads_its_context() -> None:
    """README: the base LM names the word of the sentence before again, so its answer varies with its context."""
    probe = _script("probe_demo_lm")
    hits, asked, top, count = probe.probe_copy(DEMO_BASES / "lm", 30)
    assert asked == 30 and hits >= 27, (hits, top, count)
    assert count <= 5  # not one favourite word whatever came before (the old corpus's base: 'goat' every time)


def test_the_shipped_lm_reads_colour_from_a_description_but_not_position() -> None:
    """README: after "The picture shows a red circle and a blue square.", the base finishes "The circle is" with
    the circle's colour for most scenes, and "The red circle is on the" at chance, with the same side every time."""
    probe = _script("probe_demo_lm")
    hits = probe.probe_scenes(DEMO_BASES / "lm", 40, tasks=("colour", "position"))
    colour, position = hits["colour"], hits["position"]
    assert colour[0] >= 20, colour  # 24 of 40 (69 of 100 in README); the earlier base: 8 of 40
    assert 12 <= position[0] <= 28 and position[3] == 40, position  # chance is 20 of 40, one side for all


def test_describe_align_run_saves_what_probe_demo_task_starts_from(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    align = _script("probe_demo_align")
    out = tmp_path / "probe"
    assert align.main(["--out", str(out), "--captions", "8", "--frozen-steps", "1", "--unfrozen-steps", "1",
                       "--describe-scenes", "8", "--test-scenes", "3"]) == 0
    text = capsys.readouterr().out
    found = re.search(r"3 new two-shape scenes captioned exactly: (\d+); right objects in the right order: (\d+)", text)
    assert found and 0 <= int(found[1]) <= int(found[2]) <= 3
    ckpt = out / "describe" / "checkpoint-1"  # 8 scenes at batch 16: one step, one pass
    assert (ckpt / "lm" / "config.json").is_file() and (ckpt / "tokenizer").is_dir()
    scenes = (out / "scenes" / "scenes.jsonl").read_text().splitlines()
    assert len(scenes) == 8 and all(re.search(r"(one|two|three) shapes?: a ", line) for line in scenes)

    task = _script("probe_demo_task")
    with pytest.raises(SystemExit) as exc:  # an align run without its LM (projector-only) is refused by name
        task.main(["--task", "position", "--out", str(tmp_path / "task"), "--align-from", str(out / "frozen_lm")])
    assert exc.value.code == 2
    assert "no lm/ and tokenizer/" in capsys.readouterr().err
    assert not (tmp_path / "task").exists()
