"""Importers: the instruction and VQA layouts people actually publish, mapped onto `Record`.

Reading happens in two steps so that a bad row never takes the file down with it:

1. `read_input` parses a file into `Row`s (JSONL lines, JSON array elements)
   or, for the official VQA / GQA files, one top-level JSON object. Only a
   file that is not JSON/JSONL at all raises (`FormatError`, one line); a bad
   JSONL line becomes a `Row` carrying its error.
2. A registered format's `map_row` turns one row into an unvalidated unified
   dict, raising `RowError` (reason + field) for rows it cannot map.
   `mmtune.data.convert` then validates, resolves images and de-duplicates ids.

Formats (registered in `FORMATS`, prismatic-style: a new layout is one
`Format` subclass and the `@register` decorator). A format maps one row
(`map_row`); a layout published as one top-level JSON object says how to
recognise it (`claims`) and how to cut it into rows (`rows`); a release split
over several files joins them itself (`pair`: VQA's questions + annotations),
so `mmtune.data.convert` knows no layout by name:

- `alpaca`    {instruction, input, output} (+ optional system, history, images)
- `dolly`     {instruction, context, response, category}
- `sharegpt`  {conversations: [{from, value}], system?}
- `llava`     ShareGPT plus `image` (str or list), `<image>` in the first human turn
- `messages`  {messages: [{role, content}], images: [...]} (LLaMA-Factory mllm_demo)
- `vqa`       official VQA v1/v2 questions + annotations JSON pair
- `gqa`       official GQA questions JSON ({question_id: {...}})
- `unified`   mmtune's own JSONL, validated as is
"""

from __future__ import annotations

import itertools
import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from mmtune.data.schema import IMAGE_PLACEHOLDER, OPTIONAL_KEYS
from mmtune.data.templates import alpaca_user
from mmtune.data.textio import (
    lone_surrogate,
    parse_json,
    printable,
    read_text,
    undecodable,
)
from mmtune.errors import MMTuneError

UNIFIED_KEYS = frozenset({"id", "messages", "images", *OPTIONAL_KEYS})

# Speaker names seen in ShareGPT-style dumps and LLaMA-Factory/OpenAI-style messages.
ROLE_ALIASES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


class FormatError(MMTuneError):
    """A whole input file that cannot be read as the expected layout (one line)."""


