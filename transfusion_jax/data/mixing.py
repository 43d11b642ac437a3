"""Mixing the text-only and image document streams to a target ratio of text tokens to patches.

The ratio is the paper's (section 4.1: two data sets "at a 1:1 token ratio"): elements of
text-only documents : patches of image documents. Captions and markers inside image documents
count on neither side. The mixer is deterministic and greedy: it takes the next document from
the text stream while text is behind the target (text_tokens < ratio * patches), else from the
image stream, so the running ratio stays within one document of the target at every step.

data.mixture (data/mixture.py, issue 15) generalises it to any number of sources in the same
unit: WeightedMixIterDataset (greedy deficit over weights), and ScheduledMixPackIterDataset,
which packs that mix into rows with weights that change at named training steps.
"""
from __future__ import annotations

import grain

from transfusion_jax.data import counters
from transfusion_jax.data.packing import pack_iterator

_TEXT = counters.INDEX["text_document_tokens"]
_PATCHES = counters.INDEX["image_document_patches"]
_DOCUMENTS = counters.INDEX["documents"]


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


# ---------------------------------------------------------------------------------------------
# data.mixture: any number of weighted sources (data/mixture.py; issue 15).

def _elements(doc) -> int:
    """A document's elements in the weights' unit: text tokens of a text-only document, patches
    of an image document (the two-stream ratio's numerator and denominator)."""
    return int(doc["counts"][_TEXT]) + int(doc["counts"][_PATCHES])


def _tag(doc: dict, slot: int) -> dict:
    """The document with its source's counters added (counted where it is placed in a row)."""
    tag = counters.counts(**{f"mix_{slot}_elements": _elements(doc),
                             f"mix_{slot}_documents": int(doc["counts"][_DOCUMENTS])})
    return dict(doc, counts=doc["counts"] + tag)


class WeightedMixIterDataset(grain.IterDataset):
    """Documents from named streams, each at its weight's share of elements (text tokens of
    text-only documents, patches of image documents: the paper's "1:1 token ratio", section
    4.1, for any number of sources).

    Greedy deficit: the next document comes from the live source with weight > 0 furthest
    below its share, least elements / weight (ties: the later source, so that [text weight r,
    image weight 1] is RatioMixIterDataset(ratio=r) exactly). Deterministic; the per-source
    element counts are part of the iterator state, so a restored state continues exactly, and
    the realised shares stay within about one document of the weights at every point. A source that
    ends (finite epochs) leaves the others to share its part; the mix ends with the last
    source of weight > 0. Each document's counts gain its source's mix_<slot>_* counters."""

    def __init__(self, streams: dict[str, grain.IterDataset], weights):
        super().__init__(list(streams.values()))
        self._names, self._weights = tuple(streams), tuple(float(w) for w in weights)

    def __iter__(self):
        return _WeightedMixIterator([p.__iter__() for p in self._parents], self._names,
                                    self._weights)

    def __str__(self):
        return f"WeightedMixIterDataset(streams={self._names}, weights={self._weights})"


class _WeightedMixIterator(grain.DatasetIterator):

    def __init__(self, parents, names, weights):
        super().__init__(parents)
        self._names = tuple(names)
        self._streams = dict(zip(names, parents))
        self._done = {name: False for name in names}
        self.set_weights(weights)

    def set_weights(self, weights) -> None:
        """New weights, counted from here: the shares follow them from the next document on
        (counts under earlier weights do not carry over)."""
        self._weights = tuple(float(w) for w in weights)
        self._elements = [0] * len(self._names)

    def _choice(self) -> int | None:
        best = None
        for i, name in enumerate(self._names):
            w = self._weights[i]
            if w <= 0 or self._done[name]:
                continue
            # i is at least as far below its share as best: e_i / w_i <= e_best / w_best.
            if best is None or self._elements[i] * self._weights[best] <= self._elements[best] * w:
                best = i
        return best

    def __next__(self):
        while (i := self._choice()) is not None:
            name = self._names[i]
            try:
                doc = next(self._streams[name])
            except StopIteration:
                self._done[name] = True
                continue
            self._elements[i] += _elements(doc)
            return _tag(doc, i)
        raise StopIteration

    def get_state(self) -> dict:
        return {"streams": {n: it.get_state() for n, it in self._streams.items()},
                "done": dict(self._done), "elements": list(self._elements)}

    def set_state(self, state: dict) -> None:
        for name, it in self._streams.items():
            it.set_state(state["streams"][name])
        self._done = dict(state["done"])
        self._elements = list(state["elements"])


