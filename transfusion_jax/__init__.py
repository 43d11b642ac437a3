"""transfusion_jax: one transformer that predicts text tokens and denoises image latents.

Importing this package has no side effects: no device is touched and nothing is downloaded.
"""
__version__ = "0.1.0"
