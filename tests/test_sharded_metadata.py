"""A sharded (FSDP) checkpoint from someone else runs no code, and a broken one is named (mmtune.dcp_metadata).

torch.distributed.checkpoint writes and reads a sharded folder's `.metadata` with plain pickle, so before,
`mmtune consolidate` / `export` / `generate` or a resume of a checkpoint whose `.metadata` named any callable
ran it. Now the metadata is read with an allowlist of DCP's own classes, and mmtune.integrity checks every
shard file against the byte ranges the metadata gives it. The sharded checkpoint here is written in one
process (`save_sharded` needs no process group); tests/test_train_fsdp.py reads real two-process ones.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import build_tiny, one_line_error

from mmtune.cli import main
from mmtune.dcp_metadata import METADATA_FILE, UnsafeCheckpointError, read_metadata
from mmtune.integrity import find_corruption
from mmtune.model.io import SHARDED_DIR, load_full_model_state, load_model, save_model
from mmtune.train.sharding import save_sharded

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    bundle, _ = build_tiny("tiny_llm")
    folder = tmp_path_factory.mktemp("sharded") / "checkpoint-2"
    folder.mkdir()
    save_model(bundle, folder, sharded=True)
    save_sharded(folder, bundle.model)
    return folder, {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}


def _copy(sharded_folder: Path, tmp_path: Path) -> Path:
    return shutil.copytree(sharded_folder, tmp_path / "checkpoint-2")


def test_a_sharded_checkpoint_loads_through_the_allowlisted_reader(sharded):
    folder, weights = sharded
    assert find_corruption(folder) is None
    assert type(read_metadata(folder / SHARDED_DIR)).__name__ == "Metadata"
    loaded = load_model(folder).model.state_dict()
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)


class _RunsCode:
    """Unpickling this calls `call(*args)`: what a hostile `.metadata` does."""

    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("how", ["exec", "dotted"])
def test_metadata_that_names_other_code_is_refused_before_it_runs(sharded, tmp_path, capsys, how):
    folder = _copy(sharded[0], tmp_path)
    marker = tmp_path / "ran"
    payload = (_RunsCode(exec, f"open({str(marker)!r}, 'w').close()") if how == "exec"
               else _RunsCode(Path.touch, marker))  # pickled as the dotted global pathlib "Path.touch"
    (folder / SHARDED_DIR / METADATA_FILE).write_bytes(pickle.dumps(payload, protocol=4))

    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
        read_metadata(folder / SHARDED_DIR)
    path, reason = find_corruption(folder)
    assert path == folder / SHARDED_DIR / METADATA_FILE and reason.startswith("refused (refusing to unpickle")
    assert main(["consolidate", str(folder), "--out", str(tmp_path / "out")]) == 2
    line = one_line_error(capsys, "consolidate")
    assert f"{SHARDED_DIR}/{METADATA_FILE} of checkpoint {folder} is refused" in line
    bundle, _ = build_tiny("tiny_llm")
    with pytest.raises(UnsafeCheckpointError):  # the loader itself refuses too, not only the check before it
        load_full_model_state(folder, bundle.model)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_truncated_shard_or_a_garbled_metadata_is_named(sharded, tmp_path, capsys):
    folder = _copy(sharded[0], tmp_path)
    [shard] = sorted((folder / SHARDED_DIR).glob("*.distcp"))
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    path, reason = find_corruption(folder)
    assert path == shard and reason.startswith(f"truncated ({len(whole) // 2} bytes; the sharded metadata expects")
    assert main(["consolidate", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert f"{SHARDED_DIR}/{shard.name} of checkpoint {folder} is truncated" in one_line_error(capsys, "consolidate")

    shard.unlink()
    assert find_corruption(folder) == (shard, "missing (the sharded metadata names it)")
    shard.write_bytes(whole)
    meta = folder / SHARDED_DIR / METADATA_FILE
    meta.write_bytes(meta.read_bytes()[:40])
    path, reason = find_corruption(folder)
    assert path == meta and reason.startswith("corrupt (")
