"""Documents -> rows of the batch contract (DESIGN.md), packed greedily in stream order.

Rules:
  * a document goes whole into the current row if it fits (elements and image slots);
  * else a text-only document (with `split_text`, data.pack_split_text) is split: its first
    piece fills the row, the rest starts the next, as the paper's rows of concatenated text are;
  * else, if it would fit an empty row, the row closes (padded) and the document starts the next;
  * else (longer than a row, or more images than slots) it is split: pieces fill the rest of the
    current row and then whole rows; a cut never falls inside BOI..EOI. Each piece is its own
    segment (positions restart, no attention across pieces); the first piece keeps BOS, the last
    keeps EOS.
With an image budget (data.image_budget K, image_budget_rows R; grad_accum A) the rows of a
batch form groups: a block of A*R consecutive rows holds A groups, group i its rows i, i+A, ...
(the rows of one microbatch, trainers/transfusion.py: micro). A row takes at most K minus the
images of its group's earlier rows; a document that would fit an empty row is not split for the
budget: the row closes (`budget_closed_rows`), even empty, and the document waits for a row of
a group with room. So the step encodes K images per group, not R*M (trainers/image_budget.py).
Image slots hold pixels (`images` [M, S, S, 3]) or, for the latents source, precomputed
`latents` of `latent_shape`: raw VAE latents float32 [M, h, w, C], or VQ code ids int32
[M, h, w] (documents.image_slot); the rest of a row does not depend on which.
The packer is a Grain iterator whose state is (parent state before the pending document,
elements of it already emitted): restoring re-reads that document and re-packs identically.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from transfusion_jax.data import counters
from transfusion_jax.data.documents import image_slot

COUNTS_KEY = "_counts"  # per-row counter deltas; the pipeline pops it before yielding batches


def piece_stop(n: int, boi: np.ndarray, offset: int, free: int, free_slots: int, P: int) -> int:
    """End of the longest piece [offset, stop) of a document with n elements and images at
    `boi` that fits `free` elements and `free_slots` images without cutting an image.
    Returns `offset` when no non-empty piece fits."""
    stop = min(n, offset + free)
    pending = boi[boi >= offset]
    if len(pending) > free_slots:
        stop = min(stop, int(pending[free_slots]))  # cut before the first image without a slot
    for b in pending:
        if b < stop < b + P + 2:  # stop falls inside BOI..EOI: cut before the BOI
            return int(b)
    return stop


def assemble_row(pieces, *, L: int, M: int, P: int, image_size: int, pad_id: int, boi_id: int,
                 num_timesteps: int, latent_shape: tuple[int, ...] | None = None
                 ) -> dict[str, np.ndarray]:
    """One row from pieces (doc, start, stop), laid out left to right. Pure. The image slots are
    `images` [M, S, S, 3], or `latents` [M, *latent_shape] when that is given, in the dtype
    image_slot gives (int32 code ids for a 2-dim latent_shape); empty slots are zeros."""
    image_key, image_shape, image_dtype = image_slot(image_size, latent_shape)
    row = {
        "tokens": np.full(L, pad_id, np.int32),
        "segment_ids": np.zeros(L, np.int32),
        "positions": np.zeros(L, np.int32),
        "mask_pos": np.arange(L, dtype=np.int32),
        "patch_index": np.full(L, -1, np.int32),
        "patch_positions": np.zeros((M, P), np.int32),
        image_key: np.zeros((M, *image_shape), image_dtype),
        "image_mask": np.zeros(M, bool),
        "max_timestep": np.full(M, num_timesteps, np.int32),
    }
    at, slot = 0, 0
    for segment, (doc, start, stop) in enumerate(pieces, start=1):
        m = stop - start
        row["tokens"][at:at + m] = doc["tokens"][start:stop]
        row["segment_ids"][at:at + m] = segment
        row["positions"][at:at + m] = np.arange(m)
        for j in np.flatnonzero((doc["boi"] >= start) & (doc["boi"] < stop)):
            first = at + int(doc["boi"][j]) - start + 1  # row index of the first patch
            patches = np.arange(first, first + P)
            row["mask_pos"][patches] = first + P - 1
            row["patch_index"][patches] = slot * P + np.arange(P)
            row["patch_positions"][slot] = patches
            row[image_key][slot] = doc["images"][j]
            row["image_mask"][slot] = True
            row["max_timestep"][slot] = doc["max_timestep"][j]
            slot += 1
        at += m
    row["targets"], row["text_weights"] = next_token_targets(
        row["tokens"], row["segment_ids"], row["patch_index"], pad_id, boi_id)
    return row


def next_token_targets(tokens, segment_ids, patch_index, pad_id: int, boi_id: int):
    """targets[i] = tokens[i+1] where element i+1 is text of the same segment, else PAD;
    weight 1 there unless input i is BOI or a patch (EOI is appended at inference, not learnt)."""
    is_text = (segment_ids > 0) & (patch_index < 0)
    next_is_text = np.zeros_like(is_text)
    next_is_text[:-1] = is_text[1:] & (segment_ids[1:] == segment_ids[:-1])
    targets = np.full_like(tokens, pad_id)
    targets[:-1] = np.where(next_is_text[:-1], tokens[1:], pad_id)
    weights = next_is_text & is_text & (tokens != boi_id)
    return targets, weights.astype(np.float32)


MAX_CONSECUTIVE_SKIPS = 10_000


def _check_not_all_skipped(run: np.ndarray) -> None:
    """Single bad documents are counted and skipped; a source where every document is bad is a
    configuration error, and would otherwise spin forever without producing a row."""
    if run[counters.INDEX["skipped"]] >= MAX_CONSECUTIVE_SKIPS:
        reasons = {k: v for k, v in counters.as_dict(run).items() if k.startswith("skipped_") and v}
        raise ValueError(f"the last {MAX_CONSECUTIVE_SKIPS} documents were all skipped ({reasons}); "
                         "expected usable documents: check data.text_source / data.image_source "
                         "and their paths")


class PackIterDataset(grain.IterDataset):
    """Documents -> rows (dicts of the batch contract plus COUNTS_KEY)."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, max_images: int,
                 patches_per_image: int, image_size: int, pad_id: int, boi_id: int,
                 num_timesteps: int, latent_shape: tuple[int, ...] | None = None,
                 split_text: bool = False, image_budget: tuple[int, int, int] | None = None):
        super().__init__(parent)
        self.layout = _layout(seq_len, max_images, patches_per_image, image_size, pad_id, boi_id,
                              num_timesteps, latent_shape)
        self.split_text, self.image_budget = split_text, image_budget

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self.layout, self.split_text,
                             self.image_budget)

    def __str__(self):
        return f"PackIterDataset({self.layout})"


