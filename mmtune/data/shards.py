"""`mmtune shard`: unified records (and their image files) as webdataset tar shards.

Layout (plain webdataset conventions, so `webdataset.WebDataset` reads it
without mmtune):

    DIR/shard-000000.tar   one sample per record, keyed by a sanitised record id:
                             KEY.json    the record (`Record.to_json()`, image paths as given)
                             KEY.0.jpg   the first image's original bytes, original extension
                             KEY.1.png   ...
    DIR/index.json         per-shard sample counts, so a reader can tell how
                           many samples a truncated or corrupt shard lost
    DIR/rejects.jsonl      records that could not be written (missing image, ...)

Reading: `expand_shards` turns a source (a shard file, a brace pattern
`shard-{000000..000009}.tar`, a glob, a shard folder, a `pipe:` command or a URL)
into shard URLs; `read_shard` reads one shard with webdataset's tar iterator
and an error handler that records (instead of raising) what went wrong, then
compares the samples it got with the index (with `lazy=True`, for a local
.tar, it reads only the tar headers and gives `LazyShardSample`s whose bytes
are read on `load()`: the training stream's workers read their own samples
only); `stream_samples` is the
shuffling, node/worker-splitting reader; `iter_records` gives the records back
(optionally extracting their images), which makes records -> shards -> records
lossless, images byte for byte.

img2dataset's webdataset output (`NNNNN.tar` with `KEY.jpg` + `KEY.txt` /
`KEY.json` "caption", `NNNNN_stats.json` beside it) is read too: each such
sample comes out as a caption record (user "<image>", assistant the caption),
which the `plain` template renders as LLaVA's stage 1 trains it; a folder of
such tars (no index.json) is a shard source, and the stats file gives the
expected sample count.

Parquet / arrow / `datasets` folders given to `mmtune shard` are read as
`mmtune convert` reads them (`iter_table_records`); their embedded image bytes
become the tar members unchanged.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from mmtune.data.convert import TableItem, default_id_prefixes, iter_table_records
from mmtune.data.images import check_image, is_url, resolve_image_path
from mmtune.data.schema import IMAGE_PLACEHOLDER, Record, RecordError, RejectsWriter, iter_jsonl, validate_record
from mmtune.data.tables import bytes_extension, is_table_source, printable
from mmtune.errors import MMTuneError
from mmtune.fileio import write_bytes_atomic, write_json_atomic
from mmtune.outputs import Out, check_outputs

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
INDEX_NAME = "index.json"
STAGE_PREFIX = ".tmp-shards-"  # the new set is written here, then swapped in
INDEX_FORMAT = "mmtune-shards/1"
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_IMAGE_MEMBER = re.compile(r"(\d+)\.([a-z0-9]+)")
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}


# --------------------------------------------------------------------------- #
# Keys and sizes
# --------------------------------------------------------------------------- #


def shard_key(record_id: str, taken: set[str]) -> str:
    """A tar-safe, unique sample key derived from a record id (adds it to `taken`).

    Webdataset splits member names at the first dot and skips `__meta__` names,
    so keys keep only [A-Za-z0-9_-], never start with `_`, and stay short enough
    for ustar names. An id that had to be changed gets a hash of the original
    appended, so two ids that sanitise alike still get different keys.
    """
    base = _KEY_UNSAFE.sub("_", record_id).strip("_")[:64] or "record"
    key = base
    if base != record_id or key in taken:
        key = f"{base}-{hashlib.sha1(record_id.encode('utf-8')).hexdigest()[:10]}"
    n = 1
    while key in taken:  # only a hash collision or a repeated id gets here
        n += 1
        key = f"{base}-{n}"
    taken.add(key)
    return key


def parse_size(text: str | float) -> int:
    """`1000000`, `500K`, `200MB`, `1.5G` -> bytes (powers of 1000, like shard sizes usually are)."""
    if isinstance(text, int | float):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise MMTuneError(f"--max-size {text!r}: expected bytes like 500000000, 500MB or 1G")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    return int(float(m.group(1)) * scale)


def image_extension(path: str) -> str:
    """The image's own file extension, lower-cased; from its decoded format when it has none."""
    ext = Path(path).suffix.lower().lstrip(".")
    if re.fullmatch(r"[a-z0-9]{1,5}", ext):
        return ext
    with Image.open(path) as img:
        fmt = img.format or ""
    return _PIL_EXT.get(fmt, re.sub(r"[^a-z0-9]", "", fmt.lower())[:5] or "img")


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


