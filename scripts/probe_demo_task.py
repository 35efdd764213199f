"""Can the demo's model learn one task at all? Train it on that task alone; score its training records and new ones.

    python scripts/probe_demo_task.py --task position --out /tmp/probe_task [--n 1000] [--steps 800]
        [--lr 1e-3] [--projector ALIGN_CHECKPOINT | --align-from ALIGN_CHECKPOINT] [--threads 1] [key=value ...]

Draws `--n` records of one demo task (mmtune.data.synthetic, phrasings 0-2, a
seed the pool, eval sets, other probes and pretraining corpora do not use),
trains stage instruct of the demo's model on them (mmtune/assets/demo_mllm.yaml
with the shipped bases, through `mmtune.train.run.train`; extra `key=value`
arguments override the run config, e.g. `model.lm.name_or_path=OTHER_LM` or
`train.unfreeze_vision=true`), then prints VQA accuracy (mmtune's eval) on
100 of its own training records and on 100 new ones, beside the answer prior
and the loss at the end of training. `--align-from` starts projector, LM and
tokenizer from an align run trained with the LM unfrozen (e.g. `OUT/describe`
of `scripts/probe_demo_align.py --describe-scenes N`).

What it tells apart: a model that fits its training answers but not new
images has too few records (the demo's 1,000 hold ~100 per task); one that
cannot fit its own training answers lacks what the task needs (capacity,
steps, or a way to find the named object in the image), and more records will
not help. `scripts/probe_demo_tower.py` says whether the tower's features
carry the answer.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

TASK_SEED = 950_005  # not the pool's, the eval sets', the other probes' or the pretraining corpora's


def draw(out: Path, task: str, n: int, seed: int, prefix: str) -> tuple[list, Path]:
    from mmtune.data.schema import write_records
    from mmtune.data.synthetic import make_pool
    from mmtune.demo import DEMO_SYSTEM, SEEN_PHRASINGS

    recs = make_pool(out / prefix, per_task=n, tasks=(task,), seed=seed, phrasings=SEEN_PHRASINGS,  # not the unseen one
                     id_prefix=prefix, system=DEMO_SYSTEM)
    path = out / f"{prefix}.jsonl"
    write_records(recs, path)
    return recs, path


def train_on(out: Path, shards: Path, steps: int, lr: float, projector: str | None, overrides: list[str]) -> Path:
    from mmtune.config import RunConfig, load_config
    from mmtune.demo import DEMO_CONFIG, base_overrides
    from mmtune.train.run import train

    cfg = load_config(DEMO_CONFIG, RunConfig, [
        *base_overrides(), "train.stage=instruct", f"train.max_steps={steps}", f"train.lr={lr}",
        f"train.output_dir={out}", "train.progress=false", f"data.train=[{shards}]",
        *([f"model.projector.checkpoint={projector}"] if projector else []), *overrides])
    train(cfg)
    return out


def accuracy(run: Path, files: dict[str, Path], out: Path) -> dict[str, float]:
    from mmtune.config import EvalConfig
    from mmtune.eval.run import run_eval

    cfg = EvalConfig(models={"tuned": {"path": str(run), "modes": ["zero-shot"]}},
                     tasks=[{"name": name, "records": str(path), "metric": "vqa", "prompt": "free",
                             "max_new_tokens": 12} for name, path in files.items()],
                     output_dir=str(out), progress=False, plot=False)
    res = run_eval(cfg)["results"]["tuned"]
    return {name: float(res[name]["zero-shot"]["score"]) for name in files}


def main(argv: list[str] | None = None) -> int:
    from mmtune.data.synthetic import IMAGE_TASKS, TEXT_TASKS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True, choices=[*IMAGE_TASKS, *TEXT_TASKS])
    ap.add_argument("--out", required=True, help="working folder (refused if it exists and is not empty)")
    ap.add_argument("--n", type=int, default=1000, help="training records of the task")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--projector", help="an align run's checkpoint to start the projector from (default: fresh)")
    start.add_argument("--align-from", help="an align run (or checkpoint) that trained its LM (train.unfreeze_lm): "
                       "start projector, LM and tokenizer from it")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="run config overrides, key=value")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        ap.error(f"{out} exists and is not empty; choose another --out")  # exits 2, nothing written
    if args.align_from:
        from mmtune.errors import MMTuneError
        from mmtune.runs import resolve_model_folder

        try:
            ckpt = resolve_model_folder(args.align_from)  # a run folder means its latest checkpoint
        except MMTuneError as exc:
            ap.error(f"--align-from: {exc}")
        if not (ckpt / "lm").is_dir() or not (ckpt / "tokenizer").is_dir():
            ap.error(f"--align-from {ckpt}: no lm/ and tokenizer/ in it (an align run with train.unfreeze_lm=true "
                     "saves them)")
        args.projector = str(ckpt)
        args.overrides = [f"model.lm.name_or_path={ckpt / 'lm'}", f"model.tokenizer.name_or_path={ckpt / 'tokenizer'}",
                          *args.overrides]
    torch.set_num_threads(args.threads)
    from mmtune.data.schema import write_records
    from mmtune.data.shards import write_shards
    from mmtune.runs import METRICS_FILE
    from mmtune.train.metrics import read_metrics

    train_recs, train_file = draw(out, args.task, args.n, TASK_SEED, "train")
    _, new_file = draw(out, args.task, 100, TASK_SEED + 1, "new")
    seen_file = out / "train_first100.jsonl"
    write_records(train_recs[:100], seen_file)
    write_shards(train_file, out / "shards", max_count=512, overwrite=True, progress=False)
    run = train_on(out / "run", out / "shards", args.steps, args.lr, args.projector, args.overrides)
    rows = read_metrics(run / METRICS_FILE)
    scores = accuracy(run, {"training records": seen_file, "new records": new_file}, out / "eval")
    answers = collections.Counter(r.messages[-1]["content"] for r in train_recs)
    top, count = answers.most_common(1)[0]
    summary = {"task": args.task, "n": args.n, "steps": args.steps, "lr": args.lr, "overrides": args.overrides,
               "loss_last": sum(r["loss"] for r in rows[-10:]) / len(rows[-10:]),
               "answer_prior": count / len(train_recs), "prior_answer": top, **scores}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\n{args.task}: {args.n} records, {args.steps} steps, lr {args.lr:g} {' '.join(args.overrides)}")
    print(f"  training loss (mean of the last 10 logged steps): {summary['loss_last']:.3f}")
    print(f"  answer prior ({top!r}): {100 * summary['answer_prior']:.1f}%")
    for name, score in scores.items():
        print(f"  VQA accuracy on 100 {name}: {100 * score:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
