"""uint8 pixels from the loader, normalised by the tower on the device: the same numbers as the CPU transform.

The reference is open_clip's own eval transform (PIL steps, ToTensor,
Normalize on the CPU), which is what the loader ran before it shipped uint8.
Equality is bitwise (`torch.equal`), not a tolerance.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import SHARED_DATA
from helpers import HF_CLIP, TINY_VIT, TRAIN_FIX, build_tiny, make_batch, mixed_records
from PIL import Image

from mmtune.config import VisionConfig
from mmtune.data.images import expand_to_square, load_image
from mmtune.data.stream import ExampleStream
from mmtune.errors import MMTuneError
from mmtune.model.towers.base import PixelNorm
from mmtune.model.vision import build_vision_tower

pytestmark = pytest.mark.usefixtures("one_thread")

VIT_336 = {"embed_dim": 32, "vision_cfg": {"image_size": 336, "patch_size": 14, "width": 32, "layers": 1,
                                           "head_width": 16, "mlp_ratio": 1.0}}


def _images() -> list:
    """Fixture images (wide, tall, square, PNG) and, when ../shared is there, a few real JPEGs."""
    paths = sorted((TRAIN_FIX / "images").glob("*.png"))[:6]
    paths += sorted(SHARED_DATA.rglob("*.jpg"))[::3] if SHARED_DATA.is_dir() else []
    imgs = [load_image(p) for p in paths]
    return [*imgs, imgs[2].transpose(Image.Transpose.ROTATE_90)]  # a tall one too (pads left and right)


def _old_cpu_path(tower, img, pad: bool) -> torch.Tensor:
    """What the loader computed before: (pad to square with the mean colour,) open_clip's transform."""
    fill = tuple(int(m * 255) for m in tower.image_mean)
    return tower.open_clip_transform()(expand_to_square(img, fill) if pad else img)


@pytest.mark.parametrize("vit", [TINY_VIT, VIT_336], ids=["32px", "336px"])
@pytest.mark.parametrize("pad", [True, False], ids=["pad", "crop"])
def test_uint8_pixels_normalised_by_the_tower_equal_the_old_cpu_transform(vit, pad):
    tower = build_vision_tower(VisionConfig(config=vit))
    raw = pickle.loads(pickle.dumps(tower.image_transform(pad, normalize=False)))  # as DataLoader workers get it
    full = tower.image_transform(pad)
    naive_differs = False
    for img in _images():
        old = _old_cpu_path(tower, img, pad)
        pixels = raw(img)
        assert pixels.dtype == torch.uint8 and pixels.shape == old.shape
        assert torch.equal(tower.pixel_norm(pixels), old)
        assert torch.equal(full(img), old)  # the float transform eval and generate use: the same numbers
        # the check has teeth: multiplying by 1/255 (what CUDA does for a CPU-scalar divisor) is not the same
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (tower.pixel_norm.mean, tower.pixel_norm.std))
        naive_differs |= not torch.equal((pixels.float() * (1 / 255) - mean) / std, old)
    assert naive_differs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tower_features_from_uint8_equal_features_from_normalised_pixels(dtype):
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(config=TINY_VIT)).to(dtype).eval()
    imgs = _images()[:4]
    raw = tower.image_transform(True, normalize=False)
    pixels = torch.stack([raw(i) for i in imgs])
    old = torch.stack([_old_cpu_path(tower, i, True) for i in imgs])
    with torch.no_grad():
        assert torch.equal(tower(pixels), tower(old))
    # casting the tower does not round the constants (they are not buffers)
    assert tower.pixel_norm == PixelNorm(tuple(tower.image_mean), tower.pixel_norm.std)
    with pytest.raises(MMTuneError, match="uint8 pixels"):
        tower.pixel_norm(old)


def test_model_loss_from_uint8_batch_equals_loss_from_normalised_batch():
    bundle, _ = build_tiny("tiny_mllm")
    batch, _ = make_batch(bundle, mixed_records())
    records = mixed_records()
    raw = torch.stack([bundle.pixel_transform(load_image(TRAIN_FIX / p)) for r in records for p in r.images])
    assert raw.dtype == torch.uint8 and raw.shape == batch["pixel_values"].shape
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        ref = bundle.model(**inputs, pixel_values=batch["pixel_values"]).loss
        mine = bundle.model(**inputs, pixel_values=raw).loss
    assert torch.equal(ref, mine)


