"""SFTMix losses: next-token prediction (NTP) and the response-aligned Mixup regulariser.

Shape letters (sftmix_jax/__init__.py): M = B/2 pairs, A aligned response slots, R batch shards.
Batch contract: targets_BL[b, t] is the token position t predicts; weights_BL is 1.0 exactly on
response targets (prompts/padding 0). Pairs are adjacent rows: pair k = (row 2k confident,
row 2k+1 unconfident), so any contiguous split of the batch (hosts, devices, micro-batches)
keeps pairs whole. See /work/shared/SFTMIX.md, "Stage 3".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sftmix_jax.ops.fused_head import LinearHead, ce_sum, fused_head_loss
from sftmix_jax.sharding import batch_shards

def cross_entropy(logits_V: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token NLL, logsumexp(logits) - logits[target], in float32 at least (logits may be bf16)."""
    logits_V = logits_V.astype(jnp.promote_types(logits_V.dtype, jnp.float32))
    lse = jax.nn.logsumexp(logits_V, axis=-1)  # stable: subtracts the max internally
    tgt = jnp.take_along_axis(logits_V, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - tgt


def _ntp_piece(logits_BcV, xs, consts):
    (targets, weights), (scale,) = xs, consts
    total = ce_sum(logits_BcV, (targets,), (weights,))
    return scale * total, total


def ntp_loss(h_BLD, head: LinearHead, targets_BL, weights_BL, chunk: int | None = None, total=None):
    """Token-mean NLL over all response tokens of the batch (plain SFT loss).

    The head runs fused with the loss (ops/fused_head.py), on the response tokens only
    (`responses_first`); `chunk` bounds the live logits. (tests/references.py: the same loss with
    the head differentiated through, the reference this one is tested against.) total: the whole
    batch's response tokens when this is one micro-batch of it (the sum over micro-batches is
    then the batch's token mean).
    """
    count = jnp.sum(weights_BL.astype(jnp.float32))
    scale = jax.lax.stop_gradient(1.0 / jnp.maximum(count if total is None else total, 1.0))
    h_RTD, weights_RT, targets_RT, active = responses_first(h_BLD, weights_BL, targets_BL)
    rows = h_RTD.shape[1] // h_BLD.shape[1]
    loss, _ = fused_head_loss(head.capped(_ntp_piece), head.vd, head.dtype, chunk and rows * chunk, h_RTD, head.w,
                              (targets_RT, weights_RT), (scale,), active)
    return loss, {"ntp_loss": loss, "tokens": count}


def responses_first(h_BLD, weights_BL, *xs_BL):
    """Each batch shard's rows as one row of T = (B/R) L tokens, its response tokens first, in order.

    Returns (h_RTD, weights_RT, *xs_RT, active): `active` = the most response tokens of any shard,
    so the fused head runs on those only (chunks past it are skipped). permute_rows' gradient
    puts dh back in place. R = the mesh's batch shards: no token leaves its device.
    """
    B, L = weights_BL.shape
    R = batch_shards()
    R = R if B % R == 0 else B
    flat = lambda x: x.reshape(R, B // R * L, *x.shape[2:])  # noqa: E731
    idx_RT, count_R, _ = response_order(flat(weights_BL))
    rest = [jnp.take_along_axis(flat(x), idx_RT, axis=1) for x in (weights_BL, *xs_BL)]
    return permute_rows(flat(h_BLD), idx_RT), *rest, jnp.max(count_R)


def _row_nll_piece(logits_RcV, xs, consts, rows):
    targets, weights, row = xs
    # where(), not a product: a NaN at a padding position must not reach its row's sum
    nll_Rc = jnp.where(weights > 0, weights * cross_entropy(logits_RcV, targets), 0.0)
    # a float32 sum per row: an einsum with a one-hot would run at default precision (bf16 on TPU)
    nll_Rcr = jnp.where(row[..., None] == jnp.arange(rows), nll_Rc[..., None], 0.0)
    return jnp.sum(nll_Rc), jnp.sum(nll_Rcr, axis=1)


def response_nll(h_BLD, head: LinearHead, targets_BL, weights_BL, exact: bool = True,
                 segment_ids_BL=None, segments: int = 1):
    """Per-row sum of weights * NLL [B], forward only: the head on response tokens only, fused.

    exact: the head matmul in float32 at HIGHEST precision whatever the compute dtype (h_BLD and
    the head weight upcast), so a bfloat16 model's scores are not moved by its head's rounding
    (issue 20: ~0.01-0.03 in mean NLL, enough to move examples across the median split); else
    in the compute dtype, as the training losses run it. The body stays in the compute dtype.
    segment_ids_BL (packed rows, examples 1..segments): per-example sums [B, segments] instead.
    """
    B, L, _ = h_BLD.shape
    Z = 1 if segment_ids_BL is None else segments
    # each (row, example) its own sum: group b * Z + z, where the where() below zeroes padding
    z_BL = 0 if segment_ids_BL is None else jnp.maximum(segment_ids_BL - 1, 0)
    group_BL = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None] * Z + z_BL, (B, L))
    h_RTD, weights_RT, targets_RT, group_RT, active = responses_first(h_BLD, weights_BL, targets_BL, group_BL)
    groups = h_RTD.shape[1] // L * Z  # rows per shard x examples per row
    piece = functools.partial(_row_nll_piece, rows=groups)
    dtype, precision = (jnp.promote_types(head.dtype, jnp.float32), jax.lax.Precision.HIGHEST) if exact else (head.dtype, None)
    _, nll_Rr = fused_head_loss(head.capped(piece), head.vd, dtype, None, h_RTD, head.w,
                                (targets_RT, weights_RT, group_RT % groups), (), active, precision)
    return nll_Rr.reshape(B) if segment_ids_BL is None else nll_Rr.reshape(B, Z)


