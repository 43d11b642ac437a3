"""Captioning CIDEr (type "captioning"): greedy captions of held-out images, scored by CIDEr-D.

The paper (section 4.1) captions the MS-COCO Karpathy test images greedily from image prompts in
the training's caption format and reports CIDEr (pycocoevalcap's scorer, here `cider.cider_d`).
This evaluator does the same on the shapes world's held-out scenes: each prompt is BOS, the
image (BOI latents EOI), as an image-first caption pair is laid out in training, and the model
writes until EOS. References per scene: its held-out caption, then other phrasings of the same
scene drawn from the caption grammar of data/shapes/text.py (COCO has about five per image).
Captions and references are tokenised with `cider.tokenize` (not COCO's Java PTBTokenizer).

Options: num (scenes), references (per scene), max_new_tokens, batch (rows per generation call;
the last batch is padded, so the generator compiles once; with several processes each captions
its batches, evaluators/common.py). Writes captions.json into evals/<step>/<name>/; returns
{"cider", "images", "references", "empty"}.

Either model family (config.model.family): a Chameleon run's prompt image is its VQ-VAE's code
ids (BOI, ids, EOI as text elements; inference/generation.py), and its captions are text only
(image ids are banned while captioning).
"""
import json
import os

import jax
import numpy as np

from transfusion_jax.core import distributed
from transfusion_jax.data.documents import load_image
from transfusion_jax.data.shapes import text as shapes_text, world
from transfusion_jax.data.shapes.heldout import heldout_scenes
from transfusion_jax.evaluators.cider import cider_d, tokenize
from transfusion_jax.inference import generation
from transfusion_jax.inference.tasks import Sampling, image_codec, make_generator, text_ids


def reference_captions(seed: int, caption: str, objects, index: int, count: int) -> list[str]:
    """The held-out `caption` of scene `index`, then other phrasings of its `objects` (distinct,
    deterministic; fewer than `count` only if the grammar runs out)."""
    scene, refs = world.Scene(tuple(objects), ()), [caption]
    for k in range(20 * count):
        if len(refs) == count:
            break
        other = shapes_text.caption(scene, world.scene_rng(seed, "heldout", index, stream=10 + k))
        if other not in refs:
            refs.append(other)
    return refs


class Evaluator:
    def __init__(self, context, num: int = 64, references: int = 5, max_new_tokens: int = 48,
                 batch: int = 16):
        data = context.config.data
        if data.image_source != "shapes":
            raise ValueError(f"type 'captioning' captions the shapes world's held-out scenes; "
                             f"data.image_source={data.image_source!r}")
        for name, value in (("num", num), ("references", references), ("batch", batch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        self.context, self.max_new_tokens, self.batch = context, max_new_tokens, batch
        captions, images, objects = heldout_scenes(data.shapes_seed, num, data.image_size)
        self.references = [reference_captions(data.shapes_seed, c, o, i, references)
                           for i, (c, o) in enumerate(zip(captions, objects))]
        sampling = Sampling(max_new_tokens=max_new_tokens, num_samples=1)  # greedy
        self.specials = generation.Specials.from_tokenizer(context.tokenizer)
        self.generator = make_generator(context.config, self.specials, sampling)
        encode, _ = image_codec(context.config, context.codec)
        self.latents = [encode(load_image(im, data.image_size)) for im in images]

    def _prompt(self, start: int):
        """(prompt of the batch from scene `start`, number of real rows): the last batch padded
        with its first row."""
        rows = [[z] for z in self.latents[start:start + self.batch]]
        real = len(rows)
        rows += [rows[0]] * (self.batch - real)
        return generation.build_prompt(rows, self.context.config.model, self.specials), real

    def captions(self, variables) -> list[str]:
        """The greedy caption of every held-out image; with several processes each captions its
        batches (evaluators/common.py)."""
        made, n_batches = {}, -(-len(self.latents) // self.batch)
        model = self.context.config.model
        for i in range(n_batches):
            if not distributed.mine(i):
                continue
            prompt, real = self._prompt(i * self.batch)
            result = self.generator(variables, prompt, jax.random.key(0),  # greedy: no noise
                                    max_new_tokens=self.max_new_tokens, max_images=0,
                                    allow_images=False)
            tokens, lengths = np.asarray(result.tokens), np.asarray(result.num_tokens)
            made[i] = [self.context.tokenizer.decode(text_ids(tokens[r, :lengths[r]], model))
                       for r in range(real)]
            if n_batches > 1:
                distributed.log(f"captioning: batch {i + 1}/{n_batches}")
        return [c for batch in distributed.gather_batches(made) for c in batch]

    def run(self, variables, out_dir: str) -> dict:
        captions = self.captions(variables)
        candidates = [tokenize(c) for c in captions]
        refs = [[tokenize(r) for r in rs] for rs in self.references]
        score, per_image = cider_d(candidates, refs)
        if out_dir:
            records = [dict(index=i, caption=c, tokens=t, references=rs, cider=float(s))
                       for i, (c, t, rs, s) in enumerate(zip(captions, candidates,
                                                             self.references, per_image))]
            with open(os.path.join(out_dir, "captions.json"), "w") as f:
                json.dump({"cider": score,
                           "tokenizer": "transfusion_jax.evaluators.cider.tokenize",
                           "captions": records}, f, indent=1)
        return {"cider": score, "images": len(captions),
                "references": float(np.mean([len(r) for r in refs])),
                "empty": sum(not t for t in candidates)}
