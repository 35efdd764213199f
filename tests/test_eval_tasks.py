"""mmtune.eval.tasks: presets, the unseen-task split, modes, prompts and few-shot example choice (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtune.data.schema import Record, write_records
from mmtune.data.templates import get_template
from mmtune.eval.tasks import (
    COT_SUFFIX,
    MULTIPLE_CHOICE_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    ShotSampler,
    TaskError,
    build_prompt,
    describe_split,
    extract_answer,
    get_task,
    list_presets,
    load_task,
    parse_mode,
    resolve_task,
    split_unseen,
)


def rec(rid: str, task: str, answer: str, *, image: bool = False, cluster: str | None = None,
        choices: list[str] | None = None, answers: list[str] | None = None) -> Record:
    text = ("<image>\n" if image else "") + f"question {rid}?"
    return Record(
        id=rid, messages=[{"role": "user", "content": text}, {"role": "assistant", "content": answer}],
        images=[f"/imgs/{rid}.png"] if image else [], task=task,
        answers=answers if answers is not None else [answer] * 3, choices=choices,
        meta={"cluster": cluster} if cluster else {},
    )


def pool() -> list[Record]:
    out = []
    for task, cluster, image in (("colour", "vision", True), ("shape", "vision", True), ("count", "vision", True),
                                 ("add", "text", False), ("upper", "text", False)):
        out += [rec(f"{task}-{i}", task, f"{task}{i}", image=image, cluster=cluster) for i in range(6)]
    return out


# --------------------------------------------------------------------------- #
# presets
# --------------------------------------------------------------------------- #


def test_presets_ship_with_llava_prompts_and_metrics():
    assert set(list_presets()) >= {"vqav2", "gqa", "scienceqa", "pope"}
    assert SHORT_ANSWER_SUFFIX == "\nAnswer the question using a single word or phrase."
    assert MULTIPLE_CHOICE_SUFFIX == "\nAnswer with the option's letter from the given choices directly."
    v, g, s, p = (get_task(n) for n in ("vqav2", "gqa", "scienceqa", "pope"))
    assert (v.metric, v.vqa_rule, v.instruction_suffix) == ("vqa", "evalai", SHORT_ANSWER_SUFFIX)
    assert (g.metric, g.instruction_suffix) == ("exact_match", SHORT_ANSWER_SUFFIX)
    assert (s.metric, s.instruction_suffix) == ("multiple_choice", MULTIPLE_CHOICE_SUFFIX)
    assert (p.metric, p.instruction_suffix) == ("pope", SHORT_ANSWER_SUFFIX)
    assert v.name == "vqav2" and v.max_new_tokens == 128


def test_task_entries_override_presets_and_fail_clearly():
    spec = resolve_task({"name": "count", "preset": "vqav2", "max_new_tokens": 8, "suffix": "\nOne word."})
    assert (spec.name, spec.metric, spec.max_new_tokens, spec.instruction_suffix) == ("count", "vqa", 8, "\nOne word.")
    assert resolve_task({"name": "raw", "metric": "exact_match", "prompt": "free"}).instruction_suffix == ""
    with pytest.raises(TaskError, match="unknown task preset 'vqa2'; did you mean 'vqav2'"):
        resolve_task("vqa2")
    with pytest.raises(TaskError, match="did you mean 'task.metric'"):
        resolve_task({"name": "x", "metrc": "vqa"}, "task")
    with pytest.raises(TaskError, match="unknown metric 'bleu'"):
        resolve_task({"name": "x", "metric": "bleu"})
    with pytest.raises(TaskError, match="needs a name"):
        resolve_task({"metric": "vqa"})


# --------------------------------------------------------------------------- #
# unseen split
# --------------------------------------------------------------------------- #


def test_split_unseen_by_task_and_cluster():
    recs = pool()
    train, held = split_unseen(recs, holdout_tasks=["count"])
    assert {r.task for r in held} == {"count"} and len(held) == 6 and len(train) == 24
    train, held = split_unseen(recs, holdout_clusters=["text"])
    assert {r.task for r in held} == {"add", "upper"} and {r.task for r in train} == {"colour", "shape", "count"}
    train, held = split_unseen(recs, holdout_tasks=["colour"], holdout_clusters=["text"])
    info = describe_split(train, held, ["colour"], ["text"])
    assert info["unseen_tasks"] == ["add", "colour", "upper"]
    assert info["counts"] == {"train": 12, "heldout": 18, "train_by_task": {"count": 6, "shape": 6},
                              "heldout_by_task": {"add": 6, "colour": 6, "upper": 6}}
    assert info["tasks_in_both"] == []
    with pytest.raises(TaskError, match="holdout task 'cnt' matches no record in the pool; did you mean 'count'"):
        split_unseen(recs, holdout_tasks=["cnt"])
    with pytest.raises(TaskError, match="holdout cluster 'txt'"):
        split_unseen(recs, holdout_clusters=["txt"])


def test_describe_split_flags_a_task_on_both_sides():
    recs = pool() + [rec("add-x", "add", "1", cluster="vision")]
    train, held = split_unseen(recs, holdout_clusters=["vision"])
    assert describe_split(train, held, [], ["vision"])["tasks_in_both"] == ["add"]


# --------------------------------------------------------------------------- #
# modes and prompts
# --------------------------------------------------------------------------- #


def test_parse_mode():
    assert parse_mode("zero-shot").k == 0 and parse_mode("0-shot").name == "zero-shot"
    assert parse_mode("few-shot", k=3).name == "3-shot" and parse_mode("few-shot", k=3).k == 3
    assert parse_mode("2-shot").k == 2 and parse_mode("cot").cot
    with pytest.raises(TaskError, match="unknown mode 'one-shot'"):
        parse_mode("one-shot")
    with pytest.raises(TaskError, match="k >= 1"):
        parse_mode("few-shot", k=0)


def test_zero_shot_prompt_is_the_question_plus_the_suffix():
    spec = get_task("vqav2")
    p = build_prompt(rec("q", "count", "3", image=True), spec, parse_mode("zero-shot"))
    assert p.messages == [{"role": "user", "content": "<image>\nquestion q?" + SHORT_ANSWER_SUFFIX}]
    assert p.images == ["/imgs/q.png"]
    text = get_template("vicuna_v1").render_text(p.messages, add_generation_prompt=True)
    assert text.endswith("USER: <image>\nquestion q?\nAnswer the question using a single word or phrase. ASSISTANT:")


def test_multiple_choice_prompt_lists_choices_once():
    spec = get_task("scienceqa")
    q = rec("q", "sqa", "Paris", choices=["London", "Paris"], answers=["Paris"])
    p = build_prompt(q, spec, parse_mode("zero-shot"))
    assert p.messages[-1]["content"] == "question q?\nA. London\nB. Paris" + MULTIPLE_CHOICE_SUFFIX
    listed = Record(id="l", messages=[{"role": "user", "content": "Where?\nA. London\nB. Paris"}],
                    choices=["London", "Paris"], answers=["B"])
    assert build_prompt(listed, spec, parse_mode("zero-shot")).messages[-1]["content"] == \
        "Where?\nA. London\nB. Paris" + MULTIPLE_CHOICE_SUFFIX
    cot = build_prompt(q, spec, parse_mode("cot")).messages[-1]["content"]
    assert cot.startswith("question q?\nA. London\nB. Paris\nThink step by step") and "option's letter" in cot


def test_few_shot_examples_come_from_training_tasks_only_and_are_deterministic():
    recs = pool()
    spec = resolve_task({"name": "count", "preset": "vqav2"})
    sampler = ShotSampler(recs, spec, holdout_tasks=["count"], seed=0)
    assert sampler.heldout_removed == 6
    queries = [r for r in recs if r.task == "count"]
    mode = parse_mode("3-shot")
    chosen = {}
    for q in queries:
        shots = sampler.sample(q, 3)
        assert len(shots) == 3 and len({s.id for s in shots}) == 3
        assert all(s.task in ("colour", "shape") for s in shots)  # training tasks, same modality (image)
        chosen[q.id] = [s.id for s in shots]
        p = build_prompt(q, spec, mode, shots)
        users = [m for m in p.messages if m["role"] == "user"]
        answers = [m["content"] for m in p.messages if m["role"] == "assistant"]
        assert len(users) == 4 and all(u["content"].endswith(SHORT_ANSWER_SUFFIX) for u in users)
        assert users[-1]["content"] == f"<image>\nquestion {q.id}?{SHORT_ANSWER_SUFFIX}"
        assert answers == [s.messages[1]["content"] for s in shots]
        assert p.images == [f"/imgs/{i}.png" for i in chosen[q.id]] + [f"/imgs/{q.id}.png"]
        assert p.meta["few_shot"] == chosen[q.id]
        text = get_template("vicuna_v1").render_text(p.messages, add_generation_prompt=True)
        assert text.count(SHORT_ANSWER_SUFFIX) == 4 and text.count("</s>") == 3 and text.endswith("ASSISTANT:")
    again = ShotSampler(recs, spec, holdout_tasks=["count"], seed=0)
    assert all([s.id for s in again.sample(q, 3)] == chosen[q.id] for q in queries)
    other = ShotSampler(recs, spec, holdout_tasks=["count"], seed=1)
    assert any([s.id for s in other.sample(q, 3)] != chosen[q.id] for q in queries)


def test_text_queries_prefer_text_examples_and_never_themselves():
    recs = pool()
    spec = resolve_task({"name": "add", "preset": "vqav2"})
    sampler = ShotSampler(recs, spec, seed=0)  # nothing held out: the task is seen
    q = next(r for r in recs if r.id == "add-0")
    for seed in range(20):
        sampler.seed = seed
        shots = sampler.sample(q, 11)  # 12 text records minus the query = exactly 11
        assert {s.task for s in shots} <= {"add", "upper"} and q.id not in {s.id for s in shots}


def test_multiple_choice_examples_answer_with_letters():
    shots_pool = [rec(f"m{i}", "mc_train", c, choices=["x", "y", "z"], answers=[c]) for i, c in enumerate("xyzx")]
    spec = resolve_task({"name": "sqa", "preset": "scienceqa"})
    q = rec("q", "sqa", "B", choices=["a", "b"], answers=["B"])
    shots = ShotSampler(shots_pool, spec, seed=0).sample(q, 2)
    p = build_prompt(q, spec, parse_mode("2-shot"), shots)
    letters = {"x": "A", "y": "B", "z": "C"}
    assert [m["content"] for m in p.messages if m["role"] == "assistant"] == \
        [letters[s.answers[0]] for s in shots]
    assert all("\nA. x\nB. y\nC. z" + MULTIPLE_CHOICE_SUFFIX in m["content"]
               for m in p.messages[:-1] if m["role"] == "user")


def test_too_few_examples_is_a_clear_error():
    spec = resolve_task({"name": "count", "preset": "vqav2"})
    sampler = ShotSampler(pool()[:8], spec, holdout_tasks=["colour"])  # 6 colour held out, 2 shape left
    with pytest.raises(TaskError, match="4-shot needs 4 solved examples but the shot pool has 2 usable"):
        sampler.sample(rec("q", "count", "1", image=True), 4)


def test_cot_answers_are_read_after_the_marker():
    vqa, mc = get_task("vqav2"), get_task("scienceqa")
    cot, zero = parse_mode("cot"), parse_mode("zero-shot")
    out = "There are two. So the answer is three, no wait. The answer is 2."
    assert extract_answer(out, cot, vqa) == "2"
    assert extract_answer(out, zero, vqa) == out
    assert extract_answer("Hmm. The answer is B.", cot, mc) == "The answer is B."
    assert extract_answer("no marker here", cot, vqa) == "no marker here"
    assert COT_SUFFIX.startswith("\nThink step by step")


# --------------------------------------------------------------------------- #
# loading task records
# --------------------------------------------------------------------------- #


def test_load_task_checks_records(tmp_path: Path):
    recs = pool()
    count = load_task(resolve_task({"name": "count", "preset": "vqav2", "limit": 4}), recs)
    assert [r.id for r in count.records] == [f"count-{i}" for i in range(4)]
    with pytest.raises(TaskError, match="no records with task cnt"):
        load_task(resolve_task({"name": "cnt", "preset": "vqav2"}), recs)
    with pytest.raises(TaskError, match="record 'count-0' has no 'choices'"):
        load_task(resolve_task({"name": "count", "preset": "scienceqa"}), recs)
    with pytest.raises(TaskError, match="must be yes/no for metric pope, got 'count0'"):
        load_task(resolve_task({"name": "count", "preset": "pope"}), recs)
    bare = [rec(f"b{i}", "bare", "x", answers=[]) for i in range(3)]
    for r in bare:
        r.answers = None
    path = tmp_path / "bare.jsonl"
    write_records(bare, path)
    with pytest.raises(TaskError, match="none of the 3 records in .*bare.jsonl has 'answers'"):
        load_task(resolve_task({"name": "bare", "preset": "gqa", "records": str(path)}))
    ok = load_task(resolve_task({"name": "bare", "preset": "gqa", "records": str(path), "answers_from_assistant": True}))
    assert [r.answers for r in ok.records] == [["x"]] * 3
    rel = tmp_path / "rel.jsonl"
    rel.write_text(json.dumps({"id": "r", "messages": [{"role": "user", "content": "<image>\nq"}],
                               "images": ["a.png"], "answers": ["1"]}) + "\n")
    loaded = load_task(resolve_task({"name": "rel", "preset": "vqav2", "records": str(rel),
                                     "image_root": str(tmp_path)}))
    assert loaded.records[0].images == [str(tmp_path / "a.png")]


def test_example_eval_configs_load():
    from mmtune.config import EvalConfig
    from mmtune.eval.eval_config import load_eval_config
    from mmtune.eval.eval_config import model_entries as _model_entries

    paths = sorted((Path(__file__).resolve().parents[1] / "configs" / "eval").glob("*.yaml"))
    assert {p.name for p in paths} >= {"unseen_synthetic.yaml", "llava15_benchmarks.yaml"}
    for p in paths:
        cfg = load_eval_config(p)
        assert isinstance(cfg, EvalConfig) and _model_entries(cfg)
        specs = [resolve_task(t) for t in cfg.tasks]
        assert specs and all(s.metric for s in specs)
        modes = [parse_mode(m, cfg.k) for m in cfg.modes]
        assert modes
