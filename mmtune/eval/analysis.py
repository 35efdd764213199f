"""What did instruction tuning change? Three analyses that compare a tuned model with its base.

All three work with any Hugging Face-style causal LM: a module called as
``model(input_ids=LongTensor[B, T], attention_mask=LongTensor[B, T], **extra)``
returning an object whose ``.logits`` is ``[B, T, V]``. mmtune's MLLM follows
the same convention and takes ``pixel_values=`` for image records; pass such
inputs in ``extra_inputs``: either a mapping whose tensors have one row per
sequence (sliced batch by batch; other values pass through), or a list with
one mapping (or None) per sequence whose tensors are concatenated along dim 0
per batch (records with zero, one or several images).

* `token_distribution_shift` (Lin et al. 2023, "The Unlocking Spell on Base
  LLMs"): for each token the tuned model decoded, its rank under the base
  model given the same prefix. Rank 1 = unshifted, 2-3 = marginal, >3 =
  shifted; the paper finds alignment shifts few tokens, mostly stylistic ones.
* `knowledge_consistency` (Ren et al. 2024, "Learning or Self-aligning?
  Rethinking Instruction Fine-tuning"): per question, the Pearson correlation
  between base and tuned scores (mean log-prob) of the candidate answers,
  averaged over questions. Near 1: tuning kept the base model's knowledge.
* `pairwise_judge`: a judge compares two answers twice, order swapped; only a
  verdict that survives the swap is a win, everything else is a tie, which
  cancels position bias. The judge is a local causal LM (`LMJudge`, reading
  next-token probabilities of the two labels) or any function
  ``(question, answer_1, answer_2) -> "1" | "2" | "tie"``. Nothing here calls
  a remote API.

The scoring loops are hand-written because they are the papers' definitions
(a rank, a correlation, a swap rule); model calls are plain forward passes,
batched with right padding (causal attention never looks at the padding that
follows a token, so scores do not depend on batch composition).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmtune.errors import MMTuneError
from mmtune.fileio import write_png


class AnalysisError(MMTuneError, ValueError):
    """Bad input to an analysis (one line naming the item and what is wrong)."""


TokenIds = Sequence[int] | torch.Tensor


# --------------------------------------------------------------------------- #
# Batched forward passes
# --------------------------------------------------------------------------- #


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@contextmanager
def _eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; training flags restored after."""
    flags = [(m, m.training) for m in models if isinstance(m, torch.nn.Module)]
    for m, _ in flags:
        m.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, was_training in flags:
            m.train(was_training)


def _as_ids(x: TokenIds, what: str, index: int) -> torch.Tensor:
    try:
        t = torch.as_tensor(x, dtype=torch.long).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise AnalysisError(f"{what} #{index}: expected a sequence of token ids, got {type(x).__name__}") from None
    return t


ExtraInputs = Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None


def _check_extra(extra_inputs: ExtraInputs, n: int) -> dict[str, Any] | list[Mapping[str, Any] | None]:
    """Validate extra model inputs for `n` sequences, in one of two forms.

    A mapping: each tensor value has one row per sequence (first dim `n`),
    other values are passed unchanged. A list of `n` mappings (or None): one
    per sequence, whose tensors are concatenated along dim 0 within a batch,
    which suits records with any number of images (e.g. mmtune's MLLM, which
    takes the batch's images stacked in reading order).
    """
    if extra_inputs is None:
        return {}
    if isinstance(extra_inputs, Mapping):
        extra = dict(extra_inputs)
        for key, value in extra.items():
            if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != n):
                rows = "a scalar" if value.dim() == 0 else f"{value.shape[0]} rows"
                raise AnalysisError(
                    f"extra_inputs[{key!r}] has {rows} for {n} sequences (first dim must index sequences)"
                )
        return extra
    if isinstance(extra_inputs, (list, tuple)):
        if len(extra_inputs) != n:
            raise AnalysisError(f"extra_inputs has {len(extra_inputs)} entries for {n} sequences")
        for i, e in enumerate(extra_inputs):
            if e is not None and not isinstance(e, Mapping):
                raise AnalysisError(f"extra_inputs[{i}] must be a mapping or None, got {type(e).__name__}")
        return list(extra_inputs)
    raise AnalysisError(f"extra_inputs must be a mapping or a list of mappings, got {type(extra_inputs).__name__}")


