"""The generate CLI: `python -m transfusion_jax.generate --workdir DIR` (or transfusion-generate).

Tasks, any together:
    --prompt TEXT       text to image (repeatable); classifier-free guidance with --guidance
    --image PNG         image to text: a caption (repeatable)
    --image PNG --question TEXT
                        the answer, with the training documents' "Question: q Answer:" format
    --free TEXT         free mixed generation from a text start (text and images as sampled)
Writes to --out (default WORKDIR/generations): one PNG grid per task (a row per prompt, a column
per sample) and generations.jsonl (the text of every row, and its image files). Loads the run's
config, tokenizer and params (the EMA params when the run kept them).

Either model family (config.model.family): a Chameleon run samples its images as VQ-VAE tokens
(--image-temperature/--image-top-k/--image-top-p; the diffusion flags are not used) and decodes
them with its VQ-VAE; --guidance defaults to the paper's 5 for Chameleon, 3 for Transfusion.
"""
import argparse
import json
import os

from transfusion_jax import diffusion
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.inference.loading import load_for_inference
from transfusion_jax.inference import generation
from transfusion_jax.inference.tasks import Sampling, run_tasks
from transfusion_jax.models import family

# --guidance when not given, per model.family (paper section 4.1: CFG 5 following Chameleon in
# the controlled comparison, 3 in the Transfusion ablations).
DEFAULT_GUIDANCE = {"transfusion": 3.0, "chameleon": 5.0}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="transfusion-generate", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a training workdir (config.json, checkpoints)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--prompt", action="append", default=[], help="text to image")
    ap.add_argument("--image", action="append", default=[], help="image to text (PNG/JPEG)")
    ap.add_argument("--question", default="", help="with --image: answer this question")
    ap.add_argument("--free", action="append", default=[], help="free mixed generation")
    ap.add_argument("--num-samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--sampler", default="ddpm", choices=diffusion.SAMPLERS)
    ap.add_argument("--steps", type=int, default=250, help="denoising steps (paper: DDPM-250)")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    ap.add_argument("--guidance", type=float, default=None,
                    help="CFG scale for text to image (paper: 5 and 3; default 3 for Transfusion, "
                         "5 for Chameleon); 1 or 0: off")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    image = generation.IMAGE_TOKENS
    ap.add_argument("--image-temperature", type=float, default=image.temperature,
                    help="Chameleon's image tokens (0: greedy, degenerate)")
    ap.add_argument("--image-top-k", type=int, default=image.top_k, help="Chameleon; 0: off")
    ap.add_argument("--image-top-p", type=float, default=image.top_p, help="Chameleon; 1: off")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-images", type=int, default=2, help="free generation: images per row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="output folder (default WORKDIR/generations)")
    args = ap.parse_args(argv)
    if not (args.prompt or args.image or args.free):
        ap.error("nothing to do: give --prompt, --image or --free")
    if args.question and not args.image:
        ap.error("--question needs --image")
    return args


def sampling_from_args(args, config=None) -> Sampling:
    """The flags as Sampling; --guidance not given: DEFAULT_GUIDANCE of the run's model.family
    (Transfusion's without a config)."""
    guidance = args.guidance
    if guidance is None:
        guidance = DEFAULT_GUIDANCE[family(config.model) if config else "transfusion"]
    return Sampling(sampler=args.sampler, steps=args.steps, eta=args.eta, guidance=guidance,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, max_images=args.max_images,
                    num_samples=args.num_samples, seed=args.seed,
                    image_temperature=args.image_temperature, image_top_k=args.image_top_k,
                    image_top_p=args.image_top_p)


def main(argv=None):
    args = parse_args(argv)
    config, variables = load_for_inference(args.workdir, args.step)
    tokenizer = get_tokenizer(config.data, args.workdir)
    out = args.out or os.path.join(args.workdir, "generations")
    records = run_tasks(config, variables, tokenizer, sampling_from_args(args, config),
                        prompts=args.prompt, images=args.image, question=args.question,
                        free=args.free, out=out)
    with open(os.path.join(out, "generations.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps({k: v for k, v in rec.items()
                                if k not in ("pixels", "latents")}) + "\n")
            print(f"[{rec['task']}] {rec['input']!r} #{rec['sample']}: {rec['text']!r}"
                  f"{'  (+%d image)' % rec['images'] if rec['images'] else ''}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
