"""Quality scores for records, pluggable: length, a reward model, an LM judge, a precomputed field.

Every scorer returns one raw score per record (higher is better); `normalise`
maps raw scores to [0, 1] for QDIT and thresholds. Scorers:

* `length` (the default): log(1 + characters of the assistant text). Cheap,
  and "Long Is More for Alignment" (Zhao et al., 2024) found response length
  a strong selection signal.
* `reward`: a Hugging Face sequence-classification reward model scoring
  (instruction, response); one logit, or logit[1] - logit[0] for two labels.
* `judge`: a local causal LM asked to rate the response 1-5 (or 0-5); the
  score is the expected rating under the next-token probabilities of the
  rating tokens (the DEITA trick), so it is continuous and needs no sampling.
* `field`: a number already in each record's `meta` (dotted path allowed),
  e.g. a score from an external judge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from mmtune.data.schema import IMAGE_PLACEHOLDER, Record
from mmtune.errors import MMTuneError
from mmtune.select.embed import quiet_loading


class QualityError(MMTuneError):
    """A quality scorer that cannot run or a score that cannot be read."""


class QualityScorer(Protocol):
    name: str

    def score(self, records: Sequence[Record], *, progress: bool = False) -> np.ndarray: ...


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bar(enabled: bool, **kwargs):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(**kwargs, leave=False)


def _strip(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, " ").strip()


# --------------------------------------------------------------------------- #
# Scorers
# --------------------------------------------------------------------------- #


class LengthScorer:
    """log(1 + number of characters in the assistant turns)."""

    name = "length"

    def score(self, records: Sequence[Record], *, progress: bool = False) -> np.ndarray:
        return np.log1p(np.array([len(r.assistant_text()) for r in records], dtype=np.float64))


class FieldScorer:
    """A precomputed number in `record.meta` (a dotted path such as `scores.quality`)."""

    def __init__(self, field: str) -> None:
        if not field:
            raise QualityError("--quality-field needs a field name")
        self.field = field
        self.name = f"field:{field}"

    def _get(self, rec: Record) -> Any:
        node: Any = rec.meta
        for part in self.field.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def score(self, records: Sequence[Record], *, progress: bool = False) -> np.ndarray:
        out = np.empty(len(records), dtype=np.float64)
        bad: list[str] = []
        for i, rec in enumerate(records):
            value = self._get(rec)
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok:
                bad.append(rec.id)
                continue
            out[i] = float(value)
        if bad:
            raise QualityError(
                f"quality field meta.{self.field} is missing or not a finite number in {len(bad)} of "
                f"{len(records)} record(s) (first: record {bad[0]!r})"
            )
        return out


class RewardModelScorer:
    """A Hugging Face reward model (AutoModelForSequenceClassification) on (instruction, response)."""

    def __init__(
        self,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = f"reward:{name_or_path}"
        self.device = _device(device)
        try:
            with quiet_loading():
                self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    name_or_path, trust_remote_code=trust_remote_code
                )
        except (OSError, ValueError) as exc:
            raise QualityError(f"cannot load reward model {name_or_path!r}: {_first_line(exc)}") from None
        if self.model.config.num_labels not in (1, 2):
            raise QualityError(
                f"reward model {name_or_path!r} has {self.model.config.num_labels} labels; expected 1 (a score) "
                "or 2 (bad/good)"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval().to(self.device)
        self.batch_size = batch_size
        self.max_length = max_length

    def _encode(self, batch: Sequence[Record]):
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = [
                tok.apply_chat_template(
                    [{"role": m["role"], "content": _strip(m["content"])} for m in r.messages], tokenize=False
                )
                for r in batch
            ]
            return tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        # a plain encoder reward model (e.g. DeBERTa) reads a (question, answer) text pair
        return tok(
            [_strip(r.user_text()) for r in batch], [_strip(r.assistant_text()) for r in batch],
            padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
        )

    @torch.no_grad()
    def score(self, records: Sequence[Record], *, progress: bool = False) -> np.ndarray:
        out = np.empty(len(records), dtype=np.float64)
        bar = _bar(progress, total=len(records), desc="reward model", unit="rec")
        for lo in range(0, len(records), self.batch_size):
            batch = records[lo : lo + self.batch_size]
            logits = self.model(**self._encode(batch).to(self.device)).logits.float()
            vals = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
            out[lo : lo + len(batch)] = vals.cpu().numpy()
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return out


JUDGE_PROMPT = (
    "Rate the quality of the response to the instruction below on a scale from {low} (useless) "
    "to {high} (excellent), considering helpfulness, correctness, depth and clarity.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{response}\n\n### Rating ({low}-{high}):"
)
JUDGE_SCALES = {"1-5": (1, 5), "0-5": (0, 5)}


class LMJudgeScorer:
    """Expected rating from a local causal LM's next-token probabilities over the rating digits.

    The prompt (overridable; fields {instruction}, {response}, {low}, {high})
    ends where the rating should come; if the tokenizer has a chat template the
    prompt is sent as one user turn with the generation prompt added. For each
    rating r the probabilities of the tokens "r" and " r" are summed, so both
    SentencePiece and byte-level BPE vocabularies work; the score is
    sum(r * p(r)) / sum(p(r)).
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        scale: str = "1-5",
        prompt: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if scale not in JUDGE_SCALES:
            raise QualityError(f"judge scale must be one of {', '.join(JUDGE_SCALES)}, got {scale!r}")
        self.name = f"judge:{name_or_path}:{scale}"
        self.device = _device(device)
        self.low, self.high = JUDGE_SCALES[scale]
        self.prompt = prompt or JUDGE_PROMPT
        for key in ("{instruction}", "{response}"):
            if key not in self.prompt:
                raise QualityError(f"judge prompt must contain {key}")
        try:
            with quiet_loading():
                self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
                self.model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise QualityError(f"cannot load judge model {name_or_path!r}: {_first_line(exc)}") from None
        tok = self.tokenizer
        tok.padding_side = "left"  # the rating token follows the last prompt token of every row
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        self.model.eval().to(self.device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.ratings, self.token_groups = self._rating_tokens()

    def _rating_tokens(self) -> tuple[list[int], list[list[int]]]:
        ratings = list(range(self.low, self.high + 1))
        groups = []
        for r in ratings:
            ids = set()
            for text in (str(r), f" {r}"):
                enc = self.tokenizer.encode(text, add_special_tokens=False)
                if len(enc) == 1:
                    ids.add(enc[0])
                elif len(enc) == 2 and self.tokenizer.decode(enc[:1]).strip() == "":
                    ids.add(enc[1])  # SentencePiece may split " 4" into "▁" + "4"
            if not ids:
                raise QualityError(f"the judge's tokenizer has no single token for the rating {r}")
            groups.append(sorted(ids))
        return ratings, groups

    def _text(self, rec: Record) -> str:
        prompt = self.prompt.format(
            instruction=_strip(rec.user_text()), response=_strip(rec.assistant_text()), low=self.low, high=self.high
        )
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    @torch.no_grad()
    def rating_probs(self, records: Sequence[Record]) -> np.ndarray:
        """(n, ratings) probabilities of each rating, renormalised over the rating tokens."""
        rows = []
        for lo in range(0, len(records), self.batch_size):
            texts = [self._text(r) for r in records[lo : lo + self.batch_size]]
            # truncate from the left so the end of the prompt (where the rating goes) is always kept
            self.tokenizer.truncation_side = "left"
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt", add_special_tokens=True).to(self.device)
            logits = self.model(**enc).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)
            per = torch.stack([probs[:, g].sum(dim=1) for g in self.token_groups], dim=1)
            rows.append((per / per.sum(dim=1, keepdim=True).clamp(min=1e-30)).cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(self.ratings)))

    def score(self, records: Sequence[Record], *, progress: bool = False) -> np.ndarray:
        out = np.empty(len(records), dtype=np.float64)
        bar = _bar(progress, total=len(records), desc="LM judge", unit="rec")
        step = max(self.batch_size, 64)
        values = np.asarray(self.ratings, dtype=np.float64)
        for lo in range(0, len(records), step):
            probs = self.rating_probs(records[lo : lo + step])
            out[lo : lo + len(probs)] = probs @ values
            if bar is not None:
                bar.update(len(probs))
        if bar is not None:
            bar.close()
        return out


