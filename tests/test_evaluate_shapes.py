"""Shapes scores: rendered truth scores 100%, corrupted images and captions score lower."""
import os
import re

import numpy as np
import pytest

from transfusion_jax.evaluators import shapes_scores as ev
from transfusion_jax.data.shapes import world as shapes, text as shapes_text

N = 40


def heldout(n=N):
    out = []
    for i in range(n):
        rng = shapes.scene_rng(0, "heldout", i, stream=1)
        scene = shapes.sample_scene(rng)
        out.append((scene, shapes_text.caption(scene, rng)))
    return out


def test_rendered_truth_and_true_captions_score_full_marks():
    items = heldout()
    truths = [list(s.objects) for s, _ in items]
    images = [shapes.render_scene(s, 64) for s, _ in items]
    table = ev.score_shapes(images, truths, [c for _, c in items], truths)
    for task in ("text_to_image", "image_to_text"):
        s = table[task]
        for column in ("object", "position", "colour", "shape", "size", "count", "exact"):
            assert s[column] == 1.0, (task, column, s[column])
        assert s["spurious"] == 0.0
    text = ev.format_table(table)
    assert "| text_to_image | 40 | 100.0%" in text and "image_to_text" in text


def test_corrupted_images_and_captions_score_lower():
    items = heldout()
    truths = [list(s.objects) for s, _ in items]
    rng = np.random.default_rng(0)
    swapped = [shapes.render_scene(s, 64)[..., ::-1] for s, _ in items]  # RGB -> BGR: colours
    noisy = [np.clip(shapes.render_scene(s, 64) + rng.normal(0, 90, (64, 64, 3)), 0, 255)
             .astype(np.uint8) for s, _ in items]
    shifted = [shapes.render_scene(items[(i + 1) % N][0], 64) for i in range(N)]  # wrong scene
    base = ev.score_images([shapes.render_scene(s, 64) for s, _ in items], truths)
    colour = ev.score_images(swapped, truths)
    assert colour["colour"] < 0.8 and colour["position"] == 1.0 and colour["object"] < 0.8
    for corrupted in (noisy, shifted):
        s = ev.score_images(corrupted, truths)
        assert s["exact"] < base["exact"] and s["object"] < base["object"]
    wrong_words = [c.replace("circle", "square") if "circle" in c else c.replace("square", "circle")
                   for _, c in items]
    s = ev.score_captions(wrong_words, truths)
    assert s["shape"] < 1.0 and s["exact"] < 1.0 and s["colour"] == 1.0
    assert ev.score_captions(["Nothing here."] * N, truths)["position"] == 0.0


def test_mismatched_lengths_name_the_arguments():
    with pytest.raises(ValueError, match="2 predictions for 1 truths"):
        ev.score_objects([[], []], [[]])


# ---------------------------------------------------------------- question answering

def test_answers_score_by_exact_match_up_to_the_first_full_stop():
    questions = ["How many shapes are there?", "What colour is the shape in the top?",
                 "What shape is in the left?", "What size is the shape in the center?",
                 "Is there a red circle?", "What is in the top left?", "What shape is in the top?"]
    answers = ["three", "red", "a circle", "small", "yes", "a small red circle", "a square"]
    generated = [" three. Question: How many shapes", "Red.", " a  circle", "large.", " yes .",
                 "a small red square.", "square."]  # right x4; wrong size, object, article
    assert ev.normalise_answer(" A small  red circle. Question: x.") == "a small red circle"
    scores = ev.score_answers(generated, questions, answers)
    assert scores["all"] == {"items": 7, "accuracy": 4 / 7}
    assert scores["shape"] == {"items": 2, "accuracy": 0.5}
    assert scores["size"]["accuracy"] == scores["contents"]["accuracy"] == 0.0
    assert ev.answer_scalars(scores)["accuracy_exists"] == 1.0
    assert "| all | 7 | 57.1% |" in ev.format_answer_table(scores)
    assert ev.score_answers(answers, questions, answers)["all"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="not a shapes-world question"):
        ev.question_kind("Why?")


def test_heldout_questions_are_fixed_and_about_the_heldout_scenes():
    qa = ev.heldout_questions(0, N)
    assert qa == ev.heldout_questions(0, N)
    assert {ev.question_kind(q) for q, _ in qa} == set(ev.QUESTION_KINDS)
    numbers = ("zero", "one", "two", "three")
    for (q, a), (scene, _) in zip(qa, heldout()):
        if ev.question_kind(q) == "count":
            assert a == numbers[len(scene.objects)]


class _Tokenizer:
    def encode(self, text):
        return list(text.encode())


