"""Words about shapes scenes: captions, questions and answers, the three document kinds, and a
caption parser that reads a (generated) caption back into its object list.

Every object phrase names size, colour and shape, and sits in one clause with one position
phrase ("a small red circle in the top left"), whatever the template around it; relation
sentences ("the circle is to the left of the square") carry no position phrase. That grammar is
what `parse_caption` relies on.
"""
from __future__ import annotations

import re

import numpy as np

from transfusion_jax.data.shapes.world import COLOUR_NAMES, COLOURS, POSITIONS, SHAPES, Scene, ShapeObject, render_scene, sample_scene, scene_rng

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POSITION_WORDS = {
    "top left": ("top left", "upper left"), "top": ("top", "top middle"),
    "top right": ("top right", "upper right"), "left": ("left", "middle left"),
    "center": ("center", "middle"), "right": ("right", "middle right"),
    "bottom left": ("bottom left", "lower left"), "bottom": ("bottom", "bottom middle"),
    "bottom right": ("bottom right", "lower right"),
}
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
_INTROS = ("", "A picture of ", "An image showing ", "This scene has ", "Here we see ",
           "A drawing with ")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def object_phrase(obj: ShapeObject, rng: np.random.Generator) -> str:
    """'a small red circle in the top left', or 'in the top left is a small red circle'."""
    size = _pick(rng, _SIZE_WORDS[obj.size])
    where = f"{_pick(rng, ('in', 'at'))} the {_pick(rng, _POSITION_WORDS[obj.position])}"
    thing = f"a {size} {obj.colour} {obj.shape}"
    return f"{where} is {thing}" if rng.random() < 0.25 else f"{thing} {where}"


def _relation(a: ShapeObject, b: ShapeObject) -> str | None:
    (ra, ca), (rb, cb) = divmod(POSITIONS.index(a.position), 3), divmod(POSITIONS.index(b.position), 3)
    if ca != cb:
        return "to the left of" if ca < cb else "to the right of"
    return "above" if ra < rb else "below"


def relation_sentence(scene: Scene, rng: np.random.Generator) -> str:
    """'The small red circle is above the large blue square.' for a random pair of objects that
    the words tell apart; '' when there is no such pair."""
    names = [o[:3] for o in scene.objects]
    unique = [o for o in scene.objects if names.count(o[:3]) == 1]
    pairs = [(a, b) for a in unique for b in unique if a != b]
    if not pairs:
        return ""
    a, b = pairs[int(rng.integers(len(pairs)))]
    return (f"The {a.size} {a.colour} {a.shape} is {_relation(a, b)} "
            f"the {b.size} {b.colour} {b.shape}.")


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming colour, shape, size and position of every object, maybe a relation."""
    phrases = [object_phrase(o, rng) for o in scene.objects]
    order = rng.permutation(len(phrases))
    phrases = [phrases[k] for k in order]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    text = _pick(rng, _INTROS) + body
    text = text[0].upper() + text[1:] + "."
    if rng.random() < 0.5:
        text += " " + relation_sentence(scene, rng)
    return text.strip()


def question_answer(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One question about the scene and its answer; every referent is unambiguous."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    kind = int(rng.integers(6))
    if kind == 0:
        return "How many shapes are there?", _NUMBERS[len(scene.objects)]
    if kind == 1:
        return f"What colour is the shape in the {obj.position}?", obj.colour
    if kind == 2:
        return f"What shape is in the {obj.position}?", f"a {obj.shape}"
    if kind == 3:
        return f"What size is the shape in the {obj.position}?", obj.size
    if kind == 4:
        colour, shape = _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)
        present = any(o.colour == colour and o.shape == shape for o in scene.objects)
        return f"Is there a {colour} {shape}?", "yes" if present else "no"
    where = _pick(rng, POSITIONS)
    held = [o for o in scene.objects if o.position == where]
    answer = f"a {held[0].size} {held[0].colour} {held[0].shape}" if held else "nothing"
    return f"What is in the {where}?", answer


def _qa_text(scene: Scene, rng: np.random.Generator) -> str:
    q, a = question_answer(scene, rng)
    return f"Question: {q} Answer: {a}."


# ---------------------------------------------------------------------------------------------
# The three document kinds. Records follow the source record format of documents.py.

def pair_record(seed: int, split: str, index: int, image_size: int) -> dict:
    rng = scene_rng(seed, split, index, stream=1)
    scene = sample_scene(rng)
    return {"image": render_scene(scene, image_size), "caption": caption(scene, rng)}


# Interleaved documents open with text, as real ones do (a web page's title): then "BOS BOI
# image EOI" begins only caption pairs, and a model asked for a caption there does not answer a
# question it made up (issue 19: the demo's captions were questions).
_QUIZ_INTROS = ("Questions about pictures.", "A quiz about shapes.", "Look and answer.",
                "Some pictures and questions about them.")


def interleaved_record(seed: int, split: str, index: int, image_size: int) -> dict:
    """A title, then several (image, question, answer) groups in one document."""
    rng = scene_rng(seed, split, index, stream=2)
    parts = [{"text": _pick(rng, _QUIZ_INTROS)}]
    for _ in range(int(rng.integers(2, 4))):
        scene = sample_scene(rng)
        parts.append({"image": render_scene(scene, image_size)})
        parts.append({"text": " ".join(_qa_text(scene, rng) for _ in range(int(rng.integers(1, 3))))})
    return {"parts": parts}


def text_record(seed: int, split: str, index: int) -> dict:
    """A text-only document: scenes described in words, with questions about them."""
    rng = scene_rng(seed, split, index, stream=3)
    paragraphs = []
    for _ in range(int(rng.integers(1, 4))):
        scene = sample_scene(rng)
        paragraphs.append(f"{caption(scene, rng)} {_qa_text(scene, rng)}")
    return {"text": "\n".join(paragraphs)}


def text_corpus(seed: int, split: str, count: int) -> list[str]:
    """Shapes text of every kind, for training the default tokenizer."""
    out = []
    for i in range(count):
        rng = scene_rng(seed, split, i, stream=4)
        scene = sample_scene(rng)
        out.append(f"{caption(scene, rng)} {_qa_text(scene, rng)} {_qa_text(scene, rng)}")
    return out


# ---------------------------------------------------------------------------------------------
# Caption parser: text -> objects.

def _alternation(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_SIZE_OF = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}
_POSITION_OF = {w: p for p, ws in _POSITION_WORDS.items() for w in ws}
_THING = re.compile(
    rf"\b(?:a|an|one)\s+({_alternation(_SIZE_OF)})\s+({_alternation(COLOURS)})\s+({_alternation(SHAPES)})\b"
)
_WHERE = re.compile(rf"\b(?:in|at|on)\s+the\s+({_alternation(_POSITION_OF)})\b")


def parse_caption(text: str) -> list[ShapeObject]:
    """Objects named in a caption, one per clause holding both an object and a position phrase."""
    objects = []
    for clause in re.split(r"[.,;]|\band\b", text.lower()):
        thing, where = _THING.search(clause), _WHERE.search(clause)
        if thing and where:
            size, colour, shape = thing.groups()
            objects.append(ShapeObject(colour, shape, _SIZE_OF[size], _POSITION_OF[where.group(1)]))
    return sorted(objects, key=lambda o: POSITIONS.index(o.position))
