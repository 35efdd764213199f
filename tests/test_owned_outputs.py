"""Nothing a user owns is overwritten: one output-path rule for every command (issue 16, "Data loss").

Each test reproduces a case of the issue that destroyed or silently lost data
before the fix (the input deleted by `--rejects`, the run folder replaced by
its own export, a finished run's metrics wiped by a fresh run, old shards
deleted before the new set existed, ...). Now each is a one-line error before
any work starts, or the old output stays until its replacement is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import one_line_error

from mmtune.cli import main
from mmtune.outputs import Out, OutputPathError, check_outputs


def rec(rid: str, answer: str = "yes") -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": f"question {rid}?"},
                                    {"role": "assistant", "content": answer}], "images": []}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- #
# The rule itself
# --------------------------------------------------------------------------- #


def test_check_outputs_names_every_kind_of_clash(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [rec("a")])
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    cases = [
        ([Out(data, "--rejects")], {"inputs": [("input", data)]}, "is also an input"),
        ([Out(tmp_path / "o.jsonl", "--out"), Out(tmp_path / "o.jsonl", "--rejects")], {}, "are the same path"),
        ([Out(run, "--out", "folder")], {"runs": [("run", run)]}, "is inside the run"),
        ([Out(run / "x", "--out", "folder")], {"runs": [("run", run)]}, "is inside the run"),
        ([Out(tmp_path, "--out", "folder")], {"runs": [("run", run)]}, "holds the run"),
        ([Out(tmp_path, "--out", "folder", whole=True)], {"inputs": [("input", data)]}, "holds the input"),
        ([Out(run, "--out")], {}, "is an existing folder; give a file path"),
        ([Out(data, "--out", "folder")], {}, "is an existing file; give a folder path"),
    ]
    for outs, kw, message in cases:
        with pytest.raises(OutputPathError, match=message):
            check_outputs(outs, **kw)
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    with pytest.raises(OutputPathError, match="is also an input"):
        check_outputs([Out(link, "--rejects")], inputs=[("input", data)])
    check_outputs([Out(tmp_path / "new.jsonl", "--out"), Out(tmp_path / "new.rejects.jsonl", "--rejects")],
                  inputs=[("input", data)], runs=[("run", run)])  # nothing to refuse


# --------------------------------------------------------------------------- #
# convert / select / shard
# --------------------------------------------------------------------------- #


def test_shard_rejects_equal_to_the_input_keeps_the_input(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [rec("a"), rec("b")])
    before = data.read_bytes()
    assert main(["shard", str(data), "--out", str(tmp_path / "s"), "--rejects", str(data)]) == 2
    assert "is also an input" in one_line_error(capsys, "shard")
    assert data.read_bytes() == before


def test_select_rejects_equal_to_the_pool_keeps_the_pool(tmp_path, capsys):
    pool = write_jsonl(tmp_path / "pool.jsonl", [rec("a", "short"), rec("b", "a much longer answer")])
    before = pool.read_bytes()
    argv = ["select", str(pool), "--k", "1", "--method", "longest", "--out", str(tmp_path / "sub.jsonl")]
    assert main([*argv, "--rejects", str(pool)]) == 2
    assert "is also an input" in one_line_error(capsys, "select")
    assert pool.read_bytes() == before
    assert main([*argv, "--rejects", str(tmp_path / "sub.jsonl")]) == 2  # --rejects = --out
    assert "are the same path" in one_line_error(capsys, "select")
    assert not (tmp_path / "sub.jsonl").exists()


def test_convert_rejects_equal_to_out_is_refused(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [rec("a"), "{not json"])
    out = tmp_path / "out.jsonl"
    assert main(["convert", str(data), "--out", str(out), "--rejects", str(out)]) == 2
    assert "are the same path" in one_line_error(capsys, "convert")
    assert not out.exists()


def test_outputs_that_are_folders_where_files_are_expected_and_back(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [rec("a"), rec("b")])
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["convert", str(data), "--out", str(folder)]) == 2
    assert "is an existing folder; give a file path" in one_line_error(capsys, "convert")
    assert main(["select", str(data), "--k", "1", "--method", "longest", "--out", str(folder)]) == 2
    assert "is an existing folder; give a file path" in one_line_error(capsys, "select")
    assert main(["shard", str(data), "--out", str(data)]) == 2
    assert "is an existing file; give a folder path" in one_line_error(capsys, "shard")
    assert main(["eval", "--predictions", str(data), "--records", str(data), "--metric", "exact_match",
                 "--out", str(data)]) == 2
    assert "is an existing file; give a folder path" in one_line_error(capsys, "eval")
    assert main(["train", "configs/tiny_llm.yaml", "--output-dir", str(data), "--max-steps", "1"]) == 2
    assert "is an existing file; give a folder path" in one_line_error(capsys, "train")
    assert data.read_text().count("\n") == 2


def test_shard_overwrite_keeps_the_old_set_until_the_new_one_is_complete(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [rec("a"), rec("b")])
    out = tmp_path / "s"
    assert main(["shard", str(good), "--out", str(out)]) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "shard-000000.tar" in old and "index.json" in old
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{broken", {"id": "x"}])
    capsys.readouterr()
    assert main(["shard", str(bad), "--out", str(out), "--overwrite"]) == 2
    assert "the shards already there are kept" in one_line_error(capsys, "shard")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "rejects.jsonl"} == old
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    # a good replacement does replace them, and leaves no staging folder behind
    newer = write_jsonl(tmp_path / "newer.jsonl", [rec("c")])
    assert main(["shard", str(newer), "--out", str(out), "--overwrite"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["records"] == 1 and sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]


def test_same_file_names_in_different_folders_get_distinct_default_ids(tmp_path, capsys):
    alpaca = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(3)]
    en = tmp_path / "en" / "train.json"
    zh = tmp_path / "zh" / "train.json"
    for path in (en, zh):
        path.parent.mkdir()
        path.write_text(json.dumps(alpaca))
    out = tmp_path / "pool.jsonl"
    assert main(["convert", str(en), str(zh), "--out", str(out)]) == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == 6 and len(set(ids)) == 6, ids
    assert ids[0] == "en/train-0" and ids[3] == "zh/train-0"
    assert "rejected 0" in capsys.readouterr().out
    # one file alone keeps the plain "{name}-{row}" ids
    assert main(["convert", str(en), "--out", str(out)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["id"] == "train-0"


def test_demo_overwrite_puts_the_old_folder_back_when_the_new_run_fails(tmp_path, capsys, monkeypatch):
    from mmtune import demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.json").write_text('{"mine": true}')

    def boom(*a, **k):
        out.mkdir(parents=True, exist_ok=True)
        (out / "half").write_text("half-written")
        raise RuntimeError("killed")

    monkeypatch.setattr(demo, "run_demo", boom)
    with pytest.raises(RuntimeError):
        main(["demo", "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert json.loads((out / "report.json").read_text()) == {"mine": True}
    assert not list(tmp_path.glob(".demo*"))


# --------------------------------------------------------------------------- #
# train / export: run folders
# --------------------------------------------------------------------------- #


def test_a_finished_run_is_neither_retrained_over_nor_replaced_by_its_export(tmp_path, capsys):
    from helpers import tiny_cfg

    from mmtune.config import save_config

    config = tmp_path / "tiny.yaml"
    save_config(tiny_cfg("tiny_llm"), config)
    run = tmp_path / "run"
    train = ["train", str(config), "--output-dir", str(run)]
    assert main([*train, "--max-steps", "2"]) == 0
    owned = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert Path("checkpoint-2/trainer_state.json") in owned

    # a fresh run into it: refused before any work, naming both ways out
    capsys.readouterr()
    assert main([*train, "--max-steps", "1"]) == 2
    msg = one_line_error(capsys, "train")
    assert "already holds a run" in msg and "--resume-from latest" in msg and "--overwrite" in msg
    # export into the run, above it, or inside it: refused, even with --overwrite
    for out in (run, tmp_path, run / "exported"):
        assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
        msg = one_line_error(capsys, "export")
        assert "run folder" in msg or "checkpoint" in msg, msg
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == owned

    # --overwrite replaces the run, and only once the new one has saved
    assert main([*train, "--max-steps", "1", "--overwrite"]) == 0
    assert (run / "checkpoint-1").is_dir() and not (run / "checkpoint-2").exists()
    assert not list(tmp_path.glob(".run.*"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1]
