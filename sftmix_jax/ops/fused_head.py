"""Fused linear head + loss: logits one sequence chunk at a time, their gradient taken at once.

NTP and SFTMix's Mixup (after each row's responses are left-aligned) are sums over positions of
a function of that position's logits. So while a chunk's logits [B, c, V] are at hand, the
forward pass can also form d loss / d logits, then this chunk's dh = d @ W^T and its share of
dW, and drop the logits; the backward pass only scales (dh, dW) by the incoming cotangent. No
[B, L, V] logits, probabilities or transposed copies of them stay live for the backward pass and
nothing is recomputed (`python tools/bench.py --kinds head,head_fused` times head + NTP
loss, forward and backward, both ways). `chunk` bounds the live logits to
[B, chunk, V]; each extra chunk costs one read-modify-write of the float32 [D, V] accumulator.

Only response tokens carry loss, so the callers put them first (NTP and the replay forward flatten
each batch shard's rows, responses first; SFTMix left-aligns each row's responses) and pass
`active`: chunks past it, all prompt and padding, never run. The chunk length is then picked per
batch among a few compiled candidates (`pick_chunk`): fewest logits, counting each chunk's fixed
cost. PyTorch + transformers computes the logits of every position.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sftmix_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """The model's output projection, as a Head (call it for logits) that losses can also fuse.

    w: [V, D] if vd (a tied input embedding) else [D, V]; dtype: the compute dtype; softcap:
    Gemma-2's final logit cap, which `call` applies and fused losses take via `capped`.
    """
    w: jax.Array
    vd: bool
    dtype: Any
    call: Callable[[jax.Array], jax.Array]  # h -> logits, the model's own head
    softcap: float | None = None

    def __call__(self, h):
        return self.call(h)

    def capped(self, loss_fn):
        """The per-chunk loss_fn for fused_head_loss, on this head's (soft-capped) logits."""
        return softcapped(loss_fn, self.softcap) if self.softcap else loss_fn


@functools.cache  # one function per (loss_fn, cap): a stable static argument for jit and custom_vjp
def softcapped(loss_fn, cap):
    """loss_fn of cap * tanh(logits / cap), as the model's head; autodiff takes the chain rule."""
    def fn(logits_BcV, xs, consts):
        return loss_fn(jnp.tanh(logits_BcV / cap) * cap, xs, consts)

    return fn


@jax.custom_vjp
def ce_sum(logits_XV, targets, weights):
    """sum_i sum_x weights[i][x] * CE(logits[x], targets[i][x]), in float32 at least.

    Several (targets, weights) pairs share one log-sum-exp (a soft label over two tokens is two
    pairs). The gradient is formed in one elementwise pass, softmax * sum_i w_i - sum_i w_i *
    onehot(t_i), where autodiff of a gather would scatter-add into a zero [X, V] array; the
    softmax comes from the forward's exp(logits - max) and its row sums, not a second exp
    (small NTP step: 0.980x the time).
    """
    return _ce_fwd(logits_XV, targets, weights)[0]


def _ce_fwd(logits_XV, targets, weights):
    logits = logits_XV.astype(jnp.promote_types(logits_XV.dtype, jnp.float32))
    max_X = jnp.max(logits, axis=-1)
    max_X = jnp.where(jnp.isfinite(max_X), max_X, 0.0)  # as jax.nn.logsumexp: rows of -inf stay -inf
    exp_XV = jnp.exp(logits - max_X[..., None])
    sum_X = jnp.sum(exp_XV, axis=-1)
    lse_X = max_X + jnp.log(sum_X)
    total = sum(jnp.sum(w.astype(lse_X.dtype) * (lse_X - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]))
                for t, w in zip(targets, weights))
    # The logits' dtype travels as an empty array (residuals are arrays).
    return total, (exp_XV, sum_X, targets, weights, jnp.zeros((0,), logits_XV.dtype))


