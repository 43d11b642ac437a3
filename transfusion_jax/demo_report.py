"""The demo's last stage: generate for held-out shapes scenes and score what comes out.

    python -m transfusion_jax.demo_report --workdir DIR [--num 16] [--sampler dpm++2m --steps 20]

Text to image: each held-out caption (classifier-free guidance) -> an image, read back by the
shapes image parser. Image to text: each held-out image -> a caption (greedy), read back by the
caption parser. Both are scored against the scene's true objects (evaluate_shapes.py, a
GenEval-like table), printed, and written with the image grids to DIR/report/report.md.
"""
import argparse
import os

import numpy as np
from PIL import Image

from transfusion_jax import evaluate_shapes, generate_cli
from transfusion_jax.checkpoint import load_for_inference
from transfusion_jax.data import shapes, shapes_text
from transfusion_jax.data.tokenizer import get_tokenizer


def heldout_scenes(config, num: int):
    """(captions, uint8 images, scenes) of the first `num` held-out caption-image pairs."""
    size = config.data.image_size
    captions, images, scenes = [], [], []
    for i in range(num):
        rng = shapes.scene_rng(config.data.shapes_seed, "heldout", i, stream=1)
        scene = shapes.sample_scene(rng)
        scenes.append(scene.objects)
        images.append(shapes.render_scene(scene, size))
        captions.append(shapes_text.caption(scene, rng))
    return captions, images, scenes


def main(argv=None):
    ap = argparse.ArgumentParser(prog="demo_report", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--num", type=int, default=16, help="held-out scenes per direction")
    ap.add_argument("--sampler", default="dpm++2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    a = ap.parse_args(argv)

    config, params = load_for_inference(a.workdir)
    tok = get_tokenizer(config.data, a.workdir)
    out = os.path.join(a.workdir, "report")
    os.makedirs(out, exist_ok=True)
    captions, images, truths = heldout_scenes(config, a.num)
    paths = []
    for i, im in enumerate(images):
        paths.append(os.path.join(out, f"heldout_{i}.png"))
        Image.fromarray(im).save(paths[-1])
    records = generate_cli.text_to_image_samples(config, params, tok, captions, out, a.sampler,
                                                 a.steps, a.guidance, images=paths)
    made = [r for r in records if r["task"] == "text_to_image"]
    blank = np.zeros_like(images[0])
    gen_images = [r["pixels"][0] if r["pixels"] else blank for r in made]
    gen_captions = [r["text"] for r in records if r["task"] == "image_to_text"]
    table = evaluate_shapes.score_shapes(gen_images, truths, gen_captions, truths)
    text = evaluate_shapes.format_table(table)
    generate_cli.save_grid(os.path.join(out, "heldout_vs_generated.png"),
                           [list(images), gen_images])
    lines = [f"# Shapes demo report: {a.workdir}", "", text, "",
             f"Text to image: {a.sampler}-{a.steps}, guidance {a.guidance}; image to text: greedy.",
             "", "Top row: held-out images; bottom row: images generated from their captions.",
             "", "![grid](heldout_vs_generated.png)", "", "| held-out caption | generated caption |",
             "|---|---|"]
    lines += [f"| {c} | {g} |" for c, g in zip(captions, gen_captions)]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(text)
    print(f"report: {out}/report.md")
    return table


if __name__ == "__main__":
    main()
