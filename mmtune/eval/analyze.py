"""`mmtune analyze`: the three base-vs-tuned analyses of `mmtune.eval.analysis` on saved models.

    mmtune analyze token-shift  BASE TUNED --data eval.jsonl --out runs/analysis
    mmtune analyze consistency  BASE TUNED --data mc.jsonl [--measure loglik|correctness]
    mmtune analyze judge        A.jsonl B.jsonl --judge MODEL [--data eval.jsonl]

Models (BASE, TUNED, the judge) are mmtune runs/checkpoints, llava-hf folders
or causal-LM folders (`mmtune.eval.backends`); each prompt is rendered with
the model's own template. Data are unified records (`mmtune convert`).

* token-shift: the TUNED model answers each record greedily (its prompt =
  the record's turns up to its first assistant turn); the BASE model reads
  the same prompt ids + answer and ranks each answer token (URIAL: rank 1
  unshifted, 2-3 marginal, >3 shifted). Shares overall and per `task`, the
  most shifted tokens. Both models must share the tokenizer's vocabulary.
* consistency: every record with `choices` is a question; each model scores
  each choice by its mean token log-likelihood after its own prompt. Measure
  `loglik` (default): per question, Pearson r between the two models'
  choice log-likelihoods, averaged over questions (Ren et al. 2024). Measure
  `correctness`: each model's per-item correctness (its most likely choice
  is the gold answer), and the Pearson r of the two 0/1 vectors over items.
  Both are computed and written; `--measure` picks the headline, and the
  table says which it is.
* judge: two answers files (mmtune `predictions.jsonl`, LLaVA answers, or
  `{id, question, answer}` lines) judged by a local model in both orders
  (`pairwise_judge`); reports win / tie / loss of A and the position bias:
  the share of non-tie verdicts that chose the first position (0.5 = none).

Each writes `<analysis>.json` and `<analysis>.png` under `--out` (default
runs/analysis), prints a table and shows progress bars. From Python:
`run_token_shift(TokenShiftOptions(base=..., tuned=..., data=...))`, likewise
`run_consistency` / `run_judge` (registry `ANALYSES`); the command line is
`mmtune/cli/analyze.py`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmtune.data.schema import Record, read_records
from mmtune.data.templates import prompt_messages
from mmtune.errors import MMTuneError
from mmtune.eval.scoring import read_keyed_jsonl
from mmtune.fileio import write_json_atomic

MEASURES = {
    "loglik": "Pearson r between base and tuned mean log-likelihoods of each question's choices, "
              "averaged over questions (Ren et al. 2024)",
    "correctness": "Pearson r over items between base and tuned per-item correctness "
                   "(most likely choice == gold answer)",
}


@dataclass(kw_only=True)
class RunOptions:
    """What every analysis takes besides its inputs (the `mmtune analyze` flags of the same names)."""

    out: str | Path = "runs/analysis"
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    progress: bool = True


@dataclass(kw_only=True)
class TwoModelOptions(RunOptions):
    """BASE and TUNED (mmtune runs/checkpoints, llava-hf or causal-LM folders) read on the records of `data`."""

    base: str
    tuned: str
    data: str
    image_root: str | None = None
    limit: int | None = None
    base_template: str | None = None
    tuned_template: str | None = None


@dataclass(kw_only=True)
class TokenShiftOptions(TwoModelOptions):
    max_new_tokens: int = 64


@dataclass(kw_only=True)
class ConsistencyOptions(TwoModelOptions):
    measure: str = "loglik"  # a key of MEASURES
    answer_prefix: str = " "


@dataclass(kw_only=True)
class JudgeOptions(RunOptions):
    """Answers files `a` and `b`, judged by the model at `judge`; `data` (optional) gives each id's question."""

    a: str
    b: str
    judge: str
    judge_template: str | None = None
    data: str | None = None
    labels: str = "A,B"
    tie_margin: float = 0.0


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _open(path: str, opts: RunOptions, template: str | None = None) -> Any:
    from mmtune.eval.backends import open_model

    return open_model(path, template=template, device=opts.device, dtype=opts.dtype)


