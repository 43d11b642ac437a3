"""JAX's multi-controller runtime: one trainer process per host (a TPU VM worker, a GPU node or
a single GPU, or a local CPU process), all running the same program on one global mesh.

    maybe_initialize(coordinator_address, num_processes, process_id, mode="auto")

`auto` starts the runtime only when there is something to join: explicit flags, the
JAX_COORDINATOR_ADDRESS variable, or a cluster environment JAX can read its topology from (a
Cloud TPU VM, a SLURM job step of several tasks, Open MPI). On a plain single machine it does
nothing, so the same command runs on a laptop and on a pod. `on` always starts it (JAX fills
unset values from the environment); `off` never does.

Evaluation is data parallel over processes (evaluators/common.py): an evaluator deals its
batches, batch i to process i % process_count (`mine`), and `gather_batches` brings every
process's per-batch outputs back in batch order, so every process computes the same scores.
With one process both cost nothing.
"""
import collections
import importlib.util
import os
import pickle
import sys
from typing import Callable, Mapping, TypeVar

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

MODES = ("auto", "on", "off")
T = TypeVar("T")


def detect_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
    """The multi-process environment this process runs in, or None on a plain machine.

    Mirrors the environments jax.distributed.initialize() auto-detects, read from the
    environment only (no metadata-server queries), so that detection is cheap and testable."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in environ for k in slurm) and int(environ["SLURM_NTASKS"]) > 1:
        return "slurm"  # an srun step of several tasks (a lone task in an allocation is not)
    if "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "2")) > 1:
        return "openmpi"
    if environ.get("TPU_WORKER_HOSTNAMES") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"  # GKE TPU pods and multi-slice set these
    if importlib.util.find_spec("libtpu") is not None:
        return "tpu"  # a Cloud TPU VM (jax[tpu]); JAX reads the slice from the metadata server
    return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, mode: str = "auto",
                     environ: Mapping[str, str] = os.environ) -> str | None:
    """Starts the distributed runtime when `mode` and the environment call for it (see the
    module doc); returns why it started (for the log), or None when it did not."""
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r}: expected one of {MODES}")
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if mode == "off":
        if any(given):
            raise ValueError("--distributed=off with --coordinator_address/--num_processes/"
                             "--process_id given: drop the flags or the mode")
        return None
    if any(given) and not all(given) and detect_cluster(environ) is None:
        raise ValueError(
            "--coordinator_address, --num_processes and --process_id go together outside a "
            f"cluster environment; got coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}")
    reason = "flags" if any(given) else detect_cluster(environ)
    if reason is None and mode == "auto":
        return None
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return reason or "--distributed=on"


def define_flags() -> dict:
    """The flags of `maybe_initialize` (train, evaluate): {mode, coordinator, num_processes,
    process_id}. Unset: auto-detected under a cluster (Cloud TPU, SLURM, Open MPI,
    JAX_COORDINATOR_ADDRESS); nothing on a plain machine."""
    return dict(
        mode=flags.DEFINE_enum("distributed", "auto", MODES,
                               "start jax.distributed: auto (flags or a cluster), on, off"),
        coordinator=flags.DEFINE_string(
            "coordinator_address", None,
            "host:port of process 0's coordinator (explicit multi-host)"),
        num_processes=flags.DEFINE_integer("num_processes", None, "processes in the job"),
        process_id=flags.DEFINE_integer("process_id", None, "this process, 0..num_processes-1"))


def initialize_from_flags(values: dict) -> None:
    """maybe_initialize with the values of define_flags' flags; logs why it started."""
    started = maybe_initialize(values["coordinator"], values["num_processes"],
                               values["process_id"], values["mode"])
    if started:
        log(f"jax.distributed ({started}): {describe()}")


def describe() -> str:
    return (f"process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} of {jax.device_count()} devices "
            f"({jax.devices()[0].platform})")


def first_then_others(name: str, fn: Callable[[], T]) -> T:
    """Process 0 runs `fn` first (e.g. trains and writes the tokenizer into the shared workdir);
    the others wait at a barrier and then run it (and so load what process 0 wrote)."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"transfusion_jax:{name}")
    return result if jax.process_index() == 0 else fn()


def log(message: str) -> None:
    """One line on stderr, from process 0 only: a run's console reads as one process."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


# Batches dealt by `mine` since the last `dealt()`: the count common.run reports per evaluator.
_dealt = collections.Counter()


def mine(index: int) -> bool:
    """Whether this process computes batch `index` of an evaluation (batch i is process
    i % process_count's). Call it once per batch, in order, on every process."""
    here = index % jax.process_count() == jax.process_index()
    _dealt["batches"] += 1
    _dealt["here"] += here
    return here


def dealt() -> tuple[int, int]:
    """(batches this process computed, batches dealt) by `mine` since the last call."""
    out = (_dealt["here"], _dealt["batches"])
    _dealt.clear()
    return out


def gather(obj) -> list:
    """[every process's `obj`] in process order (any picklable value; a collective: every process
    calls it). Pickled bytes, padded to the longest, through one allgather of uint8 arrays (and
    one of their lengths); one process: [obj], no copy."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray(data.size, np.int32))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    everyone = multihost_utils.process_allgather(padded)  # [processes, longest]
    return [pickle.loads(everyone[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


def gather_batches(outputs: dict) -> list:
    """Every process's {batch index: output} (of the batches `mine` gave it), merged: the
    outputs of all batches, in batch order."""
    merged = {}
    for part in gather(outputs):
        merged.update(part)
    return [merged[i] for i in sorted(merged)]
