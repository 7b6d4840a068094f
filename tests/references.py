"""Plain JAX references for the production losses (sftmix_jax/losses.py fuses the head with the
loss): the head differentiated through, logits materialised. Tests check the fused path against
these (values and gradients) and both against NumPy.

`ntp_loss` and `sftmix_loss` take any head; a LinearHead goes to the production path, any other
callable h -> logits to the plain one here.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from sftmix_jax import losses
from sftmix_jax.ops.fused_head import LinearHead

Head = Callable[[jax.Array], jax.Array]  # h -> logits


def _ce_sum(h_BLD, head: Head, targets: Sequence[jax.Array], weights: Sequence[jax.Array]):
    # One head call, several (targets, weights) pairs: Mixup scores both sides off one logit set.
    logits_BLV = head(h_BLD)
    return sum(jnp.sum(w.astype(jnp.float32) * losses.cross_entropy(logits_BLV, t))
               for t, w in zip(targets, weights))


def _chunked_ce_sum(h_BLD, head: Head, targets, weights, chunk: int | None) -> jax.Array:
    """sum_i sum(w_i * CE(head(h), t_i)), optionally over static slices of the L axis.

    With `chunk`, each slice runs under jax.checkpoint, so only one [B, chunk, V] float32 logit
    block is live at a time and the backward pass recomputes it rather than storing all of L.
    The result equals the unchunked sum up to float summation order.
    """
    L = h_BLD.shape[1]
    if chunk is None or chunk >= L:
        return _ce_sum(h_BLD, head, targets, weights)
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    piece = jax.checkpoint(lambda h, ts, ws: _ce_sum(h, head, ts, ws))
    total = jnp.zeros((), jnp.float32)
    for s in range(0, L, chunk):  # static Python loop: L and chunk are static shapes
        sl = slice(s, s + chunk)
        total = total + piece(h_BLD[:, sl], [t[:, sl] for t in targets], [w[:, sl] for w in weights])
    return total


def weighted_nll_sum(h_BLD, head: Head, targets_BL, weights_BL, chunk: int | None = None):
    """(sum of w * NLL over the batch, sum of w) as float32 scalars."""
    total = _chunked_ce_sum(h_BLD, head, [targets_BL], [weights_BL], chunk)
    return total, jnp.sum(weights_BL.astype(jnp.float32))



def align_responses(h_BLD, targets_BL, weights_BL, max_tokens: int | None = None):
    """Left-align each row's response positions: slot n holds the row's n-th weighted position.

    Returns (h_BAD, targets_BA, count_B) in `response_order`. Slots n >= count_B[b] hold
    prompt/padding junk; callers mask them with count_B.
    """
    idx_BL, count_B, A = losses.response_order(weights_BL, max_tokens)
    idx_BA = idx_BL[:, :A]
    h_BAD = jnp.take_along_axis(h_BLD, idx_BA[:, :, None], axis=1)
    targets_BA = jnp.take_along_axis(targets_BL, idx_BA, axis=1)
    return h_BAD, targets_BA, count_B



def mixup_loss(h_BLD, head: Head, targets_BL, weights_BL, lam_M,
               max_tokens: int | None = None, chunk: int | None = None):
    """Response-aligned Mixup: CE(W z~, lam*y_c + (1-lam)*y_u) averaged over aligned tokens.

    z~ = lam*h_c + (1-lam)*h_u on slots n < m_k = min(count_c, count_u); the longer response is
    truncated, prompts and padding never mix. Logits only exist for the M*A aligned slots.
    """
    M = losses._num_pairs(h_BLD.shape[0])
    lam_M = jnp.broadcast_to(jnp.asarray(lam_M, jnp.float32), (M,))
    h_BAD, y_BA, count_B = align_responses(h_BLD, targets_BL, weights_BL, max_tokens)
    valid_MA, count = losses.pair_slots(count_B, h_BAD.shape[1])
    lam_M11 = lam_M[:, None, None]
    # Mix in float32 (at least), then back to the activation dtype so the head sees what it expects.
    acc = jnp.promote_types(h_BAD.dtype, jnp.float32)
    z_MAD = (lam_M11 * h_BAD[0::2].astype(acc) + (1.0 - lam_M11) * h_BAD[1::2].astype(acc)).astype(h_BLD.dtype)
    # Soft-label CE is linear in the label: lam*CE(y_c) + (1-lam)*CE(y_u), masked to n < m_k.
    w_c_KN = lam_M[:, None] * valid_MA
    w_u_KN = (1.0 - lam_M[:, None]) * valid_MA
    total = _chunked_ce_sum(z_MAD, head, [y_BA[0::2], y_BA[1::2]], [w_c_KN, w_u_KN], chunk)
    loss = total / jnp.maximum(count, 1.0)
    return loss, {"mixup_loss": loss, "mixup_tokens": count}


def mixup_loss_from_logits(logits_BLV, targets_BL, weights_BL, lam_M, max_tokens: int | None = None):
    """mixup_loss from the batch's logits: the head is linear, so W z~ = lam*W h_c + (1-lam)*W h_u.

    Mixing the already computed logits of the two rows gives the logits of the mixed hidden
    state without a second head matmul (the costliest part of Mixup at a large vocabulary);
    gradients are the same, since the gather and the mix are linear too.
    """
    M = losses._num_pairs(logits_BLV.shape[0])
    lam_M = jnp.broadcast_to(jnp.asarray(lam_M, jnp.float32), (M,))
    # response_order applied as a full permutation of L (cheap gradient), then cut to A
    idx_BL, count_B, A = losses.response_order(weights_BL, max_tokens)
    logits_BAV = losses.permute_rows(logits_BLV, idx_BL)[:, :A]
    y_BA = jnp.take_along_axis(targets_BL, idx_BL, axis=1)[:, :A]
    valid_MA, count = losses.pair_slots(count_B, A)
    mixed_MAV = losses.mix_pairs(logits_BAV, lam_M)
    lam_M1 = lam_M[:, None]
    total = (jnp.sum(lam_M1 * valid_MA * losses.cross_entropy(mixed_MAV, y_BA[0::2]))
             + jnp.sum((1.0 - lam_M1) * valid_MA * losses.cross_entropy(mixed_MAV, y_BA[1::2])))
    loss = total / jnp.maximum(count, 1.0)
    return loss, {"mixup_loss": loss, "mixup_tokens": count}


def ntp_loss(h_BLD, head: Head, targets_BL, weights_BL, chunk: int | None = None):
    """losses.ntp_loss for a LinearHead; the plain token-mean NLL for any other head."""
    if isinstance(head, LinearHead):
        return losses.ntp_loss(h_BLD, head, targets_BL, weights_BL, chunk)
    total, count = weighted_nll_sum(h_BLD, head, targets_BL, weights_BL, chunk)
    loss = total / jnp.maximum(count, 1.0)
    return loss, {"ntp_loss": loss, "tokens": count}


def sftmix_loss(h_BLD, head: Head, targets_BL, weights_BL, rng, *, mu: float = 0.2, alpha: float = 0.5,
                per_pair: bool = False, ntp: bool = True, max_tokens: int | None = None, chunk: int | None = None):
    """losses.sftmix_loss for a LinearHead; NTP + mu * Mixup with the head differentiated through else."""
    if isinstance(head, LinearHead):
        return losses.sftmix_loss(h_BLD, head, targets_BL, weights_BL, rng, mu=mu, alpha=alpha, per_pair=per_pair,
                                  ntp=ntp, max_tokens=max_tokens, chunk=chunk)
    M = losses._num_pairs(h_BLD.shape[0])
    lam_M = jax.lax.stop_gradient(losses.sample_lambda(rng, alpha, M, per_pair))
    if chunk is None:  # one head call: NTP and Mixup both read the batch's logits
        logits_BLV = head(h_BLD)
        mix, aux = mixup_loss_from_logits(logits_BLV, targets_BL, weights_BL, lam_M, max_tokens)
        ntp_fn = lambda: ntp_loss(logits_BLV, lambda x: x, targets_BL, weights_BL)  # noqa: E731
    else:  # chunked: never all logits at once, so Mixup runs the head on the mixed states
        mix, aux = mixup_loss(h_BLD, head, targets_BL, weights_BL, lam_M, max_tokens, chunk)
        ntp_fn = lambda: ntp_loss(h_BLD, head, targets_BL, weights_BL, chunk)  # noqa: E731
    loss = mu * mix
    if ntp:
        ntp_val, ntp_aux = ntp_fn()
        loss = loss + ntp_val
        aux = {**aux, **ntp_aux}
    return loss, {**aux, "lambda_mean": jnp.mean(lam_M), "loss": loss}