def response_counts(weights_BL, max_tokens: int | None = None):
    """(count_B, A): response tokens per row, clipped to A = max_tokens or L (Mixup truncates
    responses longer than A)."""
    L = weights_BL.shape[1]
    A = L if max_tokens is None else int(max_tokens)
    if not 0 < A <= L:
        raise ValueError(f"max_tokens must be in [1, L={L}], got {max_tokens}")
    return jnp.minimum(jnp.sum(weights_BL > 0, axis=1, dtype=jnp.int32), A), A


def response_order(weights_BL, max_tokens: int | None = None):
    """(idx_BL, count_B, A): each row's positions with its response positions first, in order, and
    `response_counts`. A stable argsort of (not-response) keeps the response positions in their
    original order, so multi-turn responses concatenate in order."""
    count_B, A = response_counts(weights_BL, max_tokens)
    idx_BL = jnp.argsort(jnp.logical_not(weights_BL > 0).astype(jnp.int32), axis=1, stable=True)
    return idx_BL, count_B, A


def pair_slots(count_B, A: int):
    """(valid_MA, count): pair k mixes its aligned slots n < m_k = min(count_c, count_u)."""
    shared_M = jnp.minimum(count_B[0::2], count_B[1::2])
    return (jnp.arange(A)[None, :] < shared_M[:, None]).astype(jnp.float32), jnp.sum(shared_M).astype(jnp.float32)


