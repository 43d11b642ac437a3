"""The package's layers (DESIGN.md, "Layout"): imports point one way, with no cycles.

    core <- data, models <- diffusion, objectives <- inference <- evaluators <- trainers
         <- entry points (train, train_autoencoder, generate, evaluate, precompute)

A module may import its own package's modules and any lower layer; packages that share a layer
(data and models; diffusion and objectives) do not import each other; nothing imports an entry
point. Read with `ast` from the source (nothing is executed), function-level imports included.
"""
import ast
import os
import shutil

import pytest

import transfusion_jax

PACKAGE = "transfusion_jax"
LAYERS = {"core": 0, "data": 1, "models": 1, "diffusion": 2, "objectives": 2, "inference": 3,
          "evaluators": 4, "trainers": 5, "scaling": 4}
ENTRY_POINTS = ("train", "train_autoencoder", "generate", "evaluate", "precompute", "sweep")
for _entry in ENTRY_POINTS:
    LAYERS[_entry] = 6


def modules(root: str) -> dict[str, str]:
    """{dotted module name: file path} of the package under `root` (the package folder)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(root))
                dotted = rel[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = os.path.join(folder, name)
    return out


def imports(path: str, known: dict[str, str]) -> set[str]:
    """The package modules `path` imports (a `from pkg import name` of a submodule counts as
    that submodule)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == PACKAGE:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def group(module: str) -> str:
    """The layered unit of a module: its first name under the package ('' for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(root: str) -> list[str]:
    """Each import against the layer order, each unlayered module, and each cycle, naming the
    modules."""
    known = modules(root)
    graph = {m: imports(path, known) for m, path in known.items()}
    problems = []
    for importer, targets in sorted(graph.items()):
        if group(importer) and group(importer) not in LAYERS:
            problems.append(f"{importer}: not in any layer of the layout")
            continue
        for target in sorted(targets):
            src, dst = group(importer), group(target)
            if src == dst or dst == "":
                continue
            if dst in ENTRY_POINTS:
                problems.append(f"{importer} imports the entry point {target}")
            elif src == "" or LAYERS.get(dst, 99) >= LAYERS[src]:
                problems.append(f"{importer} imports {target}: against the layer order "
                                f"({src or PACKAGE} must not import {dst})")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected knot found."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


ROOT = os.path.dirname(transfusion_jax.__file__)


def test_the_package_follows_the_layer_order():
    assert violations(ROOT) == []


def test_every_layer_exists_as_designed():
    known = modules(ROOT)
    for name in ("core", "data", "models", "inference", "evaluators", "trainers"):
        assert f"{PACKAGE}.{name}" in known, name
    for name in ("diffusion", "objectives", *ENTRY_POINTS):
        assert f"{PACKAGE}.{name}" in known, name
    assert f"{PACKAGE}.data.shapes" in known and f"{PACKAGE}.models.autoencoder" in known


@pytest.mark.parametrize("module,line,expected", [
    ("core/config.py", "from transfusion_jax.trainers import transfusion",
     "transfusion_jax.core.config imports transfusion_jax.trainers.transfusion"),
    ("models/layers.py", "from transfusion_jax.data import counters",
     "transfusion_jax.models.layers imports transfusion_jax.data.counters"),
    ("evaluators/common.py", "import transfusion_jax.train",
     "transfusion_jax.evaluators.common imports the entry point transfusion_jax.train"),
    ("core/sharding.py", "from transfusion_jax.core import flops",
     "import cycle: transfusion_jax.core.flops -> transfusion_jax.core.sharding"),
])
def test_a_deliberate_upward_import_or_cycle_fails(tmp_path, module, line, expected):
    copy = tmp_path / PACKAGE
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if "cycle" in expected:  # make the two modules import each other
        with open(copy / "core" / "flops.py", "a") as f:
            f.write("\ndef _uses():\n    from transfusion_jax.core import sharding\n")
    with open(copy / module, "a") as f:
        f.write(f"\n\ndef _late():\n    {line}\n")
    found = violations(str(copy))
    assert any(expected in v for v in found), found
