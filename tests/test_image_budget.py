"""data.image_budget (issue 18, item 4): the packer keeps every group of rows within K images,
and the step runs the autoencoder and patch layers on K slots per group, not on every row's M,
computing the same losses and gradients as the full layout (checked against a brute-force map of
each used slot to its compact place, for grad_accum 1 and 2)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rows import build_rows
from test_data_contract import check_batch
from test_step_speed_options import tiny
from transfusion_jax import objectives
from transfusion_jax.core.config import load_config
from transfusion_jax.data.config import get_data_config
from transfusion_jax.data.pipeline import make_pipeline
from transfusion_jax.data.shapes import text as shapes_text
from transfusion_jax.data.tokenizer import train_tokenizer
from transfusion_jax.models import Transfusion, patches_per_image
from transfusion_jax.trainers import image_budget
from transfusion_jax.trainers import transfusion as trainer

M, L, P = 4, 128, 16  # slots per row, row length, patches per image (16x16 pixels, 4x4 patches)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(shapes_text.text_corpus(0, "train", 1000), 512)


def pipeline(tok, budget=0, rows=2, accum=1, **kw):
    c = get_data_config(**{**dict(seq_len=L, batch_size=8, image_size=16, read_threads=1,
                                  max_images=M, image_budget=budget, image_budget_rows=rows),
                           **kw})
    return make_pipeline(c, patches_per_image=P, tokenizer=tok, shard_index=0, shard_count=1,
                         grad_accum=accum)


def group_of(row: int, rows: int, accum: int) -> int:
    """The group of a batch row, from the definition (packing.py): rows i, i+A, ... of A*R."""
    return (row // (accum * rows)) * accum + row % accum


@pytest.mark.parametrize("accum", [1, 2])
def test_every_group_keeps_its_budget(tok, accum):
    budget, rows = 5, 2
    p = pipeline(tok, budget, rows, accum)
    full = pipeline(tok)
    over = 0
    for _ in range(15):
        batch, plain = next(p), next(full)
        check_batch(batch, B=8, L=L, M=M, P=P, S=16, whole_documents=False)
        for images, limit in ((batch["image_mask"].sum(1), budget), (plain["image_mask"].sum(1), None)):
            per_group = np.zeros(8 // rows, int)
            for r, n in enumerate(images):
                per_group[group_of(r, rows, accum)] += n
            if limit is None:
                over += int((per_group > budget).sum())
            else:
                assert per_group.max() <= budget
    assert over > 0, "without the budget some groups exceed it: the test could fail"
    assert p.metrics()["budget_closed_rows"] > 0 and pipeline(tok).metrics()["budget_closed_rows"] == 0


def test_the_budget_keeps_the_document_order(tok):
    """Rows close early, documents never move: the row-major token stream is the same."""
    def stream(p, n):
        out = []
        for _ in range(n):
            b = next(p)
            for r in range(len(b["tokens"])):
                out += b["tokens"][r][b["segment_ids"][r] > 0].tolist()
        return out
    budgeted, plain = stream(pipeline(tok, 4, 2), 12), stream(pipeline(tok), 12)
    n = min(len(budgeted), len(plain))
    assert n > 2000 and budgeted[:n] == plain[:n]


def test_resume_is_exact(tok):
    p = pipeline(tok, 5, 2, accum=2)
    for _ in range(3):
        next(p)
    state = p.get_state()
    want = [next(p) for _ in range(4)]
    q = pipeline(tok, 5, 2, accum=2)
    q.set_state(state)
    got = [next(q) for _ in range(4)]
    for a, b in zip(want, got):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="image_budget"):  # rows packed to another budget
        pipeline(tok, 6, 2, accum=2).set_state(state)


def test_bad_budgets_name_the_field(tok):
    with pytest.raises(ValueError, match=r"data.image_budget = 3: expected between max_images"):
        pipeline(tok, 3, 2)
    with pytest.raises(ValueError, match=r"data.image_budget = 9"):
        pipeline(tok, 9, 2)
    with pytest.raises(ValueError, match=r"data.image_budget_rows = 3: .* 8 rows per batch"):
        pipeline(tok, 5, 3)
    with pytest.raises(ValueError, match=r"data.image_budget_rows = 0"):
        get_data_config(image_budget_rows=0)
    config = load_config("experiments/transfusion.py:tiny")
    config.data.image_budget, config.data.image_budget_rows = 5, 3
    with pytest.raises(ValueError, match=r"data.image_budget_rows=3: data.batch_size="):
        trainer.check_config(config, num_devices=1)


# Rows of the model test: images per row 2, 0, 1, 3 (groups of R=2: 2+0, 1+3 with A=1;
# rows {0, 2}, {1, 3}: 3, 3 with A=2) -- and a batch where one group holds one image too many.
ROWS = [[[3, "image", 2], [2, "image", 1]], [[20]], [["image", 4]],
        [["image"], [1, "image", "image", 2]]]
SLOTS, LENGTH = 3, 96


def brute_force_places(mask, rows, budget, accum):
    """{(row, slot): (group, place)} of every kept used slot, by loops over the definition."""
    places, count = {}, {}
    for g in range(mask.shape[0] // rows):
        members = [r for r in range(mask.shape[0]) if group_of(r, rows, accum) == g]
        for r in sorted(members):
            for s in np.flatnonzero(mask[r]):
                if count.get(g, 0) < budget:
                    places[(r, int(s))] = (g, count.get(g, 0))
                count[g] = count.get(g, 0) + 1
    return places


def micro(x, accum):  # the trainer's microbatch split: microbatch i takes rows i, i+A, ...
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def layouts(accum, budget, rows=2):
    """The tiny model's loss and outputs (jitted) with random params, and one batch in the
    plain layout (the images past the budget unused) and in the grouped one, with x_t, t and
    targets riding along as slot arrays; the brute-force place of every kept image."""
    cfg = tiny()
    batch, _ = build_rows(ROWS, LENGTH, SLOTS, patches_per_image(cfg))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    shape = (len(ROWS), SLOTS, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    xt = jax.random.normal(jax.random.key(0), shape)
    t = jax.random.randint(jax.random.key(1), shape[:2], 0, 1000)
    target = jax.random.normal(jax.random.key(2), shape)
    model = Transfusion(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(3), batch, xt, t))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(4), a.shape), params)
    places = brute_force_places(np.asarray(batch["image_mask"]), rows, budget, accum)
    kept = np.zeros(shape[:2], bool)
    for r, s in places:
        kept[r, s] = True
    plain = (dict(batch, image_mask=batch["image_mask"] & kept), xt, t, target)
    grouped, dropped = image_budget.compact(dict(batch, latents=xt, max_timestep=t), rows,
                                            budget, accum)
    grouped_target, _ = image_budget.compact(dict(batch, latents=target), rows, budget, accum)
    assert int(dropped) == int(batch["image_mask"].sum()) - len(places)
    assert grouped["latents"].shape[:2] == (len(ROWS) // rows, budget)
    for (r, s), (g, k) in places.items():
        np.testing.assert_array_equal(grouped["latents"][g, k], xt[r, s])
    grouped = ({k: v for k, v in grouped.items() if k != "latents"}, grouped["latents"],
               grouped["max_timestep"], grouped_target["latents"])

    @jax.jit
    def loss_and_outputs(params, batch, xt, t, target):
        out = model.apply(params, batch, xt, t)
        return objectives.transfusion_loss(out, batch, target, 5.0)[0], out
    return loss_and_outputs, params, plain, grouped, places


@pytest.mark.parametrize("accum,budget", [(1, 4), (2, 4), (1, 3)])
def test_compacted_step_equals_the_full_layout(accum, budget):
    """Loss, logits and each kept image's prediction of the grouped layout equal the plain
    batch's, microbatch by microbatch; (1, 3) drops the fourth image of a group."""
    loss_and_outputs, params, plain, grouped, places = layouts(accum, budget)
    total = {"plain": 0.0, "grouped": 0.0}
    for i in range(accum):
        pick = lambda tree: jax.tree.map(lambda x: micro(x, accum)[i], tree)
        ref, ref_out = loss_and_outputs(params, *pick(plain))
        got, got_out = loss_and_outputs(params, *pick(grouped))
        if budget == 4:  # nothing dropped: the text sees the same inputs everywhere
            np.testing.assert_allclose(got_out["logits"], ref_out["logits"], atol=2e-5)
            np.testing.assert_allclose(got, ref, rtol=1e-5)
        for (r, s), (g, k) in places.items():
            if r % accum == i:
                np.testing.assert_allclose(got_out["prediction"][g // accum, k],
                                           ref_out["prediction"][r // accum, s], atol=2e-5)
        total = {"plain": total["plain"] + ref, "grouped": total["grouped"] + got}
    if budget == 4:
        np.testing.assert_allclose(total["grouped"], total["plain"], rtol=1e-5)


@pytest.mark.slow
def test_compacted_gradients_equal_the_full_layout():
    loss_and_outputs, params, plain, grouped, _ = layouts(1, 4)
    grad = jax.jit(jax.grad(lambda p, *a: loss_and_outputs(p, *a)[0]))
    for a, b in zip(jax.tree.leaves(grad(params, *plain)), jax.tree.leaves(grad(params, *grouped))):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("accum,budget", [(1, 4), (2, 4), (1, 3)])
def test_expand_puts_every_kept_image_back_in_its_slot(accum, budget):
    """Chameleon's way back: values of the kept images land in their (row, slot); the rest 0."""
    batch, _ = build_rows(ROWS, LENGTH, SLOTS, 16)
    mask = jnp.asarray(batch["image_mask"])
    values = jax.random.normal(jax.random.key(0), (len(ROWS), SLOTS, 3, 3))
    grouped, _ = image_budget.compact(dict({k: jnp.asarray(v) for k, v in batch.items()},
                                           latents=values), 2, budget, accum)
    back = np.asarray(image_budget.expand(grouped["latents"], mask, 2, budget, accum))
    want = np.zeros_like(back)
    for r, s in brute_force_places(np.asarray(mask), 2, budget, accum):
        want[r, s] = values[r, s]
    np.testing.assert_array_equal(back, want)


def test_the_step_patches_only_the_budget():
    """The patch encoder and the autoencoder see G*K images, not B*M (the fix: before it, every
    slot of every row went through both)."""
    config = load_config("experiments/transfusion.py:tiny")
    config.data.image_budget, config.data.image_budget_rows = 4, 2
    cfg = config.model
    batch, _ = build_rows(ROWS, LENGTH, SLOTS, patches_per_image(cfg))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    pixels = (len(ROWS), SLOTS, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    batch["images"] = jnp.zeros(pixels)
    seen = {}

    class Codec:  # identity pixels -> latents, recording what it encodes
        def encode(self, variables, images):
            seen["codec"] = images.shape[:2]
            return images

    def record(next_fun, args, kwargs, context):
        if context.module.name == "patch_encoder" and context.method_name == "__call__":
            seen["patch_encoder"] = args[0].shape[0]
        return next_fun(*args, **kwargs)

    model, tx = trainer.model_and_optimizer(config)
    state = jax.eval_shape(trainer.make_init_fn(config, model, tx, trainer.init_inputs(
        config, SLOTS)), jax.random.key(0))  # shapes only: the step is traced, not run
    step = trainer.make_train_step(config, model, tx, Codec())
    with nn.intercept_methods(record):
        _, metrics = jax.eval_shape(step, state, batch)
    assert seen == {"codec": (2, 4), "patch_encoder": 2 * 4}, seen
    assert "images_dropped" in metrics


@pytest.mark.slow
def test_the_chameleon_step_encodes_only_the_budget(tiny_vq_workdir):
    """The VQ encoder sees G*K images; their code ids reach the tokens as without the budget."""
    from transfusion_jax.models.autoencoder import loader
    config = load_config("experiments/chameleon.py:tiny")
    config.autoencoder.checkpoint = tiny_vq_workdir
    codec = loader.load_codec(config.autoencoder, "chameleon")
    cfg = config.model
    batch, _ = build_rows(ROWS, 5 * patches_per_image(cfg), SLOTS, patches_per_image(cfg))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    size = config.data.image_size
    batch["images"] = jax.random.uniform(jax.random.key(0), (len(ROWS), SLOTS, size, size, 3),
                                         minval=-1, maxval=1)
    seen = []

    class Recording:  # the real VQ encoder, recording what it encodes
        def encode_ids(self, variables, images):
            seen.append(images.shape[:2])
            return codec.encode_ids(variables, images)

    tokens = {}
    for budget in (0, 4):
        config.data.image_budget, config.data.image_budget_rows = budget, 2
        prepare, _, _ = trainer._chameleon_parts(config, trainer.build_model(cfg), Recording())
        tokens[budget] = prepare(batch, jax.random.key(0), codec.variables)[0][0]["tokens"]
    assert seen == [(len(ROWS), SLOTS), (len(ROWS) // 2, 4)]  # B x M, then G x K
    np.testing.assert_array_equal(tokens[4], tokens[0])
