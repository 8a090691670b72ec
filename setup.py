"""vlm_jax: a JAX/Flax research framework for vision-language models."""

from setuptools import find_packages, setup

# `python -m vlm_jax.convert` reads and writes .safetensors; reading PyTorch .bin weights also
# needs torch, which only [test] installs (pinned).
CONVERT = ["safetensors>=0.4"]
# train.metric_writers=("wandb", ...) logs to Weights & Biases (offline mode needs no network).
WANDB = ["wandb>=0.31.0"]
# libtpu: runs on TPU VMs, and compiles for any TPU topology on a CPU host
# (python -m vlm_jax.compile); nothing executes on the CPU through it.
TPU = ["jax[tpu]>=0.10.2"]
# data.decoder="opencv": as fast as simplejpeg on JPEGs (benchmarks/RESULTS.md, "Input pipeline
# throughput"), but a 60 MB wheel, so an extra; "auto" takes simplejpeg, then it, then PIL.
OPENCV = ["opencv-python-headless>=4.10"]  # cv2.IMREAD_COLOR_RGB

setup(
    name="vlm_jax",
    version="0.1.0",
    description="JAX/Flax framework for contrastive and generative vision-language models",
    python_requires=">=3.11",
    packages=find_packages(include=["vlm_jax", "vlm_jax.*"]),
    # Measured per-device tables read by impl="auto" and the flash kernel's default tiles.
    package_data={"vlm_jax.kernels": ["tables/*/*.json"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.0",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.0",
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "tensorflow-datasets>=4.9.10",
        "chex>=0.1.92",
        "numpy>=2.0",
        "pillow>=10.0",
        # data.decoder="auto": JPEG decode + crop, the input pipeline's cost, runs faster than
        # through PIL (benchmarks/RESULTS.md, "Input pipeline throughput"); a small wheel.
        "simplejpeg>=1.7",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "absl-py>=2.1",
        "matplotlib>=3.8",
        "ftfy>=6.0",  # CLIP BPE text cleaning
        "regex>=2023.0",  # CLIP BPE pre-tokenisation
    ],
    extras_require={
        "convert": CONVERT,
        "wandb": WANDB,
        "opencv": OPENCV,
        "test": [
            *CONVERT,
            *WANDB,
            *OPENCV,  # tests/test_decode.py compares every decoder with PIL
            "pytest>=8.0",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "torch==2.13.0",
            "transformers>=4.45",
            "open_clip_torch>=2.26",
            "sentencepiece>=0.2",
            # ships Mistral's SentencePiece models (tests/test_tokenizers_real.py reads the files,
            # never imports the package); 1.10+ pins numpy<2.4 on Python <= 3.12, 1.9 does not.
            "mistral-common>=1.9,<1.10",
            "scikit-learn>=1.5",
            "scikit-image>=0.24",
            "pandas>=2.0",  # the notebooks' analysis cells (tests/test_notebooks.py)
            *TPU,  # compiling for TPU topologies on this CPU (tests/test_compile_tpu.py)
        ],
        "notebooks": ["jupyter", "matplotlib>=3.8", "pandas>=2.0"],
        "gpu": ["jax[cuda12]>=0.10.2"],
        "tpu": TPU,
    },
)
