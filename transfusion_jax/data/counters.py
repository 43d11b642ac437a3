"""Pipeline counters. They travel with the data (a small int64 vector per document, then per
row, then per batch) so that counts made in Grain worker processes reach the main process
exactly, in step with the batches consumed, and are restored with the iterator state."""
from __future__ import annotations

import numpy as np

SKIP_REASONS = (
    "corrupt_image",  # an image file or bytes that do not decode
    "missing_image",  # an image path that does not exist
    "bad_image_shape",  # an array that is not uint8 [H, W], [H, W, 1|3|4] with H, W >= 1
    "empty_text",  # a text-only document with no text
    "empty_caption",  # an image whose caption is empty
    "invalid_utf8",  # text bytes that are not UTF-8
    "bad_record",  # a record of no known kind, or a malformed JSON line
    "small_image",  # an image whose shorter side is under data.min_image_size (shards.py)
    "corrupt_shard",  # a shard that cannot be read on: truncated member, bad header (shards.py)
)
MIX_SLOTS = 16  # the most sources a data.mixture may list: one pair of counters each, below
COUNTERS = (
    "documents",  # documents placed in rows
    "text_documents", "pair_documents", "interleaved_documents",
    "images",
    "caption_first", "image_first", "captions_dropped",  # caption-image pairs
    "documents_split",  # longer than a row (or more images than slots): split over rows
    "skipped",
    *(f"skipped_{r}" for r in SKIP_REASONS),
    "text_document_tokens",  # elements of text-only documents (the mixing numerator)
    "image_document_patches",  # patches of image documents (the mixing denominator)
    "rows", "text_tokens", "patches", "padding",  # elements of emitted rows
    "budget_closed_rows",  # rows closed before M images by data.image_budget (packing.py)
    # Per source of a data.mixture (its entry's slot, in order): elements (text-only-document
    # tokens + image-document patches, the unit of its weight) and documents placed in rows.
    *(f"mix_{i}_{what}" for i in range(MIX_SLOTS) for what in ("elements", "documents")),
)
INDEX = {name: i for i, name in enumerate(COUNTERS)}


def counts(**values: int) -> np.ndarray:
    """A counter vector with the given entries set."""
    v = np.zeros(len(COUNTERS), np.int64)
    for name, value in values.items():
        v[INDEX[name]] = value
    return v


def as_dict(vector: np.ndarray) -> dict[str, int]:
    return {name: int(vector[i]) for i, name in enumerate(COUNTERS)}


def with_rates(m: dict, mixture: tuple[str, ...] = ()) -> dict:
    """The counters plus the rates derived from them (text:patch ratio, caption-first rate,
    padding fraction); for one pipeline's counters or for several summed. `mixture`: the
    names of data.mixture's sources, whose slots become mix/<name>/{elements, documents,
    share, document_share} (the realised shares, to set against the weights); the slot
    counters themselves are left out (a run without a mixture logs what it always did)."""
    pairs = m["caption_first"] + m["image_first"]
    elements = m["text_tokens"] + m["patches"] + m["padding"]
    out = {k: v for k, v in m.items() if not k.startswith("mix_")}
    out.update(text_to_patch_ratio=m["text_document_tokens"] / max(m["image_document_patches"], 1),
               caption_first_rate=m["caption_first"] / max(pairs, 1),
               padding_fraction=m["padding"] / max(elements, 1))
    mix_elements = sum(m[f"mix_{i}_elements"] for i in range(len(mixture)))
    mix_documents = sum(m[f"mix_{i}_documents"] for i in range(len(mixture)))
    for i, name in enumerate(mixture):
        e, d = m[f"mix_{i}_elements"], m[f"mix_{i}_documents"]
        out.update({f"mix/{name}/elements": e, f"mix/{name}/documents": d,
                    f"mix/{name}/share": e / max(mix_elements, 1),
                    f"mix/{name}/document_share": d / max(mix_documents, 1)})
    return out
