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
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from transfusion_jax.data.shapes.world import ShapeObject, parse_image
from transfusion_jax.data.shapes.text import parse_caption

ATTRIBUTES = ("colour", "shape", "size")
COLUMNS = ("object", "position", *ATTRIBUTES, "count", "exact", "spurious")


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
