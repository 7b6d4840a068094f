"""Reports of a workdir: summary.md (NTP vs SFTMix, naming each model) and loss_curves.png.

    python -m sftmix_jax.stages.report --workdir DIR

rebuilds both from DIR/summary.json and DIR/{reference or baseline,sftmix}/metrics.jsonl, without any
model compute; the evaluate stage calls `write` with the summary it has just computed.
"""
from __future__ import annotations

import argparse
import json

from etils import epath

def runs(config: dict | None) -> tuple:
    """(stage, label) of the NTP and SFTMix models a workdir compares: the NTP reference run, or,
    when the reference is another model (weak-to-strong), the NTP baseline of the target model."""
    weak = ((config or {}).get("reference") or {}).get("model_source")
    return (("baseline", "NTP baseline") if weak else ("reference", "NTP reference")), ("sftmix", "SFTMix")


def models(config: dict | None) -> dict:
    """label -> the model it is, as the config names it."""
    c = config or {}
    target = (c.get("model") or {}).get("source", "?")
    return {label: target for _, label in runs(c)}
# (alt text, path relative to the workdir), embedded in summary.md when present
IMAGES = (("loss curves", "loss_curves.png"), ("data map", "confidence/data_map.png"))


def read_metrics(path) -> list[dict]:
    """metrics.jsonl rows by step; [] when absent. A torn line (a killed run) is skipped."""
    path = epath.Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def loss_curves(workdir: str, path: str, config: dict | None = None) -> bool:
    """Train and held-out loss vs step of both runs; False (nothing written) when neither has metrics."""
    curves = {label: read_metrics(epath.Path(workdir, stage, "metrics.jsonl")) for stage, label in runs(config)}
    if not any(curves.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for (label, rows), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        # The NTP term is what both runs share; SFTMix's total (NTP + mu * Mixup) is drawn dashed.
        ntp = [(r["step"], r.get("ntp_loss", r["loss"])) for r in rows if "loss" in r]
        total = [(r["step"], r["loss"]) for r in rows if "mixup_loss" in r]
        held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        for ax, points, style, name in ((train_ax, ntp, "-", label), (train_ax, total, "--", f"{label}: NTP + mu * Mixup"),
                                        (eval_ax, held, "o-", label)):
            if points:
                ax.plot(*zip(*points), style, color=color, label=name, markersize=3)
    train_ax.set(xlabel="step", ylabel="loss", title="Train loss")
    eval_ax.set(xlabel="step", ylabel="loss", title="Held-out response loss")
    for ax in (train_ax, eval_ax):
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    with epath.Path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True


def summary_markdown(summary: dict | None, images=(), config: dict | None = None) -> str:
    """The report: metrics table (with SFTMix - NTP when both ran), images, config."""
    (_, ntp_label), _ = runs(config)
    lines = [f"# {ntp_label} vs SFTMix", ""]
    results = (summary or {}).get("results") or {}
    if not results:
        lines += ["No evaluation results yet: run the `evaluate` stage.", ""]
    else:
        names = list(results)
        rows = [("held-out loss", lambda m: m.get("loss"), "{:.4f}"),
                ("held-out perplexity", lambda m: m.get("perplexity"), "{:.3f}")]
        if any("other" in m for m in results.values()):  # forgetting, on a set not trained on
            rows += [("other-set perplexity", lambda m: m.get("other", {}).get("perplexity"), "{:.3f}")]
        tasks = sorted({t for m in results.values() for t in m.get("exact_match", {})}, key=lambda t: (t != "all", t))
        rows += [(f"exact match: {t}", lambda m, t=t: m.get("exact_match", {}).get(t), "{:.3f}") for t in tasks]
        if any("multiple_choice" in m for m in results.values()):
            rows += [(f"multiple choice {key} ({kind})", lambda m, k=key: m.get("multiple_choice", {}).get(k), "{:.3f}")
                     for kind, key in (("summed log-lik", "acc"), ("per character, as lm-eval", "acc_norm"),
                                       ("per token", "acc_per_token"))]
        pair = len(names) == 2
        text = f"Held-out set: {summary['heldout_examples']} examples."
        mc = next((m["multiple_choice"] for m in results.values() if "multiple_choice" in m), None)
        if mc:
            source = (config or {}).get("evaluate", {}).get("multiple_choice", {}).get("source")
            text += (f" Multiple choice: {mc['questions']} questions" + (f" of `{source}`" if source else "")
                     + ", each option scored by its log-likelihood.")
        lines += [text + " Lower loss / perplexity and higher accuracy / exact match are better.", "",
                  model_line(config, names, summary.get("models")), "",
                  "| metric | " + " | ".join(names) + (" | SFTMix - NTP |" if pair else " |"),
                  "|---|" + "---|" * (len(names) + pair)]
        for label, get, fmt in rows:
            vals = [get(results[n]) for n in names]
            cells = ["-" if v is None else fmt.format(v) for v in vals]
            if pair:
                cells.append("-" if None in vals else f"{vals[1] - vals[0]:+.4f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![{alt}]({path})\n" for alt, path in images]
    if config:
        lines += ["## Config", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def model_line(config: dict | None, names, named: dict | None = None) -> str:
    """Which model each column is (weak-to-strong: the NTP baseline is the target model, not the reference)."""
    named = named or models(config)
    cells = [f"**{n}** = `{named[n]}`" for n in names if n in named]
    weak = ((config or {}).get("reference") or {}).get("model_source")
    if weak:
        cells.append(f"confidence split by the weak reference `{weak}` (NTP, its own tokenizer; not in this table)")
    else:
        cells.append("the NTP reference is also the run whose checkpoints gave the confidence split")
    return "Models: " + "; ".join(cells) + "."


def write(workdir: str, summary: dict | None = None) -> list[str]:
    """summary.json (when `summary` is given; else read back), loss_curves.png and summary.md.

    Returns the paths written. Call it from one process only.
    """
    root = epath.Path(workdir)
    written = []
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary, indent=2))
        written.append(str(root / "summary.json"))
    elif (root / "summary.json").exists():
        summary = json.loads((root / "summary.json").read_text())
    config = (summary or {}).get("config")
    if config is None and (root / "config.json").exists():
        config = json.loads((root / "config.json").read_text())
    if loss_curves(workdir, str(root / "loss_curves.png"), config):
        written.append(str(root / "loss_curves.png"))
    images = [(alt, path) for alt, path in IMAGES if (root / path).exists()]
    (root / "summary.md").write_text(summary_markdown(summary, images, config))
    written.append(str(root / "summary.md"))
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild summary.md and loss_curves.png of a workdir.")
    parser.add_argument("--workdir", required=True, help="a pipeline workdir (local or gs://)")
    args = parser.parse_args(argv)
    if not epath.Path(args.workdir).is_dir():
        raise SystemExit(f"{args.workdir} is not a directory")
    for path in write(args.workdir):
        print(path)


if __name__ == "__main__":
    main()
