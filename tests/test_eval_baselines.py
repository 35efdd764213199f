"""HF baselines in `mmtune eval`: a llava-hf folder and a causal-LM folder next to mmtune runs, in one table.

The HF folders are `mmtune export`s of tiny random runs, so each must answer exactly like the run it came
from: the llava-hf backend prompts through the processor's chat template and image processor, the
causal-LM backend through the tokenizer's chat template, with their own `generate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import HF_CLIP, build_tiny, save_run, tiny_cfg

from mmtune.cli import main
from mmtune.config import VisionConfig
from mmtune.data.schema import write_records
from mmtune.data.synthetic import make_pool
from mmtune.eval import backends
from mmtune.eval.backends import detect_backend, open_model
from mmtune.model import build_model
from mmtune.model.export import export_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("baselines")
    cfg = tiny_cfg("tiny_mllm", initializer_range=0.3)
    # An HF CLIP tower: its export's default (torchvision) image processor gives mmtune's pixels exactly.
    cfg.model.vision = VisionConfig(backend="hf", config=HF_CLIP, feature_layer=-2)
    torch.manual_seed(0)
    save_run(build_model(cfg.model), cfg, d / "mm_run", template="vicuna_v1")
    export_checkpoint(d / "mm_run", d / "llava_hf", fmt="hf-llava")
    lm, lm_cfg = build_tiny("tiny_llm", seed=1, initializer_range=0.3)
    save_run(lm, lm_cfg, d / "lm_run", template="vicuna_v1")
    export_checkpoint(d / "lm_run", d / "lm_hf", fmt="hf")
    recs = make_pool(d / "pool", per_task=4, tasks=("colour", "exists", "add"), seed=0)
    write_records(recs, d / "pool.jsonl")
    return d


def test_backends_are_detected_from_the_folder(models):
    assert detect_backend(models / "mm_run") == "mmtune"
    assert detect_backend(models / "llava_hf") == "llava-hf"
    assert detect_backend(models / "lm_hf") == "causal-lm"
    with pytest.raises(Exception, match="did you mean 'llava-hf'"):
        open_model(models / "llava_hf", backend="llava_hf")


def test_hf_baselines_and_runs_in_one_table_then_cached(models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    cfg = {
        "models": {"mm_run": str(models / "mm_run"), "llava_hf": str(models / "llava_hf"),
                   "lm_run": str(models / "lm_run"), "lm_hf": str(models / "lm_hf")},
        "pool": [str(models / "pool.jsonl")],
        "holdout_tasks": [],
        "tasks": [{"name": "colour", "preset": "vqav2"}, {"name": "exists", "preset": "pope"},
                  {"name": "add", "preset": "gqa"}],
        "generation": {"max_new_tokens": 5, "batch_size": 3},
        "output_dir": str(out), "progress": False, "plot": False,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # models in this order
    assert main(["eval", str(path)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert {n: m["backend"] for n, m in report["models"].items()} == {
        "mm_run": "mmtune", "llava_hf": "llava-hf", "lm_run": "mmtune", "lm_hf": "causal-lm"}
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    by = {(r["model"], r["task"], r["id"]): r for r in rows}
    # The exports answer exactly like their runs (same prompt text, same greedy tokens).
    pairs = [("mm_run", "llava_hf", t) for t in ("colour", "exists", "add")] + [("lm_run", "lm_hf", "add")]
    for run, hf, task in pairs:
        ids = [i for (m, t, i) in by if m == run and t == task]
        assert ids
        for i in ids:
            assert by[(hf, task, i)]["prompt"] == by[(run, task, i)]["prompt"]
            assert by[(hf, task, i)]["output"] == by[(run, task, i)]["output"], (hf, task, i)
    outputs = {by[("llava_hf", "colour", i)]["output"] for (m, t, i) in by if m == "llava_hf" and t == "colour"}
    assert len(outputs) > 1  # the random model's answers depend on the input
    res = report["results"]
    for m in ("lm_run", "lm_hf"):  # text-only models: image tasks are counted skips, the text task is scored
        assert res[m]["colour"]["zero-shot"]["counted"] == 0
        assert res[m]["colour"]["zero-shot"]["skips"] == {"record has images but the model is text-only": 4}
        assert res[m]["add"]["zero-shot"]["counted"] == 4
    md = (out / "results.md").read_text().splitlines()
    assert md[0] == "| model | colour | exists | add |"
    assert md[2].startswith("| mm_run | ") and md[5].startswith("| lm_hf | ")
    assert "(0/4, 4 skipped)" in md[5] and "(4/4, 0 skipped)" in md[5]

    # Rerun: every cell comes from the cache; no model generates (or loads) anything.
    def fail(*a, **k):
        raise AssertionError("generation was called on a fully cached rerun")

    monkeypatch.setattr(backends, "generate_prompts", fail)
    monkeypatch.setattr(backends._HFBackend, "generate", fail)
    capsys.readouterr()
    assert main(["eval", str(path)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["totals"]["generated"] == 0 and again["totals"]["cached"] == report["totals"]["generated"]
    assert (out / "results.md").read_text().splitlines() == md


def test_causal_lm_without_chat_template_is_a_clear_error(models, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(models / "lm_hf", bare)
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    for f in bare.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(Exception, match="has no chat template"):
        open_model(bare)
    assert open_model(bare, template="vicuna_v1").render([{"role": "user", "content": "hi"}]).endswith("ASSISTANT:")


def test_path_that_is_no_model_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="not an mmtune checkpoint/run"):
        detect_backend(tmp_path / "empty")
    assert not Path(tmp_path / "empty" / "config.json").exists()


def test_judge_can_be_a_causal_lm_folder(models, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"id": str(i), "question": q, "prediction": x}) + "\n"
                         for i, (q, x) in enumerate([("2+2?", "4"), ("Sky colour?", "blue"), ("Capital of France?", "Paris")])))
    b.write_text("".join(json.dumps({"id": str(i), "prediction": x}) + "\n" for i, x in enumerate(["5", "green", "Rome"])))
    out = tmp_path / "judge"
    assert main(["analyze", "judge", str(a), str(b), "--judge", str(models / "lm_hf"), "--out", str(out),
                 "--no-progress"]) == 0
    rep = json.loads((out / "judge.json").read_text())
    assert rep["judge"]["backend"] == "causal-lm" and rep["judge"]["template"] == "tokenizer chat template"
    assert rep["win"] + rep["tie"] + rep["loss"] == 3
    assert sum(rep["position_bias"]["verdicts"].values()) == 6