@dataclass
class ShardWriteSummary:
    """What `write_shards` produced; `records + rejects` is every input line."""

    out_dir: Path
    shards: list[tuple[str, int, int]] = field(default_factory=list)  # (file name, samples, bytes)
    records: int = 0
    rejects: int = 0
    rejects_path: Path | None = None
    first_reject: str | None = None

    @property
    def bytes(self) -> int:
        return sum(b for _, _, b in self.shards)

    def describe(self) -> str:
        text = (f"wrote {len(self.shards)} shard(s), {self.records} record(s), "
                f"{self.bytes / 1e6:.2f} MB to {self.out_dir}")
        if self.rejects:
            text += f"; {self.rejects} rejected (see {self.rejects_path})"
        return text


def _existing_outputs(out_dir: Path) -> list[Path]:
    return sorted([*out_dir.glob("shard-*.tar"), *out_dir.glob("shard-*.tar.partial"), *out_dir.glob(INDEX_NAME)])


def write_shards(
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    max_count: int = 10000,
    max_size: int = 1_000_000_000,
    image_root: str | Path | None = None,
    rejects_path: str | Path | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ShardWriteSummary:
    """Write unified-record JSONL files into webdataset shards under `out_dir`.

    Every input line becomes a sample or a line in the rejects file (bad
    record, duplicate id, missing / URL / undecodable image). A shard closes
    once it holds `max_count` samples or `max_size` bytes (a sample is never
    split, so a shard can pass `max_size` by one sample). Shards are written
    as `*.tar.partial` and renamed when complete; `index.json` comes last.
    """
    if max_count < 1:
        raise MMTuneError(f"--max-count must be >= 1, got {max_count}")
    if max_size < 1:
        raise MMTuneError(f"--max-size must be >= 1 byte, got {max_size}")
    paths = [Path(inputs)] if isinstance(inputs, str | Path) else [Path(p) for p in inputs]
    for p in paths:
        if not (p.is_file() or is_table_source(p)):
            raise MMTuneError(f"{p}: records file not found")
    out_dir = Path(out_dir)
    rejects_file = Path(rejects_path) if rejects_path else out_dir / "rejects.jsonl"
    check_outputs([Out(out_dir, "--out", "folder"), Out(rejects_file, "--rejects")],
                  inputs=[("records", p) for p in paths])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MMTuneError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    old = _existing_outputs(out_dir)
    if old and not overwrite:
        raise MMTuneError(f"{out_dir}: already holds shards ({old[0].name}, ...); pass --overwrite to replace them")
    for stale in out_dir.glob(f"{STAGE_PREFIX}*"):  # the staging folder of a run that crashed
        shutil.rmtree(stale, ignore_errors=True)
    # The new set is written into a staging folder and swapped in only once complete,
    # so --overwrite never leaves the user with fewer shards than before.
    stage = out_dir / f"{STAGE_PREFIX}{os.getpid()}"
    stage.mkdir()

    summary = ShardWriteSummary(out_dir=out_dir, rejects_path=rejects_file)
    finished: list[tuple[str, int]] = []

    def finish(fname: str) -> None:  # ShardWriter calls this when a shard is complete
        final = fname[: -len(".partial")]
        os.replace(fname, final)
        finished.append((Path(final).name, writer.count))

    taken: set[str] = set()
    seen_ids: dict[str, str] = {}
    prefixes = default_id_prefixes(paths)  # default ids of table rows stay unique across inputs
    try:
        with RejectsWriter(rejects_file) as rejects:
            # encoder=False: every member is bytes we made (original image bytes, UTF-8 JSON);
            # mtime=0 makes the same records give byte-identical shards.
            writer = wds.ShardWriter(
                str(stage / (SHARD_PATTERN + ".partial")), maxcount=max_count, maxsize=max_size,
                post=finish, verbose=0, encoder=False, mtime=0,
            )
            try:
                for path in paths:
                    if is_table_source(path):  # parquet / arrow / datasets: embedded bytes go straight in
                        for item in tqdm(iter_table_records(path, image_root=image_root, seen=seen_ids,
                                                            id_prefix=prefixes[str(path)]),
                                         desc=f"shard {path.name}", unit="rec",
                                         disable=None if progress is None else not progress):
                            if item.error is not None:
                                rejects.add(item.error.describe(), source=item.row.source, index=item.row.index,
                                            raw=printable(item.row.data))
                                continue
                            writer.write(_table_sample(item, taken))
                            summary.records += 1
                        continue
                    lines = tqdm(iter_jsonl(path), desc=f"shard {path.name}", unit="rec",
                                 disable=None if progress is None else not progress)
                    for lineno, obj in lines:
                        sample = _sample_for(obj, path, lineno, image_root, seen_ids, taken, rejects)
                        if sample is not None:
                            writer.write(sample)
                            summary.records += 1
            finally:
                writer.close()
        summary.rejects = rejects.count
        summary.first_reject = rejects.first_reason
        if not rejects.count:
            summary.rejects_path = None
        if summary.records == 0:
            raise MMTuneError(
                f"no record could be written to {out_dir}"
                + (f"; first reject: {summary.first_reject} (all in {rejects_file})" if summary.rejects
                   else " (inputs are empty)")
                + ("; the shards already there are kept" if old else "")
            )
        summary.shards = [(name, count, (stage / name).stat().st_size) for name, count in finished]
        index = {
            "format": INDEX_FORMAT,
            "records": summary.records,
            "rejects": summary.rejects,
            "shards": [{"name": n, "count": c, "bytes": b} for n, c, b in summary.shards],
        }
        write_json_atomic(index, stage / INDEX_NAME)
        # The new set is complete: only now does the old one go. index.json comes last.
        for p in _existing_outputs(out_dir):
            p.unlink(missing_ok=True)
        for name, _ in finished:
            os.replace(stage / name, out_dir / name)
        os.replace(stage / INDEX_NAME, out_dir / INDEX_NAME)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def _sample_for(
    obj: Any, path: Path, lineno: int, image_root: str | Path | None,
    seen_ids: dict[str, str], taken: set[str], rejects: RejectsWriter,
) -> dict[str, Any] | None:
    """The webdataset sample for one JSONL line, or None after writing its reject."""
    if isinstance(obj, RecordError):
        rejects.add_error(obj)
        return None
    try:
        rec = validate_record(obj, line=lineno, path=str(path))
    except RecordError as exc:
        rejects.add_error(exc, raw=obj)
        return None
    where = f"{path}:{lineno}, record {rec.id!r}"
    if rec.id in seen_ids:
        rejects.add(f"{where}: duplicate id (first at {seen_ids[rec.id]})", source=str(path), index=lineno, raw=obj)
        return None
    seen_ids[rec.id] = f"{path}:{lineno}"
    members: dict[str, Any] = {}
    for i, name in enumerate(rec.images):
        if is_url(name):
            rejects.add(f"{where}, field 'images[{i}]': {name} is a URL; download it first (mmtune never downloads)",
                        source=str(path), index=lineno, raw=obj)
            return None
        full = resolve_image_path(name, image_root)
        problem = check_image(full)
        if problem is not None:
            rejects.add(f"{where}, field 'images[{i}]': {problem}", source=str(path), index=lineno, raw=obj)
            return None
        members[f"{i}.{image_extension(full)}"] = Path(full).read_bytes()
    members["__key__"] = shard_key(rec.id, taken)
    members["json"] = rec.to_json().encode("utf-8")
    return members


def _table_sample(item: TableItem, taken: set[str]) -> dict[str, Any]:
    """The webdataset sample of one table row: its record and its images' bytes as they were stored."""
    rec = item.record
    assert rec is not None
    members: dict[str, Any] = {"__key__": shard_key(rec.id, taken), "json": rec.to_json().encode("utf-8")}
    for i, (name, data) in enumerate(zip(rec.images, item.image_bytes, strict=True)):
        members[f"{i}.{bytes_extension(data, name)}"] = data
    return members


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


def is_shard_source(source: str) -> bool:
    """True when `source` names shards (a .tar, a brace pattern, a pipe/URL, a shard folder)."""
    s = str(source)
    if s.startswith(REMOTE_PREFIXES) or re.search(r"\{[^}]*(\.\.|,)[^}]*\}", s):
        return True
    if s.endswith((".tar", ".tar.gz", ".tgz")):
        return True
    if not os.path.isdir(s):
        return False
    return os.path.isfile(os.path.join(s, INDEX_NAME)) or bool(glob.glob(os.path.join(glob.escape(s), "*.tar")))


def expand_shards(source: str | Sequence[str]) -> list[str]:
    """Shard URLs from a source or a list of sources, in order.

    Brace patterns are expanded (as webdataset does); a local glob is matched
    and sorted; a folder means the shards its `index.json` lists. Local shards
    must exist (a missing one is an error here, not a silent gap later).
    """
    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    urls: list[str] = []
    for src in sources:
        src = os.fspath(src)
        if src.startswith(REMOTE_PREFIXES):
            urls.extend(braceexpand.braceexpand(src))
            continue
        if os.path.isdir(src):
            index = _read_index(os.path.abspath(src))
            if index is None:  # e.g. img2dataset's output folder: its *.tar files, in name order
                found = sorted(glob.glob(os.path.join(glob.escape(src), "*.tar")))
                if not found:
                    raise MMTuneError(f"{src}: a folder given as shards needs the {INDEX_NAME} `mmtune shard` writes "
                                      "or .tar shards (img2dataset's layout)")
                urls.extend(found)
                continue
            listed = [os.path.join(src, name) for name in index]
            missing = [u for u in listed if not os.path.isfile(u)]
            if missing:
                raise MMTuneError(f"{missing[0]}: shard listed in {os.path.join(src, INDEX_NAME)} not found")
            urls.extend(listed)
            continue
        for part in braceexpand.braceexpand(src):
            if any(c in part for c in "*?["):
                found = sorted(glob.glob(part))
                if not found:
                    raise MMTuneError(f"{part}: no shard matches this pattern")
                urls.extend(found)
            elif not os.path.isfile(part):
                raise MMTuneError(f"{part}: shard not found" + (f" (from pattern {src})" if part != src else ""))
            else:
                urls.append(part)
    if not urls:
        raise MMTuneError(f"{source}: names no shard")
    return urls


def _read_index(folder: str) -> dict[str, int] | None:
    path = os.path.join(folder, INDEX_NAME)
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        return None
    return _read_index_at(path, stamp)


@functools.lru_cache(maxsize=256)
def _read_index_at(path: str, stamp: int) -> dict[str, int] | None:  # stamp: re-read a rewritten index
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return {str(s["name"]): int(s["count"]) for s in data["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable shard index (%s); lost samples cannot be counted", path, exc)
        return None


def expected_count(url: str) -> int | None:
    """How many samples `mmtune shard` wrote into this shard (from its folder's index.json)."""
    if url.startswith(REMOTE_PREFIXES):
        return None
    index = _read_index(os.path.dirname(os.path.abspath(url)))
    if index is None:
        return _img2dataset_count(url)
    return index.get(os.path.basename(url))


def _img2dataset_count(url: str) -> int | None:
    """Samples in an img2dataset shard: `successes` of the `NNNNN_stats.json` it writes next to `NNNNN.tar`."""
    stats = url[: -len(".tar")] + "_stats.json" if url.endswith(".tar") else None
    if stats is None or not os.path.isfile(stats):
        return None
    try:
        return int(json.loads(Path(stats).read_text(encoding="utf-8"))["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class ShardSample:
    """One sample as read from a shard: the record's JSON and its images' original bytes."""

    url: str
    key: str
    index: int  # position in its shard
    json_bytes: bytes | None
    images: list[tuple[str, bytes]]  # (extension, bytes) in image order
    error: str | None = None  # set when the sample is incomplete (truncated/corrupt shard)
    reject: str | None = None  # complete but unusable (an img2dataset sample without a caption)

    @property
    def image_bytes(self) -> list[bytes]:
        return [b for _, b in self.images]

    def record(self) -> Record:
        """The stored record (image paths as they were written); RecordError when unusable."""
        where = f"{self.url}, sample {self.key!r}"
        if self.error is not None:
            raise RecordError(self.error, path=where)
        if self.reject is not None:
            raise RecordError(self.reject, record_id=self.key, path=where)
        try:
            obj = json.loads(self.json_bytes.decode("utf-8"))  # type: ignore[union-attr]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecordError(f"bad JSON member ({exc})", path=where) from None
        rec = validate_record(obj, path=where)
        if len(rec.images) != len(self.images):
            raise RecordError(f"{len(self.images)} image member(s) but the record lists {len(rec.images)}",
                              record_id=rec.id, field="images", path=where)
        return rec


@dataclass
class ShardLoss:
    """A shard that gave fewer samples than its index says, or raised while being read."""

    url: str
    read: int  # samples that came out (complete or not)
    expected: int | None  # from index.json; None when unknown (remote shard, no index)
    errors: list[str] = field(default_factory=list)
    mine: int | None = None  # lost samples that were this reader's (set by read_assigned)

    @property
    def lost(self) -> int | None:
        return None if self.expected is None else max(0, self.expected - self.read)

    def lost_for(self, part: int, parts: int, offset: int = 0) -> int | None:
        """Lost samples that were reader `part`'s when readers take every `parts`-th sample
        and this shard's first sample is number `offset` in the readers' common order."""
        if self.expected is None:
            return None
        return sum(1 for i in range(self.read, self.expected) if (offset + i) % parts == part)

    def describe(self) -> str:
        what = (f"{self.lost} of {self.expected} samples lost" if self.expected is not None
                else "samples lost (count unknown: no index.json for this shard)")
        why = f": {self.errors[0]}" if self.errors else " (truncated: the tar ended early)"
        return f"shard {self.url}: {what}{why}"


def _one_line(exn: BaseException) -> str:
    text = " ".join(str(exn.args[0] if exn.args else exn).split())
    return f"{type(exn).__name__}: {text}"[:300]


@dataclass(frozen=True)
class _Span:
    """Where a tar member's bytes are in its shard file."""

    offset: int
    size: int


def read_span(url: str, offset: int, size: int) -> bytes:
    """`size` bytes of a local shard file from `offset`; OSError when the file no longer holds them."""
    with open(url, "rb") as fh:
        data = os.pread(fh.fileno(), size, offset)
    if len(data) != size:
        raise OSError(f"{url}: {len(data)} of {size} bytes at offset {offset} (the shard changed since it was scanned)")
    return data


@dataclass
class LazyShardSample:
    """A sample of a local shard whose member bytes are not read yet (`read_shard(..., lazy=True)`).

    `load()` reads them and returns the `ShardSample` the eager reader gives for
    the same sample: a reader that keeps only some samples (a DataLoader worker,
    a rank splitting by sample, a resumed stream passing over its prefix) reads
    the tar headers of the others and never their bytes.
    """

    url: str
    key: str
    index: int  # position in its shard
    members: dict[str, Any]  # as webdataset groups them: suffix -> _Span, plus __key__ / __url__

    def load(self, read: Callable[[str, int, int], bytes] = read_span) -> ShardSample:
        raw = {k: read(self.url, v.offset, v.size) if isinstance(v, _Span) else v for k, v in self.members.items()}
        return _to_sample(raw, self.url, self.index)


_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def _plain_header(buf: bytes) -> tuple[str, int] | None:
    """(name, size) from a tar header block that is a plain POSIX ustar header of a regular file with
    a valid checksum, no name prefix and an octal size -- what tarfile (and so webdataset's writer)
    writes for short ASCII names; None for anything else, which `tarfile` then parses."""
    if (len(buf) != tarfile.BLOCKSIZE or buf[257:265] != tarfile.POSIX_MAGIC or buf[156] != 0x30
            or buf[345] != 0 or buf[124] in (0o200, 0o377)):
        return None
    try:  # as tarfile's nti(): the digits up to the first NUL, stripped, in octal
        chksum = int(buf[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(buf[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if chksum != 256 + sum(buf[:148]) + sum(buf[156:]):  # tarfile also accepts the signed sum: it parses those
        return None
    return buf[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape"), size


def _scan_members(url: str, handler: Callable[[BaseException], bool]) -> Iterator[dict[str, Any]]:
    """The members of a local uncompressed tar as webdataset's tar iterator yields them, with a `_Span` for the data.

    Headers only: each member's data is skipped, never read. Plain ustar headers
    (`_plain_header`, what mmtune's shards hold) are read directly, ~5x faster
    than `tarfile` parses them, which matters because every DataLoader worker
    reads every sample's headers; from the first header that is anything else
    (pax/GNU extensions, a prefix, a bad checksum, the end of the archive),
    the random-access `tarfile` reader takes over for the rest of the shard.
    Hand-written because webdataset reads tars as a stream (every byte); the
    member filters, the errors passed to `handler` and where a shard ends follow
    `webdataset.tariterators.tar_file_iterator` / `tar_file_expander`, so
    grouping the result with webdataset's `group_by_keys` gives the samples (and
    losses) the eager reader gives (tests/test_shards.py compares them on
    shards cut at every block and inside every member, and with each header garbled).
    """
    try:
        fh = open(url, "rb", buffering=0)  # noqa: SIM115 (closed below); unbuffered: a header read is 512 bytes
    except OSError as exn:
        handler(exn)
        return
    with fh:
        fd = fh.fileno()
        end = os.fstat(fd).st_size
        tf: tarfile.TarFile | None = None
        offset = 0  # of the next header while headers are read directly
        while True:
            if tf is None and offset > end:  # the previous member's padded data is cut short: as tarfile's next()
                handler(tarfile.ReadError("unexpected end of data"))
                return
            plain = _plain_header(os.pread(fd, tarfile.BLOCKSIZE, offset)) if tf is None else None
            if plain is not None:
                fname, size = plain
                data_at, regular = offset + tarfile.BLOCKSIZE, True
                offset = data_at + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            else:
                try:
                    if tf is None:  # tarfile from this header on (at offset 0 it fails as the stream reader does)
                        fh.seek(offset)
                        tf = tarfile.open(fileobj=fh, mode="r:")  # noqa: SIM115 (reads fh, closed below)
                    info = tf.next()
                except Exception as exn:  # noqa: BLE001 (webdataset's reader hands any read error to the handler)
                    handler(exn)
                    return  # the shard ends here, as a failing stream does
                if info is None:
                    break
                tf.members = []  # headers already used; keep memory flat over a long shard
                fname, size, data_at, regular = info.name, info.size, info.offset_data, info.isreg()
            try:
                if not regular or fname is None:
                    continue
                if "/" not in fname and fname.startswith("__") and fname.endswith("__"):
                    continue
                if _META_NAME.match(fname):
                    continue
                if data_at + size > end:  # the stream reader fails reading this member's data; the shard ends
                    handler(tarfile.ReadError("unexpected end of data"))
                    return
                yield {"fname": fname, "data": _Span(data_at, size), "__url__": url}
            except Exception as exn:  # noqa: BLE001
                if handler(exn):
                    continue
                break
    yield {}  # end of shard: group_by_keys passes on the last sample


def can_read_lazily(url: str) -> bool:
    """Whether `read_shard(url, lazy=True)` reads headers only: a local .tar file that starts with a
    ustar/pax header (a compressed or otherwise unusual file named .tar is read by webdataset)."""
    if not url.endswith(".tar") or url.startswith(REMOTE_PREFIXES):
        return False
    try:
        with open(url, "rb", buffering=0) as fh:
            head = fh.read(tarfile.BLOCKSIZE)
    except OSError:
        return False
    return len(head) == tarfile.BLOCKSIZE and head[257:262] == b"ustar"


def read_shard(url: str, expected: int | None = None, *, lazy: bool = False) -> Iterator[ShardSample | LazyShardSample | ShardLoss]:
    """Every sample of one shard, then a ShardLoss if the shard was short or broken.

    Uses webdataset's tar iterator with an exception handler that notes the
    error and carries on (the `wds.warn_and_continue` mechanism, with our own
    record of it): a truncated tar ends the shard early, sometimes silently,
    which is why the sample count is compared with the index written at
    shard time. A sample whose members were cut off comes out with `error` set.

    `lazy=True`: for a local uncompressed .tar (`can_read_lazily`), only the
    tar headers are read and samples come out as `LazyShardSample`s whose
    `load()` reads their bytes; the samples, their order and the losses are
    those of the eager reader. Other sources are read eagerly.
    """
    if expected is None:
        expected = expected_count(url)
    errors: list[str] = []

    def handler(exn: BaseException) -> bool:
        errors.append(_one_line(exn))
        return True

    n = 0
    if lazy and can_read_lazily(url):
        for raw in wds.tariterators.group_by_keys(_scan_members(url, handler), handler=handler):
            yield LazyShardSample(url, raw.get("__key__", "?"), n, raw)
            n += 1
    else:
        for raw in wds.tarfile_samples([{"url": url}], handler=handler):
            yield _to_sample(raw, url, n)
            n += 1
    if (expected is not None and n < expected) or (errors and expected is None):
        yield ShardLoss(url, n, expected, errors)
    elif errors:  # complete count, but something was broken inside: samples say what
        log.warning("shard %s: read errors (%s); incomplete samples are skipped and counted", url, errors[0])


CAPTION_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's output formats


def _caption_sample(raw: dict[str, Any], url: str, index: int) -> ShardSample | None:
    """An img2dataset sample (KEY.jpg + KEY.txt and/or KEY.json with "caption") as a caption record.

    The record is what LLaVA's stage 1 trains on, rendered by the `plain`
    template as the image then the caption: user "<image>", assistant the
    caption (task "caption", source "img2dataset", the json's url / size in meta).
    None when `raw` is not such a sample (an mmtune shard sample has numbered images).
    """
    exts = [e for e in CAPTION_IMAGE_EXTS if e in raw]
    if not exts or any(_IMAGE_MEMBER.fullmatch(k) for k in raw):
        return None
    key = str(raw.get("__key__", "?"))
    info: dict[str, Any] = {}
    if "json" in raw:
        try:
            parsed = json.loads(raw["json"].decode("utf-8"))
            info = parsed if isinstance(parsed, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            info = {}
    caption = None
    if "txt" in raw:
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            caption = None
    if not caption and isinstance(info.get("caption"), str):
        caption = info["caption"].strip()
    sample = ShardSample(url, key, index, None, [(exts[0], raw[exts[0]])])
    if not caption:
        sample.reject = "img2dataset sample without a caption (no .txt, no 'caption' in .json)"
        return sample
    meta = {k: info[k] for k in ("url", "key", "width", "height", "original_width", "original_height")
            if k in info and isinstance(info[k], str | int | float)}
    record = {"id": key, "messages": [{"role": "user", "content": IMAGE_PLACEHOLDER},
                                      {"role": "assistant", "content": caption}],
              "images": [f"{key}.{exts[0]}"], "source": "img2dataset", "task": "caption", "meta": meta}
    sample.json_bytes = json.dumps(record, ensure_ascii=False).encode("utf-8")
    return sample


def _to_sample(raw: dict[str, Any], url: str, index: int) -> ShardSample:
    caption = _caption_sample(raw, url, index)
    if caption is not None:
        return caption
    images: dict[int, tuple[str, bytes]] = {}
    for name, value in raw.items():
        m = _IMAGE_MEMBER.fullmatch(name)
        if m:
            images[int(m.group(1))] = (m.group(2), value)
    error = None
    if "json" not in raw:
        error = "no .json member (truncated or corrupt shard)"
    elif sorted(images) != list(range(len(images))):
        error = f"image members {sorted(images)} are not 0..{len(images) - 1} (truncated or corrupt shard)"
    return ShardSample(url, raw.get("__key__", "?"), index, raw.get("json"),
                       [images[i] for i in sorted(images)], error)


def epoch_shard_order(urls: Sequence[str], seed: int, epoch: int, shuffle: bool = True) -> list[str]:
    """The shard order of one epoch: the same on every rank (so splits are disjoint), new each epoch."""
    order = list(urls)
    if shuffle:
        random.Random(f"mmtune-shards:{seed}:{epoch}").shuffle(order)
    return order


def assign_shards(urls: Sequence[str], part: int, parts: int) -> tuple[list[str], bool]:
    """The shards reader `part` of `parts` reads, and whether it must also split their samples.

    With at least as many shards as readers this is `urls[part::parts]`, what
    `wds.split_by_node` / `wds.split_by_worker` do; with fewer, every reader
    reads every shard and keeps samples `i % parts == part`, so no reader is
    left without data.
    """
    if not 0 <= part < parts:
        raise MMTuneError(f"rank/worker {part} out of range for {parts} reader(s)")
    if len(urls) >= parts:
        return list(urls)[part::parts], False
    return list(urls), parts > 1


def read_assigned(urls: Sequence[str], part: int, parts: int, split_samples: bool,
                  lazy: bool = False) -> Iterator[ShardSample | LazyShardSample | ShardLoss]:
    """Reader `part`'s samples of `urls` (see `assign_shards`), and the shards' losses.

    When splitting samples, sample k of the shards' common order goes to reader
    k % parts; a ShardLoss then carries in `mine` how many lost samples were
    this reader's (otherwise `mine` is all of them). `lazy`: see `read_shard`.
    """
    offset = 0
    for url in urls:
        span = 0
        for item in read_shard(url, lazy=lazy):
            if isinstance(item, ShardLoss):
                item.mine = item.lost_for(part, parts, offset) if split_samples else item.lost
                span = max(span, item.expected or 0)
                yield item
                continue
            span = max(span, item.index + 1)
            if not split_samples or (offset + item.index) % parts == part:
                yield item
        offset += span


def reader_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers): explicit values win, the rest from
    torch.distributed / RANK, WORLD_SIZE and the DataLoader worker (webdataset's rules)."""
    r, ws, worker, nw = wds.utils.pytorch_worker_info()
    return (r if rank is None else rank), (ws if world_size is None else world_size), worker, nw


def _log_loss(loss: ShardLoss) -> None:
    log.warning("%s", loss.describe())


def stream_samples(
    source: str | Sequence[str],
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    on_loss: Callable[[ShardLoss], None] | None = _log_loss,
) -> Iterator[ShardSample]:
    """One epoch of shard samples for this node and DataLoader worker, shuffled.

    Shards are ordered per (seed, epoch), split across ranks and then workers,
    read in turn and passed through a seeded `wds.shuffle` buffer, so the same
    seed, epoch and split give the same sequence. Incomplete samples are not
    yielded; they and lost samples reach `on_loss` (default: a warning naming
    the shard).
    """
    rank, world_size, worker, num_workers = reader_info(rank, world_size)
    part, parts = rank * num_workers + worker, world_size * num_workers
    mine, split_samples = assign_shards(epoch_shard_order(expand_shards(source), seed, epoch, shuffle), part, parts)

    def samples() -> Iterator[ShardSample]:
        for item in read_assigned(mine, part, parts, split_samples):
            if isinstance(item, ShardLoss):
                if on_loss is not None:
                    on_loss(item)
            elif item.error is not None:
                if on_loss is not None:
                    on_loss(ShardLoss(item.url, item.index, item.index + 1, [f"sample {item.key!r}: {item.error}"], 1))
            else:
                yield item

    if not shuffle or shuffle_buffer <= 1:
        return samples()
    rng = random.Random(f"mmtune-shard-buffer:{seed}:{epoch}:{part}")
    return wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)(samples())


def iter_records(
    source: str | Sequence[str],
    extract_images_to: str | Path | None = None,
    *,
    losses: list[ShardLoss] | None = None,
) -> Iterator[Record]:
    """The records stored in shards, in shard order.

    Without `extract_images_to` the records come back exactly as written
    (image paths as they were in the input). With it, each image's stored
    bytes are written to `DIR/KEY.I.EXT` and the record's `images` point there.
    Lost or unreadable samples are logged as warnings and appended to `losses`.
    """
    out = Path(extract_images_to) if extract_images_to is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for url in expand_shards(source):
        for item in read_shard(url):
            if isinstance(item, ShardLoss):
                _log_loss(item)
                if losses is not None:
                    losses.append(item)
                continue
            try:
                rec = item.record()
            except RecordError as exc:
                loss = ShardLoss(url, item.index, item.index + 1, [exc.describe()])
                _log_loss(loss)
                if losses is not None:
                    losses.append(loss)
                continue
            if out is not None:
                paths = []
                for i, (ext, data) in enumerate(item.images):
                    target = out / f"{item.key}.{i}.{ext}"
                    write_bytes_atomic(data, target)
                    paths.append(str(target))
                rec.images = paths
            yield rec
