"""The demo's shipped pretrained bases: intact, loadable the user's way, and reproducible by their script."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtune.demo import DEMO_BASES, DEMO_CONFIG, base_overrides

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pretrain_demo_bases.py"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_files_match_their_hashes_and_fit_the_size_limit() -> None:
    info = json.loads((DEMO_BASES / "pretrain.json").read_text())
    files = info["sha256"]
    assert {"lm/config.json", "lm/model.safetensors", "lm/tokenizer.json", "clip/open_clip_config.json",
            "clip/open_clip_model.safetensors"} <= set(files)
    for name, digest in files.items():
        assert _sha(DEMO_BASES / name) == digest, f"{name} changed since pretraining"
    readme = (DEMO_BASES / "README.md").read_text()
    for name, digest in files.items():
        assert f"`{name}` | `{digest}`" in readme
    assert info["command"].startswith("python scripts/pretrain_demo_bases.py")
    total = sum(p.stat().st_size for p in DEMO_BASES.rglob("*") if p.is_file())
    assert total <= 30 * 2**20
    # The package ships the folders (setuptools package-data).
    toml = (ROOT / "pyproject.toml").read_text()
    assert '"assets/demo_bases/*"' in toml and '"assets/demo_bases/*/*"' in toml


def test_bases_load_the_way_users_load_theirs() -> None:
    import open_clip
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_BASES / "lm")
    lm = AutoModelForCausalLM.from_pretrained(DEMO_BASES / "lm")
    assert lm.config.model_type == "llama" and lm.config.vocab_size == len(tok)
    ids = tok("The word cat starts with the letter")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "The word cat starts with the letter"
    clip = open_clip.create_model("local-dir:" + str(DEMO_BASES / "clip"))
    shipped = load_file(DEMO_BASES / "clip" / "open_clip_model.safetensors")
    assert torch.equal(clip.visual.conv1.weight, shipped["visual.conv1.weight"])  # the weights, not a random init
    text = open_clip.get_tokenizer("local-dir:" + str(DEMO_BASES / "clip"))(["a red circle"])
    assert text.shape == (1, clip.context_length)

    # mmtune builds the demo model from them through lm.name_or_path and the open_clip tower, loading both.
    from mmtune.config import RunConfig, load_config
    from mmtune.model import build_model

    cfg = load_config(DEMO_CONFIG, RunConfig, base_overrides())
    bundle = build_model(cfg.model)
    assert torch.equal(bundle.model.vision.visual.conv1.weight, shipped["visual.conv1.weight"])
    emb = bundle.model.lm.get_input_embeddings().weight
    assert torch.equal(emb[: lm.config.vocab_size], lm.get_input_embeddings().weight)
    assert "vision" not in bundle.model.owned_parts and "lm" not in bundle.model.owned_parts


def test_the_lm_learned_the_facts_it_read() -> None:
    """Greedy continuation of declarative prompts from the corpus's world (not its exact sentences)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_BASES / "lm")
    lm = AutoModelForCausalLM.from_pretrained(DEMO_BASES / "lm").eval()
    probes = {"The word dog starts with the letter": " d", "The word moon starts with the letter": " m",
              "3 plus 4 is": " 7", "The sum of 2 and 5 is": " 7"}
    hits = 0
    with torch.no_grad():
        for prompt, want in probes.items():
            ids = torch.tensor([tok(prompt)["input_ids"]])
            out = lm.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
            hits += tok.decode(out[0, ids.shape[1]:]).startswith(want)
    assert hits >= 3, hits


def test_corpus_is_plain_prose() -> None:
    from mmtune.data.synthetic import PHRASINGS, fact_corpus

    docs = fact_corpus(400, seed=1)
    text = " ".join(docs)
    assert "?" not in text and "<|" not in text and "USER:" not in text and "ASSISTANT" not in text
    phrasings = {p.split("{")[0].strip() for ps in PHRASINGS.values() for p in ps if p.split("{")[0].strip()}
    assert not [p for p in phrasings if len(p) > 8 and p in text]  # no instruction phrasing leaks in
    assert fact_corpus(50, seed=1) == docs[:50] or fact_corpus(50, seed=1)[0] == docs[0]


