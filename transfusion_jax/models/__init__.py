"""Flax Linen modules: the Transfusion model, the Chameleon baseline and their parts.

`build_model(config.model)` gives the model of the run's `model.family` ("transfusion", the
default, or "chameleon"); both take the same apply signatures (models/chameleon.py)."""
from transfusion_jax.core.validation import choice
from transfusion_jax.models.chameleon import Chameleon
from transfusion_jax.models.transfusion import Transfusion, example_inputs, patches_per_image

FAMILIES = ("transfusion", "chameleon")


def family(cfg) -> str:
    """config.model.family (configs written before the field: "transfusion")."""
    return choice(cfg, "model", "family", "transfusion", FAMILIES)


def build_model(cfg):
    """The Linen module of config.model's family."""
    return Chameleon(cfg) if family(cfg) == "chameleon" else Transfusion(cfg)


__all__ = ["Chameleon", "FAMILIES", "Transfusion", "build_model", "example_inputs", "family",
           "patches_per_image"]
