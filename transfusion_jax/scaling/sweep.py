"""A sweep definition: the points (runs), the metrics to fit, what to prepare first.

    sweep = load_sweep("experiments/scaling.py:micro")
    sweep.points[i].train_args(workdir)     # --config FILE:ARG --workdir DIR --config.K=V ...
    sweep.points[i].resolved()              # the run's ConfigDict, overrides applied

An experiment file's get_config(arg) returns {name, sweep_dir, points, metrics, prepare, env,
launch}; each point {name (its workdir under the sweep's folder), family, config ("FILE:ARG"),
overrides {"a.b": value} (the trainer's --config.a.b=value), size, budget, ablation (a label,
"" for the grid), base (the point an ablation is compared with), estimated_s, launch
{launcher: {"--option": value}}}; prepare: [{name, workdir, done, command, estimated_s}] run
before the points when workdir/done is missing (the frozen autoencoders), with os.environ and
its own env (not the sweep's).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Any

from transfusion_jax.core.config import load_config
from transfusion_jax.scaling.fit import Metric


def plain(value):
    """ConfigDicts, dicts, lists and tuples as plain dicts and lists, recursively."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def override_value(value) -> str:
    """A value as the trainer's --config.KEY=VALUE flag parses it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def set_field(config, key: str, value) -> None:
    """config[a][b][c] = value for key "a.b.c"; an unknown key raises naming it."""
    *path, last = key.split(".")
    node = config
    for part in path:
        if part not in node:
            raise ValueError(f"override {key}: the config has no {part!r}")
        node = node[part]
    if last not in node:
        raise ValueError(f"override {key}: the config has no {last!r}")
    node[last] = value


@dataclasses.dataclass
class Point:
    name: str
    family: str
    config: str
    overrides: dict[str, Any]
    size: str = ""
    budget: str = ""
    ablation: str = ""
    base: str = ""
    estimated_s: float = 0.0
    launch: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def override_args(self) -> list[str]:
        return [f"--config.{key}={override_value(value)}" for key, value in self.overrides.items()]

    def train_args(self, workdir: str) -> list[str]:
        """The trainer's arguments (python -m transfusion_jax.train ARGS)."""
        return ["--config", self.config, "--workdir", workdir, *self.override_args()]

    def resolved(self):
        """The run's config: the experiment's get_config(arg) with the overrides applied (what
        the trainer would build, before its own checks)."""
        config = load_config(self.config)
        for key, value in self.overrides.items():
            set_field(config, key, value)
        return config


@dataclasses.dataclass
class Prepare:
    name: str
    workdir: str
    done: str
    command: str
    estimated_s: float = 0.0
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # over os.environ

    def argv(self, python: str) -> list[str]:
        words = shlex.split(self.command)
        return [python, *words[1:]] if words and words[0] == "python" else words


@dataclasses.dataclass
class Sweep:
    name: str
    sweep_dir: str
    points: list[Point]
    metrics: list[Metric]
    prepare: list[Prepare]
    env: dict[str, str]
    launch: dict[str, dict[str, Any]]

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise ValueError(f"no point {name!r} in sweep {self.name}; points: "
                         f"{', '.join(p.name for p in self.points)}")

    def select(self, names) -> list[Point]:
        return [self.point(n) for n in names] if names else list(self.points)


def from_dict(d) -> Sweep:
    d = plain(d)
    points = [Point(name=p["name"], family=p["family"], config=p["config"],
                    overrides=dict(p.get("overrides", {})), size=str(p.get("size", "")),
                    budget=str(p.get("budget", "")), ablation=p.get("ablation", ""),
                    base=p.get("base", ""), estimated_s=float(p.get("estimated_s", 0)),
                    launch=p.get("launch", {}) or {}) for p in d["points"]]
    names = [p.name for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"sweep {d['name']}: point names repeat: {duplicates}")
    for p in points:
        if os.sep in p.name or p.name in ("", ".", ".."):
            raise ValueError(f"sweep {d['name']}: point name {p.name!r} is no folder name")
    return Sweep(name=d["name"], sweep_dir=d.get("sweep_dir", ""), points=points,
                 metrics=[Metric.from_dict(m) for m in d.get("metrics", [])],
                 prepare=[Prepare(**p) for p in d.get("prepare", [])],
                 env={k: str(v) for k, v in (d.get("env") or {}).items()},
                 launch=d.get("launch", {}) or {})


def load_sweep(spec: str) -> Sweep:
    """'experiments/scaling.py:micro' -> its Sweep."""
    return from_dict(load_config(spec))
