"""Hugging Face checkpoints <-> CausalLM: config.json + safetensors, no torch.

Weights are converted one tensor at a time (read, transpose, place), so loading an 8B model
never holds two full copies in host memory.
"""
import dataclasses
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from safetensors import safe_open

from sftmix_jax.hf_gemma import GEMMA_OFF, POST_NORMS, GEMMA_DEFAULTS, GELU_TANH, gemma_fields, gemma_to_hf
from sftmix_jax import hf_export
from sftmix_jax.model import scan
from sftmix_jax.model.llama import CausalLM, ModelConfig, abstract_model
from sftmix_jax.sharding import layer_stacked

SUPPORTED = ("llama", "mistral", "qwen2", "gemma", "gemma2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
SHARD_BYTES = 2 << 30  # save_pretrained writes safetensors shards of at most ~2 GiB


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------
def config_from_hf(hf: dict, dtype="float32", param_dtype="float32", remat="none", attention="auto",
                   scan_layers=False) -> ModelConfig:
    """ModelConfig from a config.json dict; anything we would compute differently raises."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    gemma = kind in GEMMA_DEFAULTS
    hf = {**GEMMA_DEFAULTS[kind], **hf} if gemma else hf
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"config.json has no {key!r}")
    if not gemma and hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # transformers 5 / 4
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.setdefault("rope_type", rope.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    keep = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    rope = {k: rope[k] for k in ("rope_type",) + keep[rope_type]} if rope_type != "default" else {}
    if kind == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("qwen2 use_sliding_window=true is not supported (per-layer windows)")
    if hf.get("attention_dropout", 0.0):
        logging.warning("attention_dropout=%s in config.json is not applied (no dropout)", hf["attention_dropout"])
    heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    fields = gemma_fields(hf) if gemma else {}
    window = fields.pop("sliding_window", hf.get("sliding_window") if kind == "mistral" else None)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope.items())),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2" or attention_bias,  # Qwen2 always has q/k/v biases
        o_bias=kind in ("llama", "gemma", "gemma2") and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=window,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        initializer_range=hf.get("initializer_range", 0.02),
        model_type=kind,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        attention=attention,
        scan_layers=scan_layers,
        **fields,
    )


def config_to_hf(cfg: ModelConfig, **extra) -> dict:
    """A config.json dict that transformers reads back into the same architecture."""
    from transformers import AutoConfig

    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **cfg.rope}
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
    )
    if cfg.model_type != "gemma2":  # Gemma-2's MLP reads hidden_activation
        kwargs["hidden_act"] = GELU_TANH if cfg.model_type == "gemma" else "silu"
    if cfg.model_type in GEMMA_DEFAULTS:
        kwargs.update(gemma_to_hf(cfg))
    elif on := [f for f, off in GEMMA_OFF.items() if getattr(cfg, f) != off]:
        raise ValueError(f"model_type {cfg.model_type!r} cannot export the Gemma options {', '.join(on)}")
    if cfg.model_type == "llama":
        if cfg.qkv_bias != cfg.o_bias:
            raise ValueError("a llama config has one attention_bias for q/k/v/o")
        kwargs.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.model_type == "mistral":
        kwargs.update(sliding_window=cfg.sliding_window)
    hf = AutoConfig.for_model(cfg.model_type, **kwargs).to_dict()
    hf.update(architectures=[ARCHITECTURES[cfg.model_type]], **extra)
    hf["dtype"] = cfg.param_dtype
    if cfg.model_type in GEMMA_DEFAULTS:  # the switches must be the family's: read it back
        back = config_from_hf(hf, cfg.dtype, cfg.param_dtype, cfg.remat, cfg.attention, cfg.scan_layers)
        if back != cfg:
            diff = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(back, f.name)]
            raise ValueError(f"a {cfg.model_type} config.json cannot express this model: {', '.join(diff)} differ")
    return hf


# ----------------------------------------------------------------------------------------
# Weight names and layouts: our path -> (HF name, HF->ours, ours->HF)
# ----------------------------------------------------------------------------------------
# HF [heads*H, D] <-> ours [D, heads, H]
_PROJ = (lambda w, s: w.T.reshape(s), lambda w: w.reshape(w.shape[0], -1).T)


_T = (lambda w, s: w.T, lambda w: w.T)
_ID = (lambda w, s: w, lambda w: w)
_LAYER = {
    ("attn", "q", "kernel"): ("self_attn.q_proj.weight", _PROJ),
    ("attn", "k", "kernel"): ("self_attn.k_proj.weight", _PROJ),
    ("attn", "v", "kernel"): ("self_attn.v_proj.weight", _PROJ),
    ("attn", "o", "kernel"): ("self_attn.o_proj.weight", (lambda w, s: w.T.reshape(s), lambda w: w.reshape(-1, w.shape[-1]).T)),
    ("attn", "q", "bias"): ("self_attn.q_proj.bias", (lambda w, s: w.reshape(s), lambda w: w.reshape(-1))),
    ("attn", "k", "bias"): ("self_attn.k_proj.bias", (lambda w, s: w.reshape(s), lambda w: w.reshape(-1))),
    ("attn", "v", "bias"): ("self_attn.v_proj.bias", (lambda w, s: w.reshape(s), lambda w: w.reshape(-1))),
    ("attn", "o", "bias"): ("self_attn.o_proj.bias", _ID),
    ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", _T),
    ("mlp", "up", "kernel"): ("mlp.up_proj.weight", _T),
    ("mlp", "down", "kernel"): ("mlp.down_proj.weight", _T),
    ("mlp", "gate", "bias"): ("mlp.gate_proj.bias", _ID),
    ("mlp", "up", "bias"): ("mlp.up_proj.bias", _ID),
    ("mlp", "down", "bias"): ("mlp.down_proj.bias", _ID),
    ("attn_norm", "scale"): ("input_layernorm.weight", _ID),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _ID),
}
_TOP = {
    ("embed",): ("model.embed_tokens.weight", _ID),
    ("norm", "scale"): ("model.norm.weight", _ID),
    ("lm_head",): ("lm_head.weight", _T),
}
# Buffers some checkpoints carry that we recompute.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_name(path, post_norms: bool = False) -> tuple:
    """(HF tensor name, to_ours, to_hf) for one of our parameter paths (post_norms: Gemma-2's names)."""
    path = tuple(path)
    if path[0] == "layers":
        name, fns = (POST_NORMS if post_norms and path[2:] in POST_NORMS else _LAYER)[path[2:]]
        return f"model.layers.{path[1]}.{name}", *fns
    name, fns = _TOP[path]
    return name, *fns


# ----------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------
def _is_remote(path: str) -> bool:
    return "://" in str(path)


def resolve(path_or_id: str) -> str:
    """A local HF directory; a remote one (gs://...) copied to a local cache; or a hub id downloaded."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if _is_remote(path_or_id):
        local = os.path.join(tempfile.gettempdir(), "sftmix_jax_hf", re.sub(r"[^\w.-]", "_", str(path_or_id)))
        if not os.path.exists(os.path.join(local, "config.json")):
            _copy_tree(epath.Path(path_or_id), epath.Path(local))
        return local
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{path_or_id!r} is not a model directory (config.json + safetensors) nor a hub id")
    from huggingface_hub import snapshot_download

    return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])


def _tensor_files(path: str) -> dict:
    """tensor name -> safetensors file, from the index of a sharded checkpoint or one file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    with safe_open(single, framework="numpy") as f:
        return {k: single for k in f.keys()}


def _read_tensor(files: dict, path: str, key: tuple, want: tuple, post_norms: bool, used: set) -> np.ndarray:
    """One HF tensor, checked against the shape of parameter `key` and put in our layout."""
    name, to_ours, to_hf = hf_name(key, post_norms)
    if name not in files:
        raise ValueError(f"tensor {name!r} (for parameter {'.'.join(map(str, key))}) is missing from {path}")
    # Open per tensor: closing unmaps the file, so its pages do not pile up in memory.
    with safe_open(files[name], framework="numpy") as f:
        w = f.get_tensor(name)
    expected = jax.eval_shape(to_hf, jax.ShapeDtypeStruct(want, np.float32)).shape
    if w.shape != expected:
        raise ValueError(f"tensor {name!r} has shape {w.shape}; config.json implies {expected}")
    used.add(name)
    return to_ours(w, want)


def load_pretrained(path: str, dtype="float32", param_dtype="float32", remat="none", shardings=None,
                    attention="auto", scan_layers=False) -> CausalLM:
    """CausalLM from a local HF directory or hub id. `shardings`: optional fn(path, value) -> Sharding."""
    path = resolve(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_hf(json.load(f), dtype, param_dtype, remat, attention, scan_layers)
    files = _tensor_files(path)
    graphdef, state = nnx.split(abstract_model(cfg))
    flat = dict(nnx.to_flat_state(state))
    used = set()
    for key, var in flat.items():
        want = var.get_value().shape
        if layer_stacked(var):  # scan_layers: each layer's HF tensor into its slice of the stack
            w = np.empty(want, jnp.dtype(param_dtype))
            for i in range(want[0]):
                w[i] = _read_tensor(files, path, key[:1] + (i,) + key[1:], want[1:], cfg.post_norms, used)
        else:
            w = _read_tensor(files, path, key, want, cfg.post_norms, used).astype(jnp.dtype(param_dtype), copy=False)
        sharding = shardings(key, var) if shardings else None
        if sharding is None:
            var.set_value(jnp.asarray(w))
        else:  # each device (on any host) takes its own block of the tensor
            var.set_value(jax.make_array_from_callback(w.shape, sharding, lambda idx, w=w: w[idx]))
        del w
    unused = sorted(n for n in files if n not in used and not _IGNORED.match(n))
    if cfg.tie_embeddings and unused == ["lm_head.weight"]:
        unused = []  # some tied checkpoints still store the head; it equals the embedding
    if unused:
        raise ValueError(f"tensors in {path} that the model does not use: {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------
def _copy_tree(src, dst) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        f.copy(dst / f.name, overwrite=True)


def _hf_tensors(model: CausalLM):
    """(HF name, host array) per weight, LoRA adapters folded into their kernels."""
    from sftmix_jax.model.lora import LoRAParam, merged_kernel
    from sftmix_jax.multihost import fetch
    entries = list(scan.per_layer(nnx.state(model, nnx.Param), model.cfg.num_layers))
    values = {key: get for key, _, get in entries}
    scales = {tuple(path): m.lora_scale for path, m in nnx.iter_modules(model) if getattr(m, "lora_a", None) is not None}
    for key, var, get in entries:
        if isinstance(var, LoRAParam):  # folded into its kernel below: the export is a plain model
            continue
        name, _, to_hf = hf_name(key, model.cfg.post_norms)
        w = fetch(get())
        module = key[:1] + key[2:-1] if layer_stacked(var) else key[:-1]  # as nnx.iter_modules names it
        if key[-1] == "kernel" and module in scales:
            a, b = (fetch(values[key[:-1] + (n,)]()) for n in ("lora_a", "lora_b"))
            w = merged_kernel(w, a, b, scales[module])
        yield name, np.ascontiguousarray(to_hf(w))


def _adapters(model: CausalLM):
    """(HF module name, A, B, scale) of every LoRA-adapted kernel, on the host."""
    from sftmix_jax.multihost import fetch

    for path, m in nnx.iter_modules(model):
        if getattr(m, "lora_a", None) is not None:
            path, stacked = tuple(path), layer_stacked(m.lora_a)
            for i in range(model.cfg.num_layers) if stacked else [None]:
                at = path[:1] + (i,) + path[1:] if stacked else path
                a, b = (fetch(v.get_value() if i is None else v.get_value()[i]) for v in (m.lora_a, m.lora_b))
                yield hf_name(at + ("kernel",), model.cfg.post_norms)[0].removesuffix(".weight"), a, b, m.lora_scale


def save_pretrained(model: CausalLM, path: str, tokenizer=None, max_shard_bytes: int = SHARD_BYTES, *, dtype=None,
                    source: str | None = None, chat_template: str | None = None, adapter_path: str | None = None) -> None:
    """Write config.json, generation_config.json, safetensors (sharded above max_shard_bytes) and the tokenizer.

    dtype: of the weights in the files (default: the parameters'). source: the HF directory the model
    was loaded from: its special token ids and generation settings carry over. chat_template: the
    prompt format the model was trained with, replacing the tokenizer's in the export.
    adapter_path: under LoRA, a PEFT adapter directory there too (the export itself is merged).
    With several processes, call it on all of them: weights sharded across hosts are gathered
    one at a time, and process 0 writes. A remote path (gs://...) is written locally first, then copied.
    """
    from sftmix_jax import multihost

    kw = dict(dtype=dtype, source=source, chat_template=chat_template)
    if _is_remote(path) or (adapter_path and _is_remote(adapter_path)):
        with tempfile.TemporaryDirectory() as local:
            save_pretrained(model, os.path.join(local, "hf"), tokenizer, max_shard_bytes, **kw,
                            adapter_path=os.path.join(local, "adapter") if adapter_path else None)
            if multihost.is_leader():
                _copy_tree(epath.Path(local, "hf"), epath.Path(path))
                if adapter_path:
                    _copy_tree(epath.Path(local, "adapter"), epath.Path(adapter_path))
        return
    out_dtype = np.dtype(jnp.dtype(dtype or model.cfg.param_dtype))
    tensors = ((name, w.astype(out_dtype, copy=False)) for name, w in _hf_tensors(model))
    adapters = list(_adapters(model)) if adapter_path else []  # gathered on every process
    if not multihost.is_leader():
        for _ in tensors:  # the gathers are collectives: take part in each
            pass
        return
    os.makedirs(path, exist_ok=True)
    if tokenizer is not None:
        saved, tokenizer.chat_template = tokenizer.chat_template, chat_template or tokenizer.chat_template
        try:
            tokenizer.save_pretrained(path)
        finally:
            tokenizer.chat_template = saved
    ids = hf_export.special_ids(tokenizer, source)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_export.portable_config(config_to_hf(model.cfg, **ids), str(out_dtype)), f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(hf_export.generation_config(tokenizer, source, ids), f, indent=2)
    hf_export.write_safetensors(tensors, path, max_shard_bytes)
    if adapters:
        hf_export.write_peft_adapter(adapter_path, adapters, source or path, out_dtype)


# ----------------------------------------------------------------------------------------
# Model and tokenizer from a config block
# ----------------------------------------------------------------------------------------
def model_config(cfg) -> ModelConfig:
    """ModelConfig of a config.model block, without touching any weights."""
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat, attention=cfg.get("attention", "auto"),
              scan_layers=cfg.get("scan_layers", False))
    if cfg.source == "init":
        return ModelConfig(**cfg.init.to_dict(), **kw)
    with open(os.path.join(resolve(cfg.source), "config.json")) as f:
        return config_from_hf(json.load(f), **kw)


def load_model(cfg, seed: int = 0, mesh=None) -> CausalLM:
    """config.model: `source` = 'init' (random init from cfg.init) or an HF directory / hub id.

    With a mesh, parameters are created (or loaded) directly sharded by their logical names.
    """
    from sftmix_jax import sharding

    if cfg.source == "init":
        from sftmix_jax.model.llama import init_model

        mc = model_config(cfg)
        if mesh is None:
            return init_model(mc, seed)
        graphdef, abstract = nnx.split(abstract_model(mc))
        state = jax.jit(lambda: nnx.split(init_model(mc, seed))[1],
                        out_shardings=sharding.state_shardings(abstract, mesh))()
        return nnx.merge(graphdef, state)
    place = None if mesh is None else (
        lambda key, var: sharding.named_sharding(mesh, var.get_metadata().get("out_sharding") or ()))
    return load_pretrained(cfg.source, dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat, shardings=place,
                           attention=cfg.get("attention", "auto"), scan_layers=cfg.get("scan_layers", False))


def load_tokenizer(source: str):
    """'synthetic' (the built-in byte-level tokenizer) or an HF directory / hub id."""
    if source == "synthetic":
        from sftmix_jax.data.synthetic import make_tokenizer

        return make_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token_id is None:  # many chat models ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok
