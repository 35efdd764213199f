"""Corrupt checkpoints are named, not crashed on (issue 16, item 5).

A truncated `.safetensors` or a garbled `model_parts.json` in the newest
checkpoint used to give a traceback in resume, generate and export, and resume
did not point at the intact previous checkpoint. Now each is one line naming
the file and the checkpoint and the earlier intact checkpoint, and
`--resume-from latest` falls back to that one, saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import one_line_error

from mmtune.cli import main
from mmtune.integrity import find_corruption

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    from helpers import tiny_cfg

    from mmtune.config import save_config

    tmp = tmp_path_factory.mktemp("corrupt")
    config = tmp / "tiny.yaml"
    save_config(tiny_cfg("tiny_llm"), config)
    out = tmp / "run"
    assert main(["train", str(config), "--output-dir", str(out), "--max-steps", "4", "train.save_every=2",
                 "train.save_total_limit=3", "train.progress=false"]) == 0
    return config, out


def test_find_corruption_tells_whole_files_from_broken_ones(run, tmp_path):
    import shutil

    _, out = run
    ckpt = shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")
    assert find_corruption(ckpt) is None
    weights = ckpt / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    path, reason = find_corruption(ckpt)
    assert path == weights and reason.startswith("truncated")
    weights.write_bytes(b"\x00" * 4)
    assert find_corruption(ckpt)[1].startswith("truncated")
    shutil.copy(out / "checkpoint-4" / "lm" / "model.safetensors", weights)
    (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:200])
    assert find_corruption(ckpt) == (ckpt / "optimizer.pt", "truncated or corrupt (not a complete torch file)")


def test_generate_export_and_resume_name_the_broken_file_and_the_intact_checkpoint(run, capsys, tmp_path):
    config, out = run
    weights = out / "checkpoint-4" / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    parts = out / "checkpoint-2" / "model_parts.json"
    intact = out / "checkpoint-2"
    capsys.readouterr()
    for argv in (["generate", str(out), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"],
                 ["export", str(out), "--out", str(tmp_path / "exported")]):
        assert main(argv) == 2
        msg = one_line_error(capsys, argv[0])
        assert f"lm/model.safetensors of checkpoint {out / 'checkpoint-4'} is truncated" in msg, msg
        assert f"the earlier checkpoint {intact} is intact" in msg, msg

    # resume from latest: falls back to checkpoint-2 and says so, then trains on to step 6
    assert main(["train", str(config), "--output-dir", str(out), "--resume-from", "latest", "--max-steps", "6",
                 "train.save_every=2", "train.save_total_limit=3", "train.progress=false"]) == 0
    err = capsys.readouterr().err
    assert "skipping" in err and str(out / "checkpoint-4") in err and f"resuming from {intact}" in err, err
    log = (out / "train.log").read_text()
    assert f"resumed from {intact} at step 2" in log
    assert find_corruption(out / "checkpoint-6") is None and find_corruption(out / "checkpoint-4") is None

    # a garbled model_parts.json is named too
    parts.write_text('{"format": 1, "lm": tru')
    assert main(["generate", str(intact), "--prompt", "hi", "--device", "cpu"]) == 2
    msg = one_line_error(capsys, "generate")
    assert f"model_parts.json of checkpoint {intact} is corrupt (JSONDecodeError" in msg, msg
    assert json.loads((out / "checkpoint-6" / "model_parts.json").read_text())["lm"] is True