class ScheduledMixPackIterDataset(grain.IterDataset):
    """Rows packed (packing.py) from a WeightedMix of `streams` whose weights change with the
    training step: `phases` [(first step, weights), ...] (data/mixture.py: phases).

    The pipeline knows documents, the schedule knows steps; rows join them: step t (from 1) is
    the pipeline's batch t - 1, rows [(t-1) B, t B) of B = `rows_per_batch`. With Grain worker
    processes (data.worker_count = N, each packing its own slice) worker i's local batch j is
    batch j N + i, as mp_prefetch interleaves them. So every row knows its step, and the first
    row of a phase's first step starts the new weights exactly: the row in progress is closed
    (a document read for the previous step and not yet placed in a row is dropped, the rest of
    a split text document too: packing's drop_pending) and the element counts restart, so the
    new step's rows hold only documents drawn at the new weights. The state is (rows emitted,
    phase, the packer's state, which holds the mixer's and the streams'): exact resume on
    either side of a switch."""

    def __init__(self, streams: dict[str, grain.IterDataset], phases, *, rows_per_batch: int,
                 **pack_args):
        super().__init__(list(streams.values()))
        self._names = tuple(streams)
        self._phases = [(int(step), tuple(w)) for step, w in phases]
        self._rows_per_batch = int(rows_per_batch)
        self._pack_args = pack_args

    def __iter__(self):
        return _ScheduledMixPackIterator([p.__iter__() for p in self._parents], self._names,
                                         self._phases, self._rows_per_batch, self._pack_args)

    def __str__(self):
        return f"ScheduledMixPackIterDataset(streams={self._names}, phases={self._phases})"


class _ScheduledMixPackIterator(grain.DatasetIterator):

    def __init__(self, parents, names, phases, rows_per_batch, pack_args):
        super().__init__(parents)
        self._phases, self._rows_per_batch = phases, rows_per_batch
        self._mixer = _WeightedMixIterator(parents, names, phases[0][1])
        self._packer = pack_iterator(self._mixer, **pack_args)
        self._row, self._phase = 0, 0

    def _step(self) -> int:
        """The training step (from 1) of the next row."""
        mp = self._ctx.mp_context  # set by mp_prefetch in a worker process; (0, 1) otherwise
        batch = self._row // self._rows_per_batch
        return batch * mp.process_count + mp.process_index + 1

    def _phase_at(self, step: int) -> int:
        return max(k for k, (first, _) in enumerate(self._phases) if first <= step)

    def __next__(self):
        phase = self._phase_at(self._step())
        if phase != self._phase:
            self._mixer.set_weights(self._phases[phase][1])
            self._packer.drop_pending()  # the new step's rows start with new documents
            self._phase = phase
        row = next(self._packer)
        self._row += 1
        return row

    def get_state(self) -> dict:
        return {"row": self._row, "phase": self._phase, "packer": self._packer.get_state()}

    def set_state(self, state: dict) -> None:
        # A resume whose total_steps moved the switches: the next row picks its phase anew.
        self._row, self._phase = state["row"], min(state["phase"], len(self._phases) - 1)
        self._mixer.set_weights(self._phases[self._phase][1])
        self._packer.set_state(state["packer"])  # the mixer's counts and the streams' states
