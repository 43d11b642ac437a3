"""A batch's used image slots, compacted: the autoencoder and patch layers run on K images per
group of R rows (data.image_budget, image_budget_rows), not on every row's M slots.

At paper scale a 4096-element row has M = 15 slots (4096 // 258) and holds about 8 images at the
1:1 mix, so the step would encode, patch and decode about twice the images it trains on. The
packer keeps each group within K images (data/packing.py); here, inside the jitted step, a group's
R*M slots are sorted used-first (stable: packing order) and the first K kept. Everything that
names a slot moves with it:

  images / latents, image_mask, max_timestep  [B, M, ...] -> [G, K, ...]   (G = B / R groups)
  patch_positions [B, M, P] (row positions)   -> [G, K, P]: positions in the group's R rows
                                                  laid end to end (row j's element e: j*L + e)
  patch_index     [B, L]    (slot*P + p)      -> [B, L]: compact slot k*P + p in the group

This is the model's grouped layout (models/transfusion.py: Transfusion._embed): with R = 1 and
K = M it is the plain batch contract. A group's rows are rows i, i+A, ... of A*R consecutive
(A = grad_accum), so that each microbatch holds whole groups and every group lies on one device
(trainers/transfusion.py: micro; check_config asks that a device's rows be whole blocks).
"""
from __future__ import annotations

import jax.numpy as jnp

SLOT_KEYS = ("images", "latents", "image_mask", "max_timestep")  # [B, M, ...] per slot


def group_rows(x, rows: int, accum: int):
    """[B, ...] -> [G, R, ...]: group g = A*block + i holds rows block*A*R + i + A*j, j < R."""
    b = x.shape[0]
    y = x.reshape(b // (accum * rows), rows, accum, *x.shape[1:])
    return jnp.swapaxes(y, 1, 2).reshape(b // rows, rows, *x.shape[1:])


def ungroup_rows(y, accum: int):
    """group_rows' inverse: [G, R, ...] -> [B, ...]."""
    g, rows = y.shape[:2]
    x = jnp.swapaxes(y.reshape(g // accum, accum, rows, *y.shape[2:]), 1, 2)
    return x.reshape(g * rows, *y.shape[2:])


def group_slots(x, rows: int, accum: int):
    """[B, M, ...] -> [G, R*M, ...]: group slot j*M + s is slot s of the group's j-th row."""
    y = group_rows(x, rows, accum)
    return y.reshape(y.shape[0], rows * x.shape[1], *x.shape[2:])


def places(image_mask, rows: int, budget: int, accum: int = 1):
    """(keep [G, K]: the group slots kept, in order; rank [G, R*M]: each group slot's place,
    >= K where it is not kept)."""
    used = group_slots(image_mask, rows, accum)
    order = jnp.argsort((~used).astype(jnp.int32), axis=1, stable=True)  # used first
    return order[:, :budget], jnp.argsort(order, axis=1)


def compact(batch: dict, rows: int, budget: int, accum: int = 1) -> tuple[dict, jnp.ndarray]:
    """(the batch in the grouped layout, images dropped): the first `budget` used slots of each
    group of `rows` rows. A group holding more (a packer that did not keep the budget) loses its
    last images: their patches read the token embedding there and get no diffusion loss; the
    count is returned so that the step can report it (it is 0 for the pipeline's batches)."""
    b, m = batch["image_mask"].shape
    length, p = batch["patch_index"].shape[1], batch["patch_positions"].shape[-1]
    keep, rank = places(batch["image_mask"], rows, budget, accum)
    take = lambda x: jnp.take_along_axis(  # [B, M, ...] -> [G, K, ...]
        group_slots(x, rows, accum), keep.reshape(*keep.shape, *(1,) * (x.ndim - 2)), axis=1)
    out = dict(batch)
    for key in SLOT_KEYS:
        if key in batch:
            out[key] = take(batch[key])
    row_in_group = ungroup_rows(jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32),
                                                 (b // rows, rows)), accum)  # [B]
    out["patch_positions"] = take(batch["patch_positions"] + (row_in_group * length)[:, None, None])

    index = group_rows(batch["patch_index"], rows, accum)                    # [G, R, L]
    slot = (jnp.arange(rows, dtype=jnp.int32) * m)[None, :, None] + jnp.maximum(index, 0) // p
    place = jnp.take_along_axis(rank, slot.reshape(b // rows, rows * length), axis=1)
    place = place.reshape(index.shape)
    kept = (index >= 0) & (place < budget)
    out["patch_index"] = ungroup_rows(jnp.where(kept, place * p + index % p, -1), accum)
    dropped = jnp.sum(batch["image_mask"]) - jnp.sum(out["image_mask"])
    return out, dropped


def expand(values, image_mask, rows: int, budget: int, accum: int = 1):
    """compact's inverse for per-image values: [G, K, ...] -> [B, M, ...] (zeros in the slots
    not used, or not kept). Chameleon encodes the kept images to code ids and puts them back in
    their rows."""
    b, m = image_mask.shape
    _, rank = places(image_mask, rows, budget, accum)
    used = group_slots(image_mask, rows, accum)
    padded = jnp.concatenate([values, jnp.zeros_like(values[:, :1])], axis=1)
    index = jnp.where(used & (rank < budget), rank, budget)  # the others read the zeros
    out = jnp.take_along_axis(padded, index.reshape(*index.shape, *(1,) * (values.ndim - 2)),
                              axis=1)
    return ungroup_rows(out.reshape(b // rows, rows, m, *values.shape[2:]), accum)
