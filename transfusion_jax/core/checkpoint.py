"""Orbax checkpoints: the train state and the data iterator state, saved together per step.

Layout of a workdir:
    config.json                 the run's config
    checkpoints/<step>/state    TrainState (params, optimizer, EMA, step, RNG), sharded arrays
    checkpoints/<step>/data     the iterator state of each data stream (host_data.py), one JSON
                                file per stream: stream_<s>-of-<S>.json

All processes save and restore together (Orbax needs a workdir every host can reach: a shared
file system or a bucket). The state is written and read shard by shard, so a checkpoint
restores on another mesh or process count. Each data stream's state is written by the one
process that owns it, and each process reads back the streams it reads.
"""
import dataclasses
import json
import os
import re

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from jax.sharding import SingleDeviceSharding

ITEMS = ("state", "data")


_STREAM_FILE = re.compile(r"stream_(\d+)-of-(\d+)\.json$")


class DataStreamsHandler(ocp.CheckpointHandler):
    """Orbax handler of the `data` item: per-stream iterator states, written by their owners."""

    def save(self, directory: epath.Path, args: "DataStreamsSave"):
        for s, state in args.states.items():
            (directory / f"stream_{s}-of-{args.num_streams}.json").write_bytes(state)

    def restore(self, directory: epath.Path, args: "DataStreamsRestore") -> dict[int, bytes]:
        files = {int(m[1]): (int(m[2]), f) for f in directory.iterdir()
                 if (m := _STREAM_FILE.match(f.name))}
        missing = [s for s in args.streams if s not in files]
        if missing:
            raise ValueError(f"{directory} has no state for data streams {missing} "
                             f"(it holds {sorted(files)})")
        return {s: files[s][1].read_bytes() for s in args.streams}

    def metadata(self, directory: epath.Path):
        del directory

    def finalize(self, directory: epath.Path):
        del directory

    def close(self):
        pass


@ocp.args.register_with_handler(DataStreamsHandler, for_save=True)
@dataclasses.dataclass
class DataStreamsSave(ocp.args.CheckpointArgs):
    states: dict  # {stream: state bytes} of the streams this process owns
    num_streams: int


@ocp.args.register_with_handler(DataStreamsHandler, for_restore=True)
@dataclasses.dataclass
class DataStreamsRestore(ocp.args.CheckpointArgs):
    streams: list  # the streams this process reads


def data_streams(manager, step: int) -> int:
    """The number of data streams of a saved step (from its file names)."""
    directory = epath.Path(manager.directory) / str(step) / "data"
    counts = {int(m[2]) for f in directory.iterdir() if (m := _STREAM_FILE.match(f.name))}
    if len(counts) != 1:
        raise ValueError(f"{directory}: expected stream_<s>-of-<S>.json files of one S, found "
                         f"{sorted(f.name for f in directory.iterdir())}")
    return counts.pop()


def make_manager(workdir: str, every: int, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options, item_names=ITEMS)


def save(manager, step: int, state, data_states: dict[int, bytes] | bytes, force: bool = False,
         num_streams: int = 1) -> bool:
    """Async save (returns at once), called by every process with the data states it owns
    (HostData.get_state; bytes: the one stream of a single-stream run, saved by process 0);
    `force` saves off the interval (preemption, last step)."""
    if isinstance(data_states, bytes):
        data_states = {0: data_states} if jax.process_index() == 0 else {}
    return manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=DataStreamsSave(data_states, num_streams)))


def restore(manager, step: int, abstract_state, streams: list[int] | None = None):
    """(state placed as `abstract_state`'s shardings say, {stream: data state bytes} of
    `streams`; None: the state only)."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if streams is not None:
        items["data"] = DataStreamsRestore(list(streams))
    out = manager.restore(step, args=ocp.args.Composite(**items))
    return out.state, (out.data if streams is not None else None)


def write_config(workdir: str, config):
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def latest_step(workdir: str) -> int:
    """The newest saved step of a workdir; FileNotFoundError naming the folder when none
    (nothing is created: this only reads)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    manager = make_manager(workdir, every=1, keep=1)
    step = manager.latest_step()
    manager.close()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    return step


def restore_subtrees(workdir: str, names: tuple[str, ...], step: int | None = None,
                     optional: tuple[str, ...] = ()) -> dict:
    """{name: subtree} of the saved state's top-level fields `names` and, when saved,
    `optional` (fields saved as None or empty are left out), read on the first local device;
    the rest (optimizer state, ...) is not read. Model-agnostic: shapes come from the checkpoint's own metadata, so inference and the
    frozen autoencoder load without building any trainer's state."""
    step = latest_step(workdir) if step is None else step
    path = epath.Path(os.path.abspath(workdir)) / "checkpoints" / str(step) / "state"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: no state saved at step {step}")
    saved = ocp.PyTreeCheckpointHandler().metadata(path)  # the item's own metadata
    saved = getattr(saved, "tree", saved)
    missing = [n for n in names if n not in saved]
    if missing:
        raise ValueError(f"{path}: the saved state has no {missing} (it holds {sorted(saved)})")
    device = SingleDeviceSharding(jax.local_devices()[0])
    target = {n: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              saved[n]) for n in (*names, *optional) if saved.get(n)}
    if not target:
        return {}
    checkpointer = ocp.PyTreeCheckpointer()
    out = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    checkpointer.close()
    return dict(out)
