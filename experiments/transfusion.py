"""Transfusion pretraining (paper section 4.1).

    --config experiments/transfusion.py:SIZE[,patch=linear|unet][,patch_size=K][,mesh=M]

SIZE is tiny (tests: pixels through the identity autoencoder), demo (`make demo`: the shapes
world on a CPU, in the latents of the demo VAE, experiments/autoencoder.py:demo), demo_long (the
demo's recipe for 6000 steps, about 70 minutes) or one of Table 2: 0.16b, 0.37b, 0.76b, 1.4b, 7b
(latents of the paper's VAE). patch_size 0 means the size's default: 2 (the paper's) on the
paper's latents, 4 for the demo's (one patch per cell of the shapes world's 3x3 grid) and for
tiny's pixels.

The demo departs from the paper where a measured sweep on the 2-core CPU said so (README, "The
demo recipe"): v-prediction instead of eps, 4x4 latent patches, learning rate 3e-3, a mix
with more caption-image pairs (fewer text-only and interleaved documents, 40% image-first), a
learned per-cell vector added to each patch (model.patch_position), the cosine schedule's SNR
shifted by 2 (more training at high noise; diffusion.snr_shift) and a wider model (4 x 192),
for 1000 steps.
The Table 2 presets keep the paper's settings, and name no data: a run of one stops at start
until data.mixture (or data.text_source / data.image_source) and data.tokenizer_model are set
(data_config below shows the paper-like mixture as overrides to paste).
mesh is a preset of transfusion_jax.core.sharding.MESH_PRESETS: dp (default), fsdp, fsdp_tensor.
With patch=unet set an image budget too, e.g. --config.data.image_budget=128
--config.data.image_budget_rows=16 (when a device holds 16 rows a microbatch): the rows use 7.4
of their 15 slots, and the U-Net on the unused ones is 27% of a 0.16b step (README,
benchmarks/patch_slots.py). It is off by default, since R must divide each device's rows.
"""
import ml_collections

from transfusion_jax.core.config import parse_arg
from transfusion_jax.data.config import get_data_config
from transfusion_jax.models.unet import UNET_PRESETS
from transfusion_jax.core.sharding import DEFAULT_RULES, MESH_PRESETS

# Table 2: (layers, embedding dim, attention heads).
SIZES = {
    "tiny": (2, 64, 4),
    # The demo's width: 4 x 192 (heads 6, MLP 768) learns both directions where 4 x 128 drew
    # no object right in 1200 steps (README, "The demo recipe").
    "demo": (4, 192, 6),
    "demo_long": (4, 192, 6),
    "0.16b": (16, 768, 12),
    "0.37b": (24, 1024, 16),
    "0.76b": (24, 1536, 24),
    "1.4b": (24, 2048, 16),
    "7b": (32, 4096, 32),
}


# Above the largest |x0| of the demo VAE's normalised latents (5.6 on 256 held-out images).
CLIP_DEMO = 6.0


def llama_mlp_dim(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of 256 (11008 at 4096)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * -(-hidden // multiple_of)


# Small sizes train on the shapes world: (latent size, channels, default patch size) of the
# transformer's images. tiny: 16x16 pixels in 4x4 patches; demo: the demo VAE's 12x12x8 latents
# of 48x48 images in 2x2 patches (36 per image). Linear patches must stay narrower than the
# model (k*k*C <= dim).
SMALL = {"tiny": (16, 3, 4), "demo": (12, 8, 4), "demo_long": (12, 8, 4)}
# The frozen autoencoder: identity (pixels) or a trained VAE's workdir; downsampling factor.
AUTOENCODERS = {"tiny": ("identity", 1, ""), "demo": ("vae", 4, "workdir/demo/autoencoder"),
                "demo_long": ("vae", 4, "workdir/demo/autoencoder")}
DEMOS = ("demo", "demo_long")


def model_config(size: str, patch: str, patch_size: int) -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"config arg size={size!r}; expected one of {list(SIZES)}")
    depth, dim, heads = SIZES[size]
    small = size in SMALL
    # Paper sizes: latents of the frozen VAE, 256x256 pixels -> 32x32x8 (paper 4.1).
    latent_size, latent_channels, default_patch = SMALL.get(size, (32, 8, 2))
    return ml_collections.ConfigDict(dict(
        family="transfusion",  # or "chameleon": experiments/chameleon.py, the matched baseline
        # Real token ids: paper sizes take the Llama 2 tokenizer, 32000 pieces + PAD, BOI, EOI;
        # the embedding and LM head are padded to a multiple of 128 (32128), models/transfusion.py.
        vocab_size=512 if small else 32003,
        dim=dim, depth=depth, heads=heads,
        mlp_dim=4 * dim if small else llama_mlp_dim(dim),
        # qk_norm and norm_reorder: Chameleon's stability changes, off for Transfusion.
        rope_theta=10000.0, norm_eps=1e-5, qk_norm=False, norm_reorder=False,
        # Table 5: "bidirectional" (the paper's) or "causal" attention among an image's patches.
        image_attention="bidirectional",
        # "none" (the paper's: a patch's place only through RoPE) or "learned" (a table of
        # per-cell vectors added to the patch vectors); models/transfusion.py.
        patch_position="learned" if size in DEMOS else "none",
        # "auto": the fused kernel of the backend (Pallas splash on TPU, our Pallas Triton kernel
        # on GPU), blockwise with block skipping on CPU (README, "Attention kernels").
        attention="dense" if small else "auto", attention_block=512,
        latent_size=latent_size, latent_channels=latent_channels,
        patch=patch, patch_size=patch_size or default_patch,
        unet=UNET_PRESETS["tiny" if small else "paper"],  # ~0.27B at 32x32x8, k=2 (paper 4.1)
        dtype="float32" if small else "bfloat16",
        # Step speed (README, "Step speed and memory"): the activation checkpointing policy
        # ("none", "full", "dots", "dots_no_batch", "offload"; true/false = "full"/"none"), and
        # the LM head + cross-entropy over chunks of this many elements (0: whole logits).
        remat="none" if small else "full", logits_chunk=0,
    ))


def data_config(size: str) -> ml_collections.ConfigDict:
    if size == "tiny":
        return get_data_config(seq_len=128, batch_size=8, image_size=16, max_images=4,
                               tokenizer_vocab_size=512, tokenizer_train_documents=2000,
                               shapes_num_documents=2000)
    if size in DEMOS:
        # 9 patches an image: up to 8 images a row of 256. Pairs are what both directions learn
        # from: text-only documents at 1/4 of the patches, 10% interleaved, 40% image-first.
        return get_data_config(seq_len=256, batch_size=8, image_size=48, max_images=8,
                               tokenizer_vocab_size=512, text_to_patch_ratio=0.25,
                               shapes_interleaved_fraction=0.1, caption_first_prob=0.6)
    # Paper: rows of 4096, 2M elements per batch; the Llama 2 tokenizer (set tokenizer_model).
    # No data by default: a run stops at start (data.require_real_data; data/mixture.py,
    # check_real_data) until data.mixture and data.tokenizer_model are set. The paper's mix (4.1:
    # a text corpus and image-caption pairs "at a 1:1 token ratio", text tokens : patches), from
    # a prepared TFDS C4 and img2dataset WebDataset shards, as overrides to paste:
    #   --config.data.tokenizer_model=gs://BUCKET/llama2/tokenizer.model
    #   --config.data.mixture='[
    #     {"name": "c4", "text_source": "tfds", "tfds_name": "c4/en",
    #      "tfds_data_dir": "gs://BUCKET/tfds", "weight": 1.0},
    #     {"name": "images", "image_source": "webdataset",
    #      "shards": "gs://BUCKET/images/{00000..01242}.tar", "weight": 1.0}]'
    # (More image sets: more entries, weights in elements (patches); a "schedule" such as
    # [[0.99, 3.0]] gives a source weight 3 over the last 1% of total_steps, as the paper's
    # largest run upweights high-aesthetic images. README, "Data mixtures".)
    return get_data_config(seq_len=4096, batch_size=512, image_size=256, require_real_data=True)


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", patch="linear", patch_size=0, mesh="dp")
    if arg.mesh not in MESH_PRESETS:
        raise ValueError(f"config arg mesh={arg.mesh!r}; expected one of {list(MESH_PRESETS)}")
    small, demo = arg.size in SMALL, arg.size in DEMOS
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config(arg.size, arg.patch, arg.patch_size)
    config.data = data_config(arg.size)
    # The frozen autoencoder between pixels and latents (models/autoencoder/codec.py, loader.py); Table 2
    # sizes name their VAE's workdir with --config.autoencoder.checkpoint.
    kind, downsample, ae_dir = AUTOENCODERS.get(arg.size, ("vae", 8, ""))
    config.autoencoder = dict(kind=kind, downsample=downsample, checkpoint=ae_dir)
    # clip_x0: samplers clip predicted x0 to [-clip, clip]: 1 for pixels (bounded data); for
    # the demo's normalised latents a bound above their measured range; off (0) at paper scale.
    # prediction: what the diffusion head predicts, "eps" (the paper), "v" or "x0";
    # loss_weighting: "none" (the paper) or "min_snr" (Min-SNR-5); snr_shift: the cosine
    # schedule's SNR divided by its square (1: the paper's); diffusion.py.
    config.diffusion = dict(schedule="cosine", timesteps=1000, ddpm_weight=5.0,
                            clip_x0=1.0 if arg.size == "tiny" else CLIP_DEMO if demo else 0.0,
                            snr_shift=2.0 if demo else 1.0,
                            prediction="v" if demo else "eps",
                            loss_weighting="none")
    config.optimizer = dict(lr=3e-3 if demo else 1e-3 if small else 3e-4,
                            warmup_steps={"tiny": 10, "demo": 100, "demo_long": 200}.get(
                                arg.size, 4000),
                            final_lr=3e-4 if demo else 1e-4 if small else 1.5e-5, b1=0.9,
                            b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)
    config.total_steps = {"tiny": 100, "demo": 1000, "demo_long": 6000}.get(arg.size, 250_000)
    config.stop_at_step = 0  # >0: checkpoint and stop after this step, as on preemption
    # After SIGTERM/SIGINT: checkpoint, then exit within this many seconds whatever hangs
    # (core/preemption.py); your cluster's grace period before its SIGKILL. 0: no limit.
    config.preemption_grace_s = 30.0
    config.grad_accum = 1  # microbatches per step
    config.ema_decay = 0.0  # 0: no EMA of params
    config.mesh = dict(MESH_PRESETS[arg.mesh])
    config.sharding_rules = [list(rule) for rule in DEFAULT_RULES]
    config.log_every = 10 if small else 100
    config.checkpoint_every = 500 if small else 2000
    config.keep_checkpoints = 3
    # Evaluators (transfusion_jax/evaluators/common.py): {name: {type, every, options}}, run at
    # every multiple of `every` and at the last step (0: only by python -m
    # transfusion_jax.evaluate); files in workdir/evals/<step>/<name>/. The demo draws sample
    # grids of held-out captions, and scores held-out scenes both ways at its last step; the
    # paper's text metrics on the shapes world run on request (every=0: `python -m
    # transfusion_jax.evaluate --workdir DIR`): perplexity and bits per byte of held-out text,
    # 4-choice questions about held-out scenes ranked as lm-eval does, CIDEr-D of captions, FID.
    config.evals = {}
    if demo:
        every = 300 if arg.size == "demo" else 1000
        config.evals = dict(samples=dict(type="sample_grid", every=2 * every, num=4),
                            # Where the denoiser stands (seconds): the caption's effect on it
                            # (cond/gain_t600 > 0) and teacher-forced x0 quality against t.
                            # Before shapes, whose training curves plot its gain.
                            denoising=dict(type="denoising", every=every, num=32),
                            shapes=dict(type="shapes", every=config.total_steps,
                                        num=16 if arg.size == "demo" else 32),
                            perplexity=dict(type="perplexity", every=0, tokens=50_000),
                            choices=dict(type="ranked", every=0, num=128),
                            captions=dict(type="captioning", every=0, num=64),
                            # A random-weight InceptionV3 and CLIP ViT-B/32 (no weight file
                            # ships): reported as fid_random_weights and
                            # clip_score_random_weights, smoke tests of the pipeline, not FID
                            # and CLIP score.
                            fid=dict(type="fid", every=0, random_weights=True, num=64, batch=32,
                                     sampler="dpm++2m", steps=20, guidance=3.0,
                                     clip_random_weights=True))
    elif arg.size == "tiny":  # on request only (tests): a quick shapes score
        config.evals = dict(shapes=dict(type="shapes", every=0, num=2, steps=4))
    return config