def test_corpus_paragraphs_keep_to_one_topic() -> None:
    """What teaches the LM to read its context: a word paragraph is about one word, a scene paragraph opens
    with the picture's description and says only what is true of that picture."""
    import re

    from mmtune.data.synthetic import FACT_WORDS, fact_corpus

    docs = fact_corpus(300, seed=2)
    kinds = {"word": 0, "sum": 0, "scene": 0}
    for doc in docs:
        if doc.startswith("The picture shows "):
            kinds["scene"] += 1
            described = doc.split(".")[0]
            for colour, shape in re.findall(r"The (\w+) shape is a (\w+)\.", doc):
                assert f"{colour} {shape}" in described, doc
            continue
        named = {w for w in re.findall(r"[a-z]+", doc) if w in FACT_WORDS}
        if named:
            kinds["word"] += 1
            assert len(named) == 1, doc  # one word per paragraph
        else:
            kinds["sum"] += 1
    assert all(n > 30 for n in kinds.values()), kinds


@pytest.mark.slow
def test_script_runs_end_to_end_at_a_tiny_budget(tmp_path: Path) -> None:
    out = tmp_path / "bases"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--lm-docs", "200", "--lm-steps", "2", "--lm-seq", "32",
           "--clip-pairs", "32", "--clip-steps", "2", "--clip-batch", "8", "--vocab", "350"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads((out / "pretrain.json").read_text())
    assert info["lm"]["steps"] == 2 and info["clip"]["pairs"] == 32 and info["vocab"] == 350
    for name, digest in info["sha256"].items():
        assert _sha(out / name) == digest
    import open_clip
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "lm").config.vocab_size == 350
    open_clip.create_model("local-dir:" + str(out / "clip"))
    # Nothing a user owns is overwritten.
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_script_can_vary_the_lm_and_reuse_a_clip(tmp_path: Path) -> None:
    """`--clip-from` copies a made CLIP (so an ablation changes only the LM); the LM's shape is set by flags."""
    out = tmp_path / "bases"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--lm-docs", "200", "--lm-steps", "2", "--lm-seq", "32",
           "--vocab", "350", "--lm-hidden", "32", "--lm-intermediate", "64", "--lm-layers", "1",
           "--clip-from", str(DEMO_BASES / "clip")]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads((out / "pretrain.json").read_text())
    assert info["clip"]["copied_from"] == str((DEMO_BASES / "clip").resolve())
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        assert _sha(out / "clip" / name) == _sha(DEMO_BASES / "clip" / name)
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(out / "lm")
    assert (conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers) == (32, 64, 1)
    assert info["lm"]["hidden_size"] == 32 and "hidden 32, 1 layer)" in (out / "README.md").read_text()


def test_script_refuses_a_clip_from_folder_without_a_clip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_demo_bases", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path / "other"), "--clip-from", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--clip-from" in err and "open_clip_config.json" in err
    assert not (tmp_path / "other").exists()  # refused before anything is written


def test_the_shipped_lm_knows_every_first_letter_the_held_out_task_asks_for() -> None:
    """README's claim behind the held-out analysis: the base completes "The first letter of W is" for all words."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_demo_lm", ROOT / "scripts" / "probe_demo_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    known = mod.probe(DEMO_BASES / "lm")
    assert known["first letter"] == known["starts with"] == (31, 31)
    assert known["length"] == known["backwards"] == (31, 31)  # README: every probed fact, for every word
    unread = mod.probe(DEMO_BASES / "lm", words=["quartz", "zephyr", "glyph"])  # words its corpus never used
    assert unread["first letter"][0] < 3  # the probe can fail: a fact the LM did not read is not known
