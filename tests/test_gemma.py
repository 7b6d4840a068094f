"""Gemma (v1) and Gemma-2 against transformers' PyTorch models: logits on a right-padded batch,
save/load both ways, the soft-caps and sliding windows mattering, the fused loss, decoding, sharding."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import test_model  # noqa: E402
from conftest import mesh_of  # noqa: E402
from sftmix_jax import hf, losses, sharding  # noqa: E402
from sftmix_jax.model import decode  # noqa: E402
from sftmix_jax.model.llama import abstract_model  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, initializer_range=0.3,
             attn_implementation="eager")
CASES = {  # Gemma: multi-query; Gemma-2: windows of 4 on layers 0 and 2 of 12 tokens, caps small enough to bend
    "gemma": (transformers.GemmaConfig, dict(SMALL, num_hidden_layers=2, num_key_value_heads=1, head_dim=32)),
    "gemma2": (transformers.Gemma2Config, dict(SMALL, num_hidden_layers=4, num_key_value_heads=2, head_dim=16,
                                               query_pre_attn_scalar=24, sliding_window=4,
                                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}


def make_hf(kind, path):
    """transformers' model of CASES[kind], its norms randomised (HF zero-inits Gemma's offsets), saved."""
    return test_model.make_hf(*CASES[kind], path)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    return make_hf(request.param, path), hf.load_pretrained(path)


def batch():
    ids = np.random.default_rng(0).integers(0, 128, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as in training batches
    mask[2, 10:] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def variant(model, **changes):
    """The same weights under a changed config (the cap or window dropped)."""
    other = abstract_model(dataclasses.replace(model.cfg, **changes))  # shapes only: no random init
    nnx.update(other, nnx.state(model))
    return other


def test_config_switches(pair):
    ref, ours = pair
    cfg = ours.cfg
    assert cfg.embed_scale and cfg.norm_plus_one and cfg.activation == "gelu_tanh" and cfg.tie_embeddings
    if cfg.model_type == "gemma2":
        assert cfg.post_norms and cfg.sliding_layers == (True, False, True, False) and cfg.sliding_window == 4
        assert (cfg.attn_softcap, cfg.final_softcap, cfg.query_pre_attn_scalar) == (5.0, 3.0, 24.0)
    else:
        assert cfg.num_kv_heads == 1 and not cfg.post_norms and cfg.final_softcap is None


def test_logits_match_transformers(pair):
    ref_model, ours = pair
    ids, mask = batch()
    ref = torch_logits(ref_model, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ref).max() > 1.0, "logits too small for the comparison to mean anything"
    for got in (ours(jnp.asarray(ids), jnp.asarray(mask)), ours(jnp.asarray(ids))):  # padded; right-padded fast path
        err = np.abs(np.asarray(got) - ref)[valid].max()
        print(f"{ours.cfg.model_type}: max |ours - transformers| = {err:.2e}")
        assert err < 1e-4
    if ours.cfg.model_type == "gemma2":  # each Gemma-2 feature changes the logits well past the tolerance
        for changes in (dict(attn_softcap=None), dict(final_softcap=None), dict(sliding_layers=(False,) * 4),
                        dict(query_pre_attn_scalar=None)):
            assert np.abs(np.asarray(variant(ours, **changes)(jnp.asarray(ids))) - ref)[valid].max() > 1e-2, changes


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    ref_model, ours = pair
    hf.save_pretrained(ours, str(tmp_path))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(back) is type(ref_model)
    assert back.config.architectures == [type(ref_model).__name__]
    theirs, mine = back.state_dict(), ref_model.state_dict()
    assert sorted(theirs) == sorted(mine)
    for name in mine:
        assert torch.equal(theirs[name], mine[name]), name
    ids, mask = batch()
    np.testing.assert_array_equal(torch_logits(back, ids, mask), torch_logits(ref_model, ids, mask))
    assert hf.load_pretrained(str(tmp_path)).cfg == ours.cfg


def test_fused_loss_and_gradients_match_plain_cross_entropy(pair):
    """NTP through the fused head (capped logits inside its chunks) against plain cross-entropy on
    the model's logits: loss and every parameter's gradient."""
    _, ours = pair
    ids, mask = batch()
    targets = jnp.asarray(np.roll(ids, -1, axis=1))
    weights = jnp.asarray(mask * (np.arange(12) >= 3), jnp.float32)  # a 3-token prompt, then the response
    graphdef, params = nnx.split(ours)

    def fused(p):
        model = nnx.merge(graphdef, p)
        return losses.ntp_loss(model.hidden(jnp.asarray(ids)), model.linear_head(), targets, weights)[0]

    def plain(p):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, p)(jnp.asarray(ids)), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights)

    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f))(params) for f in (fused, plain))
    assert abs(float(a) - float(b)) < 1e-5
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_greedy_decoding_matches_the_uncached_forward(pair):
    """The KV cache (sliding layers masked by window) against argmax of the full forward."""
    _, ours = pair
    prompts = [[5, 17, 99, 3, 42, 8, 61], [7, 1, 120, 33, 2, 90, 14, 77, 26, 50]]
    got = decode.generate(ours, prompts, max_new_tokens=4, batch_size=2, pad_to=4)
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))  # right-padded to 16: one compiled shape
    ids = np.zeros((2, 16), np.int32)
    n = np.array([len(p) for p in prompts])
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = p
    for _ in range(4):
        logits = np.asarray(forward(state, jnp.asarray(ids)))
        ids[np.arange(2), n] = logits[np.arange(2), n - 1].argmax(-1)
        n += 1
    assert got == [ids[row, len(p):n[row]].tolist() for row, p in enumerate(prompts)]


def test_sharded_forward_matches_one_device(tmp_path):
    make_hf("gemma2", str(tmp_path))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 128, (4, 12)))
    ref = np.asarray(hf.load_pretrained(str(tmp_path))(ids))
    mesh = mesh_of((2, 2, 2))
    place = lambda key, var: sharding.named_sharding(mesh, var.get_metadata().get("out_sharding") or ())  # noqa: E731
    with jax.set_mesh(mesh):
        model = hf.load_pretrained(str(tmp_path), shardings=place)
        assert model.layers[0].post_mlp_norm.scale[...].sharding.spec == jax.sharding.PartitionSpec(None)
        graphdef, state = nnx.split(model)
        got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


@pytest.mark.parametrize("edit,match", [
    (dict(model_type="gemma3"), "model_type 'gemma3' is not supported"),
    (dict(model_type="gemma", hidden_act="gelu_new"), "hidden_act 'gelu_new'"),
    (dict(model_type="gemma2", hidden_activation="silu"), "hidden_activation 'silu'"),
    (dict(model_type="gemma2", layer_types=["chunked_attention", "full_attention"]), "layer_types"),
    (dict(model_type="gemma2", use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(model_type="gemma2", sliding_window=None), "sliding_window"),
])
def test_unsupported_config_is_named(edit, match):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match=match):
        hf.config_from_hf({**base, **edit})


def test_config_to_hf_refuses_what_the_family_cannot_say():
    cfg = hf.config_from_hf(dict(CASES["gemma2"][1], model_type="gemma2", num_hidden_layers=4))
    with pytest.raises(ValueError, match="cannot express this model: post_norms"):
        hf.config_to_hf(dataclasses.replace(cfg, post_norms=False))
    with pytest.raises(ValueError, match="cannot export the Gemma options embed_scale"):
        hf.config_to_hf(dataclasses.replace(cfg, model_type="llama", norm_plus_one=False, activation="silu",
                                            post_norms=False, query_pre_attn_scalar=None, attn_softcap=None,
                                            final_softcap=None, sliding_layers=()))
