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
import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import sys
import threading

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding

from transfusion_jax.core.config import with_absolute_paths

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


def check_writable(workdir: str) -> None:
    """Creates workdir/checkpoints and writes a probe file there: a folder that cannot take a
    checkpoint stops the run at start naming it (Orbax's asynchronous save would fail only at
    the first checkpoint, in a background thread)."""
    folder = os.path.join(workdir, "checkpoints")
    probe = os.path.join(folder, f".write_probe_{jax.process_index()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{folder} cannot take checkpoints ({type(e).__name__}: "
                         f"{e.strerror or e}); expected a writable folder") from None


class _OrbaxFailureCopies(logging.Filter):
    """Orbax reports one failed background write many times over (per array, per thread, per
    asyncio task, each with its traceback: hundreds of lines for a full disk); the trainer
    reports it once (StorageError). Orbax's error records keep their first line; asyncio's
    "exception was never retrieved" copies of Orbax's errors are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            return "orbax" not in record.getMessage()
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            record.msg, record.args = record.getMessage().splitlines()[0][:300], ()
            record.exc_info = record.exc_text = None
        return True


def _event_loop_closed(exc_type, value, tb) -> bool:
    """Tensorstore's callbacks into Orbax's finished event loops, after a failed write."""
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return exc_type is RuntimeError and "Event loop is closed" in str(value)
        tb = tb.tb_next
    return False


def _quiet_orbax_failures() -> None:
    """Installed once, with the first checkpoint manager: see _OrbaxFailureCopies; tensorstore's
    calls into Orbax's closed event loops (one per pending write) are not printed."""
    if getattr(sys.unraisablehook, "_transfusion_jax", False):
        return
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OrbaxFailureCopies())
    previous = sys.unraisablehook

    def unraisablehook(args):
        if not _event_loop_closed(args.exc_type, args.exc_value, args.exc_traceback):
            previous(args)

    unraisablehook._transfusion_jax = True
    sys.unraisablehook = unraisablehook


def make_manager(workdir: str, every: int, keep: int) -> ocp.CheckpointManager:
    _quiet_orbax_failures()
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options, item_names=ITEMS)


class StorageError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions, a bucket refusing):
    the run stops at once, naming the folder; the newest complete checkpoint stays good."""


def _storage_reason(error: BaseException) -> str:
    """The operating system's words for a failed write (tensorstore puts them at the end of a
    long message), with the file; else the error's first line."""
    text = str(error)
    code = re.search(r"os_error_code='(\d+)'", text)
    if not code:
        return _reason(error)
    where = re.search(r'Failed (?:writing|to write)[^"]*"([^"]+)"', text)
    return (f"{os.strerror(int(code[1]))} [errno {code[1]}]" +
            (f" writing {where[1]}" if where else ""))


def _storage_error(manager, error: BaseException, doing: str) -> StorageError:
    latest = manager.latest_step()  # finalised steps only: a failed save leaves a tmp folder
    kept = (f"the newest complete checkpoint is step {latest}" if latest is not None else
            "no checkpoint was completed")
    return StorageError(
        f"{manager.directory}: {doing} failed ({_storage_reason(error)}). Disk full, a quota, or "
        f"permissions? {kept}; free space or fix the folder, then run the same command to "
        "resume from it")


def save(manager, step: int, state, data_states: dict[int, bytes] | bytes, force: bool = False,
         num_streams: int = 1) -> bool:
    """Async save (returns at once), called by every process with the data states it owns
    (HostData.get_state; bytes: the one stream of a single-stream run, saved by process 0);
    `force` saves off the interval (preemption, last step). A failure of the previous save
    (written in the background) surfaces here as StorageError."""
    if isinstance(data_states, bytes):
        data_states = {0: data_states} if jax.process_index() == 0 else {}
    previous, manager.transfusion_saving = getattr(manager, "transfusion_saving", None), step
    try:
        return manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=DataStreamsSave(data_states, num_streams)))
    except Exception as e:  # noqa: BLE001 (Orbax raises the writer's own error types)
        failed = previous if previous is not None and previous != manager.latest_step() else step
        raise _storage_error(manager, e, f"writing checkpoint {failed}") from None


