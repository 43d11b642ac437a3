"""The batch contract (DESIGN.md), checked element by element from the document structure, and
property tests of the packer on random documents. `check_batch` is imported by the other
test_data_* files."""
import grain
import numpy as np
import pytest

from transfusion_jax.data import counters
from transfusion_jax.data.packing import COUNTS_KEY, PackIterDataset, piece_stop

PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4
T = 1000

KEYS = {
    "tokens": (np.int32, "BL"), "segment_ids": (np.int32, "BL"), "positions": (np.int32, "BL"),
    "mask_pos": (np.int32, "BL"), "patch_index": (np.int32, "BL"),
    "patch_positions": (np.int32, "BMP"), "images": (np.float32, "BMHWC"),
    "image_mask": (np.bool_, "BM"), "max_timestep": (np.int32, "BM"),
    "targets": (np.int32, "BL"), "text_weights": (np.float32, "BL"),
}


def check_batch(batch, *, B, L, M, P, S, ids=(PAD, BOS, EOS, BOI, EOI), whole_documents=True):
    """Asserts every rule of the contract. whole_documents: every segment is a whole document
    (starts with BOS, ends with EOS) but a text-only piece that ends the row or continues one
    (data.pack_split_text fills rows with split text); else split pieces may lack them."""
    dims = dict(B=B, L=L, M=M, P=P, H=S, W=S, C=3)
    assert set(batch) == set(KEYS), sorted(batch)
    for key, (dtype, shape) in KEYS.items():
        assert batch[key].dtype == dtype, (key, batch[key].dtype)
        assert batch[key].shape == tuple(dims[d] for d in shape), (key, batch[key].shape)
    assert np.all(np.abs(batch["images"]) <= 1.0)
    for b in range(B):
        _check_row({k: v[b] for k, v in batch.items()}, L, M, P, ids, whole_documents)


