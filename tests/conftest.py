"""Test setup: 8 simulated CPU devices (for sharding tests), set before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct in HF format, written by ../shared/tools/smollm2_hf.py; else skip."""
    path = os.environ.get("SMOLLM2_DIR", os.path.expanduser("~/.cache/sftmix_jax/smollm2-135m-instruct"))
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        pytest.skip(f"no SmolLM2 checkpoint at {path}: run `python ../shared/tools/smollm2_hf.py {path}` "
                    "or set SMOLLM2_DIR")
    return path
