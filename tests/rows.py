"""Reference rows for the model tests, written element by element from a document structure.

Independent of transfusion_jax.data on purpose: these tests check the model against the batch
contract as DESIGN.md states it, and the brute-force mask below is derived from which element
belongs to which document and image, not from `mask_pos`.
"""
import numpy as np

PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4


def build_rows(rows_docs, length, max_images, patches):
    """rows_docs: per row, a list of documents; a document is a list of parts, each an int
    (that many random text tokens) or "image". Returns (batch dict of numpy arrays, info),
    where info holds per element doc [B,L], image id [B,L] (-1 for text) and kind."""
    b = len(rows_docs)
    batch = {k: np.zeros((b, length), np.int32) for k in
             ("tokens", "segment_ids", "positions", "mask_pos", "targets")}
    batch["patch_index"] = np.full((b, length), -1, np.int32)
    batch["text_weights"] = np.zeros((b, length), np.float32)
    batch["patch_positions"] = np.zeros((b, max_images, patches), np.int32)
    batch["image_mask"] = np.zeros((b, max_images), bool)
    batch["max_timestep"] = np.full((b, max_images), 1000, np.int32)
    doc_of = np.zeros((b, length), np.int32)
    image_of = np.full((b, length), -1, np.int32)
    rng = np.random.default_rng(0)
    for r, docs in enumerate(rows_docs):
        i, slot = 0, 0
        for d, parts in enumerate(docs, start=1):
            elements = [("text", BOS)]
            for part in parts:
                if part == "image":
                    elements += [("text", BOI)] + [("patch", slot, p) for p in range(patches)]
                    elements += [("text", EOI)]
                    slot += 1
                else:
                    elements += [("text", int(t)) for t in rng.integers(5, 500, part)]
            elements.append(("text", EOS))
            for pos, e in enumerate(elements):
                batch["segment_ids"][r, i] = d
                batch["positions"][r, i] = pos
                doc_of[r, i] = d
                if e[0] == "text":
                    batch["tokens"][r, i] = e[1]
                    batch["mask_pos"][r, i] = i
                else:
                    _, s, p = e
                    image_of[r, i] = s
                    batch["patch_index"][r, i] = s * patches + p
                    batch["patch_positions"][r, s, p] = i
                    batch["mask_pos"][r, i] = i + patches - 1 - p
                    batch["image_mask"][r, s] = True
                i += 1
        assert i <= length and slot <= max_images, "documents do not fit the row"
        for j in range(i, length):
            batch["mask_pos"][r, j] = j
        for j in range(length - 1):
            next_is_text = doc_of[r, j + 1] == doc_of[r, j] != 0 and image_of[r, j + 1] < 0
            if next_is_text:
                batch["targets"][r, j] = batch["tokens"][r, j + 1]
            if next_is_text and image_of[r, j] < 0 and batch["tokens"][r, j] != BOI:
                batch["text_weights"][r, j] = 1.0
    return batch, {"doc": doc_of, "image": image_of}


def brute_force_mask(info):
    """bool [B, L, L] from the document structure alone: same document, and the key comes no
    later than the query or both are patches of the same image."""
    doc, image = info["doc"], info["image"]
    b, length = doc.shape
    mask = np.zeros((b, length, length), bool)
    for r in range(b):
        for q in range(length):
            for k in range(length):
                same_doc = doc[r, q] == doc[r, k] != 0
                same_image = image[r, q] == image[r, k] >= 0
                mask[r, q, k] = same_doc and (k <= q or same_image)
    return mask


def random_docs(rng, length, max_images, patches):
    """A random list of documents that fits one row: mixed text and images, 1-4 documents."""
    docs, used, images = [], 0, 0
    for _ in range(rng.integers(1, 5)):
        parts = []
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5 and images < max_images:
                parts.append("image")
                images += 1
            else:
                parts.append(int(rng.integers(1, 6)))
        size = 2 + sum(patches + 2 if p == "image" else p for p in parts)
        if used + size > length:
            images -= parts.count("image")
            break
        docs.append(parts)
        used += size
    return docs or [[1]]
