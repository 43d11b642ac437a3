"""The Chameleon baseline (paper section 4.2): images as VQ-VAE code ids, one LM loss.

    --config experiments/chameleon.py:SIZE[,mesh=M]

SIZE as in experiments/transfusion.py (tiny, demo, demo_long, 0.16b ... 7b). Each is the matched
pair of the Transfusion config of the same size: the same transformer (plus Chameleon's
stability changes), the same data config and seed (so the same documents in the same order; an
image counts as the Transfusion run's patches in the text:image mix, data.mix_patches_per_image),
the same autoencoder architecture and training recipe (experiments/autoencoder.py, kind=vq:
the quantiser and codebook loss the only difference), the same steps and optimizer but for the
learning rate. What differs, from the paper and Chameleon Team (2024):
  - images are the VQ-VAE's code ids between BOI and EOI (16384 codes, 1024 tokens per 256x256
    image at 8x), ids offset past the text vocabulary; the LM loss covers them too;
  - QK-norm, norm re-ordering (norm on each residual branch's output) and z-loss 1e-5, each its
    own field (model.qk_norm, model.norm_reorder, z_loss);
  - lr 1e-4 at the paper's sizes (Transfusion: 3e-4).
An image takes latent_size^2 tokens, not (latent_size / patch_size)^2 patches, so rows hold
fewer images: the demo's rows are longer (512) to keep whole images in them. The demo keeps
the 4 x 128 model it was measured with (README, "Chameleon at the demo's scale"), not the
Transfusion demo's 4 x 192.
"""
import importlib.util
import os


from transfusion_jax.core.config import parse_arg

_spec = importlib.util.spec_from_file_location(
    "_transfusion_experiment", os.path.join(os.path.dirname(__file__), "transfusion.py"))
transfusion = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(transfusion)

# Codebook sizes of experiments/autoencoder.py (kind=vq) by Transfusion size; and its workdir.
CODEBOOK = {"tiny": 64, "demo": 2048, "demo_long": 2048}  # paper sizes: 16384
# Time-matched to transfusion.py's demo at 4 x 128 (1200 and 6000 steps), on that model.
DEMO_STEPS = {"demo": 540, "demo_long": 2700}
DEMO_MODEL = (128, 4, 512)  # dim, heads, mlp_dim
VQ_AUTOENCODERS = {"tiny": (2, "workdir/tiny/vq"), "demo": (4, "workdir/demo/vq"),
                   "demo_long": (4, "workdir/demo/vq")}


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", mesh="dp")
    config = transfusion.get_config(f"size={arg.size},mesh={arg.mesh}")
    m = config.model
    matched_p = (m.latent_size // m.patch_size) ** 2  # the Transfusion run's patches per image
    m.family = "chameleon"
    codes = CODEBOOK.get(arg.size, 16384)
    m.image_vocab_size = codes
    m.vocab_size = m.vocab_size + codes  # text ids first, then image ids
    downsample, ae_dir = VQ_AUTOENCODERS.get(arg.size, (8, ""))
    m.latent_size = config.data.image_size // downsample  # the VQ grid: tokens per image side
    m.patch_size = 1  # an image element is one code (patches_per_image = latent_size^2)
    m.qk_norm = True
    m.norm_reorder = True
    config.z_loss = 1e-5
    config.autoencoder = dict(kind="vq", downsample=downsample, checkpoint=ae_dir)
    config.data.mix_patches_per_image = matched_p
    if arg.size == "tiny":  # 8x8 codes of 16x16 pixels: 66 elements an image, rows of 128
        config.data.max_images = 1
    elif arg.size in transfusion.DEMOS:  # 12x12 codes: 146 elements an image
        config.data.seq_len, config.data.max_images = 512, 3
        # The model its README figures were measured with (4 x 128 x 4, 540 steps): the
        # Transfusion demo widened to 4 x 192 later, and this one was not re-timed since.
        m.dim, m.heads, m.mlp_dim = DEMO_MODEL
        m.patch_position = "none"
        # The Transfusion demo's time, not its steps: 0.85 steps/s here against its 1.88 on
        # the 2-core CPU (rows twice as long, 16x the elements per image), README "Chameleon".
        config.total_steps = DEMO_STEPS[arg.size]
        config.optimizer.warmup_steps = config.total_steps // 12
        for ev in config.evals.values():
            if ev["type"] == "sample_grid":
                ev["every"] = config.total_steps // 2
            elif ev["every"]:
                ev["every"] = config.total_steps
    else:
        config.optimizer.lr, config.optimizer.final_lr = 1e-4, 5e-6  # Chameleon's lr
    # Transfusion-only parts: no diffusion head, no latent clipping; evaluators that need them
    # (denoising) are dropped. Text-to-image sampling: CFG 5 as the paper's Chameleon.
    config.evals = {name: dict(ev) for name, ev in config.evals.items()
                    if ev["type"] != "denoising"}
    for ev in config.evals.values():
        if ev["type"] in ("sample_grid", "shapes", "fid"):
            ev["guidance"] = 5.0
    return config
