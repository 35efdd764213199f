"""lmms-eval reads mmtune's exports: an `mmtune export --format hf-llava` folder loaded by lmms-eval's own
`llava_hf` model class answers generation requests with the same text as `mmtune generate`.

Offline: the model is a tiny random run exported in the test, the requests are built here (no task
download, no hub). Skips when lmms-eval (the `[lmms]` extra) is not installed.
"""

from __future__ import annotations

import pytest
from helpers import HF_CLIP, TRAIN_FIX, save_run, tiny_cfg

from mmtune.cli import main
from mmtune.config import VisionConfig
from mmtune.data.images import load_image
from mmtune.model import build_model

pytestmark = pytest.mark.slow

IMAGES = ["red_circle.png", "blue_triangle.png", "red_square.png"]
QUESTIONS = ["What colour is the shape?", "What shape is this?", "Describe the picture."]


def _lmms():
    try:
        from lmms_eval.api.instance import Instance
        from lmms_eval.models.simple.llava_hf import LlavaHf
    except ImportError as exc:  # lmms_eval itself, or a module its llava_hf imports (decord)
        pytest.skip(f"lmms-eval is not importable ({exc}); install mmtune[lmms] to run this check")
    return LlavaHf, Instance


def test_exported_model_answers_through_lmms_eval_llava_hf_like_mmtune_generate(tmp_path, capsys):
    import torch

    LlavaHf, Instance = _lmms()
    cfg = tiny_cfg("tiny_mllm", initializer_range=0.3)
    # HF CLIP tower: transformers' default image processor gives mmtune's pixels exactly (lmms-eval loads
    # the processor with its defaults).
    cfg.model.vision = VisionConfig(backend="hf", config=HF_CLIP, feature_layer=-2)
    torch.manual_seed(0)
    save_run(build_model(cfg.model), cfg, tmp_path / "run", template="vicuna_v1")
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--format", "hf-llava", "--out", str(out)]) == 0

    # device_map: lmms-eval's default "" is refused by transformers 5 (see docs/eval.md).
    lm = LlavaHf(pretrained=str(out), device="cpu", device_map="cpu", dtype="float32", batch_size=1)
    docs = [{"image": load_image(TRAIN_FIX / "images" / name)} for name in IMAGES]
    lm.task_dict = {"mmtune_check": {"test": docs}}
    requests = [
        Instance(request_type="generate_until",
                 arguments=(q, {"max_new_tokens": 8, "temperature": 0, "until": ["USER:"]},
                            lambda doc: [doc["image"]], i, "mmtune_check", "test"),
                 idx=0, metadata={"task": "mmtune_check", "doc_id": i, "repeats": 1})
        for i, q in enumerate(QUESTIONS)
    ]
    theirs = lm.generate_until(requests)
    assert len(theirs) == len(QUESTIONS)

    mine = []
    for name, q in zip(IMAGES, QUESTIONS):
        capsys.readouterr()
        assert main(["generate", str(tmp_path / "run"), "--image", str(TRAIN_FIX / "images" / name),
                     "--prompt", q, "--max-new-tokens", "8"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        mine.append(printed[-1] if printed else "")
    # lmms-eval's llava_hf decodes without stripping whitespace and does not apply `until`; mmtune strips.
    assert [t.strip() for t in theirs] == mine
    assert len(set(mine)) > 1  # real, input-dependent answers
