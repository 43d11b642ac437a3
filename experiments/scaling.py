"""Scaling sweeps (paper section 4.2): Transfusion against Chameleon at several sizes (N) and
token counts (D), compared at equal theoretical FLOPs (6ND, transfusion_jax/scaling/flops.py).

    python -m transfusion_jax.sweep --config experiments/scaling.py:SWEEP[,key=value...]

SWEEP is
  - paper: the paper's controlled comparison, 5 sizes (Table 2: 0.16b, 0.37b, 0.76b, 1.4b, 7b)
    x 2 families, each trained on 0.5T elements (paper 4.1: "we sample 0.5T tokens (patches)";
    250k steps of 512 rows of 4096 = 2M elements: the Table 2 presets' defaults; Table 3: "Both
    models were trained on 0.5T tokens"), linear 2x2 patches and bidirectional image attention
    (4.2). Args:
    vae=, vq= (the frozen autoencoders' workdirs, gs:// or shared), tokenizer= (the Llama 2
    sentencepiece model). Its metrics are those of Table 3, read from evaluators named c4, wiki,
    llama, coco_captions and coco_fid in the runs' evals (the Table 2 presets list none yet:
    add them to the runs' config, or to experiments/transfusion.py, before analysing). Its
    runs need real data, as every Table 2 preset (data.require_real_data): give the launcher
    the mixture for every job after --, e.g. `-- --config.data.mixture='[...]'` (README, "Data
    mixtures"); without it each run stops at start naming data.mixture.
  - micro: the same comparison on the shapes world on this 2-core CPU, 3 sizes x 2 budgets per
    family, plus the Table 5 (image attention causal) and Table 8 (no noise limit) switches at
    one size; about 77 minutes in all, estimated (below); measured: 55m27s for the 14 points with
    the autoencoders already trained (README, docs/scaling/micro). No FID or CLIP
    score: the demo's `fid` entry runs on random weights (a pipeline check, not a metric), and
    weight files cannot be given by override (the entry has no such keys yet).

get_config returns a plain dict (point overrides are keyed by dotted field names). Each point
is a full set of overrides of experiments/transfusion.py or experiments/chameleon.py
(`config`: the file and its arg; `overrides`: --config.KEY=VALUE) and a workdir name under the
sweep's folder. The families are matched as experiments/chameleon.py defines (same transformer,
data config, seed, documents); at each (size, budget) both get the same D (elements trained on):
the same steps of the same rows in the paper sweep; in the micro sweep Chameleon's rows are twice
as long (512: an image is 144 tokens + BOI/EOI, not 9 patches), so it trains half the steps.

Micro sizes (layers, dim, heads; SwiGLU 4 x dim as the demo): s 2x128x4, m 4x128x4 (the demo's
model), l 4x192x6; N (non-embedding) 0.52M, 1.05M, 2.36M. dim stays >= 128: the demo's linear
4x4 patches of 8 latent channels need k*k*C <= dim. Budgets: 250 and 600 Transfusion steps of
8 x 256 (0.51M and 1.23M elements); Chameleon 125 and 300 steps of 8 x 512.

Time estimate (2 cores; `python -m transfusion_jax.sweep ... --dry-run` prints it per point):
steps/s measured for the demo model (README: Transfusion 1.94, Chameleon 0.92), scaled for s and
l by their analytic step FLOPs (s: 3.0 / 1.4, l: 1.2 / 0.55 assumed); 60 s a point for start,
compilation and the final evaluations (README's evaluation table: perplexity 4 s, ranked 2 s,
captioning 8 s, shapes 19 s at 16 scenes); the two demo autoencoders first (VAE 301 s, VQ-VAE
270 s, README) unless they are already trained. Sum: about 77 minutes (measured: 55m27s for the
points, plus the autoencoders' 9.5 minutes when they are trained first).
"""
from transfusion_jax.core.config import parse_arg

TRANSFUSION, CHAMELEON = "experiments/transfusion.py", "experiments/chameleon.py"
FAMILIES = ("transfusion", "chameleon")

