"""Flax Linen modules: the Transfusion model and its parts."""
from transfusion_jax.model.transfusion import Transfusion, patches_per_image

__all__ = ["Transfusion", "patches_per_image"]
