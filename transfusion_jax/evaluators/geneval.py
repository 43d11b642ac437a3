"""GenEval export (type "geneval"): images generated for GenEval's prompts, written in the folder
layout GenEval's detector-based scorer reads (Ghosh et al. 2023, github.com/djghosh13/geneval).

GenEval scores images with its own object detector (Mask2Former through mmdet, CLIP for colours);
this evaluator does not score, it writes what `evaluation/evaluate_images.py` reads, as
`generation/diffusers_generate.py` writes it:

    <out_dir>/00000/metadata.jsonl     the prompt's line of the metadata file (json.dump of it)
    <out_dir>/00000/samples/00000.png  images_per_prompt images (GenEval's default 4)
    <out_dir>/00000/grid.png           optional there: the prompt's images in one row, 2 px black
                                       padding (torchvision make_grid's)
    <out_dir>/00001/...

one folder per line of the metadata file, numbered from 0 in its order (5 digits; the samples too,
as diffusers_generate.py names them). evaluate_images.py takes every all-digit folder, json.load's
its metadata.jsonl (reading "tag", "include", "exclude", "prompt") and every `\\d+\\.png` of its
samples/; then

    python evaluation/evaluate_images.py <out_dir> --outfile results.jsonl --model-path DETECTOR
    python evaluation/summary_scores.py results.jsonl

in GenEval's own environment. out_dir is evals/<step>/<name>/ (files other than the numbered
folders are ignored there); a prompt folder's earlier samples are removed before new ones are
written.

Options: path (the metadata JSONL, one JSON object with a "prompt" a line: GenEval's
prompts/evaluation_metadata.jsonl, 553 prompts, or one made with its create_prompts.py; never
downloaded), images_per_prompt (4), num (the first num prompts; default all), batch (images
per generation call; the last call is padded, one compile), sampler / steps / guidance / seed
(defaults: DDPM-250, CFG 3 as the fid evaluator), grid (write grid.png), log_every. Images are
generated as the fid evaluator generates them: BOS caption BOI, one image per row, classifier-free
guidance against BOS BOI, decoded by the run's codec, at data.image_size (GenEval's detector was
made for photographs of 512 px and more). A batch's noise comes from fold_in(seed, call index):
the same images every run with the same batch, whichever process generates them: with several
processes each generates its calls and process 0 writes all images (evaluators/common.py);
without an out_dir nothing is written. Either model family (config.model.family): a
Chameleon run samples image tokens (sampler and steps not used) and decodes them with its VQ-VAE.

Returns {"prompts": prompts, "images": images generated (and written)}.
"""
from __future__ import annotations

import json
import os
import re
import time

import jax
import numpy as np
from PIL import Image

from transfusion_jax.core import distributed
from transfusion_jax.evaluators import common
from transfusion_jax.inference import generation
from transfusion_jax.inference.tasks import (Sampling, _check_lengths, image_codec, make_generator,
                                             to_uint8)

SAMPLE = re.compile(r"\d+\.png")  # what evaluate_images.py reads from samples/


def read_metadata(path: str, num: int | None = None) -> list[dict]:
    """The first `num` (None: all) lines of a GenEval metadata JSONL, each an object with a
    "prompt"; a missing file or a bad line is named."""
    if not path:
        raise ValueError("geneval: path: the metadata JSONL of prompts is required (GenEval's "
                         "prompts/evaluation_metadata.jsonl: one JSON object with \"prompt\", "
                         "\"tag\", \"include\" a line); nothing is downloaded")
    if not os.path.isfile(path):
        raise ValueError(f"geneval: path={path!r}: no such file; expected GenEval's "
                         "prompts/evaluation_metadata.jsonl (or one like it)")
    out = common.read_jsonl_records(
        "geneval", path, num, lambda m: isinstance(m, dict) and isinstance(m.get("prompt"), str)
        and bool(m["prompt"].strip()),
        "a JSON object with a non-empty \"prompt\" (GenEval's metadata lines)")
    if not out:
        raise ValueError(f"geneval: {path} has no prompts")
    return out


def make_grid(images, padding: int = 2) -> np.ndarray:
    """torchvision.utils.make_grid(images, nrow=len(images), padding=2, pad_value=0) as uint8
    [H + 2p, n (W + p) + p, 3]."""
    h, w = images[0].shape[:2]
    grid = np.zeros((h + 2 * padding, len(images) * (w + padding) + padding, 3), np.uint8)
    for j, im in enumerate(images):
        x = padding + j * (w + padding)
        grid[padding:padding + h, x:x + w] = im
    return grid