def _check_row(r, L, M, P, ids, whole_documents):
    pad, bos, eos, boi, eoi = ids
    tok, seg, pos, mpos, pidx = (r[k].tolist() for k in
                                 ("tokens", "segment_ids", "positions", "mask_pos", "patch_index"))
    is_patch = [False] * L
    slot, i, expected_seg, last_seg = 0, 0, 1, max(seg)
    while i < L and seg[i] != 0:
        assert seg[i] == expected_seg, (i, seg[i], expected_seg)
        start = i
        while i < L and seg[i] == expected_seg:
            assert pos[i] == i - start
            if tok[i] == boi:  # BOI, P patches, EOI, all in this segment
                assert seg[i + P + 1] == expected_seg and tok[i + P + 1] == eoi
                for p in range(P):
                    q = i + 1 + p
                    is_patch[q] = True
                    assert tok[q] == pad and pos[q] == q - start
                    assert pidx[q] == slot * P + p and mpos[q] == i + P
                    assert r["patch_positions"][slot, p] == q  # inverse pair
                assert r["image_mask"][slot] and r["max_timestep"][slot] in (T, T // 2)
                for q in (i, i + P + 1):  # BOI and EOI are text
                    assert pidx[q] == -1 and mpos[q] == q
                slot, i = slot + 1, i + P + 2
                continue
            assert tok[i] not in (pad, eoi), (i, tok[i])  # text: a real token
            assert pidx[i] == -1 and mpos[i] == i
            assert tok[i] != bos or i == start
            assert tok[i] != eos or seg[i + 1:i + 2] != [expected_seg]
            i += 1
        text_piece = not any(is_patch[start:i])
        if whole_documents and not (text_piece and expected_seg == 1):
            assert tok[start] == bos, (start, i)
        if whole_documents and not (text_piece and expected_seg == last_seg):
            assert tok[i - 1] == eos, (start, i)
        expected_seg += 1
    for q in range(i, L):  # padding: only at the end of the row
        assert seg[q] == 0 and tok[q] == pad and pidx[q] == -1 and mpos[q] == q
    assert not r["image_mask"][slot:].any()
    assert np.all(r["patch_positions"][slot:] == 0) and np.all(r["images"][slot:] == 0)
    assert np.all(r["max_timestep"][slot:] == T)
    for q in range(L):  # next-token targets, written from the rule
        next_text = q + 1 < L and seg[q + 1] == seg[q] != 0 and not is_patch[q + 1]
        assert r["targets"][q] == (tok[q + 1] if next_text else pad), q
        weight = next_text and not is_patch[q] and tok[q] != boi
        assert r["text_weights"][q] == float(weight), q


# ---------------------------------------------------------------------------------------------
# Packer property tests on random documents.

def random_document(rng, P, S, max_text, max_images, doc_id):
    """A document of random text runs and images; token values encode (doc_id, position) so
    that pieces can be traced back. Images are constant, value identifying (doc, image)."""
    tokens, boi, images = [BOS], [], []
    for _ in range(int(rng.integers(0, max_images + 1))):
        tokens += list(rng.integers(10, 1000, size=int(rng.integers(0, max_text))))
        boi.append(len(tokens))
        tokens += [BOI] + [PAD] * P + [EOI]
        images.append(np.full((S, S, 3), (doc_id % 97) / 97 + len(images) / 1000, np.float32))
    tokens += list(rng.integers(10, 1000, size=int(rng.integers(0, max_text)))) + [EOS]
    k = len(boi)
    return {"tokens": np.asarray(tokens, np.int32), "boi": np.asarray(boi, np.int32),
            "images": np.asarray(images, np.float32).reshape(k, S, S, 3),
            "max_timestep": np.asarray(rng.choice([T, T // 2], size=k), np.int32).reshape(k),
            "counts": counters.counts(documents=1, images=k), "id": doc_id}


def pack(docs, L, M, P, S, batch):
    ds = grain.MapDataset.source(docs).to_iter_dataset()
    rows = PackIterDataset(ds, seq_len=L, max_images=M, patches_per_image=P, image_size=S,
                           pad_id=PAD, boi_id=BOI, num_timesteps=T)
    return rows.batch(batch, drop_remainder=False)


def unpack(batches, P):
    """Segments as (tokens, images, max_timestep), in order, from rows."""
    segments = []
    for batch in batches:
        for b in range(batch["tokens"].shape[0]):
            seg = batch["segment_ids"][b]
            for s in range(1, seg.max() + 1):
                where = np.flatnonzero(seg == s)
                slots = sorted({int(batch["patch_index"][b, q]) // P for q in where
                                if batch["patch_index"][b, q] >= 0})
                segments.append((batch["tokens"][b, where], batch["images"][b, slots],
                                 batch["max_timestep"][b, slots]))
    return segments


@pytest.mark.parametrize("L,M,P,max_text,max_images", [
    (64, 3, 8, 20, 3),    # short rows: many splits
    (40, 1, 16, 30, 2),   # one slot per row, images close to the row size
    (128, 8, 4, 200, 1),  # text much longer than a row
    (10, 2, 8, 3, 2),     # P + 2 == L: an image fills a row exactly
])
def test_packing_property(L, M, P, max_text, max_images):
    rng = np.random.default_rng(L * 1000 + M)
    S = 2
    docs = [random_document(rng, P, S, max_text, max_images, i) for i in range(60)]
    batches = [{k: v for k, v in b.items() if k != COUNTS_KEY} for b in pack(docs, L, M, P, S, 4)]
    for batch in batches:
        check_batch(batch, B=batch["tokens"].shape[0], L=L, M=M, P=P, S=S, whole_documents=False)
    # Pieces re-joined in order give back every document, exactly once, images included.
    segments = unpack(batches, P)
    joined_tokens = np.concatenate([s[0] for s in segments])
    assert np.array_equal(joined_tokens, np.concatenate([d["tokens"] for d in docs]))
    joined_images = np.concatenate([s[1] for s in segments])
    assert np.array_equal(joined_images, np.concatenate([d["images"] for d in docs]))
    joined_t = np.concatenate([s[2] for s in segments])
    assert np.array_equal(joined_t, np.concatenate([d["max_timestep"] for d in docs]))
    # A document is split only if it could not fit an empty row.
    lengths = [len(s[0]) for s in segments]
    whole = [d for d in docs if len(d["tokens"]) <= L and len(d["boi"]) <= M]
    assert sum(1 for s in segments if s[0][0] == BOS and s[0][-1] == EOS) >= len(whole)
    assert max(lengths) <= L


def test_packing_counts_documents_once_and_splits():
    rng = np.random.default_rng(0)
    docs = [random_document(rng, 4, 2, 50, 2, i) for i in range(30)]
    total = sum(b[COUNTS_KEY].sum(axis=0) for b in pack(docs, 32, 2, 4, 2, 1))
    c = counters.as_dict(total)
    assert c["documents"] == 30 and c["images"] == sum(len(d["boi"]) for d in docs)
    splits = sum(1 for d in docs if len(d["tokens"]) > 32 or len(d["boi"]) > 2)
    assert c["documents_split"] == splits > 0
    assert c["text_tokens"] + c["patches"] + c["padding"] == 32 * c["rows"]


def test_piece_stop_never_cuts_an_image():
    boi = np.array([5, 20])  # images occupy [5, 5+P+2) = [5, 11) and [20, 26) with P = 4
    assert piece_stop(30, boi, 0, 8, 2, 4) == 5  # a cut at 8 would fall inside the first image
    assert piece_stop(30, boi, 0, 11, 2, 4) == 11  # right after the first EOI
    assert piece_stop(30, boi, 0, 25, 1, 4) == 20  # one slot: cut before the second BOI
    assert piece_stop(30, boi, 5, 3, 2, 4) == 5  # nothing fits
    assert piece_stop(30, boi, 26, 100, 0, 4) == 30  # text tail needs no slot


@pytest.mark.parametrize("k", [1, 3, 7])
def test_packer_state_restores_mid_document(k):
    """Save after k batches (possibly inside a split document), restore in a new iterator."""
    rng = np.random.default_rng(k)
    docs = [random_document(rng, 4, 2, 60, 3, i) for i in range(40)]
    reference = list(pack(docs, 24, 2, 4, 2, 2))
    it = iter(pack(docs, 24, 2, 4, 2, 2))
    for _ in range(k):
        next(it)
    state = it.get_state()
    restored = iter(pack(docs, 24, 2, 4, 2, 2))
    restored.set_state(state)
    rest = list(restored)
    assert len(rest) == len(reference) - k
    for got, want in zip(rest, reference[k:]):
        for key in want:
            assert np.array_equal(got[key], want[key]), key


@pytest.mark.parametrize("key,index,value", [
    ("text_weights", "boi", 1.0),  # loss at a BOI input
    ("text_weights", "last_patch", 1.0),  # EOI predicted from the last patch
    ("mask_pos", "first_patch", None),  # a patch that cannot see its whole image
    ("patch_index", "first_patch", -1),
    ("targets", "eos", BOS),  # a target across documents
    ("positions", "second_document", 0),
    ("segment_ids", "padding", 1),
])
def test_checker_rejects_broken_rows(key, index, value):
    """The checker is only worth its passes if it fails on rows that break the contract."""
    rng = np.random.default_rng(5)
    docs = [random_document(rng, 4, 2, 5, 1, i) for i in range(5)]  # 34 elements, 6 padding
    batch = {k: v for k, v in next(iter(pack(docs, 40, 2, 4, 2, 1))).items() if k != COUNTS_KEY}
    check_batch(batch, B=1, L=40, M=2, P=4, S=2)
    row = batch["tokens"][0]
    assert (row == BOI).any() and (batch["segment_ids"][0] == 0).any()
    boi = int(np.flatnonzero(row == BOI)[0])
    where = {"boi": boi, "first_patch": boi + 1, "last_patch": boi + 4,
             "eos": int(np.flatnonzero(row == EOS)[0]),
             "second_document": int(np.flatnonzero(batch["segment_ids"][0] == 2)[1]),
             "padding": int(np.flatnonzero(batch["segment_ids"][0] == 0)[0])}[index]
    batch[key][0, where] = value if value is not None else where
    with pytest.raises(AssertionError):
        check_batch(batch, B=1, L=40, M=2, P=4, S=2)
