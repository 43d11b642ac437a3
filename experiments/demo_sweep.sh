#!/bin/bash
# The demo-recipe sweep of README "The demo recipe": the demo model for 400 steps per setting on
# one demo VAE, scored by the denoising and shapes evaluators (32 held-out scenes).
#   bash experiments/demo_sweep.sh AE_WORKDIR OUT_DIR
# Each run is a normal workdir OUT_DIR/NAME (rerunning skips finished ones). The demo's own
# settings are the baseline the overrides change; "old" restores the pre-issue-19 demo.
set -euo pipefail
ae=${1:?AE_WORKDIR (a trained demo VAE: experiments/autoencoder.py:demo)}
out=${2:?OUT_DIR}
old="--config.diffusion.prediction=eps --config.model.patch_size=2 --config.data.max_images=3
     --config.optimizer.lr=1e-3 --config.optimizer.final_lr=1e-4
     --config.data.text_to_patch_ratio=1.0 --config.data.shapes_interleaved_fraction=0.3
     --config.data.caption_first_prob=0.8"
mix="--config.data.text_to_patch_ratio=0.25 --config.data.shapes_interleaved_fraction=0.1
     --config.data.caption_first_prob=0.6"
p4="--config.diffusion.prediction=v --config.model.patch_size=4 --config.data.max_images=8"
run() {
  local name=$1; shift
  [ -f "$out/$name/evals/400/shapes/report.md" ] && return
  JAX_PLATFORMS=cpu python -m transfusion_jax.train --config experiments/transfusion.py:demo \
    --workdir "$out/$name" --config.autoencoder.checkpoint="$ae" --config.total_steps=400 \
    --config.evals.samples.every=0 --config.evals.shapes.every=400 \
    --config.evals.shapes.num=32 --config.evals.denoising.every=400 --config.log_every=50 "$@"
}
# shellcheck disable=SC2086  # the override lists split into arguments on purpose
{
run eps $old
run v $old --config.diffusion.prediction=v
run v_mix $old --config.diffusion.prediction=v $mix
run v_p4 $old $p4
run v_p4_pairs $old $p4 --config.data.text_source=none \
  --config.data.shapes_interleaved_fraction=0.0 --config.data.caption_first_prob=1.0
run v_p4_mix_shift2 $old $p4 $mix --config.diffusion.snr_shift=2.0
run v_p4_mix_lr3 $old $p4 $mix --config.optimizer.lr=3e-3 --config.optimizer.final_lr=3e-4
}
