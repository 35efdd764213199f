"""mmtune export: tiny random checkpoints -> Hugging Face LLaVA / causal LM folders, checked in transformers.

Every export is reloaded with plain transformers and compared with mmtune on
the same inputs: logits to 1e-4 (float32), greedy tokens exactly, the
processor's chat template and token ids exactly, pixel values exactly with the
PIL image backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    HF_CLIP,
    ROOT,
    TINY_VIT,
    build_tiny,
    make_batch,
    mixed_records,
    save_run,
    tiny_cfg,
)
from helpers import TRAIN_FIX as FIX

from mmtune.cli import main
from mmtune.config import LoraConfig, VisionConfig
from mmtune.data.collate import pad_sequences
from mmtune.data.encode import tokenize_prompt
from mmtune.data.images import load_image
from mmtune.data.schema import read_records
from mmtune.data.templates import get_template
from mmtune.eval.generate import generate_answers
from mmtune.model import apply_lora, build_model, load_model
from mmtune.model.export import (
    ExportError,
    _check_loaded,
    build_processor,
    export_bundle,
    export_chat_template,
    hf_llava_model,
)

SQUARE = FIX / "images" / "blue_circle.png"  # 48x48
WIDE = FIX / "images" / "blue_triangle.png"  # 64x40: exercises pad-to-square
ATOL = 1e-4
# Larger random weights than the default 0.02, so greedy answers differ by prompt and image.
WIDE_INIT = {"initializer_range": 0.2}

pytestmark = pytest.mark.usefixtures("one_thread")


def train_step(bundle, batch, lora: bool = False) -> None:
    """One AdamW step (instruct stage) so no weight is at its initial value."""
    if lora:
        apply_lora(bundle.model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    model = bundle.model
    model.set_trainable("instruct")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    opt.step()
    model.eval()


def model_batch(batch):
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}


@torch.no_grad()
def assert_same_logits(mm_model, hf_model, batch) -> None:
    mine = mm_model.eval()(**model_batch(batch)).logits
    theirs = hf_model.eval()(**model_batch(batch)).logits
    mask = batch["attention_mask"].bool()
    assert theirs.shape == mine.shape
    torch.testing.assert_close(theirs[mask], mine[mask], rtol=0, atol=ATOL)


def last_error(capsys) -> str:
    """The CLI's one-line error (stderr may also hold transformers' progress bars), and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("mmtune export: error:")
    return lines[-1]


def load_llava(folder: Path):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    return model.eval()


