"""Bad input gets one clear line, not a traceback or a misleading reason (issue 16, "Unclear messages").

Device strings (`--device foo`, `cuda:99`, `cuda` on a machine without a GPU)
are refused before any work starts; `human`/`gpt` roles point at
`--format messages`; `--image https://...` is not turned into a local path and
a folder given as `--image` is called a folder; `data.max_length=-1` on a
text-only pool is not reported as `images_exceed_max_length`.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import one_line_error as last_error

from mmtune.cli import main
from mmtune.data.schema import Record
from mmtune.device import resolve_device
from mmtune.errors import MMTuneError


def test_device_strings_are_checked(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(MMTuneError, match="'foo': not a device; use cpu, cuda, cuda:N or mps"):
        resolve_device("foo")
    with pytest.raises(MMTuneError, match="mmtune runs on cpu, cuda or mps"):
        resolve_device("meta")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(MMTuneError, match=f"has {n} GPU"):
            resolve_device("cuda:99")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:99"):
        with pytest.raises(MMTuneError, match="this machine has no CUDA GPU"):
            resolve_device(name)
    assert resolve_device(None) == "cpu"


def test_bad_devices_stop_generate_eval_and_select_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = str(tmp_path / "no_such_run")  # never reached: the device is checked first
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]}) + "\n")
    for device, words in (("foo", "not a device"), ("cuda", "no CUDA GPU"), ("cuda:99", "no CUDA GPU")):
        assert main(["generate", missing, "--prompt", "hi", "--device", device]) == 2
        assert words in last_error(capsys, "generate")
        assert main(["eval", missing, "--records", str(pool), "--metric", "exact_match", "--device", device,
                     "--out", str(tmp_path / "e")]) == 2
        assert words in last_error(capsys, "eval")
        assert main(["select", str(pool), "--k", "1", "--method", "longest", "--device", device,
                     "--out", str(tmp_path / "s.jsonl")]) == 2
        assert words in last_error(capsys, "select")
    assert not (tmp_path / "e").exists() and not (tmp_path / "s.jsonl").exists()


def test_sharegpt_roles_in_unified_rows_point_at_format_messages(tmp_path, capsys):
    rows = [{"id": "r1", "messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hello"}]}]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(map(json.dumps, rows)) + "\n")
    assert main(["convert", str(src), "--out", str(tmp_path / "o.jsonl")]) == 0
    reason = json.loads((tmp_path / "o.rejects.jsonl").read_text())["reason"]
    assert "got 'human'" in reason and "--format messages" in reason
    assert main(["convert", str(src), "--out", str(tmp_path / "o.jsonl"), "--format", "messages"]) == 0
    assert "converted 1, rejected 0" in capsys.readouterr().out


def test_generate_image_urls_and_folders_are_named_as_such(tmp_path, capsys):
    from helpers import build_tiny, save_run

    bundle, cfg = build_tiny("tiny_mllm")
    ckpt = save_run(bundle, cfg, tmp_path / "run", 1, "vicuna_v1")
    base = ["generate", str(ckpt), "--prompt", "what is it?", "--device", "cpu"]
    assert main([*base, "--image", "https://example.com/cat.jpg"]) == 2
    msg = last_error(capsys, "generate")
    assert "--image https://example.com/cat.jpg: is a URL" in msg  # not "https:/example.com/..." as a path
    assert main([*base, "--image", str(tmp_path)]) == 2
    assert f"--image {tmp_path}: is a folder" in last_error(capsys, "generate")


def test_negative_max_length_on_text_is_a_setting_error_not_an_image_skip():
    from mmtune.data.encode import SkipRecord, tokenize_record
    from mmtune.data.templates import get_template
    from mmtune.data.tokenizer import build_byte_bpe_tokenizer

    tok = build_byte_bpe_tokenizer(["what is two plus two? four"] * 20, 300)
    record = Record("t", [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}])
    with pytest.raises(MMTuneError, match=r"max_length must be >= 1 \(data.max_length\), got -1") as info:
        tokenize_record(record, tok, get_template("vicuna_v1"), max_length=-1)
    assert not isinstance(info.value, SkipRecord)  # (the image case keeps its reason: test_templates_tokenize.py)