def test_training_stream_ships_uint8_with_and_without_workers(tmp_path):
    bundle, cfg = build_tiny("tiny_mllm")
    out = {}
    for workers in (0, 2):
        stream = ExampleStream(cfg.data.train, bundle.tokenizer, "vicuna_v1", max_length=256,
                               num_image_tokens=bundle.num_image_tokens, image_transform=bundle.pixel_transform,
                               image_root=str(TRAIN_FIX), shuffle_buffer=4, seed=3, epochs=1, num_workers=workers)
        out[workers] = [(ex.id, [img.clone() for img in imgs]) for ex, imgs in stream]
    images = [img for _, imgs in out[0] for img in imgs]
    assert images and all(img.dtype == torch.uint8 and img.shape == (3, 32, 32) for img in images)
    assert [i for i, _ in out[0]] == [i for i, _ in out[2]]
    assert all(torch.equal(a, b) for (_, x), (_, y) in zip(out[0], out[2], strict=True)
               for a, b in zip(x, y, strict=True))


@pytest.mark.parametrize("model_type", ["clip_vision_model", "siglip_vision_model"])
def test_hf_towers_normalise_uint8_as_their_fast_processor_does(model_type):
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(backend="hf", config={**HF_CLIP, "model_type": model_type})).eval()
    assert tower.pixel_norm is not None and tower.pixel_norm.rescale_factor is not None
    for pad in (True, False):
        raw, full = tower.image_transform(pad, normalize=False), tower.image_transform(pad)
        pixels = [raw(i) for i in _images()]
        old = torch.stack([full(i) for i in _images()])  # the processor's own rescale + normalise on the CPU
        assert all(p.dtype == torch.uint8 for p in pixels)
        assert torch.equal(tower.pixel_norm(torch.stack(pixels)), old)
    with torch.no_grad():
        assert torch.equal(tower(torch.stack(pixels)), tower(old))


def test_a_tower_that_normalises_on_the_cpu_refuses_uint8():
    from mmtune.model.towers.hf_tower import HFVisionTower

    base = build_vision_tower(VisionConfig(backend="hf", config=HF_CLIP))
    tower = HFVisionTower(base.model, {**base.processor_cfg, "_backend": "pil"}, -2, "patch")  # numpy arithmetic
    assert tower.pixel_norm is None
    img = _images()[2]
    # its loader transform is the normalised one
    assert tower.image_transform(True, normalize=False)(img).dtype == torch.float32
    with pytest.raises(MMTuneError, match="uint8 pixel_values"):
        tower(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks the device-side normalisation")
def test_normalising_on_cuda_gives_the_cpu_bits():
    tower = build_vision_tower(VisionConfig(config=VIT_336))
    raw = tower.image_transform(True, normalize=False)
    pixels = torch.stack([raw(i) for i in _images()])
    cpu = tower.pixel_norm(pixels)
    gpu_norm = copy.deepcopy(tower.pixel_norm)
    assert torch.equal(gpu_norm(pixels.cuda()).cpu(), cpu)
    # a loader batch: channels-last uint8, pinned, copied asynchronously, as the trainer does
    from mmtune.data.collate import stack_images

    loader = stack_images([raw(i) for i in _images()]).pin_memory()
    assert loader.is_pinned() and loader.is_contiguous(memory_format=torch.channels_last)
    on_gpu = gpu_norm(loader.to("cuda", non_blocking=True))
    assert on_gpu.is_contiguous() and torch.equal(on_gpu.cpu(), cpu)
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256).contiguous()
    assert torch.equal(gpu_norm(every.cuda()).cpu(), tower.pixel_norm(every))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinning page-locks host memory for a GPU")
def test_batcher_pins_batches_for_a_cuda_device():
    from mmtune.data.batching import Batcher

    bundle, cfg = build_tiny("tiny_mllm")
    stream = ExampleStream(cfg.data.train, bundle.tokenizer, "vicuna_v1", max_length=256,
                           num_image_tokens=bundle.num_image_tokens, image_transform=bundle.pixel_transform,
                           image_root=str(TRAIN_FIX), epochs=1)
    batch = next(iter(Batcher(stream, batch_size=4, group_by_length=False, pin_memory=True)))
    assert all(v.is_pinned() for v in batch.values() if isinstance(v, torch.Tensor))


