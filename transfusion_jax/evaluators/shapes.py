"""Shapes-world scores (type "shapes"): generate for held-out scenes, read the output back.

Text to image: each held-out caption (classifier-free guidance) -> an image, read back by the
shapes image parser. Image to text: each held-out image -> a caption (greedy), read back by the
caption parser. Both are scored against the scene's true objects (shapes_scores.py, a
GenEval-like table). Question answering: one question about each held-out image
(shapes_scores.heldout_questions), asked after the image as interleaved documents ask it,
"BOS BOI image EOI Question: q Answer:", answered greedily (in one generation with the
captions) and scored by exact match up to the first "." (answer/accuracy,
answer/accuracy_<kind>). The sampled images' latents are measured against the
held-out images' (text_to_image/latent_std, text_to_image/data_latent_std: a sampler that
drifts ends far from the data's std).
Options: num (scenes per direction), sampler / steps / guidance, batch (scenes per run_tasks
call: a text-to-image generation of `batch` rows and a text one of 2 x `batch`; 0, the default:
all `num` in one call; the last batch is padded). Batch j samples with seed + j, so the images
do not depend on which process draws it: with several processes the batches are dealt over them
(evaluators/common.py).

The Chameleon baseline (config.model.family) runs the same tasks; its images are VQ-VAE tokens,
so the latent std (of diffused latents) is replaced by the share of the codebook the sampled
images' code ids use against the held-out images' (text_to_image/code_usage,
text_to_image/data_code_usage: both count the same number of tokens; a collapsed sampler, such
as greedy image tokens, uses few codes). sampler and steps are not used there.

Writes into evals/<step>/<name>/: report.md, opening with figures (report_plots.py): held-out
captions beside the images generated from them (text_to_image.png), held-out images beside the
captions and answers generated for them (image_to_text.png), then the score tables, then the
training curves (training_curves.png: LM and diffusion loss from metrics.jsonl, these scores
and the denoising evaluator's conditioning gain over the steps in evals/<step>.json; Chameleon:
the LM loss on text and on image tokens, no gain); then the captions and answers as text, and
heldout_vs_generated.png. Returns "<direction>/<score>" scalars.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax.core import distributed
from transfusion_jax.data.shapes.heldout import heldout_scenes
from transfusion_jax.data.shapes.text import parse_caption
from transfusion_jax.data.shapes.world import parse_image
from transfusion_jax.evaluators import report_plots, shapes_scores
from transfusion_jax.inference.tasks import Sampling, prepare, run_tasks, save_grid
from transfusion_jax.models import family, patches_per_image
from transfusion_jax.models.chameleon import tokens_per_image

# What the curves show: these scores of this evaluator, and the denoising evaluator's gain.
CURVE_SCORES = {"text to image: objects right": "text_to_image/object",
                "image to text: objects right": "image_to_text/object",
                "answers right": "answer/accuracy"}
GAIN = "cond/gain_t600"


def _cell(text: str) -> str:
    """Text as one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code_usage(ids, codebook_size: int) -> float:
    """The share of a codebook that code ids use (distinct ids / codebook_size)."""
    return float(np.unique(np.asarray(ids)).size / codebook_size)


def _step_and_name(out_dir: str) -> tuple[int | None, str]:
    """(step, evaluator name) of evals/<step>/<name>/ (step None for another layout)."""
    parent, name = os.path.split(os.path.normpath(out_dir))
    step = os.path.basename(parent)
    return (int(step) if step.isdigit() else None), name


