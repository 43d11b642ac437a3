"""transfusion_jax: train Transfusion models (Zhou et al., 2024) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="transfusion_jax",
    version="0.1.0",
    description="Transfusion: next-token prediction and diffusion in one transformer, in JAX/Flax.",
    python_requires=">=3.11",
    packages=find_packages(include=["transfusion_jax", "transfusion_jax.*"]),
    # Ranges pinned to the minor versions this code is tested on: these APIs move fast.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<4.10",
        "ml-collections>=1.1,<1.2",
        "sentencepiece>=0.2,<0.3",
        "absl-py>=2.1",
        "numpy>=2.0",
        "pillow>=10.0",
        # TensorBoard event files without TensorFlow (flax/clu writers need TF).
        "tensorboardX>=2.6,<3",
    ],
    entry_points={"console_scripts": [
        "transfusion-train=transfusion_jax.train:main",
    ]},
    extras_require={"test": ["pytest>=8"]},
)
