"""Evaluation split over the processes of a multi-process run (evaluators/common.py): every
process computes its share of each evaluator's batches (core/distributed.py: mine, gather), all
return the scalars one process gives, process 0 alone writes the files."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from transfusion_jax.core import distributed
from transfusion_jax.core.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 400  # seconds for any one run
# Evaluators with several batches each on the tiny run (counts in the comments). Left out for
# the suite's time: perplexity (ranked's scorer, the same dealing), captioning and batched
# shapes (the generator FID's images come from, the same dealing; shapes in 2 processes:
# test_multihost, batched shapes against one batch: test_evaluate_shapes).
EVALS = {
    "ranked": {"type": "ranked", "num": 6, "batch_size": 2},  # 4 batches
    "denoising": {"type": "denoising", "num": 2, "timesteps": [300, 600],
                  "quality_timesteps": [600, 900]},  # 3: a batch per timestep
    "fid": {"type": "fid", "num": 4, "batch": 2, "random_weights": True, "dims": 64,
            "sampler": "ddim", "steps": 2},  # 4: 2 of the reference, 2 generated
}
SHARE = re.compile(r"eval (\w+): this process computed (\d+) of (\d+) batches")


# ---------------------------------------------------------------- the helpers, in one process

def test_one_process_computes_every_batch_and_gathers_without_a_collective(monkeypatch):
    distributed.dealt()
    assert [distributed.mine(i) for i in range(3)] == [True] * 3
    assert distributed.dealt() == (3, 3) and distributed.dealt() == (0, 0)
    obj = {"rows": np.arange(3)}
    monkeypatch.setattr(distributed.multihost_utils, "process_allgather",
                        lambda *a, **k: pytest.fail("a collective with one process"))
    assert distributed.gather(obj)[0] is obj
    assert distributed.gather_batches({2: "c", 0: "a", 1: "b"}) == ["a", "b", "c"]


def test_two_processes_deal_alternate_batches_and_gather_padded_pickles(monkeypatch):
    """Process 1 of 2 (the runtime stubbed): batches 1, 3, ...; `gather` unpickles process 0's
    longer bytes from the padded allgather."""
    theirs = np.frombuffer(pickle.dumps({0: list(range(50))}), np.uint8)

    def allgather(x):  # [process 0's, ours], padded to the longest as the real one sees it
        x = np.asarray(x)
        if x.ndim == 0:
            return np.stack([np.int32(theirs.size), x])
        assert x.size == theirs.size  # ours was padded to theirs
        return np.stack([theirs, x])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(distributed.multihost_utils, "process_allgather", allgather)
    distributed.dealt()
    assert [distributed.mine(i) for i in range(5)] == [False, True, False, True, False]
    assert distributed.dealt() == (2, 5)
    assert distributed.gather_batches({1: "ours"}) == [list(range(50)), "ours"]


# ---------------------------------------------------------------- the evaluate entry point

def evaluate(workdir, logs, processes):
    """`python -m transfusion_jax.evaluate` as one plain process, or as `processes` processes
    (launch/local_multiprocess.sh), each of 2 CPU devices -> the evals/2.json it wrote."""
    if processes == 1:
        os.makedirs(logs)
        with open(logs / "process_0.log", "w") as log:
            out = subprocess.run(
                [sys.executable, "-m", "transfusion_jax.evaluate", "--workdir", str(workdir)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=TIMEOUT,
                env=dict(os.environ, JAX_PLATFORMS="cpu",
                         XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    else:
        out = subprocess.run(
            ["bash", "launch/local_multiprocess.sh", "--num_processes", str(processes),
             "--devices_per_process", "2", "--log_dir", str(logs), "--module",
             "transfusion_jax.evaluate", "--", "--workdir", str(workdir)],
            cwd=ROOT, timeout=TIMEOUT, env=dict(os.environ, PYTHON=sys.executable))
    assert out.returncode == 0, "\n".join(
        p.read_text()[-3000:] for p in sorted(logs.glob("*.log")))
    return json.loads((workdir / "evals" / "2.json").read_text())


def printed(log: str) -> dict:
    """The scalars a process printed (stdout, after its log lines)."""
    return json.loads(log[log.index("\n{\n") + 1:log.rindex("}") + 1])


def files(workdir):
    return sorted(os.path.relpath(os.path.join(d, f), workdir)
                  for d, _, names in os.walk(workdir / "evals") for f in names)


@pytest.mark.slow
def test_two_processes_split_the_batches_and_give_the_scalars_of_one(tmp_path):
    """A tiny run (2 steps) evaluated by `python -m transfusion_jax.evaluate` as 1 process and
    as 2 processes of 2 CPU devices: the same scalars, every batch computed by one process,
    the files written once."""
    from transfusion_jax.trainers import transfusion as trainer
    config = load_config("experiments/transfusion.py:tiny")
    config.total_steps, config.optimizer.warmup_steps = 2, 1
    config.evals = {name: {**spec, "every": 0} for name, spec in EVALS.items()}
    trained = tmp_path / "trained"
    trainer.train(config, str(trained))
    one, two = tmp_path / "one", tmp_path / "two"  # copies: each computes its FID reference
    shutil.copytree(trained, one)
    shutil.copytree(trained, two)

    alone = evaluate(one, tmp_path / "logs_one", 1)
    split = evaluate(two, tmp_path / "logs_two", 2)
    # Bit-equal: each process evaluates on a mesh of its own 2 devices, as the single process
    # does, so both run the same programs on the same batches with the same keys. (1 process
    # of 4 devices shards the batches differently: float32 sums agree to about 5e-7, and
    # denoising's gain 1 - right/wrong, with right and wrong that close, to 0.7%.)
    assert {key.split("/")[0] for key in alone} == set(EVALS) and split == alone

    logs = [(tmp_path / "logs_two" / f"process_{i}.log").read_text() for i in range(2)]
    shares = [{name: (int(here), int(total)) for name, here, total in SHARE.findall(log)}
              for log in logs]
    assert sorted(shares[0]) == sorted(shares[1]) == sorted(EVALS)
    for name in EVALS:  # every batch computed once, each process fewer than all
        (here0, total), (here1, total1) = shares[0][name], shares[1][name]
        assert total == total1 >= 2 and here0 + here1 == total, (name, shares)
        assert 0 < here0 < total and 0 < here1 < total, (name, shares)
    assert printed(logs[0]) == printed(logs[1]) == split  # every process returns the scalars
    assert "step 2: eval ranked" in logs[0] and "step 2: eval" not in logs[1]  # 0 logs

    # Process 0 wrote every file once: the single process's files, nothing more.
    assert files(two) == files(one)
    for name in ("report.md", "2/ranked/scores.jsonl",
                 "2/fid/generated_stats.npz", "2/denoising/x0_vs_t.png"):
        assert (two / "evals" / name).exists(), name
    assert len(os.listdir(two / "fid_cache")) == 1
