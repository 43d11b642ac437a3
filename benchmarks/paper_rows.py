"""Rows in the paper's mix for the benchmarks: packed documents, text tokens to image patches
about 1:1 (section 4.1 trains on equal shares of text and image-caption data), 256-patch
images (256x256 images, 8x VAE, 2x2 patches), caption-first or image-first documents (section
4.1: image-caption pairs in both orders) and text documents, the last one cut at the row's end.

    seg, pos = segments(rng, length)                       # the mask vectors only
    batch = batch_contract(rows, length, patches, ...)     # every key of the batch contract
"""
import numpy as np

BOS, EOS, BOI, EOI = 1, 2, 3, 4


def documents(rng, length: int, patches: int = 256):
    """One row as a list of documents; a document is a list of parts: ("text", n) or
    ("image",). An image document when text is ahead (and the image fits), else text."""
    docs, used, text, image = [], 0, 0, 0
    while used < length:
        left = length - used
        if text >= image and left >= patches + 8:  # the image always fits whole
            caption = int(min(rng.integers(8, 64), left - patches - 4))
            parts = [("text", caption), ("image",)]
            docs.append(parts if rng.random() < 0.5 else parts[::-1])
            size = caption + patches + 4  # BOS, BOI, EOI, EOS
            image, text = image + patches, text + size - patches
        else:  # cut at the row's end, as the paper's packing splits text documents
            size = min(int(rng.integers(64, 1024)), left)
            docs.append([("text", max(size - 2, 0))])
            text += size
        used += size
    return docs


def elements(docs, length: int, patches: int):
    """[(token kind, document, image slot, patch)] of one row, cut at `length`."""
    out, slot = [], 0
    for d, parts in enumerate(docs, start=1):
        out.append(("BOS", d, -1, 0))
        for part in parts:
            if part[0] == "text":
                out += [("text", d, -1, 0)] * part[1]
            else:
                out += [("BOI", d, -1, 0)] + [("patch", d, slot, j) for j in range(patches)]
                out.append(("EOI", d, -1, 0))
                slot += 1
        out.append(("EOS", d, -1, 0))
    return out[:length]


def segments(rng, length: int, patches: int = 256):
    """(segment_ids, mask_pos) int32 [L] of one row."""
    elems = elements(documents(rng, length, patches), length, patches)
    seg = np.array([e[1] for e in elems], np.int32)
    pos = np.arange(length, dtype=np.int32)
    for i, (kind, _, slot, j) in enumerate(elems):
        if kind == "patch":
            pos[i] = i + patches - 1 - j
    return seg, pos


def batch_contract(batch: int, length: int, patches: int, vocab: int, latent_shape, seed=0):
    """A full batch (DESIGN.md, "The batch contract") of `batch` rows in the paper's mix, with
    random text tokens and random latents; max images per row = the most any row holds."""
    rng = np.random.default_rng(seed)
    rows = [elements(documents(rng, length, patches), length, patches) for _ in range(batch)]
    slots = max(1, max(sum(e[0] == "patch" and e[3] == 0 for e in r) for r in rows))
    out = {k: np.zeros((batch, length), np.int32) for k in
           ("tokens", "segment_ids", "positions", "mask_pos", "targets")}
    out["patch_index"] = np.full((batch, length), -1, np.int32)
    out["text_weights"] = np.zeros((batch, length), np.float32)
    out["patch_positions"] = np.zeros((batch, slots, patches), np.int32)
    out["image_mask"] = np.zeros((batch, slots), bool)
    out["max_timestep"] = np.full((batch, slots), 1000, np.int32)
    ids = {"BOS": BOS, "EOS": EOS, "BOI": BOI, "EOI": EOI}
    for r, elems in enumerate(rows):
        start = 0
        for i, (kind, doc, slot, j) in enumerate(elems):
            if i and elems[i - 1][1] != doc:
                start = i
            out["segment_ids"][r, i], out["positions"][r, i] = doc, i - start
            out["mask_pos"][r, i] = i
            if kind == "patch":
                out["mask_pos"][r, i] = i + patches - 1 - j
                out["patch_index"][r, i] = slot * patches + j
                out["patch_positions"][r, slot, j] = i
                out["image_mask"][r, slot] = True
            else:
                out["tokens"][r, i] = ids.get(kind) or int(rng.integers(5, vocab))
        for i in range(len(elems) - 1):  # next-token targets inside a document, text to text
            same_doc = elems[i + 1][1] == elems[i][1]
            if same_doc and elems[i + 1][0] != "patch" and elems[i][0] not in ("patch", "BOI"):
                out["targets"][r, i] = out["tokens"][r, i + 1]
                out["text_weights"][r, i] = 1.0
    size, _, channels = latent_shape
    out["images"] = rng.standard_normal((batch, slots, size, size, channels)).astype(np.float32)
    return out