def _records(path: str, image_root: str | None, limit: int | None) -> list[Record]:
    from mmtune.eval.tasks import resolve_images

    if not Path(path).is_file():
        raise MMTuneError(f"--data: {path} not found")
    recs = read_records(path)[:limit] if limit else read_records(path)
    if not recs:
        raise MMTuneError(f"--data: {path} holds no records")
    return [resolve_images(r, image_root) for r in recs]


def _prompt_record(rec: Record) -> Record:
    from dataclasses import replace

    from mmtune.data.schema import count_placeholders

    msgs = prompt_messages(rec)
    return replace(rec, messages=msgs, images=list(rec.images[: count_placeholders(msgs)]))


def _same_vocab(a: Any, b: Any, what: str) -> None:
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        raise MMTuneError(f"{what}: the two models' tokenizers differ; token-level analyses need shared token ids")


# --------------------------------------------------------------------------- #
# token-shift
# --------------------------------------------------------------------------- #


def run_token_shift(opts: TokenShiftOptions) -> dict[str, Any]:
    from mmtune.eval.analysis import (
        MARGINAL,
        SHIFTED,
        UNSHIFTED,
        plot_token_shift,
        shift_category,
        token_distribution_shift,
    )
    from tqdm.auto import tqdm

    out = Path(opts.out)
    base, tuned = _open(opts.base, opts, opts.base_template), _open(opts.tuned, opts, opts.tuned_template)
    _same_vocab(base, tuned, "token-shift")
    recs = [_prompt_record(r) for r in _records(opts.data, opts.image_root, opts.limit)]
    skips: Counter[str] = Counter()
    usable = []
    for r in recs:
        if r.images and not (base.takes_images and tuned.takes_images):
            skips["record has images but a model is text-only"] += 1
        else:
            usable.append(r)
    tok = tuned.tokenizer
    prompts, conts, extra, kept, items = [], [], [], [], []
    for r in tqdm(usable, desc="tuned answers", disable=not opts.progress):
        try:
            ids, ex = tuned.prompt_inputs(r.messages, r.images, r.meta)
            if r.images:  # the base model reads the images through its own image processing
                _, base_ex = base.prompt_inputs(r.messages, r.images, r.meta)
        except MMTuneError as exc:
            if "image" not in str(exc):
                raise
            skips[f"image cannot be loaded: {exc}"] += 1
            continue
        # The tuned model's greedy token ids themselves (decoded text would not re-tokenize to them).
        cont = tuned.greedy_ids(ids, ex, opts.max_new_tokens)
        prompts.append(ids)
        conts.append(cont)
        extra.append(base_ex if r.images else None)
        kept.append(r)
        items.append({"id": r.id, "task": r.task, "answer": tok.decode(cont, skip_special_tokens=True).strip()})
    result = token_distribution_shift(base.model, prompts, conts, tokenizer=tok, extra_inputs=extra,
                                      batch_size=opts.batch_size, progress=opts.progress)
    per_task: dict[str, Counter[str]] = defaultdict(Counter)
    for r, ranks, item in zip(kept, result.ranks, items, strict=True):
        item["ranks"] = ranks
        per_task[r.task or "<no task>"].update(shift_category(k) for k in ranks)
    cats = (UNSHIFTED, MARGINAL, SHIFTED)
    by_task = {t: {"tokens": sum(c.values()), **{k: (c[k] / sum(c.values()) if sum(c.values()) else None)
                                                  for k in cats}} for t, c in sorted(per_task.items())}
    skips.update(result.skips)
    report = {
        "analysis": "token distribution shift (Lin et al. 2023, URIAL): rank of each tuned-model answer token "
                    "under the base model; 1 unshifted, 2-3 marginal, >3 shifted",
        "base": base.info(), "tuned": tuned.info(), "data": opts.data,
        "records": len(recs), "counted": len(kept) - result.skipped, "skipped": sum(skips.values()),
        "skips": dict(skips), "tokens": result.n_tokens, "shares": result.shares, "counts": result.counts,
        "per_task": by_task, "top_shifted": result.top_shifted, "by_position": result.by_position,
        "max_new_tokens": opts.max_new_tokens, "items": items,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, out / "token_shift.json")
    report["plot"] = str(plot_token_shift(result, out / "token_shift.png",
                                          title=f"{Path(opts.tuned).name} answers ranked by {Path(opts.base).name}"))
    rows = [[t, str(v["tokens"]), *(_pct(v[k]) for k in cats)] for t, v in by_task.items()]
    rows.append(["all", str(result.n_tokens), *(_pct(result.shares[k]) for k in cats)])
    print(_table(["task", "tokens", "unshifted %", "marginal %", "shifted %"], rows))
    top = ", ".join(f"{d['token']!r} x{d['count']}" for d in result.top_shifted[:8])
    print(f"top shifted tokens: {top or 'none'}")
    return report


