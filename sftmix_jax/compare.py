"""NTP vs SFTMix over several seeds, in one command: confidence intervals and paired tests.

    python -m sftmix_jax.compare --config configs/tiny.py --workdir DIR --seeds 0-4 \\
        [--arm NAME="--config.a.b=v ..."] [-- --config.x.y=v ...]   (after --: for every run)

For each seed s, DIR/seed<s>/base runs the whole pipeline with --config.seed=s: its reference
model is the `NTP` arm and its SFTMix model the `SFTMix` arm. Every other arm is the SFTMix
model of its own run, DIR/seed<s>/<NAME>. An arm whose settings touch only the SFTMix stage and
after (sftmix.*, confidence.split, evaluate.*) links that seed's reference run and replay
instead of recomputing them. `random split` (confidence.split=random: SFTMIX.md's control) is
built in. Runs are resumable: kill compare, rerun the same command, and it goes on.

Per metric (held-out loss and perplexity, exact match and multiple-choice accuracy where
present): each arm's mean and 95% t-interval over seeds; each arm's paired difference against
NTP over seeds (mean, 95% CI, paired t-test, seeds better); per seed, a paired bootstrap over
held-out examples of the loss difference. Writes DIR/compare.json, DIR/compare.md and
DIR/compare.png.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from sftmix_jax.stages import report

BUILTIN_ARMS = {"random split": ["--config.confidence.split=random"]}
STAGE3_KEYS = ("sftmix.", "confidence.split", "evaluate.")  # settings that leave stages 1-2 as they are
# (name, how to read it from a model's results, higher is better)
METRICS = (("held-out loss", lambda m: m.get("loss"), False),
           ("held-out perplexity", lambda m: m.get("perplexity"), False),
           ("other-set perplexity", lambda m: m.get("other", {}).get("perplexity"), False),  # forgetting
           ("exact match", lambda m: m.get("exact_match", {}).get("all"), True),
           ("multiple choice acc", lambda m: m.get("multiple_choice", {}).get("acc"), True),
           ("multiple choice acc_norm", lambda m: m.get("multiple_choice", {}).get("acc_norm"), True))
BOOTSTRAP = 2000


def parse_seeds(spec: str) -> list[int]:
    """'0-4' or '0,3,7' (or both: '0-2,9')."""
    seeds = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {spec!r}: give distinct seeds, e.g. 0-4")
    return seeds


def parse_arm(spec: str) -> tuple[str, list[str]]:
    name, sep, flags = spec.partition("=")
    flags = shlex.split(flags)
    if not sep or not name or name in ("base", "NTP", "SFTMix") or not all(f.startswith("--config.") for f in flags):
        raise ValueError(f"--arm {spec!r}: use NAME=\"--config.a.b=v ...\" (NAME not base, NTP or SFTMix)")
    return name.strip(), flags


def stage3_only(flags: list[str]) -> bool:
    return all(f[len("--config."):].startswith(STAGE3_KEYS) for f in flags)


def run_dir(workdir, seed, arm="base") -> str:
    return os.path.join(workdir, f"seed{seed}", arm.replace(" ", "_"))


def run_pipeline(config, workdir, seed, flags, common, log) -> float:
    """One pipeline (resumable); returns its seconds. Raises naming the log on failure."""
    if os.path.exists(os.path.join(workdir, "evaluate", "done.json")):
        return 0.0
    cmd = [sys.executable, "-m", "sftmix_jax.main", "--config", config, "--workdir", workdir,
           f"--config.seed={seed}", *common, *flags]
    t = time.time()
    with open(log, "a") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    if code:
        tail = open(log).read()[-2000:]
        raise SystemExit(f"compare: the run in {workdir} failed (exit {code}); its log is {log}:\n{tail}")
    return time.time() - t


def _die_with_parent() -> None:
    """Linux: the run dies with compare (even by SIGKILL), so a rerun never meets an orphan in its workdir."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def link_stages_1_2(base: str, arm: str) -> None:
    """The arm reuses the seed's reference run and replay, and the weak-to-strong NTP baseline when
    there is one (relative links, so DIR can move)."""
    for stage in ("reference", "confidence", "baseline"):
        link = os.path.join(arm, stage)
        if not os.path.lexists(link) and (stage != "baseline" or os.path.exists(os.path.join(base, stage))):
            os.symlink(os.path.relpath(os.path.join(base, stage), arm), link)


# ----------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------
def mean_ci(x) -> dict:
    """Mean and 95% t-interval (None where one value cannot give one)."""
    from scipy import stats

    x = np.asarray(x, float)
    out = {"mean": float(x.mean()), "n": len(x), "ci95": None}
    if len(x) > 1:
        half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def paired(arm, ntp, higher_is_better: bool) -> dict:
    """arm - NTP over seeds: mean, CI, paired t-test p, seeds where the arm is better."""
    from scipy import stats

    d = np.asarray(arm, float) - np.asarray(ntp, float)
    out = mean_ci(d)
    out["p_paired_t"] = float(stats.ttest_rel(arm, ntp).pvalue) if len(d) > 1 and d.std() > 0 else None
    out["better_on"] = int(np.sum(d > 0) if higher_is_better else np.sum(d < 0))
    ci = out["ci95"]
    out["distinguishable"] = bool(ci is not None and (ci[0] > 0 or ci[1] < 0))
    return out