def _fake_run_tasks(evaluator, calls: list):
    """run_tasks without a model: true images (latents twice the data's scale) and captions,
    every other answer right; appends each call's (seed, prompts, length, prepared)."""
    def fake_run_tasks(config, variables, tokenizer, sampling, *, prompts=(), images=(),
                       question="", names=(), codec=None, prepared=None, length=None, **_):
        calls.append((sampling.seed, list(prompts), length, prepared))
        out = []
        for name in names[:len(prompts)]:
            pixels = evaluator.images[int(name.rsplit("_", 1)[1])]
            out.append(dict(task="text_to_image", pixels=[pixels], text="", latents=[
                2 * (pixels.astype(np.float32) / 127.5 - 1)]))
        for name, q in zip(names, question):  # a caption ("") and a question per image
            i = int(name.rsplit("_", 1)[1])
            if q:
                answer = evaluator.answers[i] if i % 2 == 0 else "purple"
                out.append(dict(task="answer", pixels=[], latents=[], text=f" {answer}. More"))
            else:
                out.append(dict(task="image_to_text", pixels=[], latents=[],
                                text=evaluator.captions[i]))
        return out
    return fake_run_tasks


def test_report_opens_with_figures_and_holds_answers_and_latent_std(tmp_path, monkeypatch):
    """The evaluator on fake generations (run_tasks stubbed: no model): true images and captions
    back, latents twice the data's scale, every other answer right; report.md's figures exist."""
    from transfusion_jax.core.config import load_config
    from transfusion_jax.evaluators import shapes as shapes_eval
    from transfusion_jax.evaluators.common import Context
    from transfusion_jax.models.autoencoder.codec import IDENTITY

    config = load_config("experiments/transfusion.py:tiny")
    config.data.image_size = 48  # large enough for the image parser (no model reads it here)
    (tmp_path / "metrics.jsonl").write_text("".join(
        f'{{"step": {s}, "lm_loss": {5 / s}, "diffusion_loss": {1 / s}}}\n' for s in range(1, 101)))
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "50.json").write_text(
        '{"shapes/answer/accuracy": 0.25, "denoising/cond/gain_t600": 0.01}')
    evaluator = shapes_eval.Evaluator(Context(config, _Tokenizer(), IDENTITY, str(tmp_path)),
                                      num=4, steps=2)
    monkeypatch.setattr(shapes_eval, "run_tasks", _fake_run_tasks(evaluator, []))
    out_dir = tmp_path / "evals" / "100" / "shapes"
    out_dir.mkdir(parents=True)
    scores = evaluator.run(None, str(out_dir))
    assert scores["text_to_image/object"] == scores["image_to_text/object"] == 1.0
    assert scores["answer/accuracy"] == 0.5 and scores["answer/items"] == 4
    assert scores["text_to_image/latent_std"] == pytest.approx(
        2 * scores["text_to_image/data_latent_std"], rel=1e-5)
    report = (out_dir / "report.md").read_text()
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert figures[:2] == ["text_to_image.png", "image_to_text.png"]
    assert "training_curves.png" in figures
    assert report.index("image_to_text.png") < report.index("| text_to_image | 4 |")
    for name in figures:
        assert (out_dir / name).stat().st_size > 1000, name
    assert "| all | 4 | 50.0% |" in report


def test_batches_are_padded_seeded_by_index_and_score_as_one(tmp_path, monkeypatch):
    """batch=3 of num=4: two run_tasks calls of 3 scenes (the last padded with its last scene),
    seeds 0 and 1, prompts at one length with prepare()'s generator and codec built once; the
    scores are one batch's."""
    from transfusion_jax.core.config import load_config
    from transfusion_jax.evaluators import shapes as shapes_eval
    from transfusion_jax.evaluators.common import Context
    from transfusion_jax.models.autoencoder.codec import IDENTITY

    config = load_config("experiments/transfusion.py:tiny")
    config.data.image_size = 48
    context = Context(config, _Tokenizer(), IDENTITY, str(tmp_path))
    monkeypatch.setattr(shapes_eval, "prepare", lambda *a: "prepared once")
    whole = shapes_eval.Evaluator(context, num=4, steps=2)
    split = shapes_eval.Evaluator(context, num=4, steps=2, batch=3)
    calls = []
    monkeypatch.setattr(shapes_eval, "run_tasks", _fake_run_tasks(whole, calls))
    one = whole.run(None, "")
    assert calls == [(0, whole.captions, None, None)]  # one batch: run_tasks' own, as before
    calls.clear()
    assert split.run(None, "") == one
    c = split.captions
    assert calls == [(0, c[:3], split.length, "prepared once"),
                     (1, c[3:] * 3, split.length, "prepared once")]
    assert split.length >= max(len(_Tokenizer().encode(t)) for t in c) + 2  # BOS caption BOI
    assert os.listdir(tmp_path) == []  # no out_dir (a process other than 0): no files
    with pytest.raises(ValueError, match="batch=-1"):
        shapes_eval.Evaluator(context, num=4, batch=-1)
