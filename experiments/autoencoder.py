"""Latent autoencoders (paper section 4.1, appendix A).

    --config experiments/autoencoder.py:SIZE[,kind=vae|vq|identity]

SIZE: tiny (tests), demo (the 48x48 shapes world on a CPU, 4x downsampling to 12x12x8: the
`make demo` autoencoder, about 5 minutes on 2 cores) or paper (about 86M parameters,
256x256 -> 32x32x8; Stable Diffusion's layout with 8 latent channels).
The VAE (Transfusion) and the VQ-VAE (Chameleon) differ only in `kind`: same data, encoder,
decoder and loss weights, KL swapped for the codebook loss.
"""
import ml_collections

from transfusion_jax.core.config import parse_arg
from transfusion_jax.core.sharding import DEFAULT_RULES

# channels: width per level (len - 1 stride-2 levels: 8x downsampling for four levels).
SIZES = {
    "tiny": dict(channels=(8, 16), num_res_blocks=1, image_size=16, batch_size=8, codebook=64),
    # 4x, not the paper's 8x: at 48x48 an 8x VAE has 6x6 latents for a 3x3 grid of objects,
    # and a CPU cannot train it to a parseable reconstruction in minutes.
    # 32 channels at full resolution: with 16, small squares come back with round corners.
    # Batches of 2: at equal CPU time more, smaller steps read back more objects (parser 97.4%
    # with 2 x 5200 steps, 94.8% with 4 x 2600, 80% with 8 x 1300; README, Autoencoders).
    "demo": dict(channels=(32, 32, 64), num_res_blocks=1, image_size=48, batch_size=2,
                 codebook=2048),
    "paper": dict(channels=(128, 256, 512, 512), num_res_blocks=2, image_size=256,
                  batch_size=256, codebook=16384),
}

# Steps. lr decays (cosine) to lr/10 at total_steps, so the demo sets steps, not a time limit.
SCHEDULES = {
    "tiny": dict(total_steps=4, warmup_steps=1, log_every=1, eval_every=2, checkpoint_every=2,
                 gan_start_step=2),
    "demo": dict(total_steps=5200, warmup_steps=200, log_every=200, eval_every=5200,
                 checkpoint_every=500, gan_start_step=5200),
    "paper": dict(total_steps=1_000_000, warmup_steps=5000, log_every=100, eval_every=10_000,
                  checkpoint_every=10_000, gan_start_step=50_000),
}


def model_config(size: str, kind: str) -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"config arg size={size!r}; expected one of {list(SIZES)}")
    s = SIZES[size]
    return ml_collections.ConfigDict(dict(
        kind=kind, image_channels=3, channels=s["channels"], num_res_blocks=s["num_res_blocks"],
        mid_attention=True, latent_channels=8,  # paper: latent dimension 8
        norm_groups=32, norm_eps=1e-6,
        codebook_size=s["codebook"],  # paper: 16,384 codes
        # Demo (2048 codes, batches of 2): a faster EMA and later restarts keep more codes in
        # use: 86% with decay 0.9 and 80 steps, 53% with 0.95 and 40 (README, Autoencoders).
        vq_beta=0.25, vq_decay={"demo": 0.9}.get(size, 0.99),
        vq_restart_after={"tiny": 2, "demo": 80, "paper": 100}[size],
        dtype="float32" if size != "paper" else "bfloat16",
    ))


def loss_config(size: str) -> ml_collections.ConfigDict:
    # Appendix A: L1 + LPIPS + 0.5 GAN + 0.2 ID + 1e-6 KL (VAE) or 1.0 codebook (VQ-VAE).
    # As in Esser et al., 1e-6 weighs the KL against the L1 summed over an image's pixel values
    # (models/autoencoder/losses.py: reconstruction_terms).
    return ml_collections.ConfigDict(dict(
        l1=1.0, lpips=1.0, gan=0.5, kl=1e-6, codebook=1.0,
        # The MoCo-v2 "ID" perceptual loss (weight 0.2 in the paper) needs weights nobody ships
        # under a usable licence here; it is not implemented (weight kept for the record).
        identity=0.0,
        # Paper: 50k of 1M steps. The demo's few minutes end before its GAN phase would start.
        gan_start_step=SCHEDULES[size]["gan_start_step"],
        lpips_vgg="", lpips_lin="",  # paths to the VGG16 and LPIPS linear-layer weight files
        disc_channels=64 if size != "tiny" else 8, disc_layers=3 if size != "tiny" else 1,
    ))


def get_config(arg=None):
    arg = parse_arg(arg, size="demo", kind="vae")
    if arg.kind not in ("vae", "vq", "identity"):
        raise ValueError(f"config arg kind={arg.kind!r}; expected vae, vq or identity")
    s = SIZES.get(arg.size, {})
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config(arg.size, arg.kind)
    config.loss = loss_config(arg.size)
    config.data = dict(source="shapes", image_size=s["image_size"], batch_size=s["batch_size"],
                       heldout_images=256 if arg.size != "tiny" else 8)
    # Adam with taming-transformers' betas for both generator and discriminator.
    lr = 1e-4 if arg.size == "paper" else 1e-3
    config.optimizer = dict(lr=lr, final_lr=lr / 10, b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0,
                            warmup_steps=SCHEDULES[arg.size]["warmup_steps"],
                            grad_clip=1.0)
    for field in ("total_steps", "log_every", "checkpoint_every"):
        config[field] = SCHEDULES[arg.size][field]
    # Evaluators (transfusion_jax/evaluators/common.py), at every multiple of `every` and at the
    # end. "heldout" (reconstruction of the held-out images) also gives the VAE's latent_stats.
    config.evals = dict(heldout=dict(type="reconstruction",
                                     every=SCHEDULES[arg.size]["eval_every"]))
    config.time_limit_s = 0  # > 0: stop (evaluate, checkpoint) after this much wall time
    # After SIGTERM/SIGINT: checkpoint, then exit within this many seconds whatever hangs
    # (core/preemption.py); your cluster's grace period before its SIGKILL. 0: no limit.
    config.preemption_grace_s = 30.0
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.sharding_rules = [list(rule) for rule in DEFAULT_RULES]
    return config
