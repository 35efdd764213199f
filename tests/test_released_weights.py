"""Released weights in: LLaVA's mm_projector.bin, a llava-hf folder (model.init_from), and the export round trip.

The llava-hf folder is a tiny random `LlavaForConditionalGeneration` (CLIP
vision config, Llama text config) that transformers builds and saves in the
test, with a `LlavaProcessor` next to it, laid out like llava-hf/llava-1.5-7b-hf.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TRAIN_FIX as FIX
from helpers import build_tiny, make_batch, mixed_records, save_run

from mmtune.cli import main
from mmtune.config import ModelConfig
from mmtune.data.collate import collate_examples
from mmtune.data.encode import tokenize_record
from mmtune.data.images import load_image
from mmtune.data.schema import read_records
from mmtune.data.templates import get_template
from mmtune.data.tokenizer import build_byte_bpe_tokenizer, record_texts
from mmtune.errors import MMTuneError
from mmtune.model import build_model, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = FIX / "mixed.jsonl"
ATOL = 1e-4


def _batch(bundle, records):
    tmpl = get_template("vicuna_v1")
    exs = [tokenize_record(r, bundle.tokenizer, tmpl, max_length=256, num_image_tokens=bundle.num_image_tokens)
           for r in records]
    pix = [bundle.image_transform(load_image(FIX / p)) for r in records for p in r.images]
    return collate_examples(exs, bundle.tokenizer.pad_token_id, pixel_values=pix or None)


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}


@torch.no_grad()
def _logits(model, batch):
    return model.eval()(**_model_inputs(batch)).logits


def _close(a, b, batch, atol=ATOL):
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=atol)


# --------------------------------------------------------------------------- #
# mm_projector.bin
# --------------------------------------------------------------------------- #


def _llava_projector_file(bundle, path: Path, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A projector file in LLaVA's layout (as its stage 1 saves it), random weights, bf16 like LLaVA's."""
    proj = bundle.model.projector
    torch.manual_seed(7)
    state = {
        "model.mm_projector.0.weight": torch.randn_like(proj.linear_1.weight).to(dtype),
        "model.mm_projector.0.bias": torch.randn_like(proj.linear_1.bias).to(dtype),
        "model.mm_projector.2.weight": torch.randn_like(proj.linear_2.weight).to(dtype),
        "model.mm_projector.2.bias": torch.randn_like(proj.linear_2.bias).to(dtype),
    }
    torch.save(state, path)
    return state


def test_mm_projector_bin_loads_into_the_projector(tmp_path) -> None:
    bundle, cfg = build_tiny("tiny_mllm")
    path = tmp_path / "mm_projector.bin"
    state = _llava_projector_file(bundle, path)
    for source in (path, tmp_path):  # the file, or LLaVA's output folder holding it
        cfg.model.projector.checkpoint = str(source)
        torch.manual_seed(0)
        b = build_model(cfg.model)
        p = b.model.projector
        assert torch.equal(p.linear_1.weight, state["model.mm_projector.0.weight"].float())
        assert torch.equal(p.linear_1.bias, state["model.mm_projector.0.bias"].float())
        assert torch.equal(p.linear_2.weight, state["model.mm_projector.2.weight"].float())
        assert torch.equal(p.linear_2.bias, state["model.mm_projector.2.bias"].float())


def test_mm_projector_bin_starts_a_run(tmp_path) -> None:
    bundle, _ = build_tiny("tiny_mllm")
    path = tmp_path / "mm_projector.bin"
    state = _llava_projector_file(bundle, path)
    out = tmp_path / "run"
    args = ["train", str(Path(__file__).resolve().parents[1] / "configs" / "tiny_mllm.yaml"), "--output-dir", str(out),
            f"data.train=[{MIXED}]", f"model.tokenizer.train_files=[{MIXED}]", f"data.image_root={FIX}",
            "train.batch_size=4", "train.progress=false", "--max-steps", "1", "train.lr=0",
            f"model.projector.checkpoint={path}"]
    assert main(args) == 0
    saved = load_model(out)
    assert torch.equal(saved.model.projector.linear_2.weight, state["model.mm_projector.2.weight"].float())


