"""Make the demo's two pretrained bases from procedural data, on CPU, with no download.

    python scripts/pretrain_demo_bases.py --out mmtune/assets/demo_bases

writes

    OUT/clip/   a tiny CLIP (open_clip's own CLIP class, ViT image tower + text
                tower) trained with open_clip.loss.ClipLoss on drawn scenes paired
                with their descriptions; open_clip_config.json +
                open_clip_model.safetensors + its tokenizer, so
                `open_clip.create_model("local-dir:OUT/clip")` loads it the way
                `create_model("hf-hub:timm/...")` loads a released model.
    OUT/lm/     a tiny Llama causal LM trained with next-token loss on plain
                declarative prose, a paragraph per topic (one word's facts,
                sums, one scene described and then its facts; no questions, no
                instructions, no chat tokens), so it learns to read its context,
                as a Hugging Face folder that AutoModelForCausalLM /
                AutoTokenizer load.
    OUT/README.md and OUT/pretrain.json: the command, corpus sizes, losses, sha256s.

Seeded and deterministic on a given torch version and thread count (--threads).
The scenes vary more than the demo's pool (any size, any place, jittered
colours, random light backgrounds, one to four shapes, repeated shapes), and
both corpora are drawn from seeds the demo's pool and eval sets never use.
This is mmtune's own pretraining recipe for its demo, hence written here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtune.fileio import atomic_dir

# Seeds of the two corpora: far from the demo's pool (seed) and eval sets (seed + 101/202/303).
CLIP_DATA_SEED = 910_001
LM_DATA_SEED = 920_002

LM_CONFIG = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True}
CLIP_IMAGE = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32, "mlp_ratio": 2.0}
CLIP_TEXT = {"context_length": 32, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0}
CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama's order for the first three


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_tokenizer(texts: list[str], vocab_size: int, *, append_eos: bool) -> Any:
    """Byte-level BPE over the LM corpus; `<s> text` for the LM, `text </s>` for the CLIP text tower."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.model_max_length = LM_CONFIG["max_position_embeddings"]
    return fast


_T0 = time.perf_counter()


def _log_progress(what: str, step: int, steps: int, losses: list[float]) -> None:
    """A line every 50 steps when stderr is not a terminal (tqdm shows progress when it is)."""
    if not sys.stderr.isatty() and (step + 1) % 50 == 0:
        print(f"{what} step {step + 1}/{steps} loss {np.mean(losses[-50:]):.3f} ({time.perf_counter() - _T0:.0f} s)",
              flush=True)