# --------------------------------------------------------------------------- #
# hf-llava: full fine-tune and LoRA, through the CLI
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hf_llava_export_matches_mmtune(tmp_path, capsys, lora):
    from transformers import AutoProcessor, LlavaProcessor

    bundle, cfg = build_tiny("tiny_mllm", **WIDE_INIT)
    batch, _ = make_batch(bundle, mixed_records())
    base_logits = bundle.model.eval()(**model_batch(batch)).logits.detach()
    train_step(bundle, batch, lora=lora)
    save_run(bundle, cfg, tmp_path / "run")

    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--format", "hf-llava", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert not list(tmp_path.glob(".tmp-export-*"))
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    conf = json.loads((out / "config.json").read_text())
    assert conf["image_token_index"] == bundle.model.image_token_id
    assert conf["image_seq_length"] == bundle.num_image_tokens == 16
    assert conf["vision_feature_select_strategy"] == "default" and conf["vision_feature_layer"] == -2
    assert conf["projector_hidden_act"] == "gelu"

    hf = load_llava(out)
    mm = load_model(tmp_path / "run")  # what `mmtune generate` runs (LoRA unmerged)
    assert mm.model.has_lora == lora
    assert_same_logits(mm.model, hf, batch)
    # the trained weights (LoRA: the merged adapter) really are in the export
    with torch.no_grad():
        assert (hf(**model_batch(batch)).logits - base_logits).abs().max() > 1e-2

    # Greedy tokens: the HF processor pipeline vs mmtune's generate, same image and prompt.
    processor = AutoProcessor.from_pretrained(str(out), backend="pil")
    assert isinstance(processor, LlavaProcessor)
    tok = mm.tokenizer
    prompt_text = "What colour is the shape?"
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text}]}]
    rendered = processor.apply_chat_template(conv, add_generation_prompt=True)
    messages = [{"role": "user", "content": "<image>\n" + prompt_text}]
    assert rendered == get_template("vicuna_v1").render_text(messages, add_generation_prompt=True)
    answers = {}
    for image_path in (SQUARE, WIDE):
        image = load_image(image_path)
        inputs = processor(text=rendered, images=[image], return_tensors="pt")
        ids = tokenize_prompt(messages, tok, get_template("vicuna_v1"), num_image_tokens=mm.num_image_tokens)
        assert inputs["input_ids"][0].tolist() == ids
        pix = mm.image_transform(image).unsqueeze(0)
        torch.testing.assert_close(inputs["pixel_values"], pix, rtol=0, atol=0)
        with torch.no_grad():
            theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
        mine = mm.model.generate(
            torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixel_values=pix,
            max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )[0].tolist()
        assert theirs == mine and len(mine) > 0
        text = processor.decode(theirs, skip_special_tokens=True).split("USER:")[0].strip()
        # and `mmtune generate` (the CLI, on the run folder) prints the same answer
        argv = ["generate", str(tmp_path / "run"), "--image", str(image_path), "--prompt", prompt_text]
        assert main([*argv, "--max-new-tokens", "8"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == text
        answers[image_path.name] = theirs
    assert answers[SQUARE.name] != answers[WIDE.name]  # the image matters: the tower is really wired in


# --------------------------------------------------------------------------- #
# towers and select strategies
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("vision", "strategy"),
    [
        (VisionConfig(config=TINY_VIT, feature_layer=-1, select_strategy="full"), "full"),
        (VisionConfig(config={**TINY_VIT, "quick_gelu": True}, feature_layer=0), "default"),
        (VisionConfig(backend="hf", config=HF_CLIP, feature_layer=-2), "default"),
        (VisionConfig(backend="hf", config={**HF_CLIP, "model_type": "siglip_vision_model"}), "full"),
    ],
    ids=["open_clip-full-last", "open_clip-quick_gelu-layer0", "hf-clip", "hf-siglip"],
)
def test_towers_export_with_the_same_features(tmp_path, vision, strategy):
    from transformers import AutoProcessor

    cfg = tiny_cfg("tiny_mllm", **WIDE_INIT)
    cfg.model.vision = vision
    torch.manual_seed(1)
    bundle = build_model(cfg.model)
    batch, _ = make_batch(bundle, mixed_records())
    result = export_bundle(bundle, tmp_path / "hf", template="vicuna_v1", fmt="hf-llava")
    hf = load_llava(tmp_path / "hf")
    assert hf.config.vision_feature_select_strategy == strategy
    assert hf.config.image_seq_length == bundle.num_image_tokens
    assert_same_logits(bundle.model, hf, batch)
    exact = "pil" if vision.backend == "open_clip" else "torchvision"
    assert result.image_backend == exact
    for backend in ("pil", "torchvision"):
        processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"), backend=backend)
        for path in (SQUARE, WIDE):
            image = load_image(path)
            inputs = processor(text="<image>", images=[image], return_tensors="pt")
            assert int((inputs["input_ids"] == hf.config.image_token_index).sum()) == bundle.num_image_tokens
            # the other backend's bicubic kernel differs slightly when it resizes
            atol = 1e-6 if backend == exact else 0.05
            torch.testing.assert_close(inputs["pixel_values"][0], bundle.image_transform(image), rtol=0, atol=atol)


def test_in_memory_llava_model_is_a_runnable_copy():
    """What the throughput benchmark builds: same weights, independent tensors."""
    bundle, _ = build_tiny("tiny_mllm", **WIDE_INIT)
    batch, _ = make_batch(bundle, mixed_records())
    hf = hf_llava_model(bundle)
    assert_same_logits(bundle.model, hf, batch)
    with torch.no_grad():
        hf.model.multi_modal_projector.linear_1.weight.add_(1.0)
    assert not torch.equal(hf.model.multi_modal_projector.linear_1.weight, bundle.model.projector.linear_1.weight)
    # and the losses agree (both shift labels and average over labels != -100)
    with torch.no_grad():
        hf2 = hf_llava_model(bundle)
        mine = bundle.model(**{k: v for k, v in batch.items() if k not in ("ids", "num_images")}).loss
        theirs = hf2(**{k: v for k, v in batch.items() if k not in ("ids", "num_images")}).loss
    torch.testing.assert_close(theirs, mine, rtol=0, atol=ATOL)


def test_dtype_cast_export_loads_in_that_dtype(tmp_path):
    from transformers import LlavaForConditionalGeneration

    bundle, _ = build_tiny("tiny_mllm", **WIDE_INIT)
    batch, _ = make_batch(bundle, mixed_records())
    with torch.no_grad():
        want = bundle.model(**model_batch(batch)).logits
    export_bundle(bundle, tmp_path / "bf16", template="vicuna_v1", dtype="bfloat16")
    hf, info = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "bf16"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    assert bundle.model.projector.linear_1.weight.dtype == torch.float32  # the mmtune model is left as it was
    with torch.no_grad():
        got = hf.eval()(**model_batch(batch)).logits.float()
    mask = batch["attention_mask"].bool()
    assert (got[mask] - want[mask]).abs().max() < 0.1 * want.abs().max()


# --------------------------------------------------------------------------- #
# chat templates
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "alpaca"])
def test_processor_chat_template_renders_mmtunes_prompt(tmp_path, name):
    from transformers import AutoProcessor

    bundle, _ = build_tiny("tiny_mllm", **WIDE_INIT)
    build_processor(bundle, get_template(name)).save_pretrained(str(tmp_path))
    processor = AutoProcessor.from_pretrained(str(tmp_path))
    tmpl = get_template(name)
    eos = bundle.tokenizer.eos_token
    for prompt in ["What is in the picture?", "Answer with one word: colour?"]:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        plain = [{"role": "user", "content": "<image>\n" + prompt}]
        want = tmpl.render_text(plain, add_generation_prompt=True, eos_token=eos)
        assert processor.apply_chat_template(conv, add_generation_prompt=True) == want
        assert processor.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False) == want
    # a multi-turn conversation, string contents, renders as mmtune trains on it
    convo = [
        {"role": "user", "content": "<image>\nWhat shape?"},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "And the colour?"},
    ]
    want = tmpl.render_text(convo, add_generation_prompt=True, eos_token=eos)
    assert processor.apply_chat_template(convo, add_generation_prompt=True) == want
    assert export_chat_template(tmpl).endswith(tmpl.chat_template())


