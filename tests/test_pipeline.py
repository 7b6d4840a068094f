"""The whole pipeline on a shrunken configs/tiny.py: layout, skipping, resume after SIGKILL."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from sftmix_jax import main

from conftest import OVERRIDES, ROOT, tiny_config  # noqa: E402
from sftmix_jax import config as config_lib


def test_workdir_layout(workdir):
    steps = json.load(open(os.path.join(workdir, "reference", "done.json")))["replay_steps"]
    assert steps == [8, 16, 24]
    expected = ["config.json", "confidence/scores.jsonl", "confidence/data_map.png", "summary.json", "summary.md"]
    expected += [f"reference/checkpoints/{s}/params" for s in steps] + ["sftmix/checkpoints/24/params"]
    for stage in ("reference", "sftmix"):
        expected += [f"{stage}/hf/config.json", f"{stage}/hf/model.safetensors", f"{stage}/metrics.jsonl", f"{stage}/tb"]
    missing = [p for p in expected if not os.path.exists(os.path.join(workdir, p))]
    assert not missing
    rows = [json.loads(line) for line in open(os.path.join(workdir, "confidence", "scores.jsonl"))]
    assert len(rows) == OVERRIDES["num_train"]
    assert set(rows[0]) == {"id", "perplexity", "confidence", "variability", "split"}
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary["results"]) == {"NTP reference", "SFTMix"}
    assert "exact_match" in summary["results"]["SFTMix"]
    md = open(os.path.join(workdir, "summary.md")).read()
    assert "| held-out loss |" in md and "NTP reference" in md and "SFTMix" in md
    for stage, label in (("reference", "NTP reference"), ("sftmix", "SFTMix")):  # per-example rows: compare's bootstrap
        rows = [json.loads(line) for line in open(os.path.join(workdir, "evaluate", f"heldout_{stage}.jsonl"))]
        assert len(rows) == OVERRIDES["num_eval"] and set(rows[0]) == {"id", "nll", "tokens"}
        loss = sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)
        assert loss == pytest.approx(summary["results"][label]["loss"], rel=1e-12)


def test_reference_loss_falls(workdir):
    evals = [json.loads(line) for line in open(os.path.join(workdir, "reference", "metrics.jsonl"))]
    evals = [r["eval_loss"] for r in evals if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]  # steps 0, 12, 24


def test_finished_stages_are_skipped(workdir):
    ran = [s for s in config_lib.STAGES if s != "baseline"]  # baseline: weak-to-strong only
    stamps = {s: os.path.getmtime(os.path.join(workdir, s, "done.json")) for s in ran}
    t = time.time()
    main.run_stages(tiny_config(), workdir)
    assert time.time() - t < 30
    assert stamps == {s: os.path.getmtime(os.path.join(workdir, s, "done.json")) for s in ran}
    assert not os.path.exists(os.path.join(workdir, "baseline"))


def test_workdir_with_other_config_is_refused(workdir):
    with pytest.raises(SystemExit, match=r"different config.*train\.lr"):
        main.run_stages(tiny_config(**{"train.lr": 1e-4}), workdir)


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown stage.*'refrence'"):
        main.run_stages(tiny_config(stages="refrence,sftmix"), str(tmp_path))


# ----------------------------------------------------------------------------------------
# SIGKILL mid-training, rerun, same final parameters
# ----------------------------------------------------------------------------------------
def cli(workdir, steps=40):
    return [sys.executable, "-m", "sftmix_jax.main", "--config", os.path.join(ROOT, "configs", "tiny.py"),
            "--workdir", workdir, "--config.stages=reference", "--config.model.source=init", "--config.train.lr=3e-3",
            f"--config.train.steps={steps}",
            "--config.train.save_every=10", "--config.train.eval_every=0", "--config.train.batch_size=16",
            "--config.data.synthetic.num_train=160", "--config.data.synthetic.num_eval=16"]


ENV = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's run


def final_weights(workdir):
    return load_file(os.path.join(workdir, "reference", "hf", "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("straight"))
    subprocess.run(cli(d), env=ENV, check=True, capture_output=True)
    return final_weights(d)


def start_and_wait_for_checkpoint(workdir, step):
    proc = subprocess.Popen(cli(workdir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = os.path.join(workdir, "reference", "checkpoints", str(step), "params")
    deadline = time.time() + 240
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be stopped: {proc.stderr.read()[-2000:]}"
    return proc


def assert_same(a, b):
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def test_sigkill_and_resume_gives_the_same_parameters(tmp_path, straight):
    killed = str(tmp_path / "killed")
    proc = start_and_wait_for_checkpoint(killed, 20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "reference", "done.json"))
    resumed = subprocess.run(cli(killed), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stderr
    assert_same(straight, final_weights(killed))
    # metrics.jsonl has no duplicated steps after the resume
    steps = [json.loads(line)["step"] for line in open(os.path.join(killed, "reference", "metrics.jsonl"))]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)


def test_sigterm_saves_exits_nonzero_and_resumes(tmp_path, straight):
    stopped = str(tmp_path / "stopped")
    proc = start_and_wait_for_checkpoint(stopped, 10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by a signal after step" in err and "Rerun the same command to resume" in err
    step = int(re.search(r"stopped by a signal after step (\d+)", err).group(1))
    assert os.path.exists(os.path.join(stopped, "reference", "checkpoints", str(step), "params"))
    resumed = subprocess.run(cli(stopped), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(straight, final_weights(stopped))


def test_exported_model_generates_like_transformers(workdir):
    """The pipeline's HF export in transformers: the same greedy tokens as sftmix_jax.cli.generate,
    prompts from the chat template exactly as `python -m sftmix_jax.cli.generate` builds them."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from sftmix_jax import hf
    from sftmix_jax.cli import generate

    path = os.path.join(workdir, "sftmix", "hf")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ours = hf.load_pretrained(path)
    prompts = ["Reverse: hello", "Upper-case: jax", "Sort the digits: 93124", "Add: 12+30", "Copy: ab"]
    ids = [generate.prompt_ids(tok, p) for p in prompts]
    upto_eos = lambda row: row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row  # noqa: E731
    mine = [upto_eos(row) for row in generate.generate(ours, ids, 12)]
    with torch.no_grad():
        theirs = [upto_eos(ref.generate(torch.tensor([i]), max_new_tokens=12, do_sample=False,
                                        pad_token_id=tok.pad_token_id)[0, len(i):].tolist()) for i in ids]
    assert mine == theirs


def test_generate_cli_prints_the_answer(workdir, capsys):
    from sftmix_jax import hf
    from sftmix_jax.cli import generate

    path = os.path.join(workdir, "sftmix", "hf")
    generate.main(["--model", path, "--prompt", "Sort the digits: 3141", "--max_new_tokens", "8"])
    tok = hf.load_tokenizer(path)
    out = generate.generate(hf.load_pretrained(path), [generate.prompt_ids(tok, "Sort the digits: 3141")], 8,
                            eos_id=tok.eos_token_id)[0]
    assert capsys.readouterr().out == tok.decode(out, skip_special_tokens=True) + "\n"


def test_a_reference_run_shorter_than_its_checkpoints_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"config.reference.checkpoints=3 but the reference run has only 2 steps"):
        main.run_stages(tiny_config(**{"train.steps": 2}), str(tmp_path))
