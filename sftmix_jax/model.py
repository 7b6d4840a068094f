"""A Flax NNX decoder-only LM for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2).

Shape suffixes: B batch, L query length, S key length, D model dim, N query heads,
K key/value heads, H head dim, F MLP width, V vocabulary.

`CausalLM.hidden` returns the final hidden states (after the final norm) and `CausalLM.head`
maps them to logits; SFTMix mixes the hidden states between the two. Every parameter carries
logical axis names (`out_sharding`) and activations are constrained by logical name
(sharding.py maps both onto a mesh).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax.core import spmd as flax_spmd

from sftmix_jax.head_loss import LinearHead
from sftmix_jax.sharding import RULES, constrain, logical_to_spec


ATTENTION = ("auto", "blocked", "xla", "cudnn", "splash")
REMAT = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Sorted (key, value) pairs of HF's rope_parameters beyond rope_theta; () = default RoPE.
    rope_scaling: tuple = ()
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets qkv_bias and o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    model_type: str = "llama"  # llama | mistral | qwen2: the HF architecture we export as
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots: activation checkpointing per decoder block
    attention: str = "auto"  # auto | blocked | xla | cudnn | splash: the causal (training/scoring) kernel

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise ValueError(f"model attention {self.attention!r} is not one of {', '.join(ATTENTION)}")
        if self.remat not in REMAT:
            raise ValueError(f"model remat {self.remat!r} is not one of {', '.join(REMAT)}")

    @property
    def rope(self) -> dict:
        return dict(self.rope_scaling)


# ----------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] as in transformers' ROPE_INIT_FUNCTIONS (default, linear, llama3)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    rope = cfg.rope
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")


def apply_rope(x_BLNH, cos_BLH, sin_BLH):
    half = x_BLNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BLNH[..., half:], x_BLNH[..., :half]], axis=-1)
    cos, sin = cos_BLH[:, :, None].astype(x_BLNH.dtype), sin_BLH[:, :, None].astype(x_BLNH.dtype)
    return x_BLNH * cos + rotated * sin


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------
def _param(rngs, shape, names, dtype, std):
    init = jax.nn.initializers.normal(std) if std else jax.nn.initializers.zeros
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def cpu_einsum(eq, x, w):
    """einsum(eq, x, w) whose weight gradient contracts an explicit transposed copy of x.

    eq: "{batch}{in},{in}{out}->{batch}{out}" (Dense's form). Autodiff's dW = einsum(x, dy)
    contracts x's leading (token) axes, a dot XLA:CPU leaves to Eigen's slower GEMM; with x^T
    materialised first (an optimization barrier keeps XLA from folding the transpose back into
    the dot) YNNPACK takes it, transpose included still faster (README, CPU figures). Dense uses
    it on the CPU backend only: GPU and TPU matmuls take transposed operands natively.
    """
    return jnp.einsum(eq, x, w)


def _cpu_einsum_fwd(eq, x, w):
    return jnp.einsum(eq, x, w), (x, w)


def _cpu_einsum_bwd(eq, res, dy):
    x, w = res
    x_spec, w_spec, y_spec = *eq.split("->")[0].split(","), eq.split("->")[1]
    batch = [c for c in x_spec if c not in w_spec]
    xt_spec = "".join([c for c in x_spec if c in w_spec] + batch)  # [in.., batch..]
    xt = jax.lax.optimization_barrier(jnp.transpose(x, [x_spec.index(c) for c in xt_spec]))
    # A frozen kernel's dW (LoRA) is unused, and dead-code elimination drops it with the transpose.
    return jnp.einsum(f"{y_spec},{w_spec}->{x_spec}", dy, w), jnp.einsum(f"{xt_spec},{y_spec}->{w_spec}", xt, dy)


cpu_einsum.defvjp(_cpu_einsum_fwd, _cpu_einsum_bwd)


class Dense(nnx.Module):
    """y = einsum(x, w) (+ b) with a kernel of any rank; `eq` names the contraction."""

    def __init__(self, eq, shape, names, bias_dims, cfg: ModelConfig, rngs):
        self.eq, self.dtype = eq, cfg.dtype
        x_spec, k_spec = eq.split("->")[0].split(",")
        self.num_in = sum(c in x_spec for c in k_spec)  # kernel dims contracted with x (leading)
        # LoRA's two einsums: x [batch.., in..] -> [batch.., R] -> [batch.., out..]
        batch, k_in, k_out = x_spec[:-self.num_in], k_spec[:self.num_in], k_spec[self.num_in:]
        self.lora_eqs = (f"{x_spec},{k_in}R->{batch}R", f"{batch}R,R{k_out}->{batch}{k_out}")
        self.lora_a = self.lora_b = nnx.data(None)  # low-rank adapters, attached by lora.add
        self.lora_scale = 0.0
        self.kernel = _param(rngs, shape, names, cfg.param_dtype, cfg.initializer_range)
        self.bias = (
            _param(rngs, shape[-bias_dims:], names[-bias_dims:], cfg.param_dtype, 0.0)
            if bias_dims
            else None
        )

    def __call__(self, x):
        x = x.astype(self.dtype)
        einsum = cpu_einsum if jax.default_backend() == "cpu" else jnp.einsum
        y = einsum(self.eq, x, self.kernel[...].astype(self.dtype))
        if self.lora_a is not None:  # + scale * B (A x): [.., in] -> [.., r] -> [.., out]
            eq_a, eq_b = self.lora_eqs
            r_ = jnp.einsum(eq_a, x, self.lora_a[...].astype(self.dtype))
            y = y + self.lora_scale * jnp.einsum(eq_b, r_, self.lora_b[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, cfg: ModelConfig):
        self.eps = eps
        self.scale = nnx.Param(
            jnp.ones((dim,), cfg.param_dtype), out_sharding=("norm",), eager_sharding=False
        )

    def __call__(self, x_BLD):
        # As in transformers: normalise in float32 (float64 stays float64), cast back, then scale.
        x = x_BLD.astype(jnp.promote_types(x_BLD.dtype, jnp.float32))
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x_BLD.dtype) * x.astype(x_BLD.dtype)


def float64_attention(q_BLNH, k_BSKH, v_BSKH, *, mask, scale):
    """Masked jax.nn.dot_product_attention with the softmax in float64 (that one is always float32).

    mask: [B, 1, L, S]. The unmasked causal path is `causal_attention`, which keeps float64 itself.
    """
    B, L, N, H = q_BLNH.shape
    K = k_BSKH.shape[2]
    q_BLKGH = q_BLNH.reshape(B, L, K, N // K, H)  # query head n attends with kv head n // (N/K)
    logits_BKGLS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH) * scale
    logits_BKGLS = jnp.where(mask[:, :, None], logits_BKGLS, jnp.finfo(logits_BKGLS.dtype).min)
    probs_BKGLS = jax.nn.softmax(logits_BKGLS, axis=-1)
    return jnp.einsum("BKGLS,BSKH->BLKGH", probs_BKGLS, v_BSKH).reshape(B, L, N, H)


def causal_attention(q_BLNH, k_BLKH, v_BLKH, scale, block=64):
    """Causal self-attention (no padding mask), one query block at a time against the keys up to it.

    Skipping the masked upper triangle halves the work of a full masked softmax; on CPU it runs
    ~3x faster than jax.nn.dot_product_attention's XLA path with its gradient (L 256). Softmax in
    float32 at least, as there. Computed head-major ([B, K, G, L, H]: one transpose in, one out,
    none per block) with a hand-written VJP (`_causal_blocks`).
    """
    B, L, N, H = q_BLNH.shape
    K = k_BLKH.shape[2]
    q_BKGLH = q_BLNH.reshape(B, L, K, N // K, H).transpose(0, 2, 3, 1, 4)  # query head n uses kv head n // G
    o_BKGLH = _causal_blocks(q_BKGLH, k_BLKH.transpose(0, 2, 1, 3), v_BLKH.transpose(0, 2, 1, 3), scale, block)
    return o_BKGLH.transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)


def _blocks(L, block):
    return [(start, min(start + block, L)) for start in range(0, L, block)]  # static: trace-time


def _causal_blocks_fwd(q_BKGLH, k_BKLH, v_BKLH, scale, block):
    acc = jnp.promote_types(q_BKGLH.dtype, jnp.float32)
    outs, probs = [], []
    for start, end in _blocks(q_BKGLH.shape[3], block):
        s_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGLH[:, :, :, start:end], k_BKLH[:, :, :end]).astype(acc) * scale
        allowed_TS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        p_BKGTS = jax.nn.softmax(jnp.where(allowed_TS, s_BKGTS, jnp.finfo(acc).min), axis=-1).astype(v_BKLH.dtype)
        outs.append(jnp.einsum("BKGTS,BKSH->BKGTH", p_BKGTS, v_BKLH[:, :, :end]))
        probs.append(p_BKGTS)
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
    for (start, end), p_BKGTS in zip(_blocks(q_BKGLH.shape[3], block), probs):
        do_BKGTH = do_BKGLH[:, :, :, start:end]
        dv_BKLH = dv_BKLH.at[:, :, :end].add(jnp.einsum("BKGTS,BKGTH->BKSH", p_BKGTS, do_BKGTH).astype(acc))
        dp_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", do_BKGTH, v_BKLH[:, :, :end]).astype(acc)
        ds_BKGTS = (p_BKGTS * (dp_BKGTS - delta_BKGL1[:, :, :, start:end]) * scale).astype(q_BKGLH.dtype)
        dqs.append(jnp.einsum("BKGTS,BKSH->BKGTH", ds_BKGTS, k_BKLH[:, :, :end]))
        dk_BKLH = dk_BKLH.at[:, :, :end].add(
            jnp.einsum("BKGTS,BKGTH->BKSH", ds_BKGTS, q_BKGLH[:, :, :, start:end]).astype(acc))
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


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_bias = 2 if cfg.qkv_bias else 0
        self.q = Dense("BLD,DNH->BLNH", (D, N, H), ("embed", "heads", "head_dim"), qkv_bias, cfg, rngs)
        self.k = Dense("BLD,DKH->BLKH", (D, K, H), ("embed", "kv_heads", "head_dim"), qkv_bias, cfg, rngs)
        self.v = Dense("BLD,DKH->BLKH", (D, K, H), ("embed", "kv_heads", "head_dim"), qkv_bias, cfg, rngs)
        self.o = Dense("BLNH,NHD->BLD", (N, H, D), ("heads", "head_dim", "embed"), cfg.o_bias, cfg, rngs)
        self.scale = H**-0.5
        self.impl, self.dtype = cfg.attention, cfg.dtype

    def __call__(self, x_BLD, cos_BLH, sin_BLH, mask_BLS, cache=None, index=None):
        q_BLNH = constrain(apply_rope(self.q(x_BLD), cos_BLH, sin_BLH), ("act_batch", "act_length", "act_heads", None))
        k_BLKH = constrain(apply_rope(self.k(x_BLD), cos_BLH, sin_BLH), ("act_batch", "act_length", "act_kv_heads", None))
        v_BLKH = constrain(self.v(x_BLD), ("act_batch", "act_length", "act_kv_heads", None))
        if cache is not None:  # decoding: write this step's keys/values at `index`, attend to all
            k_BLKH = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BLKH.astype(cache["k"].dtype), index, 1)
            v_BLKH = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BLKH.astype(cache["v"].dtype), index, 1)
            cache = {"k": k_BLKH, "v": v_BLKH}
        k_BLKH, v_BLKH = k_BLKH.astype(q_BLNH.dtype), v_BLKH.astype(q_BLNH.dtype)
        if mask_BLS is None:  # training / scoring: right-padded rows need the causal mask only
            impl = attention_impl(self.impl, self.dtype, q_BLNH.shape[1], q_BLNH.shape[3])
            if impl == "blocked":
                out_BLNH = causal_attention(q_BLNH, k_BLKH, v_BLKH, self.scale)
            elif impl == "splash":
                out_BLNH = splash_attention(q_BLNH, k_BLKH, v_BLKH, self.scale)
            else:
                out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, scale=self.scale, is_causal=True,
                                                        implementation=impl)
            return self.o(out_BLNH), cache
        if q_BLNH.dtype == jnp.float64:
            out_BLNH = float64_attention(q_BLNH, k_BLKH, v_BLKH, mask=mask_BLS[:, None], scale=self.scale)
        else:
            out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, mask=mask_BLS[:, None], scale=self.scale)
        return self.o(out_BLNH), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        D, F, b = cfg.hidden_size, cfg.intermediate_size, int(cfg.mlp_bias)
        self.gate = Dense("BLD,DF->BLF", (D, F), ("embed", "mlp"), b, cfg, rngs)
        self.up = Dense("BLD,DF->BLF", (D, F), ("embed", "mlp"), b, cfg, rngs)
        self.down = Dense("BLF,FD->BLD", (F, D), ("mlp", "embed"), b, cfg, rngs)

    def __call__(self, x_BLD):
        h_BLF = constrain(jax.nn.silu(self.gate(x_BLD)) * self.up(x_BLD), ("act_batch", "act_length", "act_mlp"))
        return self.down(h_BLF)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BLD, cos_BLH, sin_BLH, mask_BLS, cache=None, index=None):
        a_BLD, cache = self.attn(self.attn_norm(x_BLD), cos_BLH, sin_BLH, mask_BLS, cache, index)
        x_BLD = x_BLD + a_BLD
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
        return constrain(x_BLD, ("act_batch", "act_length", "act_embed")), cache


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------
class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype, cfg.initializer_range)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype, cfg.initializer_range)

    def hidden(self, input_ids_BL, attention_mask_BS=None, positions_BL=None, cache=None, index=None):
        """Final hidden states h_BLD (after the final norm).

        attention_mask_BS: 1 for real tokens; None means an unpadded or right-padded batch, where
        the causal mask alone keeps every real token from seeing padding (the fast path).
        cache/index: a KV cache from `init_cache` and the slot of the first token (decoding);
        then attention_mask_BS covers the whole cache. Returns (h_BLD, cache) when decoding.
        """
        cfg = self.cfg
        B, L = input_ids_BL.shape
        if positions_BL is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs positions_BL")
            if attention_mask_BS is None:
                positions_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
            else:  # left or right padding: count real tokens, as HF generate does
                positions_BL = jnp.maximum(jnp.cumsum(attention_mask_BS, -1) - 1, 0)
        freqs_BLh = positions_BL[..., None].astype(jnp.float32) * rope_inv_freq(cfg)  # a trace-time constant
        freqs_BLH = jnp.concatenate([freqs_BLh, freqs_BLh], axis=-1)
        cos_BLH, sin_BLH = jnp.cos(freqs_BLH), jnp.sin(freqs_BLH)

        mask_BLS = None
        window = cfg.sliding_window
        if attention_mask_BS is not None or cache is not None or (window and L > window):
            S = L if cache is None else cache[0]["k"].shape[1]
            q_L1 = (0 if cache is None else index) + jnp.arange(L)[:, None]
            k_1S = jnp.arange(S)[None, :]
            allowed_LS = (k_1S <= q_L1) & ((q_L1 - k_1S < window) if window else True)
            valid_BS = jnp.ones((B, S), bool) if attention_mask_BS is None else attention_mask_BS.astype(bool)
            mask_BLS = allowed_LS[None] & valid_BS[:, None, :]

        x_BLD = jnp.take(self.embed[...], input_ids_BL, axis=0).astype(cfg.dtype)
        x_BLD = constrain(x_BLD, ("act_batch", "act_length", "act_embed"))
        new_cache = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if cfg.remat != "none" and cache is None:
                x_BLD, _ = nnx.remat(lambda blk, *a: blk(*a), policy=REMAT_POLICIES[cfg.remat])(
                    layer, x_BLD, cos_BLH, sin_BLH, mask_BLS
                )
            else:
                x_BLD, layer_cache = layer(x_BLD, cos_BLH, sin_BLH, mask_BLS, layer_cache, index)
            new_cache.append(layer_cache)
        h_BLD = self.norm(x_BLD)
        return (h_BLD, new_cache) if cache is not None else h_BLD

    def head(self, h_BLD):
        """Logits over the vocabulary, in the compute dtype (losses upcast to float32)."""
        dtype = self.cfg.dtype
        if self.cfg.tie_embeddings:
            logits = jnp.einsum("...D,VD->...V", h_BLD.astype(dtype), self.embed[...].astype(dtype))
        else:
            logits = jnp.einsum("...D,DV->...V", h_BLD.astype(dtype), self.lm_head[...].astype(dtype))
        return constrain(logits, ("act_batch",) + (None,) * (logits.ndim - 2) + ("act_vocab",))

    def linear_head(self) -> LinearHead:
        """`head` with its weight exposed, so the training losses can fuse it (head_loss.py)."""
        w = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...]
        return LinearHead(w, self.cfg.tie_embeddings, jnp.dtype(self.cfg.dtype), self.head)

    def __call__(self, input_ids_BL, attention_mask_BS=None):
        return self.head(self.hidden(input_ids_BL, attention_mask_BS))

    def init_cache(self, batch_size, max_length, dtype=None):
        cfg = self.cfg
        shape = (batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        zeros = lambda: jnp.zeros(shape, dtype or cfg.dtype)  # noqa: E731
        return [{"k": zeros(), "v": zeros()} for _ in range(cfg.num_layers)]


def init_model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    return CausalLM(cfg, nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> CausalLM:
    """The model with ShapeDtypeStructs instead of arrays: no memory, for loading weights."""
    # Under a mesh, eval_shape resolves logical names through flax's rule context: give it ours.
    with flax_spmd.logical_axis_rules(RULES):
        return nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0)))
