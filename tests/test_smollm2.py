"""Optional: the real SmolLM2-135M-Instruct checkpoint against transformers (skips when absent)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from sftmix_jax import hf  # noqa: E402
from sftmix_jax.model.decode import generate  # noqa: E402


@pytest.fixture(scope="module")
def models(smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tok, ref, hf.load_pretrained(smollm2_dir)


def prompt_ids(tok, n=64):
    text = "Explain in a few sentences why the sky is blue and why sunsets look red, for a curious child"
    msgs = [{"role": "user", "content": text}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
    while len(ids) < n:  # lengthen the question until the chat-templated prompt has n tokens
        text += " who asks many questions"
        msgs = [{"role": "user", "content": text}]
        ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
    return ids[-n:] if len(ids) > n else ids


def test_logits_and_greedy_tokens_match(models):
    tok, ref, ours = models
    ids = prompt_ids(tok)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits.numpy()
        ref_new = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    mine = np.asarray(ours(jnp.asarray([ids])))
    assert np.abs(mine - theirs).max() < 1e-3
    assert generate(ours, [ids], 20) == [ref_new]


def test_export_loads_in_transformers(models, tmp_path):
    tok, ref, ours = models
    hf.save_pretrained(ours, str(tmp_path), tokenizer=tok)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.tensor([prompt_ids(tok)])
    with torch.no_grad():
        exported, original = back(ids).logits.numpy(), ref(ids).logits.numpy()
    # The export is weight-exact: transformers gives bit-identical logits on it ...
    assert np.abs(exported - original).max() == 0.0
    # ... and ours, jitted as the pipeline computes them, differ from it only by float32 rounding
    # (|logits| ~40, 30 layers, hidden states up to 2e4): two independent float32 roundings of the
    # same model sit ~1e-4 apart, so the test asks for 1e-3, and for ours to be no more than twice
    # as far from exact float64 logits as transformers' own float32 ones.
    graphdef, state = nnx.split(ours)
    mine = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(ids.numpy())))
    assert np.abs(mine - exported).max() < 1e-3
    with torch.no_grad():
        exact = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
        exact = exact(ids).logits.numpy()
    assert np.abs(mine - exact).max() <= 2 * np.abs(exported - exact).max()
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).chat_template == tok.chat_template


def test_export_reads_the_same_in_transformers_4(models, tmp_path, smollm2_dir, transformers4):
    """The export carries RoPE theta 1e5 in both schemas: transformers 4.x computes 5.x's logits."""
    from test_hf_export import logits_in

    tok, ref, ours = models
    hf.save_pretrained(ours, str(tmp_path), tokenizer=tok, source=smollm2_dir)
    ids = [prompt_ids(tok)]
    logits_in(transformers4, ids, tmp_path)
    with torch.no_grad():
        five = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
        five = five(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.load(tmp_path / "logits4.npy") - five).max() <= 1e-5