# --------------------------------------------------------------------------- #
# hf: text-only LLM
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hf_causal_lm_export_matches_mmtune(tmp_path, capsys, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bundle, cfg = build_tiny("tiny_llm", **WIDE_INIT)
    recs = read_records(FIX / "text.jsonl")[:4]
    batch, _ = make_batch(bundle, recs)
    train_step(bundle, batch, lora=lora)
    save_run(bundle, cfg, tmp_path / "run", step=3)
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0  # format picked by mode: hf
    lm, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(str(out))
    mm = load_model(tmp_path / "run")
    assert_same_logits(mm.model, lm, batch)

    prompts = ["Name a colour.", "What shape has three sides?"]
    expected = generate_answers(mm, prompts, "vicuna_v1", batch_size=1, max_new_tokens=8)
    for prompt, want in zip(prompts, expected, strict=True):
        msgs = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert text == get_template("vicuna_v1").render_text(msgs, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            new = lm.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1] :].tolist()
        mine = mm.model.generate(
            ids["input_ids"], ids["attention_mask"], max_new_tokens=8,
            eos_token_id=mm.tokenizer.eos_token_id, pad_token_id=mm.tokenizer.pad_token_id,
        )[0].tolist()
        assert new == mine
        assert tok.decode(new, skip_special_tokens=True).split("USER:")[0].strip() == want
    assert len(set(expected)) == 2
    # left-padded batch through HF gives the same tokens as one at a time
    enc = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False))["input_ids"] for p in prompts]
    ids = pad_sequences(enc, tok.pad_token_id, side="left")
    mask = pad_sequences([[1] * len(e) for e in enc], 0, side="left")
    with torch.no_grad():
        both = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, ids.shape[1] :]
    mine = mm.model.generate(ids, mask, max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert both.tolist() == mine.tolist()


# --------------------------------------------------------------------------- #
# what cannot be exported, and bad input
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"projector": "linear"}, "projector type 'linear' cannot be exported"),
        ({"vision_cfg": {"ls_init_value": 0.1}}, "LayerScale"),
        ({"vision_cfg": {"qk_norm": True}}, "CustomResidualAttentionBlock"),
        ({"vision_cfg": {"no_ln_pre": True}}, "no pre-layernorm"),
        ({"vision_cfg": {"act_kwargs": {"approximate": "tanh"}}}, "no HF CLIP equivalent"),
    ],
    ids=["linear-projector", "layer-scale", "qk-norm", "no-ln-pre", "tanh-gelu"],
)
def test_unsupported_models_fail_with_one_line_errors(tmp_path, capsys, change, message):
    cfg = tiny_cfg("tiny_mllm", **WIDE_INIT)
    if "projector" in change:
        cfg.model.projector.type = change["projector"]
    else:
        vit = json.loads(json.dumps(TINY_VIT))
        vit["vision_cfg"].update(change["vision_cfg"])
        cfg.model.vision.config = vit
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    save_run(bundle, cfg, tmp_path / "run")
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--format", "hf-llava", "--out", str(out)]) == 2
    err = last_error(capsys)
    assert message in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-export-*"))


