"""Mixing the text-only and image document streams to a target ratio of text tokens to patches.

The ratio is the paper's (section 4.1: two data sets "at a 1:1 token ratio"): elements of
text-only documents : patches of image documents. Captions and markers inside image documents
count on neither side. The mixer is deterministic and greedy: it takes the next document from
the text stream while text is behind the target (text_tokens < ratio * patches), else from the
image stream, so the running ratio stays within one document of the target at every step.
"""
from __future__ import annotations

import grain

from transfusion_jax.data import counters

_TEXT = counters.INDEX["text_document_tokens"]
_PATCHES = counters.INDEX["image_document_patches"]


class RatioMixIterDataset(grain.IterDataset):
    """Documents from `text` and `image` (either may be None) at `ratio` text tokens : patches.
    When one stream ends (finite epochs) the other is drained; then the mix ends."""

    def __init__(self, text: grain.IterDataset | None, image: grain.IterDataset | None,
                 ratio: float):
        self._names = tuple(n for n, d in (("text", text), ("image", image)) if d is not None)
        super().__init__([d for d in (text, image) if d is not None])
        self._ratio = float(ratio)

    def __iter__(self):
        return _RatioMixIterator([p.__iter__() for p in self._parents], self._names, self._ratio)

    def __str__(self):
        return f"RatioMixIterDataset(streams={self._names}, ratio={self._ratio})"


class _RatioMixIterator(grain.DatasetIterator):

    def __init__(self, parents, names, ratio: float):
        super().__init__(parents)
        self._streams = dict(zip(names, parents))
        self._ratio = ratio
        self._text_tokens = 0
        self._patches = 0
        self._done = {name: False for name in names}

    def _choice(self) -> str | None:
        live = [n for n in self._streams if not self._done[n]]
        if len(live) < 2:
            return live[0] if live else None
        return "text" if self._text_tokens < self._ratio * self._patches else "image"

    def __next__(self):
        while (name := self._choice()) is not None:
            try:
                doc = next(self._streams[name])
            except StopIteration:
                self._done[name] = True
                continue
            self._text_tokens += int(doc["counts"][_TEXT])
            self._patches += int(doc["counts"][_PATCHES])
            return doc
        raise StopIteration

    def get_state(self) -> dict:
        return {"streams": {n: it.get_state() for n, it in self._streams.items()},
                "done": dict(self._done),
                "text_tokens": self._text_tokens, "patches": self._patches}

    def set_state(self, state: dict) -> None:
        for name, it in self._streams.items():
            it.set_state(state["streams"][name])
        self._done = dict(state["done"])
        self._text_tokens, self._patches = state["text_tokens"], state["patches"]
