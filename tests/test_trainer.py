"""Train step pieces: schedule, decay mask, gradient accumulation, Mixup gradients."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from sftmix_jax.model.llama import ModelConfig, init_model
from sftmix_jax import checkpoints, losses, trainer

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
OPT = ml_collections.ConfigDict(dict(lr=1e-2, min_lr_ratio=0.1, warmup_ratio=0.1, weight_decay=0.1,
                                     grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8))


def make_batch(B=8, L=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, (B, L)).astype(np.int32)
    weights = np.zeros((B, L), np.float32)
    for b in range(B):
        start, end = rng.integers(2, 6), rng.integers(7, L)
        weights[b, start:end] = 1
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int32)], 1)
    return {"input_ids": ids, "targets": targets, "weights": weights, "attention_mask": np.ones_like(ids),
            "index": np.arange(B, dtype=np.int32)}


def test_schedule_warms_up_then_decays():
    _, schedule = trainer.make_optimizer(OPT, 100)
    assert float(schedule(0)) == 0.0
    assert abs(float(schedule(10)) - 1e-2) < 1e-9
    assert abs(float(schedule(100)) - 1e-3) < 1e-9
    assert float(schedule(50)) < float(schedule(20))


def test_norms_and_biases_are_not_decayed():
    model = init_model(CFG)
    _, params = nnx.split(model)
    tx, _ = trainer.make_optimizer(OPT.copy_and_resolve_references(), 10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    opt_state = tx.init(params)
    for _ in range(3):  # past step 0, where the warmup learning rate is 0
        updates, opt_state = tx.update(zero_grads, opt_state, params)
    flat = dict(nnx.to_flat_state(updates))
    assert np.all(np.asarray(flat[("norm", "scale")].get_value()) == 0)  # no decay on the norm
    assert np.any(np.asarray(flat[("layers", 0, "mlp", "up", "kernel")].get_value()) != 0)  # decayed


def test_replay_steps_are_evenly_spaced_and_end_at_the_end():
    assert checkpoints.replay_steps(100, 3) == [33, 67, 100]
    assert checkpoints.replay_steps(10, 5) == [2, 4, 6, 8, 10]


@pytest.mark.parametrize("kind", ["ntp", "sftmix", "sftmix_per_pair", "mixup_only"])
def test_gradient_accumulation_equals_the_whole_batch(kind):
    """SFTMIX.md's loss is a token mean over the batch with one lambda per batch (per pair: drawn
    once for the batch): grad_accum=2 gives the loss, metrics and gradients of grad_accum=1."""
    model = init_model(CFG)
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    assert len({float(batch["weights"][:4].sum()), float(batch["weights"][4:].sum())}) == 2  # unequal halves
    loss_fn = {"ntp": losses.ntp_loss_fn(), "sftmix": losses.sftmix_loss_fn(0.2, 0.5, False),
               "sftmix_per_pair": losses.sftmix_loss_fn(0.2, 0.5, True),
               "mixup_only": losses.sftmix_loss_fn(1.0, 0.5, True, ntp=False)}[kind]
    tx = optax.sgd(1.0)  # the update is -grad: compares gradients directly
    out = {}
    for accum in (1, 2):
        copy = jax.tree.map(jnp.array, params)
        step = trainer.make_train_step(graphdef, tx, loss_fn, accum=accum)
        out[accum] = step(copy, tx.init(copy), batch, jax.random.key(3))
    (p1, _, m1), (p2, _, m2) = out[1], out[2]
    assert set(m1) == set(m2)
    for k in m1:
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_micro_batches_keep_pairs():
    batch = {"index": jnp.arange(8)}  # pair k = rows (2k, 2k+1)
    micro = trainer.split_micro(batch, 2)["index"]
    assert micro.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_mixup_gradients_reach_the_transformer_layers():
    model = init_model(CFG)
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items() if k != "index"}
    mixup_only = losses.sftmix_loss_fn(mu=1.0, alpha=0.5, per_pair=False, ntp=False)
    grads = jax.grad(lambda p: mixup_only(nnx.merge(graphdef, p), batch, jax.random.key(1))[0])(params)
    flat = dict(nnx.to_flat_state(grads))
    for path in [("layers", 0, "attn", "q", "kernel"), ("layers", 1, "mlp", "down", "kernel"), ("embed",)]:
        assert float(jnp.abs(flat[path].get_value()).max()) > 0, path


def test_remat_gives_the_same_loss_and_gradients():
    import dataclasses

    batch = {k: jnp.asarray(v) for k, v in make_batch().items() if k != "index"}
    loss_fn = losses.sftmix_loss_fn(0.2, 0.5, False)
    results = []
    for policy in ("none", "full", "dots"):
        graphdef, params = nnx.split(init_model(dataclasses.replace(CFG, remat=policy)))
        results.append(jax.jit(jax.value_and_grad(
            lambda p: loss_fn(nnx.merge(graphdef, p), batch, jax.random.key(0))[0]))(params))
    for loss, grads in results[1:]:
        assert abs(float(loss) - float(results[0][0])) < 1e-6
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


class PoisonedBatches:
    """Four rows of a fixed batch; step 3's weights are NaN, so its loss is not finite."""

    steps_per_epoch = 100

    def batch(self, step):
        b = make_batch(B=4, seed=step)
        if step == 3:
            b["weights"] = b["weights"] * np.nan
        return b


