"""Packed scoring (several examples per row): the packer, and per-example scores equal to one example
per row on the tiny model, Gemma-2 (windows + soft-caps), a mesh, multiple choice and SmolLM2."""
import dataclasses
import json

import ml_collections
import numpy as np
import pytest

from conftest import mesh_of, tiny_config
from sftmix_jax import config as config_lib
from sftmix_jax import hf, scoring
from sftmix_jax.data import sources, synthetic
from sftmix_jax.data.batching import PackedBatches, collate, pack_rows
from sftmix_jax.model.llama import init_model


def fake_examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        mask = (np.arange(n) >= n // 3).astype(np.int8)  # a prompt, then the response
        out.append(sources.Example(id=str(i), input_ids=rng.integers(3, 100, n).astype(np.int32), loss_mask=mask,
                                   prompt_ids=np.zeros(0, np.int32), answer=""))
    return out


def test_pack_rows_fills_rows_without_splitting_examples():
    lengths = np.random.default_rng(0).integers(1, 65, 500)
    rows = pack_rows(lengths, 64, max_segments=5)
    assert sorted(i for r in rows for i in r) == list(range(500))  # each example once, whole
    assert max(lengths[r].sum() for r in rows) <= 64 and max(map(len, rows)) <= 5
    assert lengths.sum() / (64 * len(rows)) > 0.9  # 0.945 (half the examples are longer than half a row)


def test_packed_batches_restore_order_and_never_target_the_next_example():
    examples = fake_examples([5, 17, 30, 3, 64, 80, 12, 9, 33, 2, 64])  # 80 > the largest bucket
    batches = PackedBatches(examples, 2, (32, 64))
    assert batches.segments in (2, 4, 8) and len(batches) == len(list(batches))
    seen = []
    for b in batches:
        seg_BL, pos_BL = b["segment_ids"], b["positions"]
        for r, z in zip(*np.nonzero(b["index"] >= 0)):
            e, on = examples[b["index"][r, z]], seg_BL[r] == z + 1
            want = collate([e], np.array([0]), len(e.input_ids))  # one example per row, as unpacked
            np.testing.assert_array_equal(b["input_ids"][r][on], e.input_ids)
            np.testing.assert_array_equal(b["targets"][r][on], want["targets"][0])
            np.testing.assert_array_equal(b["weights"][r][on], want["weights"][0])
            np.testing.assert_array_equal(pos_BL[r][on], np.arange(len(e.input_ids)))
            seen.append(int(b["index"][r, z]))
        # a position whose next token is another example's (or padding) predicts nothing
        assert not (b["weights"][:, :-1] * (seg_BL[:, 1:] != seg_BL[:, :-1])).any()
        assert not b["weights"][seg_BL == 0].any()
    assert sorted(seen) == list(range(len(examples)))
    assert {b["input_ids"].shape[1] for b in batches} == {64, 128}  # the long example: rows of the fallback


def compare(model, examples, buckets, batch_size=8, mesh=None):
    """(packed, unpacked) per-example (nll, count); asserts they agree and returns max |difference|."""
    packed = scoring.example_nll(model, examples, batch_size, buckets, mesh=mesh, pack=True)
    plain = scoring.example_nll(model, examples, batch_size, buckets, pack=False)
    np.testing.assert_array_equal(packed[1], plain[1])
    assert plain[1].min() > 0 and plain[0].min() > 0
    diff = np.abs(packed[0] - plain[0])
    print(f"max |packed - unpacked| {diff.max():.3g} (relative {np.max(diff / plain[0]):.3g}) over {len(examples)}")
    np.testing.assert_allclose(packed[0], plain[0], rtol=1e-5)
    return diff.max()


@pytest.fixture(scope="module")
def tiny():
    c = tiny_config()
    train_ex, _, _ = sources.load_examples(c.data, synthetic.make_tokenizer(), c.seed)
    # sharper attention than the default init: a leak across examples would move the scores more
    cfg = dataclasses.replace(hf.model_config(c.model), initializer_range=0.2)
    return cfg, train_ex[:60], c.data.buckets


# blocked: the segment-masked blocked kernel (CPU's); xla: a dense [B, L, L] mask (accelerators')
@pytest.mark.parametrize("attention", ["blocked", "xla"])
def test_packed_scores_equal_one_example_per_row(tiny, attention):
    cfg, examples, buckets = tiny
    compare(init_model(dataclasses.replace(cfg, attention=attention)), examples, buckets)


@pytest.mark.parametrize("attention", ["blocked", "xla"])
def test_packed_gemma2_windows_and_softcaps(tiny, attention):
    cfg, examples, buckets = tiny  # windows of 8 tokens on layers 0 and 2: shorter than most examples
    gemma2 = dataclasses.replace(cfg, model_type="gemma2", num_layers=4, embed_scale=True, norm_plus_one=True,
                                 activation="gelu_tanh", post_norms=True, query_pre_attn_scalar=24.0,
                                 attn_softcap=5.0, final_softcap=3.0, sliding_window=8,
                                 sliding_layers=(True, False, True, False), attention=attention)
    compare(init_model(gemma2), examples, buckets)


def test_packed_scores_on_a_mesh(tiny):
    cfg, examples, buckets = tiny
    compare(init_model(cfg), examples[:30], buckets, mesh=mesh_of((2, 1, 2)))


def test_multiple_choice_packed_equals_unpacked(tmp_path):
    from test_multiple_choice import QUESTIONS, mc_config, write_jsonl

    from sftmix_jax.stages import multiple_choice as mc

    tok = hf.load_tokenizer("synthetic")
    cfg = mc_config(write_jsonl(tmp_path / "mc.jsonl", QUESTIONS), template="chat", lettered=True)
    questions = mc.load_questions(cfg)
    model = init_model(dataclasses.replace(tiny_config_model(), vocab_size=len(tok), initializer_range=0.2))
    packed, plain = (mc.score(model, tok, questions, cfg, (64, 128), tok.pad_token_id, pack=p) for p in (True, False))
    got, want = (np.concatenate([r["loglik"] for r in rows]) for rows in (packed, plain))
    print(f"multiple choice: max |packed - unpacked| {np.abs(got - want).max():.3g}")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert [r["choice"] for r in packed] == [r["choice"] for r in plain]


def tiny_config_model():
    return hf.model_config(tiny_config().model)


def test_smollm2_packed_equals_unpacked(smollm2_dir):
    tok = hf.load_tokenizer(smollm2_dir)
    examples = []
    for k, (q, a) in enumerate([("What is a fever?", "A body temperature above about 38 C, often from infection."),
                                ("Name a symptom of flu.", "Muscle aches."),
                                ("What does the liver do? Explain briefly.", "It filters blood, stores glycogen "
                                 "and makes bile, proteins and clotting factors."),
                                ("Define hypertension.", "Blood pressure that stays at or above 130/80 mmHg."),
                                ("Is aspirin an NSAID?", "Yes."),
                                ("Why wash hands?", "To remove germs that spread disease.")]):
        user = [{"role": "user", "content": q}]
        text = lambda msgs, **kw: tok.apply_chat_template(msgs, tokenize=False, **kw)  # noqa: E731
        prompt = tok(text(user, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        ids = tok(text(user + [{"role": "assistant", "content": a}]), add_special_tokens=False)["input_ids"]
        examples.append(sources.Example(id=str(k), input_ids=np.asarray(ids, np.int32), answer=a,
                                        loss_mask=(np.arange(len(ids)) >= len(prompt)).astype(np.int8),
                                        prompt_ids=np.asarray(prompt, np.int32)))
    compare(hf.load_pretrained(smollm2_dir), examples, (64, 128, 256), batch_size=2)


def test_config_key_validated_and_old_workdirs_resume(tmp_path):
    c = config_lib.defaults()
    assert c.scoring.pack is True
    c.scoring = ml_collections.ConfigDict(dict(pack="yes"))  # a config file's own block (the field is typed)
    with pytest.raises(ValueError, match=r"config.scoring.pack='yes'"):
        config_lib.validate(c, ["confidence"], 1)
    new = json.loads(config_lib.defaults().to_json_best_effort())
    old = {k: v for k, v in new.items() if k != "scoring"}  # a workdir from before the key
    (tmp_path / "config.json").write_text(json.dumps(old))
    config_lib.check_workdir_config(str(tmp_path), new)


@pytest.mark.parametrize("gemma2", [False, True], ids=["llama", "gemma2-windows"])
def test_packed_scores_with_scanned_layers(tiny, gemma2):
    """model.scan_layers: one segment mask for every layer, or dense masks indexed per layer (windows)."""
    cfg, examples, buckets = tiny
    if gemma2:
        cfg = dataclasses.replace(cfg, model_type="gemma2", num_layers=4, post_norms=True, attn_softcap=5.0,
                                  sliding_window=8, sliding_layers=(True, False, True, False))
    compare(init_model(dataclasses.replace(cfg, scan_layers=True)), examples[:30], buckets)