def _layout(seq_len, max_images, patches_per_image, image_size, pad_id, boi_id, num_timesteps,
            latent_shape) -> dict:
    return dict(L=seq_len, M=max_images, P=patches_per_image, image_size=image_size,
                pad_id=pad_id, boi_id=boi_id, num_timesteps=num_timesteps,
                latent_shape=latent_shape)


def pack_iterator(parent: grain.DatasetIterator, *, seq_len: int, max_images: int,
                  patches_per_image: int, image_size: int, pad_id: int, boi_id: int,
                  num_timesteps: int, latent_shape: tuple[int, ...] | None = None,
                  split_text: bool = False, image_budget: tuple[int, int, int] | None = None
                  ) -> grain.DatasetIterator:
    """PackIterDataset's iterator over an iterator of documents (the scheduled mixer starts a
    new packer over its mixer at a weight change, data/mixing.py)."""
    return _PackIterator(parent, _layout(seq_len, max_images, patches_per_image, image_size,
                                         pad_id, boi_id, num_timesteps, latent_shape), split_text,
                          image_budget)


class _PackIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, layout: dict, split_text: bool = False,
                 image_budget: tuple[int, int, int] | None = None):
        super().__init__(parent)
        self._layout, self._split_text = layout, split_text
        # (R, K, A), or None: every row up to M. The state adds the row's place in its block
        # of A*R rows and each group's images so far.
        self._budget = image_budget
        self._block_row = 0
        self._group_images = np.zeros(image_budget[2] if image_budget else 1, np.int64)
        self._doc = None  # the pending document: read, not yet fully placed
        self._offset = 0  # its elements already placed in earlier rows
        self._state_before_doc: Any = None
        self._resume_offset = 0

    def _read(self) -> bool:
        """Makes the next non-empty document pending; False at the end of the stream. Empty
        (skipped) documents on the way add their counts to self._skipped."""
        run = np.zeros(len(counters.COUNTERS), np.int64)  # skips since the last document
        while True:
            state = self._parent.get_state()
            try:
                doc = next(self._parent)
            except StopIteration:
                return False
            if len(doc["tokens"]) == 0:
                self._skipped += doc["counts"]
                run += doc["counts"]
                _check_not_all_skipped(run)
                continue
            self._doc, self._state_before_doc = doc, state
            self._offset, self._resume_offset = self._resume_offset, 0
            return True

    def _row_slots(self) -> int:
        """The image slots this row may fill: M, or less when its group's budget is short."""
        M = self._layout["M"]
        if self._budget is None:
            return M
        _, K, A = self._budget
        return min(M, K - int(self._group_images[self._block_row % A]))

    def _count_row(self, slots: int) -> None:
        if self._budget is None:
            return
        R, _, A = self._budget
        self._group_images[self._block_row % A] += slots
        self._block_row += 1
        if self._block_row == A * R:  # a new block: every group's budget is whole again
            self._block_row, self._group_images[:] = 0, 0

    def __next__(self) -> dict[str, np.ndarray]:
        L, M, P = self._layout["L"], self._layout["M"], self._layout["P"]
        cap = self._row_slots()
        pieces, used, slots, ended, closed = [], 0, 0, False, False
        self._skipped = np.zeros(len(counters.COUNTERS), np.int64)
        counts = np.zeros(len(counters.COUNTERS), np.int64)
        while True:
            if self._doc is None and not self._read():
                ended = True
                break
            doc, start = self._doc, self._offset
            n, boi = len(doc["tokens"]), doc["boi"]
            rest, rest_images = n - start, int(np.sum(boi >= start))
            over_budget = rest_images > cap - slots  # (and within M: only the budget stops it)
            if rest <= L - used and not over_budget:
                stop = n  # the rest fits
            elif rest <= L and rest_images <= M and (used > 0 or over_budget) and not (
                    self._split_text and len(boi) == 0):
                # Fits an empty row: do not split it, close this row (empty, when the budget
                # is what keeps it out of this one).
                closed = over_budget and rest_images <= M - slots
                break
            else:
                stop = piece_stop(n, boi, start, L - used, cap - slots, P)
                if stop == start:  # nothing more fits this row
                    assert used > 0 or cap < M, "P + 2 <= L and M >= 1 make room in an empty row"
                    closed = cap < M
                    break
            pieces.append((doc, start, stop))
            used += stop - start
            slots += int(np.sum((boi >= start) & (boi < stop)))
            if start == 0:  # a document is counted once, when its first piece is placed
                counts += doc["counts"] + counters.counts(documents_split=int(stop < n))
            if stop < n:
                self._offset = stop
                break  # the rest of this document goes to the next row
            self._doc = None
        counts += self._skipped
        if not pieces and ended:
            raise StopIteration
        row = assemble_row(pieces, **self._layout)
        self._count_row(slots)
        patches = int(np.sum(row["patch_index"] >= 0))
        text = int(np.sum(row["segment_ids"] > 0)) - patches
        row[COUNTS_KEY] = counts + counters.counts(
            rows=1, text_tokens=text, patches=patches, padding=L - text - patches,
            budget_closed_rows=int(closed))
        return row

    def drop_pending(self) -> None:
        """Forgets the document in progress (read, not yet wholly placed): the next row starts
        with a new document. The scheduled mixer's weight change (data/mixing.py)."""
        self._doc, self._offset, self._resume_offset = None, 0, 0

    def get_state(self) -> dict:
        if self._doc is None:
            state = {"parent": self._parent.get_state(), "offset": self._resume_offset}
        else:
            state = {"parent": self._state_before_doc, "offset": self._offset}
        if self._budget is not None:
            state.update(block_row=self._block_row, group_images=self._group_images.tolist())
        return state

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._offset, self._resume_offset = None, 0, state["offset"]
        if self._budget is not None:
            self._block_row = state["block_row"]
            self._group_images = np.array(state["group_images"], np.int64)
