"""The unified record: one schema for text-only and image+text instructions.

A record is one JSON object per line (JSONL):

    {"id": "alpaca-0", "messages": [{"role": "user", "content": "..."},
                                    {"role": "assistant", "content": "..."}],
     "images": [], "task": "alpaca", "meta": {"instruction": ..., "input": ..., "output": ...}}

Each `<image>` placeholder in the message contents stands for one entry of
`images`, in order. Everything downstream (selection, tokenization, shards,
training, evaluation) reads records through this module, so validation lives
here and its errors always name the file, the line, the record id and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtune.errors import MMTuneError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
# Speaker names other layouts use for the roles (mmtune.data.formats.ROLE_ALIASES maps them at import).
SPEAKER_ALIASES = frozenset({"human", "gpt", "chatgpt", "bard", "bing", "model"})
OPTIONAL_KEYS = ("source", "task", "answers", "choices", "meta")


class RecordError(MMTuneError, ValueError):
    """A record that does not fit the schema; `str()` is one line naming where and what."""

    def __init__(
        self,
        reason: str,
        *,
        record_id: str | None = None,
        field: str | None = None,
        path: str | None = None,
        line: int | None = None,
    ) -> None:
        self.reason = reason
        self.record_id = record_id
        self.field = field
        self.path = path
        self.line = line
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.path is not None:
            where.append(f"{self.path}" + (f":{self.line}" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.record_id is not None:
            where.append(f"record {self.record_id!r}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.reason}" if prefix else self.reason

    def located(self, path: str | None = None, line: int | None = None) -> RecordError:
        """The same error with file/line filled in where they were unknown."""
        return RecordError(
            self.reason,
            record_id=self.record_id,
            field=self.field,
            path=self.path if self.path is not None else path,
            line=self.line if self.line is not None else line,
        )


@dataclass
class Record:
    """One instruction example (text-only when `images` is empty)."""

    id: str
    messages: list[dict[str, str]]
    images: list[str] = field(default_factory=list)
    source: str | None = None
    task: str | None = None
    answers: list[str] | None = None
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- views
    @property
    def is_multimodal(self) -> bool:
        return bool(self.images)

    def turns(self, role: str) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == role]

    def user_text(self) -> str:
        """All user turns joined (the instruction side, as selection and parsing read it)."""
        return "\n".join(self.turns("user"))

    def assistant_text(self) -> str:
        """All assistant turns joined (the response side)."""
        return "\n".join(self.turns("assistant"))

    def instruction(self) -> str:
        """The first user turn without image placeholders (what verb-noun parsing reads)."""
        users = self.turns("user")
        text = users[0] if users else ""
        return text.replace(IMAGE_PLACEHOLDER, "").strip()

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "messages": self.messages, "images": self.images}
        for key in OPTIONAL_KEYS:
            value = getattr(self, key)
            if value is not None and not (key == "meta" and not value):
                out[key] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, obj: Any, *, line: int | None = None, path: str | None = None) -> Record:
        """Validate `obj` against the schema and build a Record (raises RecordError)."""
        return validate_record(obj, line=line, path=path)


def count_placeholders(messages: Iterable[dict[str, str]]) -> int:
    return sum(m.get("content", "").count(IMAGE_PLACEHOLDER) for m in messages)


def validate_record(obj: Any, *, line: int | None = None, path: str | None = None) -> Record:
    """Check every schema rule; the first violation raises a located RecordError."""

    def fail(reason: str, fld: str | None = None, rid: str | None = None) -> RecordError:
        return RecordError(reason, record_id=rid, field=fld, path=path, line=line)

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if rid is None:
        raise fail("missing required field", "id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        raise fail(f"must be a non-empty string, got {rid!r}", "id")

    messages = obj.get("messages")
    if messages is None:
        raise fail("missing required field", "messages", rid)
    if not isinstance(messages, list) or not messages:
        raise fail("must be a non-empty list of {role, content}", "messages", rid)
    clean: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        fld = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise fail(f"must be an object, got {type(msg).__name__}", fld, rid)
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            hint = (" (ShareGPT-style speaker names: `mmtune convert --format messages` maps them)"
                    if isinstance(role, str) and role.lower() in SPEAKER_ALIASES else "")
            raise fail(f"role must be one of {', '.join(ROLES)}, got {role!r}{hint}", f"{fld}.role", rid)
        if not isinstance(content, str):
            raise fail(f"content must be a string, got {type(content).__name__}", f"{fld}.content", rid)
        clean.append({"role": role, "content": content})
    roles = [m["role"] for m in clean]
    if "user" not in roles:
        raise fail("needs at least one user turn", "messages", rid)
    for i, m in enumerate(clean):
        if m["role"] == "assistant" and not m["content"].strip():
            raise fail("empty assistant turn", f"messages[{i}].content", rid)

    images = obj.get("images", [])
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
        raise fail("must be a list of non-empty path/URL strings", "images", rid)
    n_ph = count_placeholders(clean)
    if n_ph != len(images):
        raise fail(
            f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)", "images", rid
        )

    kwargs: dict[str, Any] = {}
    for key in ("source", "task"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f"must be a string, got {type(value).__name__}", key, rid)
        kwargs[key] = value
    for key in ("answers", "choices"):
        value = obj.get(key)
        if value is None:
            kwargs[key] = None
            continue
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise fail("must be a list of strings", key, rid)
        kwargs[key] = list(value)
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise fail(f"must be an object, got {type(meta).__name__}", "meta", rid)
    unknown = set(obj) - {"id", "messages", "images", *OPTIONAL_KEYS}
    if unknown:
        raise fail(f"unknown field(s) {sorted(unknown)} (put extras in 'meta')", sorted(unknown)[0], rid)
    return Record(id=rid, messages=clean, images=list(images), meta=dict(meta), **kwargs)


# --------------------------------------------------------------------------- #
# JSONL I/O
# --------------------------------------------------------------------------- #


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; a bad line yields a RecordError.

    Decoding is `mmtune.data.textio`'s (BOM skipped; a non-UTF-8 line or an
    unpaired surrogate is one bad line and the rest of the file goes on).
    """
    from mmtune.data.textio import iter_json_lines

    path = Path(path)
    for lineno, obj, reason, _ in iter_json_lines(path):
        yield lineno, (RecordError(reason, path=str(path), line=lineno) if reason else obj)