# --------------------------------------------------------------------------- #
# consistency
# --------------------------------------------------------------------------- #


def _choice_scores(model: Any, recs: Sequence[Record], opts: ConsistencyOptions, desc: str) -> list[list[float]]:
    """Each record's choices scored by `model`: mean token log-likelihood after its own rendered prompt."""
    from mmtune.eval.analysis import answer_logprobs, candidate_ids

    prompts, answers, extra, owner = [], [], [], []
    for i, r in enumerate(recs):
        ids, ex = model.prompt_inputs(r.messages, r.images, r.meta)
        where = f"{opts.data}: record {r.id!r} field 'choices':"
        cands = [candidate_ids(model.tokenizer, c, opts.answer_prefix, where) for c in r.choices or []]
        prompts += [ids] * len(cands)
        answers += cands
        extra += [ex] * len(cands)
        owner += [i] * len(cands)
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    flat = answer_logprobs(model.model, prompts, answers, extra_inputs=extra, batch_size=opts.batch_size,
                           pad_token_id=pad, progress=opts.progress, desc=desc)
    out: list[list[float]] = [[] for _ in recs]
    for i, s in zip(owner, flat, strict=True):
        out[i].append(s)
    return out


def _gold_index(r: Record) -> int | None:
    from mmtune.eval.tasks import gold_letter

    letter = gold_letter(r)
    return None if letter is None else "ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(letter)


