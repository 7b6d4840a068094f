"""scan_layers: the stacked, scanned model against the unrolled one loaded from the same HF files:
logits, NTP loss and gradients (remat too), the exported files, decoding, LoRA, sharding, Orbax."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

pytest.importorskip("transformers")  # config_to_hf

from conftest import mesh_of  # noqa: E402
from sftmix_jax import checkpoints, config, hf, losses, sharding, trainer  # noqa: E402
from sftmix_jax.model import decode, lora  # noqa: E402
from sftmix_jax.model.llama import ModelConfig, init_model  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
            head_dim=8, qkv_bias=True, o_bias=True)
CASES = {  # Gemma-2: windows of 4 on layers 0 and 2 of 12 tokens (two distinct masks), soft-caps, tied
    "llama": ModelConfig(**TINY),
    "gemma2": ModelConfig(**dict(TINY, num_layers=4), model_type="gemma2", embed_scale=True, norm_plus_one=True,
                          activation="gelu_tanh", post_norms=True, query_pre_attn_scalar=12.0, attn_softcap=5.0,
                          final_softcap=3.0, sliding_window=4, sliding_layers=(True, False, True, False),
                          tie_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_dir(request, tmp_path_factory):
    """An unrolled model, every parameter randomised (biases and norms count), saved in HF format."""
    model = init_model(CASES[request.param], seed=1)
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(next(keys), w.shape, w.dtype), state)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(nnx.merge(graphdef, state), path)
    return path


def both(path, **kw):
    return hf.load_pretrained(path, **kw), hf.load_pretrained(path, scan_layers=True, **kw)


def unstacked(state) -> dict:
    """A scanned model's flat state (parameters, gradients) in the unrolled model's paths."""
    out = {}
    for key, var in nnx.to_flat_state(state):
        value = np.asarray(var.get_value())
        if sharding.layer_stacked(var):
            out.update({key[:1] + (i,) + key[1:]: v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


def batch(V=64, B=4, L=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (B, L)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:], mask[2, 10:] = 0, 0  # right padding
    weights = (mask * (np.arange(L) >= 3)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "weights": weights, "targets": np.roll(ids, -1, 1)}


def test_parameters_are_stacked_on_a_layers_axis(hf_dir):
    plain, scanned = both(hf_dir)
    q = nnx.state(scanned)["layers"]["attn"]["q"]["kernel"]
    assert q.shape == (plain.cfg.num_layers,) + plain.layers[0].attn.q.kernel.shape
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    want = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(plain))}
    got = unstacked(nnx.state(scanned))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def test_logits_match_the_unrolled_model(hf_dir):
    plain, scanned = both(hf_dir)
    b = batch()
    ids, mask = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    for args in ((ids,), (ids, mask)):  # right-padded fast path; padding masked
        want, got = np.asarray(plain(*args)), np.asarray(scanned(*args))
        assert np.abs(want).max() > 1.0
        err = np.abs(got - want).max()
        print(f"{plain.cfg.model_type} {len(args)} args: max |scanned - unrolled| = {err:.1e}")
        assert err < 2e-5  # float32 rounding (logits up to ~6 here; seen: 3e-6 to 9e-6)


def loss_and_grads(model):
    b = {k: jnp.asarray(v) for k, v in batch().items()}
    graphdef, params = nnx.split(model)
    loss = lambda p: losses.ntp_loss_fn()(nnx.merge(graphdef, p), b, None)[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)


_UNROLLED_GRADS = {}


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_ntp_loss_and_gradients_match(hf_dir, remat):
    """The pipeline's NTP loss (fused head) and its gradients."""
    if hf_dir not in _UNROLLED_GRADS:  # once per model, not per remat policy
        _UNROLLED_GRADS[hf_dir] = loss_and_grads(hf.load_pretrained(hf_dir))
    (l0, g0), (l1, g1) = _UNROLLED_GRADS[hf_dir], loss_and_grads(hf.load_pretrained(hf_dir, remat=remat, scan_layers=True))
    assert abs(float(l0) - float(l1)) < 1e-5
    want, got = unstacked(g0), unstacked(g1)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=str(k))