@pytest.mark.parametrize(("change", "message"), [
    ("key", "not an mm_projector weight"),
    ("shape", "do not fit"),
    ("pickle", "cannot be read as torch weights"),
])
def test_bad_projector_files_fail_with_one_line_errors(tmp_path, change: str, message: str) -> None:
    bundle, cfg = build_tiny("tiny_mllm")
    path = tmp_path / "mm_projector.bin"
    state = _llava_projector_file(bundle, path)
    if change == "key":
        state["model.other.weight"] = torch.zeros(2)
        torch.save(state, path)
    elif change == "shape":
        state["model.mm_projector.0.weight"] = torch.zeros(3, 3)
        torch.save(state, path)
    else:  # a pickled object that is not a tensor: weights_only refuses to unpickle it
        torch.save({"model.mm_projector.0.weight": Path("x")}, path)
    cfg.model.projector.checkpoint = str(path)
    with pytest.raises(MMTuneError, match=message) as err:
        build_model(cfg.model)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- #
# model.init_from: a llava-hf folder
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def llava_hf(tmp_path_factory) -> tuple[Path, object]:
    """A tiny random llava-hf folder: LlavaForConditionalGeneration + LlavaProcessor (CLIP 32px, Llama)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder = tmp_path_factory.mktemp("llava_hf") / "tiny-llava-hf"
    tok = build_byte_bpe_tokenizer(list(record_texts(read_records(MIXED))) * 3, 320)
    img = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tok), initializer_range=0.2,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_index=img, image_seq_length=16, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(3)
    hf = LlavaForConditionalGeneration(config).eval()
    hf.save_pretrained(str(folder))
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=get_template("vicuna_v1").chat_template(),
    )
    proc.save_pretrained(str(folder))
    return folder, hf


def test_init_from_llava_hf_takes_every_part(llava_hf) -> None:
    from transformers import AutoProcessor

    folder, hf = llava_hf
    bundle = build_model(ModelConfig(init_from=str(folder)))
    cfg = bundle.config
    assert cfg.mode == "mllm" and cfg.vision.backend == "hf" and cfg.vision.feature_layer == -2
    assert cfg.vision.select_strategy == "patch" and cfg.projector.type == "mlp2x_gelu"
    assert bundle.num_image_tokens == 16 and bundle.model.image_token_id == hf.config.image_token_index
    assert len(bundle.tokenizer) == hf.config.text_config.vocab_size
    batch = _batch(bundle, mixed_records())
    # the processor settings came along: mmtune's pixels are the folder's processor's pixels
    proc = AutoProcessor.from_pretrained(str(folder))
    for r in mixed_records():
        for p in r.images:
            img = load_image(FIX / p)
            torch.testing.assert_close(bundle.image_transform(img), proc.image_processor(img, return_tensors="pt")
                                       ["pixel_values"][0], rtol=0, atol=1e-5)
    _close(_logits(bundle.model, batch), _logits(hf, batch), batch)


def test_init_from_refuses_what_it_cannot_take(llava_hf, tmp_path) -> None:
    folder, _ = llava_hf
    with pytest.raises(MMTuneError, match="leave model.lm.name_or_path"):
        build_model(_with_lm(folder))
    with pytest.raises(MMTuneError, match="no config.json"):
        build_model(ModelConfig(init_from=str(tmp_path)))
    bad = tmp_path / "bad"
    bad.mkdir()
    conf = json.loads((folder / "config.json").read_text())
    conf["vision_feature_layer"] = [-2, -5]
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(MMTuneError, match=r"vision_feature_layer \[-2, -5\]"):
        build_model(ModelConfig(init_from=str(bad)))


def _with_lm(folder: Path) -> ModelConfig:
    cfg = ModelConfig(init_from=str(folder))
    cfg.lm.name_or_path = "some/lm"
    return cfg


def _train_args(folder: Path, out: Path, *extra: str) -> list[str]:
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"init_from": str(folder)},
        "data": {"train": [str(MIXED)], "image_root": str(FIX), "template": "vicuna_v1", "max_length": 256},
        "train": {"stage": "instruct", "batch_size": 4, "lr": 1e-3, "progress": False, "warmup_ratio": 0.0},
    }))
    return ["train", str(cfg), "--output-dir", str(out), *extra]


def test_init_from_llava_hf_continues_training_and_round_trips(llava_hf, tmp_path, capsys) -> None:
    folder, hf = llava_hf
    out = tmp_path / "run"
    assert main(_train_args(folder, out, "--max-steps", "2")) == 0
    tuned = load_model(out)  # the fine-tuned LM comes from the run; tower (frozen) and nothing else from the folder
    assert tuned.config.init_from == str(folder)
    hf_tower = hf.model.vision_tower.state_dict()
    for name, value in tuned.model.vision.model.state_dict().items():
        assert torch.equal(value, hf_tower[name]), name
    batch = _batch(tuned, mixed_records())
    after = _logits(tuned.model, batch)
    assert (after - _logits(hf, batch)).abs().max() > 1e-3  # the run did train the released weights
    # export -> init_from: the exported folder comes back in with the same logits
    exported = tmp_path / "exported"
    assert main(["export", str(out), "--format", "hf-llava", "--out", str(exported)]) == 0
    back = build_model(ModelConfig(init_from=str(exported)))
    assert back.tokenizer.convert_tokens_to_ids("<image>") == tuned.model.image_token_id
    _close(_logits(back.model, batch), after, batch)
    # and a run continues from the export
    assert main(_train_args(exported, tmp_path / "run2", "--max-steps", "1")) == 0


def test_export_round_trip_of_an_mmtune_run(tmp_path) -> None:
    """An mmtune-trained tiny MLLM (open_clip tower) -> hf-llava -> init_from: logits match to 1e-4."""
    bundle, cfg = build_tiny("tiny_mllm", initializer_range=0.2)
    batch, _ = make_batch(bundle, mixed_records())
    save_run(bundle, cfg, tmp_path / "run", template="vicuna_v1")
    assert main(["export", str(tmp_path / "run"), "--format", "hf-llava", "--out", str(tmp_path / "hf")]) == 0
    back = build_model(ModelConfig(init_from=str(tmp_path / "hf")))
    assert back.config.vision.pad_to_square == cfg.model.vision.pad_to_square
    for r in mixed_records():
        for p in r.images:
            img = load_image(FIX / p)
            torch.testing.assert_close(back.image_transform(img), bundle.image_transform(img), rtol=0, atol=1e-4)
    back_batch = _batch(back, mixed_records())
    assert torch.equal(back_batch["input_ids"], batch["input_ids"])
    _close(_logits(back.model, back_batch), _logits(bundle.model, batch), batch)


def test_real_llava_15_7b_hf_folder_settings_are_read() -> None:
    """The released llava-1.5-7b-hf config, processor and tokenizer (no weights) pass init_from's checks."""
    from conftest import SHARED_DATA
    from transformers import AutoTokenizer

    from mmtune.data.tokenizer import prepare_tokenizer
    from mmtune.model.hf_llava import SELECT, _config, _processor_settings

    folder = SHARED_DATA / "tokenizers" / "llava-1.5-7b-hf"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (released tokenizers live in ../shared/data/tokenizers next to the repo)")
    conf = _config(folder)
    assert conf.vision_feature_layer == -2 and SELECT[conf.vision_feature_select_strategy] == "patch"
    processor_cfg, pad = _processor_settings(folder, conf.vision_config)
    assert processor_cfg["size"] == {"shortest_edge": 336} and processor_cfg["crop_size"] == {"height": 336, "width": 336}
    assert not pad  # llava-hf's processor resizes and centre-crops; it does not pad to square
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
    assert tok.convert_tokens_to_ids("<image>") == conf.image_token_index == 32000
    assert len(tok) <= conf.text_config.vocab_size  # no embedding resize needed
