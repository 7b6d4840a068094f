"""A Flax NNX decoder-only LM for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) and
Gemma (v1) / Gemma-2, which differ by a few switches in ModelConfig.

Plain layers: the attention kernels and the CPU matmul live in ops/, the adapters in lora.py.
Shape letters: sftmix_jax/__init__.py.

`CausalLM.hidden` returns the final hidden states (after the final norm) and `CausalLM.head`
maps them to logits; SFTMix mixes the hidden states between the two. Every parameter carries
logical axis names (`out_sharding`) and activations are constrained by logical name
(sharding.py maps both onto a mesh).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax.core import spmd as flax_spmd

from sftmix_jax.model import lora, scan
from sftmix_jax.ops import attention, cpu
from sftmix_jax.ops.attention import ATTENTION
from sftmix_jax.ops.fused_head import LinearHead
from sftmix_jax.sharding import RULES, constrain

REMAT = ("none", "full", "dots")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


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
    model_type: str = "llama"  # llama | mistral | qwen2 | gemma | gemma2: the HF architecture we export as
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots: activation checkpointing per decoder block
    scan_layers: bool = False  # one Block with [num_layers, ...] parameters under lax.scan: compile time flat in depth
    attention: str = "auto"  # auto | blocked | xla | cudnn | splash: the causal (training/scoring) kernel
    # Gemma (v1) and Gemma-2
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w zero-initialised
    activation: str = "silu"  # silu | gelu_tanh: the gated MLP's (GeGLU with gelu_tanh)
    post_norms: bool = False  # Gemma-2: norms on the attention and MLP outputs before the residual add
    query_pre_attn_scalar: float | None = None  # queries scaled by this**-0.5; None: head_dim**-0.5
    attn_softcap: float | None = None  # Gemma-2: attention logits cap * tanh(s / cap), before the mask
    final_softcap: float | None = None  # Gemma-2: the same on the output logits
    sliding_layers: tuple = ()  # per layer, whether sliding_window applies; () = every layer (Mistral)

    def __post_init__(self):
        object.__setattr__(self, "sliding_layers", tuple(bool(s) for s in self.sliding_layers))  # hashable
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"model sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"model attention {self.attention!r} is not one of {', '.join(ATTENTION)}")
        if self.remat not in REMAT:
            raise ValueError(f"model remat {self.remat!r} is not one of {', '.join(REMAT)}")

    @property
    def rope(self) -> dict:
        return dict(self.rope_scaling)

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, None for full attention."""
        return self.sliding_window if not self.sliding_layers or self.sliding_layers[layer] else None


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


def _rotate(x_BLNH, cos_BLH, sin_BLH):
    half = x_BLNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BLNH[..., half:], x_BLNH[..., :half]], axis=-1)
    cos, sin = cos_BLH[:, :, None].astype(x_BLNH.dtype), sin_BLH[:, :, None].astype(x_BLNH.dtype)
    return x_BLNH * cos + rotated * sin


@jax.custom_vjp
def apply_rope(x_BLNH, cos_BLH, sin_BLH):
    """Rotary embedding (HF's rotate-half form). A hand-written VJP applies its transpose directly,
    where autodiff of the halves' slices and concatenation would pad and add them (small NTP
    step: 0.986x the time). cos / sin (from positions) get no gradient."""
    return _rotate(x_BLNH, cos_BLH, sin_BLH)


def _rope_fwd(x_BLNH, cos_BLH, sin_BLH):
    return _rotate(x_BLNH, cos_BLH, sin_BLH), (cos_BLH, sin_BLH)


def _rope_bwd(res, dy_BLNH):
    cos_BLH, sin_BLH = res
    half = dy_BLNH.shape[-1] // 2
    cos, sin = cos_BLH[:, :, None].astype(dy_BLNH.dtype), sin_BLH[:, :, None].astype(dy_BLNH.dtype)
    s_BLNH = dy_BLNH * sin  # the transpose of rotate-half: (a, b) -> (b, -a)
    return dy_BLNH * cos + jnp.concatenate([s_BLNH[..., half:], -s_BLNH[..., :half]], axis=-1), None, None