def run_poisoned(tmp_path, skip):
    cfg = OPT.copy_and_resolve_references()
    cfg.update(dict(grad_accum=1, save_every=2, eval_every=0, log_every=1, keep_latest=5,
                    eval_batch_size=4, skip_nonfinite=skip))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    return trainer.train(str(tmp_path), init_model(CFG), PoisonedBatches(), [], losses.ntp_loss_fn(), cfg,
                       mesh=mesh, seed=0, total_steps=6, desc="poisoned")[0]


def test_nonfinite_loss_stops_naming_step_and_rows(tmp_path):
    import pytest

    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 4; example rows of the batch: \[0, 1, 2, 3\]"):
        run_poisoned(tmp_path, skip=False)
    # the last good checkpoint (step 2) is there, nothing later
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2]


def test_nonfinite_batches_can_be_skipped_and_counted(tmp_path):
    model = run_poisoned(tmp_path, skip=True)
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(bool(jnp.isfinite(x).all()) for x in leaves)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "skipped_total" in r] == [4]


class CleanBatches(PoisonedBatches):
    def batch(self, step):
        return make_batch(B=4, seed=step)


def run_clean(tmp_path, steps):
    cfg = OPT.copy_and_resolve_references()
    cfg.update(dict(grad_accum=1, save_every=2, eval_every=0, log_every=1, keep_latest=5, eval_batch_size=4))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    return trainer.train(str(tmp_path), init_model(CFG), CleanBatches(), [], losses.ntp_loss_fn(), cfg,
                       mesh=mesh, seed=0, total_steps=steps, desc="clean")[0]


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    straight = nnx.state(run_clean(tmp_path / "straight", 6))
    run_clean(tmp_path / "broken", 6)  # checkpoints 2, 4, 6: drop 6, corrupt 4, expect a restart from 2
    import shutil

    shutil.rmtree(tmp_path / "broken" / "checkpoints" / "6")
    for f in (tmp_path / "broken" / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file():  # truncate every data and metadata file of the newest checkpoint
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
    with caplog.at_level("WARNING"):
        resumed = nnx.state(run_clean(tmp_path / "broken", 6))
    assert "checkpoint 4 is unreadable" in caplog.text and "falling back" in caplog.text
    assert any(d.startswith("4.unreadable") for d in os.listdir(tmp_path / "broken" / "checkpoints"))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