def _select_extra(
    extra: dict[str, Any] | list[Mapping[str, Any] | None], idx: list[int]
) -> dict[str, Any] | list[Mapping[str, Any] | None]:
    """The same extra inputs for the sequences `idx` (in that order; indices may repeat)."""
    if isinstance(extra, list):
        return [extra[i] for i in idx]
    out: dict[str, Any] = {}
    for key, value in extra.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[torch.as_tensor(idx, dtype=torch.long, device=value.device)]
        else:
            out[key] = value
    return out


def _batch_extra(
    extra: dict[str, Any] | list[Mapping[str, Any] | None], idx: list[int], device: torch.device
) -> dict[str, Any]:
    """Keyword arguments for the model call on the batch `idx`."""
    if isinstance(extra, dict):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in _select_extra(extra, idx).items()}
    per = [extra[i] or {} for i in idx]
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for p in per for k in p):
        values = [p[key] for p in per if key in p and p[key] is not None]
        if not values:
            continue
        if all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.cat([v.to(device) for v in values], dim=0)
        else:
            out[key] = values[0]
    return out


def _batched_logits(
    model: torch.nn.Module,
    sequences: Sequence[torch.Tensor],
    *,
    batch_size: int,
    extra_inputs: ExtraInputs,
    pad_token_id: int,
    desc: str,
    progress: bool,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (sequence indices, logits [b, T, V]) batch by batch, right-padded.

    Sequences are grouped by length (less padding); callers index results by
    the yielded indices, so order is not lost.
    """
    if batch_size < 1:
        raise AnalysisError(f"batch_size must be >= 1, got {batch_size}")
    extra = _check_extra(extra_inputs, len(sequences))
    device = _model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        width = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(sequences[i])] = sequences[i]
            mask[row, : len(sequences[i])] = 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), **_batch_extra(extra, idx, device))
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, Mapping):
            logits = out.get("logits")
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise AnalysisError(
                f"the model must return .logits of shape [batch, tokens, vocab] = [{len(idx)}, {width}, V], got {shape}"
            )
        yield idx, logits


# --------------------------------------------------------------------------- #
# Token distribution shift (Lin et al. 2023)
# --------------------------------------------------------------------------- #

UNSHIFTED, MARGINAL, SHIFTED = "unshifted", "marginal", "shifted"


def shift_category(rank: int) -> str:
    """Lin et al.'s bins: rank 1 unshifted, 2-3 marginal, above 3 shifted."""
    return UNSHIFTED if rank == 1 else MARGINAL if rank <= 3 else SHIFTED


@dataclass
class TokenShiftResult:
    """Ranks of the tuned model's tokens under the base model, and their summary.

    `ranks[i]` lists the base-model rank of each continuation token of
    input i (1 = the base model's own top choice; ties resolve in the
    tuned token's favour; empty for a skipped input). `top_shifted` lists the most frequent shifted
    tokens with how often they were shifted and the base model's usual top
    choice at those positions.
    """

    ranks: list[list[int]]
    counts: dict[str, int]
    top_shifted: list[dict[str, Any]]
    by_position: list[dict[str, float | int]]
    n_sequences: int
    skipped: int = 0
    skips: dict[str, int] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(self.counts.values())

    @property
    def shares(self) -> dict[str, float | None]:
        n = self.n_tokens
        return {k: (v / n if n else None) for k, v in self.counts.items()}

    def to_dict(self, *, with_ranks: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_sequences": self.n_sequences, "n_tokens": self.n_tokens, "counts": dict(self.counts),
            "shares": self.shares, "top_shifted": list(self.top_shifted), "by_position": list(self.by_position),
            "skipped": self.skipped, "skips": dict(self.skips),
        }
        if with_ranks:
            out["ranks"] = self.ranks
        return out


def _decode(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    return tokenizer.decode([token_id])


def token_distribution_shift(
    base_model: torch.nn.Module,
    prompts: Sequence[TokenIds],
    continuations: Sequence[TokenIds],
    *,
    tokenizer: Any = None,
    extra_inputs: ExtraInputs = None,
    batch_size: int = 8,
    top_k: int = 20,
    pad_token_id: int | None = None,
    progress: bool = True,
) -> TokenShiftResult:
    """Rank each token the tuned model decoded under the base model, one forward pass per sequence.

    `prompts[i]` are the prompt token ids (at least one) and
    `continuations[i]` the tuned model's decoded continuation for it; the
    base model reads prompt + continuation once and the logits before each
    continuation token give that token's rank. Empty continuations are
    counted skips. `tokenizer` (optional) decodes the top shifted tokens.
    """
    if len(prompts) != len(continuations):
        raise AnalysisError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    pad = pad_token_id if pad_token_id is not None else (getattr(tokenizer, "pad_token_id", None) or 0)
    seqs: list[torch.Tensor] = []
    starts: list[int] = []
    keep: list[int] = []
    skips: Counter[str] = Counter()
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        p_ids, c_ids = _as_ids(p, "prompt", i), _as_ids(c, "continuation", i)
        if len(p_ids) == 0:
            raise AnalysisError(f"prompt #{i} is empty: the first continuation token needs a prefix to be ranked")
        if len(c_ids) == 0:
            skips["empty continuation"] += 1
            continue
        keep.append(i)
        starts.append(len(p_ids))
        seqs.append(torch.cat([p_ids, c_ids]))
    extra = _check_extra(extra_inputs, len(prompts))
    extra = _select_extra(extra, keep)

    ranks: list[list[int]] = [[] for _ in seqs]  # indexed like `seqs`, re-aligned to the inputs below
    shifted_ids: Counter[int] = Counter()
    base_top_at_shift: dict[int, Counter[int]] = {}
    with _eval_mode(base_model):
        for idx, logits in _batched_logits(
            base_model, seqs, batch_size=batch_size, extra_inputs=extra, pad_token_id=pad,
            desc="token shift", progress=progress,
        ):
            for row, i in enumerate(idx):
                start, seq = starts[i], seqs[i]
                # logits at position t predict token t + 1
                rows = logits[row, start - 1 : len(seq) - 1].float()
                targets = seq[start:].to(rows.device)
                chosen = rows.gather(1, targets[:, None])
                r = (rows > chosen).sum(dim=1) + 1
                top = rows.argmax(dim=1)
                ranks[i] = r.tolist()
                for tok, rank, best in zip(targets.tolist(), ranks[i], top.tolist()):
                    if rank > 3:
                        shifted_ids[tok] += 1
                        base_top_at_shift.setdefault(tok, Counter())[best] += 1

    counts = Counter({UNSHIFTED: 0, MARGINAL: 0, SHIFTED: 0})
    for seq_ranks in ranks:
        counts.update(shift_category(r) for r in seq_ranks)
    top_shifted = [
        {
            "token_id": tok, "token": _decode(tokenizer, tok), "count": n,
            "base_top_token": _decode(tokenizer, base_top_at_shift[tok].most_common(1)[0][0]),
        }
        for tok, n in shifted_ids.most_common(top_k)
    ]
    by_position = []
    for pos in range(max((len(r) for r in ranks), default=0)):
        at = [seq_ranks[pos] for seq_ranks in ranks if len(seq_ranks) > pos]
        cats = Counter(shift_category(r) for r in at)
        shares = {k: cats[k] / len(at) for k in (UNSHIFTED, MARGINAL, SHIFTED)}
        by_position.append({"position": pos, "n": len(at), **shares})
    aligned: list[list[int]] = [[] for _ in prompts]
    for k, i in enumerate(keep):
        aligned[i] = ranks[k]
    return TokenShiftResult(
        ranks=aligned, counts=dict(counts), top_shifted=top_shifted, by_position=by_position,
        n_sequences=len(seqs), skipped=sum(skips.values()), skips=dict(skips),
    )


def _save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (temp file, then rename)."""
    return write_png(fig, path, dpi=120, bbox_inches="tight")


def plot_token_shift(result: TokenShiftResult, path: str | Path, *, title: str = "Token distribution shift") -> Path:
    """A PNG with the three shares, the shift share by position, and the most shifted tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = [UNSHIFTED, MARGINAL, SHIFTED]
    shares = [100 * (result.shares[k] or 0.0) for k in names]
    bars = axes[0].bar(names, shares, color=["#4c72b0", "#dd8452", "#c44e52"])
    axes[0].bar_label(bars, fmt="%.1f%%")
    axes[0].set_ylabel("% of tuned-model tokens")
    axes[0].set_ylim(0, 105)
    axes[0].set_title(f"{result.n_tokens} tokens, {result.n_sequences} sequences")
    pos = result.by_position
    if pos:
        xs = [p["position"] for p in pos]
        axes[1].plot(xs, [100 * p[SHIFTED] for p in pos], label="shifted", color="#c44e52")
        axes[1].plot(xs, [100 * p[MARGINAL] for p in pos], label="marginal", color="#dd8452")
        axes[1].legend()
    axes[1].set_xlabel("position in continuation")
    axes[1].set_ylabel("% of tokens")
    axes[1].set_title("shift by position")
    top = result.top_shifted[:15][::-1]
    axes[2].barh([repr(t["token"]) for t in top], [t["count"] for t in top], color="#c44e52")
    axes[2].set_xlabel("times shifted")
    axes[2].set_title("most shifted tokens")
    fig.suptitle(title, y=1.03)
    try:
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- #
# Answer log-probabilities and knowledge consistency (Ren et al. 2024)
# --------------------------------------------------------------------------- #


def candidate_ids(tokenizer: Any, candidate: str, answer_prefix: str, where: str) -> list[int]:
    """The token ids of one answer candidate as scored after its prompt: `answer_prefix + candidate`,
    no special tokens. A candidate that encodes to nothing is an `AnalysisError` starting with `where`."""
    ids = tokenizer(answer_prefix + candidate, add_special_tokens=False)["input_ids"]
    if not ids:
        raise AnalysisError(f"{where} {candidate!r} encodes to no tokens")
    return list(ids)


def answer_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[TokenIds],
    answers: Sequence[TokenIds],
    *,
    extra_inputs: ExtraInputs = None,
    batch_size: int = 8,
    pad_token_id: int = 0,
    progress: bool = True,
    desc: str = "answer log-probs",
) -> list[float]:
    """Mean log-probability per answer token of `answers[i]` following `prompts[i]`."""
    if len(prompts) != len(answers):
        raise AnalysisError(f"{len(prompts)} prompts but {len(answers)} answers")
    seqs, starts = [], []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        p_ids, a_ids = _as_ids(p, "prompt", i), _as_ids(a, "answer", i)
        if len(p_ids) == 0 or len(a_ids) == 0:
            raise AnalysisError(f"pair #{i}: prompt and answer must each have at least one token")
        seqs.append(torch.cat([p_ids, a_ids]))
        starts.append(len(p_ids))
    scores = [math.nan] * len(seqs)
    with _eval_mode(model):
        for idx, logits in _batched_logits(
            model, seqs, batch_size=batch_size, extra_inputs=extra_inputs, pad_token_id=pad_token_id,
            desc=desc, progress=progress,
        ):
            for row, i in enumerate(idx):
                rows = logits[row, starts[i] - 1 : len(seqs[i]) - 1].float().log_softmax(dim=-1)
                targets = seqs[i][starts[i] :].to(rows.device)
                scores[i] = rows.gather(1, targets[:, None]).mean().item()
    return scores


@dataclass
class ConsistencyResult:
    """Mean per-question Pearson r between base and tuned candidate scores, with what was skipped."""

    mean: float | None
    counted: int
    skipped: int
    skips: dict[str, int]
    per_question: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"knowledge_consistency": self.mean, "counted": self.counted, "skipped": self.skipped,
                "skips": dict(self.skips), "per_question": list(self.per_question)}


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation, or None when it is undefined (fewer than 2 points or a constant side)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 2 or len(a) != len(b):
        return None
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if den == 0.0 or not math.isfinite(den):
        return None
    return float((a * b).sum() / den)


