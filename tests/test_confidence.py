"""Confidence replay against an independent recomputation, and the split."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from sftmix_jax import hf
from sftmix_jax.data import batching
from sftmix_jax.stages import confidence
from sftmix_jax.data import sources, synthetic
from sftmix_jax.model.llama import abstract_model
from sftmix_jax.data.split import load_split
from sftmix_jax import checkpoints


@pytest.fixture(scope="module")
def scores(workdir):
    with open(os.path.join(workdir, "confidence", "scores.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_confidence_is_minus_mean_perplexity_recomputed(workdir, scores):
    """Restore each checkpoint, run one example at a time unpadded, NumPy log-softmax."""
    c = tiny_config()
    train_ex, _, _ = sources.load_examples(c.data, synthetic.make_tokenizer(), c.seed)
    steps = json.load(open(os.path.join(workdir, "reference", "done.json")))["replay_steps"]
    graphdef, abstract = nnx.split(abstract_model(hf.model_config(c.model)))
    picks = [0, 7, 77, len(train_ex) - 1]
    perps = np.zeros((len(steps), len(picks)))
    for ci, step in enumerate(steps):
        model = nnx.merge(graphdef, checkpoints.restore_params(os.path.join(workdir, "reference", "checkpoints"), step, abstract))
        for j, i in enumerate(picks):
            ex = train_ex[i]
            logits = np.asarray(model(jnp.asarray(ex.input_ids[None])), np.float64)[0]
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            resp = np.flatnonzero(ex.loss_mask)  # positions of response tokens; predicted from t-1
            nll = -np.mean([logp[t - 1, ex.input_ids[t]] for t in resp])
            perps[ci, j] = np.exp(nll)
    for j, i in enumerate(picks):
        row = scores[i]
        assert row["id"] == train_ex[i].id
        np.testing.assert_allclose(row["perplexity"], perps[:, j], rtol=1e-4)
        np.testing.assert_allclose(row["confidence"], -perps[:, j].mean(), rtol=1e-4)
        np.testing.assert_allclose(row["variability"], perps[:, j].std(), rtol=1e-3)


def test_halves_are_equal_disjoint_and_split_at_the_median(scores):
    conf = np.array([r["confidence"] for r in scores])
    split = np.array([r["split"] for r in scores])
    c, u = conf[split == "confident"], conf[split == "unconfident"]
    assert len(c) == len(u) == len(scores) // 2
    assert c.min() >= u.max()
    assert len({r["id"] for r in scores}) == len(scores)


def test_odd_count_drops_the_median_example():
    conf = np.array([-3.0, -1.0, -2.0, -5.0, -4.0])
    confident, unconfident, dropped = confidence.median_split(conf)
    assert confident.tolist() == [1, 2] and unconfident.tolist() == [3, 4] and dropped.tolist() == [0]


def test_random_split_control(workdir, scores):
    c = tiny_config()
    train_ex, _, _ = sources.load_examples(c.data, synthetic.make_tokenizer(), c.seed)
    d = os.path.join(workdir, "confidence")
    conf_c, conf_u = load_split(d, train_ex, "confidence")
    rand_c, rand_u = load_split(d, train_ex, "random", seed=0)
    assert len(rand_c) == len(conf_c) and len(rand_u) == len(conf_u)
    assert not set(rand_c) & set(rand_u)
    assert set(rand_c) | set(rand_u) == set(conf_c) | set(conf_u)
    assert set(rand_c) != set(conf_c)
    again = load_split(d, train_ex, "random", seed=0)
    assert np.array_equal(again[0], rand_c)
    with pytest.raises(ValueError, match="does not match the training set"):
        load_split(d, train_ex[:-1], "confidence")


def test_sftmix_batches_hold_half_of_each(workdir):
    c = tiny_config()
    train_ex, _, _ = sources.load_examples(c.data, synthetic.make_tokenizer(), c.seed)
    conf_c, conf_u = load_split(os.path.join(workdir, "confidence"), train_ex)
    batches = batching.PairedBatches(train_ex, conf_c, conf_u, 16, 0, c.data.buckets)
    for step in range(batches.steps_per_epoch + 2):
        rows = batches.batch(step)["index"]
        assert set(rows[0::2]) <= set(conf_c) and set(rows[1::2]) <= set(conf_u)