def bootstrap_loss_difference(ntp_rows, arm_rows, seed=0) -> dict:
    """Token-mean held-out loss, arm - NTP, with a 95% paired bootstrap interval over examples."""
    if [r["id"] for r in ntp_rows] != [r["id"] for r in arm_rows]:
        raise ValueError("per-example held-out rows of the two models differ in their examples")
    tokens = np.array([r["tokens"] for r in ntp_rows], float)
    a, b = (np.array([r["nll"] for r in rows], float) for rows in (ntp_rows, arm_rows))
    idx_RN = np.random.default_rng(seed).integers(0, len(tokens), (BOOTSTRAP, len(tokens)))
    t_R = tokens[idx_RN].sum(1)
    diffs_R = (b[idx_RN].sum(1) - a[idx_RN].sum(1)) / t_R
    lo, hi = np.percentile(diffs_R, [2.5, 97.5])
    return {"diff": float((b.sum() - a.sum()) / tokens.sum()), "ci95": [float(lo), float(hi)],
            "distinguishable": bool(lo > 0 or hi < 0)}


def read_rows(path):
    return [json.loads(line) for line in open(path)]


def collect(workdir, seeds, arms) -> dict:
    """Per arm and metric, the per-seed values; per seed and arm, the bootstrap of the loss difference."""
    values = {arm: {} for arm in ["NTP", "SFTMix", *arms]}
    boot = {}
    for s in seeds:
        base = run_dir(workdir, s)
        (ntp_stage, ntp_label), _ = report.runs(json.load(open(os.path.join(base, "summary.json"))).get("config"))
        models = {"NTP": (base, ntp_label, ntp_stage), "SFTMix": (base, "SFTMix", "sftmix")}
        models.update({arm: (run_dir(workdir, s, arm), "SFTMix", "sftmix") for arm in arms})
        ntp_rows = read_rows(os.path.join(base, "evaluate", f"heldout_{ntp_stage}.jsonl"))
        for arm, (d, label, stage) in models.items():
            results = json.load(open(os.path.join(d, "summary.json")))["results"][label]
            for name, get, _ in METRICS:
                if get(results) is not None:
                    values[arm].setdefault(name, []).append(float(get(results)))
            if arm != "NTP":
                rows = read_rows(os.path.join(d, "evaluate", f"heldout_{stage}.jsonl"))
                boot.setdefault(arm, {})[s] = bootstrap_loss_difference(ntp_rows, rows, seed=s)
    stats = {}
    for name, _, higher in METRICS:
        if all(len(values[arm].get(name, [])) == len(seeds) for arm in values):
            stats[name] = {"higher_is_better": higher,
                           "arms": {arm: {**mean_ci(v[name]), "per_seed": v[name]} for arm, v in values.items()},
                           "vs_NTP": {arm: paired(v[name], values["NTP"][name], higher)
                                      for arm, v in values.items() if arm != "NTP"}}
    return {"seeds": seeds, "metrics": stats, "bootstrap_heldout_loss": boot}


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------
def _ci(c) -> str:
    return "-" if c is None else f"[{c[0]:+.4f}, {c[1]:+.4f}]"