def test_a_wrong_tower_conversion_is_caught_numerically(tmp_path, monkeypatch):
    from mmtune.model.towers import (
        open_clip_convert as export,  # where OpenClipTower.to_hf converts
    )

    real = export.open_clip_to_hf_clip

    def corrupted(tower):
        conf, state = real(tower)
        key = next(k for k in state if k.endswith("layer_norm1.weight"))
        state[key] = state[key] * 1.5
        return conf, state

    monkeypatch.setattr(export, "open_clip_to_hf_clip", corrupted)
    bundle, _ = build_tiny("tiny_mllm", **WIDE_INIT)
    with pytest.raises(ExportError, match="does not reproduce the open_clip features"):
        export_bundle(bundle, tmp_path / "hf", template="vicuna_v1")
    assert not (tmp_path / "hf").exists()


def test_load_check_fails_on_missing_or_changed_weights():
    lin = torch.nn.Linear(2, 2)
    clean = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    from mmtune.model.export import _digests

    expected = _digests(lin)
    _check_loaded(lin, clean, expected, "x")  # passes
    with pytest.raises(ExportError, match="1 missing weight"):
        _check_loaded(lin, {**clean, "missing_keys": {"weight"}}, expected, "x")
    with pytest.raises(ExportError, match="newly|unexpected"):
        _check_loaded(lin, {**clean, "unexpected_keys": {"extra"}}, expected, "x")
    with torch.no_grad():
        lin.bias.add_(1e-6)
    with pytest.raises(ExportError, match="differ from the exported"):
        _check_loaded(lin, clean, expected, "x")


