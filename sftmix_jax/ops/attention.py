"""Attention kernels and the choice among them by backend. The model calls `causal` (training and
scoring: right-padded rows need the causal mask only) and `masked` (decoding, padded prompts,
windows shorter than the sequence, soft-capped logits, packed rows).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from sftmix_jax.sharding import logical_to_spec

ATTENTION = ("auto", "blocked", "xla", "cudnn", "splash")


def causal(q_BLNH, k_BLKH, v_BLKH, scale, attention: str, dtype):
    """Causal self-attention with the kernel `attention` names ('auto': `attention_impl`)."""
    impl = attention_impl(attention, dtype, q_BLNH.shape[1], q_BLNH.shape[3])
    if impl == "blocked":
        return causal_attention(q_BLNH, k_BLKH, v_BLKH, scale)
    if impl == "splash":
        return splash_attention(q_BLNH, k_BLKH, v_BLKH, scale)
    return jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, scale=scale, is_causal=True, implementation=impl)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Segments:
    """The mask of packed rows (forward-only scoring), given by segment ids [B, L] (0 = padding):
    causal within each example, within `window` tokens if set. `masked` runs it blocked."""
    ids_BL: jax.Array
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))


def masked(q_BLNH, k_BSKH, v_BSKH, mask_BLS, scale, softcap=None):
    """Attention under an explicit mask [B, L, S] (float64 keeps its softmax in float64), or `Segments`.

    softcap (Gemma-2): logits cap * tanh(s / cap) before the mask, which no fused kernel does, so
    those layers take the plain XLA path (`explicit_attention`).
    """
    if isinstance(mask_BLS, Segments):  # the blocked kernel, skipping the upper triangle
        return causal_attention(q_BLNH, k_BSKH, v_BSKH, scale, segments=mask_BLS, softcap=softcap)
    if q_BLNH.dtype == jnp.float64 or softcap:
        return explicit_attention(q_BLNH, k_BSKH, v_BSKH, mask=mask_BLS[:, None], scale=scale, softcap=softcap)
    return jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask=mask_BLS[:, None], scale=scale)


def explicit_attention(q_BLNH, k_BSKH, v_BSKH, *, mask, scale, softcap=None):
    """Masked attention written out in XLA ops: masked jax.nn.dot_product_attention with the
    softmax in float32 at least (there always float32, so float64 stays float64 here) and an
    optional logit soft-cap, as transformers' eager Gemma-2 attention.

    mask: [B, 1, L, S]. The unmasked causal path is `causal_attention`, which keeps float64 itself.
    """
    B, L, N, H = q_BLNH.shape
    K = k_BSKH.shape[2]
    q_BLKGH = q_BLNH.reshape(B, L, K, N // K, H)  # query head n attends with kv head n // (N/K)
    acc = jnp.promote_types(q_BLNH.dtype, jnp.float32)
    logits_BKGLS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH).astype(acc) * scale
    if softcap:
        logits_BKGLS = jnp.tanh(logits_BKGLS / softcap) * softcap
    logits_BKGLS = jnp.where(mask[:, :, None], logits_BKGLS, jnp.finfo(acc).min)
    probs_BKGLS = jax.nn.softmax(logits_BKGLS, axis=-1).astype(v_BSKH.dtype)
    return jnp.einsum("BKGLS,BSKH->BLKGH", probs_BKGLS, v_BSKH).reshape(B, L, N, H)


def causal_attention(q_BLNH, k_BLKH, v_BLKH, scale, block=64, segments: Segments | None = None, softcap=None):
    """Causal self-attention (no padding mask), one query block at a time against the keys up to it.

    Skipping the masked upper triangle halves the work of a full masked softmax; on CPU it runs
    ~3x faster than jax.nn.dot_product_attention's XLA path with its gradient (L 256). Softmax in
    float32 at least, as there. Computed head-major ([B, K, G, L, H]: one transpose in, one out,
    none per block) with a hand-written VJP (`_causal_blocks`). segments / softcap (packed rows,
    forward-only scoring): the same blocks under the `Segments` mask and logit cap, differentiated
    by JAX itself.
    """
    B, L, N, H = q_BLNH.shape
    K = k_BLKH.shape[2]
    q_BKGLH = q_BLNH.reshape(B, L, K, N // K, H).transpose(0, 2, 3, 1, 4)  # query head n uses kv head n // G
    k_BKLH, v_BKLH = k_BLKH.transpose(0, 2, 1, 3), v_BLKH.transpose(0, 2, 1, 3)
    if segments is None and not softcap:
        o_BKGLH = _causal_blocks(q_BKGLH, k_BKLH, v_BKLH, scale, block)
    else:
        o_BKGLH = _causal_blocks_fwd(q_BKGLH, k_BKLH, v_BKLH, scale, block, segments, softcap)[0]
    return o_BKGLH.transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)


def _segment_mask(allowed_QS, segments: Segments, start, end):
    """The causal block's mask [Q, S] -> [B, 1, 1, Q, S]: the query's own example only, within the window."""
    if segments.window:
        allowed_QS &= jnp.arange(start, end)[:, None] - jnp.arange(end)[None, :] < segments.window
    ids_BL = segments.ids_BL
    return allowed_QS & (ids_BL[:, None, None, start:end, None] == ids_BL[:, None, None, None, :end])


def _blocks(L, block):
    return [(start, min(start + block, L)) for start in range(0, L, block)]  # static: trace-time


def _causal_blocks_fwd(q_BKGLH, k_BKLH, v_BKLH, scale, block, segments=None, softcap=None):
    acc = jnp.promote_types(q_BKGLH.dtype, jnp.float32)
    outs, probs = [], []
    for start, end in _blocks(q_BKGLH.shape[3], block):
        s_BKGQS = jnp.einsum("BKGQH,BKSH->BKGQS", q_BKGLH[:, :, :, start:end], k_BKLH[:, :, :end]).astype(acc) * scale
        if softcap:
            s_BKGQS = jnp.tanh(s_BKGQS / softcap) * softcap
        allowed_QS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        if segments is not None:
            allowed_QS = _segment_mask(allowed_QS, segments, start, end)
        p_BKGQS = jax.nn.softmax(jnp.where(allowed_QS, s_BKGQS, jnp.finfo(acc).min), axis=-1).astype(v_BKLH.dtype)
        outs.append(jnp.einsum("BKGQS,BKSH->BKGQH", p_BKGQS, v_BKLH[:, :, :end]))
        probs.append(p_BKGQS)
    o_BKGLH = jnp.concatenate(outs, axis=3)
    return o_BKGLH, (q_BKGLH, k_BKLH, v_BKLH, o_BKGLH, probs)


def _causal_blocks_bwd(scale, block, res, do_BKGLH):
    """Flash attention's backward with the forward's probabilities kept: per query block,
    dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K, dK += dS^T Q, dV += P^T dO."""
    q_BKGLH, k_BKLH, v_BKLH, o_BKGLH, probs = res
    acc = jnp.promote_types(q_BKGLH.dtype, jnp.float32)
    delta_BKGL1 = jnp.sum(do_BKGLH.astype(acc) * o_BKGLH.astype(acc), axis=-1, keepdims=True)
    dk_BKLH, dv_BKLH = jnp.zeros(k_BKLH.shape, acc), jnp.zeros(v_BKLH.shape, acc)
    dqs = []
    for (start, end), p_BKGQS in zip(_blocks(q_BKGLH.shape[3], block), probs):
        do_BKGQH = do_BKGLH[:, :, :, start:end]
        dv_BKLH = dv_BKLH.at[:, :, :end].add(jnp.einsum("BKGQS,BKGQH->BKSH", p_BKGQS, do_BKGQH).astype(acc))
        dp_BKGQS = jnp.einsum("BKGQH,BKSH->BKGQS", do_BKGQH, v_BKLH[:, :, :end]).astype(acc)
        ds_BKGQS = (p_BKGQS * (dp_BKGQS - delta_BKGL1[:, :, :, start:end]) * scale).astype(q_BKGLH.dtype)
        dqs.append(jnp.einsum("BKGQS,BKSH->BKGQH", ds_BKGQS, k_BKLH[:, :, :end]))
        dk_BKLH = dk_BKLH.at[:, :, :end].add(
            jnp.einsum("BKGQS,BKGQH->BKSH", ds_BKGQS, q_BKGLH[:, :, :, start:end]).astype(acc))
    return jnp.concatenate(dqs, axis=3), dk_BKLH.astype(k_BKLH.dtype), dv_BKLH.astype(v_BKLH.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _causal_blocks(q_BKGLH, k_BKLH, v_BKLH, scale, block):
    return _causal_blocks_fwd(q_BKGLH, k_BKLH, v_BKLH, scale, block)[0]


_causal_blocks.defvjp(_causal_blocks_fwd, _causal_blocks_bwd)


def attention_impl(attention: str, dtype, length: int | None = None, head_dim: int | None = None) -> str:
    """'auto' -> cuDNN's fused attention on GPU in bfloat16/float16, Pallas splash attention on
    TPU (sequence length and head dim multiples of 128, TPU's tile), else our blocked XLA path.

    blocked: `causal_attention`, fastest on CPU; xla / cudnn: jax.nn.dot_product_attention with
    that implementation (cuDNN needs a GPU and a 16-bit dtype); splash: `splash_attention`.
    """
    if attention != "auto":
        return attention
    backend = jax.default_backend()
    if backend == "tpu" and all(n is None or n % SPLASH_MIN_BLOCK == 0 for n in (length, head_dim)):
        return "splash"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and backend == "gpu" else "blocked"


SPLASH_MIN_BLOCK = 128  # TPU tiles: splash blocks are multiples of 128


def splash_attention(q_BLNH, k_BLKH, v_BLKH, scale, block=512):
    """Causal GQA attention with the Pallas TPU splash-attention kernel (flash-style, the masked
    upper triangle skipped), per device under shard_map: batch over data x fsdp, heads over
    tensor, as the activation rules say. Off TPU it runs in Pallas interpret mode (tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    L = q_BLNH.shape[1]
    b = next((c for c in (block, 256, SPLASH_MIN_BLOCK) if c <= L and L % c == 0), None)
    if b is None:
        raise ValueError(f"splash attention needs the sequence length to be a multiple of {SPLASH_MIN_BLOCK}, "
                         f"got {L}: pad to such buckets (config.data.buckets) or use model.attention=blocked")
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)

    def local(q_BLNH, k_BLKH, v_BLKH):  # this device's rows and heads
        n = q_BLNH.shape[2]
        mask = sm.MultiHeadMask([sm.CausalMask((L, L)) for _ in range(n)])
        kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=jax.default_backend() != "tpu")
        q_BNLH, k_BKLH, v_BKLH = (x.transpose(0, 2, 1, 3) for x in (q_BLNH * scale, k_BLKH, v_BLKH))
        return jax.vmap(kernel)(q_BNLH, k_BKLH, v_BKLH).transpose(0, 2, 1, 3)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BLNH, k_BLKH, v_BLKH)
    q_spec = logical_to_spec(("act_batch", None, "act_heads", None), mesh.axis_names)
    kv_spec = logical_to_spec(("act_batch", None, "act_kv_heads", None), mesh.axis_names)
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(
        q_BLNH, k_BLKH, v_BLKH)