# ------------------------------------------------------------------------------ metrics
# key: "<evaluator name>/<scalar>" in evals/<step>.json; direction: which way is better;
# threshold: footnote 16's quality bar (points at or beyond it on the bad side are dropped).
# Scales: the captioning evaluator reports CIDEr-D as pycocoevalcap does (the paper's 27.2 is
# x100): the paper's "CIDEr >= 4" is 0.04 here; clip_score is already x100 (paper: >= 17).
PAPER_METRICS = [
    dict(key="c4/perplexity", label="C4 perplexity", direction="lower", threshold=None),
    dict(key="wiki/perplexity", label="Wikipedia perplexity", direction="lower", threshold=None),
    dict(key="llama/acc", label="Llama 2 eval suite accuracy", direction="higher",
         threshold=None),
    dict(key="coco_captions/cider", label="MS-COCO 5k CIDEr", direction="higher",
         threshold=0.04),
    dict(key="coco_fid/fid", label="MS-COCO 30k FID", direction="lower", threshold=100.0),
    dict(key="coco_fid/clip_score", label="MS-COCO 30k CLIP", direction="higher",
         threshold=17.0),
]
MICRO_METRICS = [
    dict(key="perplexity/perplexity", label="held-out shapes text perplexity", direction="lower",
         threshold=None),
    dict(key="choices/acc", label="4-choice questions, accuracy", direction="higher",
         threshold=None),
    dict(key="captions/cider", label="held-out captions CIDEr-D", direction="higher",
         threshold=0.04),
    dict(key="shapes/text_to_image/position", label="text to image: positions right",
         direction="higher", threshold=None),
    dict(key="shapes/image_to_text/position", label="image to text: positions right",
         direction="higher", threshold=None),
]

# ------------------------------------------------------------------------------ paper
PAPER_SIZES = ("0.16b", "0.37b", "0.76b", "1.4b", "7b")
# Starting points for one job per size; anything after `--` on the sweep's command line is
# appended to every job and wins (e.g. `-- --zone europe-west4-b --accelerator v5p-64`).
PAPER_LAUNCH = {
    "tpu_pod": {"0.16b": "v5p-32", "0.37b": "v5p-64", "0.76b": "v5p-128", "1.4b": "v5p-256",
                "7b": "v5p-512"},
    "gke": {"0.16b": "2x2x4", "0.37b": "2x4x4", "0.76b": "4x4x4", "1.4b": "4x4x8",
            "7b": "8x8x8"},
    "slurm": {"0.16b": 1, "0.37b": 1, "0.76b": 2, "1.4b": 4, "7b": 8},
}


def paper(arg) -> dict:
    points = []
    for family in FAMILIES:
        for size in PAPER_SIZES:
            overrides = {"total_steps": 250_000}  # x 512 rows x 4096 = 0.52T elements
            if family == "transfusion":
                overrides.update({"model.patch": "linear", "model.patch_size": 2,
                                  "model.image_attention": "bidirectional"})
            ae = arg.vae if family == "transfusion" else arg.vq
            if ae:
                overrides["autoencoder.checkpoint"] = ae
            if arg.tokenizer:
                overrides["data.tokenizer_model"] = arg.tokenizer
            launch = {"tpu_pod": {"--accelerator": PAPER_LAUNCH["tpu_pod"][size]},
                      "gke": {"--topology": PAPER_LAUNCH["gke"][size]},
                      "slurm": {"--nodes": PAPER_LAUNCH["slurm"][size]}}
            points.append(dict(
                name=f"{family}-{size}", family=family,
                config=f"{TRANSFUSION if family == 'transfusion' else CHAMELEON}:{size},mesh=fsdp",
                overrides=overrides, size=size, budget="0.5T", ablation="", launch=launch))
    return dict(
        name="paper", sweep_dir="gs://BUCKET/scaling/paper", points=points,
        metrics=PAPER_METRICS, prepare=[], env={},
        launch={"tpu_pod": {"--zone": "us-east5-a"}, "gke": {"--tpu": "v5p"},
                "slurm": {"--gpus_per_node": 8}})


