"""One end-to-end pass through the command line: convert -> select -> shard -> train -> generate -> eval -> export."""

import json
from pathlib import Path

import pytest

from mmtune.cli import COMMANDS, main

FIX = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: mmtune " + command in capsys.readouterr().out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "convert" in capsys.readouterr().out


def test_pipeline_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO)  # the tiny config names its fixture files relative to the repository
    pool = tmp_path / "pool.jsonl"
    # convert: a real LLaMA-Factory multimodal file plus mmtune's generated fixture records
    assert main(["convert", str(FIX / "data" / "mllm_demo.json"), str(FIX / "train" / "mixed.jsonl"),
                 "--out", str(pool), "--no-progress"]) == 0
    assert "converted 30, rejected 0" in capsys.readouterr().out
    # select: QDIT over the packaged MiniLM text encoder (text-only embeddings keep this fast)
    subset = tmp_path / "subset.jsonl"
    assert main(["select", str(pool), "--k", "20", "--method", "qdit", "--out", str(subset), "--text-only"]) == 0
    assert len(subset.read_text().splitlines()) == 20
    # shard the subset, train from the shards
    assert main(["shard", str(subset), "--out", str(tmp_path / "shards")]) == 0
    run = tmp_path / "run"
    assert main(["train", "configs/tiny_mllm.yaml", "--output-dir", str(run), "--max-steps", "4",
                 f"data.train=[{tmp_path / 'shards'}]", "data.image_root=null", "train.progress=false",
                 f"model.tokenizer.train_files=[{pool}]"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (run / "checkpoint-4").is_dir()
    capsys.readouterr()
    # generate: the last stdout line is the answer
    image = FIX / "train" / "images" / "red_circle.png"
    assert main(["generate", str(run), "--image", str(image), "--prompt", "What colour is it?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    # eval: the converted fixture records with their assistant turn as the reference answer
    eval_records = tmp_path / "eval.jsonl"
    lines = []
    for line in pool.read_text().splitlines():
        rec = json.loads(line)
        if rec["source"] == "mmtune-fixture":
            rec["answers"] = [rec["messages"][-1]["content"]]
            lines.append(json.dumps(rec))
    eval_records.write_text("\n".join(lines) + "\n")
    eval_out = tmp_path / "eval"
    assert main(["eval", str(run), "--records", str(eval_records), "--metric", "vqa",
                 "--out", str(eval_out), "--max-new-tokens", "4", "--no-progress"]) == 0
    results = json.loads((eval_out / "results.json").read_text())
    assert results["results"]
    assert (eval_out / "predictions.jsonl").is_file() and (eval_out / "results.png").is_file()
    # export to transformers' LLaVA
    assert main(["export", str(run), "--format", "hf-llava", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
