"""The package's import graph: no cycle, and no layer imports a layer above it.

Every `import` / `from ... import` in every module counts, including the lazy
ones inside functions and the `TYPE_CHECKING` ones, because a lazy import is
still a dependency (the model/build <-> model/io cycle was a lazy one).
The layer order is README's "Layout": the shared bottom (errors, fileio,
config, runs) -> data -> select | model -> train | eval -> demo -> cli.
Only `mmtune/cli/` parses arguments: no other module imports argparse.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmtune"

# Lower number = lower layer. Same number = siblings, which may not import each other.
LAYERS = {
    "mmtune": 0,  # the package root holds only __version__
    "errors": 0,
    "fileio": 0,
    "config": 1,
    "outputs": 1,  # the output-path rule (imports errors only)
    "device": 1,  # device-string checks (imports errors only)
    "dcp_metadata": 1,  # a sharded checkpoint's pickled .metadata, read with an allowlist (imports errors only)
    "integrity": 2,  # is a checkpoint whole (imports dcp_metadata for sharded folders)
    "runs": 2,
    "data": 3,
    "select": 4,
    "model": 4,
    "train": 5,
    "eval": 5,
    "demo": 6,  # the whole pipeline through the public APIs
    "cli": 7,  # the command line: one module per subcommand, over everything
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _target(module: str, name: str | None, known: set[str]) -> str:
    """`from module import name`: the submodule when `name` is one, else the module itself."""
    if name is not None and f"{module}.{name}" in known:
        return f"{module}.{name}"
    return module


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    top = root.name
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == top)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative imports: resolve against this module's package
                    base = mod.split(".")[: len(mod.split(".")) - node.level + (path.name == "__init__.py")]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                if module.split(".")[0] != top:
                    continue
                deps.update(_target(module, a.name, known) for a in node.names)
        deps.discard(mod)
        graph[mod] = {d for d in deps if d in known}
    return graph


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        here = component(mod)
        if here not in LAYERS:
            bad.append(f"{mod}: top-level module {here!r} has no layer; add it to LAYERS (and README's Layout)")
            continue
        for dep in sorted(deps):
            there = component(dep)
            if there == here or there not in LAYERS:
                continue
            if LAYERS[there] >= LAYERS[here]:
                bad.append(f"{mod} imports {dep}: layer {there} ({LAYERS[there]}) is not below {here} ({LAYERS[here]})")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports(import_graph()) == []


def test_the_graph_sees_lazy_imports_and_the_run_folder_owner():
    graph = import_graph()
    # Lazy (function-level) imports are edges too: export loads the model inside a function.
    assert "mmtune.model.io" in graph["mmtune.model.export"]
    # Everything that reads a run folder asks mmtune.runs.
    for mod in ("mmtune.model.io", "mmtune.model.export", "mmtune.train.checkpoint", "mmtune.train.run",
                "mmtune.eval.run", "mmtune.eval.generate"):
        assert "mmtune.runs" in graph[mod], mod


def argparse_users(root: Path = PACKAGE) -> list[str]:
    """Modules outside `mmtune.cli` that import argparse (anywhere in their body)."""
    users = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        if component(mod) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "argparse" for n in names):
                users.append(mod)
                break
    return users


def test_only_the_cli_package_parses_arguments():
    assert argparse_users() == [], "move the argparse code into mmtune/cli/<command>.py"


def test_every_command_lives_in_the_cli_package():
    from mmtune.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        assert module == f"mmtune.cli.{name}", name
        assert (PACKAGE / "cli" / f"{name}.py").is_file(), name


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "mmtune"
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return pkg


def test_a_lazy_cycle_is_found(tmp_path):
    # The shape of the old model/build <-> model/io cycle: one side imports lazily.
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "model/__init__.py": "",
        "model/build.py": "def f():\n    from mmtune.model.io import X\n",
        "model/io.py": "from mmtune.model.build import f\n",
    })
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"mmtune.model.build", "mmtune.model.io"}


def test_upward_and_sibling_imports_are_found(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "config.py": "",
        "data/__init__.py": "",
        "data/x.py": "from mmtune.model import build\n",  # data -> model: upward
        "model/__init__.py": "",
        "model/build.py": "import mmtune.select.api\n",  # model -> select: sibling
        "select/__init__.py": "",
        "select/api.py": "from mmtune import config\n",  # fine: down to config
        "newthing.py": "",
    })
    bad = upward_imports(import_graph(pkg))
    assert any(b.startswith("mmtune.data.x imports mmtune.model.build") for b in bad)
    assert any(b.startswith("mmtune.model.build imports mmtune.select.api") for b in bad)
    assert any("'newthing' has no layer" in b for b in bad)
    assert not any(b.startswith("mmtune.select.api") for b in bad)


def test_an_argparse_import_outside_the_cli_is_found(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "cli/__init__.py": "import argparse\n",  # fine: the command line
        "cli/train.py": "from argparse import ArgumentParser\n",
        "train/__init__.py": "",
        "train/run.py": "def f():\n    import argparse\n",  # lazy, still found
        "data/__init__.py": "",
        "data/convert.py": "from argparse import Namespace\n",
        "model/__init__.py": "",
        "model/io.py": "import json\n",
    })
    assert argparse_users(pkg) == ["mmtune.data.convert", "mmtune.train.run"]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_names_a_real_module(name):
    assert name == "mmtune" or (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()
