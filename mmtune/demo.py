"""`mmtune demo`: the whole pipeline on an embedded pool, on one CPU, in minutes.

1. Draws an instruction pool with no download (mmtune.data.synthetic): shape
   scenes with six image tasks and four text-only tasks, each with several
   phrasings, and validates it through the converter.
2. Splits off the unseen part before anything else sees it: two whole tasks
   (`shape`, `first_letter`) and one phrasing of every task are never trained on.
3. Condenses the training pool to k records with QDIT over real pretrained text
   embeddings (the packaged all-MiniLM-L6-v2) joined with image embeddings,
   writes the selection report, and stores the subset as webdataset shards.
4. Trains a tiny MLLM from the packaged config: stage align (projector only),
   then stage instruct (projector + LM + tower), streaming from the shards.
5. Evaluates the base model (after align: the LM never instruction-tuned)
   zero-shot and few-shot and the tuned model zero-shot, on seen tasks (new
   examples), unseen phrasings and unseen tasks, with VQA accuracy; and
   measures the token-distribution shift between the two.
6. Writes DIR/report.json and DIR/report.md and prints a table.

Every step goes through the same public APIs the CLI subcommands call
(convert, shard, select, train, eval); the demo only chooses their settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmtune.errors import MMTuneError
from mmtune.fileio import write_json_atomic

DEMO_CONFIG = Path(__file__).parent / "assets" / "demo_mllm.yaml"
HOLDOUT_TASKS = ("shape", "first_letter")
UNSEEN_PHRASING = 3
FULL_MINUTES = 15.0


@dataclass
class DemoPlan:
    """What a time budget buys; everything scales with `minutes / 15`."""

    per_task: int
    eval_per_task: int
    k: int
    align_steps: int
    instruct_steps: int

    @classmethod
    def for_budget(cls, minutes: float, k: int) -> DemoPlan:
        if minutes <= 0:
            raise MMTuneError(f"--minutes must be > 0, got {minutes}")
        s = minutes / FULL_MINUTES
        per_task = int(np.clip(round(300 * s), 24, 300))
        return cls(
            per_task=per_task,
            eval_per_task=int(np.clip(round(20 * s), 4, 20)),
            k=min(k, max(16, int(per_task * 8 * 0.5))),
            align_steps=max(4, round(100 * s)),
            instruct_steps=max(8, round(2500 * s)),
        )


class _TowerImageEncoder:
    """Image embeddings from a (random, seeded) open_clip tower of the demo's shape.

    No pretrained image model installs offline, so selection embeds images with
    the same random tower the model starts from: its mean patch feature still
    separates colours and layouts, which is what the pool varies.
    """

    def __init__(self, vision_cfg: Any, seed: int) -> None:
        import torch

        from mmtune.model.vision import build_open_clip_tower

        torch.manual_seed(seed)
        self.tower = build_open_clip_tower(vision_cfg).eval()
        self.transform = self.tower.image_transform(vision_cfg.pad_to_square)
        self.name = f"demo-tower-seed{seed}"

    def encode(self, items: list[Any], *, progress: bool = False) -> np.ndarray:
        import torch

        from mmtune.data.images import load_image

        out = []
        with torch.no_grad():
            for i in range(0, len(items), 64):
                chunk = items[i : i + 64]
                x = torch.stack([self.transform(load_image(im) if isinstance(im, str | Path) else im) for im in chunk])
                out.append(self.tower(x).mean(dim=1).float().numpy())
        vecs = np.concatenate(out) if out else np.zeros((0, self.tower.hidden_size), np.float32)
        return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _train_config(base: Path, out: Path, stage: str, steps: int, shards: str, corpus: str, *,
                  lr: float, projector_from: Path | None, seed: int, progress: bool) -> Any:
    from mmtune.config import RunConfig, load_config

    overrides = [
        f"train.stage={stage}", f"train.max_steps={steps}", f"train.output_dir={out}", f"train.lr={lr}",
        f"train.seed={seed}", f"train.progress={str(progress).lower()}",
        f"data.train=[{shards}]", f"model.tokenizer.train_files=[{corpus}]",
        f"data.holdout_tasks=[{', '.join(HOLDOUT_TASKS)}]",
    ]
    if stage == "instruct":
        overrides.append("train.unfreeze_vision=true")
    if projector_from is not None:
        overrides.append(f"model.projector.checkpoint={projector_from}")
    return load_config(base, RunConfig, overrides)


def _loss_range(run_dir: Path) -> tuple[float, float, int]:
    from mmtune.runs import METRICS_FILE
    from mmtune.train.metrics import read_metrics

    rows = read_metrics(run_dir / METRICS_FILE)
    if not rows:
        raise MMTuneError(f"{run_dir}: training logged no step")
    head = [r["loss"] for r in rows[:3]]
    tail = [r["loss"] for r in rows[-3:]]
    return float(np.mean(head)), float(np.mean(tail)), int(rows[-1]["step"])


def _eval_records(out: Path, plan: DemoPlan, seed: int) -> dict[str, Path]:
    """Three evaluation sets, drawn with seeds the training pool never used."""
    from mmtune.data.schema import write_records
    from mmtune.data.synthetic import IMAGE_TASKS, TEXT_TASKS, make_pool

    seen_tasks = tuple(t for t in IMAGE_TASKS + TEXT_TASKS if t not in HOLDOUT_TASKS)
    n = plan.eval_per_task
    sets = {
        "seen": make_pool(out / "seen", per_task=n, tasks=seen_tasks, seed=seed + 101,
                          phrasings=tuple(i for i in range(4) if i != UNSEEN_PHRASING), id_prefix="seen"),
        "unseen-phrasing": make_pool(out / "unseen_phrasing", per_task=n, tasks=seen_tasks, seed=seed + 202,
                                     phrasings=(UNSEEN_PHRASING,), id_prefix="uphr"),
        "unseen-task": make_pool(out / "unseen_task", per_task=2 * n, tasks=HOLDOUT_TASKS, seed=seed + 303,
                                 id_prefix="utask"),
    }
    paths = {}
    for name, recs in sets.items():
        paths[name] = out / f"{name}.jsonl"
        write_records(recs, paths[name])
    return paths


def _token_shift(base_dir: Path, eval_file: Path, pred_rows: list[dict[str, Any]],
                 out: Path, template_name: str, progress: bool) -> dict[str, Any]:
    """Rank the tuned model's answer tokens under the base model (Lin et al. 2023).

    The continuations are the tuned model's own greedy answers from the eval run.
    """
    import torch

    from mmtune.data.images import load_image
    from mmtune.data.schema import read_records
    from mmtune.data.templates import get_template, prompt_messages
    from mmtune.data.tokenize import stop_token_ids, tokenize_prompt
    from mmtune.eval.analysis import plot_token_shift, token_distribution_shift
    from mmtune.model.io import load_model

    base = load_model(base_dir)
    tok = base.tokenizer
    template = get_template(template_name, tok)
    stops = set(stop_token_ids(tok, template))
    outputs = {r["id"]: r["output"] for r in pred_rows
               if r.get("model") == "tuned" and r.get("mode") == "zero-shot" and "output" in r}
    prompts, conts, extra = [], [], []
    for rec in read_records(eval_file):
        if rec.id not in outputs:
            continue
        ids = tokenize_prompt(prompt_messages(rec), tok, template, num_image_tokens=base.num_image_tokens,
                              num_images=len(rec.images))
        cont = [t for t in tok(outputs[rec.id], add_special_tokens=False)["input_ids"] if t not in stops]
        prompts.append(ids)
        conts.append(cont)
        pix = [base.image_transform(load_image(p)) for p in rec.images]
        extra.append({"pixel_values": torch.stack(pix)} if pix else None)
    result = token_distribution_shift(base.model, prompts, conts, tokenizer=tok, extra_inputs=extra,
                                      batch_size=16, progress=progress)
    plot_token_shift(result, out / "token_shift.png", title="Tuned answers ranked by the base model")
    return result.to_dict() if hasattr(result, "to_dict") else dict(result.__dict__)


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    minutes: float = FULL_MINUTES,
    k: int = 1000,
    compare_random: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo; returns the report (also written to OUT/report.json and report.md)."""
    import torch

    from mmtune.config import load_config, save_config
    from mmtune.data.convert import convert_files
    from mmtune.data.schema import write_records
    from mmtune.data.shards import write_shards
    from mmtune.data.synthetic import make_pool
    from mmtune.eval.run import EvalConfig, format_table, run_eval
    from mmtune.eval.tasks import split_unseen
    from mmtune.select.api import select_records
    from mmtune.train.run import train

    t_start = time.perf_counter()
    plan = DemoPlan.for_budget(minutes, k)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    timings: dict[str, float] = {}

    # 1. The pool, through the converter (validates every record and image).
    t = time.perf_counter()
    _say(f"drawing the pool: {plan.per_task} records x 10 tasks (phrasing {UNSEEN_PHRASING} kept back)")
    raw = make_pool(out / "pool", per_task=plan.per_task, seed=seed,
                    phrasings=tuple(i for i in range(4) if i != UNSEEN_PHRASING), id_prefix="pool")
    write_records(raw, out / "pool" / "drawn.jsonl")
    converted = convert_files([out / "pool" / "drawn.jsonl"], fmt="unified",
                              rejects_path=out / "pool" / "rejects.jsonl", progress=progress)
    if converted.rejects_count:
        raise MMTuneError(f"the embedded pool had {converted.rejects_count} invalid record(s); see {out / 'pool'}")
    pool = converted.records
    write_records(pool, out / "pool" / "pool.jsonl")
    timings["pool"] = time.perf_counter() - t

    # 2. The unseen split, written down before training sees anything.
    train_pool, heldout = split_unseen(pool, holdout_tasks=HOLDOUT_TASKS)
    write_records(train_pool, out / "pool" / "train_pool.jsonl")
    split = {"holdout_tasks": list(HOLDOUT_TASKS), "holdout_phrasing": UNSEEN_PHRASING,
             "train_pool_records": len(train_pool), "heldout_pool_records": len(heldout),
             "train_tasks": sorted({r.task for r in train_pool if r.task})}
    write_json_atomic(split, out / "split.json")

    # 3. Condense with QDIT (text + image embeddings), then shard the subset.
    t = time.perf_counter()
    base_cfg = load_config(DEMO_CONFIG)
    k_used = min(plan.k, len(train_pool))
    _say(f"selecting {k_used} of {len(train_pool)} records with QDIT (all-MiniLM-L6-v2 text + image embeddings)")
    selection = select_records(
        train_pool, k_used, "qdit", image_encoder=_TowerImageEncoder(base_cfg.model.vision, seed),
        cache_path=out / "pool" / "embeddings.npy", report_dir=out / "selection", progress=progress,
        seed=seed, pool_name="the demo pool",
    )
    write_records(selection.records, out / "subset.jsonl")
    timings["select"] = time.perf_counter() - t
    summary = write_shards(out / "subset.jsonl", out / "shards", max_count=256, overwrite=True, progress=False)
    shard_glob = str(out / "shards")
    _say(f"wrote {len(summary.shards)} shard(s), {summary.records} records, to {out / 'shards'}")

    # 4. Train: align (projector), then instruct (projector + LM + tower).
    runs: dict[str, Path] = {}
    t = time.perf_counter()
    corpus = str(out / "pool" / "train_pool.jsonl")
    align = _train_config(DEMO_CONFIG, out / "align", "align", plan.align_steps, shard_glob, corpus,
                          lr=1e-3, projector_from=None, seed=seed, progress=progress)
    _say(f"stage align: {plan.align_steps} steps")
    train(align)
    runs["align"] = out / "align"
    instruct = _train_config(DEMO_CONFIG, out / "instruct", "instruct", plan.instruct_steps, shard_glob, corpus,
                             lr=2e-3, projector_from=runs["align"], seed=seed, progress=progress)
    _say(f"stage instruct: {plan.instruct_steps} steps")
    result = train(instruct)
    runs["instruct"] = out / "instruct"
    timings["train"] = time.perf_counter() - t
    loss_first, loss_last, steps = _loss_range(runs["instruct"])

    random_info: dict[str, Any] | None = None
    if compare_random:
        t = time.perf_counter()
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(train_pool), size=k_used, replace=False)
        write_records([train_pool[i] for i in pick], out / "subset_random.jsonl")
        write_shards(out / "subset_random.jsonl", out / "shards_random", max_count=256, overwrite=True, progress=False)
        rnd = _train_config(DEMO_CONFIG, out / "instruct_random", "instruct", plan.instruct_steps,
                            str(out / "shards_random"), corpus, lr=2e-3, projector_from=runs["align"],
                            seed=seed, progress=progress)
        _say(f"stage instruct on a random {k_used} (same budget): {plan.instruct_steps} steps")
        train(rnd)
        runs["instruct_random"] = out / "instruct_random"
        rf, rl, _ = _loss_range(runs["instruct_random"])
        random_info = {"loss_first": rf, "loss_last": rl}
        timings["train_random"] = time.perf_counter() - t

    # 5. Evaluate base (few-shot and zero-shot) vs tuned (zero-shot).
    t = time.perf_counter()
    eval_files = _eval_records(out / "eval_data", plan, seed)
    models: dict[str, Any] = {
        "base": {"path": str(runs["align"]), "modes": ["zero-shot", "few-shot"]},
        "tuned": {"path": str(runs["instruct"]), "modes": ["zero-shot"]},
    }
    if compare_random:
        models["tuned-random"] = {"path": str(runs["instruct_random"]), "modes": ["zero-shot"]}
    eval_cfg = EvalConfig(
        models=models,
        tasks=[{"name": name, "records": str(path), "metric": "vqa", "prompt": "free", "max_new_tokens": 10}
               for name, path in eval_files.items()],
        holdout_tasks=list(HOLDOUT_TASKS),
        shots_from=[str(out / "subset.jsonl")],
        k=2, seed=seed, output_dir=str(out / "eval"), progress=progress,
    )
    eval_cfg.generation.batch_size = 32
    save_config(eval_cfg, out / "eval_config.yaml")
    report_eval = run_eval(eval_cfg)
    timings["eval"] = time.perf_counter() - t

    rows = [json.loads(x) for x in (out / "eval" / "predictions.jsonl").read_text().splitlines() if x.strip()]
    t = time.perf_counter()
    shift = _token_shift(runs["align"], eval_files["seen"], rows, out / "eval",
                         base_cfg.data.template, progress)
    timings["token_shift"] = time.perf_counter() - t

    results = []
    for model, tasks in report_eval["results"].items():
        for task, modes in tasks.items():
            for mode, res in modes.items():
                results.append({"model": model, "mode": mode, "task": task, "metric": "vqa",
                                "value": res["score"], "count": res["counted"], "skipped": res["skipped"]})
    report = {
        "pool": {"records": len(pool), "tasks": sorted({r.task for r in pool if r.task}),
                 "train_records": len(train_pool), "heldout_records": len(heldout)},
        "selection": {"method": "qdit", "k": len(selection.records), "seconds": round(selection.seconds, 3),
                      "objective": selection.objective, "report_dir": str(out / "selection")},
        "train": {"align_steps": plan.align_steps, "steps": steps, "loss_first": loss_first, "loss_last": loss_last,
                  "skipped": result.skip_counts, "loss_png": str(runs["instruct"] / "loss.png")},
        "eval": {"unseen_tasks": list(HOLDOUT_TASKS), "unseen_phrasing": UNSEEN_PHRASING,
                 "sets": {name: str(p) for name, p in eval_files.items()}, "results": results,
                 "few_shot_k": eval_cfg.k, "token_shift": shift},
        "minutes_budget": minutes,
        "seconds": {key: round(v, 1) for key, v in {**timings, "total": time.perf_counter() - t_start}.items()},
    }
    if random_info is not None:
        report["train"]["random_subset"] = random_info
    write_json_atomic(report, out / "report.json")
    (out / "report.md").write_text(_markdown(report, out), encoding="utf-8")
    print(format_table(report_eval))
    _say(f"done in {report['seconds']['total']:.0f} s: {out / 'report.md'}")
    return report


