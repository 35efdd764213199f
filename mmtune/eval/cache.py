"""The eval answer cache: raw outputs by (model, task, record, prompt, settings), in `OUT/cache.jsonl`.

Contract. `cache_key(fingerprint, task, record_id, prompt, images, settings)`
is a sha256 over the model fingerprint, task name, record id, the rendered
prompt text with its image paths, and the generation settings that change an
output (`cache_settings`: `max_new_tokens`, `do_sample`, the dtype, and
temperature / top_p / seed only when sampling), so a rerun generates only what
is new. `PredictionCache` is an append-only JSONL journal: appended and
fsynced after every generated group, so a crashed run keeps what it had
generated; a torn or unreadable line is ignored and counted in `bad_lines`.
Keys must stay stable across versions: a changed key silently regenerates
every cached answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmtune.eval.generate import DecodeSettings

CACHE_FILE = "cache.jsonl"


def cache_settings(decode: DecodeSettings, dtype: str) -> dict[str, Any]:
    """The generation settings that enter the cache key (batch size does not change an answer)."""
    s: dict[str, Any] = {"max_new_tokens": decode.max_new_tokens, "do_sample": decode.do_sample, "dtype": dtype}
    if decode.do_sample:
        s.update(temperature=decode.temperature, top_p=decode.top_p, seed=decode.seed)
    return s


def cache_key(fingerprint: str, task: str, record_id: str, prompt: str, images: Sequence[str],
              settings: dict[str, Any]) -> str:
    prompt_hash = hashlib.sha256("\0".join([prompt, *images]).encode()).hexdigest()
    blob = json.dumps([fingerprint, task, record_id, prompt_hash, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class PredictionCache:
    """Raw outputs by cache key, in an append-only JSONL journal.

    Appended after every generated group, so a crashed run keeps what it had
    generated; a torn last line (from a crash mid-write) is ignored and counted.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        self.bad_lines = 0
        if path.is_file():
            from mmtune.data.textio import iter_json_lines

            for _, obj, reason, _ in iter_json_lines(path):
                try:
                    if reason is not None:
                        raise TypeError(reason)
                    self.entries[obj["key"]] = obj["output"]
                except (KeyError, TypeError):
                    self.bad_lines += 1

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def add(self, new: dict[str, str]) -> None:
        # An append-only journal, not a whole-file rewrite: fileio's atomic writers replace a file,
        # which would cost O(cache) per group and lose the crash-keeps-what-it-had property.
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8", errors="backslashreplace") as fh:
            for key, output in new.items():
                fh.write(json.dumps({"key": key, "output": output}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.entries.update(new)
