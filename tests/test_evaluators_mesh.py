"""Evaluators on the run's mesh (issue 14): the params sharded as training shards them (here
data=2, fsdp=2, tensor=2 over the 8 test devices), under the run's logical axis rules, give the
numbers of the same evaluators on one device (to float32 rounding of sharded sums)."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from transfusion_jax import evaluate
from transfusion_jax.core import sharding, train_state
from transfusion_jax.core.config import load_config
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.evaluators import common
from transfusion_jax.models import family
from transfusion_jax.models.autoencoder import loader
from transfusion_jax.trainers import transfusion as trainer

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def both_ways(tmp_path, evals):
    config = load_config("experiments/transfusion.py:tiny")
    config.mesh, config.evals = MESH, evals
    mesh = sharding.make_mesh(config.mesh)
    model, tx = trainer.model_and_optimizer(config)
    init_fn = trainer.make_init_fn(config, model, tx, trainer.init_inputs(config, 1))
    params = train_state.create_state(init_fn, mesh, config.sharding_rules, 0).params
    specs = {x.sharding.spec for x in jax.tree.leaves(params)}
    assert PartitionSpec("fsdp", "tensor") in specs  # the params really are sharded
    context = common.Context(config, get_tokenizer(config.data, str(tmp_path)),
                             loader.load_codec(config.autoencoder, family(config.model)),
                             str(tmp_path))
    scheduled = common.from_config(config.evals, context)
    host = {"params": jax.device_get(params)}
    with nn.logical_axis_rules(()):
        on_one_device = common.run(scheduled, host, 1, str(tmp_path))
    # The evaluate entry point's placement is the trainer's.
    _, placed = evaluate.on_the_run_mesh(config, host)
    jax.tree.map(lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim) or pytest.fail(
        f"{a.sharding} != {b.sharding}"), placed["params"], params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(
            sharding.rules_from_config(config.sharding_rules)):
        on_the_mesh = common.run(scheduled, placed, 2, str(tmp_path))
    assert on_one_device.keys() == on_the_mesh.keys()
    for key, value in on_one_device.items():
        np.testing.assert_allclose(on_the_mesh[key], value, rtol=1e-5, err_msg=key)
    return on_the_mesh


def test_text_scoring_evaluators_on_the_mesh(tmp_path):
    out = both_ways(tmp_path, {"perplexity": {"type": "perplexity", "tokens": 2000},
                               "choices": {"type": "ranked", "num": 4}})
    assert out["perplexity/tokens"] >= 2000 and out["choices/n"] == 4


@pytest.mark.slow
def test_generating_evaluators_on_the_mesh(tmp_path):
    """The KV-cached generator (captions) and the one-call denoiser, sharded."""
    out = both_ways(tmp_path, {"captions": {"type": "captioning", "num": 2},
                               "denoising": {"type": "denoising", "num": 2}})
    assert out["captions/images"] == 2


def test_a_mesh_larger_than_the_machine_evaluates_along_fsdp():
    """A pod run's mesh on one host (evaluate; process 0 of a multi-process run)."""
    devices = jax.devices()[:4]
    assert dict(sharding.evaluation_mesh(MESH, devices).shape) == {"data": 1, "fsdp": 4,
                                                                    "tensor": 1}
    assert dict(sharding.evaluation_mesh({"data": 2, "fsdp": 2, "tensor": 1}, devices).shape) \
        == {"data": 2, "fsdp": 2, "tensor": 1}  # the run's own when it fits
