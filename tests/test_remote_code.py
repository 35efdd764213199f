"""No code from a checkpoint runs unless the user asks (issue 16, "Security").

A downloaded checkpoint can set `trust_remote_code: true` in its own
model_config.yaml and ship a tokenizer module named by `auto_map`. Before the
fix, `mmtune generate`, `eval`, `export` and a resumed `train` imported and ran
that module. Now the flag comes only from the command line or the user's own
config; the checkpoint is refused with one line naming `--trust-remote-code`,
and the module is never imported (a marker file it would write stays absent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import build_tiny, save_run

from mmtune.cli import main
from mmtune.config import RunConfig, load_config, save_config
from mmtune.errors import MMTuneError
from mmtune.model.io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

EVIL_MODULE = '''
import os
from pathlib import Path
Path(os.environ["MMTUNE_EVIL_MARKER"]).write_text("the checkpoint's code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture(scope="module")
def llm():
    return build_tiny("tiny_llm")


def evil_checkpoint(run: Path, llm, *, flag_in_config: bool = True, ckpt: Path | None = None) -> Path:
    """A tiny saved run whose checkpoint switches remote code on and ships a tokenizer module."""
    bundle, cfg = llm
    ckpt = ckpt or save_run(bundle, cfg, run, 1, "vicuna_v1")
    mc = ckpt / "model_config.yaml"
    data = yaml.safe_load(mc.read_text())
    data.setdefault("tokenizer", {})["trust_remote_code"] = flag_in_config
    mc.write_text(yaml.safe_dump(data))
    tok = ckpt / "tokenizer"
    (tok / "tokenization_evil.py").write_text(EVIL_MODULE)
    tc = json.loads((tok / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    tc["tokenizer_class"] = "EvilTokenizer"
    (tok / "tokenizer_config.json").write_text(json.dumps(tc))
    return ckpt


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "EVIL_RAN"
    monkeypatch.setenv("MMTUNE_EVIL_MARKER", str(path))
    return path


@pytest.mark.parametrize("flag_in_config", [True, False])
def test_generate_export_eval_refuse_a_checkpoint_that_ships_code(tmp_path, capsys, llm, marker, flag_in_config):
    ckpt = evil_checkpoint(tmp_path / "run", llm, flag_in_config=flag_in_config)
    records = tmp_path / "q.jsonl"
    records.write_text(json.dumps({"id": "q1", "messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yes"}],
                                   "images": [], "task": "t", "answers": ["yes"]}) + "\n")
    commands = [
        ["generate", str(tmp_path / "run"), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"],
        ["export", str(ckpt), "--out", str(tmp_path / "exported")],
        ["eval", str(ckpt), "--records", str(records), "--metric", "exact_match", "--out", str(tmp_path / "eval"), "--device", "cpu",
         "--no-progress", "--no-plot"],
    ]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert not any("Traceback" in line for line in err), err
        assert err[-1].startswith(f"mmtune {argv[0]}: error: {ckpt}") and "--trust-remote-code" in err[-1], err
        assert not marker.exists(), f"{argv[0]} ran the checkpoint's module"
    assert not (tmp_path / "exported").exists()
    with pytest.raises(MMTuneError, match="--trust-remote-code"):
        load_model(ckpt)
    assert not marker.exists()


def test_resume_takes_trust_from_the_users_config_not_the_checkpoint(tmp_path, capsys, llm, marker):
    """`mmtune train --resume-from` into a run whose checkpoint was tampered with."""
    run = tmp_path / "run"
    _, cfg = llm
    user_cfg = tmp_path / "user.yaml"
    save_config(cfg, user_cfg)
    assert main(["train", str(user_cfg), "--output-dir", str(run), "--max-steps", "1"]) == 0
    evil_checkpoint(run, llm, ckpt=run / "checkpoint-1")
    capsys.readouterr()
    rc = main(["train", str(user_cfg), "--output-dir", str(run), "--resume-from", "latest", "--max-steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--trust-remote-code" in err[-1], err
    assert not marker.exists()
    assert isinstance(load_config(user_cfg, RunConfig), RunConfig)


def test_the_users_flag_lets_the_module_run(tmp_path, llm, marker, monkeypatch):
    """--trust-remote-code is not dead: with it, the shipped tokenizer class is what loads."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    ckpt = evil_checkpoint(tmp_path / "run", llm)
    bundle = load_model(ckpt, trust_remote_code=True)
    assert type(bundle.tokenizer).__name__ == "EvilTokenizer"
    assert marker.read_text() == "the checkpoint's code ran"
    assert os.environ["MMTUNE_EVIL_MARKER"] == str(marker)
