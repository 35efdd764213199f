"""mmtune.model on CPU with the tiny configs: build, splice, train stages, towers, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import (
    HF_CLIP,
    ROOT,
    TINY_VIT,
    build_tiny,
    make_batch,
    mixed_records,
    tiny_cfg,
)
from helpers import TRAIN_FIX as FIX

from mmtune.config import LoraConfig, ModelConfig, VisionConfig, load_config
from mmtune.data.encode import IGNORE_INDEX
from mmtune.data.images import load_image
from mmtune.data.schema import read_records
from mmtune.errors import MMTuneError
from mmtune.model import apply_lora, build_model, load_model, merge_lora, save_model
from mmtune.model.vision import build_vision_tower, open_clip_to_hf_clip

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- #
# configs and building
# --------------------------------------------------------------------------- #


def test_every_config_in_configs_loads():
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in paths} >= {
        "tiny_llm.yaml",
        "tiny_mllm.yaml",
        "llava15_7b_align.yaml",
        "llava15_7b_instruct.yaml",
        "llm_lora.yaml",
    }
    for p in paths:
        cfg = load_config(p)
        assert cfg.model.mode in ("llm", "mllm"), p
    align = load_config(ROOT / "configs/llava15_7b_align.yaml")
    inst = load_config(ROOT / "configs/llava15_7b_instruct.yaml")
    assert (align.train.stage, align.train.lr, align.train.batch_size * align.train.grad_accum * 8) == ("align", 1e-3, 256)
    assert (inst.train.stage, inst.train.lr, inst.train.batch_size * inst.train.grad_accum * 8) == ("instruct", 2e-5, 128)
    assert load_config(ROOT / "configs/llm_lora.yaml").train.lora.enabled


def test_tiny_configs_build_small_models_without_download():
    llm, _ = build_tiny("tiny_llm")
    mllm, _ = build_tiny("tiny_mllm")
    assert llm.model.vision is None and llm.num_image_tokens == 0 and llm.image_transform is None
    assert mllm.num_image_tokens == 16  # 32px / patch 8 = 4x4 patches, CLS dropped
    for b in (llm, mllm):
        n = sum(p.numel() for p in b.model.parameters())
        assert n < 1_000_000
        assert b.model.lm.get_input_embeddings().num_embeddings == len(b.tokenizer)
        assert b.model.image_token_id == b.tokenizer.convert_tokens_to_ids("<image>")
    img = mllm.image_transform(load_image(FIX / "images/red_circle.png"))
    assert img.shape == (3, 32, 32)


def test_bad_model_configs_fail_with_one_line_errors():
    cfg = tiny_cfg("tiny_mllm").model
    cases = [
        ("lm.config", {"hidden_size": 8}),
        ("lm.config", None),
        ("mode", "vlm"),
        ("vision.feature_layer", 3),
        ("vision.select_strategy", "cls"),
        ("vision.backend", "timm"),
        ("projector.type", "qformer"),
    ]
    for key, value in cases:
        bad = copy.deepcopy(cfg)
        obj = bad
        *head, last = key.split(".")
        for part in head:
            obj = getattr(obj, part)
        setattr(obj, last, value)
        with pytest.raises(MMTuneError) as info:
            build_model(bad)
        assert "\n" not in str(info.value), key


# --------------------------------------------------------------------------- #
# image splicing
# --------------------------------------------------------------------------- #


def test_splice_puts_each_image_on_its_run_by_hand():
    b, _ = build_tiny("tiny_mllm")
    model = b.model.eval()
    n, img = b.num_image_tokens, model.image_token_id
    # row 0: text only; row 1: two images; row 2: one image after some text; right padding
    rows = [
        [5, 6, 7, 8, 9, 10],
        [11] + [img] * n + [12, 13] + [img] * n + [14],
        [15, 16, 17] + [img] * n + [18],
    ]
    width = max(len(r) for r in rows)
    pad = b.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = model.embed_inputs(ids, pixels)
        token_emb = model.lm.get_input_embeddings()(ids)
        feats = [model.projector(model.vision(pixels[k : k + 1]))[0] for k in range(3)]
    expected = token_emb.clone()
    expected[1, 1 : 1 + n] = feats[0]
    expected[1, 1 + n + 2 : 1 + 2 * n + 2] = feats[1]
    expected[2, 3 : 3 + n] = feats[2]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # token by token: every non-image position keeps its token embedding
    assert torch.equal(got[0], token_emb[0])
    assert torch.equal(got[ids != img], token_emb[ids != img])
    # the full forward is the LM run on exactly these embeddings
    mask = (ids != pad).long()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, pixel_values=pixels).logits
        ref = model.lm(inputs_embeds=expected, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_splice_on_tokenized_mixed_batch_and_loss_masks_images():
    b, _ = build_tiny("tiny_mllm")
    model = b.model.eval()
    recs = mixed_records()
    batch, exs = make_batch(b, recs)
    assert batch["pixel_values"].shape[0] == 4  # 0 + 1 + 2 + 1 images
    with torch.no_grad():
        got = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        feats = model.projector(model.vision(batch["pixel_values"]))
        token_emb = model.lm.get_input_embeddings()(batch["input_ids"])
    k = 0
    covered = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for row, ex in enumerate(exs):
        for a, e in ex.image_spans:
            torch.testing.assert_close(got[row, a:e], feats[k], rtol=0, atol=1e-6)
            assert (batch["labels"][row, a:e] == IGNORE_INDEX).all()
            covered[row, a:e] = True
            k += 1
    assert k == 4
    assert torch.equal(got[~covered], token_emb[~covered])
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape


def test_splice_rejects_mismatched_images_and_tokens():
    b, _ = build_tiny("tiny_mllm")
    batch, _ = make_batch(b, mixed_records())
    with pytest.raises(MMTuneError, match="image token"):
        b.model(**{**batch, "pixel_values": batch["pixel_values"][:3]})
    no_pix = {k: v for k, v in batch.items() if k != "pixel_values"}
    with pytest.raises(MMTuneError, match="no pixel_values"):
        b.model(**no_pix)
    llm, _ = build_tiny("tiny_llm")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(MMTuneError, match="llm"):
        llm.model(ids, pixel_values=torch.zeros(1, 3, 32, 32))


# --------------------------------------------------------------------------- #
# stages: exactly the right parameters change
# --------------------------------------------------------------------------- #


def _expected_trainable(names: list[str], mode: str, stage: str, lora: bool, unfreeze: bool) -> set[str]:
    out = set()
    trains_lm = stage in ("instruct", "align+lm")
    for n in names:
        if n.startswith("projector."):
            out.add(n)
        elif n.startswith("lm.") and trains_lm and (not lora or "lora_" in n):
            out.add(n)
        elif n.startswith("vision.") and unfreeze:
            # the tower's feature path for feature_layer=-2 of 2 blocks: embeddings + block 0
            dead = ("vision.visual.transformer.resblocks.1.", "vision.visual.ln_post.")
            if not n.startswith(dead) and n != "vision.visual.proj":
                out.add(n)
    return out


STAGE_CASES = [
    ("tiny_llm", "instruct", False, False),
    ("tiny_llm", "instruct", True, False),
    ("tiny_mllm", "align", False, False),
    ("tiny_mllm", "instruct", False, False),
    ("tiny_mllm", "instruct", True, False),
    ("tiny_mllm", "instruct", False, True),
    ("tiny_mllm", "align+lm", False, False),  # train.unfreeze_lm: the LM trains in stage align too
    ("tiny_mllm", "align+lm", True, False),
]


@pytest.mark.parametrize(("name", "stage", "lora", "unfreeze"), STAGE_CASES)
def test_one_step_changes_exactly_the_stage_parameters(name, stage, lora, unfreeze):
    b, cfg = build_tiny(name)
    model = b.model
    if lora:
        apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    model.set_trainable(stage.removesuffix("+lm"), unfreeze_vision=unfreeze, unfreeze_lm=stage.endswith("+lm"))
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(names, cfg.model.mode, stage, lora, unfreeze)
    summary = model.trainable_summary()
    assert "total" in summary and ("projector" in summary) == (cfg.model.mode == "mllm")

    recs = mixed_records() if cfg.model.mode == "mllm" else read_records(FIX / "text.jsonl")[:4]
    batch, _ = make_batch(b, recs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # LoRA's B starts at zero, so A's first gradient is exactly zero and A moves from step 2 on.
    expect_changed = {n for n in trainable if "lora_A" not in n}
    assert changed == expect_changed
    if lora:
        assert any("lora_B" in n for n in changed)


def test_stage_errors():
    llm, _ = build_tiny("tiny_llm")
    with pytest.raises(MMTuneError, match="align"):
        llm.model.set_trainable("align")
    with pytest.raises(MMTuneError, match="llm"):
        llm.model.set_trainable("instruct", unfreeze_vision=True)
    mllm, _ = build_tiny("tiny_mllm")
    with pytest.raises(MMTuneError):
        mllm.model.set_trainable("align", unfreeze_vision=True)
    with pytest.raises(MMTuneError, match="stage"):
        mllm.model.set_trainable("pretrain")


def test_text_only_batch_touches_trainable_vision_params_with_zero_gradient():
    b, _ = build_tiny("tiny_mllm")
    model = b.model
    model.set_trainable("instruct", unfreeze_vision=True)
    model.train()
    batch, _ = make_batch(b, read_records(FIX / "mixed.jsonl")[-3:])  # text-only rows
    assert "pixel_values" not in batch
    out = model(**batch)
    with torch.no_grad():
        ref = model.lm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-6)
    out.loss.backward()
    side = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n.startswith(("vision.", "projector."))]
    assert side
    for n, p in side:
        assert p.grad is not None, n  # DDP sees the same parameters on every rank
        assert torch.count_nonzero(p.grad) == 0, n  # ... and the result is unchanged
    # a frozen tower stays in eval mode when the model is put in train mode
    model.set_trainable("instruct")
    model.train()
    assert model.training and not model.vision.training and model.projector.training


@pytest.mark.parametrize(("stage", "lora"), [("align", False), ("instruct", True)])
def test_gradient_checkpointing_passes_through_to_lm(stage, lora):
    b, _ = build_tiny("tiny_mllm")
    model = b.model
    if lora:
        apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    model.set_trainable(stage)
    batch, _ = make_batch(b, mixed_records())
    model.train()
    ref = model(**batch).loss
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing
    loss = model(**batch).loss
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.gradient_checkpointing_disable()
    assert not model.gradient_checkpointing


# --------------------------------------------------------------------------- #
# vision towers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("backend", "config", "layer", "strategy", "tokens", "width"),
    [
        ("open_clip", TINY_VIT, -2, "patch", 16, 64),
        ("open_clip", TINY_VIT, -1, "full", 17, 64),
        ("open_clip", TINY_VIT, 0, "patch", 16, 64),
        ("hf", HF_CLIP, -2, "patch", 16, 48),
        ("hf", HF_CLIP, -2, "full", 17, 48),
        ("hf", {**HF_CLIP, "model_type": "siglip_vision_model"}, -2, "full", 16, 48),  # SigLIP: no CLS
        ("hf", {**HF_CLIP, "model_type": "siglip_vision_model"}, -1, "patch", 16, 48),
    ],
)
def test_feature_layer_and_select_strategy_shapes(backend, config, layer, strategy, tokens, width):
    torch.manual_seed(0)
    tower = build_vision_tower(
        VisionConfig(backend=backend, config=config, feature_layer=layer, select_strategy=strategy)
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = tower(x)
        states = tower.hidden_states(x)
    assert feats.shape == (2, tokens, width) and tower.num_image_tokens == tokens
    assert len(states) == tower.num_layers + 1
    offset = 1 if (tower.has_cls and strategy == "patch") else 0
    torch.testing.assert_close(feats, states[layer][:, offset:], rtol=0, atol=0)
    import pickle

    transform = pickle.loads(pickle.dumps(tower.image_transform(pad_to_square=True)))  # DataLoader workers
    t = transform(load_image(FIX / "images/red_circle.png"))
    assert t.shape == (3, 32, 32)


def test_open_clip_hidden_states_match_open_clip_and_hf_indexing():
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(config=TINY_VIT)).eval()
    v = tower.visual
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mine = tower.hidden_states(x)
        # index 0: embeddings after ln_pre; index i: after block i (run manually here)
        manual = [
            v.ln_pre(
                torch.cat([v.class_embedding.expand(2, 1, -1), v.conv1(x).flatten(2).transpose(1, 2)], 1)
                + v.positional_embedding
            )
        ]
        for blk in v.transformer.resblocks:
            manual.append(blk(manual[-1]))
        inter = v.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True)
        pooled = v(x)
    assert len(mine) == 3
    for a, m in zip(mine, manual, strict=True):
        torch.testing.assert_close(a, m, rtol=0, atol=1e-6)
    for i in range(2):  # open_clip's own per-block intermediates (prefix token split off)
        torch.testing.assert_close(mine[i + 1][:, 1:], inter["image_intermediates"][i], rtol=0, atol=1e-6)
        torch.testing.assert_close(mine[i + 1][:, :1], inter["image_intermediates_prefix"][i], rtol=0, atol=1e-6)
    torch.testing.assert_close(v.ln_post(mine[-1][:, 0]) @ v.proj, pooled, rtol=1e-5, atol=1e-6)

    # The same ViT as an HF CLIPVisionModel gives the same hidden states at every index.
    from transformers import CLIPVisionModel

    conf, sd = open_clip_to_hf_clip(tower)
    hf = CLIPVisionModel(conf).eval()
    hf.load_state_dict(sd, strict=True)
    with torch.no_grad():
        theirs = hf(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(theirs) == len(mine)
    for a, h in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, h, rtol=1e-5, atol=1e-5)


def test_pad_to_square_fills_with_the_mean_colour():
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(config=TINY_VIT))
    wide = load_image(FIX / "images/red_circle.png")  # 64x40 (every 4th fixture is wide)
    assert wide.size == (64, 40)
    padded = tower.image_transform(pad_to_square=True)(wide)
    cropped = tower.image_transform(pad_to_square=False)(wide)
    assert padded.shape == cropped.shape == (3, 32, 32)
    # top rows are padding: the mean colour, which normalizes to ~0
    assert padded[:, 0].abs().max() < 0.02
    assert cropped[:, 0].abs().max() > 0.5  # the crop starts inside the light background


# --------------------------------------------------------------------------- #
# save / load
# --------------------------------------------------------------------------- #


def _logits(bundle, batch):
    bundle.model.eval()
    with torch.no_grad():
        return bundle.model(**batch).logits


def _train_step(bundle, batch):
    model = bundle.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("tiny_llm", "full"),
        ("tiny_mllm", "full"),
        ("tiny_mllm", "lora"),
        ("tiny_llm", "lora"),
        ("tiny_mllm", "merged"),
        ("tiny_mllm", "vision"),
    ],
)
def test_save_load_round_trip_gives_identical_logits(tmp_path, name, variant):
    b, _ = build_tiny(name)
    recs = mixed_records() if name == "tiny_mllm" else read_records(FIX / "text.jsonl")[:4]
    batch, _ = make_batch(b, recs)
    if variant in ("lora", "merged"):
        apply_lora(b.model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    b.model.set_trainable("instruct", unfreeze_vision=variant == "vision")
    _train_step(b, batch)
    if variant == "merged":
        merge_lora(b.model)
    save_model(b, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model_config.yaml", "model_parts.json", "tokenizer", "lm"} <= files
    assert ("adapter" in files) == (variant == "lora")
    assert ("projector.safetensors" in files) == (name == "tiny_mllm")
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    loaded = load_model(tmp_path)
    assert loaded.model.has_lora == (variant == "lora")
    assert loaded.num_image_tokens == b.num_image_tokens
    torch.testing.assert_close(_logits(loaded, batch), _logits(b, batch), rtol=0, atol=0)
    parts = json.loads((tmp_path / "model_parts.json").read_text())
    assert parts["vision"] == (name == "tiny_mllm")  # a random-init tower is always saved
    # a reloaded model trains on (resume): the LoRA adapter is trainable again
    loaded.model.set_trainable("instruct")
    if variant == "lora":
        lora = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "lora_" in n}
        assert lora and all(p.requires_grad for n, p in loaded.model.named_parameters() if n in lora)
        _train_step(loaded, batch)
        assert all(not torch.equal(p, lora[n]) for n, p in loaded.model.named_parameters() if n in lora)


def test_frozen_pretrained_lm_is_rebuilt_not_copied(tmp_path):
    """Align stage on a 'pretrained' LM folder: the checkpoint holds projector + tokenizer only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    lm_dir = tmp_path / "pretrained_lm"
    conf = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(conf).save_pretrained(lm_dir)
    cfg = tiny_cfg("tiny_mllm").model
    cfg.lm.config = None
    cfg.lm.name_or_path = str(lm_dir)
    torch.manual_seed(0)
    b = build_model(cfg)
    assert b.model.lm.get_input_embeddings().num_embeddings == len(b.tokenizer) > 300  # resized
    b.model.set_trainable("align")
    batch, _ = make_batch(b, mixed_records())
    _train_step(b, batch)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_model(b, ckpt)
    assert not (ckpt / "lm").exists() and (ckpt / "projector.safetensors").is_file()
    loaded = load_model(ckpt)
    torch.testing.assert_close(_logits(loaded, batch), _logits(b, batch), rtol=0, atol=0)

    # stage 2 starts from the stage-1 projector via model.projector.checkpoint (a run folder works)
    run = tmp_path / "run"
    (run / "checkpoint-7").mkdir(parents=True)
    save_model(b, run / "checkpoint-7")
    cfg2 = copy.deepcopy(cfg)
    cfg2.projector.checkpoint = str(run)
    torch.manual_seed(5)
    b2 = build_model(cfg2)
    for (n, p), (_, q) in zip(b2.model.projector.named_parameters(), b.model.projector.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_save_model_needs_an_existing_folder_and_load_names_bad_folders(tmp_path):
    b, _ = build_tiny("tiny_llm")
    with pytest.raises(MMTuneError, match="does not exist"):
        save_model(b, tmp_path / "missing")
    with pytest.raises(MMTuneError, match="checkpoint"):
        load_model(tmp_path)
    cfg = ModelConfig()
    assert cfg.vision.feature_layer == -2  # LLaVA-1.5's default


def test_lm_loading_honours_dtype_and_trust_remote_code(monkeypatch, tmp_path):
    import transformers

    from mmtune.model.build import build_lm

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    torch.manual_seed(0)
    conf = transformers.AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=300
    )
    transformers.AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    cfg = ModelConfig().lm
    cfg.name_or_path, cfg.dtype = str(tmp_path), "bfloat16"
    lm = build_lm(cfg)
    assert seen["trust_remote_code"] is False and seen["dtype"] == torch.bfloat16
    assert lm.dtype == torch.bfloat16
    cfg.trust_remote_code = True
    build_lm(cfg)
    assert seen["trust_remote_code"] is True
    cfg.dtype = "float64"
    with pytest.raises(MMTuneError, match="dtype"):
        build_lm(cfg)