def _ce_bwd(res, g):
    exp_XV, sum_X, targets, weights, dtype_of = res
    vocab = jnp.arange(exp_XV.shape[-1])
    d = exp_XV * (sum(w.astype(sum_X.dtype) for w in weights) / sum_X)[..., None]
    for t, w in zip(targets, weights):
        d = d - jnp.where(vocab == t[..., None], w.astype(sum_X.dtype)[..., None], 0.0)
    return (g * d).astype(dtype_of.dtype), None, None


ce_sum.defvjp(_ce_fwd, _ce_bwd)


def _pieces(x, chunk, n):
    """[X, L, ...] -> [n, X, chunk, ...], zero-padded along L (padding carries zero weight)."""
    pad = n * chunk - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 9))
def fused_head_loss(loss_fn, vd, dtype, chunk, h_BLD, w, xs, consts, active=None, precision=None):
    """loss_fn(logits [B, c, V], xs chunk, consts) -> (scalar, aux), summed over the L chunks.

    h_BLD: hidden states; w: the head weight ([V, D] if vd else [D, V]); xs: arrays [X, L, ...]
    cut into chunks along L with h (zero-padded: give padding zero weight); consts: passed whole.
    active: None, or a traced int: positions >= active carry zero weight in every row, so only
    the chunks before it run (a loop with a data-dependent trip count; their loss and aux must be
    zero there). Differentiable in h_BLD and w only. Returns (loss, aux) with aux summed over chunks.
    precision: of the logits matmul (scoring: HIGHEST with dtype float32, which TPU/GPU would otherwise
    run as one bfloat16 / TF32 pass).
    """
    return _fused(loss_fn, vd, dtype, chunk, h_BLD, w, xs, consts, active, grads=False, precision=precision)[0]


MIN_CHUNK_LOGITS = 2**21  # smaller chunks save less than their fixed cost and their compile time


