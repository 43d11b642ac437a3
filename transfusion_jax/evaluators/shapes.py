"""Shapes-world scores (type "shapes"): generate for held-out scenes, read the output back.

Text to image: each held-out caption (classifier-free guidance) -> an image, read back by the
shapes image parser. Image to text: each held-out image -> a caption (greedy), read back by the
caption parser. Both are scored against the scene's true objects (shapes_scores.py, a
GenEval-like table). Options: num (scenes per direction), sampler / steps / guidance.
Writes report.md (the table, the captions) and heldout_vs_generated.png into
evals/<step>/<name>/; returns "<direction>/<score>" scalars.
"""
import os

import numpy as np

from transfusion_jax.data.shapes.heldout import heldout_scenes
from transfusion_jax.evaluators import shapes_scores
from transfusion_jax.inference.tasks import Sampling, run_tasks, save_grid


class Evaluator:
    def __init__(self, context, num: int = 16, sampler: str = "dpm++2m", steps: int = 20,
                 guidance: float = 3.0):
        data = context.config.data
        if data.image_source != "shapes":
            raise ValueError(f"type 'shapes' scores the shapes world; data.image_source="
                             f"{data.image_source!r}")
        if num < 1:
            raise ValueError(f"num={num}: expected an integer >= 1")
        self.context = context
        self.captions, self.images, self.truths = heldout_scenes(data.shapes_seed, num,
                                                                 data.image_size)
        self.sampling = Sampling(sampler=sampler, steps=steps, guidance=guidance,
                                 max_new_tokens=48, num_samples=1)

    def run(self, variables, out_dir: str) -> dict:
        c, s = self.context, self.sampling
        names = [f"heldout_{i}" for i in range(len(self.images))]
        records = run_tasks(c.config, variables, c.tokenizer, s, prompts=self.captions,
                            images=self.images, names=names, out=out_dir, codec=c.codec)
        made = [r for r in records if r["task"] == "text_to_image"]
        blank = np.zeros_like(self.images[0])
        generated = [r["pixels"][0] if r["pixels"] else blank for r in made]
        captions = [r["text"] for r in records if r["task"] == "image_to_text"]
        table = shapes_scores.score_shapes(generated, self.truths, captions, self.truths)
        save_grid(os.path.join(out_dir, "heldout_vs_generated.png"),
                  [list(self.images), generated])
        text = shapes_scores.format_table(table)
        lines = ["# Shapes-world scores", "", text, "",
                 f"Text to image: {s.sampler}-{s.steps}, guidance {s.guidance}; image to text: "
                 "greedy.", "", "Top row: held-out images; bottom row: images generated from "
                 "their captions.", "", "![grid](heldout_vs_generated.png)", "",
                 "| held-out caption | generated caption |", "|---|---|"]
        lines += [f"| {truth} | {made} |" for truth, made in zip(self.captions, captions)]
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return {f"{task}/{key}": value for task, scores in table.items()
                for key, value in scores.items()}
