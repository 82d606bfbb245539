"""report.json, report.md and the PNG plots of an evaluation (retrieval accuracy vs context length, length
histograms, router balance, KL by channel)."""

from __future__ import annotations

import json
from pathlib import Path

PLOTS = {"retrieval": "retrieval.png", "lengths": "lengths.png", "router": "router.png", "kl": "kl_by_channel.png"}


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict, output: Path) -> list[str]:
    """The plots that the report has data for; returns their file names."""
    plt = _plt()
    models = [m for m in ("student", "teacher") if m in report]
    written = []
    needles = {m: report[m]["probes"].get("needle", {}) for m in models if report[m].get("probes", {}).get("count")}
    if any(needles.values()):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for m, by_kind in needles.items():
            for kind, by_length in by_kind.items():
                lengths = sorted(by_length, key=int)
                ax.plot([int(n) for n in lengths], [by_length[n] for n in lengths], marker="o",
                        linestyle="-" if m == "student" else "--", label=f"{m} {kind}-key")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context length (tokens)", ylabel="accuracy", ylim=(-0.05, 1.05), title="needle retrieval")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, output / PLOTS["retrieval"], plt))
    scored = [m for m in models if "generation" in report[m]]
    if scored:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for ax, channel in zip(axes, ("analysis_tokens", "final_tokens")):
            for m in scored:
                values = report[m]["generation"][channel].get("values", [])
                if values:
                    ax.hist(values, bins=min(20, max(5, len(values))), alpha=0.5, label=m)
            ax.set(title=channel.replace("_", " "), xlabel="tokens", ylabel="completions")
            ax.legend(fontsize=7)
        written.append(_save(fig, output / PLOTS["lengths"], plt))
    routers = {m: report[m]["router"] for m in models if "router" in report[m]}
    if routers:
        fig, axes = plt.subplots(1, len(routers), figsize=(4.5 * len(routers), 3.2), squeeze=False)
        for ax, (m, router) in zip(axes[0], routers.items()):
            rows = [layer["fractions"] for layer in router["layers"].values()]
            image = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0)
            ax.set(title=f"{m} expert load", xlabel="expert", ylabel="layer")
            fig.colorbar(image, ax=ax, fraction=0.046)
        written.append(_save(fig, output / PLOTS["router"], plt))
    agreement = report.get("student", {}).get("agreement")
    if agreement and any("kl" in row for row in agreement.values()):
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        channels = [c for c, row in agreement.items() if "kl" in row]
        axes[0].bar(channels, [agreement[c]["kl"] for c in channels], color="tab:red")
        axes[0].set(title="KL(teacher ‖ student) per token", ylabel="nats")
        axes[1].bar(channels, [agreement[c]["top1_agreement"] for c in channels], color="tab:blue")
        axes[1].set(title="top-1 agreement", ylim=(0, 1))
        written.append(_save(fig, output / PLOTS["kl"], plt))
    return written


def _save(fig, path: Path, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def markdown(report: dict, plots: list[str]) -> str:
    models = [m for m in ("student", "teacher") if m in report]
    lines = [f"# Evaluation: suite `{report['suite']}`", "",
             f"Device {report['device']}, dtype {report['dtype']}, probe seed {report['seed']}.", ""]
    lines += [f"- {m}: `{info['path']}` ({info['kind']})" for m, info in report["models"].items()]
    gates = report.get("gates", [])
    lines += ["", f"**Gates: {'all passed' if report['passed'] else 'FAILED'}** ({len(gates)} checked)", ""]
    if gates:
        lines += ["| gate | value | result |", "|---|---|---|"]
        lines += [f"| {g['metric']} | {_fmt(g['value'])} | {'pass' if g['passed'] else 'FAIL: ' + g['reason']} |"
                  for g in gates]
    agreement = report.get("student", {}).get("agreement")
    if agreement:
        keys = ["tokens", "kl", "top1_agreement", "ce", "perplexity", "teacher_ce", "teacher_perplexity"]
        keys = [k for k in keys if any(k in row for row in agreement.values())]
        lines += ["", "## Teacher agreement on held-out data", "", "| channel | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]
        lines += [f"| {c} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for c, row in agreement.items()]
    routers = {m: report[m]["router"] for m in models if "router" in report[m]}
    models = [m for m in models if "generation" in report[m]]
    lines += ["", "## Generation behaviour", "", "| | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    rows = [("Harmony compliance", lambda g: g["compliance_rate"]),
            ("analysis tokens (mean)", lambda g: g["analysis_tokens"].get("mean")),
            ("final tokens (mean)", lambda g: g["final_tokens"].get("mean")),
            ("repetition (mean)", lambda g: g["repetition_mean"]),
            ("empty finals", lambda g: g["empty_final_rate"]),
            ("tokens after stop", lambda g: g["tokens_after_stop"])]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(get(report[m]["generation"])) for m in models) + " |")
    kinds = sorted({k for m in models for k in report[m]["generation"]["compliance"]["issues_by_kind"]})
    for kind in kinds:
        lines.append(f"| streams with `{kind}` | " + " | ".join(
            _fmt(report[m]["generation"]["compliance"]["issues_by_kind"].get(kind, 0)) for m in models) + " |")
    for kind in sorted(report[models[0]]["generation"]["compliance_by_kind"]):
        lines.append(f"| compliance, {kind} prompts | " + " | ".join(
            _fmt(report[m]["generation"]["compliance_by_kind"].get(kind)) for m in models) + " |")
    if report[models[0]]["probes"].get("count"):
        retention = report.get("retention", {})
        lines += ["", "## Probes", "", "| probe | " + " | ".join(models) + (" | retention |" if retention else " |"),
                  "|---|" + "---|" * (len(models) + bool(retention))]

        def row(label, get, key):
            cells = [_fmt(get(report[m]["probes"])) for m in models]
            return f"| {label} | " + " | ".join(cells) + (f" | {_fmt(retention.get(key))} |" if retention else " |")

        lines.append(row("all", lambda p: p["accuracy"], "probes.accuracy"))
        for family in report["student"]["probes"]["by_family"]:
            lines.append(row(family, lambda p, f=family: p["by_family"].get(f), f"probes.{family}"))
        for kind, by_length in report["student"]["probes"]["needle"].items():
            for n in sorted(by_length, key=int):
                lines.append(row(f"needle {kind}-key @ {n} tokens",
                                 lambda p, k=kind, n=n: p["needle"].get(k, {}).get(n), f"needle.{kind}.{n}"))
    if routers:
        lines += ["", "## Router health (held-out tokens)", "", "| model | layer | entropy | max share | dead experts |",
                  "|---|---|---|---|---|"]
        for m, router in routers.items():
            for name, layer in router["layers"].items():
                alarm = " ⚠ below " + _fmt(router["min_entropy"]) if layer["collapsing"] else ""
                lines.append(f"| {m} | {name} | {_fmt(layer['entropy'])}{alarm} | {_fmt(layer['max_share'])} | "
                             f"{layer['dead_experts'] or '–'} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in report.get("timings_s", {}).items()), ""]
    return "\n".join(lines)


def write_report(report: dict, output: Path) -> None:
    plots = write_plots(report, output)
    report["plots"] = plots
    (output / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (output / "report.md").write_text(markdown(report, plots))
