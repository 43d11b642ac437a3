"""Scaling sweeps (transfusion_jax/scaling/, python -m transfusion_jax.sweep): 6ND against the
models' real parameter counts, log-log fits and their intervals, the parity FLOP ratio in closed
form, the quality thresholds, the runner's resume after a kill (with a fake trainer), the
launch/ dry runs, and the sweep definitions (experiments/scaling.py). Nothing trains."""
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from transfusion_jax.core.config import load_config
from transfusion_jax.scaling import flops, report, runner
from transfusion_jax.scaling.fit import Metric, fit_power_law, keep_point, parity_ratio
from transfusion_jax.scaling.sweep import from_dict, load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ 6ND

def _param_tree(config):
    from transfusion_jax.models import build_model, chameleon, family
    from transfusion_jax.models import example_inputs as transfusion_inputs
    cfg = config.model
    if family(cfg) == "chameleon":
        inputs = chameleon.example_inputs(cfg, 8)
    else:
        inputs = transfusion_inputs(cfg, 8, 1)  # the parameters do not depend on the shapes
    return jax.eval_shape(build_model(cfg).init, jax.random.key(0), *inputs)["params"]


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("spec", ["experiments/transfusion.py:tiny",
                                  "experiments/transfusion.py:demo",
                                  "experiments/chameleon.py:tiny",
                                  "experiments/chameleon.py:demo"])
def test_n_equals_the_flax_models_non_embedding_parameters(spec):
    config = load_config(os.path.join(ROOT, spec))
    params = _param_tree(config)
    assert flops.non_embedding_params(config.model) == _count(params["transformer"])
    assert flops.embedding_params(config.model) == _count(params["embed"]) + _count(
        params["lm_head"])
    left_out = _count(params) - _count(params["transformer"]) - flops.embedding_params(
        config.model)
    # Left out of N as embeddings are: the patch layers and the learned per-cell table
    # (model.patch_position="learned", the demo's), like Kaplan et al.'s position embeddings.
    assert left_out == (0 if config.model.family == "chameleon" else _count(
        params["patch_encoder"]) + _count(params["patch_decoder"])
        + _count(params.get("patch_position", {})))


def test_6nd_counts_elements_and_matches_the_families():
    t = load_config(os.path.join(ROOT, "experiments/transfusion.py:0.16b"))
    c = load_config(os.path.join(ROOT, "experiments/chameleon.py:0.16b"))
    n_t = flops.non_embedding_params(t.model)
    assert n_t == 16 * (4 * 768 ** 2 + 3 * 768 * 2048 + 2 * 768) + 768  # 0.113B
    # Chameleon's only extra trunk parameters: the QK-norm scales, 2 x head_dim a layer.
    assert flops.non_embedding_params(c.model) - n_t == 16 * 2 * 64
    d = 250_000 * 512 * 4096  # the paper's 0.5T: 250k steps of 2M elements
    assert flops.trained_elements(t) == flops.trained_elements(c) == d
    assert flops.theoretical_flops(t) == 6.0 * n_t * d


# ------------------------------------------------------------------------------ fits

