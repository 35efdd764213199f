"""Training-data features of `mmtune train`: validation loss, weighted mixtures, img2dataset shards, trackers.

Tiny CPU runs of configs/tiny_llm.yaml / tiny_mllm.yaml, a few steps each.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import cpu_launch_env, free_port

from mmtune.cli import main
from mmtune.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "train"
TEXT = FIX / "text.jsonl"
MIXED = FIX / "mixed.jsonl"


pytestmark = pytest.mark.usefixtures("one_thread")


def llm_args(out, *extra, data=f"[{TEXT}]"):
    return ["train", str(REPO / "configs" / "tiny_llm.yaml"), "--output-dir", str(out), f"data.train={data}",
            f"model.tokenizer.train_files=[{TEXT}]", "train.batch_size=4", "train.progress=false", *extra]


def train_rows(out):
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def eval_rows(out):
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "eval_loss" in r]


# --------------------------------------------------------------------------- #
# Validation during training
# --------------------------------------------------------------------------- #


def test_validation_loss_logged_plotted_and_best_kept(tmp_path):
    from mmtune.config import RunConfig, load_config
    from mmtune.model.io import load_model
    from mmtune.train.validate import ValidationSet

    out = tmp_path / "val"
    args = llm_args(out, "--max-steps", "6", f"data.eval=[{TEXT}]", "train.eval_every=2", "train.eval_samples=5",
                    "train.save_best=true", "train.save_every=2", "train.save_total_limit=0", "train.lr=3e-3")
    assert main(args) == 0
    evals = eval_rows(out)
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(math.isfinite(r["eval_loss"]) and r["eval_examples"] == 5 and r["eval_tokens"] > 0 for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns; eval data shares the text fixtures' style
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the validation loss is the model's at that step: recompute step 6's from checkpoint-6
    cfg = load_config(out / "run_config.yaml", RunConfig)
    bundle = load_model(out / "checkpoint-6")
    again = ValidationSet(cfg, bundle, rank=0, world_size=1).evaluate(bundle.model, "cpu", lambda t: t)
    assert again.loss == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert again.examples == 5
    # save_best: DIR/best holds the model of the lowest validation loss, and says which step that was
    best = min(evals, key=lambda r: r["eval_loss"])
    info = json.loads((out / "best" / "best.json").read_text())
    assert info["step"] == best["step"] and info["eval_loss"] == pytest.approx(best["eval_loss"])
    a = load_model(out / "best").model.state_dict()
    b = load_model(out / f"checkpoint-{best['step']}").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # validation does not disturb training: the same run without data.eval has the same losses
    plain = tmp_path / "plain"
    assert main(llm_args(plain, "--max-steps", "6", "train.lr=3e-3")) == 0
    assert [r["loss"] for r in train_rows(out)] == pytest.approx([r["loss"] for r in train_rows(plain)], abs=1e-7)


def test_kill_during_best_save_keeps_previous_best_and_the_next_run_clears_the_temp(tmp_path):
    """SIGKILL half way through writing best/ (step 4's new best): best/ is still step 2's, whole and loadable;
    resuming removes DIR/.tmp-best and writes step 4's best/ again."""
    import subprocess
    import sys

    from mmtune.model.io import load_model

    def same_weights(x, y):
        a, b = load_model(x).model.state_dict(), load_model(y).model.state_dict()
        return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "run"
    args = llm_args(out, "--max-steps", "4", f"data.eval=[{TEXT}]", "train.eval_every=2", "train.eval_samples=5",
                    "train.save_best=true", "train.save_every=2", "train.lr=3e-3")
    proc = subprocess.run([sys.executable, "-m", "mmtune.cli", *args], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MMTUNE_FAULT_INJECT": "kill_during_best_save@4",
                                                       "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    half = out / ".tmp-best"
    assert (half / "model_config.yaml").is_file() and not (half / "best.json").exists()  # killed mid-save
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 2
    assert same_weights(out / "best", out / "checkpoint-2")
    assert main([*args, "--resume-from", "latest"]) == 0  # from checkpoint-2: step 4 validates and saves again
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    [row] = [r for r in eval_rows(out) if r["step"] == 4]
    assert json.loads((out / "best" / "best.json").read_text()) == {"step": 4, "eval_loss": row["eval_loss"]}
    assert same_weights(out / "best", out / "checkpoint-4")


def test_validation_equal_steps_pads_without_counting():
    """The FSDP path: every process runs the same number of forwards; the repeats add nothing."""
    from helpers import build_tiny

    from mmtune.train.validate import ValidationSet

    bundle, cfg = build_tiny("tiny_llm")
    cfg.data.eval = [str(TEXT)]
    cfg.train.batch_size = 5
    vs = ValidationSet(cfg, bundle, rank=0, world_size=1)
    calls = []
    model = bundle.model
    forward = model.forward
    model.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    plain = vs.evaluate(model, "cpu", lambda t: t)
    n_plain = len(calls)
    padded = vs.evaluate(model, "cpu", lambda t: t, equal_steps=lambda n: n + 3)
    assert len(calls) - n_plain == n_plain + 3 == 5 + 3  # 24 records in batches of 5
    assert padded.loss == pytest.approx(plain.loss, rel=1e-9) and padded.examples == plain.examples == 24


def test_validation_config_errors(tmp_path, capsys):
    assert main(llm_args(tmp_path / "x", "--max-steps", "2", "train.eval_every=2")) == 2
    assert "data.eval" in capsys.readouterr().err
    assert main(llm_args(tmp_path / "y", "--max-steps", "2", f"data.eval=[{TEXT}]", "train.eval_samples=-1")) == 2


# --------------------------------------------------------------------------- #
# Weighted mixtures
# --------------------------------------------------------------------------- #


def second_source(tmp_path) -> Path:
    """text.jsonl again with other ids: a source the same size as the first (so a plain concat gives 50/50)."""
    out = tmp_path / "b.jsonl"
    rows = [json.loads(line) for line in TEXT.read_text().splitlines() if line.strip()]
    out.write_text("".join(json.dumps({**r, "id": "b-" + r["id"]}) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from helpers import build_tiny

    bundle, _ = build_tiny("tiny_llm")
    return bundle.tokenizer


def mixture(tokenizer, paths, weights, seed=0):
    from mmtune.data.mixture import MixtureStream
    from mmtune.data.stream import ExampleStream

    streams = [ExampleStream([str(p)], tokenizer, "vicuna_v1", max_length=256, epochs=None, seed=seed,
                             shuffle_buffer=8) for p in paths]
    return MixtureStream(streams, weights, names=[str(p) for p in paths], seed=seed)


def test_mixture_ratio_epochs_and_resume(tmp_path, tokenizer):
    b = second_source(tmp_path)
    mix = mixture(tokenizer, [TEXT, b], [0.7, 0.3])
    n = 1500
    it = iter(mix)
    ids = [next(it)[0].id for _ in range(n)]
    share = sum(not i.startswith("b-") for i in ids) / n
    # binomial sd = sqrt(0.7 * 0.3 / 1500) = 0.012; a concatenation of the two equal sources would give 0.5
    assert abs(share - 0.7) < 0.045
    counts = mix.source_counts
    assert counts == {str(TEXT): n - sum(i.startswith("b-") for i in ids), str(b): sum(i.startswith("b-") for i in ids)}
    # each source counts its own epochs (24 records each): the heavier one has gone round more often
    assert mix.epochs == {name: (c - 1) // 24 for name, c in counts.items()}
    assert mix.epochs[str(TEXT)] > mix.epochs[str(b)]
    # every record of a source appears once per epoch of that source
    a_ids = [i for i in ids if not i.startswith("b-")][:48]
    assert len(set(a_ids[:24])) == 24 and set(a_ids[:24]) == set(a_ids[24:48])

    # resume: a fresh mixture loaded with the state after 37 examples continues exactly
    ref = mixture(tokenizer, [TEXT, b], [0.7, 0.3])
    it = iter(ref)
    for _ in range(37):
        next(it)
    state = json.loads(json.dumps(ref.state_dict()))  # as it goes through a checkpoint
    want = [next(it)[0].id for _ in range(60)]
    again = mixture(tokenizer, [TEXT, b], [0.7, 0.3])
    again.load_state_dict(state)
    it2 = iter(again)
    assert [next(it2)[0].id for _ in range(60)] == want
    assert again.source_counts == ref.source_counts
    with pytest.raises(Exception, match="weights"):
        mixture(tokenizer, [TEXT, b], [0.5, 0.5]).load_state_dict(state)


def test_mixture_training_resumes_exactly_and_logs_sources(tmp_path):
    b = second_source(tmp_path)
    data = f"[{{path: {TEXT}, weight: 3}}, {{path: {b}, weight: 1}}]"
    common = ("--max-steps", "6", "train.save_every=3", "train.save_total_limit=0")
    full, cut = tmp_path / "full", tmp_path / "cut"
    os.environ["MMTUNE_TRACE_BATCHES"] = "1"
    try:
        assert main(llm_args(full, *common, data=data)) == 0
        os.environ["MMTUNE_FAULT_INJECT"] = "sigterm@4"
        assert main(llm_args(cut, *common, data=data)) == 143
        del os.environ["MMTUNE_FAULT_INJECT"]
        assert main(llm_args(cut, *common, "--resume-from", "latest", data=data)) == 0
    finally:
        os.environ.pop("MMTUNE_TRACE_BATCHES", None)
        os.environ.pop("MMTUNE_FAULT_INJECT", None)

    def trace(out):
        return [(r["step"], tuple(r["ids"])) for r in map(json.loads, (out / "batches.jsonl").read_text().splitlines())]

    assert trace(full) == trace(cut)
    assert [r["loss"] for r in train_rows(full)] == pytest.approx([r["loss"] for r in train_rows(cut)], abs=1e-6)
    rows = train_rows(full)
    assert all(set(r["sources"]) == {str(TEXT), str(b)} for r in rows)
    last = rows[-1]["sources"]
    assert sum(last.values()) >= 24  # every example that reached a batch was counted by its source
    assert rows[-1]["sources"] == train_rows(cut)[-1]["sources"]
    trained = [i for _, ids in trace(full) for i in ids]
    assert any(i.startswith("b-") for i in trained) and any(not i.startswith("b-") for i in trained)


# --------------------------------------------------------------------------- #
# img2dataset shards for stage align
# --------------------------------------------------------------------------- #

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle", "a green circle"]


def img2dataset_folder(tmp_path) -> Path:
    """What `img2dataset --output_format webdataset --caption_col caption` writes: NNNNN.tar with
    KEY.jpg + KEY.txt + KEY.json per sample and NNNNN_stats.json (successes) next to it."""
    import io
    import tarfile

    from PIL import Image

    out = tmp_path / "cc_shards"
    out.mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    for shard in range(2):
        members = []
        for j, caption in enumerate(CAPTIONS[shard * 3: shard * 3 + 3]):
            key = f"{shard:05d}{j:04d}"
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), colours[caption.split()[1]]).save(buf, "JPEG")
            info = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "width": 40, "height": 30}
            members.append((f"{key}.jpg", buf.getvalue()))
            if j == 1:  # caption only in the json (img2dataset with --save_additional_columns, no txt)
                info["caption"] = caption
            else:
                members.append((f"{key}.txt", caption.encode()))
            members.append((f"{key}.json", json.dumps(info).encode()))
        if shard == 1:  # one sample with no caption at all: counted, not trained
            members += [("000010009.jpg", members[0][1]), ("000010009.json", b'{"key": "000010009"}')]
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for name, data in members:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
        n = 3 + (shard == 1)
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n, "failed_to_download": 0}))
    return out


