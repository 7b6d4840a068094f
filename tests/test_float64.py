"""float64 (config.model.dtype/param_dtype=float64): a sharded run matches one device to float64
precision, so sharded and unsharded runs can be compared without float32 summation-order noise.

Runs under jax.enable_x64 (a context manager) so the rest of the session stays float32.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import mesh_of, tiny_config
from sftmix_jax import hf, sharding
from sftmix_jax.data import batching, sources, synthetic
from sftmix_jax.ops.attention import causal_attention, explicit_attention
from sftmix_jax import losses, trainer
from sftmix_jax import config as config_lib

F64 = {"model.dtype": "float64", "model.param_dtype": "float64"}
FAST = {**F64, "model.init.num_layers": 1}  # fewer layers, faster compiles
SHARDED = (1, 4, 2)  # (data, fsdp, tensor): parameters, heads and vocabulary all split


@pytest.fixture(scope="module")
def setup():
    c = tiny_config(**FAST)
    train_ex, _, _ = sources.load_examples(c.data, synthetic.make_tokenizer(), c.seed)
    half = len(train_ex) // 2
    paired = batching.PairedBatches(train_ex, range(half), range(half, 2 * half), 16, 0, c.data.buckets)
    return c, paired


def test_dtypes_are_validated_and_float64_asks_for_x64():
    for key in ("model.dtype", "model.param_dtype"):
        with pytest.raises(ValueError, match=rf"config.{key}='float65': use one of float32, bfloat16, float16, float64"):
            config_lib.validate(tiny_config(**{key: "float65"}), config_lib.STAGES, 1)
    config_lib.validate(tiny_config(**F64), config_lib.STAGES, 8)
    assert config_lib.needs_x64(tiny_config(**{"model.param_dtype": "float64"}))
    assert not config_lib.needs_x64(tiny_config(**{"model.dtype": "bfloat16"}))


def test_explicit_attention_is_dot_product_attention_in_float64():
    r = np.random.default_rng(0)
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(r.normal(size=(2, 6, n, 8))) for n in (4, 2, 2))
        mask = jnp.asarray(r.random((2, 1, 6, 6)) > 0.3).at[0, 0, 2].set(False)  # one row fully masked
        want = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3)  # its softmax is float32
        got = explicit_attention(q, k, v, mask=mask, scale=0.3)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, atol=1e-6)
        causal = causal_attention(q, k, v, 0.3, block=4)  # the unmasked path keeps float64 too
        assert causal.dtype == jnp.float64
        np.testing.assert_allclose(causal, jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.3), atol=1e-6)


def _grads(shape, c, batch):
    """Gradient of a float64 functional of the logits (no loss code involved) on one mesh."""
    mesh = mesh_of(shape)
    with jax.set_mesh(mesh):
        model = hf.load_model(c.model, seed=0, mesh=mesh)
        graphdef, params = nnx.split(model)
        w_BLV = jnp.asarray(np.random.default_rng(1).normal(size=batch["input_ids"].shape + (c.model.init.vocab_size,)))

        def f(p, ids, w):
            logits = nnx.merge(graphdef, p)(ids)
            return jnp.sum(jax.nn.log_softmax(logits) * w), logits

        ids = sharding.global_batch(batch, mesh)["input_ids"]
        (_, logits), g = jax.jit(jax.value_and_grad(f, has_aux=True))(params, ids, w_BLV)
        return np.asarray(logits), {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(g)}


def test_float64_model_forward_and_backward_match_one_device(setup):
    """RMSNorm and attention keep float64 (jax.nn.dot_product_attention alone would softmax in float32)."""
    c, paired = setup
    batch = paired.batch(0)
    batch = {"input_ids": batch["input_ids"]}
    with jax.enable_x64(True):
        logits1, g1 = _grads((1, 1, 1), c, batch)
        logits8, g8 = _grads(SHARDED, c, batch)
    assert logits1.dtype == np.float64 and all(v.dtype == np.float64 for v in g1.values())
    np.testing.assert_allclose(logits8, logits1, rtol=0, atol=1e-12)
    for k in g1:  # float32 anywhere in the model shows up here as ~1e-7 relative
        scale = np.abs(g1[k]).max()
        np.testing.assert_allclose(g8[k], g1[k], rtol=0, atol=1e-12 * scale, err_msg=str(k))


def _train_losses(shape, c, batches, steps):
    mesh = mesh_of(shape)
    with jax.set_mesh(mesh):
        model = hf.load_model(c.model, seed=0, mesh=mesh)
        graphdef, params = nnx.split(model)
        tx, _ = trainer.make_optimizer(c.train, 20)  # warmup 2 steps: steps 2.. move the parameters
        opt_state, p_sh, o_sh = trainer.init_optimizer(tx, params, mesh)
        step = trainer.make_train_step(graphdef, tx, losses.sftmix_loss_fn(0.2, 0.5, False), 1,
                                     (p_sh, o_sh, sharding.batch_sharding(mesh)))
        out = []
        for i in range(steps):
            b = batches.batch(i)
            b.pop("index")
            params, opt_state, m = step(params, opt_state, sharding.global_batch(b, mesh), jax.random.key(i))
            out.append(np.asarray(m["loss"]))
    return np.array(out), params


def test_float64_sftmix_training_on_a_mesh_matches_one_device(setup):
    c, paired = setup
    with jax.enable_x64(True):
        ref, p1 = _train_losses((1, 1, 1), c, paired, 4)
        assert ref.dtype == np.float64, f"the float64 model's loss is {ref.dtype}"
        got, p8 = _train_losses(SHARDED, c, paired, 4)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(p8))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-12)