def finish(manager, failing: bool = False) -> None:
    """Waits for the last asynchronous save and closes the manager: StorageError when that save
    failed; with `failing` (the run is already stopping on another error) only reports it."""
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        error = _storage_error(manager, e, "writing checkpoint "
                               f"{getattr(manager, 'transfusion_saving', '')}")
        if not failing:
            raise error from None
        print(f"warning: {error}", file=sys.stderr, flush=True)
    finally:
        try:
            manager.close()
        except Exception:  # noqa: BLE001 (its error, if any, was reported just above)
            pass


def restore(manager, step: int, abstract_state, streams: list[int] | None = None):
    """(state placed as `abstract_state`'s shardings say, {stream: data state bytes} of
    `streams`; None: the state only)."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if streams is not None:
        items["data"] = DataStreamsRestore(list(streams))
    out = manager.restore(step, args=ocp.args.Composite(**items))
    return out.state, (out.data if streams is not None else None)


def write_config(workdir: str, config):
    """workdir/config.json, with the local paths absolute (core/config.py: PATH_FIELDS)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(with_absolute_paths(config).to_json_best_effort(indent=2, sort_keys=True))


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


def _state_metadata(path: epath.Path) -> dict:
    """The saved state's tree of array metadata (shape, dtype), read from the item's own
    metadata file: no array is read, no trainer state is built."""
    saved = ocp.PyTreeCheckpointHandler().metadata(path)
    return dict(getattr(saved, "tree", saved))


def restore_subtrees(workdir: str, names: tuple[str, ...], step: int | None = None,
                     optional: tuple[str, ...] = ()) -> dict:
    """{name: subtree} of the saved state's top-level fields `names` and, when saved,
    `optional` (fields saved as None or empty are left out), read on the first local device;
    the rest (optimizer state, ...) is not read. Model-agnostic: shapes come from the
    checkpoint's own metadata, so inference and the frozen autoencoder load without building
    any trainer's state."""
    step = latest_step(workdir) if step is None else step
    path = epath.Path(os.path.abspath(workdir)) / "checkpoints" / str(step) / "state"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: no state saved at step {step}")
    saved = _state_metadata(path)
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


# ---------------------------------------------------------------------------------------------
# Resuming safely: the new config against the saved one, and damaged checkpoints set aside.

DAMAGED = "checkpoints_damaged"  # beside checkpoints/: what a resume could not read, kept


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _matches(field: str, prefixes) -> bool:
    return any(field == p or field.startswith(p + ".") for p in prefixes)


def has_checkpoints(workdir: str) -> bool:
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def check_resume(workdir: str, config, free: tuple[str, ...], allowed: tuple[str, ...] = (),
                 added: dict | None = None):
    """Before a resume writes anything: every field whose value differs from the workdir's saved
    config.json must be `free` (logging, checkpointing, evaluation, mesh: they change neither
    the model nor the batches) or named in `allowed` (the user's --allow_config_changes, for an
    intended change such as a longer schedule); else ValueError listing each field, saved and
    new value. `added`: fields that later versions added, with the value that behaves as a
    config without them did (a workdir saved before them reads as having that value). Nothing
    to check when the workdir has no checkpoint yet."""
    if not has_checkpoints(workdir):
        return []
    saved = {**(added or {}), **_flatten(with_absolute_paths(read_config(workdir)).to_dict())}
    new = _flatten(json.loads(with_absolute_paths(config).to_json_best_effort()))
    changed = sorted(f for f in set(saved) | set(new) if saved.get(f, "<absent>") !=
                     new.get(f, "<absent>") and not _matches(f, free))
    refused = [f for f in changed if not _matches(f, allowed)]
    if refused:
        lines = "; ".join(f"{f}: {saved.get(f, '<absent>')!r} -> {new.get(f, '<absent>')!r}"
                          for f in refused)
        raise ValueError(
            f"{workdir} holds a run with another config: {lines}. A resume must train the same "
            f"model on the same batches; use a new --workdir, or name intended changes with "
            f"--allow_config_changes={','.join(refused)}")
    return changed


