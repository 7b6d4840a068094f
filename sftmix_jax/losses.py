"""SFTMix losses: next-token prediction (NTP) and the response-aligned Mixup regulariser.

Shape suffixes: B batch rows, L sequence, D hidden, V vocab, K = B/2 pairs, N aligned slots.
Batch contract: targets_BL[b, t] is the token position t predicts; weights_BL is 1.0 exactly on
response targets (prompts/padding 0). Pairs are adjacent rows: pair k = (row 2k confident,
row 2k+1 unconfident), so any contiguous split of the batch (hosts, devices, micro-batches)
keeps pairs whole. See /work/shared/SFTMIX.md, "Stage 3".
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Head = Callable[[jax.Array], jax.Array]


def cross_entropy(logits_V: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token NLL, logsumexp(logits) - logits[target], in float32 (logits may be bf16)."""
    logits_V = logits_V.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits_V, axis=-1)  # stable: subtracts the max internally
    tgt = jnp.take_along_axis(logits_V, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - tgt


def _ce_sum(h_BLD, head: Head, targets: Sequence[jax.Array], weights: Sequence[jax.Array]):
    # One head call, several (targets, weights) pairs: Mixup scores both sides off one logit set.
    logits_BLV = head(h_BLD)
    return sum(jnp.sum(w.astype(jnp.float32) * cross_entropy(logits_BLV, t))
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


def ntp_loss(h_BLD, head: Head, targets_BL, weights_BL, chunk: int | None = None):
    """Token-mean NLL over all response tokens of the batch (plain SFT loss)."""
    total, count = weighted_nll_sum(h_BLD, head, targets_BL, weights_BL, chunk)
    loss = total / jnp.maximum(count, 1.0)
    return loss, {"ntp_loss": loss, "tokens": count}


def align_responses(h_BLD, targets_BL, weights_BL, max_tokens: int | None = None):
    """Left-align each row's response positions: slot n holds the row's n-th weighted position.

    Returns (h_BND, targets_BN, count_B). A stable argsort of (not-response) puts the response
    positions first in their original order, so multi-turn responses concatenate in order.
    Slots n >= count_B[b] hold prompt/padding junk; callers mask them with count_B. With
    max_tokens < L, count_B is clipped to N (responses longer than N are truncated).
    """
    B, L, _ = h_BLD.shape
    N = L if max_tokens is None else int(max_tokens)
    if not 0 < N <= L:
        raise ValueError(f"max_tokens must be in [1, L={L}], got {max_tokens}")
    is_resp_BL = weights_BL > 0
    idx_BN = jnp.argsort(jnp.logical_not(is_resp_BL).astype(jnp.int32), axis=1, stable=True)[:, :N]
    h_BND = jnp.take_along_axis(h_BLD, idx_BN[:, :, None], axis=1)
    targets_BN = jnp.take_along_axis(targets_BL, idx_BN, axis=1)
    count_B = jnp.minimum(jnp.sum(is_resp_BL, axis=1, dtype=jnp.int32), N)
    return h_BND, targets_BN, count_B


def _num_pairs(B: int) -> int:
    if B % 2:
        raise ValueError(f"SFTMix needs an even batch (B/2 confident + B/2 unconfident), got B={B}")
    return B // 2


def mixup_loss(h_BLD, head: Head, targets_BL, weights_BL, lam_K,
               max_tokens: int | None = None, chunk: int | None = None):
    """Response-aligned Mixup: CE(W z~, lam*y_c + (1-lam)*y_u) averaged over aligned tokens.

    z~ = lam*h_c + (1-lam)*h_u on slots n < M_k = min(count_c, count_u); the longer response is
    truncated, prompts and padding never mix. Logits only exist for the K*N aligned slots.
    """
    K = _num_pairs(h_BLD.shape[0])
    lam_K = jnp.broadcast_to(jnp.asarray(lam_K, jnp.float32), (K,))
    h_BND, y_BN, count_B = align_responses(h_BLD, targets_BL, weights_BL, max_tokens)
    N = h_BND.shape[1]
    M_K = jnp.minimum(count_B[0::2], count_B[1::2])
    valid_KN = (jnp.arange(N)[None, :] < M_K[:, None]).astype(jnp.float32)
    lam_K11 = lam_K[:, None, None]
    # Mix in float32, then back to the model's activation dtype so the head sees what it expects.
    z_KND = (lam_K11 * h_BND[0::2].astype(jnp.float32)
             + (1.0 - lam_K11) * h_BND[1::2].astype(jnp.float32)).astype(h_BLD.dtype)
    # Soft-label CE is linear in the label: lam*CE(y_c) + (1-lam)*CE(y_u), masked to n < M_k.
    w_c_KN = lam_K[:, None] * valid_KN
    w_u_KN = (1.0 - lam_K[:, None]) * valid_KN
    total = _chunked_ce_sum(z_KND, head, [y_BN[0::2], y_BN[1::2]], [w_c_KN, w_u_KN], chunk)
    count = jnp.sum(M_K).astype(jnp.float32)
    loss = total / jnp.maximum(count, 1.0)
    return loss, {"mixup_loss": loss, "mixup_tokens": count}


def sample_lambda(rng, alpha: float, num_pairs: int, per_pair: bool = False) -> jax.Array:
    """lam ~ Beta(alpha, alpha): one draw per pair, or one per batch broadcast to [K]."""
    shape = (num_pairs,) if per_pair else ()
    lam = jax.random.beta(rng, alpha, alpha, shape, dtype=jnp.float32)
    return jnp.broadcast_to(lam, (num_pairs,))


def sftmix_loss(h_BLD, head: Head, targets_BL, weights_BL, rng, *, mu: float = 0.2,
                alpha: float = 0.5, per_pair: bool = False, ntp: bool = True,
                max_tokens: int | None = None, chunk: int | None = None):
    """Total SFTMix loss = NTP (all B rows; skipped when ntp=False, "Mixup only") + mu * Mixup."""
    K = _num_pairs(h_BLD.shape[0])
    lam_K = jax.lax.stop_gradient(sample_lambda(rng, alpha, K, per_pair))
    mix, aux = mixup_loss(h_BLD, head, targets_BL, weights_BL, lam_K, max_tokens, chunk)
    loss = mu * mix
    if ntp:
        ntp_val, ntp_aux = ntp_loss(h_BLD, head, targets_BL, weights_BL, chunk)
        loss = loss + ntp_val
        aux = {**aux, **ntp_aux}
    return loss, {**aux, "lambda_mean": jnp.mean(lam_K), "loss": loss}
