"""sftmix_jax.compare: statistics against hand computations, and the command over fake runs
(the pipeline runs themselves are tested elsewhere)."""
import json
import os

import numpy as np
import pytest

from sftmix_jax import compare


def test_mean_ci_is_the_t_interval():
    x = [1.0, 2.0, 4.0, 3.0, 5.0]
    out = compare.mean_ci(x)
    half = 2.7764451 * np.std(x, ddof=1) / np.sqrt(5)  # t(0.975, 4 degrees of freedom)
    assert out["mean"] == 3.0 and out["ci95"] == pytest.approx([3.0 - half, 3.0 + half], rel=1e-6)
    assert compare.mean_ci([2.0])["ci95"] is None


def test_paired_difference_and_direction():
    ntp = np.array([0.50, 0.60, 0.55, 0.52])
    arm = ntp - np.array([0.05, 0.04, 0.06, 0.05])  # lower loss on every seed
    d = compare.paired(arm, ntp, higher_is_better=False)
    diffs = arm - ntp
    t = diffs.mean() / (diffs.std(ddof=1) / 2)
    assert d["mean"] == pytest.approx(diffs.mean()) and d["better_on"] == 4 and d["distinguishable"]
    from scipy import stats

    assert d["p_paired_t"] == pytest.approx(2 * stats.t.sf(abs(t), 3))
    noisy = compare.paired(ntp + [0.1, -0.1, 0.1, -0.1], ntp, higher_is_better=False)
    assert not noisy["distinguishable"] and noisy["better_on"] == 2


def test_bootstrap_of_the_loss_difference():
    rows = [{"id": str(i), "nll": float(n), "tokens": int(t)} for i, (n, t) in
            enumerate(zip(np.linspace(1, 9, 40), np.arange(1, 41)))]
    same = compare.bootstrap_loss_difference(rows, rows)
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and not same["distinguishable"]
    shifted = [dict(r, nll=r["nll"] + 0.5 * r["tokens"]) for r in rows]  # +0.5 nats on every token
    out = compare.bootstrap_loss_difference(rows, shifted)
    assert out["diff"] == pytest.approx(0.5) and out["ci95"] == pytest.approx([0.5, 0.5]) and out["distinguishable"]
    with pytest.raises(ValueError, match="differ in their examples"):
        compare.bootstrap_loss_difference(rows, rows[::-1])


def test_arguments():
    assert compare.parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ValueError):
        compare.parse_seeds("1,1")
    assert compare.parse_arm('mu1=--config.sftmix.mu=1.0 --config.sftmix.ntp=False') == (
        "mu1", ["--config.sftmix.mu=1.0", "--config.sftmix.ntp=False"])
    with pytest.raises(ValueError, match="NAME="):
        compare.parse_arm("NTP=--config.sftmix.mu=1")
    assert compare.stage3_only(["--config.confidence.split=random", "--config.sftmix.mu=1"])
    assert not compare.stage3_only(["--config.train.lr=1e-4"])


def fake_run(config, workdir, seed, flags, common, log):
    """What a pipeline run leaves for compare: summary.json and the per-example held-out rows."""
    rng = np.random.default_rng(seed + 100 * len(flags))
    losses = {"reference": 0.6 + 0.05 * rng.random(), "sftmix": 0.5 + 0.05 * rng.random()}
    os.makedirs(os.path.join(workdir, "evaluate"), exist_ok=True)
    results = {}
    for stage, label in (("reference", "NTP reference"), ("sftmix", "SFTMix")):
        rows = [{"id": f"e{i}", "nll": losses[stage] * 4 + 0.01 * i, "tokens": 4} for i in range(20)]
        with open(os.path.join(workdir, "evaluate", f"heldout_{stage}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        loss = sum(r["nll"] for r in rows) / 80
        results[label] = {"loss": loss, "perplexity": float(np.exp(loss)), "exact_match": {"all": 0.5}}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"results": results}, f)
    open(os.path.join(workdir, "evaluate", "done.json"), "w").write("{}")
    return 1.0


def test_compare_over_fake_runs(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(compare, "run_pipeline", lambda *a: calls.append(a[1:4]) or fake_run(*a))
    argv = ["--config", "configs/tiny.py", "--workdir", str(tmp_path), "--seeds", "0-2",
            "--arm", "lr=--config.train.lr=1e-4", "--", "--config.train.steps=8"]
    compare.main(argv)
    # base and two arms per seed; the random split links the seed's stages 1-2, the lr arm does not
    assert len(calls) == 9 and all(c[2] == ["--config.confidence.split=random"] for c in calls if "random" in c[0])
    assert os.path.islink(tmp_path / "seed1" / "random_split" / "reference")
    assert not os.path.exists(tmp_path / "seed1" / "lr" / "reference")
    result = json.load(open(tmp_path / "compare.json"))
    loss = result["metrics"]["held-out loss"]
    assert set(loss["arms"]) == {"NTP", "SFTMix", "random split", "lr"}
    assert loss["vs_NTP"]["SFTMix"]["better_on"] == 3 and loss["vs_NTP"]["SFTMix"]["distinguishable"]
    assert sorted(result["bootstrap_heldout_loss"]["SFTMix"]) == ["0", "1", "2"]
    md = (tmp_path / "compare.md").read_text()
    assert "| SFTMix |" in md and "distinguishable from zero" in md and (tmp_path / "compare.png").exists()
    assert "held-out loss: SFTMix - NTP" in capsys.readouterr().out
    # Rerun: finished runs are not run again (here: the fake is asked, and its done.json makes the real one skip)
    assert compare.run_pipeline.__name__ == "<lambda>"
    monkeypatch.undo()
    assert compare.run_pipeline("configs/tiny.py", str(tmp_path / "seed0" / "base"), 0, [], [], "/dev/null") == 0.0
