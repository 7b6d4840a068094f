"""What an HF export carries for downstream tools: transformers 4.x and 5.x read the same model,
generation_config.json, the source's token ids, the training prompt as chat template, the export
dtype, and a PEFT adapter for LoRA runs (hf_export.py)."""
import json
import os
import subprocess
import tempfile

import numpy as np
import pytest
import torch
import transformers

from sftmix_jax import hf, hf_export
from sftmix_jax.data import render, synthetic
from sftmix_jax.model import lora
from sftmix_jax.model.llama import ModelConfig, init_model

LLAMA3_ROPE = tuple(sorted(dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=16).items()))
FAMILIES = {  # the RoPE settings a transformers 4.x reader would silently get wrong without rope_theta / rope_scaling
    "llama3": dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6),
    "gemma2": dict(model_type="gemma2", embed_scale=True, norm_plus_one=True, activation="gelu_tanh", post_norms=True,
                   query_pre_attn_scalar=16, attn_softcap=50.0, final_softcap=30.0, sliding_window=8,
                   sliding_layers=(True, False), tie_embeddings=True, rope_theta=1e4),
}
IDS = np.array([[1, 5, 9, 33, 2, 7, 100, 3, 64, 12, 90, 4, 8, 11, 6, 40, 41, 42, 43, 44, 45, 46, 47, 48]])


def tiny(family, seed=0):
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, **FAMILIES[family])
    return init_model(cfg, seed)


def torch_logits(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def logits_in(python, ids, *paths):
    """Logits of each HF directory under another Python's transformers, saved as DIR/logits4.npy."""
    script = ("import json, sys, numpy as np, torch, transformers\n"
              "ids = torch.tensor(json.loads(sys.argv[1]))\n"
              "for path in sys.argv[2:]:\n"
              "    m = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager').eval()\n"
              "    with torch.no_grad(): np.save(path + '/logits4.npy', m(ids).logits.numpy())\n")
    out = subprocess.run([python, "-c", script, json.dumps(np.asarray(ids).tolist()), *map(str, paths)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_exports_read_the_same_in_transformers_4_and_5(tmp_path, transformers4):
    paths = {}
    for family in FAMILIES:
        paths[family] = str(tmp_path / family)
        hf.save_pretrained(tiny(family), paths[family])
    logits_in(transformers4, IDS, *paths.values())
    for family, path in paths.items():
        config = json.load(open(os.path.join(path, "config.json")))
        assert not set(hf_export.NOISE) & set(config), family
        assert config["torch_dtype"] == config["dtype"] == "float32"
        assert config["rope_theta"] == FAMILIES[family]["rope_theta"]
        ours = np.asarray(hf.load_pretrained(path)(IDS))
        five, four = torch_logits(path), np.load(os.path.join(path, "logits4.npy"))
        np.testing.assert_allclose(four, five, atol=1e-5, err_msg=family)
        np.testing.assert_allclose(ours, five, atol=1e-4, err_msg=family)


def test_generation_config_and_token_ids_come_from_the_source(tmp_path):
    source = tmp_path / "source"
    tok = synthetic.make_tokenizer()  # eos <|end|> = 258
    hf.save_pretrained(tiny("llama3"), str(source), tokenizer=tok)
    config = json.load(open(source / "config.json"))
    config.update(bos_token_id=100, eos_token_id=[101, 102], pad_token_id=None)
    json.dump(config, open(source / "config.json", "w"))
    json.dump({"bos_token_id": 100, "eos_token_id": [101, 102], "temperature": 0.6}, open(source / "generation_config.json", "w"))
    out = tmp_path / "out"
    hf.save_pretrained(hf.load_pretrained(str(source)), str(out), tokenizer=tok, source=str(source))
    config = json.load(open(out / "config.json"))
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (100, [101, 102], tok.pad_token_id)
    gen = json.load(open(out / "generation_config.json"))
    assert gen["eos_token_id"] == [101, 102, tok.eos_token_id] and gen["temperature"] == 0.6
    loaded = transformers.GenerationConfig.from_pretrained(out)
    assert loaded.eos_token_id == [101, 102, tok.eos_token_id] and loaded.bos_token_id == 100


def test_an_alpaca_trained_export_renders_the_alpaca_prompt(tmp_path):
    tok = synthetic.make_tokenizer()
    hf.save_pretrained(tiny("llama3"), str(tmp_path), tokenizer=tok, chat_template=render.ALPACA_CHAT_TEMPLATE)
    assert tok.chat_template == synthetic.CHAT_TEMPLATE  # the run's own tokenizer is left alone
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    chats = [[{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    for messages in chats:
        for gen in (False, True):
            want = render.render_alpaca(messages, tok.eos_token, gen)
            assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == want
    assert loaded.apply_chat_template(chats[0][:1], tokenize=False, add_generation_prompt=True).endswith(
        "### Instruction:\nName a prime.\n\n### Response:\n")


def test_bfloat16_export(tmp_path):
    model = tiny("llama3")
    hf.save_pretrained(model, str(tmp_path), dtype="bfloat16")
    config = json.load(open(tmp_path / "config.json"))
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    want = np.asarray(model.embed[...]).astype(np.float32)
    got = loaded.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_allclose(got, want, rtol=2**-8)  # rounded to bfloat16, nothing else


def test_lora_export_has_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny("llama3", seed=1)
    hf.save_pretrained(base, str(tmp_path / "base"))
    model = lora.add(tiny("llama3", seed=1), rank=4, alpha=8.0, targets="q,v,down", seed=2)
    for _, m in model.iter_modules():  # trained adapters: B is no longer zero
        if getattr(m, "lora_b", None) is not None:
            m.lora_b[...] = 0.05 * np.random.default_rng(0).standard_normal(m.lora_b.shape).astype(np.float32)
    ours = np.asarray(model(IDS))
    hf.save_pretrained(model, str(tmp_path / "merged"), adapter_path=str(tmp_path / "adapter"),
                       source=str(tmp_path / "base"))
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, ["down_proj", "q_proj", "v_proj"])
    with tempfile.TemporaryDirectory():
        adapted = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter")).eval()
        with torch.no_grad():
            theirs = adapted(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    np.testing.assert_allclose(torch_logits(tmp_path / "merged"), ours, atol=1e-5)
    assert np.abs(theirs - torch_logits(tmp_path / "base")).max() > 1e-3  # the adapter changes the model