def test_bad_requests_fail_cleanly(tmp_path, capsys):
    bundle, cfg = build_tiny("tiny_llm", **WIDE_INIT)
    ckpt = save_run(bundle, cfg, tmp_path / "run")

    def run(*argv: str) -> str:
        assert main(["export", *argv]) == 2
        return last_error(capsys)

    assert "--format hf" in run(str(ckpt), "--format", "hf-llava", "--out", str(tmp_path / "a"))
    assert "no such checkpoint" in run(str(tmp_path / "nowhere"), "--out", str(tmp_path / "b"))
    assert "unknown template" in run(str(ckpt), "--template", "vicunaa", "--out", str(tmp_path / "c"))
    (ckpt / "run_config.yaml").unlink()
    assert "pass --template" in run(str(ckpt), "--out", str(tmp_path / "d"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert "already exists" in run(str(ckpt), "--template", "chatml", "--out", str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "keep.txt").is_file()
    assert "inside the checkpoint" in run(str(ckpt), "--template", "chatml", "--out", str(ckpt / "hf"))
    # --overwrite replaces the folder as a whole
    argv = ["export", str(ckpt), "--template", "chatml", "--out", str(tmp_path / "taken"), "--overwrite"]
    assert main(argv) == 0
    capsys.readouterr()
    assert not (tmp_path / "taken" / "keep.txt").exists() and (tmp_path / "taken" / "config.json").is_file()
    assert "<|im_start|>" in (tmp_path / "taken" / "chat_template.jinja").read_text()
    assert not list(tmp_path.glob(".tmp-export-*")) and not list(tmp_path.glob(".old-*"))


# --------------------------------------------------------------------------- #
# scripts/bench_train_throughput.py
# --------------------------------------------------------------------------- #


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_throughput", ROOT / "scripts" / "bench_train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_7b_shape_and_flops_are_llava15_7b():
    """The MFU model has LLaVA-1.5-7B's exact parameter counts (built on the meta device, no memory)."""
    bench = _bench_module()
    with torch.device("meta"):
        bundle = build_model(bench.llava15_7b_config(shrink=False))
    assert bundle.num_image_tokens == 576
    flops, simple, counts = bench.model_flops_per_step(bundle.model, batch_size=8, seq_len=1024)
    # Llama-2-7B, CLIP ViT-L/14-336 vision model, 1024 -> 4096 -> 4096 projector (llava-1.5-7b-hf has
    # 524,288 more: its vocabulary is padded to 32064)
    assert counts == {"lm": 6_738_415_616, "projector": 20_979_712, "vision": 303_507_456}
    tokens = 8 * 1024
    matmul = 6_738_415_616 - 32000 * 4096 + 20_979_712  # the input embedding is a lookup, not a matmul
    want = 6 * matmul * tokens + 12 * 32 * 4096 * 1024 * tokens + 2 * 303_507_456 * 8 * 577
    assert flops == want
    assert simple == 6 * 7_062_902_784 * tokens


def test_benchmark_script_runs_both_parts_on_cpu(capsys):
    bench = _bench_module()
    argv = ["--reps", "2", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "40", "--shrink"]
    assert bench.main([*argv, "--mfu-batch-size", "1", "--mfu-seq-len", "80"]) == 0
    out = capsys.readouterr().out
    assert "throughput ratio mmtune / transformers:" in out
    losses = out.split("initial loss: mmtune ")[1].split()
    assert losses[0] == losses[2]  # mmtune and transformers compute the same loss
    assert "MFU on cpu: LLaVA-1.5-7B-shaped (SHRUNK)" in out and "tokens/s" in out


def test_benchmark_fsdp_recipe_runs_shrunk_on_cpu(capsys):
    """`--gpu --shrink`: the 7B-shaped FSDP recipe (fp32 masters, bf16, checkpointing) as one CPU process."""
    bench = _bench_module()
    argv = ["--gpu", "--shrink", "--reps", "1", "--steps", "1", "--warmup", "0",
            "--mfu-batch-size", "1", "--mfu-seq-len", "80"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "FSDP recipe on 1 x cpu: LLaVA-1.5-7B-shaped (SHRUNK)" in out and "FSDP units + root" in out
    assert "samples/s" in out and "tokens/s" in out and "peak memory" in out and "MFU" in out