def set_aside(manager, step: int, reason: str) -> str:
    """Moves checkpoints/<step> to checkpoints_damaged/<step> (never deleted; process 0 moves,
    all processes then re-read the step list) and says which and why."""
    source = epath.Path(manager.directory) / str(step)
    root = epath.Path(manager.directory).parent / DAMAGED
    target, n = root / str(step), 1
    while target.exists():
        target, n = root / f"{step}.{n}", n + 1
    if jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        print(f"warning: checkpoint {source} cannot be restored ({reason}); moved to {target}",
              file=sys.stderr, flush=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"transfusion_jax:set_aside:{step}")
    manager.reload()
    return str(target)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0].split(" See full TensorStore details")[0] if text else ""
    return f"{type(error).__name__}: {first[:160]}"


@contextlib.contextmanager
def _quiet_reader_threads():
    """While a possibly damaged checkpoint is read: the failure is reported once, by the
    caller; Orbax's reader threads and tasks would each print theirs ("Event loop is closed",
    "Task exception was never retrieved": thousands of lines)."""
    hooks = (threading.excepthook, sys.excepthook, sys.unraisablehook)
    asyncio_logger = logging.getLogger("asyncio")
    level = asyncio_logger.level
    threading.excepthook = sys.unraisablehook = lambda args: None
    sys.excepthook = lambda *args: None
    asyncio_logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        gc.collect()  # the failed readers' coroutines, while their reports are still muted
        threading.excepthook, sys.excepthook, sys.unraisablehook = hooks
        asyncio_logger.setLevel(level)


def newest_readable_step(manager) -> int:
    """The newest step whose files read back (state metadata, data stream states); newer ones
    that do not are set aside. 0 for a workdir without checkpoints; FileNotFoundError when it
    had some and none reads (a fresh start would drop the run's metrics)."""
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            data_streams(manager, step)
            for path in (epath.Path(manager.directory) / str(step) / "data").iterdir():
                if _STREAM_FILE.match(path.name):
                    json.loads(path.read_bytes())
            _state_metadata(epath.Path(manager.directory) / str(step) / "state")
            return step
        except Exception as e:  # noqa: BLE001 (any failure to read means: not usable)
            set_aside(manager, step, _reason(e))
    if steps:
        raise FileNotFoundError(
            f"no checkpoint in {manager.directory} could be read; the damaged ones are in "
            f"{epath.Path(manager.directory).parent / DAMAGED} (move one back, or start a new "
            "run in a new --workdir)")
    return 0


def check_params_match(manager, step: int, abstract_state) -> None:
    """ValueError naming the first parameter whose saved shape differs from what the config
    builds (a model change, which a resume cannot load), before Orbax's own message."""
    path = epath.Path(manager.directory) / str(step) / "state"
    try:
        saved = _flatten(_state_metadata(path).get("params") or {})
    except Exception:  # noqa: BLE001 (unreadable: the restore says so and sets it aside)
        return
    built = _flatten(dict(abstract_state.params))
    for name in sorted(set(saved) | set(built)):
        old = tuple(saved[name].shape) if name in saved else None
        new = tuple(built[name].shape) if name in built else None
        if old != new:
            raise ValueError(f"checkpoint {path}: parameter params.{name} has shape {old}, the "
                             f"config builds {new}: the model fields changed (a new run needs a "
                             "new --workdir)")


def restore_newest_good(manager, step: int, abstract_state, streams, num_streams: int):
    """(step, state, data states) of the newest checkpoint from `step` down that restores;
    those that fail are set aside. A fallback step must have `num_streams` data streams."""
    while True:
        check_params_match(manager, step, abstract_state)  # a config change, not damage
        try:
            with _quiet_reader_threads():
                state, data = restore(manager, step, abstract_state, streams)
            return step, state, data
        except Exception as e:  # noqa: BLE001
            set_aside(manager, step, _reason(e))
        step = newest_readable_step(manager)  # raises when none is left
        saved_streams = data_streams(manager, step)
        if saved_streams != num_streams:
            raise ValueError(f"checkpoint {manager.directory}/{step}, the newest good one, has "
                             f"{saved_streams} data streams, not {num_streams}: resume again (it "
                             "is now the latest)")