def _markdown(report: dict[str, Any], out: Path) -> str:
    def rel(p: str | Path) -> str:
        return os.path.relpath(p, out)

    lines = ["# mmtune demo", ""]
    p, s, tr = report["pool"], report["selection"], report["train"]
    lines += [
        f"- pool: {p['records']} records over {len(p['tasks'])} tasks; "
        f"held out: tasks {', '.join(report['eval']['unseen_tasks'])} and phrasing #{report['eval']['unseen_phrasing']}",
        f"- selection: QDIT picked {s['k']} records in {s['seconds']:.1f} s (objective {s['objective']})",
        f"- training: align {tr['align_steps']} steps, instruct {tr['steps']} steps, "
        f"loss {tr['loss_first']:.3f} -> {tr['loss_last']:.3f}",
        "",
        "| model | mode | eval set | VQA accuracy | counted |",
        "|---|---|---|---:|---:|",
    ]
    for r in report["eval"]["results"]:
        value = "n/a" if r["value"] is None else f"{100 * r['value']:.1f}"
        lines.append(f"| {r['model']} | {r['mode']} | {r['task']} | {value} | {r['count']} |")
    lines += ["", "Plots:", ""]
    for png in [tr["loss_png"], *sorted(Path(s["report_dir"]).glob("*.png")), *sorted((out / "eval").glob("*.png"))]:
        if Path(png).exists():
            lines.append(f"- [{Path(png).name}]({rel(png)})")
    lines.append("")
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--minutes", type=float, default=FULL_MINUTES,
                        help="time budget in minutes on a 2-core CPU; scales pool, steps and eval (default 15)")
    parser.add_argument("--k", type=int, default=1000, help="records to select (default 1000)")
    parser.add_argument("--compare-random", action="store_true",
                        help="also train on a random k with the same budget and evaluate it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="delete OUT first if it exists")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def cli_main(args: argparse.Namespace) -> int:
    from mmtune.fileio import temp_sibling
    from mmtune.outputs import Out, check_outputs

    out = Path(args.out)
    check_outputs([Out(out, "--out", "folder", whole=True)])
    previous = None
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise MMTuneError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
        # Kept aside, not deleted, until the new demo is complete; put back if it fails.
        previous = temp_sibling(out, "previous")
        os.replace(out, previous)
    try:
        run_demo(out, minutes=args.minutes, k=args.k, compare_random=args.compare_random, seed=args.seed,
                 progress=args.progress and sys.stderr.isatty())
    except BaseException:
        if previous is not None:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(previous, out)
            print(f"mmtune demo: the previous {out} is back as it was", file=sys.stderr)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return 0
