"""`mmtune --help` and a light subcommand import only what they need (torch is slow to load)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from mmtune.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("mmtune."))))
"""


def _loaded(*argv: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True, env={"PYTHONPATH": str(REPO), "PATH": ""}).stdout
    return json.loads(out.splitlines()[-1])


def test_top_level_help_loads_no_subcommand():
    loaded = _loaded("--help")
    assert "torch" not in loaded
    assert not [m for m in loaded if m.startswith("mmtune.cli.")], loaded


def test_a_subcommand_loads_only_its_own_module():
    loaded = _loaded("benchmark", "--help")
    assert "mmtune.cli.benchmark" in loaded
    assert "torch" not in loaded
    assert not {"mmtune.cli.train", "mmtune.cli.eval", "mmtune.train.run", "mmtune.eval.run"} & set(loaded)