# --------------------------------------------------------------------------- #
# Registry and normalisation
# --------------------------------------------------------------------------- #

SCORERS: dict[str, str] = {
    "length": "log(1 + characters of the response) (default)",
    "reward": "a Hugging Face reward model (sequence classification); needs --quality-model",
    "judge": "a local causal LM's expected 1-5 / 0-5 rating; needs --quality-model",
    "field": "a number in each record's meta; needs --quality-field",
}


def build_scorer(
    name: str | None = None,
    *,
    model: str | None = None,
    field: str | None = None,
    judge_scale: str = "1-5",
    judge_prompt: str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> QualityScorer:
    """The scorer called `name` (None: `field` when a field is given, else `length`)."""
    name = name or ("field" if field else "length")
    builders: dict[str, Callable[[], QualityScorer]] = {
        "length": LengthScorer,
        "field": lambda: FieldScorer(field or ""),
        "reward": lambda: RewardModelScorer(_need(model, "reward"), device=device, trust_remote_code=trust_remote_code),
        "judge": lambda: LMJudgeScorer(_need(model, "judge"), scale=judge_scale, prompt=judge_prompt,
                                       device=device, trust_remote_code=trust_remote_code),
    }
    if name not in builders:
        raise QualityError(f"unknown quality scorer {name!r} (choose from {', '.join(SCORERS)})")
    return builders[name]()


def _need(model: str | None, name: str) -> str:
    if not model:
        raise QualityError(f"the {name} quality scorer needs --quality-model PATH (a local Hugging Face model folder)")
    return model


def normalise(raw: np.ndarray) -> np.ndarray:
    """Raw scores -> [0, 1]: clipped to their 1st-99th percentiles, then min-max.

    Clipping keeps one extreme outlier from squashing everyone else into a
    sliver of the range. All-equal scores map to 1.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.size == 0:
        return raw
    lo, hi = np.percentile(raw, [1, 99]) if raw.size >= 100 else (raw.min(), raw.max())
    if hi - lo <= 1e-12:
        return np.ones_like(raw)
    return np.clip((raw - lo) / (hi - lo), 0.0, 1.0)