# ------------------------------------------------------------------------------ micro
MICRO_SIZES = {"s": (2, 128, 4), "m": (4, 128, 4), "l": (4, 192, 6)}
MICRO_BUDGETS = {"short": 250, "long": 600}  # Transfusion steps of 8 rows x 256
ROWS = {"transfusion": 256, "chameleon": 512}  # the demo presets' data.seq_len
AE_DIRS = {"transfusion": "workdir/demo/autoencoder", "chameleon": "workdir/demo/vq"}
# Estimated steps/s on the 2-core CPU (module docstring): m measured, s and l scaled.
STEPS_PER_S = {"transfusion": {"s": 3.0, "m": 1.94, "l": 1.2},
               "chameleon": {"s": 1.4, "m": 0.92, "l": 0.55}}
OVERHEAD_S = 60  # start, compile, final evaluations
ABLATION_SIZE, ABLATION_BUDGET = "m", "short"
ABLATIONS = [  # (suffix, table, override, value); the base point has the paper's default
    ("causal", "Table 5", "model.image_attention", "causal"),
    ("no_noise_limit", "Table 8", "data.noise_limit", False),
]


def micro_point(family, size, budget, arg, ablation=None):
    depth, dim, heads = MICRO_SIZES[size]
    steps = MICRO_BUDGETS[budget] * ROWS["transfusion"] // ROWS[family]  # equal D per budget
    o = {"model.depth": depth, "model.dim": dim, "model.heads": heads, "model.mlp_dim": 4 * dim,
         "total_steps": steps, "optimizer.warmup_steps": max(1, steps // 12),
         "checkpoint_every": 100, "log_every": 25,
         "autoencoder.checkpoint": AE_DIRS[family],
         # Evaluate at the last step only (in the trainer); no intermediate grids or denoising.
         "evals.samples.every": 0, "evals.shapes.every": steps,
         "evals.perplexity.every": steps, "evals.choices.every": steps,
         "evals.captions.every": steps}
    if family == "transfusion":
        o["evals.denoising.every"] = 0
    o["evals.fid.every"] = 0  # random weights only (see the module docstring)
    name, tag = f"{family}-{size}-{budget}", ""
    if ablation:
        suffix, table, key, value = ablation
        o[key] = value
        name, tag = f"{name}-{suffix}", f"{table}: {key}={str(value).lower()}"
    est = OVERHEAD_S + steps / STEPS_PER_S[family][size]
    return dict(name=name, family=family,
                config=f"{TRANSFUSION if family == 'transfusion' else CHAMELEON}:demo",
                overrides=o, size=size, budget=budget, ablation=tag,
                base=f"{family}-{size}-{budget}" if ablation else "",
                estimated_s=round(est), launch={})


def micro(arg) -> dict:
    points = [micro_point(f, s, b, arg) for f in FAMILIES for s in MICRO_SIZES
              for b in MICRO_BUDGETS]
    points += [micro_point("transfusion", ABLATION_SIZE, ABLATION_BUDGET, arg, a)
               for a in ABLATIONS]
    ae = "python -m transfusion_jax.train_autoencoder --config experiments/autoencoder.py:demo"
    prepare = [  # the frozen autoencoders, as `make demo` / `make demo-chameleon` train them
        dict(name="demo VAE", workdir=AE_DIRS["transfusion"], done="latent_stats.json",
             command=f"{ae},kind=vae --workdir {AE_DIRS['transfusion']}", estimated_s=301,
             env={"JAX_PLATFORMS": "cpu"}),
        dict(name="demo VQ-VAE", workdir=AE_DIRS["chameleon"], done=".trained",
             command=f"{ae},kind=vq --workdir {AE_DIRS['chameleon']}", estimated_s=270,
             env={"JAX_PLATFORMS": "cpu"}),
    ]
    metrics = MICRO_METRICS
    return dict(
        name="micro", sweep_dir="workdir/scaling/micro", points=points, metrics=metrics,
        prepare=prepare,
        # The demo's setting: two host devices, one XLA thread each (Makefile, DEMO_ENV).
        env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        launch={})


def get_config(arg=None):
    arg = parse_arg(arg, sweep="micro", vae="", vq="", tokenizer="")
    if arg.sweep == "paper":
        return paper(arg)
    if arg.sweep == "micro":
        return micro(arg)
    raise ValueError(f"config arg sweep={arg.sweep!r}; expected paper or micro")
