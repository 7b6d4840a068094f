"""Test setup: 8 simulated CPU devices (for sharding tests), set before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compilation cache for the session, shared by the pytest-xdist workers (they inherit this
# environment from the controller, which loads this file first) and every subprocess: resumed runs,
# seeds and processes of one config compile the same programs, and then load them instead.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sftmix-jax-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny models compile fast
from sftmix_jax.ops import cpu  # noqa: E402

cpu.prefer_accurate_matmuls()  # in-process runs compute as `python -m sftmix_jax.main` does

import subprocess  # noqa: E402
import sys  # noqa: E402

import filelock  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct in HF format, written by ../shared/tools/smollm2_hf.py; else skip."""
    path = os.environ.get("SMOLLM2_DIR", os.path.expanduser("~/.cache/sftmix_jax/smollm2-135m-instruct"))
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        pytest.skip(f"no SmolLM2 checkpoint at {path}: run `python ../shared/tools/smollm2_hf.py {path}` "
                    "or set SMOLLM2_DIR")
    return path


@pytest.fixture(scope="session")
def transformers4():
    """A Python that imports transformers 4.x (a venv over this one's packages); skip where pip cannot make it."""
    env = os.path.join(os.environ.get("SFTMIX_CACHE", os.path.expanduser("~/.cache/sftmix_jax")), "venv-transformers4")
    python = os.path.join(env, "bin", "python")
    probe = [python, "-c", "import transformers; assert transformers.__version__.startswith('4.')"]
    os.makedirs(os.path.dirname(env), exist_ok=True)
    with filelock.FileLock(env + ".lock"):  # pytest-xdist workers: one makes it, the others wait
        return _venv(env, python, probe)


def _venv(env, python, probe):
    if not (os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0):
        made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", env], capture_output=True)
        pip = made.returncode == 0 and subprocess.run([python, "-m", "pip", "install", "-q", "transformers>=4.50,<5"],
                                                      capture_output=True, timeout=600)
        if not pip or pip.returncode != 0 or subprocess.run(probe, capture_output=True).returncode != 0:
            pytest.skip("could not make a venv with transformers 4.x (offline?)")
    return python


# ----------------------------------------------------------------------------------------
# One shrunken run of the whole pipeline, shared by the pipeline and confidence tests
# ----------------------------------------------------------------------------------------
import importlib.util  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough for CI, large enough that every stage does real work.
OVERRIDES = dict(train_steps=24, batch=16, num_train=160, num_eval=32)


def tiny_config(**kw):
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    # From scratch at a from-scratch learning rate (the pre-trained base: test_pretrain.py).
    c.model.source, c.train.lr = "init", 3e-3
    c.train.steps, c.train.batch_size = OVERRIDES["train_steps"], OVERRIDES["batch"]
    c.train.eval_every, c.train.save_every, c.train.log_every = 12, 8, 4
    c.data.synthetic.num_train, c.data.synthetic.num_eval = OVERRIDES["num_train"], OVERRIDES["num_eval"]
    c.evaluate.max_new_tokens = 8
    c.update_from_flattened_dict(kw)
    return c


def mesh_of(shape):
    """A (data, fsdp, tensor) mesh over the first d*f*t of the simulated devices."""
    import jax
    import ml_collections

    from sftmix_jax import sharding

    d, f, t = shape
    cfg = ml_collections.ConfigDict(dict(data=d, fsdp=f, tensor=t, dcn_data=1))
    return sharding.make_mesh(cfg, jax.devices()[: d * f * t])


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pipeline"))
    from sftmix_jax import main

    main.run_stages(tiny_config(), d)
    return d


# The longest files (subprocess runs of the pipeline) first: with pytest-xdist (pytest.ini) each
# file runs on one worker in this order, so none of them starts last and runs alone.
HEAVY_FIRST = ("test_multihost.py", "test_pretrain.py", "test_pipeline.py", "test_weak_to_strong.py",
               "test_sharding.py", "test_tools.py", "test_smollm2.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: file order otherwise
