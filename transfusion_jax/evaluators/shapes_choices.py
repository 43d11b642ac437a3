"""A multiple-choice set about held-out shapes scenes, for ranked classification (ranked.py).

Question i is about the image of held-out scene i (the scene `heldout.heldout_scenes` draws, from
the "heldout" split: never trained on). It is asked the way interleaved training documents ask
(text.question_answer: image, then "Question: <q> Answer: <a>."): the context is the image and
"Question: <q> Answer:", the 4 choices are the right answer and 3 wrong ones of the same kind,
in a random order. Kinds with fewer than 4 possible answers (size, yes/no) are redrawn; "what
shape" offers "nothing" as a fourth answer. Everything is a function of (seed, shapes_seed, i).
"""
from __future__ import annotations

import numpy as np

from transfusion_jax.data.shapes import text, world

_NUMBERS = text._NUMBERS  # the words the world counts with ("zero" ... "six")
_CONTENTS = ["nothing"] + [f"a {s} {c} {k}" for s in world.SIZES for c in world.COLOUR_NAMES
                           for k in world.SHAPES]


def answer_domain(question: str) -> list[str] | None:
    """Every answer a question of this kind can have; None for kinds with fewer than 4."""
    if question.startswith("How many shapes"):
        return list(_NUMBERS)
    if question.startswith("What colour is"):
        return list(world.COLOUR_NAMES)
    if question.startswith("What shape is"):
        return [f"a {k}" for k in world.SHAPES] + ["nothing"]
    if question.startswith("What is in the"):
        return list(_CONTENTS)
    return None


def question(scene: world.Scene, rng: np.random.Generator) -> dict:
    """{"context", "choices", "label", "answer"} of one question about `scene`."""
    while True:
        q, answer = text.question_answer(scene, rng)
        domain = answer_domain(q)
        if domain is not None:
            break
    wrong = [a for a in domain if a != answer]
    choices = [answer] + [wrong[k] for k in rng.choice(len(wrong), 3, replace=False)]
    order = rng.permutation(4)
    return {"context": f"Question: {q} Answer:", "choices": [choices[k] for k in order],
            "label": int(np.flatnonzero(order == 0)[0]), "answer": answer}


def shapes_questions(num: int, image_size: int, seed: int = 0, shapes_seed: int = 0):
    """`num` questions, each with "image" (uint8 [image_size, image_size, 3])."""
    out = []
    for i in range(num):
        scene = world.sample_scene(world.scene_rng(shapes_seed, "heldout", i, stream=1))
        item = question(scene, np.random.default_rng([seed, i]))
        out.append({**item, "image": world.render_scene(scene, image_size)})
    return out