def _synthetic(a, b, n=8, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    c = np.geomspace(1e18, 1e22, n)
    return c, np.exp(a + b * np.log(c) + rng.normal(0, noise, n))


@pytest.mark.parametrize("a,b", [(math.log(300.0), -0.05), (math.log(1e-6), 0.12)])
def test_fit_recovers_a_power_law_within_its_interval(a, b):
    c, m = _synthetic(a, b, noise=0.0)
    exact = fit_power_law(c, m)
    assert exact.a == pytest.approx(a, abs=1e-8) and exact.b == pytest.approx(b, abs=1e-10)
    c, m = _synthetic(a, b)
    fit = fit_power_law(c, m)
    for name, true in (("a", a), ("b", b)):
        low, high = fit.interval(name)
        assert low < true < high, (name, low, true, high)
        assert low < getattr(fit, name) < high
    assert abs(fit.b - b) < 0.01
    assert fit.flops_for(float(fit.predict(1e20))) == pytest.approx(1e20, rel=1e-9)


def test_fit_intervals_cover_at_their_level():
    """Over 200 noisy draws the 95% intervals hold the true exponent about 95% of the time."""
    hits = 0
    for seed in range(200):
        c, m = _synthetic(1.0, -0.07, n=5, noise=0.05, seed=seed)
        low, high = fit_power_law(c, m).interval("b")
        hits += low < -0.07 < high
    assert 0.90 <= hits / 200 <= 0.99


def test_fit_needs_points_and_intervals_need_three():
    two = fit_power_law([1e18, 1e20], [3.0, 2.0])
    assert two.cov is None and two.interval("b") is None
    with pytest.raises(ValueError, match="2 or more points"):
        fit_power_law([1e18], [3.0])
    with pytest.raises(ValueError, match="distinct FLOPs"):
        fit_power_law([1e18, 1e18], [3.0, 2.0])


@pytest.mark.parametrize("direction,b_t,b_c", [("lower", -0.05, -0.04), ("higher", 0.2, 0.25)])
def test_parity_ratio_equals_its_closed_form(direction, b_t, b_c):
    a_t, a_c = 2.0, 2.3 if direction == "lower" else 1.2
    c = np.geomspace(1e18, 1e22, 6)
    transfusion = fit_power_law(c, np.exp(a_t + b_t * np.log(c)))
    chameleon = [(x, math.exp(a_c + b_c * math.log(x))) for x in c[:4]]
    c_max, m_max = chameleon[-1]
    parity = parity_ratio(transfusion, chameleon, direction)
    closed = math.exp((math.log(m_max) - a_t) / b_t) / c_max
    assert parity.ratio == pytest.approx(closed, rel=1e-9)
    assert parity.chameleon_flops == c_max and parity.chameleon_value == m_max
    # parallel lines: the ratio is (A_C / A_T)^(1 / b), whatever run is the largest
    parallel = [(x, math.exp(a_c + b_t * math.log(x))) for x in c[:3]]
    assert parity_ratio(transfusion, parallel, direction).ratio == pytest.approx(
        math.exp((a_c - a_t) / b_t), rel=1e-9)


def test_parity_interval_and_no_ratio_for_a_wrong_slope():
    c, m = _synthetic(math.log(30.0), -0.05, noise=0.01)
    fit = fit_power_law(c, m)
    parity = parity_ratio(fit, [(1e21, 9.0)], "lower")
    low, high = parity.interval
    assert low < parity.ratio < high
    worse = parity_ratio(fit, [(1e21, 9.0)], "higher")  # the slope falls: never reaches it
    assert worse.ratio is None and "does not improve" in worse.note
    assert parity_ratio(fit, [], "lower").note == "no Chameleon point"


def test_thresholds_drop_the_right_points():
    fid = Metric("fid/fid", "FID", "lower", 100.0)
    clip = Metric("fid/clip_score", "CLIP", "higher", 17.0)
    cider = Metric("captions/cider", "CIDEr", "higher", 0.04)
    ppl = Metric("perplexity/perplexity", "PPL", "lower")
    assert [keep_point(fid, v)[0] for v in (16.8, 99.9, 100.0, 150.0)] == [True, True, False,
                                                                           False]
    assert [keep_point(clip, v)[0] for v in (25.5, 17.01, 17.0, 12.0)] == [True, True, False,
                                                                           False]
    assert [keep_point(cider, v)[0] for v in (0.27, 0.041, 0.04, 0.0)] == [True, True, False,
                                                                           False]
    assert [keep_point(ppl, v)[0] for v in (1e6, 2.1, 0.0, -1.0, float("nan"))] == [
        True, True, False, False, False]
    with pytest.raises(ValueError, match="direction"):
        Metric("x", "x", "up")
    # In the analysis: the dropped points take no part in the fit.
    sweep = from_dict(dict(name="t", points=[], metrics=[dict(key="fid/fid", label="FID",
                                                              direction="lower",
                                                              threshold=100.0)]))
    records = [dict(name=f"{f}{i}", family=f, ablation="", C=c, metrics={"fid/fid": v})
               for f, rows in (("transfusion", [(1e18, 150.0), (1e19, 60.0), (1e20, 40.0),
                                                (1e21, 25.0)]),
                               ("chameleon", [(1e18, 300.0), (1e19, 120.0), (1e20, 90.0),
                                              (1e21, 50.0)]))
               for i, (c, v) in enumerate(rows)]
    result = report.analyse(sweep, records)["fid/fid"]
    assert [k for *_, k, _ in result["points"]["transfusion"]] == [False, True, True, True]
    assert [k for *_, k, _ in result["points"]["chameleon"]] == [False, False, True, True]
    assert result["fits"]["transfusion"].n == 3 and result["fits"]["chameleon"].n == 2
    expected = fit_power_law([1e19, 1e20, 1e21], [60.0, 40.0, 25.0])
    assert result["parity"].ratio == pytest.approx(
        expected.flops_for(50.0) / 1e21, rel=1e-9)


# ------------------------------------------------------------------------------ the runner

EXPERIMENT = """
import ml_collections
def get_config(arg=None):
    return ml_collections.ConfigDict(dict(
        total_steps=3, data=dict(batch_size=2, seq_len=8),
        model=dict(family="transfusion", dim=8, depth=1, heads=2, mlp_dim=16, vocab_size=64),
        evals=dict(shapes=dict(type="shapes", every=0), other=dict(type="x", every=0))))
"""

SWEEP = """
import os
HERE = os.path.dirname(__file__)
def get_config(arg=None):
    steps = {{"p0": 2, "p1": 6, "p2": 3}}
    points = [dict(name=n, family="transfusion" if n != "p2" else "chameleon",
                   config=os.path.join(HERE, "exp.py"), size=n, budget="b",
                   overrides={{"total_steps": s, "model.dim": 8 + 8 * i}})
              for i, (n, s) in enumerate(steps.items())]
    return dict(name="t", sweep_dir=os.path.join(HERE, "sweep"), points=points,
                metrics=[dict(key="shapes/score", label="score", direction="higher")],
                prepare=[], env={{"FAKE_FROM_SWEEP": "1"}},
                launch={{"tpu_pod": {{"--zone": "z-1"}}}})
"""

# The fake trainer and evaluator: records its call, writes checkpoints/<step>/ one a step from
# the newest there (as the trainer resumes), then evals/<total>.json; as the evaluator (--only)
# writes the named evaluators' scalars.
FAKE = """
import json, os, sys, time
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1]
workdir = opt("--workdir")
assert os.environ.get("FAKE_FROM_SWEEP") == "1"
record = {"point": os.path.basename(workdir), "evaluate": "--only" in args}
if "--only" in args:
    path = os.path.join(workdir, "evals", opt("--step") + ".json")
    saved = json.load(open(path)) if os.path.exists(path) else {}
    saved.update({name + "/score": 0.5 for name in opt("--only").split(",")})
    json.dump(saved, open(path, "w"))
else:
    over = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
    total = int(over["total_steps"])
    ckpt = os.path.join(workdir, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    start = max([int(n) for n in os.listdir(ckpt)] + [0]) + 1
    record["start"] = start
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")
    for step in range(start, total + 1):
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
        os.makedirs(os.path.join(ckpt, str(step)))
    os.makedirs(os.path.join(workdir, "evals"), exist_ok=True)
    with open(os.path.join(workdir, "evals", f"{total}.json"), "w") as f:
        json.dump({"shapes/score": total / 10}, f)
    sys.exit(0)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(record) + "\\n")
"""


@pytest.fixture
def fake_sweep(tmp_path):
    (tmp_path / "exp.py").write_text(EXPERIMENT)
    (tmp_path / "sweep_def.py").write_text(SWEEP.format())
    (tmp_path / "fake.py").write_text(FAKE)
    return tmp_path


def _calls(log):
    return [json.loads(line) for line in open(log)] if os.path.exists(log) else []


def test_runner_resumes_after_a_kill_without_redoing_a_finished_point(fake_sweep, monkeypatch):
    log = str(fake_sweep / "calls.jsonl")
    fake = [sys.executable, str(fake_sweep / "fake.py")]
    env = dict(os.environ, FAKE_LOG=log, FAKE_SLEEP="0.3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "transfusion_jax.sweep", "--config",
         str(fake_sweep / "sweep_def.py"), "--trainer", shlex.join(fake),
         "--evaluator", shlex.join(fake)],
        cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    p1 = fake_sweep / "sweep" / "p1" / "checkpoints"
    deadline = time.time() + 60
    while not (p1 / "2").exists():  # p0 finished, p1 half-way
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its trainer, as a crash would
    proc.wait()
    assert not (p1 / "6").exists()
    assert [(c["point"], c["start"]) for c in _calls(log)] == [("p0", 1), ("p1", 1)]

    monkeypatch.setenv("FAKE_LOG", log)
    monkeypatch.setenv("FAKE_SLEEP", "0")
    sweep = load_sweep(str(fake_sweep / "sweep_def.py"))
    lines = []
    failed = runner.run_local(sweep, sweep.sweep_dir, trainer=fake,
                              evaluator=fake, log=lines.append)
    assert failed == []
    calls = _calls(log)[2:]
    # p0 skipped; p1 resumed from its newest checkpoint; p2 trained. No evaluator call: the
    # only evaluator a metric reads (shapes; "other" is read by none) has its scalars.
    assert [(c["point"], c.get("start")) for c in calls] == [("p1", 3), ("p2", 1)]
    assert any("p0: done" in line and "skipped" in line for line in lines)
    for name, steps in (("p0", 2), ("p1", 6), ("p2", 3)):
        assert runner.checkpoint_steps(str(fake_sweep / "sweep" / name)) == list(
            range(1, steps + 1))

    # Evaluations missing after the last checkpoint: only the evaluator runs.
    os.remove(fake_sweep / "sweep" / "p2" / "evals" / "3.json")
    runner.run_local(sweep, sweep.sweep_dir, trainer=fake, evaluator=fake,
                     log=lines.append)
    assert [(c["point"], c["evaluate"]) for c in _calls(log)[4:]] == [("p2", True)]
    # Everything finished: a re-run starts nothing.
    runner.run_local(sweep, sweep.sweep_dir, trainer=fake, evaluator=fake,
                     log=lines.append)
    assert len(_calls(log)) == 5
    paths = report.write(sweep, sweep.sweep_dir)
    with open(paths["markdown"]) as f:
        assert "Parity FLOP ratio" in f.read()


def test_a_failing_point_is_reported_and_the_others_run(fake_sweep, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    sweep = load_sweep(str(fake_sweep / "sweep_def.py"))
    failing = tmp_path / "fail.py"
    failing.write_text("import runpy, sys\nif '/p1' in ' '.join(sys.argv):\n    sys.exit(3)\n"
                       f"runpy.run_path({str(fake_sweep / 'fake.py')!r}, run_name='__main__')\n")
    failed = runner.run_local(sweep, str(tmp_path / "s"), trainer=[sys.executable, str(failing)],
                              evaluator=[sys.executable, str(failing)], log=lambda _: None)
    assert failed == ["p1"]
    assert runner.status(sweep, sweep.point("p2"), str(tmp_path / "s" / "p2"))[0] == "done"


# ------------------------------------------------------------------------------ launchers

def _blocks(lines):
    """{point: its printed lines} from the dry run's `# job POINT: ...` headers."""
    out, current = {}, None
    for line in lines:
        if line.startswith("# job "):
            current = line[len("# job "):].split(":")[0]
            out[current] = []
        elif current:
            out[current].append(line)
    return out


@pytest.mark.parametrize("launcher,extra", [
    ("local_multiprocess", ["--num_processes", "2", "--port", "4321"]),
    ("tpu_pod", ["--accelerator", "v5p-8"]),
    ("gke", ["--image", "img:1", "--tpu", "v5p", "--topology", "2x2x1"]),
    ("slurm", ["--nodes", "1"]),
])
def test_dry_run_jobs_carry_each_points_overrides_and_workdir(fake_sweep, launcher, extra):
    sweep = load_sweep(str(fake_sweep / "sweep_def.py"))
    lines = []
    failed = runner.launch_jobs(sweep, "gs://b/sw", launcher, extra, dry_run=True,
                                log=lines.append)
    assert failed == []
    blocks = _blocks(lines)
    assert sorted(blocks) == ["p0", "p1", "p2"]
    for point in sweep.points:
        text = "\n".join(blocks[point.name])
        want = point.train_args(f"gs://b/sw/{point.name}")
        for word in want[1:]:  # the config's path, the workdir, every --config.K=V
            assert word in text, (launcher, word)
        if launcher in ("tpu_pod", "slurm", "local_multiprocess"):  # the exact argv
            argvs = []
            for line in blocks[point.name]:
                if line.startswith("#"):
                    continue
                words = shlex.split(line)
                argvs.append(words[:-1] if words[-1:] == ["&"] else words)
                argvs += [shlex.split(w.split("=", 1)[1].split("&&")[-1]) for w in words
                          if w.startswith("--command=")]
            assert any(argv[-len(want):] == want for argv in argvs), (launcher, argvs)
        if launcher in runner.NAMED:
            assert f"t-{point.name}" in text  # a name per job


def test_paper_tpu_pod_dry_run_prints_the_job_set(capsys, monkeypatch):
    from transfusion_jax import sweep as cli
    monkeypatch.chdir(ROOT)
    assert cli.main(["--config", "experiments/scaling.py:paper", "--launcher", "tpu_pod",
                     "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    blocks = _blocks(lines)
    sizes = ("0.16b", "0.37b", "0.76b", "1.4b", "7b")
    assert sorted(blocks) == sorted(f"{f}-{s}" for f in ("transfusion", "chameleon")
                                    for s in sizes)
    for name, block in blocks.items():
        text = "\n".join(block)
        family, size = name.split("-")
        assert f"experiments/{family}.py:{size},mesh=fsdp" in text
        assert f"--workdir gs://BUCKET/scaling/paper/{name}" in text
        assert "--config.total_steps=250000" in text
        assert "--zone=us-east5-a" in text and "tpus tpu-vm create" in text


# ------------------------------------------------------------------------------ definitions

def test_micro_sweep_is_matched_complete_and_fits_90_minutes(monkeypatch):
    from transfusion_jax.trainers.transfusion import check_config
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(os.path.join(ROOT, "experiments/scaling.py:micro"))
    grid = [p for p in sweep.points if not p.ablation]
    for family in ("transfusion", "chameleon"):
        mine = [p for p in grid if p.family == family]
        assert len({p.size for p in mine}) >= 3 and len({p.budget for p in mine}) >= 2
        assert len(mine) == len({(p.size, p.budget) for p in mine})
    configs = {p.name: p.resolved() for p in sweep.points}
    for p in sweep.points:
        check_config(configs[p.name], 2)  # every override exists and the run is possible
    for p in grid:  # both families: the same N (up to QK-norm) and D at a (size, budget)
        if p.family == "transfusion":
            other = configs[p.name.replace("transfusion", "chameleon")]
            mine = configs[p.name]
            assert flops.trained_elements(mine) == flops.trained_elements(other)
            assert (mine.model.depth, mine.model.dim) == (other.model.depth, other.model.dim)
    ablations = {p.ablation: configs[p.name] for p in sweep.points if p.ablation}
    assert sorted(ablations) == ["Table 5: model.image_attention=causal",
                                 "Table 8: data.noise_limit=false"]
    assert ablations["Table 5: model.image_attention=causal"].model.image_attention == "causal"
    assert ablations["Table 8: data.noise_limit=false"].data.noise_limit is False
    for p in sweep.points:
        if p.ablation:
            base = configs[p.base]
            assert base.model.image_attention == "bidirectional" and base.data.noise_limit
    total = sum(p.estimated_s for p in sweep.points) + sum(s.estimated_s for s in sweep.prepare)
    assert total <= 90 * 60, total / 60


def test_local_dry_run_prints_states_commands_and_estimate(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(os.path.join(ROOT, "experiments/scaling.py:micro"))
    lines = []
    assert runner.run_local(sweep, str(tmp_path), dry_run=True, log=lines.append) == []
    trains = [line for line in lines if "-m transfusion_jax.train " in line]
    assert len(trains) == len(sweep.points)
    assert all(line.startswith("JAX_PLATFORMS=cpu") for line in trains)
    assert lines[-1].startswith(f"# {len(sweep.points)} of {len(sweep.points)} points to train")


def _parsed_as_the_trainer_parses(argv, monkeypatch):
    """The config the trainer's command line (core/cli.py: config_flags, locked) builds
    (config_flags reads the overrides from sys.argv)."""
    from absl import flags
    from ml_collections import config_flags
    monkeypatch.setattr(sys, "argv", ["train", *argv])
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(["train", *argv])
    return values.config


@pytest.mark.parametrize("spec", ["experiments/scaling.py:micro", "experiments/scaling.py:paper"])
def test_point_overrides_parse_on_the_trainers_command_line(spec, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(spec)
    for point in sweep.points:
        parsed = _parsed_as_the_trainer_parses(point.train_args("/tmp/x"), monkeypatch)
        assert parsed.to_dict() == point.resolved().to_dict(), point.name
