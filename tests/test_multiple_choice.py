"""Multiple choice by log-likelihood: ours against a direct transformers computation; the
field mappings; errors that name the row; the evaluate stage's summary."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_config  # noqa: E402
from sftmix_jax import hf, main, sharding  # noqa: E402
from sftmix_jax.stages import evaluate
from sftmix_jax import config as config_lib
from sftmix_jax.stages import multiple_choice as mc

# The answer in every form the loader takes: a 0-based index, a letter, the option's text.
QUESTIONS = [
    dict(id="q0", question="What is 2 + 2?", choices=["3", "4", "5", "22"], answer=1),
    dict(id="q1", question="Which is a colour?", choices=["table", "blue", "run"], answer="B"),
    dict(id="q2", question="The capital of France?", choices=["Paris", "Rome", "Oslo", "Lima"], answer="Paris"),
    dict(id="q3", question="Opposite of hot?", choices=["warm", "cold"], answer="b"),
    dict(id="q4", question="How many legs has a spider?", choices=["six", "eight", "ten", "four"], answer=1),
    dict(id="q5", question="Which is a fruit?", choices=["carrot", "apple", "onion", "leek"], answer="apple"),
    dict(id="q6", question="First letter of the alphabet?", choices=["z", "a", "m"], answer=1),
    dict(id="q7", question="Water freezes at (Celsius)?", choices=["0", "100", "-40", "37"], answer="A"),
]


def mc_config(source, **kw):
    cfg = config_lib.defaults().evaluate.multiple_choice
    cfg.source, cfg.batch_size = source, 8
    cfg.update_from_flattened_dict(kw)
    return cfg


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random Llama over the byte tokenizer's ids, in HF format: (torch model, path)."""
    path = str(tmp_path_factory.mktemp("mc_llama"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model, path


def torch_logliks(model, tokenizer, q, cfg):
    """Summed log p(option | prompt) per option, tokenizing prompt and prompt+option directly."""
    prompt, answers = mc.render(q, tokenizer, cfg.template, cfg.lettered)
    special = cfg.template != "chat"
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    out = []
    for a in answers:
        ids = tokenizer(prompt + a, add_special_tokens=special)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logp_LV = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        out.append(sum(float(logp_LV[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids))))
    return np.array(out), len(ids) - len(prompt_ids)


@pytest.mark.parametrize("template,lettered", [("chat", True), ("plain", False), ("alpaca", True)])
def test_logliks_match_torch(tiny_llama, tmp_path, template, lettered):
    ref, path = tiny_llama
    tok = hf.load_tokenizer("synthetic")
    cfg = mc_config(write_jsonl(tmp_path / "mc.jsonl", QUESTIONS), template=template, lettered=lettered)
    questions = mc.load_questions(cfg)
    assert [q.answer for q in questions] == [1, 1, 0, 1, 1, 1, 1, 0]
    rows = mc.score(hf.load_pretrained(path), tok, questions, cfg, buckets=(64, 128), pad_id=tok.pad_token_id)
    for q, row in zip(questions, rows):
        want = torch_logliks(ref, tok, q, cfg)[0]
        np.testing.assert_allclose(row["loglik"], want, atol=1e-4)
        assert row["choice"] == int(np.argmax(want))
        # lm-eval's acc_norm divides by the option's characters (no delimiter); acc_per_token by its tokens
        texts = [f"{'ABCDEFGH'[k]}. {c}" if lettered else c for k, c in enumerate(q.choices)]
        assert row["chars"] == [len(t) for t in texts]
        assert row["choice_norm"] == int(np.argmax(want / np.array([len(t) for t in texts])))
        assert row["choice_per_token"] == int(np.argmax(np.array(row["loglik"]) / row["tokens"]))
    assert len({r["choice"] for r in rows}) > 1, "a degenerate model would make the comparison vacuous"


def test_mesh_and_written_rows(tiny_llama, tmp_path):
    _, path = tiny_llama
    tok = hf.load_tokenizer("synthetic")
    cfg = mc_config(write_jsonl(tmp_path / "mc.jsonl", QUESTIONS))
    questions = mc.load_questions(cfg)
    plain = mc.score(hf.load_pretrained(path), tok, questions, cfg, (64,), tok.pad_token_id)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2, tensor=1)))
    model = hf.load_model(ml_collections.ConfigDict(dict(source=path, dtype="float32", param_dtype="float32",
                                                         remat="none")), mesh=mesh)
    out = tmp_path / "rows.jsonl"
    acc = mc.evaluate(model, tok, questions, cfg, (64,), tok.pad_token_id, mesh, out=str(out))
    sharded = [json.loads(line) for line in out.read_text().splitlines()]
    flat = lambda rows: np.concatenate([r["loglik"] for r in rows])  # noqa: E731
    np.testing.assert_allclose(flat(sharded), flat(plain), atol=1e-5)
    assert acc == mc.accuracy(plain) and acc["questions"] == len(QUESTIONS)
    with pytest.raises(ValueError, match=r"batch_size=6 must be a positive multiple of .* data\*fsdp=8"):
        mc.score(model, tok, questions, mc_config(cfg.source, batch_size=6), (64,), mesh=mesh)


