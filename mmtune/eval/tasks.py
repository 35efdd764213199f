"""Evaluation tasks: which records, which prompt, which metric; unseen-task splits; prompts per mode.

An eval task is a set of unified records that carry reference `answers` (and
`choices` for multiple choice), a prompt style and a metric:

* prompt styles follow LLaVA-1.5's evaluation prompts: `short_answer` appends
  "\\nAnswer the question using a single word or phrase." (VQA v2, GQA, POPE),
  `multiple_choice` lists the choices as "A. ..." lines and appends
  "\\nAnswer with the option's letter from the given choices directly."
  (ScienceQA), `free` appends nothing; `suffix` sets any other suffix;
* metrics are the scorers of `mmtune.eval.metrics`: `vqa`, `exact_match`,
  `multiple_choice`, `pope`.

Ready-made definitions (presets) live as YAML files in `mmtune/tasks/`
(`vqav2`, `gqa`, `scienceqa`, `pope`); an eval config names a preset and
overrides what differs (its name, its records, its metric ...).

Unseen tasks: `split_unseen` divides a pool by `task` name or task cluster
(`meta.cluster`) into training records and held-out records. Held-out records
are never used as few-shot examples, so for an unseen task the k in-context
examples always come from the training tasks (the held-out task's own solved
examples would leak the task to the base model that the tuned model never saw).

Modes: `zero-shot`, `K-shot` / `few-shot` (k solved examples prepended, each
with the same suffix, via `mmtune.data.templates.few_shot`) and `cot`
(zero-shot, asking for reasoning that ends in "The answer is ...", from which
the answer is read back).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmtune.config import ConfigError, from_dict, load_yaml
from mmtune.data.images import resolve_image_path
from mmtune.data.schema import IMAGE_PLACEHOLDER, Record, read_records
from mmtune.data.templates import few_shot, prompt_messages
from mmtune.errors import MMTuneError
from mmtune.eval.metrics import DEFAULT_OPTIONS, MULTIPLE_CHOICE_METRICS, SCORERS, VQA_RULES

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
PROMPT_SUFFIXES: dict[str, str] = {
    "short_answer": SHORT_ANSWER_SUFFIX,
    "multiple_choice": MULTIPLE_CHOICE_SUFFIX,
    "free": "",
}
COT_SUFFIX = '\nThink step by step, then end your reply with "The answer is" followed by the answer.'
COT_MC_SUFFIX = (
    '\nThink step by step, then end your reply with "The answer is" followed by the option\'s letter.'
)
ANSWER_MARKER = "the answer is"

PRESET_DIR = Path(__file__).resolve().parents[1] / "tasks"


class TaskError(MMTuneError, ValueError):
    """A task definition or task data that cannot be used (one line naming the task, file or record)."""


# --------------------------------------------------------------------------- #
# Task definitions and the preset registry
# --------------------------------------------------------------------------- #


@dataclass
class TaskSpec:
    """One evaluation task (a YAML preset, an eval-config entry, or both merged).

    `records`: a JSONL file of unified records; when empty, the task's records
    are taken from the eval pool. `select_tasks`: keep only records whose
    `task` is one of these (default: none when `records` is given, else
    `[name]`). Paths are relative to the current directory.
    """

    name: str = ""
    preset: str | None = None
    description: str = ""
    metric: str = "vqa"  # vqa | exact_match | multiple_choice | pope
    vqa_rule: str = "evalai"  # evalai | vqa-github (metric vqa only)
    prompt: str = "short_answer"  # short_answer | multiple_choice | free
    suffix: str | None = None  # replaces the prompt style's suffix when set
    records: str | None = None
    select_tasks: list[str] = field(default_factory=list)
    image_root: str | None = None
    max_new_tokens: int | None = None  # None: the eval config's generation.max_new_tokens
    limit: int | None = None  # evaluate the first N records only
    append_choices: str = "auto"  # auto (unless already listed) | always | never
    answers_from_assistant: bool = False  # use the last assistant turn when a record has no `answers`
    # TextVQA as LLaVA-1.5 prompts it: "\nReference OCR token: a, b, c" after the question, from meta.ocr_tokens
    ocr_tokens: bool = False

    @property
    def instruction_suffix(self) -> str:
        return self.suffix if self.suffix is not None else PROMPT_SUFFIXES[self.prompt]

    @property
    def is_multiple_choice(self) -> bool:
        return self.metric in MULTIPLE_CHOICE_METRICS

    def check(self) -> TaskSpec:
        """Validate the field values (an unknown metric/prompt names the task)."""
        where = f"task {self.name!r}" if self.name else "task"
        if not self.name:
            raise TaskError("every task needs a name (or a preset to take it from)")
        if self.metric not in SCORERS:
            raise TaskError(f"{where}: unknown metric {self.metric!r} (have: {', '.join(SCORERS)})")
        if self.vqa_rule not in VQA_RULES:
            raise TaskError(f"{where}: unknown vqa_rule {self.vqa_rule!r} (have: {', '.join(VQA_RULES)})")
        if self.prompt not in PROMPT_SUFFIXES:
            raise TaskError(f"{where}: unknown prompt {self.prompt!r} (have: {', '.join(PROMPT_SUFFIXES)})")
        if self.append_choices not in ("auto", "always", "never"):
            raise TaskError(f"{where}: append_choices must be auto, always or never, got {self.append_choices!r}")
        for key in ("max_new_tokens", "limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise TaskError(f"{where}: {key} must be >= 1, got {value}")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["instruction_suffix"] = self.instruction_suffix
        return out


def list_presets() -> list[str]:
    """Names of the task presets shipped in `mmtune/tasks/*.yaml`."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The raw mapping of one preset (a YAML file in `mmtune/tasks/`)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        import difflib

        have = list_presets()
        close = difflib.get_close_matches(name, have, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TaskError(f"unknown task preset {name!r}{hint} (have: {', '.join(have)})")
    return load_yaml(path)


def get_task(name: str) -> TaskSpec:
    """A preset as a TaskSpec."""
    return resolve_task(name)


def resolve_task(entry: str | dict[str, Any], where: str = "task") -> TaskSpec:
    """An eval-config task entry -> TaskSpec.

    A string names a preset. A mapping may name a `preset` whose fields it
    overrides; without one it is a complete definition. Unknown keys fail with
    the closest valid key.
    """
    if isinstance(entry, str):
        entry = {"preset": entry}
    if not isinstance(entry, dict):
        raise TaskError(f"{where}: expected a preset name or a mapping, got {type(entry).__name__}")
    data: dict[str, Any] = {}
    preset = entry.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise TaskError(f"{where}.preset: expected a preset name, got {preset!r}")
        data.update(load_preset(preset))
        data.setdefault("name", preset)
    data.update(entry)
    try:
        spec = from_dict(TaskSpec, data, where)
    except ConfigError as exc:
        raise TaskError(str(exc)) from None
    return spec.check()


# --------------------------------------------------------------------------- #
# Unseen-task split
# --------------------------------------------------------------------------- #


def record_cluster(record: Record) -> str | None:
    cluster = record.meta.get("cluster")
    return cluster if isinstance(cluster, str) else None


def is_heldout(record: Record, holdout_tasks: Iterable[str], holdout_clusters: Iterable[str]) -> bool:
    """True when the record's task or its cluster (`meta.cluster`) is held out."""
    return (record.task is not None and record.task in set(holdout_tasks)) or (
        record_cluster(record) is not None and record_cluster(record) in set(holdout_clusters)
    )


def split_unseen(
    records: Sequence[Record],
    holdout_tasks: Iterable[str] = (),
    holdout_clusters: Iterable[str] = (),
    *,
    strict: bool = True,
    where: str = "the pool",
) -> tuple[list[Record], list[Record]]:
    """Split a pool into (train, heldout) by task name and task cluster.

    A record is held out when its `task` is in `holdout_tasks` or its
    `meta.cluster` is in `holdout_clusters`. With `strict`, a name that matches
    no record is an error (a typo would otherwise hold out nothing, silently).
    Records without a task stay in train (they cannot be held out by name).
    """
    tasks, clusters = list(dict.fromkeys(holdout_tasks)), list(dict.fromkeys(holdout_clusters))
    if strict:
        have_tasks = {r.task for r in records if r.task is not None}
        have_clusters = {c for r in records if (c := record_cluster(r)) is not None}
        for names, have, what in ((tasks, have_tasks, "task"), (clusters, have_clusters, "cluster")):
            missing = [n for n in names if n not in have]
            if missing:
                import difflib

                close = difflib.get_close_matches(missing[0], sorted(have), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                listed = ", ".join(sorted(have)[:20]) or "none"
                raise TaskError(f"holdout {what} {missing[0]!r} matches no record in {where}{hint} "
                                f"(its {what}s: {listed})")
    train: list[Record] = []
    heldout: list[Record] = []
    for r in records:
        (heldout if is_heldout(r, tasks, clusters) else train).append(r)
    return train, heldout


def describe_split(
    train: Sequence[Record],
    heldout: Sequence[Record],
    holdout_tasks: Iterable[str] = (),
    holdout_clusters: Iterable[str] = (),
) -> dict[str, Any]:
    """What `split.json` records: the holdout rules, the unseen task names and counts.

    `unseen_tasks` is the list to put in a training config's
    `data.holdout_tasks`. `tasks_in_both` lists tasks with records on both
    sides (possible when holding out clusters that a task straddles): they are
    not truly unseen.
    """
    train_tasks = Counter(r.task or "<no task>" for r in train)
    held_tasks = Counter(r.task or "<no task>" for r in heldout)
    return {
        "holdout_tasks": list(dict.fromkeys(holdout_tasks)),
        "holdout_clusters": list(dict.fromkeys(holdout_clusters)),
        "unseen_tasks": sorted(held_tasks),
        "tasks_in_both": sorted(set(train_tasks) & set(held_tasks)),
        "counts": {
            "train": len(train),
            "heldout": len(heldout),
            "train_by_task": dict(sorted(train_tasks.items())),
            "heldout_by_task": dict(sorted(held_tasks.items())),
        },
    }


# --------------------------------------------------------------------------- #
# Loading a task's records
# --------------------------------------------------------------------------- #


@dataclass
class TaskData:
    """A task's definition with its records (image paths already resolved)."""

    spec: TaskSpec
    records: list[Record]
    source: str

    @property
    def name(self) -> str:
        return self.spec.name


def resolve_images(record: Record, image_root: str | None) -> Record:
    """The record with every image path made absolute (relative paths are under `image_root`)."""
    if not record.images:
        return record
    return replace(record, images=[resolve_image_path(p, image_root) for p in record.images])


def load_task(
    spec: TaskSpec,
    pool: Sequence[Record] | None = None,
    *,
    pool_name: str = "the eval pool",
    image_root: str | None = None,
    read: Callable[[Path], list[Record]] = read_records,
) -> TaskData:
    """Read a task's records from its own file or the pool, filter and check them.

    Checks that fail loudly (they are malformed data, not missing data): a
    multiple-choice task whose records lack `choices`, a POPE task whose
    answers are not yes/no, a task with no record at all. Records without
    `answers` are kept here and counted as skips when scored. `read` reads a
    records file (the runner passes a memoised reader).
    """
    select = list(spec.select_tasks)
    if spec.records:
        path = Path(spec.records)
        if not path.is_file():
            raise TaskError(f"task {spec.name!r}: records file {path} not found")
        records = read(path)
        source = str(path)
    else:
        if pool is None:
            raise TaskError(f"task {spec.name!r} has no `records` file and there is no pool to take it from")
        records = list(pool)
        source = pool_name
        select = select or [spec.name]
    if select:
        records = [r for r in records if r.task in set(select)]
    if not records:
        what = f" with task {' / '.join(select)}" if select else ""
        raise TaskError(f"task {spec.name!r}: no records{what} in {source}")
    if spec.limit is not None:
        records = records[: spec.limit]
    root = spec.image_root if spec.image_root is not None else image_root
    out = []
    for r in records:
        answers = r.answers
        if not answers and spec.answers_from_assistant and r.turns("assistant"):
            answers = [r.turns("assistant")[-1]]
        if spec.is_multiple_choice and not r.choices:
            raise TaskError(f"task {spec.name!r} ({source}): record {r.id!r} has no 'choices' (metric multiple_choice)")
        if spec.is_multiple_choice and len(r.choices or []) > len(DEFAULT_OPTIONS):
            raise TaskError(f"task {spec.name!r} ({source}): record {r.id!r} has {len(r.choices or [])} choices; "
                            f"at most {len(DEFAULT_OPTIONS)} can be lettered")
        if spec.metric == "pope" and answers and answers[0].strip().lower() not in ("yes", "no"):
            raise TaskError(f"task {spec.name!r} ({source}): record {r.id!r} field 'answers' must be yes/no "
                            f"for metric pope, got {answers[0]!r}")
        out.append(resolve_images(replace(r, answers=answers), root))
    ids = Counter(r.id for r in out)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise TaskError(f"task {spec.name!r} ({source}): record id {dup[0]!r} appears {ids[dup[0]]} times")
    if not any(r.answers for r in out):
        raise TaskError(f"task {spec.name!r}: none of the {len(out)} records in {source} has 'answers' "
                        "(eval records need reference answers; set answers_from_assistant: true to use the "
                        "assistant turn)")
    return TaskData(spec, out, source)


# --------------------------------------------------------------------------- #
# Modes and prompts
# --------------------------------------------------------------------------- #

_K_SHOT = re.compile(r"^(\d+)-shot$")


@dataclass(frozen=True)
class Mode:
    """How a question is asked: `zero-shot`, `K-shot` (K solved examples first) or `cot`."""

    name: str
    k: int = 0
    cot: bool = False

    @property
    def few_shot(self) -> bool:
        return self.k > 0


def parse_mode(text: str, k: int = 4) -> Mode:
    """`zero-shot` / `0-shot`, `few-shot` (uses `k`), `K-shot` (e.g. `2-shot`), `cot`."""
    t = text.strip().lower()
    if t in ("zero-shot", "0-shot", "zeroshot"):
        return Mode("zero-shot")
    if t == "cot":
        return Mode("cot", cot=True)
    if t in ("few-shot", "fewshot"):
        if k < 1:
            raise TaskError(f"mode few-shot needs k >= 1, got k={k}")
        return Mode(f"{k}-shot", k=k)
    m = _K_SHOT.match(t)
    if m:
        n = int(m.group(1))
        return Mode(f"{n}-shot", k=n) if n else Mode("zero-shot")
    raise TaskError(f"unknown mode {text!r} (have: zero-shot, few-shot, K-shot such as 2-shot, cot)")


def choice_lines(choices: Sequence[str]) -> str:
    """The options as LLaVA's ScienceQA questions list them: one "A. first" line per choice."""
    return "\n".join(f"{DEFAULT_OPTIONS[i]}. {c}" for i, c in enumerate(choices))


def _with_choices(record: Record, spec: TaskSpec) -> Record:
    """The record whose first user turn lists the choices (unless it already does, in `auto`)."""
    if not record.choices or spec.append_choices == "never":
        return record
    lines = choice_lines(record.choices)
    msgs = [dict(m) for m in record.messages]
    for m in msgs:
        if m["role"] == "user":
            if spec.append_choices == "always" or f"A. {record.choices[0]}" not in m["content"]:
                m["content"] = m["content"].rstrip() + "\n" + lines
            break
    return replace(record, messages=msgs)


def gold_letter(record: Record) -> str | None:
    """The correct option letter of a multiple-choice record (gold = a choice's text or its letter)."""
    if not record.choices or not record.answers:
        return None
    gold = record.answers[0]
    letters = list(DEFAULT_OPTIONS[: len(record.choices)])
    if gold in record.choices:
        return letters[record.choices.index(gold)]
    return gold if gold in letters else None


def shot_answer(record: Record, multiple_choice: bool) -> str | None:
    """What a solved example answers: the option letter (MC), else the most common reference, else the reply."""
    if multiple_choice:
        return gold_letter(record)
    if record.answers:
        return Counter(record.answers).most_common(1)[0][0]
    replies = record.turns("assistant")
    return replies[0] if replies else None


def _example(record: Record, spec: TaskSpec) -> Record | None:
    """A pool record as a solved example in this task's format (one user turn, one answer)."""
    mc = spec.is_multiple_choice and bool(record.choices)
    answer = shot_answer(record, mc)
    users = record.turns("user")
    if answer is None or not answer.strip() or not users:
        return None
    rec = _with_choices(record, spec) if mc else record
    user = rec.turns("user")[0]
    n_img = user.count(IMAGE_PLACEHOLDER)
    return replace(
        rec,
        messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        images=list(rec.images[:n_img]),
    )


class ShotSampler:
    """Deterministic choice of k solved examples per query, from a pool without held-out records.

    The pool is what remains of the shot records after held-out tasks and
    clusters are removed, so an unseen task's examples come from the training
    tasks only. Per query, examples are drawn with a RNG seeded by (seed, task,
    query id): the same query always gets the same examples, whatever else is
    evaluated. Preference, relaxed only when fewer than k records qualify:
    same modality (image or text-only) and answer format (multiple choice or
    not) and having reference `answers`; then same modality and format; then
    any record. The query itself is never its own example.
    """

    def __init__(
        self,
        pool: Sequence[Record],
        spec: TaskSpec,
        *,
        holdout_tasks: Iterable[str] = (),
        holdout_clusters: Iterable[str] = (),
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.seed = seed
        tasks, clusters = set(holdout_tasks), set(holdout_clusters)
        kept = [r for r in pool if not is_heldout(r, tasks, clusters)]
        self.heldout_removed = len(pool) - len(kept)
        examples: dict[str, Record] = {}
        for r in kept:
            e = _example(r, spec)
            if e is not None:
                examples.setdefault(e.id, e)  # one example per id, even across several pool files
        self.examples = list(examples.values())
        self.unusable = len(kept) - len(self.examples)
        self._groups: dict[tuple[Any, ...], tuple[list[Record], set[str]]] = {}

    def _group(self, level: tuple[Any, ...]) -> tuple[list[Record], set[str]]:
        if level not in self._groups:
            name, img, mc = level
            group = [e for e in self.examples
                     if name == "any" or (bool(e.images) == img
                                          and (bool(e.choices) and self.spec.is_multiple_choice) == mc
                                          and (name != "strict" or bool(e.answers)))]
            self._groups[level] = (group, {e.id for e in group})
        return self._groups[level]

    def sample(self, query: Record, k: int) -> list[Record]:
        """k examples for `query` (raises TaskError when the pool cannot supply k)."""
        img, mc = bool(query.images), bool(query.choices) and self.spec.is_multiple_choice
        for level in (("strict", img, mc), ("format", img, mc), ("any", None, None)):
            group, ids = self._group(level)
            if len(group) - (query.id in ids) >= k:
                break
        else:
            raise TaskError(
                f"task {self.spec.name!r}: {k}-shot needs {k} solved examples but the shot pool has "
                f"{len(self.examples)} usable record(s) after removing held-out tasks"
                + (f" ({self.unusable} more had no usable answer or a duplicate id)" if self.unusable else "")
            )
        rng = random.Random(f"{self.seed}:{self.spec.name}:{query.id}")
        # Draw k + 1 so that the query can be dropped if drawn, leaving exactly k.
        drawn = rng.sample(group, min(len(group), k + 1))
        return [e for e in drawn if e.id != query.id][:k]


OCR_PREFIX = "\nReference OCR token: "


def _with_ocr(record: Record) -> Record:
    """The record whose first user turn ends with LLaVA's TextVQA OCR line (when it carries `meta.ocr_tokens`)."""
    tokens = record.meta.get("ocr_tokens")
    if not isinstance(tokens, list) or not tokens:
        return record
    msgs = [dict(m) for m in record.messages]
    for m in msgs:
        if m["role"] == "user":
            m["content"] = m["content"].rstrip() + OCR_PREFIX + ", ".join(str(t) for t in tokens)
            break
    return replace(record, messages=msgs)


def build_prompt(record: Record, spec: TaskSpec, mode: Mode, shots: Sequence[Record] = ()) -> Record:
    """The prompt record for one query: messages ending on the user turn the model answers.

    zero-shot: the query's turns up to its first assistant turn, choices listed
    (multiple choice), then the task's suffix. K-shot: `few_shot` with the
    same suffix after every example's question. cot: the suffix asks for
    step-by-step reasoning ending in "The answer is ...".
    """
    query = _with_choices(record, spec) if spec.is_multiple_choice else record
    if spec.ocr_tokens:
        query = _with_ocr(query)
        shots = [_with_ocr(s) for s in shots]
    if mode.cot:
        suffix = COT_MC_SUFFIX if spec.is_multiple_choice else COT_SUFFIX
    else:
        suffix = spec.instruction_suffix
    if mode.few_shot:
        if len(shots) != mode.k:
            raise TaskError(f"record {record.id!r}: {mode.name} needs {mode.k} examples, got {len(shots)}")
        return few_shot(query, list(shots), instruction_suffix=suffix)
    msgs = prompt_messages(query, instruction_suffix=suffix)
    n_img = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs)
    return replace(query, messages=msgs, images=list(query.images[:n_img]))


def extract_answer(output: str, mode: Mode, spec: TaskSpec) -> str:
    """The answer to score from a raw model output.

    Zero-/few-shot outputs are scored as they are. A cot output is cut at its
    last "The answer is" (case-insensitive): for multiple choice the cut keeps
    "The answer is X." for LLaVA's letter parser, otherwise the text after it
    loses its trailing period and quotes. No marker: the whole output is scored.
    """
    if not mode.cot:
        return output
    i = output.lower().rfind(ANSWER_MARKER)
    if i < 0:
        return output
    if spec.is_multiple_choice:
        return output[i:].strip()
    return output[i + len(ANSWER_MARKER):].strip().strip(":").strip().rstrip(".").strip().strip("\"'")
