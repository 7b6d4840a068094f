"""The measuring tools (tools/, not in the wheel) run end to end: the benchmark, the GEMM benchmark and the
divergence probe (tiny shapes)."""
import json
import os
import re
import subprocess
import sys

from conftest import ROOT


def run_tool(name, *args, devices=1):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name + ".py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_reports_every_step_kind_and_ratio(tmp_path):
    path = tmp_path / "bench.json"
    run_tool("bench", "--shape", "tiny", "--steps", "1", "--rounds", "1", "--json", str(path),
               "--kinds", "ntp,sftmix,replay,head,head_fused,attention")
    res = json.loads(path.read_text())
    for kind in ("ntp", "sftmix", "replay", "head", "head_fused", "attention"):
        assert res[kind]["step_ms"] > 0 and 0 < res[kind]["mfu"] < 1.5, res[kind]
    assert res["peak_tflops"] > 0  # measured on CPU
    assert res["ratios"]["sftmix/ntp step time"] > 0 and res["ratios"]["head+loss time fused/differentiated"] > 0


def test_gemm_bench_times_every_matmul_of_the_step_in_each_library(tmp_path):
    path = tmp_path / "gemm.json"
    out = run_tool("gemm_bench", "--shape", "tiny", "--rounds", "1", "--calls", "1", "--json", str(path))
    res = json.loads(path.read_text())
    assert [(c["gemm"], c["form"]) for c in res["cases"]] == [
        (g, f) for g in ("q", "k", "v", "o", "gate", "up", "down", "head") for f in ("fwd", "dx", "dW")]
    assert res["cases"][-1]["mkn"] == [32 * 32, 96, 264] and res["cases"][0]["count"] == 3  # tiny: 3 layers
    for c in res["cases"]:
        assert set(c["ms"]) == {"ours", "eigen", "torch"} and min(c["ms"].values()) > 0, c
    assert "ours/torch time" in out


def test_divergence_of_a_sharded_run_starts_at_rounding_level():
    out = run_tool("divergence", "--config", "configs/tiny.py", "--mesh", "1,2,2", "--steps", "6",
                     "--every", "3", "--config.model.source=init", "--config.train.lr=3e-3", "--config.train.batch_size=8", "--config.data.synthetic.num_train=64",
                     "--config.data.synthetic.num_eval=8", devices=4)
    rows = re.findall(r"\|dloss\| (\S+)\s+\|\|A-B\|\|/\|\|A\|\| (\S+)", out)
    assert len(rows) == 2, out
    for dloss, rel in rows:  # a few steps in: float32 reduction order only
        assert float(dloss) < 1e-4 and float(rel) < 1e-5, out