def test_img2dataset_shards_stream_as_plain_caption_records(tmp_path, tokenizer):
    from mmtune.data.encode import IGNORE_INDEX
    from mmtune.data.shards import expand_shards, is_shard_source, iter_records
    from mmtune.data.stream import ExampleStream

    folder = img2dataset_folder(tmp_path)
    assert is_shard_source(str(folder)) and len(expand_shards(str(folder))) == 2
    recs = {r.id: r for r in iter_records(str(folder))}
    assert len(recs) == 6  # the caption-less sample is not a record
    r = recs["000000001"]
    assert r.messages == [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a blue square"}]
    assert r.task == "caption" and r.meta["url"].endswith("000000001.jpg")
    stream = ExampleStream([str(folder)], tokenizer, "plain", max_length=128, num_image_tokens=4,
                           image_transform=lambda img: __import__("torch").zeros(3, 8, 8), shuffle=False, epochs=1)
    examples = list(stream)
    assert len(examples) == 6 and stream.skip_counts == {"invalid_record": 1}
    ex, images = examples[0]
    assert len(images) == 1
    trained = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    assert tokenizer.decode(trained).strip() == CAPTIONS[0]  # only the caption (and its "\n") is trained


def test_stage_align_trains_on_img2dataset_shards(tmp_path):
    folder = img2dataset_folder(tmp_path)
    out = tmp_path / "align"
    args = ["train", str(REPO / "configs" / "tiny_mllm.yaml"), "--output-dir", str(out), f"data.train=[{folder}]",
            f"model.tokenizer.train_files=[{MIXED}]", "data.template=plain", "train.stage=align",
            "train.batch_size=3", "data.group_by_length=false", "train.progress=false", "--max-steps", "3"]
    os.environ["MMTUNE_TRACE_BATCHES"] = "1"
    try:
        assert main(args) == 0
    finally:
        os.environ.pop("MMTUNE_TRACE_BATCHES", None)
    rows = train_rows(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert set(rows[-1]["skips"]) == {"invalid_record"}  # the caption-less sample, once per epoch streamed
    ids = {i for line in (out / "batches.jsonl").read_text().splitlines() for i in json.loads(line)["ids"]}
    assert ids == {"000000000", "000000001", "000000002", "000010000", "000010001", "000010002"}


# --------------------------------------------------------------------------- #
# Experiment trackers
# --------------------------------------------------------------------------- #


def test_report_to_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "tracked"
    assert main(llm_args(out, "--max-steps", "3", "train.report_to=[tensorboard, wandb]", f"data.eval=[{TEXT}]",
                         "train.eval_samples=4")) == 0
    # tensorboard: every metrics row's numbers, at its step, and the run config as hparams
    events = list((out / "trackers" / out.name).rglob("events.out.tfevents.*"))
    assert events
    scalars: dict[str, list[tuple[int, float]]] = {}
    for ev in events:
        acc = EventAccumulator(str(ev))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    rows = train_rows(out)
    assert sorted(scalars["loss"]) == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert [s for s, _ in scalars["eval_loss"]] == [3]
    hparams = next((out / "trackers" / out.name).rglob("hparams.yml")).read_text()
    assert "train.lr: 0.001" in hparams and "data.template: vicuna_v1" in hparams
    assert not (out / "tb").exists()  # report_to replaces the implicit DIR/tb
    # wandb, offline: a local run (its records file, what `wandb sync` uploads) with the config and the history
    runs = list((out / "trackers" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert b"train.report_to" in data and b"data.template" in data  # the run config
    assert b"eval_loss" in data and b"tokens_per_s" in data  # the logged rows


def test_report_to_mlflow_logs_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")  # mlflow's database store (the full mlflow package, not mlflow-skinny)
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # mlflow's own default would put mlflow.db here; it must not
    out = tmp_path / "tracked"
    assert main(llm_args(out, "--max-steps", "3", "train.report_to=[mlflow]")) == 0
    db = out / "trackers" / "mlflow.db"
    assert db.is_file() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    (exp,) = [e for e in client.search_experiments() if e.name == out.name]
    (run,) = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    rows = train_rows(out)
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert run.data.params["data.template"] == "vicuna_v1"  # the run config as parameters


def test_report_to_names_the_missing_package(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(llm_args(tmp_path / "a", "--max-steps", "1", "train.report_to=[mlflow]")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install mlflow" in err
    assert not (tmp_path / "a" / "checkpoint-1").exists()
    assert main(llm_args(tmp_path / "b", "--max-steps", "1", "train.report_to=[tensorbord]")) == 2
    assert "did you mean 'tensorboard'" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Two processes: validation sums over ranks, mixtures draw per rank
# --------------------------------------------------------------------------- #


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_processes_validation_and_mixture(tmp_path):
    import subprocess
    import sys

    from mmtune.config import RunConfig, load_config
    from mmtune.model.io import load_model
    from mmtune.train.validate import ValidationSet

    port = free_port()
    b = second_source(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "mmtune.cli", *llm_args(out, "--max-steps", "3", f"data.eval=[{TEXT}]", "train.eval_every=3",
                                         "train.save_best=true", data=f"[{{path: {TEXT}, weight: 2}}, {b}]")]
    env = cpu_launch_env()
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [ev] = eval_rows(out)
    assert ev["step"] == 3 and ev["eval_examples"] == 24  # both ranks' halves of the 24 records
    # the loss summed over the two ranks equals one process's over the whole set
    cfg = load_config(out / "run_config.yaml", RunConfig)
    bundle = load_model(out / "checkpoint-3")
    one = ValidationSet(cfg, bundle, rank=0, world_size=1).evaluate(bundle.model, "cpu", lambda t: t)
    assert one.examples == 24 and one.loss == pytest.approx(ev["eval_loss"], rel=1e-4)
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 3
    rows = train_rows(out)
    assert all(sum(r["sources"].values()) >= r["examples"] for r in rows)  # counted on both ranks
