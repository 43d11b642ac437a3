"""Multi-host training on JAX's distributed runtime, on this machine: 2 CPU processes of 4 fake
devices each (launch/local_multiprocess.sh) against 1 process of 8, and checkpoints that move
between topologies. Also the data streams (host_data.py) and cluster detection on their own.
(Evaluation split over processes: tests/test_evaluate_processes.py.)"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from transfusion_jax.core import distributed
from transfusion_jax.core.config import load_config
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.data.host_data import HostData, stream_rows
from transfusion_jax.models import patches_per_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/transfusion.py:tiny"
# total_steps far away: the runs stop by preemption or stop_at_step, on one lr schedule.
COMMON = ["--config", TINY, "--config.total_steps=100000", "--config.checkpoint_every=100000",
          "--config.optimizer.warmup_steps=10", "--config.log_every=1"]
MESH_2X2X2 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
TIMEOUT = 400  # seconds for any one run; the tests take about 2-3 minutes in all


def losses(workdir):
    import json
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}


def single_process(workdir, devices, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run([sys.executable, "-m", "transfusion_jax.train", "--workdir",
                          str(workdir), *COMMON, *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stderr


def preempted_two_process_run(workdir, logs):
    """2 processes x 4 devices on a 2x2x2 mesh, the tiny shapes evaluator at step 2; SIGTERM to
    process 1 alone once 3 steps are logged: JAX's preemption service has both checkpoint after
    the same step and exit 0."""
    launcher = subprocess.Popen(
        ["bash", "launch/local_multiprocess.sh", "--num_processes", "2",
         "--devices_per_process", "4", "--log_dir", str(logs), "--", "--workdir", str(workdir),
         *COMMON, *MESH_2X2X2, "--config.evals.shapes.every=2"],
        env=dict(os.environ, PYTHON=sys.executable), cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert launcher.poll() is None, _tail(logs)
            assert time.time() < deadline, _tail(logs)
            time.sleep(0.5)
        os.kill(_pid_of_process(launcher.pid, 1), signal.SIGTERM)
        assert launcher.wait(timeout=TIMEOUT) == 0, _tail(logs)
    finally:  # whatever happened, nothing outlives the test
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    log0 = (logs / "process_0.log").read_text()
    assert "jax.distributed (flags): process 0 of 2, 4 of 8 devices" in log0
    assert "preemption notice" in log0
    assert "stopped at step" not in (logs / "process_1.log").read_text()  # process 0 reports
    return int(log0.split("stopped at step ")[1].split(".")[0])


def _pid_of_process(launcher_pid, process_id):
    """The trainer with --process_id=N among the launcher's children (its own session)."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            if os.getsid(pid) != launcher_pid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode().split("\0")
        except (OSError, ProcessLookupError):
            continue  # ended meanwhile
        if "transfusion_jax.train" in args and f"--process_id={process_id}" in args:
            return pid
    raise AssertionError(f"no trainer with --process_id={process_id} in session {launcher_pid}")


def _tail(logs):
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))


