"""What an HF export carries besides the weights, so downstream tools read it right: a config.json
that transformers 4.x and 5.x both read (both RoPE schemas, `torch_dtype` and `dtype`, the source
model's special token ids, no task-head or runtime keys), generation_config.json (the EOS ids
`generate` and vLLM stop at), the safetensors shards, and a PEFT adapter for LoRA runs.
"""
import json
import os

import numpy as np
from safetensors.numpy import save_file

# PretrainedConfig keys that describe a task head or runtime switches, not the architecture.
NOISE = ("output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
         "id2label", "label2id", "problem_type", "_name_or_path", "pretraining_tp", "torchscript", "tf_legacy_loss",
         "use_bfloat16", "pruned_heads", "cross_attention_hidden_size", "add_cross_attention", "finetuning_task",
         "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params")
SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


def source_json(source: str | None, name: str) -> dict:
    """config.json / generation_config.json of the model an export came from ({} if none)."""
    path = os.path.join(source, name) if source and os.path.isdir(source) else None
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def special_ids(tokenizer, source: str | None) -> dict:
    """bos/eos/pad ids: the source model's config.json where it has them, else the tokenizer's."""
    original = source_json(source, "config.json")
    ids = {k: getattr(tokenizer, k, None) for k in SPECIAL} if tokenizer is not None else {}
    ids.update({k: original[k] for k in SPECIAL if original.get(k) is not None})
    return ids


def portable_config(hf: dict, dtype: str) -> dict:
    """config.json for transformers 4.x (rope_theta, rope_scaling, torch_dtype) and 5.x
    (rope_parameters, dtype), without the generic keys that describe no architecture."""
    out = {k: v for k, v in hf.items() if k not in NOISE}
    rope = dict(out.get("rope_parameters") or {})
    if "rope_theta" in rope:
        kind = rope.get("rope_type", "default")
        out["rope_theta"] = rope["rope_theta"]
        out["rope_scaling"] = None if kind == "default" else {
            **{k: v for k, v in rope.items() if k != "rope_theta"}, "type": kind}
    out["dtype"] = out["torch_dtype"] = dtype
    return out


def generation_config(tokenizer, source: str | None, ids: dict) -> dict:
    """The source's generation_config.json, its EOS ids joined by the tokenizer's (responses end in it)."""
    gen = dict(source_json(source, "generation_config.json"))
    eos = gen.get("eos_token_id", ids.get("eos_token_id"))
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in eos:
        eos.append(tok_eos)
    gen.update({k: gen.get(k, ids.get(k)) for k in ("bos_token_id", "pad_token_id")})
    gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos or None
    return {k: v for k, v in gen.items() if v is not None and k != "transformers_version"}


def write_safetensors(tensors, path: str, max_shard_bytes: int, prefix: str = "model") -> None:
    """(name, array) pairs -> one file, or shards of at most max_shard_bytes with an index."""
    shards, current, size = [], {}, 0
    for name, w in tensors:
        if current and size + w.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = w, size + w.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, f"{prefix}.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        total += sum(w.nbytes for w in shard.values())
    with open(os.path.join(path, f"{prefix}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_peft_adapter(path: str, adapters, base: str, dtype) -> None:
    """A PEFT LoRA adapter directory from [(HF module name, A [in.., r], B [r, out..], scale)].

    PEFT's lora_A is nn.Linear(in, r) ([r, in]) and lora_B nn.Linear(r, out) ([out, r]); the update
    is (lora_alpha / r) * B A x, ours scale * (x A) B with the same flattening as the kernels'."""
    tensors, modules, ranks, scales = {}, set(), set(), set()
    for module, a, b, scale in adapters:
        r = a.shape[-1]
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T.astype(dtype))
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T.astype(dtype))
        modules.add(module.rsplit(".", 1)[-1])
        ranks.add(r)
        scales.add(scale)
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"one rank and scale expected for a PEFT adapter, got ranks {ranks}, scales {scales}")
    (r,), (scale,) = ranks, scales
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base, r=r, lora_alpha=scale * r,
                  target_modules=sorted(modules), lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                  use_rslora=False, inference_mode=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