def test_field_mappings(tmp_path):
    medqa = write_jsonl(tmp_path / "medqa.jsonl", [  # options as a dict, answer as its key
        dict(question="Q?", options={"A": "x", "B": "y", "C": "z", "D": None}, answer_idx="C")])
    (q,) = mc.load_questions(mc_config(medqa, **{"fields.choices": "options", "fields.answer": "answer_idx"}))
    assert (q.id, q.choices, q.answer) == ("0", ["x", "y", "z"], 2)
    medmcqa = write_jsonl(tmp_path / "medmcqa.jsonl", [  # one column per option, 0-based index
        dict(id="m1", question="Q?", opa="a", opb="b", opc="c", opd="d", cop=3)])
    (q,) = mc.load_questions(mc_config(medmcqa, **{"fields.choices": "opa,opb,opc,opd", "fields.answer": "cop"}))
    assert (q.id, q.choices, q.answer) == ("m1", ["a", "b", "c", "d"], 3)
    pubmedqa = write_jsonl(tmp_path / "pubmedqa.jsonl", [  # fixed options, nested list context
        dict(pubid=7, question="Q?", context={"contexts": ["one.", "two."]}, final_decision="maybe")])
    cfg = mc_config(pubmedqa, fixed_choices="yes,no,maybe", lettered=False, **{
        "fields.id": "pubid", "fields.answer": "final_decision", "fields.context": "context.contexts"})
    (q,) = mc.load_questions(cfg)
    assert (q.id, q.choices, q.answer, q.context) == ("7", ["yes", "no", "maybe"], 2, "one.\ntwo.")
    prompt, answers = mc.render(q, hf.load_tokenizer("synthetic"), "plain", False)
    assert prompt == "one.\ntwo.\n\nQ?\nAnswer:" and answers == [" yes", " no", " maybe"]


