"""GenEval-like scores for the shapes world: generated images and captions against held-out truth.

Both directions reduce to object lists (`ShapeObject(colour, shape, size, position)`): a
generated image is read back with `shapes.parse_image`, a generated caption with
`shapes_text.parse_caption`; the truth is the held-out scene's objects. Scores, all in [0, 1]:

    object      truth objects found exactly (all four attributes right)
    position    truth objects with some object in their grid cell
    colour, shape, size
                truth objects whose cell holds an object with that attribute right
    count       items with as many objects as the truth
    exact       items whose object set is exactly the truth (no miss, no extra: GenEval's bar)
    spurious    extra objects per item (in cells the truth leaves empty); lower is better

    table = score_shapes(images=..., image_truths=..., captions=..., caption_truths=...)
    print(format_table(table))

Question answering: one question per held-out scene (`heldout_questions`, text.question_answer),
the generated text up to its first "." against the exact answer the world's documents write
("three", "red", "a circle", "yes", "nothing", "a small red circle"), in lower case with spaces
collapsed (`normalise_answer`); `score_answers` gives the accuracy overall and per question kind.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from transfusion_jax.data.shapes import world
from transfusion_jax.data.shapes.world import ShapeObject, parse_image
from transfusion_jax.data.shapes.text import parse_caption, question_answer

ATTRIBUTES = ("colour", "shape", "size")
COLUMNS = ("object", "position", *ATTRIBUTES, "count", "exact", "spurious")
# The kinds of text.question_answer, by how their question opens.
QUESTION_KINDS = {"count": "How many shapes", "colour": "What colour is", "shape": "What shape is",
                  "size": "What size is", "exists": "Is there a", "contents": "What is in the"}


def score_objects(predicted: Sequence[Sequence[ShapeObject]],
                  truths: Sequence[Sequence[ShapeObject]]) -> dict:
    """The scores (see module doc) of predicted object lists against the true ones."""
    if len(predicted) != len(truths):
        raise ValueError(f"score_objects: {len(predicted)} predictions for {len(truths)} truths; "
                         "expected one per item")
    if not truths:
        raise ValueError("score_objects: no items to score")
    hits = {c: 0 for c in ("object", "position", *ATTRIBUTES)}
    n_objects = count = exact = spurious = 0
    for pred, truth in zip(predicted, truths):
        at = {o.position: o for o in pred}
        for obj in truth:
            found = at.get(obj.position)
            n_objects += 1
            hits["object"] += found == obj
            hits["position"] += found is not None
            for a in ATTRIBUTES:
                hits[a] += found is not None and getattr(found, a) == getattr(obj, a)
        count += len(pred) == len(truth)
        exact += set(pred) == set(truth)
        spurious += len(set(at) - {o.position for o in truth})
    n = len(truths)
    scores = {k: v / max(n_objects, 1) for k, v in hits.items()}
    scores.update(count=count / n, exact=exact / n, spurious=spurious / n, items=n,
                  objects=n_objects)
    return scores


def score_images(images, truths) -> dict:
    """Generated images (uint8 [0, 255] or float [-1, 1], [H, W, 3]) against true objects."""
    return score_objects([parse_image(np.asarray(im)) for im in images], truths)


def score_captions(captions: Sequence[str], truths) -> dict:
    return score_objects([parse_caption(c) for c in captions], truths)


def score_shapes(images=None, image_truths=None, captions=None, caption_truths=None) -> dict:
    """{"text_to_image": scores, "image_to_text": scores}, for the directions given."""
    table = {}
    if images is not None:
        table["text_to_image"] = score_images(images, image_truths)
    if captions is not None:
        table["image_to_text"] = score_captions(captions, caption_truths)
    return table


def format_table(table: dict) -> str:
    """A markdown table: one row per direction, one column per score."""
    lines = ["| task | items | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for task, s in table.items():
        cells = [f"{s[c]:.3f}" if c == "spurious" else f"{100 * s[c]:.1f}%" for c in COLUMNS]
        lines.append(f"| {task} | {s['items']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def item_marks(predicted: Sequence[Sequence[ShapeObject]],
               truths: Sequence[Sequence[ShapeObject]]) -> list[dict]:
    """Per item: {"found": truth objects found exactly, "objects": truth objects, "spurious":
    extra objects in cells the truth leaves empty, "exact": the object set is the truth}."""
    out = []
    for pred, truth in zip(predicted, truths):
        s = score_objects([pred], [truth])
        out.append(dict(found=round(s["object"] * s["objects"]), objects=s["objects"],
                        spurious=int(s["spurious"]), exact=bool(s["exact"])))
    return out


# ---------------------------------------------------------------------------------------------
# Question answering.

def heldout_questions(seed: int, num: int) -> list[tuple[str, str]]:
    """(question, answer) about each of the first `num` held-out scenes (the scenes that
    heldout.heldout_scenes draws), from the scene's own generator stream 5: the same every run."""
    out = []
    for i in range(num):
        scene = world.sample_scene(world.scene_rng(seed, "heldout", i, stream=1))
        out.append(question_answer(scene, world.scene_rng(seed, "heldout", i, stream=5)))
    return out


def question_kind(question: str) -> str:
    """The kind (a key of QUESTION_KINDS) of a text.question_answer question."""
    for kind, opening in QUESTION_KINDS.items():
        if question.startswith(opening):
            return kind
    raise ValueError(f"question {question!r}: not a shapes-world question (expected one "
                     f"opening with one of {list(QUESTION_KINDS.values())})")


def normalise_answer(generated: str) -> str:
    """The answer a generation gives: its text up to the first ".", in lower case, spaces
    collapsed (" A small red circle. Question: ..." -> "a small red circle")."""
    return " ".join(generated.split(".", 1)[0].lower().split())


def answer_right(generated: str, answer: str) -> bool:
    return normalise_answer(generated) == normalise_answer(answer)


def score_answers(generated: Sequence[str], questions: Sequence[str],
                  answers: Sequence[str]) -> dict:
    """{"all": {"items", "accuracy"}, <kind>: {"items", "accuracy"} for each kind asked}:
    exact-match accuracy of generated answers (see `normalise_answer`)."""
    if not len(generated) == len(questions) == len(answers):
        raise ValueError(f"score_answers: {len(generated)} generations for {len(questions)} "
                         f"questions and {len(answers)} answers; expected one each")
    if not questions:
        raise ValueError("score_answers: no questions to score")
    right: dict[str, list[bool]] = {"all": []}
    for text, q, a in zip(generated, questions, answers):
        ok = answer_right(text, a)
        right["all"].append(ok)
        right.setdefault(question_kind(q), []).append(ok)
    order = ["all"] + [k for k in QUESTION_KINDS if k in right]
    return {k: {"items": len(right[k]), "accuracy": float(np.mean(right[k]))} for k in order}


def answer_scalars(scores: dict) -> dict:
    """score_answers' table as flat scalars: accuracy, items, accuracy_<kind>."""
    out = {"accuracy": scores["all"]["accuracy"], "items": scores["all"]["items"]}
    out.update({f"accuracy_{k}": v["accuracy"] for k, v in scores.items() if k != "all"})
    return out


def format_answer_table(scores: dict) -> str:
    """A markdown table of score_answers: one row per question kind, then all of them."""
    lines = ["| question kind | items | accuracy |", "|---|---|---|"]
    for kind, s in [*[(k, v) for k, v in scores.items() if k != "all"], ("all", scores["all"])]:
        lines.append(f"| {kind} | {s['items']} | {100 * s['accuracy']:.1f}% |")
    return "\n".join(lines)