@pytest.mark.parametrize(("name", "records"), [("tiny_mllm", "mixed.jsonl"), ("tiny_llm", "text.jsonl")])
def test_tiny_configs_learn_on_cpu(name, records):
    """30 plain AdamW steps on the fixture records at the config's lr lower the loss clearly."""
    import random

    b, cfg = build_tiny(name)
    recs = read_records(FIX / records)
    b.model.set_trainable(cfg.train.stage)
    b.model.train()
    opt = torch.optim.AdamW([p for p in b.model.parameters() if p.requires_grad], lr=cfg.train.lr)
    rng = random.Random(0)
    losses = []
    for _ in range(cfg.train.max_steps):
        batch, _ = make_batch(b, rng.sample(recs, cfg.train.batch_size), max_length=cfg.data.max_length)
        loss = b.model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


@pytest.mark.parametrize("model_type", ["clip_vision_model", "siglip_vision_model"])
def test_hf_tower_in_an_mllm_unfreezes_only_its_feature_path(model_type, tmp_path):
    cfg = tiny_cfg("tiny_mllm")
    cfg.model.vision = VisionConfig(backend="hf", config={**HF_CLIP, "model_type": model_type}, feature_layer=-2)
    torch.manual_seed(0)
    b = build_model(cfg.model)
    assert b.num_image_tokens == 16
    model = b.model
    model.set_trainable("instruct", unfreeze_vision=True)
    dead = (
        "vision.model.encoder.layers.2.",
        "vision.model.post_layernorm.",
        "vision.model.head.",
        "vision.model.vision_model.encoder.layers.2.",
        "vision.model.vision_model.post_layernorm.",
        "vision.model.vision_model.head.",
    )
    vision = {n for n, _ in model.named_parameters() if n.startswith("vision.")}
    assert any(n.startswith(dead) for n in vision)
    expected = {n for n in vision if not n.startswith(dead)}
    assert {n for n in vision if model.get_parameter(n).requires_grad} == expected
    batch, _ = make_batch(b, mixed_records())
    before = {n: model.get_parameter(n).detach().clone() for n in vision}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    changed = {n for n in vision if not torch.equal(model.get_parameter(n), before[n])}
    assert changed == expected
    save_model(b, tmp_path)
    torch.testing.assert_close(_logits(load_model(tmp_path), batch), _logits(b, batch), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_projector_output_is_a_fresh_tensor_not_a_view(kind):
    """nn.Linear on [B, N, D] returns a view; under FSDP2 the projector's output carries its backward
    all-gather hook, which an in-place op on a view would drop (torch warns about it on every step)."""
    from mmtune.model.projector import Projector

    proj = Projector(kind, 8, 16)
    x = torch.randn(2, 4, 8)
    assert proj.linear_1(x)._is_view()  # what the projector must not return
    y = proj(x)
    assert y.shape == (2, 4, 16) and not y._is_view() and y.requires_grad
    assert not proj(torch.zeros(0, 4, 8))._is_view()  # an empty image batch (a text-only rank under FSDP)