def test_pad_resize_gives_pad_then_resize_bit_for_bit():
    import numpy as np

    from mmtune.data.images import pad_resize

    rng = np.random.default_rng(0)
    # random wide and tall photos, shrunk and enlarged; sizes whose band ends fall on awkward fractions
    # (Pillow takes the box as float32); LLaVA's 336 and SigLIP's 384 with COCO-like photos
    shapes = [(int(rng.integers(1, 700)), int(rng.integers(1, 700)), int(rng.choice([7, 32, 64, 100, 224, 336])))
              for _ in range(40)]
    shapes += [(500, 375, 336), (800, 600, 336), (640, 428, 336), (336, 200, 336), (300, 168, 336), (427, 640, 336),
               (316, 500, 336), (1008, 336, 336), (336, 1008, 336), (765, 573, 100), (232, 554, 336), (345, 415, 384),
               (617, 855, 224), (603, 473, 224), (31, 688, 336), (640, 480, 384), (480, 640, 384)]
    filters = (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS, Image.Resampling.HAMMING,
               Image.Resampling.BOX, Image.Resampling.NEAREST)
    for i, (w, h, n) in enumerate(shapes):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        fill = ((122, 116, 104), (255, 255, 255), (0, 0, 0), tuple(int(c) for c in rng.integers(0, 256, 3)))[i % 4]
        for resample in (filters[:2] if i % 4 else filters):
            ref = expand_to_square(img, fill).resize((n, n), resample)
            got = pad_resize(img, fill, n, resample)
            assert np.array_equal(np.asarray(got), np.asarray(ref)), (w, h, n, fill, resample)
    # the padding outputs are cached per canvas size: a second photo of a size must not see the first one's band
    for w, h in ((640, 480), (480, 640)):
        for _ in range(2):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ref = expand_to_square(img, (122, 116, 104)).resize((336, 336), Image.Resampling.BICUBIC)
            assert np.array_equal(np.asarray(pad_resize(img, (122, 116, 104), 336)), np.asarray(ref)), (w, h)


def test_open_clip_pad_transform_is_fused_and_equals_pad_then_transform():
    from mmtune.model.towers.base import PadResize, PadToSquare, RawPixels

    tower = build_vision_tower(VisionConfig(config=VIT_336))
    fused = tower.image_transform(True, normalize=False)
    assert isinstance(fused, RawPixels) and isinstance(fused.steps.transforms[0], PadResize)
    # the CenterCrop after it would only copy the square PadResize made
    assert [type(t).__name__ for t in fused.steps.transforms] == ["PadResize", "MaybeConvertMode"]
    plain = PadToSquare(RawPixels(tower._split_transform()[0]), tower.image_mean)
    for img in _images():
        assert torch.equal(fused(img), plain(img))


def test_loader_batches_stack_uint8_images_channels_last_and_the_tower_gets_the_same_floats():
    from mmtune.data.batching import Batcher

    torch.manual_seed(0)
    bundle, cfg = build_tiny("tiny_mllm")
    stream = ExampleStream(cfg.data.train, bundle.tokenizer, "vicuna_v1", max_length=256,
                           num_image_tokens=bundle.num_image_tokens, image_transform=bundle.pixel_transform,
                           image_root=str(TRAIN_FIX), shuffle_buffer=4, seed=3, epochs=1)
    batch = next(b for b in Batcher(stream, batch_size=8, pad_token_id=bundle.tokenizer.pad_token_id,
                                    group_by_length=False) if "pixel_values" in b)
    pixels = batch["pixel_values"]
    # stacked as the HWC bytes PIL gave (no per-image transpose), the same values as a plain stack
    assert pixels.dtype == torch.uint8 and pixels.is_contiguous(memory_format=torch.channels_last)
    assert not pixels.is_contiguous()
    plain = pixels.contiguous()
    tower = bundle.model.vision.eval()
    normed = tower.pixel_norm(pixels)
    assert normed.is_contiguous() and torch.equal(normed, tower.pixel_norm(plain))
    with torch.no_grad():
        assert torch.equal(tower(pixels), tower(plain))