def markdown(result: dict, command: str) -> str:
    seeds = result["seeds"]
    lines = ["# NTP vs SFTMix over seeds", "", f"Seeds {seeds}. Made by `{command}`.", "",
             "Each arm's mean over seeds with its 95% t-interval; each arm minus NTP paired by seed "
             "(mean, 95% t-interval, paired t-test, seeds on which the arm is better). A difference "
             "is called distinguishable from zero when its interval excludes zero.", ""]
    for name, m in result["metrics"].items():
        lines += [f"## {name} ({'higher' if m['higher_is_better'] else 'lower'} is better)", "",
                  "| arm | mean | 95% CI | per seed |", "|---|---|---|---|"]
        for arm, a in m["arms"].items():
            lines.append(f"| {arm} | {a['mean']:.4f} | {_ci(a['ci95']).replace('+', '')} | "
                         + " ".join(f"{v:.4f}" for v in a["per_seed"]) + " |")
        lines += ["", "| arm - NTP | mean | 95% CI | paired t p | better on | |", "|---|---|---|---|---|---|"]
        for arm, d in m["vs_NTP"].items():
            p = "-" if d["p_paired_t"] is None else f"{d['p_paired_t']:.3f}"
            verdict = "distinguishable from zero" if d["distinguishable"] else "not distinguishable from zero"
            lines.append(f"| {arm} | {d['mean']:+.4f} | {_ci(d['ci95'])} | {p} | {d['better_on']} of {d['n']} | "
                         f"{verdict} |")
        lines.append("")
    lines += ["## Per seed: held-out loss, arm - NTP, paired bootstrap over examples", "",
              f"{BOOTSTRAP} resamples of the held-out examples; token-mean loss difference and its 95% interval.", "",
              "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for arm, per in result["bootstrap_heldout_loss"].items():
        cells = [f"{per[s]['diff']:+.4f} {_ci(per[s]['ci95'])}" + (" *" if per[s]["distinguishable"] else "")
                 for s in seeds]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "`*`: the interval excludes zero.", "", "![per-seed values, means and 95% CIs](compare.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    fig, axes = plt.subplots(2, len(metrics), figsize=(4.5 * len(metrics), 7.5), squeeze=False)
    for col, (name, m) in enumerate(metrics.items()):
        ax, dax = axes[0, col], axes[1, col]
        for x, (arm, a) in enumerate(m["arms"].items()):
            pts = np.asarray(a["per_seed"])
            ax.scatter(x + np.linspace(-0.12, 0.12, len(pts)), pts, s=14, alpha=0.6, color=f"C{x}")
            _mean_ci_bar(ax, x + 0.25, a)
            if arm != "NTP":  # the paired difference: what the comparison rests on
                d = pts - np.asarray(m["arms"]["NTP"]["per_seed"])
                dax.scatter(x + np.linspace(-0.12, 0.12, len(d)), d, s=14, alpha=0.6, color=f"C{x}")
                _mean_ci_bar(dax, x + 0.25, m["vs_NTP"][arm])
        ax.set_xticks(range(len(m["arms"])), list(m["arms"]), rotation=15)
        ax.set_title(f"{name} ({'higher' if m['higher_is_better'] else 'lower'} is better)", fontsize=10)
        dax.axhline(0.0, color="gray", lw=0.8)
        dax.set_xticks(range(len(m["arms"])), [f"{a} - NTP" if a != "NTP" else "" for a in m["arms"]], rotation=15)
        dax.set_title(f"{name}: arm - NTP, paired by seed", fontsize=10)
    fig.suptitle(f"seeds {result['seeds']}: points per seed, mean and 95% CI in black", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_ci_bar(ax, x, a) -> None:
    err = None if a["ci95"] is None else [[a["mean"] - a["ci95"][0]], [a["ci95"][1] - a["mean"]]]
    ax.errorbar(x, a["mean"], yerr=err, fmt="o", color="black", capsize=4)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sftmix_jax.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", default="0-4")
    p.add_argument("--arm", action="append", default=[], help='NAME="--config.a.b=v ..." (repeatable)')
    p.add_argument("--no-random-split", action="store_true", help="leave out the built-in random-split arm")
    p.add_argument("common", nargs=argparse.REMAINDER, help="-- then --config.* overrides for every run")
    a = p.parse_args(argv)
    common = a.common[1:] if a.common[:1] == ["--"] else a.common
    if not all(f.startswith("--config.") for f in common):
        p.error(f"after --, only --config.* overrides: {common}")
    seeds = parse_seeds(a.seeds)
    arms = {} if a.no_random_split else dict(BUILTIN_ARMS)
    arms.update(parse_arm(s) for s in a.arm)
    os.makedirs(a.workdir, exist_ok=True)
    plan = [(s, "base", []) for s in seeds] + [(s, arm, flags) for s in seeds for arm, flags in arms.items()]
    for i, (s, arm, flags) in enumerate(plan, 1):
        d = run_dir(a.workdir, s, arm)
        os.makedirs(d, exist_ok=True)
        if arm != "base" and stage3_only(flags):
            link_stages_1_2(run_dir(a.workdir, s), d)
        log = d + ".log"
        print(f"compare: [{i}/{len(plan)}] seed {s}, {arm}: {d} (log {log})", flush=True)
        took = run_pipeline(a.config, d, s, flags, common, log)
        print(f"compare: [{i}/{len(plan)}] " + (f"done in {took:.0f} s" if took else "already complete"), flush=True)
    result = collect(a.workdir, seeds, list(arms))
    result["arms"] = {"NTP": "the NTP model of each seed's base run (its reference run; weak-to-strong: its baseline)",
                      "SFTMix": "the SFTMix model of each seed's base run", **{k: shlex.join(v) for k, v in arms.items()}}
    result["common"] = common
    command = shlex.join(["python", "-m", "sftmix_jax.compare", *(argv if argv is not None else sys.argv[1:])])
    with open(os.path.join(a.workdir, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(a.workdir, "compare.md"), "w") as f:
        f.write(markdown(result, command))
    plot(result, os.path.join(a.workdir, "compare.png"))
    for name, m in result["metrics"].items():
        for arm, d in m["vs_NTP"].items():
            print(f"{name}: {arm} - NTP = {d['mean']:+.4f} {_ci(d['ci95'])}, better on {d['better_on']} of {d['n']} "
                  f"seeds: {'distinguishable' if d['distinguishable'] else 'not distinguishable'} from zero")
    print(f"compare: wrote {a.workdir}/compare.md, compare.json, compare.png")


if __name__ == "__main__":
    main()