apply_rope.defvjp(_rope_fwd, _rope_bwd)


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------
def _param(rngs, shape, names, dtype, std):
    init = jax.nn.initializers.normal(std) if std else jax.nn.initializers.zeros
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class Dense(nnx.Module):
    """y = einsum(x, w) (+ b) with a kernel of any rank; `eq` names the contraction."""

    def __init__(self, eq, shape, names, bias_dims, cfg: ModelConfig, rngs):
        self.eq, self.dtype = eq, cfg.dtype
        x_spec, k_spec = eq.split("->")[0].split(",")
        self.num_in = sum(c in x_spec for c in k_spec)  # kernel dims contracted with x (leading)
        self.lora_a = self.lora_b = nnx.data(None)  # low-rank adapters, when lora.add attaches them
        self.kernel = _param(rngs, shape, names, cfg.param_dtype, cfg.initializer_range)
        self.bias = (
            _param(rngs, shape[-bias_dims:], names[-bias_dims:], cfg.param_dtype, 0.0)
            if bias_dims
            else None
        )

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = cpu.einsum(self.eq, x, self.kernel[...].astype(self.dtype))
        if self.lora_a is not None:
            y = y + lora.delta(self, x)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, cfg: ModelConfig):
        self.eps, self.plus_one = eps, cfg.norm_plus_one
        init = jnp.zeros if cfg.norm_plus_one else jnp.ones  # Gemma's w is an offset from 1
        self.scale = nnx.Param(init((dim,), cfg.param_dtype), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x_BLD):
        # As in transformers: normalise in float32 (float64 stays float64); Llama casts back, then
        # scales; Gemma scales by (1 + w) in float32, then casts.
        x = x_BLD.astype(jnp.promote_types(x_BLD.dtype, jnp.float32))
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (x * (1.0 + self.scale[...].astype(x.dtype))).astype(x_BLD.dtype)
        return self.scale[...].astype(x_BLD.dtype) * x.astype(x_BLD.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_bias = 2 if cfg.qkv_bias else 0
        self.q = Dense("BLD,DNH->BLNH", (D, N, H), ("embed", "heads", "head_dim"), qkv_bias, cfg, rngs)
        self.k = Dense("BLD,DKH->BLKH", (D, K, H), ("embed", "kv_heads", "head_dim"), qkv_bias, cfg, rngs)
        self.v = Dense("BLD,DKH->BLKH", (D, K, H), ("embed", "kv_heads", "head_dim"), qkv_bias, cfg, rngs)
        self.o = Dense("BLNH,NHD->BLD", (N, H, D), ("heads", "head_dim", "embed"), cfg.o_bias, cfg, rngs)
        self.scale = (cfg.query_pre_attn_scalar or H) ** -0.5
        self.impl, self.dtype, self.softcap = cfg.attention, cfg.dtype, cfg.attn_softcap

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
            out_BLNH = attention.causal(q_BLNH, k_BLKH, v_BLKH, self.scale, self.impl, self.dtype)
        else:  # soft-capped layers always come here (the fused kernels do not cap)
            out_BLNH = attention.masked(q_BLNH, k_BLKH, v_BLKH, mask_BLS, self.scale, self.softcap)
        return self.o(out_BLNH), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        D, F, b = cfg.hidden_size, cfg.intermediate_size, int(cfg.mlp_bias)
        self.gate = Dense("BLD,DF->BLF", (D, F), ("embed", "mlp"), b, cfg, rngs)
        self.up = Dense("BLD,DF->BLF", (D, F), ("embed", "mlp"), b, cfg, rngs)
        self.down = Dense("BLF,FD->BLD", (F, D), ("mlp", "embed"), b, cfg, rngs)
        self.act = ACTIVATIONS[cfg.activation]

    def __call__(self, x_BLD):
        h_BLF = constrain(self.act(self.gate(x_BLD)) * self.up(x_BLD), ("act_batch", "act_length", "act_mlp"))
        return self.down(h_BLF)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.mlp = MLP(cfg, rngs)
        # Gemma-2 normalises each sublayer's output too (HF: post_attention_layernorm and
        # post_feedforward_layernorm; its pre_feedforward_layernorm is our mlp_norm)
        post = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg) if cfg.post_norms else None  # noqa: E731
        self.post_attn_norm, self.post_mlp_norm = post(), post()

    def __call__(self, x_BLD, cos_BLH, sin_BLH, mask_BLS, cache=None, index=None):
        a_BLD, cache = self.attn(self.attn_norm(x_BLD), cos_BLH, sin_BLH, mask_BLS, cache, index)
        x_BLD = x_BLD + (a_BLD if self.post_attn_norm is None else self.post_attn_norm(a_BLD))
        m_BLD = self.mlp(self.mlp_norm(x_BLD))
        x_BLD = x_BLD + (m_BLD if self.post_mlp_norm is None else self.post_mlp_norm(m_BLD))
        return constrain(x_BLD, ("act_batch", "act_length", "act_embed")), cache