def test_train_step_matches(hf_dir):
    """One jitted AdamW step of the trainer: loss, gradient norm, the updated parameters (stacked
    biases and norms are not decayed, as the unrolled ones)."""
    plain, scanned = both(hf_dir)
    b = {k: jnp.asarray(v) for k, v in batch().items()}
    loss_fn, rng = losses.ntp_loss_fn(), jax.random.key(0)
    opt = ml_collections.ConfigDict(dict(lr=1e-2, min_lr_ratio=0.1, warmup_ratio=0.0, weight_decay=0.1, grad_clip=1.0,
                                         b1=0.9, b2=0.95, eps=1e-8))
    stepped = {}
    for name, m in (("plain", plain), ("scanned", scanned)):
        graphdef, params = nnx.split(m)
        tx, _ = trainer.make_optimizer(opt, 10)
        params, _, metrics = trainer.make_train_step(graphdef, tx, loss_fn)(params, tx.init(params), b, rng)
        stepped[name] = (float(metrics["loss"]), float(metrics["grad_norm"]), unstacked(params))
    (l0, n0, p0), (l1, n1, p1) = stepped["plain"], stepped["scanned"]
    assert abs(l0 - l1) < 1e-5 and abs(n0 - n1) < 1e-4 * n0
    for k in p0:  # Adam's first step is about lr * sign(g): 1e-2 on tiny gradients' rounding
        np.testing.assert_allclose(p1[k], p0[k], atol=1e-4, err_msg=str(k))


def tensors(path) -> dict:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update({f"{f}:{k}": v for k, v in load_file(os.path.join(path, f)).items()})
    return out


def test_save_pretrained_writes_the_same_files(hf_dir, tmp_path):
    plain, scanned = both(hf_dir)
    for shard_bytes in (hf.SHARD_BYTES, 20_000):  # one file; many shards (same tensors in the same shards)
        a, b = str(tmp_path / f"plain{shard_bytes}"), str(tmp_path / f"scanned{shard_bytes}")
        hf.save_pretrained(plain, a, max_shard_bytes=shard_bytes)
        hf.save_pretrained(scanned, b, max_shard_bytes=shard_bytes)
        assert sorted(os.listdir(a)) == sorted(os.listdir(b))
        want, got = tensors(a), tensors(b)
        assert list(got) == list(want) and len(want) > 10
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        for f in os.listdir(a):  # config.json, the index, the safetensors themselves: byte for byte
            with open(os.path.join(a, f), "rb") as x, open(os.path.join(b, f), "rb") as y:
                assert x.read() == y.read(), f
    with open(os.path.join(b, "config.json")) as f:
        assert "scan_layers" not in json.load(f)  # a runtime switch, not the architecture


def test_greedy_decoding_matches(hf_dir):
    """The stacked KV cache (Gemma-2: sliding layers masked by window) against the per-layer cache."""
    plain, scanned = both(hf_dir)
    assert set(scanned.init_cache(2, 8)) == {"k", "v"} and scanned.init_cache(2, 8)["k"].shape[:3] == (plain.cfg.num_layers, 2, 8)
    prompts = [[5, 17, 9, 3, 42, 8, 6], [7, 1, 12, 33, 2, 50, 14, 7, 26, 50]]
    want = decode.generate(plain, prompts, max_new_tokens=6, batch_size=2, pad_to=4)
    assert decode.generate(scanned, prompts, max_new_tokens=6, batch_size=2, pad_to=4) == want