class Evaluator:
    def __init__(self, context, num: int = 16, sampler: str = "dpm++2m", steps: int = 20,
                 guidance: float = 3.0, batch: int = 0):
        data = context.config.data
        if data.image_source != "shapes":
            raise ValueError(f"type 'shapes' scores the shapes world; data.image_source="
                             f"{data.image_source!r}")
        if num < 1 or batch < 0:
            raise ValueError(f"num={num}, batch={batch}: expected integers >= 1 and >= 0 "
                             "(0: all scenes in one batch)")
        self.batch = min(batch or num, num)
        self.context = context
        self.captions, self.images, self.truths = heldout_scenes(data.shapes_seed, num,
                                                                 data.image_size)
        self.questions, self.answers = map(list, zip(*shapes_scores.heldout_questions(
            data.shapes_seed, num)))
        self.sampling = Sampling(sampler=sampler, steps=steps, guidance=guidance,
                                 max_new_tokens=48, num_samples=1)
        codec = context.codec
        pixels = jnp.asarray(np.stack(self.images).astype(np.float32) / 127.5 - 1.0)
        self.tokens_only = family(context.config.model) == "chameleon"
        # The codec's variables are closed over, as inference/tasks.py does: restored onto one
        # device, as arguments they clash with the run's mesh when built under it.
        if self.tokens_only:  # image statistics of code ids (module doc)
            self.codebook = context.config.model.image_vocab_size
            ids = jax.jit(lambda x: codec.encode_ids(codec.variables, x))(pixels)
            self.data_image_stat = code_usage(ids, self.codebook)
        else:
            self.data_image_stat = float(jnp.std(jax.jit(
                lambda x: codec.encode(codec.variables, x))(pixels)))
        # Several batches: the generator and codec built once, every prompt at one length: one
        # compile for all batches. One batch: run_tasks' own, as a single call builds them.
        several = self.batch < num
        self.prepared = (prepare(context.config, context.tokenizer, self.sampling, codec)
                         if several else None)
        self.length = self._longest_prompt() if several else None

    def _longest_prompt(self) -> int:
        """Elements of the longest prompt run_tasks builds here: BOS caption BOI (text to
        image), or BOS BOI image EOI and the question (captions: none; answers)."""
        cfg, tok = self.context.config.model, self.context.tokenizer
        image = tokens_per_image(cfg) if self.tokens_only else patches_per_image(cfg)
        asked = max(len(tok.encode(f"Question: {q} Answer:")) for q in self.questions)
        return max(max(len(tok.encode(c)) for c in self.captions) + 2, image + 3 + asked)

    def _generate(self, variables, j: int):
        """(generated images, their latents, captions, answers) of batch j's scenes, in one
        run_tasks call (one text generation for both: each image asked for a caption ("") and
        a question); the last batch padded with its last scene. Its noise: seed + j."""
        c, start = self.context, j * self.batch
        real = min(self.batch, len(self.images) - start)
        scenes = list(range(start, start + real)) + [start + real - 1] * (self.batch - real)
        records = run_tasks(
            c.config, variables, c.tokenizer,
            dataclasses.replace(self.sampling, seed=self.sampling.seed + j),
            prompts=[self.captions[i] for i in scenes], images=[self.images[i] for i in scenes] * 2,
            question=[""] * len(scenes) + [self.questions[i] for i in scenes],
            names=[f"heldout_{i}" for i in scenes] * 2, codec=c.codec, prepared=self.prepared,
            length=self.length)
        made = [r for r in records if r["task"] == "text_to_image"][:real]
        blank = np.zeros_like(self.images[0])
        return ([r["pixels"][0] if r["pixels"] else blank for r in made],
                [z for r in made for z in r["latents"]],
                [r["text"] for r in records if r["task"] == "image_to_text"][:real],
                [r["text"] for r in records if r["task"] == "answer"][:real])

    def run(self, variables, out_dir: str) -> dict:
        made = {j: self._generate(variables, j) for j in range(-(-len(self.images) // self.batch))
                if distributed.mine(j)}
        generated, latents, captions, answers = (
            [x for batch in part for x in batch] for part in zip(*distributed.gather_batches(made)))
        table = shapes_scores.score_shapes(generated, self.truths, captions, self.truths)
        qa_table = shapes_scores.score_answers(answers, self.questions, self.answers)
        scalars = {f"{task}/{key}": value for task, scores in table.items()
                   for key, value in scores.items()}
        scalars.update(self._image_stats(latents))
        scalars.update({f"answer/{k}": v for k, v in
                        shapes_scores.answer_scalars(qa_table).items()})
        if out_dir:
            save_grid(os.path.join(out_dir, "heldout_vs_generated.png"),
                      [list(self.images), generated])
            self._report(out_dir, generated, captions, answers, table, qa_table, scalars)
        return scalars

    def _image_stats(self, latents) -> dict:
        """Sampled images against the held-out ones: latent std (Transfusion) or codebook use
        (Chameleon); nan without sampled images."""
        if self.tokens_only:
            made = code_usage(np.stack(latents), self.codebook) if latents else float("nan")
            return {"text_to_image/code_usage": made,
                    "text_to_image/data_code_usage": self.data_image_stat}
        made = float(np.std(np.stack(latents))) if latents else float("nan")
        return {"text_to_image/latent_std": made,
                "text_to_image/data_latent_std": self.data_image_stat}

    def _image_lines(self, scalars) -> list[str]:
        """The report's lines on the sampled images' statistics and how they were sampled."""
        s = self.sampling
        if self.tokens_only:
            return [f"Sampled images' code ids use {scalars['text_to_image/code_usage']:.1%} of "
                    f"the {self.codebook} codes, held-out images' "
                    f"{scalars['text_to_image/data_code_usage']:.1%}.", "",
                    f"Text to image: image tokens at temperature {s.image_temperature}, "
                    f"guidance {s.guidance}; image to text and answers: greedy, answers scored "
                    "up to their first \".\".", ""]
        return [f"Sampled images' latent std {scalars['text_to_image/latent_std']:.3f}, "
                f"held-out images' {scalars['text_to_image/data_latent_std']:.3f}.", "",
                f"Text to image: {s.sampler}-{s.steps}, guidance {s.guidance}; image to text "
                "and answers: greedy, answers scored up to their first \".\".", ""]

    def _report(self, out_dir, generated, captions, answers, table, qa_table, scalars) -> None:
        """report.md and its figures (module doc)."""
        image_marks = shapes_scores.item_marks([parse_image(im) for im in generated],
                                               self.truths)
        caption_marks = shapes_scores.item_marks([parse_caption(t) for t in captions],
                                                 self.truths)
        right = [shapes_scores.answer_right(g, a) for g, a in zip(answers, self.answers)]
        report_plots.text_to_image_figure(os.path.join(out_dir, "text_to_image.png"),
                                          self.captions, self.images, generated, image_marks)
        report_plots.image_to_text_figure(
            os.path.join(out_dir, "image_to_text.png"), self.images, captions, caption_marks,
            [(q, a, shapes_scores.normalise_answer(g), ok)
             for q, a, g, ok in zip(self.questions, self.answers, answers, right)])
        step, name = _step_and_name(out_dir)
        curves = report_plots.training_curves(
            os.path.join(out_dir, "training_curves.png"), self.context.workdir,
            {label: f"{name}/{key}" for label, key in CURVE_SCORES.items()},
            None if self.tokens_only else GAIN,
            None if step is None else (step, {f"{name}/{k}": v for k, v in scalars.items()}),
            report_plots.CHAMELEON_LOSSES if self.tokens_only
            else report_plots.TRANSFUSION_LOSSES)
        n = len(self.images)
        shown = f"{n}" if n <= 16 else f"the first 16 of {n}"
        lines = [f"# Shapes world{'' if step is None else f', step {step}'}", "",
                 f"Held-out scenes, never trained on ({shown}). Text to image: the caption "
                 "below, its true image (left) and the image "
                 "generated from it (right), with how many of the true objects the image parser "
                 "finds there.", "", "![text to image](text_to_image.png)", "",
                 "Image to text: the held-out image, the caption generated for it (objects the "
                 "caption parser reads right) and one question with the generated and the true "
                 "answer.", "", "![image to text](image_to_text.png)", "",
                 "## Scores", "", shapes_scores.format_table(table), "",
                 "Question answering, one question about each held-out image:", "",
                 shapes_scores.format_answer_table(qa_table), "",
                 *self._image_lines(scalars)]
        if curves:
            lines += ["## Training", "", "![training curves](training_curves.png)", ""]
        lines += ["## Generated text", "", "| held-out caption | generated caption |",
                  "|---|---|"]
        lines += [f"| {_cell(truth)} | {_cell(made)} |"
                  for truth, made in zip(self.captions, captions)]
        lines += ["", "| question | answer | generated, to its first \".\" | right |",
                  "|---|---|---|---|"]
        lines += [f"| {_cell(q)} | {_cell(a)} | {_cell(shapes_scores.normalise_answer(g))} | "
                  f"{'yes' if ok else 'no'} |"
                  for q, a, g, ok in zip(self.questions, self.answers, answers, right)]
        lines += ["", "Top row: held-out images; bottom row: images generated from their "
                  "captions.", "", "![grid](heldout_vs_generated.png)"]
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