def run_consistency(opts: ConsistencyOptions) -> dict[str, Any]:
    from mmtune.eval.analysis import pearson

    out = Path(opts.out)
    base, tuned = _open(opts.base, opts, opts.base_template), _open(opts.tuned, opts, opts.tuned_template)
    recs = _records(opts.data, opts.image_root, opts.limit)
    skips: Counter[str] = Counter()
    usable = []
    for r in recs:
        if len(r.choices or []) < 2:
            skips["fewer than 2 choices"] += 1
        elif r.images and not (base.takes_images and tuned.takes_images):
            skips["record has images but a model is text-only"] += 1
        else:
            usable.append(_prompt_record(r))
    if not usable:
        raise MMTuneError(f"--data: no record of {opts.data} has 2 or more `choices` a model can read")
    b_scores = _choice_scores(base, usable, opts, "base log-likelihoods")
    t_scores = _choice_scores(tuned, usable, opts, "tuned log-likelihoods")
    per_item, rs, b_ok, t_ok = [], [], [], []
    for r, b, t in zip(usable, b_scores, t_scores, strict=True):
        gold = _gold_index(r)
        item: dict[str, Any] = {"id": r.id, "task": r.task, "base_scores": b, "tuned_scores": t,
                                "r": pearson(b, t), "gold": gold}
        if item["r"] is not None:
            rs.append(item["r"])
        if gold is not None:
            item["base_correct"] = int(max(range(len(b)), key=b.__getitem__) == gold)
            item["tuned_correct"] = int(max(range(len(t)), key=t.__getitem__) == gold)
            b_ok.append(item["base_correct"])
            t_ok.append(item["tuned_correct"])
        per_item.append(item)
    loglik = {"value": sum(rs) / len(rs) if rs else None, "counted": len(rs),
              "skipped": len(usable) - len(rs), "skips": {"constant scores": len(usable) - len(rs)}
              if len(usable) > len(rs) else {}}
    corr = pearson(b_ok, t_ok)
    correctness = {"value": corr, "counted": len(b_ok), "skipped": len(usable) - len(b_ok),
                   "skips": {"no gold answer among the choices": len(usable) - len(b_ok)} if len(usable) > len(b_ok)
                   else {}, "base_accuracy": sum(b_ok) / len(b_ok) if b_ok else None,
                   "tuned_accuracy": sum(t_ok) / len(t_ok) if t_ok else None,
                   "undefined_because": "one model's correctness is constant" if b_ok and corr is None else None}
    measures = {"loglik": loglik, "correctness": correctness}
    head = measures[opts.measure]
    report = {
        "analysis": "knowledge consistency (Ren et al. 2024, 'Learning or Self-aligning?')",
        "measure": opts.measure, "measure_definition": MEASURES[opts.measure],
        "knowledge_consistency": head["value"], "measures": measures,
        "definitions": MEASURES, "base": base.info(), "tuned": tuned.info(), "data": opts.data,
        "records": len(recs), "skipped_records": sum(skips.values()), "skips": dict(skips), "items": per_item,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, out / "consistency.json")
    report["plot"] = str(_plot_consistency(report, out / "consistency.png"))
    rows = [[m, "n/a" if v["value"] is None else f"{v['value']:.4f}", str(v["counted"]), str(v["skipped"])]
            for m, v in measures.items()]
    print(_table(["measure", "pearson r", "counted", "skipped"], rows))
    print(f"headline (--measure {opts.measure}): {MEASURES[opts.measure]}")
    if b_ok:
        print(f"choice accuracy: base {_pct(correctness['base_accuracy'])}%, tuned {_pct(correctness['tuned_accuracy'])}%")
    return report