def test_lora_adapters_per_layer(hf_dir, tmp_path):
    """Adapters stacked like their kernels: the scanned model with trained (nonzero) adapters computes
    what its merged export and the unrolled model with the same adapters compute; same PEFT files."""
    plain, scanned = both(hf_dir)
    lora.add(scanned, 4, 8.0, "q,v,down")
    assert nnx.state(scanned, lora.LoRAParam)["layers"]["attn"]["q"]["lora_b"].shape[:2] == (plain.cfg.num_layers, 4)
    bs = nnx.state(scanned, lora.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(bs))))
    nnx.update(scanned, jax.tree.map(lambda w: 0.2 * jax.random.normal(next(keys), w.shape, w.dtype), bs))
    lora.add(plain, 4, 8.0, "q,v,down")
    flat = dict(nnx.to_flat_state(nnx.state(plain, lora.LoRAParam)))
    for k, v in unstacked(nnx.state(scanned, lora.LoRAParam)).items():
        flat[k].set_value(jnp.asarray(v))
    ids = jnp.asarray(batch()["input_ids"])
    logits = np.asarray(scanned(ids))
    np.testing.assert_allclose(np.asarray(plain(ids)), logits, rtol=1e-5, atol=1e-5)
    for name, m in (("plain", plain), ("scanned", scanned)):
        hf.save_pretrained(m, str(tmp_path / name), adapter_path=str(tmp_path / f"{name}_adapter"))
    for d in ("", "_adapter"):
        want, got = tensors(tmp_path / f"plain{d}"), tensors(tmp_path / f"scanned{d}")
        assert list(got) == list(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_allclose(np.asarray(hf.load_pretrained(str(tmp_path / "scanned"))(ids)), logits, atol=5e-5)  # merged: W + s A B rounds differently
    np.testing.assert_allclose(np.asarray(lora.merge(scanned)(ids)), logits, atol=5e-5)  # merged: W + s A B rounds differently


def test_sharded_by_logical_names_and_checkpointed(hf_dir, tmp_path):
    """The layer axis is never sharded; a sharded forward matches; Orbax saves and restores the stacks."""
    mesh = mesh_of((2, 2, 2))
    place = lambda key, var: sharding.named_sharding(mesh, var.get_metadata()["out_sharding"])  # noqa: E731
    model = hf.load_pretrained(hf_dir, scan_layers=True, shardings=place)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    assert flat[("layers", "attn", "q", "kernel")].get_value().sharding.spec == P(None, "fsdp", "tensor", None)
    assert flat[("layers", "mlp", "down", "kernel")].get_value().sharding.spec == P(None, "tensor", "fsdp")
    ids = batch()["input_ids"]
    want = np.asarray(hf.load_pretrained(hf_dir)(jnp.asarray(ids)))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda m, x: m(x))(model, jax.device_put(ids, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    params = nnx.state(model)
    with checkpoints.manager(str(tmp_path / "ckpt")) as mngr:
        checkpoints.save(mngr, 1, params, {"count": jnp.zeros(())}, {"step": 1})
        mngr.wait_until_finished()
    abstract = sharding.with_shardings(jax.eval_shape(lambda: params), sharding.state_shardings(params, mesh))
    back = checkpoints.restore_params(str(tmp_path / "ckpt"), 1, abstract)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mixed_fast_and_masked_layers_are_refused():
    """Sliding and full layers without a soft-cap: the full ones take the unmasked kernel, which one
    scanned body cannot mix with the masked one."""
    cfg = dataclasses.replace(CASES["gemma2"], attn_softcap=None, scan_layers=True)
    model = init_model(cfg)
    ids = jnp.asarray(batch()["input_ids"])
    with pytest.raises(ValueError, match="scan_layers"):
        model(ids)
    model(ids[:, :4])  # no longer than the window: every layer unmasked


def test_config_key_and_old_workdirs(tmp_path):
    c = config.defaults()
    assert c.model.scan_layers is False
    new = json.loads(c.to_json_best_effort())
    old = json.loads(c.to_json_best_effort())
    del old["model"]["scan_layers"]  # a workdir written before the key existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    config.check_workdir_config(str(tmp_path), new)  # resumes
    new["model"]["scan_layers"] = True
    with pytest.raises(SystemExit, match="model.scan_layers"):
        config.check_workdir_config(str(tmp_path), new)
    c.model = ml_collections.ConfigDict({**c.model.to_dict(), "scan_layers": "yes"})
    assert any("scan_layers" in p for p in config._model_problems(c))
    init = {k: v for k, v in dataclasses.asdict(CASES["llama"]).items()
            if k not in ("dtype", "param_dtype", "remat", "attention", "scan_layers")}
    m = ml_collections.ConfigDict(dict(source="init", init=init, dtype="float32", param_dtype="float32", remat="none",
                                       scan_layers=True))
    assert hf.load_model(m).cfg.scan_layers
