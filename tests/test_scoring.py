"""Exact scoring: the replay / held-out head and NLL in float32 whatever the model's compute dtype."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from sftmix_jax import checkpoints, hf, losses, scoring
from sftmix_jax.data import sources, synthetic
from sftmix_jax.data.batching import eval_batches
from sftmix_jax.model.llama import abstract_model
from sftmix_jax.ops import cpu
from sftmix_jax.stages import confidence


def _setup(workdir, dtype):
    c = tiny_config(**{"model.dtype": dtype})
    train_ex, _, _ = sources.load_examples(c.data, synthetic.make_tokenizer(), c.seed)
    steps = json.load(open(os.path.join(workdir, "reference", "done.json")))["replay_steps"]
    return c, train_ex, steps, os.path.join(workdir, "reference", "checkpoints")


def _numpy_row_nll(h_BLD, w_VD, targets_BL, weights_BL):
    """Per-row sum of weights * NLL, the tied head and log-softmax in float64."""
    logits_BLV = np.asarray(h_BLD, np.float64) @ np.asarray(w_VD, np.float64).T
    top_BL1 = logits_BLV.max(-1, keepdims=True)
    lse_BL = np.log(np.exp(logits_BLV - top_BL1).sum(-1)) + top_BL1[..., 0]
    nll_BL = lse_BL - np.take_along_axis(logits_BLV, targets_BL[..., None], -1)[..., 0]
    return np.where(weights_BL > 0, weights_BL * nll_BL, 0.0).sum(-1)


def _last_reference(workdir, dtype):
    """(the reference run's last checkpoint as a model computing in `dtype`, config, training examples)."""
    c, train_ex, steps, ckpt_dir = _setup(workdir, dtype)
    graphdef, abstract = nnx.split(abstract_model(hf.model_config(c.model)))
    return nnx.merge(graphdef, checkpoints.restore_params(ckpt_dir, steps[-1], abstract)), c, train_ex


@pytest.fixture(scope="module")
def bf16_model(workdir):
    return _last_reference(workdir, "bfloat16")


def test_bf16_model_scores_hidden_states_exactly(bf16_model):
    """Given a bfloat16 model's hidden states, its per-row NLL is float64 NumPy's to float32 rounding.

    Measured (tiny run, last reference checkpoint, 16 rows): max relative error
    2.2e-7 (the compute-dtype head, exact=False: 5.2e-3, 0.014 absolute). The head weight is a
    constant here; where it is traced, XLA:CPU may drop its float32 -> bfloat16 -> float32 round
    trip (excess precision), so the dtype test below is what pins the path down on any backend.
    """
    model, c, train_ex = bf16_model
    batch = next(eval_batches(train_ex[-40:], 16, c.data.buckets))
    h_BLD = jax.jit(lambda ids: model.hidden(ids))(jnp.asarray(batch["input_ids"]))
    assert h_BLD.dtype == jnp.bfloat16
    head = model.linear_head()
    score = jax.jit(lambda h, t, w: losses.response_nll(h, head, t, w))  # the head is no pytree: closed over
    nll_B = score(h_BLD, jnp.asarray(batch["targets"]), jnp.asarray(batch["weights"]))
    ref_B = _numpy_row_nll(h_BLD, head.w, batch["targets"], batch["weights"])
    assert nll_B.dtype == jnp.float32 and ref_B.min() > 1.0
    np.testing.assert_allclose(np.asarray(nll_B), ref_B, rtol=2e-6)


def _head_dots(jaxpr, V):
    """Every dot_general (at any depth) producing a vocabulary axis: the head's matmuls."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1:] == (V,):
            yield eqn
        for param in eqn.params.values():  # scan, fori_loop, switch, pjit bodies
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _head_dots(sub, V)


def test_scoring_forward_runs_the_head_in_float32_at_highest_precision(bf16_model):
    """The replay's jitted forward: the body may be bfloat16, the head's matmul is not, on any backend."""
    model, c, train_ex = bf16_model
    graphdef, state = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in next(eval_batches(train_ex[:8], 8, c.data.buckets)).items()
             if k in ("input_ids", "targets", "weights")}
    jaxpr = jax.make_jaxpr(lambda s, b: scoring.nll_forward(graphdef, s, b))(state, batch).jaxpr
    dots = list(_head_dots(jaxpr, model.cfg.vocab_size))
    assert dots
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.float32] * 2, eqn
        assert eqn.params["precision"] in ((jax.lax.Precision.HIGHEST,) * 2, jax.lax.Precision.HIGHEST), eqn


def test_scoring_jits_its_body_and_head_apart_each_in_its_cpu_library(workdir):
    """score_batch: a wide model's body compiled with Eigen's matmuls, a narrow one's and every head
    with YNNPACK's (ops/cpu.py), and either way the scores of nll_forward in one jit (float32)."""
    model, c, train_ex = _last_reference(workdir, "float32")
    graphdef, state = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in next(eval_batches(train_ex[:8], 8, c.data.buckets)).items()
             if k in ("input_ids", "targets", "weights")}
    assert [cpu.forward_body_kind(d) for d in (96, 256, 576, 2048)] == ["forward"] * 2 + ["forward_body"] * 2
    want = jax.jit(scoring.nll_forward, static_argnums=0)(graphdef, state, batch)
    (one,) = scoring._jitted(cpu.forward_body_kind(model.cfg.hidden_size))  # narrow: one jit, YNNPACK
    assert "ynn" in one.lower(graphdef, state, batch).compile().as_text()
    body, head = scoring._jitted(cpu.forward_body_kind(cpu.EIGEN_BODY_FROM))
    assert "ynn" not in body.lower(graphdef, state, batch).compile().as_text()
    assert "ynn" in head.lower(graphdef, state, body(graphdef, state, batch), batch).compile().as_text()
    for width in (model.cfg.hidden_size, cpu.EIGEN_BODY_FROM):
        for got, ref in zip(scoring.score_batch(graphdef, state, batch, width), want):
            np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_bf16_replay_gives_the_float32_split(workdir, tmp_path):
    """Replaying the reference checkpoints with a bfloat16 body leaves the median split as float32's.

    Measured on the tiny run (3 checkpoints, 160 examples; XLA:CPU): mean |NLL_bf16 - NLL_f32|
    3.2e-4 per example and checkpoint (max 1.5e-3), Spearman rho of the confidences 1.0 to 8
    digits, 0 examples changing halves (the closest example is 0.87 perplexity from the median).
    """
    perp = {}
    for dtype in ("float32", "bfloat16"):
        (tmp_path / dtype).mkdir()
        c, train_ex, steps, ckpt_dir = _setup(workdir, dtype)
        perp[dtype] = confidence.replay(ckpt_dir, steps, train_ex, abstract_model(hf.model_config(c.model)),
                                        c.confidence.batch_size, c.data.buckets, 0, str(tmp_path / dtype))
    nll_diff_CE = np.abs(np.log(perp["bfloat16"]) - np.log(perp["float32"]))
    assert 0 < nll_diff_CE.mean() < 1e-3 and nll_diff_CE.max() < 5e-3
    conf32_E, conf16_E = -perp["float32"].mean(0), -perp["bfloat16"].mean(0)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(ranks(conf32_E), ranks(conf16_E))[0, 1] > 0.9999
    (conf32, unconf32, _), (conf16, unconf16, _) = confidence.median_split(conf32_E), confidence.median_split(conf16_E)
    assert np.array_equal(conf32, conf16) and np.array_equal(unconf32, unconf16)