def mix_pairs(logits_BAV, lam):
    """lam * logits[2k] + (1 - lam) * logits[2k+1] -> [M, A, V], in float32 at least; lam [M] (one
    per row pair) or [M, A] (one per position).

    Weighted over a [M, 2, A, V] pair axis: its gradient is one broadcast multiply, where the
    strided row slices [0::2] / [1::2] would each pad back to full [B, A, V] and be added.
    """
    M, A = logits_BAV.shape[0] // 2, logits_BAV.shape[1]
    acc = jnp.promote_types(logits_BAV.dtype, jnp.float32)
    lam_MA = jnp.broadcast_to(lam.reshape(M, -1), (M, A))
    lam_M2A = jnp.stack([lam_MA, 1.0 - lam_MA], axis=1)
    logits_M2AV = logits_BAV.reshape(M, 2, *logits_BAV.shape[1:]).astype(acc)
    return jnp.einsum("MsAV,MsA->MAV", logits_M2AV, lam_M2A, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def permute_rows(x_BLV, idx_BL):
    """x_BLV[b, idx_BL[b, l]] for a permutation idx_BL of each row's L positions.

    The gradient is the inverse permutation, a gather too: XLA's default transpose of a gather
    is a scatter-add, slow on CPU at vocabulary width.
    """
    return jnp.take_along_axis(x_BLV, idx_BL[:, :, None], axis=1)


def _permute_fwd(x_BLV, idx_BL):
    return permute_rows(x_BLV, idx_BL), idx_BL


def _permute_bwd(idx_BL, g_BLV):
    inverse_BL = jnp.argsort(idx_BL, axis=1)
    return jnp.take_along_axis(g_BLV, inverse_BL[:, :, None], axis=1), None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def _num_pairs(B: int) -> int:
    if B % 2:
        raise ValueError(f"SFTMix needs an even batch (B/2 confident + B/2 unconfident), got B={B}")
    return B // 2


def sample_lambda(rng, alpha: float, num_pairs: int, per_pair: bool = False) -> jax.Array:
    """lam ~ Beta(alpha, alpha): one draw per pair, or one per batch broadcast to [M]."""
    shape = (num_pairs,) if per_pair else ()
    lam = jax.random.beta(rng, alpha, alpha, shape, dtype=jnp.float32)
    return jnp.broadcast_to(lam, (num_pairs,))


def sftmix_loss(h_BLD, head: LinearHead, targets_BL, weights_BL, rng, *, mu: float = 0.2,
                alpha: float = 0.5, per_pair: bool = False, ntp: bool = True,
                max_tokens: int | None = None, chunk: int | None = None, whole=None):
    """Total SFTMix loss = NTP (all B rows; skipped when ntp=False, "Mixup only") + mu * Mixup,
    the head fused (tests/references.py: the same with the head differentiated through).

    whole: `sftmix_whole_batch` of the batch this one is a micro-batch of (its counts, and this
    micro-batch's share of its lambdas), so that micro-batch losses and metrics add up to the
    batch's; None: this batch is the whole one.
    """
    if whole is None:
        whole = sftmix_whole_batch(weights_BL, rng, alpha, per_pair, max_tokens)
    return _fused_sftmix_loss(h_BLD, head, targets_BL, weights_BL, mu, ntp, max_tokens, chunk, whole)


def sftmix_whole_batch(weights_BL, rng, alpha: float, per_pair: bool, max_tokens: int | None = None) -> dict:
    """What SFTMix's loss needs from the whole batch: response tokens, aligned Mixup slots, pairs,
    and one lambda per pair [M], drawn once for the batch."""
    M = _num_pairs(weights_BL.shape[0])
    count_B, _ = response_counts(weights_BL, max_tokens)
    _, mix_tokens = pair_slots(count_B, weights_BL.shape[1])
    return {"tokens": jnp.sum(weights_BL.astype(jnp.float32)), "mix_tokens": mix_tokens, "pairs": jnp.float32(M),
            "lam_M": jax.lax.stop_gradient(sample_lambda(rng, alpha, M, per_pair))}


def _sftmix_piece(logits_ScV, xs, consts, ntp=True):
    """One chunk of positions of the S = 2R side rows: NTP over every response token + Mixup of the
    aligned slots (rows 2r and 2r+1 hold shard r's confident and unconfident sides, slot for slot)."""
    (targets_Sc, weights_Sc, valid_Rc, lam_Rc), (ntp_scale, mix_scale) = xs, consts
    mixed_RcV = mix_pairs(logits_ScV, lam_Rc)
    mix = ce_sum(mixed_RcV, (targets_Sc[0::2], targets_Sc[1::2]), (lam_Rc * valid_Rc, (1.0 - lam_Rc) * valid_Rc))
    nll = ce_sum(logits_ScV, (targets_Sc,), (weights_Sc,)) if ntp else jnp.zeros((), jnp.float32)
    return ntp_scale * nll + mix_scale * mix, (nll, mix)


def _mixup_only_piece(logits_ScV, xs, consts):
    return _sftmix_piece(logits_ScV, xs, consts, ntp=False)


def pair_sides(weights_BL, max_tokens: int | None = None):
    """SFTMix's head order. Each batch shard's rows become two side rows of T = (B/R/2) L positions,
    its confident rows' and its unconfident rows' (S = 2R rows: shard r's sides are rows 2r, 2r+1).
    Each side row holds first the aligned slots of its pairs, pair by pair (slot n < m_k of pair k,
    at the same index in both sides), then the rest of its response tokens, then everything else.
    So the head runs on the response tokens only, as NTP's does, not on B x (longest response).

    Returns (side, idx_ST, valid_ST, pair_ST, active): side(x_BL...) -> x_ST... (the layout
    change, differentiable), the order within each side row, 1.0 on aligned slots, each
    position's pair (row // 2), and the most response tokens of any side row.
    """
    B, L = weights_BL.shape
    R = batch_shards()
    R = R if B % (2 * R) == 0 else 1  # pairs never straddle shards
    P = B // R // 2

    def side(x):
        x = x.reshape(R, P, 2, L, *x.shape[2:])
        return jnp.swapaxes(x, 1, 2).reshape(2 * R, P * L, *x.shape[4:])

    is_resp_BL = weights_BL > 0
    count_B, _ = response_counts(weights_BL, max_tokens)
    shared_B = jnp.repeat(jnp.minimum(count_B[0::2], count_B[1::2]), 2)
    rank_BL = jnp.cumsum(is_resp_BL, axis=1) - 1
    kind_BL = jnp.where(is_resp_BL & (rank_BL < shared_B[:, None]), 0, jnp.where(is_resp_BL, 1, 2)).astype(jnp.int32)
    kind_ST = side(kind_BL)
    idx_ST = jnp.argsort(kind_ST, axis=1, stable=True)
    pair_BL = jnp.broadcast_to((jnp.arange(B, dtype=jnp.int32) // 2)[:, None], (B, L))
    valid_ST = (jnp.take_along_axis(kind_ST, idx_ST, axis=1) == 0).astype(jnp.float32)
    pair_ST = jnp.take_along_axis(side(pair_BL), idx_ST, axis=1)
    active = jnp.max(jnp.sum(kind_ST < 2, axis=1))
    return side, idx_ST, valid_ST, pair_ST, active


def _fused_sftmix_loss(h_BLD, head: LinearHead, targets_BL, weights_BL, mu, ntp, max_tokens, chunk, whole):
    """sftmix_loss with the head fused, in `pair_sides` order: a chunk of positions holds both the
    NTP and the Mixup terms of its logits, and no logits are formed past the response tokens."""
    L = h_BLD.shape[1]
    side, idx_ST, valid_ST, pair_ST, active = pair_sides(weights_BL, max_tokens)
    h_STD = permute_rows(side(h_BLD), idx_ST)
    targets_ST, weights_ST = (jnp.take_along_axis(side(x), idx_ST, axis=1) for x in (targets_BL, weights_BL))
    tokens = jnp.sum(weights_BL.astype(jnp.float32))
    lam_M, tokens_n, mix_n = whole["lam_M"], whole["tokens"], whole["mix_tokens"]  # the whole batch's
    lam_RT = lam_M[pair_ST[0::2]]
    scales = jax.lax.stop_gradient((1.0 / jnp.maximum(tokens_n, 1.0) if ntp else 0.0, mu / jnp.maximum(mix_n, 1.0)))
    piece = _sftmix_piece if ntp else _mixup_only_piece
    rows = h_STD.shape[1] // L  # rows per side row
    loss, (nll, mix) = fused_head_loss(head.capped(piece), head.vd, head.dtype, chunk and rows * chunk, h_STD, head.w,
                                       (targets_ST, weights_ST, valid_ST[0::2], lam_RT), scales, active)
    mixup = mix / jnp.maximum(mix_n, 1.0)
    aux = {"mixup_loss": mixup, "mixup_tokens": jnp.sum(valid_ST[0::2])}
    if ntp:
        aux = {**aux, "ntp_loss": nll / jnp.maximum(tokens_n, 1.0), "tokens": tokens}
    return loss, {**aux, "lambda_mean": jnp.sum(lam_M) / whole["pairs"], "loss": loss}


# ----------------------------------------------------------------------------------------
# The losses as the train step takes them: fn(model, batch, rng, whole=None) -> (loss, aux), and
# fn.whole(batch, rng): what a micro-batch's loss needs from its batch (gradient accumulation)
# ----------------------------------------------------------------------------------------
def ntp_loss_fn(chunk=None):
    def fn(model, batch, rng, whole=None):
        del rng
        h_BLD = model.hidden(batch["input_ids"])  # right-padded: the causal mask suffices
        return ntp_loss(h_BLD, model.linear_head(), batch["targets"], batch["weights"], chunk,
                        None if whole is None else whole["tokens"])

    fn.whole = lambda batch, rng: {"tokens": jnp.sum(batch["weights"].astype(jnp.float32))}
    return fn


def sftmix_loss_fn(mu, alpha, per_pair, ntp=True, chunk=None):
    def fn(model, batch, rng, whole=None):
        h_BLD = model.hidden(batch["input_ids"])
        return sftmix_loss(h_BLD, model.linear_head(), batch["targets"], batch["weights"], rng,
                           mu=mu, alpha=alpha, per_pair=per_pair, ntp=ntp, chunk=chunk, whole=whole)

    fn.whole = lambda batch, rng: sftmix_whole_batch(batch["weights"], rng, alpha, per_pair)
    return fn