@pytest.mark.parametrize("row,kw,error", [
    (dict(id="q2", question="Q?", choices=["a", "b", "c", "d"], answer="E"), {},
     r"row 2 \(id q2\): answer 'E' is neither an index, a letter A-D nor the text of an option"),
    (dict(id="q2", question="Q?", choices=["a", "b"], answer=2), {}, r"row 2 \(id q2\): answer index 2 is out of range"),
    (dict(id="q2", question="Q?", choices=["a", "b"], answer=True), {}, r"row 2 \(id q2\): answer True"),
    (dict(id="q2", question="Q?", choices=["a", "b"], label=0), {}, r"row 2 \(id q2\): no field 'answer'"),
    (dict(question="Q?", choices="a b", answer=0), {}, r"row 2 \(id 2\): choices field 'choices' is a str"),
    (dict(id="q2", question="Q?", choices=["a"], answer=0), {}, r"row 2 \(id q2\): 1 options"),
    (dict(id="q2", question="Q?", choices=["a", " "], answer=0), {}, r"row 2 \(id q2\): option 1 is ' '"),
    (dict(id="q2", question="", choices=["a", "b"], answer=0), {}, r"row 2 \(id q2\): the question is ''"),
    (dict(id="q2", question="Q?", choices=["a", "b"], answer=0), {"fields.context": "ctx"}, r"row 0 \(id q0\): no field 'ctx'"),
])
def test_bad_rows_name_the_row(tmp_path, row, kw, error):
    path = write_jsonl(tmp_path / "bad.jsonl", QUESTIONS[:2] + [row])
    with pytest.raises(ValueError, match=error):
        mc.load_questions(mc_config(path, **kw))


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"lines \[2\] are not valid JSON"):
        mc.load_questions(mc_config(str(path)))


def test_configs_are_deltas_on_the_defaults_with_every_key():
    import importlib.util

    from conftest import ROOT

    flat = lambda d, p="": [k for key, v in d.items() for k in (flat(v, f"{p}{key}.") if isinstance(v, dict)  # noqa: E731
                                                                   else [p + key])]
    want = set(flat(config_lib.defaults().to_dict()))
    for name, arg in (("smollm2_meadow", None), ("paper", "llama31_8b_medalpaca"),
                      ("replica", "qwen25_05b_medalpaca"), ("replica", "llama32_1b_alpaca")):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert set(flat(module.get_config(arg).to_dict())) == want, name


def test_evaluate_stage_reports_accuracy(tiny_llama, tmp_path):
    """evaluate.run on two exported models: accuracies in summary.json / summary.md, rows per model."""
    _, path = tiny_llama
    workdir = tmp_path / "run"
    for stage in ("reference", "sftmix"):
        transformers.AutoModelForCausalLM.from_pretrained(path).save_pretrained(workdir / stage / "hf")
    c = tiny_config(**{"data.synthetic.num_train": 16, "data.synthetic.num_eval": 8, "evaluate.exact_match": False})
    c.evaluate.multiple_choice.source = write_jsonl(tmp_path / "mc.jsonl", QUESTIONS)
    (workdir / "evaluate").mkdir()
    evaluate.run(main.Run(c, str(workdir)))
    summary = json.loads((workdir / "summary.json").read_text())
    accs = [summary["results"][n]["multiple_choice"] for n in ("NTP reference", "SFTMix")]
    assert accs[0] == accs[1] and accs[0]["questions"] == len(QUESTIONS)
    assert "| multiple choice acc (summed log-lik) |" in (workdir / "summary.md").read_text()
    assert len((workdir / "evaluate" / "multiple_choice_sftmix.jsonl").read_text().splitlines()) == len(QUESTIONS)
    assert jax.device_count() == 8  # the stage ran on conftest's 8-device mesh


