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
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from transfusion_jax import diffusion, latents
from transfusion_jax import generate as gen
from transfusion_jax.checkpoint import load_for_inference
from transfusion_jax.data.documents import load_image


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
    ap.add_argument("--guidance", type=float, default=3.0,
                    help="CFG scale for text to image (paper: 5 and 3); 1 or 0: off")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
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


def image_codec(config, codec: latents.Codec | None = None):
    """(pixels [-1, 1] -> latents, latents -> pixels) of the run's frozen autoencoder
    (`codec`, else loaded from config.autoencoder), each for one image, jitted."""
    codec = codec or latents.load(config.autoencoder)
    if codec.kind == "identity":
        return (lambda x: x), (lambda z: np.clip(z, -1.0, 1.0))
    encode = jax.jit(lambda x: codec.encode(codec.variables, x[None])[0])
    decode = jax.jit(lambda z: jnp.clip(codec.decode(codec.variables, z[None])[0], -1.0, 1.0))
    return (lambda x: np.asarray(encode(jnp.asarray(x)))), (lambda z: np.asarray(decode(z)))


def to_uint8(pixels) -> np.ndarray:
    return np.round((np.clip(np.asarray(pixels), -1, 1) + 1) * 127.5).astype(np.uint8)


def save_grid(path, rows) -> None:
    """rows: list of lists of uint8 [H, W, 3] -> one PNG, 2 px gaps."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = im
    Image.fromarray(grid).save(path)


def make_generator(config, specials, args, text_sampling=None):
    return gen.Generator(
        config.model, diffusion.make_schedule(config.diffusion.schedule,
                                              config.diffusion.timesteps), specials,
        gen.ImageSampling(args.sampler, args.steps, args.eta, config.diffusion.clip_x0),
        text_sampling or gen.TextSampling(args.temperature, args.top_k, args.top_p))


def run_tasks(config, params, tok, args, codec=None):
    """-> list of records {task, input, sample, text, images, pixels}; writes grids into
    args.out. `pixels` holds the generated images (uint8 [H, W, 3]) for scoring. `codec`: the
    frozen autoencoder when the caller has it loaded (else read from config.autoencoder)."""
    specials = gen.Specials.from_tokenizer(tok)
    encode, decode = image_codec(config, codec)
    g = make_generator(config, specials, args)
    key, n, records = jax.random.key(args.seed), args.num_samples, []

    def run(task, inputs, rows, uncond=None, **kw):
        prompt = gen.build_prompt([r for r in rows for _ in range(n)], config.model, specials)
        if uncond is not None:
            uncond = gen.build_prompt([r for r in uncond for _ in range(n)], config.model, specials)
        out = g(params, prompt, jax.random.fold_in(key, len(records)), uncond=uncond, **kw)
        grid = []
        for i, name in enumerate(inputs):
            grid.append([])
            for s in range(n):
                r = i * n + s
                m, k = int(out.num_images[r]), int(out.num_tokens[r])
                pics = [to_uint8(decode(np.asarray(out.images[r, j]))) for j in range(m)]
                grid[-1] += pics
                records.append(dict(task=task, input=name, sample=s, images=m, pixels=pics,
                                    text=tok.decode(np.asarray(out.tokens[r, :k]))))
        if any(grid):
            save_grid(os.path.join(args.out, f"{task}.png"), [row for row in grid if row])

    if args.prompt:
        cfg_on = args.guidance not in (0.0, 1.0)
        run("text_to_image", args.prompt, [[tok.encode(p), [specials.boi]] for p in args.prompt],
            uncond=[[[specials.boi]]] * len(args.prompt) if cfg_on else None,
            guidance=args.guidance, max_new_tokens=1, max_images=1)
    if args.image:
        images = [encode(load_image(p, config.data.image_size)) for p in args.image]  # [-1, 1]
        question = tok.encode(f"Question: {args.question} Answer:") if args.question else []
        run("answer" if args.question else "image_to_text", args.image,
            [[im, question] for im in images], max_new_tokens=args.max_new_tokens,
            max_images=0, allow_images=False)
    if args.free:
        run("free", args.free, [[tok.encode(t)] for t in args.free],
            max_new_tokens=args.max_new_tokens, max_images=args.max_images)
    return records


def text_to_image_samples(config, variables, tok, prompts, out, sampler="dpm++2m", steps=20,
                          guidance=3.0, images=(), max_new_tokens=48, codec=None):
    """Images for `prompts` (and captions for `images`, PNG paths) with one sample each, as the
    CLI would make them; grids land in `out`. -> run_tasks' records."""
    argv = ["--workdir", "", "--out", out, "--num-samples", "1", "--sampler", sampler,
            "--steps", str(steps), "--guidance", str(guidance),
            "--max-new-tokens", str(max_new_tokens)]
    argv += [x for p in prompts for x in ("--prompt", p)] + [x for i in images for x in ("--image", i)]
    os.makedirs(out, exist_ok=True)
    return run_tasks(config, variables, tok, parse_args(argv), codec)


def main(argv=None):
    args = parse_args(argv)
    from transfusion_jax.data.tokenizer import get_tokenizer
    config, params = load_for_inference(args.workdir, args.step)
    tok = get_tokenizer(config.data, args.workdir)
    args.out = args.out or os.path.join(args.workdir, "generations")
    os.makedirs(args.out, exist_ok=True)
    records = run_tasks(config, params, tok, args)
    with open(os.path.join(args.out, "generations.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps({k: v for k, v in rec.items() if k != "pixels"}) + "\n")
            print(f"[{rec['task']}] {rec['input']!r} #{rec['sample']}: {rec['text']!r}"
                  f"{'  (+%d image)' % rec['images'] if rec['images'] else ''}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
