"""Sampling with a KV cache: greedy, temperature and top-p, one jitted loop (the chat CLI:
sftmix_jax/cli/generate.py).

Prompts are left-padded to a common length (rounded up to a multiple of `pad_to`, so a few
shapes cover many prompts); the cache holds prompt + new tokens.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _sample(logits_BV, rng, temperature, top_p):
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BV, -1)
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    # top-p: keep the smallest set of tokens whose probability reaches top_p
    sorted_BV = jnp.sort(scaled_BV, -1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, -1), -1)
    cutoff_idx_B = jnp.sum(cum_BV < top_p, -1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_idx_B, -1)
    scaled_BV = jnp.where(scaled_BV < cutoff_B1, -jnp.inf, scaled_BV)
    sampled_B = jax.random.categorical(rng, scaled_BV, -1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(graphdef, state, ids_BP, mask_BP, rng, temperature, top_p, *, max_new_tokens):
    model = nnx.merge(graphdef, state)
    B, P = ids_BP.shape
    cache = model.init_cache(B, P + max_new_tokens)
    mask_BS = jnp.concatenate([mask_BP, jnp.ones((B, max_new_tokens), mask_BP.dtype)], 1)
    pos_BP = jnp.maximum(jnp.cumsum(mask_BP, -1) - 1, 0)
    h_BPD, cache = model.hidden(ids_BP, mask_BS, pos_BP, cache, 0)
    rng, key = jax.random.split(rng)
    tok_B = _sample(model.head(h_BPD[:, -1]), key, temperature, top_p)
    out_BO = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(tok_B)

    def step(i, carry):
        tok_B, cache, out_BO, rng = carry
        pos_B1 = (pos_BP[:, -1] + i)[:, None]
        h_B1D, cache = model.hidden(tok_B[:, None], mask_BS, pos_B1, cache, P + i - 1)
        rng, key = jax.random.split(rng)
        tok_B = _sample(model.head(h_B1D[:, 0]), key, temperature, top_p)
        return tok_B, cache, out_BO.at[:, i].set(tok_B), rng

    return jax.lax.fori_loop(1, max_new_tokens, step, (tok_B, cache, out_BO, rng))[2]


def generate(model, prompts, max_new_tokens, eos_id=None, pad_id=0, temperature=0.0, top_p=1.0,
             seed=0, batch_size=16, pad_to=16):
    """New tokens for each prompt (lists of ids), cut after the first EOS (EOS excluded)."""
    graphdef, state = nnx.split(model)
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        P = -(-max(len(p) for p in chunk) // pad_to) * pad_to
        ids = np.full((batch_size, P), pad_id, np.int32)  # fixed batch: one compiled shape
        mask = np.zeros((batch_size, P), np.int32)
        for row, p in enumerate(chunk):
            ids[row, P - len(p):], mask[row, P - len(p):] = p, 1
        mask[len(chunk):, -1] = 1  # filler rows: one real token so nothing is fully masked
        out = _generate(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed + start),
                        jnp.float32(temperature), jnp.float32(top_p), max_new_tokens=max_new_tokens)
        for row in np.asarray(out)[: len(chunk)].tolist():
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            results.append(row)
    return results