def _question_fields(q: Any, i: int) -> tuple[str, str, list[str]]:
    if isinstance(q, Mapping):
        qid, text, cands = str(q.get("id", i)), q.get("question"), q.get("candidates", q.get("choices"))
    elif isinstance(q, (tuple, list)) and len(q) == 2:
        qid, (text, cands) = str(i), q
    else:
        raise AnalysisError(f"question #{i}: expected {{'question', 'candidates'}} or (question, candidates)")
    if not isinstance(text, str):
        raise AnalysisError(f"question {qid!r}: field 'question' must be a string")
    if not isinstance(cands, (list, tuple)) or not all(isinstance(c, str) for c in cands):
        raise AnalysisError(f"question {qid!r}: field 'candidates' must be a list of strings")
    return qid, text, list(cands)


def knowledge_consistency(
    base_model: torch.nn.Module,
    tuned_model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[Mapping[str, Any] | tuple[str, Sequence[str]]],
    *,
    base_format: Callable[[str], str] | None = None,
    tuned_format: Callable[[str], str] | None = None,
    answer_prefix: str = " ",
    base_extra_inputs: ExtraInputs = None,
    tuned_extra_inputs: ExtraInputs = None,
    batch_size: int = 8,
    progress: bool = True,
) -> ConsistencyResult:
    """Ren et al.'s knowledge consistency between a base and a tuned model.

    Each question is ``{"id"?, "question", "candidates": [...]}`` (or a
    ``(question, candidates)`` pair). Each model scores every candidate by its
    mean token log-prob after the question (formatted by `base_format` /
    `tuned_format`, e.g. the tuned model's chat template; raw by default);
    the per-question Pearson r of the two score vectors is averaged.
    Questions with fewer than two candidates, or where either model scores
    all candidates the same, are counted skips. Both models must share
    `tokenizer`'s ids. Extra inputs are per question (e.g. one image each).
    """
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    parsed = [_question_fields(q, i) for i, q in enumerate(questions)]
    skips: Counter[str] = Counter()
    pair_q: list[int] = []
    base_prompts, tuned_prompts, cand_ids = [], [], []
    counted_q: list[int] = []
    for qi, (qid, text, cands) in enumerate(parsed):
        if len(cands) < 2:
            skips["fewer than 2 candidates"] += 1
            continue
        counted_q.append(qi)
        b_ids = tokenizer(base_format(text) if base_format else text)["input_ids"]
        t_ids = tokenizer(tuned_format(text) if tuned_format else text)["input_ids"]
        if not b_ids or not t_ids:
            raise AnalysisError(f"question {qid!r}: the question encodes to no tokens")
        ids = [candidate_ids(tokenizer, c, answer_prefix, f"question {qid!r}: candidate") for c in cands]
        base_prompts += [b_ids] * len(ids)
        tuned_prompts += [t_ids] * len(ids)
        cand_ids += ids
        pair_q += [qi] * len(ids)

    def expand(extra: ExtraInputs) -> ExtraInputs:
        extra = _check_extra(extra, len(parsed))
        return _select_extra(extra, pair_q)

    common = {"batch_size": batch_size, "pad_token_id": pad, "progress": progress}
    base_scores = answer_logprobs(base_model, base_prompts, cand_ids, extra_inputs=expand(base_extra_inputs),
                                  desc="base log-probs", **common)
    tuned_scores = answer_logprobs(tuned_model, tuned_prompts, cand_ids, extra_inputs=expand(tuned_extra_inputs),
                                   desc="tuned log-probs", **common)
    pairs_of: dict[int, list[int]] = {}
    for k, qi in enumerate(pair_q):
        pairs_of.setdefault(qi, []).append(k)
    per_question: list[dict[str, Any]] = []
    rs: list[float] = []
    for qi in counted_q:
        qid = parsed[qi][0]
        pos = pairs_of[qi]
        b, t = [base_scores[k] for k in pos], [tuned_scores[k] for k in pos]
        r = pearson(b, t)
        per_question.append({"id": qid, "r": r, "base_scores": b, "tuned_scores": t})
        if r is None:
            skips["constant scores"] += 1
        else:
            rs.append(r)
    return ConsistencyResult(
        mean=sum(rs) / len(rs) if rs else None, counted=len(rs), skipped=sum(skips.values()),
        skips=dict(skips), per_question=per_question,
    )


