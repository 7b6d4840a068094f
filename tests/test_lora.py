"""LoRA: adapters only are trained and checkpointed; the merged export has the same logits."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from sftmix_jax import hf, main, sharding
from sftmix_jax.model import lora
from sftmix_jax.model.llama import ModelConfig, init_model
from sftmix_jax import checkpoints

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, tie_embeddings=True)
IDS = jnp.arange(24).reshape(2, 12) % 64


def randomize_b(model, seed=2):
    """B = 0 at init; give it values so the adapters change the logits."""
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if getattr(m, "lora_b", None) is not None:
            m.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(seed + i), m.lora_b.shape)


def test_adapters_start_at_zero_and_merge_exactly():
    model = init_model(CFG, 0)
    base = np.asarray(model(IDS))
    lora.add(model, 4, 8.0, "q,k,v,o,gate,up,down", seed=1)
    np.testing.assert_array_equal(np.asarray(model(IDS)), base)  # B = 0: the base model's logits
    randomize_b(model)
    adapted = np.asarray(model(IDS))
    assert np.abs(adapted - base).max() > 1e-2
    # trainable = 2 layers x (q,k,v,o,gate,up,down) x r (in + out)
    D, N, K, H, F, r = 32, 4, 2, 8, 48, 4
    per_layer = r * ((D + N * H) + 2 * (D + K * H) + (N * H + D) + 2 * (D + F) + (F + D))
    assert lora.count(model)["trainable"] == 2 * per_layer
    lora.merge(model)
    assert not lora.has_lora(model)
    np.testing.assert_allclose(np.asarray(model(IDS)), adapted, atol=1e-5)


def test_export_merges_and_transformers_agrees(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = lora.add(init_model(CFG, 0), 4, 8.0, "q,v,down", seed=1)
    randomize_b(model)
    adapted = np.asarray(model(IDS))
    hf.save_pretrained(model, str(tmp_path))
    back = hf.load_pretrained(str(tmp_path))
    assert not lora.has_lora(back)
    np.testing.assert_allclose(np.asarray(back(IDS)), adapted, atol=1e-5)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(ref(torch.tensor(np.asarray(IDS))).logits.numpy(), adapted, atol=1e-4)


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match="unknown module.*'qq'"):
        lora.add(init_model(CFG, 0), 4, 8.0, "q,qq")


def test_tiny_reference_with_lora_trains_only_adapters(tmp_path):
    """configs/tiny.py with lora.rank=4: checkpoints hold the adapters only, the base weights do not
    move, and the merged HF export gives the unmerged model's logits within 1e-4."""
    c = tiny_config(**{"lora.rank": 4, "lora.targets": "q,v,gate,down", "stages": "reference"})
    c.reference.checkpoints = 2
    workdir = str(tmp_path)
    main.run_stages(c, workdir)
    mesh = sharding.make_mesh(c.mesh)

    base = lora.apply(hf.load_model(c.model, seed=c.seed, mesh=mesh), c.lora, c.seed, mesh)
    counts = lora.count(base)
    graphdef, initial, frozen = nnx.split(base, lora.trainable(base), ...)
    steps = json.load(open(os.path.join(workdir, "reference", "done.json")))["replay_steps"]
    ckpt = os.path.join(workdir, "reference", "checkpoints")
    restored = checkpoints.restore_params(ckpt, steps[-1], initial)
    n_ckpt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(restored))
    assert n_ckpt == counts["trainable"] < counts["total"] / 5  # adapters only, and few of them
    assert all(isinstance(v, lora.LoRAParam) for _, v in nnx.to_flat_state(restored))

    trained = nnx.merge(graphdef, restored, frozen)
    exported = hf.load_pretrained(os.path.join(workdir, "reference", "hf"))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 20)))
    unmerged, merged = np.asarray(trained(ids)), np.asarray(exported(ids))
    assert np.abs(unmerged - np.asarray(nnx.merge(graphdef, initial, frozen)(ids))).max() > 1e-3  # it trained
    np.testing.assert_allclose(merged, unmerged, atol=1e-4)
    # frozen: the export's embedding (never adapted) is the initial one, bit for bit
    np.testing.assert_array_equal(np.asarray(exported.embed[...]), np.asarray(base.embed[...]))