def layer_masks(cfg: ModelConfig, B, L, attention_mask_BS, S=None, index=None, segment_ids_BL=None) -> list:
    """Per layer, the attention mask [B, L, S] (True: may attend), or None where the causal mask
    alone will do (the fast kernels). S/index: the cache length and first slot when decoding.

    A mask where there is padding to hide, a cache, a window shorter than L, a soft-cap or packed
    rows (segment_ids_BL: a token sees its own example only; padding, segment 0, sees padding).
    Sliding windows count cache slots, which equal positions for left-padded prompts and, within
    one example, for packed rows. Packed rows on the blocked kernel: `attention.Segments` instead,
    masked block by block (the upper triangle skipped).
    """
    windows = [cfg.window(i) for i in range(cfg.num_layers)]
    if (segment_ids_BL is not None and attention_mask_BS is None and S is None
            and attention.attention_impl(cfg.attention, cfg.dtype, L, cfg.head_dim) == "blocked"
            and not (cfg.scan_layers and len(set(windows)) > 1)):  # scanned layers index dense masks
        segments = {w: attention.Segments(segment_ids_BL, w) for w in set(windows)}
        return [segments[w] for w in windows]
    made = {}

    def mask(window):
        if window not in made:
            q_L1 = (0 if S is None else index) + jnp.arange(L)[:, None]
            k_1S = jnp.arange(L if S is None else S)[None, :]
            allowed_LS = (k_1S <= q_L1) & ((q_L1 - k_1S < window) if window else True)
            valid_BS = (jnp.ones((B, k_1S.shape[1]), bool) if attention_mask_BS is None
                        else attention_mask_BS.astype(bool))
            made[window] = allowed_LS[None] & valid_BS[:, None, :]
            if segment_ids_BL is not None:
                made[window] &= segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
        return made[window]

    simple = attention_mask_BS is None and S is None and not cfg.attn_softcap and segment_ids_BL is None
    return [None if simple and not (w and L > w) else mask(w) for w in windows]


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
        blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]  # the same draws either way
        self.layers = scan.stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype, cfg.initializer_range)

    def hidden(self, input_ids_BL, attention_mask_BS=None, positions_BL=None, cache=None, index=None,
               segment_ids_BL=None):
        """Final hidden states h_BLD (after the final norm).

        attention_mask_BS: 1 for real tokens; None means an unpadded or right-padded batch, where
        the causal mask alone keeps every real token from seeing padding (the fast path).
        cache/index: a KV cache from `init_cache` and the slot of the first token (decoding);
        then attention_mask_BS covers the whole cache. Returns (h_BLD, cache) when decoding.
        segment_ids_BL: packed rows (scoring), contiguous examples 1, 2, ... and padding 0: attention
        stays within each example; positions_BL (restarting per example) comes with them.
        """
        cfg = self.cfg
        B, L = input_ids_BL.shape
        if positions_BL is None:
            if cache is not None or segment_ids_BL is not None:
                raise ValueError("decoding with a cache and packed rows need positions_BL")
            if attention_mask_BS is None:
                positions_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
            else:  # left or right padding: count real tokens, as HF generate does
                positions_BL = jnp.maximum(jnp.cumsum(attention_mask_BS, -1) - 1, 0)
        freqs_BLh = positions_BL[..., None].astype(jnp.float32) * rope_inv_freq(cfg)  # a trace-time constant
        freqs_BLH = jnp.concatenate([freqs_BLh, freqs_BLh], axis=-1)
        cos_BLH, sin_BLH = jnp.cos(freqs_BLH), jnp.sin(freqs_BLH)

        S = None if cache is None else (cache["k"] if cfg.scan_layers else cache[0]["k"]).shape[-3]
        masks = layer_masks(cfg, B, L, attention_mask_BS, S, index, segment_ids_BL)
        x_BLD = jnp.take(self.embed[...], input_ids_BL, axis=0).astype(cfg.dtype)
        if cfg.embed_scale:  # Gemma: HF casts the normaliser to the hidden dtype first
            x_BLD = x_BLD * jnp.asarray(cfg.hidden_size**0.5, x_BLD.dtype)
        x_BLD = constrain(x_BLD, ("act_batch", "act_length", "act_embed"))
        if cfg.scan_layers:
            x_BLD, new_cache = scan.scan_blocks(self.layers, REMAT_POLICIES, cfg.remat, x_BLD, cos_BLH, sin_BLH, masks,
                                                cache, index)
            h_BLD = self.norm(x_BLD)
            return (h_BLD, new_cache) if cache is not None else h_BLD
        new_cache = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if cfg.remat != "none" and cache is None:
                x_BLD, _ = nnx.remat(lambda blk, *a: blk(*a), policy=REMAT_POLICIES[cfg.remat])(
                    layer, x_BLD, cos_BLH, sin_BLH, masks[i]
                )
            else:
                x_BLD, layer_cache = layer(x_BLD, cos_BLH, sin_BLH, masks[i], layer_cache, index)
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
        cap = self.cfg.final_softcap
        if cap:  # Gemma-2, as HF: logits / cap, tanh, * cap
            logits = jnp.tanh(logits / cap) * cap
        return constrain(logits, ("act_batch",) + (None,) * (logits.ndim - 2) + ("act_vocab",))

    def linear_head(self) -> LinearHead:
        """`head` with its weight exposed, so the training losses can fuse it (ops/fused_head.py)."""
        w = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...]
        return LinearHead(w, self.cfg.tie_embeddings, jnp.dtype(self.cfg.dtype), self.head, self.cfg.final_softcap)

    def __call__(self, input_ids_BL, attention_mask_BS=None):
        return self.head(self.hidden(input_ids_BL, attention_mask_BS))

    def init_cache(self, batch_size, max_length, dtype=None):
        cfg = self.cfg
        shape = (batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        zeros = lambda: jnp.zeros(shape, dtype or cfg.dtype)  # noqa: E731
        if cfg.scan_layers:  # one [num_layers, B, S, K, H] stack per k and v, scanned with the layers
            shape = (cfg.num_layers,) + shape
            return {"k": zeros(), "v": zeros()}
        return [{"k": zeros(), "v": zeros()} for _ in range(cfg.num_layers)]


def init_model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    return CausalLM(cfg, nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> CausalLM:
    """The model with ShapeDtypeStructs instead of arrays: no memory, for loading weights."""
    # Under a mesh, eval_shape resolves logical names through flax's rule context: give it ours.
    with flax_spmd.logical_axis_rules(RULES):
        return nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0)))
