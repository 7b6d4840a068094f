"""sftmix_jax.losses against an independent NumPy reference (plain loops over rows/tokens)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import references
from sftmix_jax import losses
from sftmix_jax.ops import fused_head
from sftmix_jax.ops.fused_head import LinearHead

D, V = 8, 13


# ---------------------------------------------------------------- NumPy reference (float64)
def np_ce(logits, target):
    m = logits.max()
    return float(m + np.log(np.exp(logits - m).sum()) - logits[target])


def np_ntp(h, W, targets, weights):
    tot, cnt = 0.0, 0.0
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            if weights[b, t] > 0:
                tot += weights[b, t] * np_ce(h[b, t] @ W, targets[b, t])
                cnt += weights[b, t]
    return tot / max(cnt, 1.0)


def np_response_positions(weights_row):
    return [t for t in range(len(weights_row)) if weights_row[t] > 0]


def np_mixup(h, W, targets, weights, lam):
    B = h.shape[0]
    K = B // 2
    tot, cnt = 0.0, 0
    for k in range(K):
        pc = np_response_positions(weights[2 * k])
        pu = np_response_positions(weights[2 * k + 1])
        M = min(len(pc), len(pu))
        for n in range(M):
            z = lam[k] * h[2 * k, pc[n]] + (1 - lam[k]) * h[2 * k + 1, pu[n]]
            logits = z @ W
            tot += lam[k] * np_ce(logits, targets[2 * k, pc[n]])
            tot += (1 - lam[k]) * np_ce(logits, targets[2 * k + 1, pu[n]])
        cnt += M
    return tot / max(cnt, 1)


# ---------------------------------------------------------------- fixtures
def make_batch(seed, specs, L):
    """specs: per row, a list of (start, end) response spans; everything else prompt/padding."""
    rng = np.random.default_rng(seed)
    B = len(specs)
    h = rng.normal(size=(B, L, D)).astype(np.float32)
    W = rng.normal(size=(D, V)).astype(np.float32) * 0.7
    targets = rng.integers(0, V, size=(B, L)).astype(np.int32)
    weights = np.zeros((B, L), np.float32)
    for b, spans in enumerate(specs):
        for s, e in spans:
            weights[b, s:e] = 1.0
    return h, W, targets, weights


def head_of(W):
    W = jnp.asarray(W)
    return lambda x: x @ W


# prompt length, response spans, right padding all differ by row; row 1 is multi-turn.
L = 20
SPECS = [
    [(3, 9)],              # c0: 6 tokens
    [(2, 5), (9, 13)],     # c1: multi-turn, 3 + 4 = 7 tokens
    [(10, 12)],            # c2: 2 tokens
    [(1, 19)],             # c3: 18 tokens
    [(5, 16)],             # u0: 11 tokens (truncated to 6)
    [(6, 8)],              # u1: 2 tokens (c1 truncated to 2)
    [(0, 7)],              # u2: 7 tokens (truncated to 2)
    [],                    # u3: no response -> pair 3 contributes nothing
]


def test_cross_entropy_stable_and_bf16():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.5, 0.2, 0.1]], np.float32)
    out = np.asarray(losses.cross_entropy(jnp.asarray(logits), jnp.array([0, 2])))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [np_ce(logits[0].astype(np.float64), 0),
                                     np_ce(logits[1].astype(np.float64), 2)], rtol=1e-6)
    out16 = losses.cross_entropy(jnp.asarray(logits[1:], jnp.bfloat16), jnp.array([2]))
    assert out16.dtype == jnp.float32


@pytest.mark.parametrize("seed", [0, 1])
def test_ntp_matches_numpy(seed):
    h, W, t, w = make_batch(seed, SPECS, L)
    ref = np_ntp(h.astype(np.float64), W.astype(np.float64), t, w)
    loss, aux = references.ntp_loss(jnp.asarray(h), head_of(W), jnp.asarray(t), jnp.asarray(w))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-5)
    assert float(aux["tokens"]) == w.sum()
    assert float(aux["ntp_loss"]) == float(loss)


@pytest.mark.parametrize("chunk", [3, 19])
def test_ntp_chunked_equals_unchunked(chunk):
    h, W, t, w = make_batch(2, SPECS, L)
    w[:, -1] = 1.0  # responses cut at L: the last (partial) chunk must be covered
    args = (jnp.asarray(t), jnp.asarray(w))

    def f(h_, W_, chunk_):
        return references.ntp_loss(h_, head_of(W_), *args, chunk=chunk_)[0]

    full, g_full = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(W), None)
    ch, g_ch = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)(
        jnp.asarray(h), jnp.asarray(W), chunk)
    np.testing.assert_allclose(float(ch), float(full), rtol=1e-6)
    for a, b in zip(g_ch, g_full):  # closed-over head params get gradients through checkpoint
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_ntp_empty_and_single_token():
    h, W, t, w = make_batch(3, [[], [(2, 3)]], 5)
    args = (jnp.asarray(h), head_of(W), jnp.asarray(t))
    loss, aux = references.ntp_loss(*args, jnp.zeros((2, 5)))
    assert float(loss) == 0.0 and float(aux["tokens"]) == 0.0
    loss, aux = references.ntp_loss(*args, jnp.asarray(w))  # one token: its CE, not CE / something
    np.testing.assert_allclose(float(loss), np_ce(h[1, 2].astype(np.float64) @ W, t[1, 2]), rtol=1e-5)


def test_align_responses_order_multiturn_counts():
    h, _, t, w = make_batch(4, SPECS, L)
    # Tag each hidden state with its position so we can read back what was gathered.
    h[:, :, 0] = np.arange(L)[None, :]
    h_BND, t_BN, cnt = references.align_responses(jnp.asarray(h), jnp.asarray(t), jnp.asarray(w))
    h_BND, t_BN, cnt = map(np.asarray, (h_BND, t_BN, cnt))
    assert h_BND.shape == (len(SPECS), L, D) and t_BN.shape == (len(SPECS), L)
    for b in range(len(SPECS)):
        pos = [p for s, e in SPECS[b] for p in range(s, e)]  # expected, written independently
        assert cnt[b] == len(pos)
        np.testing.assert_array_equal(h_BND[b, : len(pos), 0], pos)
        np.testing.assert_array_equal(h_BND[b, : len(pos)], h[b, pos])
        np.testing.assert_array_equal(t_BN[b, : len(pos)], t[b, pos])
    # multi-turn row 1: slots 0..2 from the first turn, 3..6 from the second
    np.testing.assert_array_equal(h_BND[1, :7, 0], [2, 3, 4, 9, 10, 11, 12])


def test_align_responses_max_tokens_clips():
    h, _, t, w = make_batch(5, SPECS, L)
    h_BND, t_BN, cnt = references.align_responses(jnp.asarray(h), jnp.asarray(t), jnp.asarray(w), 5)
    assert h_BND.shape == (len(SPECS), 5, D)
    np.testing.assert_array_equal(np.asarray(cnt), [5, 5, 2, 5, 5, 2, 5, 0])
    np.testing.assert_array_equal(np.asarray(t_BN)[3], t[3, 1:6])
    with pytest.raises(ValueError):
        references.align_responses(jnp.asarray(h), jnp.asarray(t), jnp.asarray(w), L + 1)


@pytest.mark.parametrize("chunk", [None, 4])
def test_mixup_matches_numpy_per_pair(chunk):
    h, W, t, w = make_batch(6, SPECS, L)
    lam = np.array([0.3, 0.8, 0.05, 0.6], np.float32)
    ref = np_mixup(h.astype(np.float64), W.astype(np.float64), t, w, lam.astype(np.float64))
    loss, aux = jax.jit(lambda *a: references.mixup_loss(*a[:1], head_of(W), *a[1:], chunk=chunk))(
        jnp.asarray(h), jnp.asarray(t), jnp.asarray(w), jnp.asarray(lam))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-5)
    assert float(aux["mixup_tokens"]) == 6 + 2 + 2 + 0


def test_mixup_lambda_extremes_reduce_to_one_side():
    h, W, t, w = make_batch(7, SPECS, L)
    K = len(SPECS) // 2
    args = (jnp.asarray(h), head_of(W), jnp.asarray(t), jnp.asarray(w))
    for lam, side in [(1.0, 0), (0.0, 1)]:
        tot, cnt = 0.0, 0
        for k in range(K):
            pc, pu = np_response_positions(w[2 * k]), np_response_positions(w[2 * k + 1])
            M = min(len(pc), len(pu))
            pos = (pc if side == 0 else pu)[:M]
            for p in pos:
                tot += np_ce(h[2 * k + side, p].astype(np.float64) @ W, t[2 * k + side, p])
            cnt += M
        loss, _ = references.mixup_loss(*args, jnp.full((K,), lam))
        np.testing.assert_allclose(float(loss), tot / cnt, rtol=1e-5)


def test_mixup_grad_only_on_aligned_positions():
    h, W, t, w = make_batch(8, SPECS, L)
    K = len(SPECS) // 2
    lam = jnp.array([0.3, 0.7, 0.5, 0.4])
    g = jax.grad(lambda x: references.mixup_loss(x, head_of(W), jnp.asarray(t), jnp.asarray(w), lam)[0])(
        jnp.asarray(h))
    nonzero = np.abs(np.asarray(g)).sum(-1) > 0
    expected = np.zeros_like(nonzero)
    for k in range(K):
        pc, pu = np_response_positions(w[2 * k]), np_response_positions(w[2 * k + 1])
        M = min(len(pc), len(pu))
        expected[2 * k, pc[:M]] = True
        expected[2 * k + 1, pu[:M]] = True
    np.testing.assert_array_equal(nonzero, expected)


def test_mixup_bf16_head_upcasts():
    h, W, t, w = make_batch(9, SPECS, L)
    W16 = jnp.asarray(W, jnp.bfloat16)
    loss, _ = references.mixup_loss(jnp.asarray(h, jnp.bfloat16), lambda x: x @ W16, jnp.asarray(t),
                                jnp.asarray(w), jnp.full((4,), 0.5))
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


@pytest.mark.parametrize("per_pair,chunk", [(False, None), (True, None), (False, 4)])
def test_sftmix_is_ntp_plus_mu_mixup(per_pair, chunk):
    """chunk=None mixes the logits (head linearity), chunk=4 runs the head on mixed states: both
    against the NumPy loop that mixes hidden states."""
    h, W, t, w = make_batch(10, SPECS, L)
    args = (jnp.asarray(h), head_of(W), jnp.asarray(t), jnp.asarray(w))
    rng = jax.random.key(3)
    lam = losses.sample_lambda(rng, 0.5, 4, per_pair)
    ntp = np_ntp(h.astype(np.float64), W.astype(np.float64), t, w)
    mix = np_mixup(h.astype(np.float64), W.astype(np.float64), t, w, np.asarray(lam, np.float64))
    loss, aux = references.sftmix_loss(*args, rng, mu=0.2, alpha=0.5, per_pair=per_pair, chunk=chunk)
    np.testing.assert_allclose(float(loss), ntp + 0.2 * mix, rtol=1e-5)
    np.testing.assert_allclose(float(aux["ntp_loss"]), ntp, rtol=1e-5)
    np.testing.assert_allclose(float(aux["mixup_loss"]), mix, rtol=1e-5)
    np.testing.assert_allclose(float(aux["lambda_mean"]), float(np.mean(lam)), rtol=1e-6)
    assert float(aux["loss"]) == float(loss)
    only, aux2 = references.sftmix_loss(*args, rng, mu=1.0, ntp=False, per_pair=per_pair, chunk=chunk)
    np.testing.assert_allclose(float(only), mix, rtol=1e-5)
    assert "ntp_loss" not in aux2


def test_mixed_logits_give_the_gradients_of_mixed_states():
    """d loss / d h and d loss / d W: logit mixing (chunk=None) == hidden-state mixing (chunk)."""
    h, W, t, w = make_batch(12, SPECS, L)

    def total(h, W, chunk):
        return references.sftmix_loss(h, lambda x: x @ W, jnp.asarray(t), jnp.asarray(w), jax.random.key(5),
                                  mu=0.7, per_pair=True, chunk=chunk)[0]

    g_logits = jax.grad(total, (0, 1))(jnp.asarray(h), jnp.asarray(W), None)
    g_states = jax.grad(total, (0, 1))(jnp.asarray(h), jnp.asarray(W), L)  # chunk = L: h path, one piece
    g_chunks = jax.grad(total, (0, 1))(jnp.asarray(h), jnp.asarray(W), 4)
    for a, b, c in zip(g_logits, g_states, g_chunks):
        assert np.abs(np.asarray(a)).max() > 1e-3
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)


def test_sftmix_odd_batch_raises():
    h, W, t, w = make_batch(11, SPECS[:3], L)
    with pytest.raises(ValueError, match="even"):
        references.sftmix_loss(jnp.asarray(h), head_of(W), jnp.asarray(t), jnp.asarray(w),
                           jax.random.key(0))


def test_sample_lambda():
    # (each distinct shape compiles the Beta sampler, ~2 s on CPU, so two calls cover it all)
    many = np.asarray(losses.sample_lambda(jax.random.key(0), 0.5, 20000, per_pair=True))
    assert many.shape == (20000,) and len(np.unique(many[:16])) == 16  # per pair: varies
    assert many.min() >= 0.0 and many.max() <= 1.0
    assert abs(many.mean() - 0.5) < 0.02
    # Beta(0.5, 0.5) is U-shaped: more mass near the ends than in the middle.
    assert np.mean((many < 0.1) | (many > 0.9)) > np.mean((many > 0.4) & (many < 0.6))
    # per batch: one value shared by all pairs, different across batches (keys), mean ~0.5
    keys = jax.random.split(jax.random.key(1), 2000)
    draws = np.asarray(jax.vmap(lambda k: losses.sample_lambda(k, 0.5, 4, False))(keys))
    assert draws.shape == (2000, 4) and np.all(draws == draws[:, :1])
    assert abs(draws[:, 0].mean() - 0.5) < 0.03 and len(np.unique(draws[:, 0])) > 1900
    assert draws.min() >= 0.0 and draws.max() <= 1.0


# ---------------------------------------------------------------- fused head (fused_head.py)
def linear_head(W, vd):
    """The head x @ W as a LinearHead holding W as [V, D] (a tied embedding) or [D, V]."""
    w = jnp.asarray(W.T if vd else W)
    return LinearHead(w, vd, jnp.dtype(jnp.float32), lambda x: x @ (w.T if vd else w))


@pytest.mark.parametrize("vd,chunk", [(False, None), (True, None), (False, 8), (True, 7)])
def test_fused_head_losses_match_numpy_and_the_differentiated_head(vd, chunk):
    """NTP and SFTMix (with and without its NTP term) through the fused head: values against the
    NumPy loops; gradients in h and W against differentiating the plain head. chunk 8 and 7 leave
    a ragged last chunk of L=20."""
    h, W, t, w = make_batch(13, SPECS, L)
    t_, w_ = jnp.asarray(t), jnp.asarray(w)
    lam = losses.sample_lambda(jax.random.key(5), 0.5, 4, True)
    ntp = np_ntp(h.astype(np.float64), W.astype(np.float64), t, w)
    mix = np_mixup(h.astype(np.float64), W.astype(np.float64), t, w, np.asarray(lam, np.float64))
    loss, aux = references.ntp_loss(jnp.asarray(h), linear_head(W, vd), t_, w_, chunk)
    np.testing.assert_allclose(float(loss), ntp, rtol=1e-5)
    assert float(aux["tokens"]) == w.sum()
    for with_ntp in (True, False):
        loss, aux = references.sftmix_loss(jnp.asarray(h), linear_head(W, vd), t_, w_, jax.random.key(5), mu=0.3,
                                       per_pair=True, ntp=with_ntp, chunk=chunk)
        np.testing.assert_allclose(float(loss), with_ntp * ntp + 0.3 * mix, rtol=1e-5)
        np.testing.assert_allclose(float(aux["mixup_loss"]), mix, rtol=1e-5)
        assert ("ntp_loss" in aux) == with_ntp

    def grads(fused, kind):
        def f(h, w):
            head = linear_head(w, vd) if fused else head_of(w)
            if kind == "ntp":
                return references.ntp_loss(h, head, t_, w_, chunk if fused else None)[0]
            return references.sftmix_loss(h, head, t_, w_, jax.random.key(5), mu=0.3, per_pair=True,
                                      ntp=kind == "sftmix", chunk=chunk if fused else None)[0]
        return jax.jit(jax.grad(f, (0, 1)))(jnp.asarray(h), jnp.asarray(W))

    for kind in ("ntp", "sftmix", "mixup"):
        for a, b in zip(grads(True, kind), grads(False, kind)):
            assert np.abs(np.asarray(b)).max() > 1e-3
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("min_logits", [fused_head.MIN_CHUNK_LOGITS, 0])  # one chunk / 3 candidate lengths
def test_fused_head_skips_a_frozen_weight_gradient(monkeypatch, min_logits):
    """Differentiating h only (LoRA's frozen head): two matmuls (logits, dh) per candidate chunk
    length, no dW; same dh."""
    monkeypatch.setattr(fused_head, "MIN_CHUNK_LOGITS", min_logits)
    h, W, t, w = make_batch(14, SPECS, L)
    args = (jnp.asarray(t), jnp.asarray(w))
    fused = jax.jit(jax.grad(lambda h: references.ntp_loss(h, linear_head(W, True), *args)[0]))
    plain = jax.grad(lambda h: references.ntp_loss(h, head_of(W), *args)[0])
    np.testing.assert_allclose(np.asarray(fused(jnp.asarray(h))), np.asarray(plain(jnp.asarray(h))), atol=1e-6)
    branches = 1 if min_logits else 3
    assert fused.lower(jnp.asarray(h)).as_text().count("dot_general") == 2 * branches


@pytest.mark.parametrize("specs,cost", [  # per-chunk cost 0: the smallest chunks; 1e9: the fewest
    (SPECS, 0), (SPECS, 32), (SPECS, 10**9), ([[]] * 8, 0), ([[(0, L)]] * 8, 0), ([[(L - 1, L)]] + [[]] * 7, 0)],
    ids=["mixed-0", "mixed-32", "mixed-1e9", "no-responses", "all-response", "one-token-at-L"])
def test_fused_head_skips_positions_past_the_responses(monkeypatch, specs, cost):
    """Only the head chunks holding response tokens run (NTP: each batch shard's tokens flattened,
    responses first; SFTMix: positions up to the longest response). Whichever chunk length is
    chosen, and with no response token at all, losses and gradients match the plain head."""
    monkeypatch.setattr(fused_head, "chunk_cost", lambda: cost)
    monkeypatch.setattr(fused_head, "MIN_CHUNK_LOGITS", 0)  # every candidate chunk length, however short
    h, W, t, w = make_batch(16, specs, L)
    t_, w_ = jnp.asarray(t), jnp.asarray(w)

    def losses_and_grads(fused):
        def f(h, W):
            head = linear_head(W, False) if fused else head_of(W)
            ntp = references.ntp_loss(h, head, t_, w_)[0]
            return ntp + references.sftmix_loss(h, head, t_, w_, jax.random.key(5), mu=0.3, per_pair=True)[0]
        return jax.jit(jax.value_and_grad(f, (0, 1)))(jnp.asarray(h), jnp.asarray(W))

    (fused, (dh, dW)), (plain, (dh_ref, dW_ref)) = losses_and_grads(True), losses_and_grads(False)
    np.testing.assert_allclose(float(fused), float(plain), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), np.asarray(dh_ref), atol=1e-6)
    np.testing.assert_allclose(np.asarray(dW), np.asarray(dW_ref), atol=1e-6)
    if not w.any():
        assert float(fused) == 0.0 and not np.asarray(dh).any() and not np.asarray(dW).any()


@pytest.mark.parametrize("cost", [0, 10**9])
def test_response_nll_per_row_matches_numpy(monkeypatch, cost):
    """The replay / held-out forward: each row's summed response NLL, the head on response tokens only."""
    monkeypatch.setattr(fused_head, "chunk_cost", lambda: cost)
    monkeypatch.setattr(fused_head, "MIN_CHUNK_LOGITS", 0)
    h, W, t, w = make_batch(17, SPECS, L)
    h[7] = np.nan  # a row without responses (padding) stays 0, not NaN
    got = jax.jit(lambda h: losses.response_nll(h, linear_head(W, True), jnp.asarray(t), jnp.asarray(w)))(jnp.asarray(h))
    ref = [sum(np_ce(h[b, p].astype(np.float64) @ W, t[b, p]) for p in np_response_positions(w[b])) for b in range(8)]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def test_chunk_choice_counts_logits_and_chunks():
    """The chunk length computing fewest logits plus a fixed cost per chunk, among T/1..T/8."""
    sizes = lambda T, rows=1, chunk=None, skipping=True: fused_head.chunk_sizes(T, chunk, skipping, rows, 8192)  # noqa: E731
    assert sizes(2048) == [1024, 512, 256]
    assert sizes(2048, skipping=False) == [2048]
    assert sizes(20, chunk=7) == [7]
    assert sizes(256, rows=8) == [128, 64, 32]
    assert sizes(256, rows=1) == [256]  # chunks of fewer than 2^21 logits: not worth their own pass
    assert sizes(512, rows=1) == [256]
    pick = lambda active, T, rows=1: sizes(T, rows)[  # noqa: E731
        int(fused_head.pick_chunk(jnp.asarray(active), sizes(T, rows), rows, cost=32))]
    assert pick(1153, 2048) == 256  # 5 x 256 = 1280 logits: the small bench shape's NTP batch
    assert pick(511, 1024) == 512  # one chunk of 512 rather than two of 256 (SmolLM2's batch)
    assert pick(2048, 2048) == 1024
    assert pick(181, 256, rows=8) == 64  # SFTMix: 8 rows up to the longest response (181)


def test_ce_sum_gradient_is_softmax_minus_onehots():
    rng = np.random.default_rng(15)
    logits = rng.normal(size=(6, V)) * 3
    t1, t2 = rng.integers(0, V, 6), rng.integers(0, V, 6)
    w1, w2 = rng.random(6), rng.random(6)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = p * (w1 + w2)[:, None] - w1[:, None] * np.eye(V)[t1] - w2[:, None] * np.eye(V)[t2]
    value, g = jax.value_and_grad(fused_head.ce_sum)(jnp.asarray(logits, jnp.float32), (jnp.asarray(t1), jnp.asarray(t2)),
                                                    (jnp.asarray(w1, jnp.float32), jnp.asarray(w2, jnp.float32)))
    ref = sum(wi[r] * np_ce(logits[r], ti[r]) for ti, wi in ((t1, w1), (t2, w2)) for r in range(6))
    np.testing.assert_allclose(float(value), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g), expected, atol=1e-6)