def _train(what: str, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, lr: float,
           step_loss: Callable[[], torch.Tensor], *, clip_grad: float | None = None,
           after_step: Callable[[], None] | None = None) -> list[float]:
    """The loop both bases train with: cosine LR after a 5% warmup, one optimizer step per batch
    (`step_loss` draws the batch and returns its loss), progress logged; returns the losses."""
    from tqdm import tqdm

    losses: list[float] = []
    model.train()
    for step in tqdm(range(steps), desc=f"pretrain {what}", unit="step", disable=not sys.stderr.isatty()):
        for g in opt.param_groups:
            g["lr"] = _cosine(step, steps, lr, max(1, steps // 20))
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        _log_progress(what, step, steps, losses)
    model.eval()
    return losses


def _cosine(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --------------------------------------------------------------------------- #
# The language model
# --------------------------------------------------------------------------- #


def pretrain_lm(out: Path, tokenizer: Any, docs: list[str], *, steps: int, batch: int, seq: int,
                lr: float, seed: int, shape: dict[str, int] | None = None) -> dict[str, Any]:
    """`shape` overrides LM_CONFIG's sizes (hidden_size, intermediate_size, num_hidden_layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=True)["input_ids"]:
        ids.extend(enc + [tokenizer.eos_token_id])  # <s> doc </s>, packed
    stream = torch.tensor(ids, dtype=torch.long)
    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       **{**LM_CONFIG, **(shape or {})})
    model = LlamaForCausalLM(conf)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    n_windows = len(stream) - seq - 1

    def step_loss() -> torch.Tensor:
        starts = torch.randint(0, n_windows, (batch,), generator=gen)
        x = torch.stack([stream[s: s + seq] for s in starts.tolist()])
        return model(input_ids=x, labels=x).loss

    losses = _train("LM", model, opt, steps, lr, step_loss, clip_grad=1.0)
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    params = sum(p.numel() for p in model.parameters())
    return {"tokens": len(stream), "documents": len(docs), "parameters": params, "hidden_size": conf.hidden_size,
            "intermediate_size": conf.intermediate_size, "layers": conf.num_hidden_layers, "steps": steps,
            "batch": batch, "seq": seq, "lr": lr, "loss_first": float(np.mean(losses[:10])),
            "loss_last": float(np.mean(losses[-50:])), "losses": losses}


# --------------------------------------------------------------------------- #
# The CLIP
# --------------------------------------------------------------------------- #


def clip_model_cfg(vocab_size: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    """An open_clip model config (the shape of open_clip's model_configs/*.json)."""
    return {
        "embed_dim": 64,
        "vision_cfg": dict(CLIP_IMAGE),
        "text_cfg": {**CLIP_TEXT, "vocab_size": vocab_size, "hf_tokenizer_name": "local", "pool_type": "eos",
                     "eos_id": eos_id, "pad_id": pad_id},
    }


def scene_pairs(n: int, seed: int) -> tuple[list[Any], list[str]]:
    from mmtune.data.synthetic import describe_scene, draw_free_scene, free_scene

    rng = random.Random(seed)
    images, texts = [], []
    for _ in range(n):
        things = free_scene(rng)
        images.append(draw_free_scene(things, rng))
        texts.append(describe_scene(things))
    return images, texts


def pretrain_clip(out: Path, tokenizer: Any, *, pairs: int, steps: int, batch: int, lr: float,
                  seed: int) -> dict[str, Any]:
    import open_clip
    from open_clip.loss import ClipLoss
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from safetensors.torch import save_file
    from tqdm import tqdm

    model_cfg = clip_model_cfg(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    preprocess_cfg = {"size": CLIP_IMAGE["image_size"], "mean": list(open_clip.OPENAI_DATASET_MEAN),
                      "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    out.mkdir(parents=True)
    with open(out / "open_clip_config.json", "w", encoding="utf-8") as fh:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, fh, indent=2)
    tokenizer.save_pretrained(str(out))
    torch.manual_seed(seed)
    # open_clip's own factory builds the model from the folder's config (no weights yet).
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False, output_dict=True)
    text_tok = open_clip.get_tokenizer(f"local-dir:{out}")
    transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)

    images, texts = scene_pairs(pairs, CLIP_DATA_SEED)
    pix = torch.stack([transform(im) for im in tqdm(images, desc="scenes", disable=not sys.stderr.isatty())])
    toks = text_tok(texts)
    loss_fn = ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(seed)

    def step_loss() -> torch.Tensor:
        idx = torch.randperm(pairs, generator=gen)[:batch]
        res = model(pix[idx], toks[idx])
        return loss_fn(res["image_features"], res["text_features"], res["logit_scale"])

    def clamp_scale() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    losses = _train("CLIP", model, opt, steps, lr, step_loss, after_step=clamp_scale)
    # Held-out retrieval accuracy: scenes drawn with another seed, image -> its own description among `batch`.
    test_img, test_txt = scene_pairs(batch, CLIP_DATA_SEED + 1)
    with torch.no_grad():
        f_i = model.encode_image(torch.stack([transform(im) for im in test_img]), normalize=True)
        f_t = model.encode_text(text_tok(test_txt), normalize=True)
        top1 = float(((f_i @ f_t.T).argmax(dim=1) == torch.arange(batch)).float().mean())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    params = sum(p.numel() for p in model.parameters())
    return {"pairs": pairs, "parameters": params, "steps": steps, "batch": batch, "lr": lr,
            "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-50:])),
            f"heldout_image_to_text_top1_of_{batch}": top1, "losses": losses}


def copy_clip(src: Path, out: Path) -> dict[str, Any]:
    """`--clip-from`: reuse a CLIP this script made (e.g. the shipped one), so only the LM differs."""
    import shutil

    shutil.copytree(src, out)
    made = src.parent / "pretrain.json"
    info = json.loads(made.read_text(encoding="utf-8")).get("clip", {}) if made.is_file() else {}
    return {**info, "copied_from": str(src)}


# --------------------------------------------------------------------------- #


def _timed(fn: Any, *args: Any, threads: int, **kwargs: Any) -> dict[str, Any]:
    torch.set_num_threads(threads)
    t = time.perf_counter()
    info = fn(*args, **kwargs)
    info["seconds"] = round(time.perf_counter() - t, 1)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to create (refused if it exists and is not empty)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (results are exact for a thread count)")
    ap.add_argument("--lm-docs", type=int, default=8000)
    ap.add_argument("--lm-steps", type=int, default=3000)
    ap.add_argument("--lm-batch", type=int, default=16)
    ap.add_argument("--lm-seq", type=int, default=128)
    ap.add_argument("--lm-lr", type=float, default=3e-3)
    ap.add_argument("--lm-hidden", type=int, default=LM_CONFIG["hidden_size"])
    ap.add_argument("--lm-intermediate", type=int, default=LM_CONFIG["intermediate_size"])
    ap.add_argument("--lm-layers", type=int, default=LM_CONFIG["num_hidden_layers"])
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--clip-pairs", type=int, default=10000)
    ap.add_argument("--clip-steps", type=int, default=600)
    ap.add_argument("--clip-batch", type=int, default=128)
    ap.add_argument("--clip-lr", type=float, default=2e-3)
    ap.add_argument("--clip-from", type=Path, default=None, metavar="DIR",
                    help="copy this clip/ folder (one this script made) instead of training a CLIP")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty; remove it or choose another --out", file=sys.stderr)
        return 2
    if args.clip_from is not None:
        missing = [f for f in CLIP_FILES if not (args.clip_from / f).is_file()]
        if missing:
            print(f"error: --clip-from {args.clip_from}: no {', '.join(missing)} there (give a clip/ folder this "
                  "script wrote)", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    with atomic_dir(out) as tmp:  # an empty `out` (checked above) is replaced only once all is written
        t0 = time.perf_counter()

        from mmtune.data.synthetic import fact_corpus

        docs = fact_corpus(args.lm_docs, LM_DATA_SEED + args.seed)
        lm_tok = build_tokenizer(docs, args.vocab, append_eos=False)
        clip_tok = build_tokenizer(docs, args.vocab, append_eos=True) if args.clip_from is None else None
        # The two bases are independent: train them in two processes (each seeded, each on --threads threads).
        from concurrent.futures import ProcessPoolExecutor

        shape = {"hidden_size": args.lm_hidden, "intermediate_size": args.lm_intermediate,
                 "num_hidden_layers": args.lm_layers}
        with ProcessPoolExecutor(max_workers=2) as pool:
            lm_job = pool.submit(_timed, pretrain_lm, tmp / "lm", lm_tok, docs, steps=args.lm_steps,
                                 batch=args.lm_batch, seq=args.lm_seq, lr=args.lm_lr, seed=args.seed,
                                 shape=shape, threads=args.threads)
            if args.clip_from is None:
                clip_job = pool.submit(_timed, pretrain_clip, tmp / "clip", clip_tok, pairs=args.clip_pairs,
                                       steps=args.clip_steps, batch=args.clip_batch, lr=args.clip_lr,
                                       seed=args.seed, threads=args.threads)
                clip = clip_job.result()
            else:
                clip = copy_clip(args.clip_from, tmp / "clip")
            lm = lm_job.result()
        print(f"LM: {lm['parameters']:,} parameters, {lm['tokens']:,} tokens, loss {lm['loss_first']:.3f} -> "
              f"{lm['loss_last']:.3f} in {lm['seconds']} s", flush=True)
        if "copied_from" in clip:
            print(f"CLIP: copied from {clip['copied_from']}", flush=True)
        else:
            print(f"CLIP: {clip['parameters']:,} parameters, {clip['pairs']:,} pairs, loss {clip['loss_first']:.3f} -> "
                  f"{clip['loss_last']:.3f} in {clip['seconds']} s", flush=True)

        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        command = "python scripts/pretrain_demo_bases.py " + " ".join(sys.argv[1:] if argv is None else argv)
        info = {
            "command": command, "seed": args.seed, "vocab": len(lm_tok), "threads": args.threads, "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 1),
            "lm": {k: v for k, v in lm.items() if k != "losses"}, "clip": {k: v for k, v in clip.items() if k != "losses"},
            "sha256": files,
        }
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_readme(info), encoding="utf-8")
    print(f"wrote {out} in {info['seconds']} s", flush=True)
    return 0


def _readme(info: dict[str, Any]) -> str:
    lm, clip = info["lm"], info["clip"]
    top1 = next((v for k, v in clip.items() if k.startswith("heldout_image_to_text_top1")), None)
    clip_line = (f"""- `clip/`: an open_clip CLIP (ViT 32 px, patch 8, width 64, 3 blocks; text transformer width 64, 2 blocks),
  {clip['parameters']:,} parameters, trained with `open_clip.loss.ClipLoss` on {clip['pairs']:,} drawn scenes
  (one to four shapes of any size anywhere, jittered colours, random light backgrounds) paired with their
  descriptions ("two shapes: a red circle left of a blue square"). {clip['steps']} steps of batch
  {clip['batch']}; loss {clip['loss_first']:.3f} -> {clip['loss_last']:.3f}; held-out image -> text top-1
  among {clip['batch']}: {100 * top1:.1f}%.""" if top1 is not None else "- `clip/`: a CLIP this script made before.")
    if "copied_from" in clip:
        clip_line += f" Copied from `{clip['copied_from']}` (`--clip-from`), not trained in this run."
    rows = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in info["sha256"].items())
    return f"""# The demo's pretrained bases

Made by `scripts/pretrain_demo_bases.py` on CPU ({info['threads']} threads, torch {info['torch']}),
in {info['seconds']:.0f} s, with no download:

    {info['command']}

- `lm/`: a Llama-family causal LM, {lm['parameters']:,} parameters (hidden {lm['hidden_size']}, {lm['layers']} layer{'s' if lm['layers'] != 1 else ''}), byte-level BPE
  vocabulary of {info['vocab']} tokens. Trained with next-token loss on {lm['documents']:,} paragraphs
  ({lm['tokens']:,} tokens) of plain declarative prose, each paragraph on one topic: facts about one word
  ("The word cat starts with the letter c. cat spelled backwards is tac."), sums ("Three plus four is seven.
  3+4=7.") or one grid scene, its description first ("The picture shows a red circle and a blue square. The
  red circle is on the left of the blue square."). No questions, no instructions, no chat tokens.
  {lm['steps']} steps of {lm['batch']} x {lm['seq']} tokens; loss {lm['loss_first']:.3f} -> {lm['loss_last']:.3f}
  (mean of the first 10 / last 50 steps). Load: `AutoModelForCausalLM.from_pretrained("lm")`,
  `AutoTokenizer.from_pretrained("lm")`.
{clip_line} Load: `open_clip.create_model("local-dir:clip")`,
  `open_clip.get_tokenizer("local-dir:clip")`.

The scenes and the prose come from seeds the demo's pool and evaluation sets never use.
`pretrain.json` holds every figure above. Files and their sha256:

| file | sha256 |
|---|---|
{rows}
"""


if __name__ == "__main__":
    sys.exit(main())
