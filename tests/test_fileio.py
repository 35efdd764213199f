"""mmtune.fileio: every write is whole or absent; a failing write leaves the previous file (or folder) as it was.

Also the write sites that now go through it (run_config.yaml, metrics truncation, PNG figures, embedded
images, MMBench submissions, rejects) keep the previous file whole when the write fails half-way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtune.fileio import (
    atomic_dir,
    atomic_path,
    atomic_text,
    fresh_dir,
    replace_dir,
    write_bytes_atomic,
    write_json_atomic,
    write_png,
)


class Boom(Exception):
    pass


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".tmp" in p.name)


def test_atomic_text_failure_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(Boom), atomic_text(target) as fh:
        fh.write("half of the new\n")
        raise Boom
    assert target.read_text(encoding="utf-8") == "old\n"
    assert _leftovers(tmp_path) == []
    with atomic_text(target) as fh:
        fh.write("new \ud83d\n")  # a lone surrogate is written as its JSON escape, not a crash
    assert target.read_text(encoding="utf-8") == "new \\ud83d\n"


def test_atomic_path_keeps_the_suffix_for_writers_that_choose_by_it(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    target = tmp_path / "cache.npy"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path and tmp.name.startswith(".")
        np.save(tmp, np.arange(3))  # np.save appends .npy to any other name
    assert np.load(target).tolist() == [0, 1, 2]
    assert _leftovers(tmp_path) == []


def test_json_and_bytes_failures_keep_previous_files(tmp_path: Path) -> None:
    target = write_json_atomic({"a": 1}, tmp_path / "r.json", fsync=True)
    with pytest.raises(TypeError):
        write_json_atomic({"a": 1, 2: object(), None: 3, (1,): 1}, target)  # tuple key: json cannot
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 1}
    img = write_bytes_atomic(b"old", tmp_path / "x.bin")
    with pytest.raises(TypeError):
        write_bytes_atomic("not bytes", img)  # type: ignore[arg-type]
    assert img.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_write_png_failure_keeps_previous_png(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    target = write_png(fig, tmp_path / "plot.png", dpi=20)
    before = target.read_bytes()
    assert before.startswith(b"\x89PNG")
    plt.close(fig)

    class HalfFigure:  # writes part of a PNG, then fails (a full disk, a bad artist)
        def savefig(self, path, **kw):
            Path(path).write_bytes(before[:20])
            raise Boom

    with pytest.raises(Boom):
        write_png(HalfFigure(), target)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_atomic_dir_failure_keeps_previous_folder_and_success_replaces_it(tmp_path: Path) -> None:
    out = tmp_path / "best"
    out.mkdir()
    (out / "weights").write_text("old", encoding="utf-8")
    with pytest.raises(Boom), atomic_dir(out) as tmp:
        (tmp / "weights").write_text("half", encoding="utf-8")
        raise Boom
    assert (out / "weights").read_text(encoding="utf-8") == "old"
    assert _leftovers(tmp_path) == []
    with atomic_dir(out) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "new").write_text("new", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert _leftovers(tmp_path) == []


def test_fresh_dir_clears_what_a_crashed_write_left(tmp_path: Path) -> None:
    stale = tmp_path / "run" / ".tmp-best"
    (stale / "sharded").mkdir(parents=True)
    (stale / "sharded" / "__0_0.distcp").write_text("half", encoding="utf-8")
    assert fresh_dir(stale) == stale and list(stale.iterdir()) == []
    assert fresh_dir(tmp_path / "new" / "deep").is_dir()


def test_replace_dir_named_aside_is_used_and_removed(tmp_path: Path) -> None:
    out, new, aside = tmp_path / "ckpt", tmp_path / ".new", tmp_path / ".old-ckpt"
    out.mkdir()
    new.mkdir()
    (new / "f").write_text("n", encoding="utf-8")
    aside.mkdir()  # a stale one from a crash is cleared first
    replace_dir(new, out, aside=aside)
    assert (out / "f").read_text(encoding="utf-8") == "n"
    assert not aside.exists() and not new.exists()


# ---- write sites that now go through fileio -------------------------------------------------


def test_run_config_write_failure_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from mmtune import runs
    from mmtune.config import RunConfig, load_config

    path = runs.write_run_config(RunConfig(), tmp_path)
    before = path.read_text(encoding="utf-8")
    assert isinstance(load_config(path), RunConfig)

    def half_then_fail(data, stream, **kw):
        stream.write("model:\n  half")
        raise Boom

    monkeypatch.setattr(yaml, "safe_dump", half_then_fail)
    with pytest.raises(Boom):
        runs.write_run_config(RunConfig(), tmp_path)
    assert path.read_text(encoding="utf-8") == before
    assert _leftovers(tmp_path) == []


def test_rejects_writer_failed_run_keeps_previous_rejects(tmp_path: Path) -> None:
    from mmtune.data.schema import RejectsWriter

    path = tmp_path / "x.rejects.jsonl"
    with RejectsWriter(path) as w:
        w.add("old reason")
    before = path.read_text(encoding="utf-8")
    with pytest.raises(Boom), RejectsWriter(path) as w:
        w.add("new reason")
        raise Boom
    assert path.read_text(encoding="utf-8") == before
    assert _leftovers(tmp_path) == []
    with RejectsWriter(path):
        pass  # a clean run with no rejects removes the stale list
    assert not path.exists()


def test_mmbench_submission_failure_keeps_previous_tsv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import csv

    from mmtune.data.schema import Record
    from mmtune.eval import benchmarks

    rec = Record(id="mmbench-0-r0", messages=[{"role": "user", "content": "<image>\nq"}], images=["a.png"],
                 choices=["x", "y"], meta={"circular_index": 0, "circular_round": 0, "question": "q"})
    written = benchmarks.write_mmbench_submission([rec], [{"id": rec.id, "output": "A"}], tmp_path / "sub")
    tsv = written[0]
    before = tsv.read_text(encoding="utf-8")
    assert "\tA\t" in before

    class BrokenWriter(csv.DictWriter):
        def writerows(self, rows):
            super().writerows(rows)
            raise Boom

    monkeypatch.setattr(benchmarks.csv, "DictWriter", BrokenWriter)
    with pytest.raises(Boom):
        benchmarks.write_mmbench_submission([rec], [{"id": rec.id, "output": "B"}], tmp_path / "sub")
    assert tsv.read_text(encoding="utf-8") == before
    assert _leftovers(tmp_path) == []
