"""Gemma (v1) and Gemma-2 in HF's config.json and weight names (hf.py has the rest)."""
from sftmix_jax.model.llama import ModelConfig

GELU_TANH = "gelu_pytorch_tanh"
# transformers' defaults where Gemma's differ from Llama's (a config.json may leave them out)
GEMMA_DEFAULTS = {
    "gemma": dict(head_dim=256, num_key_value_heads=16, tie_word_embeddings=True, hidden_act=GELU_TANH),
    "gemma2": dict(head_dim=256, num_key_value_heads=4, tie_word_embeddings=True, hidden_activation=GELU_TANH,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
}


def gemma_fields(hf: dict) -> dict:
    """ModelConfig fields of Gemma (v1) and Gemma-2 beyond Llama's; what we would compute differently raises."""
    kind = hf["model_type"]
    act_key = "hidden_act" if kind == "gemma" else "hidden_activation"  # what transformers' MLP reads
    # Gemma (v1) checkpoints say 'gelu' and mean the tanh approximation (transformers maps it so)
    if hf[act_key] not in (GELU_TANH, "gelu" if kind == "gemma" else GELU_TANH):
        raise ValueError(f"{act_key} {hf[act_key]!r} is not supported for {kind} (only {GELU_TANH!r})")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true is not supported (causal attention only)")
    fields = dict(embed_scale=True, norm_plus_one=True, activation="gelu_tanh")
    if kind == "gemma":
        return fields
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types {types!r} is not supported ({n} of 'sliding_attention' / 'full_attention')")
    sliding = tuple(t == "sliding_attention" for t in types)
    if any(sliding) and not hf["sliding_window"]:
        raise ValueError("sliding_window must be set when layer_types has 'sliding_attention'")
    return dict(fields, post_norms=True, query_pre_attn_scalar=hf["query_pre_attn_scalar"],
                attn_softcap=hf["attn_logit_softcapping"], final_softcap=hf["final_logit_softcapping"],
                sliding_window=hf["sliding_window"] if any(sliding) else None, sliding_layers=sliding)


# The switches' values in the other families (which cannot export them)
GEMMA_OFF = dict(embed_scale=False, norm_plus_one=False, activation="silu", post_norms=False,
                  query_pre_attn_scalar=None, attn_softcap=None, final_softcap=None, sliding_layers=())


def _int_if_whole(x):
    """transformers' Gemma2Config validates query_pre_attn_scalar as an int."""
    return int(x) if float(x).is_integer() else x


def gemma_to_hf(cfg: ModelConfig) -> dict:
    """config.json entries of a Gemma (v1) / Gemma-2 model beyond Llama's."""
    if cfg.qkv_bias != cfg.o_bias:
        raise ValueError(f"a {cfg.model_type} config has one attention_bias for q/k/v/o")
    kwargs = dict(attention_bias=cfg.o_bias)
    if cfg.model_type == "gemma2":
        layers = cfg.sliding_layers or (cfg.sliding_window is not None,) * cfg.num_layers
        kwargs.update(
            hidden_activation=GELU_TANH, query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
            attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
            # transformers builds the sliding mask even with no sliding layer: any window will do
            sliding_window=cfg.sliding_window or cfg.max_position_embeddings,
            layer_types=["sliding_attention" if s else "full_attention" for s in layers])
    return kwargs


_ID = (lambda w, s: w, lambda w: w)
# Gemma-2 (post_norms): HF's post_attention_layernorm is the attention output's norm, not the pre-MLP one
POST_NORMS = {
    ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", _ID),
    ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", _ID),
    ("post_mlp_norm", "scale"): ("post_feedforward_layernorm.weight", _ID),
}
