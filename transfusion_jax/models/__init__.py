"""Flax Linen modules: the Transfusion model and its parts."""
from transfusion_jax.models.transfusion import Transfusion, example_inputs, patches_per_image

__all__ = ["Transfusion", "example_inputs", "patches_per_image"]