class Evaluator:
    def __init__(self, context, path: str = "", images_per_prompt: int = 4,
                 num: int | None = None, batch: int = 8, sampler: str = "ddpm", steps: int = 250,
                 guidance: float = 3.0, seed: int = 0, grid: bool = True, log_every: int = 10):
        if images_per_prompt < 1 or batch < 1 or (num is not None and num < 1):
            raise ValueError(f"geneval: images_per_prompt={images_per_prompt}, batch={batch}, "
                             f"num={num}: expected integers >= 1 (num may be unset: all)")
        config = context.config
        self.metadata = read_metadata(path, num)
        self.prompts = [m["prompt"] for m in self.metadata]
        _check_lengths(config, context.tokenizer, self.prompts, image=True)
        self.k, self.batch, self.grid, self.log_every = images_per_prompt, batch, grid, log_every
        self.sampling = Sampling(sampler=sampler, steps=steps, guidance=guidance,
                                 max_new_tokens=1, num_samples=1, seed=seed)
        self.config, self.tokenizer = config, context.tokenizer
        self.specials = generation.Specials.from_tokenizer(context.tokenizer)
        self.generator = make_generator(config, self.specials, self.sampling)
        self.length = max(len(context.tokenizer.encode(p)) for p in self.prompts) + 2  # BOS, BOI
        self.uncond = (generation.build_prompt([[[self.specials.boi]]] * batch, config.model,
                                               self.specials)
                       if guidance not in (0.0, 1.0) else None)
        self.decode = image_codec(config, context.codec)[1]

    def generate(self, variables, prompts, key) -> list[np.ndarray]:
        """Up to `batch` prompts -> uint8 images [H, W, 3] (the batch padded, one compile)."""
        sp = self.specials
        rows = [[self.tokenizer.encode(p), [sp.boi]] for p in prompts]
        rows += [rows[-1]] * (self.batch - len(rows))
        prompt = generation.build_prompt(rows, self.config.model, sp, length=self.length)
        result = self.generator(variables, prompt, key, uncond=self.uncond,
                                guidance=self.sampling.guidance, max_new_tokens=1, max_images=1)
        made = np.asarray(result.images[:, 0])
        return [to_uint8(self.decode(z)) for z in made[:len(prompts)]]

    def _prepare(self, out_dir: str, index: int) -> str:
        """The prompt's folder with its metadata.jsonl, samples/ emptied of earlier images."""
        folder = os.path.join(out_dir, f"{index:0>5}")
        samples = os.path.join(folder, "samples")
        os.makedirs(samples, exist_ok=True)
        for name in os.listdir(samples):
            if SAMPLE.fullmatch(name):
                os.remove(os.path.join(samples, name))
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            json.dump(self.metadata[index], f)  # as diffusers_generate.py writes it
        return folder

    def run(self, variables, out_dir: str) -> dict:
        items = [(i, s) for i in range(len(self.prompts)) for s in range(self.k)]
        key, made, t0 = jax.random.key(self.sampling.seed), {}, time.perf_counter()
        calls = range(0, len(items), self.batch)
        for call, start in enumerate(calls):
            if distributed.mine(call):
                made[call] = self.generate(variables, [self.prompts[i] for i, _ in
                                                       items[start:start + self.batch]],
                                           jax.random.fold_in(key, call))
            if self.log_every and (call + 1) % self.log_every == 0:
                distributed.log(f"geneval: {min(len(items), start + self.batch)}/{len(items)} "
                                f"images ({sum(map(len, made.values()))} here) in "
                                f"{time.perf_counter() - t0:.0f}s")
        images = [im for batch in distributed.gather_batches(made) for im in batch]
        if out_dir:  # process 0 writes every image (evaluators/common.py)
            self._write(out_dir, items, images)
        return {"prompts": len(self.prompts), "images": len(images)}

    def _write(self, out_dir: str, items, images) -> None:
        folders = [self._prepare(out_dir, i) for i in range(len(self.prompts))]
        done = {}
        for (i, s), image in zip(items, images):
            Image.fromarray(image).save(os.path.join(folders[i], "samples", f"{s:05}.png"))
            done.setdefault(i, []).append(image)
            if len(done[i]) == self.k and self.grid:
                Image.fromarray(make_grid(done[i])).save(os.path.join(folders[i], "grid.png"))