def read_records(path: str | Path, *, strict: bool = True) -> list[Record]:
    """Load a JSONL file of unified records.

    strict=True raises the first RecordError (with file and line); strict=False
    skips bad lines, which callers must count via `read_records_with_errors`.
    """
    records, errors = read_records_with_errors(path)
    if errors and strict:
        raise errors[0]
    return records


def read_records_with_errors(path: str | Path) -> tuple[list[Record], list[RecordError]]:
    """Load a JSONL file of unified records, returning the good ones and every error."""
    records: list[Record] = []
    errors: list[RecordError] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, RecordError):
            errors.append(obj)
            continue
        try:
            rec = validate_record(obj, line=lineno, path=str(path))
        except RecordError as exc:
            errors.append(exc)
            continue
        if rec.id in seen:
            errors.append(
                RecordError(
                    f"duplicate id (first on line {seen[rec.id]})",
                    record_id=rec.id, field="id", path=str(path), line=lineno,
                )
            )
            continue
        seen[rec.id] = lineno
        records.append(rec)
    return records, errors


def write_records(records: Iterable[Record], path: str | Path) -> int:
    """Write records as JSONL (atomically: temp file then rename; nothing left behind on error); returns the count."""
    from mmtune.fileio import atomic_text

    n = 0
    with atomic_text(path) as fh:
        for rec in records:
            fh.write(rec.to_json() + "\n")
            n += 1
    return n


class RejectsWriter:
    """Collects rejected inputs with their location and one-line reason.

    Every input either becomes a record or a line here; nothing is dropped
    silently. The file is written to a temporary name and renamed on a clean
    `close()`; an existing file at `path` is left alone until then (and, when
    this run rejected nothing, removed then, so a stale list cannot mislead).
    A failed run leaves the previous file as it was and no temporary file.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.count = 0
        self.first_reason: str | None = None
        self._fh: Any = None
        self._writing: Any = None  # the open `atomic_text` of `path`, from the first reject on
        self._closed = False

    def add(self, reason: str, *, source: str | None = None, index: int | None = None, raw: Any = None) -> None:
        self.count += 1
        if self.first_reason is None:
            self.first_reason = reason
        if self.path is None:
            return
        if self._fh is None:
            from mmtune.fileio import atomic_text

            self._writing = atomic_text(self.path)
            self._fh = self._writing.__enter__()
        entry = {"source": source, "index": index, "reason": reason, "raw": raw}
        self._fh.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")

    def add_error(self, err: RecordError, raw: Any = None) -> None:
        self.add(err.describe(), source=err.path, index=err.line, raw=raw)

    def close(self, *, ok: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._fh = None
        writing, self._writing = self._writing, None
        if writing is not None:  # rename on a clean close; otherwise the temporary file goes
            failed = None if ok else MMTuneError("rejects of a failed run")
            writing.__exit__(type(failed) if failed else None, failed, None)
        elif ok and self.path is not None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RejectsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(ok=exc_type is None)