class RowError(Exception):
    """One input row that cannot be mapped; the converter turns it into a located reject."""

    def __init__(self, reason: str, field: str | None = None, record_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.record_id = record_id  # when the row's id lives somewhere a generic reader can't see


# --------------------------------------------------------------------------- #
# Reading files
# --------------------------------------------------------------------------- #


@dataclass
class Row:
    """One input record before mapping, with where it came from."""

    source: str  # the input file, as the user named it
    index: int | str  # JSONL: 1-based line; JSON array: 0-based element; GQA: question id
    location: str  # "file.jsonl:12" or "file.json[3]": the prefix of every reject reason
    position: int  # 0-based order in its file, for default ids ("{stem}-{position}")
    data: Any = None  # the parsed JSON value (for a bad JSONL line: the line's text)
    error: str | None = None  # set when the line is not JSON


@dataclass
class InputFile:
    """A parsed input file: a list of rows, or one top-level object (VQA / GQA)."""

    path: Path
    layout: str  # "jsonl" | "array" | "object"
    rows: list[Row] = field(default_factory=list)
    top: dict[str, Any] | None = None

    @property
    def stem(self) -> str:
        name = self.path.name
        for suffix in (".jsonl", ".json", ".parquet", ".arrow"):
            name = name.removesuffix(suffix)
        return name


def read_input(path: str | Path) -> InputFile:
    """Parse a JSON array, a JSONL file, or a top-level JSON object (VQA / GQA).

    Raises FormatError only when the file as a whole is not JSON or JSONL;
    individual bad JSONL lines become rows with `error` set.
    """
    path = Path(path)
    name = str(path)
    try:
        text = read_text(path)  # BOM dropped; bad bytes kept, so one bad line never refuses the file
    except OSError as exc:
        raise FormatError(f"{name}: cannot read ({exc.strerror or exc})") from None
    stripped = text.lstrip()
    if not stripped:
        return InputFile(path, "jsonl")
    try:
        whole: Any = json.loads(text)
        whole_error: json.JSONDecodeError | None = None
    except json.JSONDecodeError as exc:
        whole, whole_error = None, exc
    except RecursionError:
        raise FormatError(f"{name}: JSON nested too deeply") from None

    if whole_error is None:
        bad = undecodable(text) is not None
        if isinstance(whole, list):
            rows = [
                _checked(Row(name, i, f"{name}[{i}]", i, data=item), bad) for i, item in enumerate(whole)
            ]
            return InputFile(path, "array", rows=rows)
        if isinstance(whole, dict):
            if _is_container(whole):
                return InputFile(path, "object", top=whole)
            line = text[: len(text) - len(stripped)].count("\n") + 1
            return InputFile(path, "jsonl", rows=[_checked(Row(name, line, f"{name}:{line}", 0, data=whole), bad)])
        raise FormatError(
            f"{name}: top-level JSON value is {type_name(whole)}; expected an array, an object or JSONL"
        )
    if stripped[0] == "[" and not _parses(stripped.split("\n", 1)[0]):
        # A broken JSON array (a JSONL file whose first row is a list still parses line by line).
        raise FormatError(f"{name}: not valid JSON ({_json_error(whole_error)})")
    return _read_jsonl(path, text, whole_error)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _read_jsonl(path: Path, text: str, whole_error: json.JSONDecodeError) -> InputFile:
    name = str(path)
    rows: list[Row] = []
    parsed = 0
    first_ok: bool | None = None
    # split("\n"), not splitlines(): U+2028 and friends may sit unescaped inside JSON strings.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        raw = raw.rstrip("\r")
        if not raw.strip():
            continue
        row = Row(name, lineno, f"{name}:{lineno}", len(rows))
        value, reason = parse_json(raw)  # bad bytes and lone surrogates are bad rows too
        if reason is None:
            row.data = value
        else:
            row.data, row.error = printable(raw), reason
        if reason is None or reason.startswith("unpaired surrogate"):
            parsed += 1
        if first_ok is None:
            first_ok = row.error is None
        rows.append(row)
    # A broken pretty-printed JSON document fails on its first line and on most others;
    # reporting each of its lines as a bad record would only hide the real problem.
    if parsed == 0 or (not first_ok and parsed * 2 < len(rows)):
        if undecodable(text):
            raise FormatError(f"{name}: not a UTF-8 text file (expected JSON or JSONL)")
        raise FormatError(f"{name}: not valid JSON or JSONL ({_json_error(whole_error)})")
    return InputFile(path, "jsonl", rows=rows)


def _checked(row: Row, bad_bytes: bool) -> Row:
    """A JSON-array element holding a bad byte or an unpaired surrogate becomes a bad row."""
    found = lone_surrogate(row.data, bad_bytes=bad_bytes)
    if found:
        row.data, row.error = printable(json.dumps(row.data, ensure_ascii=False)), found
    return row


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"


def type_name(value: Any) -> str:
    """'an object', 'a list', 'a string', ... for one-line messages about JSON values."""
    return {
        dict: "an object", list: "a list", str: "a string", bool: "a boolean",
        int: "a number", float: "a number", type(None): "null",
    }.get(type(value), type(value).__name__)


def _is_container(top: dict[str, Any]) -> bool:
    return container_format(top) is not None


def container_format(top: dict[str, Any]) -> str | None:
    """The registered whole-file layout (VQA, GQA) a top-level JSON object has, or None."""
    return next((f.name for f in FORMATS.values() if f.container and f.claims(top)), None)


def vqa_role(top: dict[str, Any]) -> str | None:
    """"questions" or "annotations" for the two halves of an official VQA release, else None."""
    if isinstance(top.get("questions"), list):
        return "questions"
    if isinstance(top.get("annotations"), list):
        return "annotations"
    return None


def _is_gqa(top: dict[str, Any]) -> bool:
    values = [v for _, v in zip(range(5), top.values())]
    return bool(values) and all(isinstance(v, dict) and "question" in v and "imageId" in v for v in values)


# --------------------------------------------------------------------------- #
# Detection
# --------------------------------------------------------------------------- #


def classify_row(row: dict[str, Any]) -> str | None:
    """The row format a single JSON object looks like, or None."""
    keys = set(row)
    if "conversations" in keys:
        return "llava" if keys & {"image", "images"} else "sharegpt"
    if "messages" in keys:
        return "unified" if "id" in keys and keys <= UNIFIED_KEYS else "messages"
    if "instruction" in keys:
        if "output" in keys:
            return "alpaca"
        if keys & {"response", "context"}:
            return "dolly"
    return None


def detect_format(inp: InputFile, sample_size: int = 50) -> str:
    """Guess a file's format from its top-level keys or the keys of its first records.

    Rows vote (the first `sample_size` objects); a file where any row carries an
    image in ShareGPT layout is `llava`. Raises FormatError when nothing matches.
    """
    if inp.layout == "object":
        assert inp.top is not None
        found = container_format(inp.top)
        assert found is not None  # read_input makes an "object" input only of a claimed layout
        return found
    # islice: table inputs (mmtune.data.tables) read their rows lazily; only the head is needed
    sample = list(itertools.islice((r.data for r in inp.rows if isinstance(r.data, dict)), sample_size))
    if not sample:
        raise FormatError(f"{inp.path}: cannot detect the format: no JSON objects among its records")
    votes = Counter(c for c in map(classify_row, sample) if c is not None)
    if not votes:
        keys = sorted(sample[0])[:8]
        raise FormatError(
            f"{inp.path}: cannot detect the format from keys {keys}; pass --format "
            f"({'|'.join(FORMATS)})"
        )
    if votes["llava"] and votes["sharegpt"]:
        return "llava"
    return votes.most_common(1)[0][0]


# --------------------------------------------------------------------------- #
# Field helpers
# --------------------------------------------------------------------------- #


def _str(row: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError("missing required field", key)
        return None
    if not isinstance(value, str):
        raise RowError(f"must be a string, got {type_name(value)}", key)
    return value


def row_id(row: dict[str, Any], key: str = "id") -> str | None:
    """A row's own id as a string (ints are accepted), or None when it has none."""
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(f"must be a string or an integer, got {type_name(value)}", key)
    text = str(value)
    if not text:
        raise RowError("must not be empty", key)
    return text


def _images(row: dict[str, Any]) -> list[Any]:
    """`images` (LLaMA-Factory) or `image` (LLaVA), as a list; validation checks the items."""
    if "images" in row and "image" in row:
        raise RowError("has both 'image' and 'images'; keep one", "image")
    key = "images" if "images" in row else "image"
    value = row.get(key)
    if value is None:
        return []
    if isinstance(value, str) or _is_image_struct(value):
        return [value]
    if isinstance(value, list):
        return value
    raise RowError(f"must be a path string or a list of them, got {type_name(value)}", key)


def _is_image_struct(value: Any) -> bool:
    """A `datasets` Image value {"bytes", "path"} (parquet / arrow inputs); convert writes its bytes out."""
    return isinstance(value, dict) and "bytes" in value and set(value) <= {"bytes", "path"}


def _content(value: Any, fld: str) -> str:
    """A turn's text: a string, or a list of parts ({"type": "text", "text"} / {"type": "image"}, the
    layout TRL's and Hugging Face's chat templates use), joined with `<image>` where each image part is."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RowError(f"must be a string, got {type_name(value)}", fld)
    pieces = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image":
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise RowError("must be {type: text, text: ...} or {type: image}", f"{fld}[{i}]")
    return "\n".join(p for p in pieces if p)


def _extras(row: dict[str, Any], used: Iterable[str]) -> dict[str, Any]:
    """Keys no mapping consumed: kept in `meta` so nothing in the input is lost."""
    used = set(used)
    return {k: v for k, v in row.items() if k not in used}


def _role(value: Any, fld: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"must be a string, got {type_name(value)}", fld)
    role = ROLE_ALIASES.get(value.strip().lower())
    if role is None:
        raise RowError(f"unsupported speaker {value!r} (expected one of {', '.join(ROLE_ALIASES)})", fld)
    return role


def _system(row: dict[str, Any]) -> list[dict[str, str]]:
    system = _str(row, "system", required=False)
    return [{"role": "system", "content": system}] if system else []


def _turns(row: dict[str, Any], key: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    turns = row.get(key)
    if turns is None:
        raise RowError("missing required field", key)
    if not isinstance(turns, list) or not turns:
        raise RowError("must be a non-empty list of turns", key)
    out = []
    for i, turn in enumerate(turns):
        fld = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"must be an object, got {type_name(turn)}", fld)
        if role_key not in turn:
            raise RowError("missing required field", f"{fld}.{role_key}")
        role = _role(turn[role_key], f"{fld}.{role_key}")
        content = turn.get(content_key)
        if content is None:
            raise RowError("missing required field", f"{fld}.{content_key}")
        content = _content(content, f"{fld}.{content_key}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("no assistant turn", key)
    return out


# --------------------------------------------------------------------------- #
# The registry
# --------------------------------------------------------------------------- #


@dataclass
class Paired:
    """What a format makes of every input file given in it (`Format.pair`)."""

    rows: dict[str, Iterable[Row]]  # input path -> rows to convert; a file joined into another has no entry
    leftovers: list[Row] = field(default_factory=list)  # rows of joined files that matched nothing (`error` says why)


class Format(ABC):
    """An input layout: how its files become rows, and how one row becomes a unified record dict.

    Subclasses are registered with `@register(name, description)` and
    implement `map_row`; one read from a top-level JSON object sets
    `container` and implements `claims` and `rows`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    container: ClassVar[bool] = False  # rows come from one top-level JSON object (VQA, GQA)
    assigns_ids: ClassVar[bool] = True  # a row without an id gets "{file}-{row}"; False: its own id is required

    @abstractmethod
    def map_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """One row as an unvalidated unified dict; raises `RowError` (reason + field) for a row it cannot map."""

    def claims(self, top: dict[str, Any]) -> bool:
        """Whether a top-level JSON object has this (container) layout; used to detect it."""
        return False

    def rows(self, inp: InputFile) -> Iterable[Row]:
        """The rows of one input file (a container format cuts its top-level object into rows)."""
        return inp.rows

    def check(self, inp: InputFile) -> None:
        """Raise `FormatError` when `--format NAME` was given for a file of another layout."""
        if self.container and inp.layout != "object":
            raise FormatError(f"{inp.path}: --format {self.name} expects the official {self.name.upper()} JSON object, "
                              f"found {inp.layout} rows")
        if not self.container and inp.layout == "object":
            keys = sorted(inp.top or {})[:6]
            raise FormatError(f"{inp.path}: --format {self.name} expects a JSON array or JSONL of rows, "
                              f"found one JSON object with keys {keys}")
        problem = self.mismatch(inp.top) if self.container and inp.top is not None else None
        if problem:
            raise FormatError(f"{inp.path}: {problem}")

    def mismatch(self, top: dict[str, Any]) -> str | None:
        """Why a top-level JSON object given with `--format NAME` is another layout (None: it is this one)."""
        return None

    def pair(self, inputs: Sequence[InputFile]) -> Paired:
        """The rows of all the input files given in this format, in order; a layout published as
        several files (questions + annotations) joins them here, or raises `MMTuneError` when one is missing."""
        return Paired({str(inp.path): self.rows(inp) for inp in inputs})


FORMATS: dict[str, Format] = {}

F = TypeVar("F", bound=type[Format])


def register(name: str, description: str) -> Callable[[F], F]:
    """Class decorator: add a `Format` subclass to `FORMATS` under `name` (the value of `--format`)."""

    def deco(cls: F) -> F:
        cls.name, cls.description = name, description
        FORMATS[name] = cls()
        return cls

    return deco


def _history(row: dict[str, Any]) -> list[dict[str, str]]:
    """LLaMA-Factory's Alpaca `history`: [[user, assistant], ...] before the instruction."""
    history = row.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise RowError(f"must be a list of [user, assistant] pairs, got {type_name(history)}", "history")
    out = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowError("must be a [user, assistant] pair of strings", f"history[{i}]")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _instruction_record(
    row: dict[str, Any], instruction_key: str, input_key: str, output_key: str
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    instruction = _str(row, instruction_key)
    assert instruction is not None
    if not instruction.strip():
        raise RowError("empty instruction", instruction_key)
    inp = _str(row, input_key, required=False) or ""
    output = _str(row, output_key)
    assert output is not None
    messages = [
        *_system(row),
        *_history(row),
        {"role": "user", "content": alpaca_user(instruction, inp)},
        {"role": "assistant", "content": output},
    ]
    return messages, {"instruction": instruction, "input": inp, "output": output}


@register("alpaca", "Alpaca rows {instruction, input, output} (+ system, history, images)")
class Alpaca(Format):
    input_key, output_key = "input", "output"

    def map_row(self, row: dict[str, Any]) -> dict[str, Any]:
        messages, meta = _instruction_record(row, "instruction", self.input_key, self.output_key)
        own = self.own_fields(row)
        used = ("id", "instruction", self.input_key, self.output_key, "system", "history", "images", "image")
        return {
            "id": row_id(row),
            "messages": messages,
            "images": _images(row),
            **own,
            "meta": {**meta, **_extras(row, used)},
        }

    def own_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        """Record fields this layout fills besides messages, images and meta."""
        return {}


@register("dolly", "Dolly rows {instruction, context, response, category}")
class Dolly(Alpaca):
    # meta uses Alpaca's names (input = context, output = response) so the alpaca
    # template renders Dolly rows exactly like Alpaca ones.
    input_key, output_key = "context", "response"

    def own_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"task": _str(row, "category", required=False) or None}


@register("sharegpt", "ShareGPT {conversations: [{from: human|gpt|system, value}]}")
class ShareGPT(Format):
    turns_key, role_key, content_key = "conversations", "from", "value"

    def map_row(self, row: dict[str, Any]) -> dict[str, Any]:
        messages = [*_system(row), *_turns(row, self.turns_key, self.role_key, self.content_key)]
        used = ("id", self.turns_key, "system", "images", "image")
        return {"id": row_id(row), "messages": messages, "images": _images(row), "meta": _extras(row, used)}


@register("llava", "LLaVA: ShareGPT plus image (path or list), <image> in the first human turn")
class LLaVA(ShareGPT):
    """ShareGPT rows with images; the same mapping, its own name for detection and --format."""


@register("messages", "{messages: [{role, content}], images: [...]} (LLaMA-Factory mllm_demo)")
class Messages(ShareGPT):
    turns_key, role_key, content_key = "messages", "role", "content"


@register("unified", "mmtune's own JSONL records, validated as they are")
class Unified(Format):
    assigns_ids = False

    def map_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return dict(row)


# --------------------------------------------------------------------------- #
# VQA and GQA: whole-file JSON objects
# --------------------------------------------------------------------------- #

# Set by map_vqa / map_gqa: subfolders of the image root where their images may also
# live (COCO's val2014/, GQA's images/); convert pops it before validation.
IMAGE_DIRS_KEY = "_image_dirs"


def vqa_image_name(subtype: str, image_id: int) -> str:
    """The COCO file name of a VQA image: COCO_val2014_000000262148.jpg."""
    # test-dev questions are a subset of the test2015 images.
    folder = "test2015" if subtype.startswith("test-dev") else subtype
    return f"COCO_{folder}_{image_id:012d}.jpg"


def _vqa_task(top: dict[str, Any]) -> str:
    version = str((top.get("info") or {}).get("version", "")) if isinstance(top.get("info"), dict) else ""
    return {"2": "vqav2", "1": "vqav1"}.get(version[:1], "vqa")


@dataclass
class VQAAnnotations:
    """Every annotation of the VQA annotation files among the inputs, by question id."""

    by_qid: dict[int, tuple[dict[str, Any], Row]] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)
    bad: list[Row] = field(default_factory=list)  # annotations that cannot be indexed

    def add_file(self, inp: InputFile) -> None:
        assert inp.top is not None
        name = str(inp.path)
        for i, ann in enumerate(inp.top["annotations"]):
            row = Row(name, i, f"{name}[annotations][{i}]", i, data=ann)
            qid = ann.get("question_id") if isinstance(ann, dict) else None
            if not isinstance(ann, dict):
                row.error = f"expected a JSON object, got {type_name(ann)}"
            elif not isinstance(qid, int) or isinstance(qid, bool):
                row.error = "field 'question_id': missing or not an integer"
            elif qid in self.by_qid:
                row.error = f"field 'question_id': duplicate annotation for question {qid}"
            if row.error:
                self.bad.append(row)
                continue
            self.by_qid[qid] = (ann, row)

    def orphans(self) -> list[Row]:
        """Annotations whose question was in none of the question files (plus unusable ones)."""
        out = list(self.bad)
        for qid, (_, row) in self.by_qid.items():
            if qid not in self.used:
                row.error = f"annotation for question_id {qid} matches no question in the input question files"
                out.append(row)
        return out


def vqa_rows(inp: InputFile, annotations: VQAAnnotations) -> list[Row]:
    """One row per question, each joined with its annotation (None when it has none)."""
    assert inp.top is not None
    name = str(inp.path)
    subtype = inp.top.get("data_subtype")
    task = _vqa_task(inp.top)
    rows = []
    for i, q in enumerate(inp.top["questions"]):
        row = Row(name, i, f"{name}[questions][{i}]", i, data=q)
        if isinstance(q, dict):
            qid = q.get("question_id")
            ann = annotations.by_qid.get(qid)[0] if isinstance(qid, int) and qid in annotations.by_qid else None
            if ann is not None:
                annotations.used.add(qid)  # type: ignore[arg-type]
            row.data = {"question": q, "annotation": ann, "data_subtype": subtype, "task": task}
        rows.append(row)
    return rows


@register("vqa", "official VQA v1/v2 questions + annotations JSON (pass both files)")
class VQA(Format):
    """Official VQA v1/v2: a questions file and an annotations file, joined by question id."""

    container = True

    def claims(self, top: dict[str, Any]) -> bool:
        return vqa_role(top) is not None

    def mismatch(self, top: dict[str, Any]) -> str | None:
        if vqa_role(top) is None:
            return "--format vqa expects a VQA questions or annotations file (top-level 'questions' or 'annotations' list)"
        return None

    def pair(self, inputs: Sequence[InputFile]) -> Paired:
        """Each questions file's rows, joined with the annotations of all annotation files; annotations
        that match no question (or cannot be indexed) come back as leftovers."""
        annotations = VQAAnnotations()
        questions = []
        for inp in inputs:
            assert inp.top is not None
            if vqa_role(inp.top) == "annotations":
                annotations.add_file(inp)
            else:
                questions.append(inp)
        if (annotations.by_qid or annotations.bad) and not questions:
            raise MMTuneError("VQA annotations given without their questions file; pass both, e.g. "
                              "mmtune convert questions.json annotations.json --out vqa.jsonl")
        for inp in questions:
            if not (annotations.by_qid or annotations.bad):
                raise MMTuneError(f"{inp.path}: VQA questions file needs its annotations file among the inputs "
                                  f"(e.g. mmtune convert {inp.path} annotations.json --out vqa.jsonl)")
        rows = {str(inp.path): vqa_rows(inp, annotations) for inp in questions}
        return Paired(rows, annotations.orphans())

    def map_row(self, row: dict[str, Any]) -> dict[str, Any]:
        qid = row["question"].get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise RowError("missing or not an integer", "question_id")
        try:
            return _map_vqa(row, qid)
        except RowError as exc:
            exc.record_id = str(qid)
            raise


def _map_vqa(row: dict[str, Any], qid: int) -> dict[str, Any]:
    q, ann, subtype = row["question"], row["annotation"], row["data_subtype"]
    question = _str(q, "question")
    assert question is not None
    image_id = q.get("image_id")
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise RowError("missing or not an integer", "image_id")
    if not isinstance(subtype, str) or not subtype:
        raise RowError("the questions file has no 'data_subtype' (e.g. val2014) to name its images", "data_subtype")
    if ann is None:
        raise RowError(f"no annotation for question_id {qid} in the input annotation files", "annotation")
    raw_answers = ann.get("answers")
    if not isinstance(raw_answers, list) or not raw_answers:
        raise RowError("annotation must have a non-empty list of answers", "answers")
    answers = []
    for i, a in enumerate(raw_answers):
        if not (isinstance(a, dict) and isinstance(a.get("answer"), str)):
            raise RowError("must be an object with a string 'answer'", f"answers[{i}]")
        answers.append(a["answer"])
    answer = _str(ann, "multiple_choice_answer", required=False)
    if answer is None:
        # Trimmed releases (e.g. allennlp's fixtures) drop it; VQA defines it as the
        # most frequent human answer (ties: the first given).
        answer = Counter(answers).most_common(1)[0][0]
        derived = True
    else:
        derived = False
    choices = q.get("multiple_choices")  # VQA v1 multiple-choice task
    out: dict[str, Any] = {
        "id": str(qid),
        "messages": [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
            {"role": "assistant", "content": answer},
        ],
        "images": [vqa_image_name(subtype, image_id)],
        "source": row["task"],
        "task": row["task"],
        "answers": answers,
        "meta": {
            "question_id": qid,
            "image_id": image_id,
            "question_type": ann.get("question_type"),
            "answer_type": ann.get("answer_type"),
            "split": subtype,
            **({"answer_from": "most common of answers"} if derived else {}),
        },
        IMAGE_DIRS_KEY: [subtype.replace("test-dev", "test")],
    }
    if choices is not None:
        out["choices"] = choices
    return out


def gqa_rows(inp: InputFile) -> list[Row]:
    """One row per GQA question ({question_id: {...}}), the id folded into the row."""
    assert inp.top is not None
    name = str(inp.path)
    rows = []
    for i, (qid, q) in enumerate(inp.top.items()):
        row = Row(name, qid, f"{name}[{qid}]", i, data=q)
        if isinstance(q, dict):
            row.data = {"question_id": qid, **q}
        rows.append(row)
    return rows


@register("gqa", "official GQA questions JSON {question_id: {question, imageId, answer, ...}}")
class GQA(Format):
    container = True

    def rows(self, inp: InputFile) -> list[Row]:
        return gqa_rows(inp)

    def claims(self, top: dict[str, Any]) -> bool:
        return _is_gqa(top)

    def mismatch(self, top: dict[str, Any]) -> str | None:
        role = vqa_role(top)
        return f"--format gqa given, but this is a VQA {role} file" if role else None

    def map_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """One GQA question (its id folded in by `gqa_rows`) as a unified dict."""
        question = _str(row, "question")
        answer = _str(row, "answer")
        image_id = row_id(row, "imageId")
        if image_id is None:
            raise RowError("missing required field", "imageId")
        assert question is not None and answer is not None
        return {
            "id": str(row["question_id"]),
            "messages": [
                {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
                {"role": "assistant", "content": answer},
            ],
            "images": [f"{image_id}.jpg"],
            "source": "gqa",
            "task": "gqa",
            "answers": [answer],
            "meta": _extras(row, ("question", "answer")),
            IMAGE_DIRS_KEY: ["images"],
        }