@pytest.mark.slow
def test_two_processes_equal_one_and_the_checkpoint_moves_to_another_mesh(tmp_path):
    """Acceptance: (1) 2 processes x 4 devices give the losses of 1 process x 8 devices on the
    same 2x2x2 mesh; (2) the 2-process checkpoint restores in 1 process of 4 devices on an
    fsdp=4 mesh and training continues with the losses of the uninterrupted run."""
    two, logs = tmp_path / "two", tmp_path / "logs"
    stopped = preempted_two_process_run(two, logs)
    assert stopped >= 3 and os.listdir(two / "checkpoints") == [str(stopped)]
    # Evaluation in a multi-process run: the params gathered, every process evaluates on its own
    # 4 devices (the run's mesh needs 8: fsdp over its 4), its share of the batches (the tiny
    # shapes evaluator has one: process 0's); process 0 logs and writes.
    during = json.loads((two / "evals" / "2.json").read_text())
    assert during["shapes/text_to_image/items"] == 2, during
    log0, log1 = ((logs / f"process_{i}.log").read_text() for i in range(2))
    assert "step 2: eval shapes" in log0 and "step 2: eval shapes" not in log1
    assert "eval shapes: this process computed 1 of 1 batches" in log0
    assert "eval shapes: this process computed 0 of 1 batches" in log1
    assert sorted(os.listdir(two / "checkpoints" / str(stopped) / "data")) == \
        ["commit_success.txt", "stream_0-of-2.json", "stream_1-of-2.json"]

    # The reference: one process, 8 devices, the same mesh and the same 2 data streams.
    one = tmp_path / "one"
    single_process(one, 8, *MESH_2X2X2, "--data_streams=2", f"--config.stop_at_step={stopped + 2}")
    ref, got = losses(one), losses(two)
    assert sorted(got) == list(range(1, stopped + 1))
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=1e-5)

    # The 2-process checkpoint on 1 process of 4 devices, mesh fsdp=4: the next losses follow.
    moved = tmp_path / "moved"
    shutil.copytree(two, moved)
    err = single_process(moved, 4, "--config.mesh.data=1", "--config.mesh.fsdp=4",
                         "--config.mesh.tensor=1", f"--config.stop_at_step={stopped + 2}")
    assert f"resumed from {moved}/checkpoints/{stopped}" in err
    assert "2 data streams over 1 processes" in err
    after = losses(moved)
    assert sorted(after) == list(range(1, stopped + 3))
    np.testing.assert_allclose([after[s] for s in after], [ref[s] for s in after], rtol=1e-5)


# ---------------------------------------------------------------- data streams, unit by unit

@pytest.mark.parametrize("batch,streams,rows,expected", [
    (8, 2, (0, 4), {0: slice(0, 4)}),                       # S == P
    (8, 2, (0, 8), {0: slice(0, 4), 1: slice(0, 4)}),       # S > P: both streams here
    (8, 1, (4, 8), {0: slice(4, 8)}),                       # S < P: half of the one stream
    (12, 4, (4, 8), {1: slice(1, 3), 2: slice(0, 2)}),      # unaligned: parts of two streams
])
def test_stream_rows(batch, streams, rows, expected):
    assert stream_rows(batch, streams, *rows) == expected


def test_stream_rows_names_the_batch_size():
    with pytest.raises(ValueError, match="data.batch_size=8 must be divisible by the number of "
                                         r"data streams \(3\)"):
        stream_rows(8, 3, 0, 8)


@pytest.mark.slow
def test_processes_sharing_a_stream_feed_its_halves(tmp_path):
    """A 1-stream run continued on 2 processes: each reads the stream, keeps its half, and the
    halves (and the restored states) make the batches of the 1-process run."""
    cfg = load_config(TINY)
    tokenizer = get_tokenizer(cfg.data, tmp_path)
    make = lambda rows, streams=1: HostData(cfg.data, patches_per_image=patches_per_image(
        cfg.model), tokenizer=tokenizer, num_streams=streams, rows=rows)
    whole, lo, hi = make((0, 8)), make((0, 4)), make((4, 8))
    next(whole)
    state = whole.get_state()
    assert list(state) == [0] and lo.owned == [0] and hi.owned == []  # one writer per stream
    lo.set_state(state)
    hi.set_state(state)
    a, b, c = next(whole), next(lo), next(hi)
    for key in a:
        np.testing.assert_array_equal(a[key], np.concatenate([b[key], c[key]]))
    for d in (whole, lo, hi):
        d.close()


# ---------------------------------------------------------------- starting the runtime

@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
      "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, None),  # one task in an allocation
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}, "tpu"),
])
def test_detect_cluster(environ, expected):
    assert distributed.detect_cluster(environ) == expected


def test_plain_machine_starts_nothing():
    assert distributed.maybe_initialize(environ={}) is None
    assert distributed.maybe_initialize(mode="off", environ={"SLURM_NTASKS": "4"}) is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="sometimes"), "--distributed='sometimes'"),
    (dict(num_processes=2), "go together outside a cluster"),
    (dict(mode="off", process_id=0), "--distributed=off with"),
])
def test_bad_distributed_flags_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.maybe_initialize(environ={}, **kwargs)