# ----------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (optional): the same choices as transformers on real questions
# ----------------------------------------------------------------------------------------
GENERAL = [
    ("What is the capital of Japan?", ["Beijing", "Seoul", "Tokyo", "Bangkok"], 2),
    ("How many days are there in a week?", ["Five", "Seven", "Ten", "Twelve"], 1),
    ("Which planet is known as the Red Planet?", ["Mars", "Venus", "Jupiter", "Saturn"], 0),
    ("What do bees make?", ["Milk", "Silk", "Honey", "Wool"], 2),
    ("Which animal is the largest mammal?", ["Elephant", "Blue whale", "Giraffe", "Horse"], 1),
    ("What is the boiling point of water at sea level?", ["50 °C", "75 °C", "100 °C", "150 °C"], 2),
    ("Which gas do plants absorb from the air?", ["Oxygen", "Carbon dioxide", "Helium", "Neon"], 1),
    ("What is 10 multiplied by 10?", ["20", "100", "1000", "110"], 1),
    ("Which ocean is the largest?", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ("Who wrote 'Romeo and Juliet'?", ["Charles Dickens", "William Shakespeare", "Jane Austen", "Mark Twain"], 1),
]


def test_smollm2_same_choices_as_transformers(smollm2_dir, tmp_path):
    tok = hf.load_tokenizer(smollm2_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    rows = [dict(id=f"g{i}", question=q, choices=c, answer=a) for i, (q, c, a) in enumerate(GENERAL)]
    cfg = mc_config(write_jsonl(tmp_path / "general.jsonl", rows))
    questions = mc.load_questions(cfg)
    ours = mc.score(hf.load_pretrained(smollm2_dir), tok, questions, cfg, (96, 128), tok.pad_token_id)
    diffs, same = [], 0
    for q, row in zip(questions, ours):
        want = torch_logliks(ref, tok, q, cfg)[0]
        diffs.append(np.abs(np.array(row["loglik"]) - want).max())
        same += row["choice"] == int(np.argmax(want))
    acc = mc.accuracy(ours)
    print(f"SmolLM2 MC: acc {acc['acc']:.2f} (acc_norm {acc['acc_norm']:.2f}, per token {acc['acc_per_token']:.2f}), "
          f"same choice {same}/{len(GENERAL)}, max |log-lik diff| {max(diffs):.2e}")
    assert same == len(GENERAL)
    assert max(diffs) < 1e-3
    assert acc["acc"] >= 0.5, "a chat model should answer most of these"


def test_smollm2_boundary_merge_tokenized_apart(smollm2_dir):
    tok = hf.load_tokenizer(smollm2_dir)
    # "Answer: " + "Paris": the prompt's trailing space merges into " Paris" in the joint text.
    prompt_ids, (option,), apart = mc.tokenize_options(tok, "Answer: ", ["Paris"], "plain")
    assert apart == 1 and option == tok("Paris", add_special_tokens=False)["input_ids"]
    assert prompt_ids == tok("Answer: ")["input_ids"]
    _, (option,), apart = mc.tokenize_options(tok, "Answer:", [" Paris"], "plain")
    assert apart == 0 and tok.decode(option) == " Paris"


def test_evaluate_stage_other_set(tiny_llama, tmp_path):
    """evaluate.other: perplexity on a second file. Given the held-out rows themselves it must equal
    the held-out numbers; per-example rows go to evaluate/other_<stage>.jsonl."""
    from sftmix_jax.data import synthetic

    _, path = tiny_llama
    workdir = tmp_path / "run"
    for stage in ("reference", "sftmix"):
        transformers.AutoModelForCausalLM.from_pretrained(path).save_pretrained(workdir / stage / "hf")
    c = tiny_config(**{"data.synthetic.num_train": 16, "data.synthetic.num_eval": 8, "evaluate.exact_match": False})
    rows = synthetic.generate(24, c.data.synthetic.seed)[16:]
    (tmp_path / "other.json").write_text(json.dumps(rows))
    c.evaluate.other.source = str(tmp_path / "other.json")
    (workdir / "evaluate").mkdir()
    evaluate.run(main.Run(c, str(workdir)))
    summary = json.loads((workdir / "summary.json").read_text())
    for name, stage in (("NTP reference", "reference"), ("SFTMix", "sftmix")):
        m = summary["results"][name]
        assert m["other"]["loss"] == pytest.approx(m["loss"], rel=1e-12) and m["other"]["tokens"] == m["tokens"]
        per = [json.loads(line) for line in open(workdir / "evaluate" / f"other_{stage}.jsonl")]
        assert len(per) == 8 and sum(r["nll"] for r in per) / sum(r["tokens"] for r in per) == pytest.approx(m["loss"])
    assert "| other-set perplexity |" in (workdir / "summary.md").read_text()
