"""QLoRA: `model.lm.quantization` loads the base LM in 4-bit (bitsandbytes) and trains a LoRA adapter.

On CPU: the run fails before loading anything with one line naming the config
key, and a QLoRA checkpoint exports by merging its adapter into an
un-quantized copy of the base weights (what `mmtune export` does on any
machine). On a CUDA machine with bitsandbytes: a real 4-bit NF4 run trains,
and its export reloads with the same greedy answers as the adapter on the
un-quantized base (the GPU test is skipped elsewhere, with the reason).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import build_tiny, make_batch, save_run

from mmtune.cli import main
from mmtune.config import LoraConfig
from mmtune.data.schema import read_records
from mmtune.model import apply_lora, build_model, load_model
from mmtune.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "train"
TEXT = FIX / "text.jsonl"
QLORA = ["model.lm.quantization.bits=4", "model.lm.quantization.type=nf4", "model.lm.quantization.double_quant=true",
         "train.lora.enabled=true"]


def _pretrained_tiny_llm(folder: Path):
    """A tiny random LLM saved as a pretrained HF folder (+ tokenizer), and the config that names it."""
    bundle, cfg = build_tiny("tiny_llm", initializer_range=0.2)
    bundle.model.lm.save_pretrained(str(folder))
    bundle.tokenizer.save_pretrained(str(folder))
    cfg.model.lm.name_or_path, cfg.model.lm.config = str(folder), None
    cfg.model.tokenizer.name_or_path, cfg.model.tokenizer.train_vocab_size = str(folder), None
    cfg.model.tokenizer.train_files = []
    return cfg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_without_cuda_the_run_fails_before_loading_naming_the_key(tmp_path, capsys, monkeypatch):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("a weight was loaded before the quantization check")

    cfg = _pretrained_tiny_llm(tmp_path / "base")
    capsys.readouterr()  # the base's own save progress
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_load)
    args = ["train", str(REPO / "configs" / "tiny_llm.yaml"), "--output-dir", str(tmp_path / "run"),
            f"model.lm.name_or_path={cfg.model.lm.name_or_path}", "model.lm.config=null",
            f"model.tokenizer.name_or_path={cfg.model.lm.name_or_path}", "model.tokenizer.train_vocab_size=null",
            "model.tokenizer.train_files=[]", f"data.train=[{TEXT}]", "train.progress=false", *QLORA]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.lm.quantization.bits=4 needs a CUDA GPU" in err[0], err
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_qlora_checkpoint_exports_merged_into_unquantized_base(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _pretrained_tiny_llm(tmp_path / "base")
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    apply_lora(bundle.model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in bundle.model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero adapter
    bundle.model.set_trainable("instruct")
    bundle.model.eval()
    ckpt = save_run(bundle, cfg, tmp_path / "run", step=2)
    # What a QLoRA run writes: the same config, with the base LM quantized.
    mc = yaml.safe_load((ckpt / "model_config.yaml").read_text())
    mc["lm"]["quantization"] = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(mc))

    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in k for k in merged.state_dict())
    batch, _ = make_batch(bundle, read_records(TEXT)[:3])
    with torch.no_grad():
        want = bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(want, got, atol=1e-4), float((want - got).abs().max())
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    with torch.no_grad():
        plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(plain, got, atol=1e-3)  # the adapter really was merged


def _bnb_ok() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _bnb_ok(), reason="QLoRA needs a CUDA GPU and bitsandbytes")
def test_qlora_trains_in_4bit_on_gpu_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _pretrained_tiny_llm(tmp_path / "base")
    args = ["train", str(REPO / "configs" / "tiny_llm.yaml"), "--output-dir", str(tmp_path / "run"),
            "--max-steps", "3", f"model.lm.name_or_path={cfg.model.lm.name_or_path}", "model.lm.config=null",
            f"model.tokenizer.name_or_path={cfg.model.lm.name_or_path}", "model.tokenizer.train_vocab_size=null",
            "model.tokenizer.train_files=[]", f"data.train=[{TEXT}]", "train.progress=false", "train.lr=1e-3",
            "train.batch_size=4", "train.mixed_precision=bf16", *QLORA]
    assert main(args) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "adapter").is_dir() and not (ckpt / "lm").exists()  # the 4-bit base is not copied
    quant = load_model(ckpt, dequantize=False)
    assert any(type(m).__name__ == "Linear4bit" for m in quant.model.lm.modules())
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