# --------------------------------------------------------------------------- #
# Pairwise judging with order swap
# --------------------------------------------------------------------------- #

Judge = Callable[[str, str, str], str]
VERDICTS = ("1", "2", "tie")

JUDGE_PROMPT = (
    "Compare two answers to the same question and decide which one is better: "
    "more helpful, correct and relevant.\n\n"
    "Question: {question}\n\n"
    "Answer {label_1}: {answer_1}\n\n"
    "Answer {label_2}: {answer_2}\n\n"
    "Which answer is better? Reply with {label_1} or {label_2}.\n"
    "Better answer:"
)


class LMJudge:
    """A local causal LM as a judge: reads its preference from next-token probabilities.

    The judging prompt (`prompt`, with ``{question}``, ``{answer_1}``,
    ``{answer_2}``, ``{label_1}``, ``{label_2}``; optionally passed through
    `format_prompt`, e.g. a chat template) is run once, and the probabilities
    of the two label tokens after it are compared: "1" when label 1 is more
    likely by more than `tie_margin` (in probability, after renormalising over
    the two labels), "2" in the opposite case, "tie" otherwise. A label
    counts every single-token spelling of it (``"A"`` and ``" A"``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        prompt: str = JUDGE_PROMPT,
        labels: tuple[str, str] = ("A", "B"),
        format_prompt: Callable[[str], str] | None = None,
        tie_margin: float = 0.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.labels = labels
        self.format_prompt = format_prompt
        self.tie_margin = tie_margin
        self.label_ids = [self._label_token_ids(lab) for lab in labels]
        if set(self.label_ids[0]) & set(self.label_ids[1]):
            raise AnalysisError(f"judge labels {labels!r} share a token; choose distinct labels")

    def _label_token_ids(self, label: str) -> list[int]:
        ids = set()
        for spelling in (label, " " + label):
            enc = self.tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.add(int(enc[0]))
        if not ids:
            raise AnalysisError(
                f"judge label {label!r} is not a single token for this tokenizer; pick labels like 'A'/'B' or '1'/'2'"
            )
        return sorted(ids)

    def render(self, question: str, answer_1: str, answer_2: str) -> str:
        text = self.prompt.format(
            question=question, answer_1=answer_1, answer_2=answer_2, label_1=self.labels[0], label_2=self.labels[1]
        )
        return self.format_prompt(text) if self.format_prompt else text

    def probabilities(self, question: str, answer_1: str, answer_2: str) -> tuple[float, float]:
        """P(label 1), P(label 2) renormalised over the two labels."""
        ids = self.tokenizer(self.render(question, answer_1, answer_2))["input_ids"]
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        with _eval_mode(self.model):
            ((_, logits),) = list(_batched_logits(
                self.model, [_as_ids(ids, "judge prompt", 0)], batch_size=1, extra_inputs=None,
                pad_token_id=pad, desc="judge", progress=False,
            ))
            probs = logits[0, -1].float().softmax(dim=-1)
            p1 = float(probs[self.label_ids[0]].sum())
            p2 = float(probs[self.label_ids[1]].sum())
        total = p1 + p2
        if total <= 0.0:
            return 0.5, 0.5
        return p1 / total, p2 / total

    def __call__(self, question: str, answer_1: str, answer_2: str) -> str:
        p1, p2 = self.probabilities(question, answer_1, answer_2)
        if p1 - p2 > self.tie_margin:
            return "1"
        if p2 - p1 > self.tie_margin:
            return "2"
        return "tie"


@dataclass
class PairwiseResult:
    """Wins of A and B that survived the order swap; every other comparison is a tie.

    `inconsistent` counts the ties where the two orders gave opposite or
    mixed verdicts (position bias). `win_rate_a` = (wins_a + ties / 2) / n.
    """

    wins_a: int
    wins_b: int
    ties: int
    inconsistent: int
    skipped: int
    skips: dict[str, int]
    per_item: list[dict[str, Any]]

    @property
    def counted(self) -> int:
        return self.wins_a + self.wins_b + self.ties

    @property
    def win_rate_a(self) -> float | None:
        return (self.wins_a + 0.5 * self.ties) / self.counted if self.counted else None

    def to_dict(self, *, with_items: bool = False) -> dict[str, Any]:
        out = {"wins_a": self.wins_a, "wins_b": self.wins_b, "ties": self.ties, "inconsistent": self.inconsistent,
               "counted": self.counted, "win_rate_a": self.win_rate_a, "skipped": self.skipped,
               "skips": dict(self.skips)}
        if with_items:
            out["per_item"] = list(self.per_item)
        return out


def _verdict(judge: Judge, question: str, first: str, second: str, rid: str, order: str) -> str:
    v = judge(question, first, second)
    v = v.strip().lower() if isinstance(v, str) else v
    if v not in VERDICTS:
        raise AnalysisError(f"item {rid!r} ({order}): the judge returned {v!r}; expected '1', '2' or 'tie'")
    return v


def pairwise_judge(
    questions: Sequence[str],
    answers_a: Sequence[str | None],
    answers_b: Sequence[str | None],
    judge: Judge,
    *,
    ids: Sequence[str] | None = None,
    progress: bool = True,
) -> PairwiseResult:
    """Compare answers A and B per question, in both orders; only consistent verdicts win.

    A wins when the judge prefers position 1 for (A, B) and position 2 for
    (B, A); B wins symmetrically; anything else is a tie. A missing
    (non-string) answer on either side is a counted skip.
    """
    if not (len(questions) == len(answers_a) == len(answers_b)):
        raise AnalysisError(
            f"lengths differ: {len(questions)} questions, {len(answers_a)} A answers, {len(answers_b)} B answers"
        )
    ids = [str(x) for x in ids] if ids is not None else [str(i) for i in range(len(questions))]
    wins_a = wins_b = ties = inconsistent = 0
    skips: Counter[str] = Counter()
    per_item: list[dict[str, Any]] = []
    for rid, q, a, b in tqdm(list(zip(ids, questions, answers_a, answers_b)), desc="judging", disable=not progress):
        if not isinstance(a, str) or not isinstance(b, str) or not isinstance(q, str):
            skips["missing answer" if isinstance(q, str) else "missing question"] += 1
            continue
        forward = _verdict(judge, q, a, b, rid, "A first")
        backward = _verdict(judge, q, b, a, rid, "B first")
        if forward == "1" and backward == "2":
            outcome = "A"
            wins_a += 1
        elif forward == "2" and backward == "1":
            outcome = "B"
            wins_b += 1
        else:
            outcome = "tie"
            ties += 1
            inconsistent += not (forward == "tie" and backward == "tie")
        per_item.append({"id": rid, "a_first": forward, "b_first": backward, "outcome": outcome})
    return PairwiseResult(wins_a, wins_b, ties, inconsistent, sum(skips.values()), dict(skips), per_item)