def _plot_consistency(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmtune.eval.analysis import _save_figure

    items = report["items"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rs = [it["r"] for it in items if it["r"] is not None]
    axes[0].hist(rs, bins=20, range=(-1, 1), color="#4c72b0")
    axes[0].set_title(f"per-question r (loglik), mean {report['measures']['loglik']['value'] or float('nan'):.3f}")
    axes[0].set_xlabel("Pearson r")
    b = [s for it in items for s in it["base_scores"]]
    t = [s for it in items for s in it["tuned_scores"]]
    axes[1].scatter(b, t, s=8, alpha=0.6, color="#dd8452")
    axes[1].set_xlabel("base mean log-likelihood")
    axes[1].set_ylabel("tuned mean log-likelihood")
    axes[1].set_title("choices: base vs tuned")
    fig.suptitle(f"Knowledge consistency ({report['measure']}): "
                 + ("n/a" if report["knowledge_consistency"] is None else f"{report['knowledge_consistency']:.3f}"))
    fig.tight_layout()
    return _save_figure(fig, path)


# --------------------------------------------------------------------------- #
# judge
# --------------------------------------------------------------------------- #

_ANSWER_KEYS = ("prediction", "output", "text", "answer", "response")
_QUESTION_KEYS = ("question", "prompt", "instruction")


def read_answers(path: str, where: str) -> dict[str, dict[str, Any]]:
    """id -> {answer, question} from an answers JSONL (errors name the line and field)."""
    out: dict[str, dict[str, Any]] = {}
    hint = " (filter an eval's predictions.jsonl to one model and mode first)"
    for rid, obj in read_keyed_jsonl(path, where, duplicate_hint=hint).items():
        ans = next((obj[k] for k in _ANSWER_KEYS if k in obj), None)
        q = next((obj[k] for k in _QUESTION_KEYS if isinstance(obj.get(k), str)), None)
        out[rid] = {"answer": ans if isinstance(ans, str) else None, "question": q}
    return out


def run_judge(opts: JudgeOptions) -> dict[str, Any]:
    from mmtune.eval.analysis import LMJudge, pairwise_judge

    out = Path(opts.out)
    a, b = read_answers(opts.a, "A"), read_answers(opts.b, "B")
    questions: dict[str, str] = {}
    if opts.data:
        for r in read_records(opts.data):
            users = r.turns("user")
            if users:
                questions[r.id] = users[0].replace("<image>", "").strip()
    ids = [i for i in a if i in b]
    only = len(set(a) ^ set(b))
    if not ids:
        raise MMTuneError(f"{opts.a} and {opts.b} share no id")
    judge_model = _open(opts.judge, opts, opts.judge_template)
    judge = LMJudge(judge_model.model, judge_model.tokenizer, labels=tuple(opts.labels.split(",")),
                    tie_margin=opts.tie_margin,
                    format_prompt=lambda text: judge_model.render([{"role": "user", "content": text}]))
    qs = [questions.get(i) or a[i]["question"] or b[i]["question"] for i in ids]
    res = pairwise_judge(qs, [a[i]["answer"] for i in ids], [b[i]["answer"] for i in ids], judge=judge, ids=ids,
                         progress=opts.progress)
    verdicts = Counter(v for it in res.per_item for v in (it["a_first"], it["b_first"]))
    decided = verdicts["1"] + verdicts["2"]
    bias = {"first_position_share": verdicts["1"] / decided if decided else None,
            "verdicts": {"first": verdicts["1"], "second": verdicts["2"], "tie": verdicts["tie"]},
            "order_dependent_items": res.inconsistent,
            "consistent_share": (res.counted - res.inconsistent) / res.counted if res.counted else None}
    report = {
        "analysis": "pairwise judging by a local model, both orders; a win counts only when it survives the swap",
        "a": opts.a, "b": opts.b, "judge": judge_model.info(), "labels": opts.labels,
        "win": res.wins_a, "tie": res.ties, "loss": res.wins_b, "win_rate_a": res.win_rate_a,
        "counted": res.counted, "skipped": res.skipped + only,
        "skips": {**res.skips, **({"id in only one file": only} if only else {})},
        "position_bias": bias, "items": res.per_item,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, out / "judge.json")
    report["plot"] = str(_plot_judge(report, out / "judge.png"))
    print(_table(["", "count", "%"], [[k, str(report[k]), _pct(report[k] / res.counted if res.counted else None)]
                                       for k in ("win", "tie", "loss")]))
    print(f"A = {opts.a}, B = {opts.b}; win rate of A (ties half) {_pct(res.win_rate_a)}%")
    print(f"position bias: {_pct(bias['first_position_share'])}% of decided verdicts chose the first answer "
          f"(50% = none); {res.inconsistent} of {res.counted} items changed verdict with the order")
    return report


def _plot_judge(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmtune.eval.analysis import _save_figure

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    vals = [report["win"], report["tie"], report["loss"]]
    axes[0].bar(["A wins", "tie", "B wins"], vals, color=["#55a868", "#8c8c8c", "#c44e52"])
    axes[0].set_title(f"outcome over {report['counted']} items (both orders)")
    v = report["position_bias"]["verdicts"]
    axes[1].bar(["first", "second", "tie"], [v["first"], v["second"], v["tie"]], color="#4c72b0")
    share = report["position_bias"]["first_position_share"]
    axes[1].set_title("verdicts by position" + ("" if share is None else f" (first: {100 * share:.0f}%)"))
    fig.tight_layout()
    return _save_figure(fig, path)


# analysis name -> (its options, its runner); each runner writes <out>/<name with _>.json and .png
ANALYSES: dict[str, tuple[type[RunOptions], Callable[..., dict[str, Any]]]] = {
    "token-shift": (TokenShiftOptions, run_token_shift),
    "consistency": (ConsistencyOptions, run_consistency),
    "judge": (JudgeOptions, run_judge),
}
