"""Sharded runs against the single-device run, on 8 simulated CPU devices."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import mesh_of, tiny_config
from sftmix_jax import hf, losses, sharding
from sftmix_jax.data import batching
from sftmix_jax.stages import confidence
from sftmix_jax.data import sources
from sftmix_jax.ops import fused_head
from sftmix_jax.data import synthetic
from sftmix_jax.ops.fused_head import LinearHead
from sftmix_jax.model.llama import abstract_model
from sftmix_jax import trainer

# (data, fsdp, tensor): each axis alone or with the others; (2, 4, 1) added nothing (2, 2, 2) and
# (1, 4, 2) do not cover, for 16 s of the suite.
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]


@pytest.fixture(scope="module")
def setup():
    c = tiny_config()
    train_ex, _, _ = sources.load_examples(c.data, synthetic.make_tokenizer(), c.seed)
    half = len(train_ex) // 2
    return c, batching.TrainBatches(train_ex, 16, 0, c.data.buckets), batching.PairedBatches(
        train_ex, range(half), range(half, 2 * half), 16, 0, c.data.buckets)


def losses_on(mesh, c, batches, loss_fn, steps=5):
    with jax.set_mesh(mesh):
        model = hf.load_model(c.model, seed=0, mesh=mesh)
        graphdef, params = nnx.split(model)
        tx, _ = trainer.make_optimizer(c.train, 100)
        opt_state, p_sh, o_sh = trainer.init_optimizer(tx, params, mesh)
        step = trainer.make_train_step(graphdef, tx, loss_fn, 1, (p_sh, o_sh, sharding.batch_sharding(mesh)))
        out = []
        for i in range(steps):
            b = batches.batch(i)
            b.pop("index")
            params, opt_state, m = step(params, opt_state, sharding.global_batch(b, mesh), jax.random.key(i))
            out.append(float(m["loss"]))
    return np.array(out), params


@pytest.mark.parametrize("kind", ["ntp", "sftmix"])
def test_losses_match_single_device_on_every_mesh(setup, kind):
    c, ntp_batches, paired = setup
    loss_fn = losses.ntp_loss_fn() if kind == "ntp" else losses.sftmix_loss_fn(0.2, 0.5, False)
    batches = ntp_batches if kind == "ntp" else paired
    ref, _ = losses_on(mesh_of((1, 1, 1)), c, batches, loss_fn)
    assert ref[-1] < ref[0]
    for shape in MESHES:
        got, _ = losses_on(mesh_of(shape), c, batches, loss_fn)
        np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=f"mesh {shape}")


def test_head_on_response_tokens_only_matches_one_device(monkeypatch):
    """The fused head run on each batch shard's response tokens only, in the shortest chunks (so
    the chunk loops run), batch- and vocabulary-sharded: NTP + SFTMix loss and gradients equal
    the single-device ones."""
    monkeypatch.setattr(fused_head, "chunk_cost", lambda: 0)
    monkeypatch.setattr(fused_head, "MIN_CHUNK_LOGITS", 0)
    rng = np.random.default_rng(0)
    B, L, D, V = 8, 24, 16, 32
    h, W = rng.normal(size=(B, L, D)).astype(np.float32), rng.normal(size=(D, V)).astype(np.float32)
    t = rng.integers(0, V, (B, L)).astype(np.int32)
    w = np.zeros((B, L), np.float32)
    for b in range(B):
        start = rng.integers(0, L)
        w[b, start:rng.integers(start, L + 1)] = 1.0

    def loss(h, W, t, w):
        head = LinearHead(W, False, np.dtype(np.float32), lambda x: x @ W)
        ntp = losses.ntp_loss(h, head, t, w)[0]
        return ntp + losses.sftmix_loss(h, head, t, w, jax.random.key(1), mu=0.5, per_pair=True)[0]

    ref = jax.jit(jax.value_and_grad(loss, (0, 1)))(h, W, t, w)
    for shape in [(8, 1, 1), (2, 2, 2)]:
        mesh = mesh_of(shape)
        with jax.set_mesh(mesh):
            rows = sharding.named_sharding(mesh, ("act_batch",))
            args = (jax.device_put(h, rows), jax.device_put(W, sharding.named_sharding(mesh, ("embed", "vocab"))),
                    jax.device_put(t, rows), jax.device_put(w, rows))
            got = jax.jit(jax.value_and_grad(loss, (0, 1)))(*args)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=f"mesh {shape}")


def test_parameters_are_sharded_as_the_rules_say(setup):
    c = setup[0]
    mesh = mesh_of((1, 4, 2))
    model = hf.load_model(c.model, seed=0, mesh=mesh)
    expect = {
        ("embed",): P("tensor", "fsdp"),  # [vocab, embed]
        ("layers", 0, "attn", "q", "kernel"): P("fsdp", "tensor", None),  # [embed, heads, head_dim]
        ("layers", 0, "attn", "k", "kernel"): P("fsdp", "tensor", None),  # [embed, kv_heads, head_dim]
        ("layers", 0, "attn", "o", "kernel"): P("tensor", None, "fsdp"),  # [heads, head_dim, embed]
        ("layers", 1, "mlp", "down", "kernel"): P("tensor", "fsdp"),  # [mlp, embed]
        ("norm", "scale"): P(None),
    }
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for path, spec in expect.items():
        value = flat[path].get_value()
        assert value.sharding.spec == spec, path
        shard = value.addressable_shards[0].data.shape
        sizes = {"fsdp": 4, "tensor": 2}
        assert shard == tuple(n // sizes.get(a, 1) for n, a in zip(value.shape, list(spec) + [None] * 3)), path
    # optimizer state follows the parameters
    tx, _ = trainer.make_optimizer(c.train, 10)
    opt_state, _, _ = trainer.init_optimizer(tx, nnx.state(model), mesh)
    mu = dict(nnx.to_flat_state(opt_state[1][0].mu))
    assert mu[("layers", 0, "attn", "q", "kernel")].get_value().sharding.spec == P("fsdp", "tensor", None)


def test_checkpoint_restores_on_another_mesh_and_replays_the_same(workdir, tmp_path):
    """The pipeline fixture trained on 8 devices (data=8); replay here on 4 devices as (1, 2, 2)."""
    c = tiny_config()
    train_ex, _, _ = sources.load_examples(c.data, synthetic.make_tokenizer(), c.seed)
    steps = json.load(open(os.path.join(workdir, "reference", "done.json")))["replay_steps"]
    with jax.set_mesh(mesh_of((1, 2, 2))):
        perp = confidence.replay(os.path.join(workdir, "reference", "checkpoints"), steps, train_ex,
                                 abstract_model(hf.model_config(c.model)), 32, c.data.buckets, 256, cache_dir=str(tmp_path), mesh=mesh_of((1, 2, 2)))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "confidence", "scores.jsonl"))]
    np.testing.assert_allclose(perp.T, [r["perplexity"] for r in rows], rtol=1e-4)


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"2\*2\*3 = 12 but there are 8 devices"):
        sharding.mesh_shape(2, 2, 3, 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape(-1, -1, 1, 8)
    assert sharding.mesh_shape(-1, 4, 2, 8) == (1, 4, 2)
    assert sharding.logical_to_spec(("act_batch", None, "act_vocab"), ("data", "fsdp", "tensor")) == P(("data", "fsdp"), None, "tensor")
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("nonsense",))


def test_splash_attention_matches_blocked_on_one_device_and_on_meshes():
    """model.attention='splash' (the Pallas TPU kernel; Pallas interpret mode here) under
    shard_map: loss and gradients equal the blocked XLA path's, unsharded and on meshes that
    split the batch (data, fsdp) and the heads (tensor)."""
    import dataclasses

    from sftmix_jax.model.llama import ModelConfig, init_model

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    ids = jax.random.randint(jax.random.key(0), (4, 256), 0, 64)

    def loss_and_grads(attention, shape=None):
        graphdef, params = nnx.split(init_model(dataclasses.replace(cfg, attention=attention)))
        fn = jax.jit(jax.value_and_grad(lambda p: jax.numpy.mean(
            jax.nn.log_softmax(nnx.merge(graphdef, p)(ids))[..., 0])))
        if shape is None:
            return fn(params)
        with jax.set_mesh(mesh_of(shape)):
            return fn(params)

    ref_loss, ref_grads = loss_and_grads("blocked")
    for shape in (None, (2, 2, 2), (1, 2, 2)):
        loss, grads = loss_and_grads("splash", shape)
        assert abs(float(loss) - float(ref_loss)) < 1e-6, shape
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=f"mesh {shape}")
    model = init_model(dataclasses.replace(cfg, attention="splash"))
    with pytest.raises(ValueError, match="splash attention needs the sequence length to be a multiple of 128, got 100"):
        model(ids[:, :100])
