"""Reports from a workdir: summary.md with the table and images, loss_curves.png; no training."""
import json
import subprocess
import sys

import pytest

from sftmix_jax.stages import report

RESULTS = {
    "NTP reference": {"loss": 0.62, "perplexity": 1.86, "tokens": 1009.0, "exact_match": {"all": 0.475, "add": 0.05},
                      "multiple_choice": {"acc": 0.5, "acc_norm": 0.375, "acc_per_token": 0.25, "questions": 8}},
    "SFTMix": {"loss": 0.60, "perplexity": 1.82, "tokens": 1009.0, "exact_match": {"all": 0.5, "add": 0.15},
               "multiple_choice": {"acc": 0.625, "acc_norm": 0.5, "acc_per_token": 0.5, "questions": 8}},
}
CONFIG = {"seed": 0, "evaluate": {"multiple_choice": {"source": "mc.jsonl"}}}


def metrics(path, mixup: bool):
    rows = [{"step": 0, "eval_loss": 5.6, "eval_perplexity": 270.0}]
    for step in (1, 10, 20, 30):
        row = {"step": step, "loss": 5.0 - 0.1 * step, "ntp_loss": 5.0 - 0.1 * step, "grad_norm": 1.0}
        if mixup:
            row.update(loss=row["loss"] + 1.0, mixup_loss=5.0)
        rows.append(row)
    rows.append({"step": 30, "eval_loss": 2.1, "eval_perplexity": 8.2})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 31, "lo')  # a torn last line


@pytest.fixture
def workdir(tmp_path):
    metrics(tmp_path / "reference" / "metrics.jsonl", mixup=False)
    metrics(tmp_path / "sftmix" / "metrics.jsonl", mixup=True)
    (tmp_path / "confidence").mkdir()
    (tmp_path / "confidence" / "data_map.png").write_bytes(b"\x89PNG")
    summary = {"heldout_examples": 240, "results": RESULTS, "config": CONFIG}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rebuilds_summary_and_curves(workdir):
    out = subprocess.run([sys.executable, "-m", "sftmix_jax.stages.report", "--workdir", str(workdir)],
                         capture_output=True, text=True, check=True)
    assert str(workdir / "summary.md") in out.stdout
    assert is_png(workdir / "loss_curves.png")
    md = (workdir / "summary.md").read_text()
    assert "| metric | NTP reference | SFTMix | SFTMix - NTP |" in md
    assert "| held-out loss | 0.6200 | 0.6000 | -0.0200 |" in md
    assert "| exact match: all | 0.475 | 0.500 | +0.0250 |" in md
    assert "| multiple choice acc (summed log-lik) | 0.500 | 0.625 | +0.1250 |" in md
    assert "| multiple choice acc_norm (per character, as lm-eval) | 0.375 | 0.500 | +0.1250 |" in md
    assert "8 questions of `mc.jsonl`" in md
    assert "![loss curves](loss_curves.png)" in md and "![data map](confidence/data_map.png)" in md
    assert '"seed": 0' in md


def test_missing_stage_and_results(tmp_path):
    """Only the reference run trained, no evaluation yet: curves of one run, no table."""
    metrics(tmp_path / "reference" / "metrics.jsonl", mixup=False)
    (tmp_path / "config.json").write_text(json.dumps({"seed": 1}))
    written = report.write(str(tmp_path))
    assert written == [str(tmp_path / "loss_curves.png"), str(tmp_path / "summary.md")]
    md = (tmp_path / "summary.md").read_text()
    assert "No evaluation results yet" in md and "data_map" not in md and '"seed": 1' in md
    assert is_png(tmp_path / "loss_curves.png")


def test_one_model_and_no_metrics(tmp_path):
    """A summary of one model only (no SFTMix - NTP column); no metrics.jsonl: no curves, no link."""
    summary = {"heldout_examples": 10, "results": {"SFTMix": RESULTS["SFTMix"]}, "config": {}}
    report.write(str(tmp_path), summary)
    md = (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "| metric | SFTMix |" in md and "SFTMix - NTP" not in md and "| held-out loss | 0.6000 |" in md
    assert not (tmp_path / "loss_curves.png").exists() and "loss_curves" not in md


def test_read_metrics_sorts_and_skips_torn_lines(workdir):
    rows = report.read_metrics(workdir / "sftmix" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 10, 20, 30, 30]
    assert report.read_metrics(workdir / "absent.jsonl") == []
