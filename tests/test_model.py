"""The Flax model against transformers' PyTorch models: load, logits, save, errors."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sftmix_jax import hf  # noqa: E402
from sftmix_jax.model.llama import init_model  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
CASES = {
    "llama_gqa": (transformers.LlamaConfig, dict(SMALL)),
    "llama_mha_bias": (transformers.LlamaConfig, dict(SMALL, num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama3_tied": (transformers.LlamaConfig, dict(SMALL, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE,
                                                    rope_theta=500000.0, max_position_embeddings=64)),
    "mistral_window": (transformers.MistralConfig, dict(SMALL, sliding_window=5, head_dim=16)),
    "qwen2_tied": (transformers.Qwen2Config, dict(SMALL, tie_word_embeddings=True)),
    "qwen2_untied": (transformers.Qwen2Config, dict(SMALL, rope_theta=1e6)),
}


def make_hf(cls, kwargs, path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**kwargs)).eval()
    with torch.no_grad():  # HF zero-inits biases and ones norms: randomise them so they count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    cls, kwargs = CASES[request.param]
    return make_hf(cls, kwargs, path), hf.load_pretrained(path), path


def batch(vocab, pad=True):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (3, 12))
    mask = np.ones_like(ids)
    if pad:  # right padding, as in training batches
        mask[1, 7:] = 0
        mask[2, 10:] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_logits_match_transformers(pair):
    ref_model, ours, _ = pair
    ids, mask = batch(ref_model.config.vocab_size)
    ref = torch_logits(ref_model, ids, mask)
    assert np.abs(ref).max() > 1.0, "logits too small for the comparison to mean anything"
    valid = mask.astype(bool)
    with_mask = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(with_mask - ref)[valid].max() < 1e-4
    # The fast path (causal mask only) gives the same logits on real tokens of a right-padded batch.
    no_mask = np.asarray(ours(jnp.asarray(ids)))
    assert np.abs(no_mask - ref)[valid].max() < 1e-4


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    ref_model, ours, _ = pair
    ids, mask = batch(ref_model.config.vocab_size)
    hf.save_pretrained(ours, str(tmp_path))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(back) is type(ref_model)
    theirs = torch_logits(back, ids, mask)
    mine = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(theirs - mine)[mask.astype(bool)].max() < 1e-4


def test_sharded_checkpoint_round_trip(tmp_path):
    ref_model = make_hf(*CASES["llama_gqa"], str(tmp_path / "src"))
    ours = hf.load_pretrained(str(tmp_path / "src"))
    hf.save_pretrained(ours, str(tmp_path / "out"), max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    again = hf.load_pretrained(str(tmp_path / "out"))
    ids, mask = batch(97)
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids))), np.asarray(ours(jnp.asarray(ids))), atol=1e-6)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert np.abs(torch_logits(back, ids, mask) - torch_logits(ref_model, ids, mask))[mask.astype(bool)].max() < 1e-5


def test_bfloat16_compute_is_close():
    cfg = hf.config_from_hf(dict(CASES["llama_gqa"][1], model_type="llama"))
    f32 = init_model(cfg)
    bf16 = init_model(dataclasses.replace(cfg, dtype="bfloat16"))
    ids, _ = batch(97, pad=False)
    a, b = np.asarray(f32(jnp.asarray(ids))), np.asarray(bf16(jnp.asarray(ids)), dtype=np.float32)
    assert np.asarray(bf16(jnp.asarray(ids))).dtype == jnp.bfloat16
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-2


# ----------------------------------------------------------------------------------------
# Errors name the field or tensor
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("good"))
    make_hf(*CASES["llama_gqa"], path)
    return path


def edited_copy(good_dir, tmp_path, config=None, tensors=None):
    from safetensors.numpy import load_file, save_file
    cfg = json.load(open(os.path.join(good_dir, "config.json")))
    cfg.update(config or {})
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    weights = load_file(os.path.join(good_dir, "model.safetensors"))
    for k, v in (tensors or {}).items():
        if v is None:
            weights.pop(k)
        else:
            weights[k] = v
    save_file(weights, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


@pytest.mark.parametrize("config,match", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
])
def test_unsupported_config_is_named(good_dir, tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        hf.load_pretrained(edited_copy(good_dir, tmp_path, config=config))


def test_missing_tensor_is_named(good_dir, tmp_path):
    path = edited_copy(good_dir, tmp_path, tensors={"model.layers.1.mlp.up_proj.weight": None})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        hf.load_pretrained(path)


def test_misshaped_tensor_is_named(good_dir, tmp_path):
    path = edited_copy(good_dir, tmp_path, tensors={"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"):
        hf.load_pretrained(path)


def test_unused_tensor_is_named(good_dir, tmp_path):
    path = edited_copy(good_dir, tmp_path, tensors={"model.layers.0.extra.weight": np.zeros((3,), np.float32)})
    with pytest.raises(ValueError, match=r"does not use.*model\.layers\.0\.extra\.weight"):
        hf.load_pretrained(path)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        hf.load_pretrained(str(tmp_path / "nope"))


@pytest.mark.parametrize("L,N,K", [(200, 4, 2), (64, 4, 4), (7, 6, 3)])
def test_causal_attention_matches_dot_product_attention(L, N, K):
    """The blockwise causal path (training) against jax.nn.dot_product_attention, with gradients;
    L=200 leaves a partial last block."""
    from sftmix_jax.ops.attention import causal_attention

    q, k, v = (jax.random.normal(jax.random.key(i), (2, L, n, 16)) for i, n in enumerate((N, K, K)))
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.25)  # noqa: E731
    ours = lambda q, k, v: causal_attention(q, k, v, 0.25)  # noqa: E731
    np.testing.assert_allclose(np.asarray(ours(q, k, v)), np.asarray(ref(q, k, v)), atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    for a, b in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("eq,x_shape,w_shape", [("BLD,DF->BLF", (2, 5, 8), (8, 6)), ("BLD,DNH->BLNH", (2, 5, 8), (8, 3, 4)),
                                                 ("BLNH,NHD->BLD", (2, 5, 3, 4), (3, 4, 8))])
def test_cpu_einsum_gradients_match_autodiff(eq, x_shape, w_shape):
    """Dense's CPU einsum (dW from an explicit x^T) against autodiff of jnp.einsum, in float64;
    a frozen kernel (LoRA) costs two dots (forward, dx), no dW."""
    from sftmix_jax.ops.cpu import cpu_einsum

    with jax.enable_x64():
        x, w = (jax.random.normal(jax.random.key(i), s, jnp.float64) for i, s in enumerate((x_shape, w_shape)))
        loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(eq, x, w)))  # noqa: E731
        ours, ref = jax.jit(jax.grad(loss(cpu_einsum), (0, 1)))(x, w), jax.grad(loss(jnp.einsum), (0, 1))(x, w)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape and np.abs(np.asarray(b)).max() > 1e-2
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
        frozen = jax.jit(jax.grad(loss(cpu_einsum), 0))
        np.testing.assert_allclose(np.asarray(frozen(x, w)), np.asarray(ref[0]), rtol=1e-12, atol=1e-12)
        assert frozen.lower(x, w).as_text().count("dot_general") == 2


def test_rope_gradient_is_the_transposed_rotation():
    """apply_rope and its hand-written VJP against NumPy's matrix per position (float64), with cos /
    sin halves that differ, so the VJP must be the exact transpose, not a rotation by -angle."""
    from sftmix_jax.model.llama import apply_rope

    rng = np.random.default_rng(3)
    B, L, N, H = 2, 5, 3, 8
    x, g = rng.normal(size=(B, L, N, H)), rng.normal(size=(B, L, N, H))
    cos, sin = rng.normal(size=(B, L, H)), rng.normal(size=(B, L, H))
    R = np.zeros((B, L, H, H))  # y = R x: y_i = c_i x_i - s_i x_{i+H/2}, y_{i+H/2} = c_{i+H/2} x_{i+H/2} + s_{i+H/2} x_i
    for i in range(H):
        R[:, :, i, i] = cos[:, :, i]
    for i in range(H // 2):
        R[:, :, i, i + H // 2], R[:, :, i + H // 2, i] = -sin[:, :, i], sin[:, :, i + H // 2]
    with jax.enable_x64():
        y, vjp = jax.vjp(lambda x: apply_rope(x, jnp.asarray(cos), jnp.asarray(sin)), jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(y), np.einsum("blij,blnj->blni", R, x), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), np.einsum("blij,blni->blnj", R, g),
                                   rtol=1e-12, atol=1e-12)


def test_attention_switch_gives_the_same_model():
    """config.model.attention: 'xla' (jax.nn.dot_product_attention) and 'blocked' give one model,
    loss and gradients; 'auto' is the blocked path on CPU and cuDNN only on GPU in 16 bits."""
    from flax import nnx

    from sftmix_jax.model.llama import ModelConfig
    from sftmix_jax.ops.attention import attention_impl

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    ids = jax.random.randint(jax.random.key(0), (2, 100), 0, 64)
    results = []
    for impl in ("blocked", "xla"):
        graphdef, params = nnx.split(init_model(dataclasses.replace(cfg, attention=impl)))
        results.append(jax.value_and_grad(
            lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(ids))[..., 0]))(params))
    assert abs(float(results[0][0]) - float(results[1][0])) < 1e-6
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert attention_impl("auto", "bfloat16") == ("cudnn" if jax.default_backend() == "gpu" else "blocked")
    assert attention_impl("auto", "float32") == "blocked"
    with pytest.raises(ValueError, match="model attention 'flash' is not one of auto, blocked, xla, cudnn, splash"):
        dataclasses.replace(cfg, attention="flash")
