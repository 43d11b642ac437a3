"""The Transfusion mask as one contiguous key range per query (and query range per key).

The mask (DESIGN.md, "The Transfusion mask"; paper section 3, Figure 4) allows query q to see
key k when both are in the same packed document and mask_pos[k] <= mask_pos[q]. Along a
document mask_pos never decreases (text: the element's index; a patch: its image's last index),
so the keys one query may see are one contiguous range:

    keys of q    = [doc_start(q), mask_pos[q] + 1)          (empty for padding, segment 0)
    queries of k = [run_start(k), doc_end(k))                (run: elements of equal mask_pos,
                                                              i.e. the key's image, or itself)

Fused kernels take these vectors instead of a [L, L] mask: they skip every block that lies
outside all of its rows' ranges, and mask inside a block with two compares. They are computed
once per batch in O(L) (`self_ranges`); a decoding chunk against a cache uses `cache_ranges`,
which reads the ranges off the mask itself (O(Lq * Lk) compares, no matmul).

The ranges equal the mask only when every document is one contiguous run of a row, as the
packer writes them (tests/test_attention_ranges.py checks it against the mask on packed rows).
"""
import jax
import jax.numpy as jnp


def _run_starts(change):
    """int32 [B, L]: for each element, the index where its run began (change[:, i]: a new run
    begins at i; column 0 always begins one)."""
    length = change.shape[1]
    idx = jnp.arange(length, dtype=jnp.int32)
    begins = change.at[:, 0].set(True)
    return jax.lax.cummax(jnp.where(begins, idx, 0), axis=1)


def _run_ends(change):
    """int32 [B, L]: for each element, one past the last index of its run."""
    length = change.shape[1]
    idx = jnp.arange(length, dtype=jnp.int32)
    ends = jnp.concatenate([change[:, 1:], jnp.ones_like(change[:, :1])], axis=1)
    return jax.lax.cummin(jnp.where(ends, idx + 1, length), axis=1, reverse=True)


def self_ranges(segment_ids, mask_pos):
    """(k_start, k_end, q_start, q_end), int32 [B, L] each, for self-attention of a packed row.

    Query i sees keys [k_start[i], k_end[i]); key j is seen by queries [q_start[j], q_end[j]).
    Padding (segment 0) gets empty ranges [0, 0)."""
    seg = segment_ids.astype(jnp.int32)
    pos = mask_pos.astype(jnp.int32)
    new_doc = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
    new_run = new_doc | jnp.concatenate([new_doc[:, :1], pos[:, 1:] != pos[:, :-1]], 1)
    valid = seg != 0
    k_start = jnp.where(valid, _run_starts(new_doc), 0)
    k_end = jnp.where(valid, pos + 1, 0)
    q_start = jnp.where(valid, _run_starts(new_run), 0)
    q_end = jnp.where(valid, _run_ends(new_doc), 0)
    return k_start, k_end, q_start, q_end


def cache_ranges(segment_ids, mask_pos, kv_segment_ids, kv_mask_pos):
    """(k_start, k_end) int32 [B, Lq] of queries against keys with their own mask vectors (a
    KV cache, in the queries' coordinates): the first and one past the last allowed key."""
    same_doc = (segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
        segment_ids[:, :, None] != 0)
    allowed = same_doc & (kv_mask_pos[:, None, :] <= mask_pos[:, :, None])
    length = allowed.shape[-1]
    first = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
    last = length - jnp.argmax(allowed[..., ::-1], axis=-1).astype(jnp.int32)
    some = allowed.any(-1)
    return jnp.where(some, first, 0), jnp.where(some, last, 0)