def chunk_sizes(L: int, chunk: int | None, skipping: bool, rows: int, vocab: int) -> list:
    """Candidate chunk lengths: `chunk`; else, when chunks past `active` are skipped, those of
    L/2, L/4, L/8 whose `rows` x c x `vocab` logits reach MIN_CHUNK_LOGITS (the cheapest for each
    batch is chosen at run time, `pick_chunk`; each is compiled, and at most half the logits are
    live at once); else L."""
    if chunk:
        return [min(int(chunk), L)]
    sizes = {-(-L // 2**i) for i in range(1, 4)} if skipping else set()
    return sorted({c for c in sizes if rows * c * vocab >= MIN_CHUNK_LOGITS}, reverse=True) or [L]


def chunk_cost() -> int:
    """Fixed cost of one more chunk in tokens of head work: the read-modify-write of the float32
    [D, V] weight gradient. Measured ~25 on this CPU (SmolLM2's head: ~25 ms per extra chunk, ~1 ms
    per token); estimated, not measured, ~400 on an H100 (2.6 us per token of a 1B Llama's head in
    bfloat16 at ~600 TFLOP/s against a ~1 ms RMW of its 1 GB float32 dW)."""
    return 32 if jax.default_backend() == "cpu" else 512


def pick_chunk(active, sizes, rows, cost):
    """Index into `sizes` of the chunk length computing the fewest logits for the `active`
    positions of `rows` rows, counting `cost` tokens' worth of fixed cost per chunk."""
    return jnp.argmin(jnp.stack([(active + c - 1) // c * (rows * c + cost) for c in sizes]))


def _fused(loss_fn, vd, dtype, chunk, h_BLD, w, xs, consts, active=None, grads=True, w_grad=True, precision=None):
    B, L, D = h_BLD.shape
    # W in its own layout for the logits and dh (a transposed copy would cost D x V more memory
    # and no time); dW accumulates as [D, V], which XLA:CPU computes faster than [V, D].
    w_ = w.astype(dtype)
    w_spec = "VD" if vd else "DV"
    V = w.shape[0] if vd else w.shape[1]
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    acc = jnp.promote_types(dtype, jnp.float32)  # dW accumulates in float32 at least

    def body(dw_DV, piece):
        h_BcD, xs_c = piece
        h_BcD = h_BcD.astype(dtype)
        logits_BcV = constrain(jnp.einsum(f"BcD,{w_spec}->BcV", h_BcD, w_, precision=precision), ("act_batch", None, "act_vocab"))
        if not grads:
            return dw_DV, (loss_fn(logits_BcV, xs_c, consts), None)
        (loss, aux), d_BcV = value_and_grad(logits_BcV, xs_c, consts)
        d_BcV = d_BcV.astype(dtype)
        dh_BcD = jnp.einsum(f"BcV,{w_spec}->BcD", d_BcV, w_)
        if not w_grad:  # a frozen head (LoRA): skip its weight gradient
            return dw_DV, ((loss, aux), dh_BcD)
        dw = jnp.einsum("BcD,BcV->DV", h_BcD, d_BcV, preferred_element_type=acc)
        return (dw if dw_DV is None else dw_DV + dw), ((loss, aux), dh_BcD)

    def chunked(c):  # ((loss, aux), dh_BLD, dw_DV) over chunks of c positions
        n = -(-L // c)
        pieces = (_pieces(h_BLD, c, n), jax.tree.map(lambda x: _pieces(x, c, n), xs))
        dw0 = jnp.zeros((D, V), acc) if grads and w_grad else None
        if n == 1:  # one chunk: no loop, no accumulator
            dw_DV, out = body(None, jax.tree.map(lambda x: x[0], pieces))
            out = jax.tree.map(lambda x: x[None], out)
        elif active is None:
            dw_DV, out = jax.lax.scan(body, dw0, pieces)
        else:  # the chunks before `active` only: the skipped ones keep zero loss, aux and dh
            def step(i, carry):
                dw_DV, out = carry
                dw_DV, o = body(dw_DV, jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, False), pieces))
                return dw_DV, jax.tree.map(lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v, i, 0), out, o)

            shapes = jax.eval_shape(body, dw0, jax.tree.map(lambda x: x[0], pieces))[1]
            out = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), shapes)
            dw_DV, out = jax.lax.fori_loop(0, jnp.clip((active + c - 1) // c, 0, n), step, (dw0, out))
        (loss, aux), dh = out
        result = jax.tree.map(lambda x: jnp.sum(x, axis=0), (loss, aux))
        dh_BLD = None if dh is None else jnp.moveaxis(dh, 0, 1).reshape(B, n * c, D)[:, :L]
        return result, dh_BLD, dw_DV

    sizes = chunk_sizes(L, chunk, active is not None, B, V)
    if len(sizes) == 1:
        result, dh_BLD, dw_DV = chunked(sizes[0])
    else:
        branches = [functools.partial(chunked, c) for c in sizes]
        result, dh_BLD, dw_DV = jax.lax.switch(pick_chunk(active, sizes, B, chunk_cost()), branches)
    if not grads:
        return result, None
    dw = None if dw_DV is None else (dw_DV.T if vd else dw_DV).astype(w.dtype)
    return result, (dh_BLD.astype(h_BLD.dtype), dw)


def _fused_fwd(loss_fn, vd, dtype, chunk, h_BLD, w, xs, consts, active, precision):
    # symbolic_zeros: inputs come wrapped, telling whether each is being differentiated
    value = lambda tree: jax.tree.map(lambda p: p.value, tree)  # noqa: E731
    return _fused(loss_fn, vd, dtype, chunk, value(h_BLD), w.value, value(xs), value(consts), value(active),
                  w_grad=w.perturbed, precision=precision)


def _fused_bwd(loss_fn, vd, dtype, chunk, precision, res, g):
    dh_BLD, dw = res
    g_loss = g[0]  # aux carries no gradient
    dw = None if dw is None else g_loss.astype(dw.dtype) * dw
    return g_loss.astype(dh_BLD.dtype) * dh_BLD, dw, None, None, None


fused_head_loss.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
