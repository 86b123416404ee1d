"""Figures for reports (matplotlib, Agg backend): loss curves, metric vs swept value, quant delta, bytes.

Inputs are plain data prepared by report.py from run records; each function writes one PNG and returns
its path. matplotlib is imported inside the functions, so importing this module costs nothing.
"""

import math
from pathlib import Path

PLOT_STYLE = {
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 110,
}
METRIC_TITLES = {
    "prequant_bpb": "pre-quant val_bpb",
    "roundtrip_bpb": "round-trip (quantized) val_bpb",
    "sliding_bpb": "sliding-window val_bpb",
    "ttt_bpb": "test-time-training val_bpb",
    "quant_delta": "quant delta (bpb)",
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def error_bars(cis: list[float]) -> list[float]:
    """Half-widths for matplotlib's yerr: a CI that is nan (one seed) draws no bar."""
    return [0.0 if math.isnan(c) else c for c in cis]


def _arm_axis(ax, labels: list[str], numeric_x: list[float] | None, xlabel: str | None):
    """Put arms on the x axis: at their numeric swept values when there are some, else as categories."""
    if numeric_x is not None:
        ax.set_xlabel(xlabel)
        positive = all(x > 0 for x in numeric_x)
        if positive and len(numeric_x) > 2 and max(numeric_x) / min(numeric_x) >= 20:
            ax.set_xscale("log")
        if len(numeric_x) <= 8:
            ax.set_xticks(numeric_x)
            ax.set_xticklabels([f"{x:g}" for x in numeric_x])
        return numeric_x
    xs = list(range(len(labels)))
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=25 if max(len(s) for s in labels) > 8 else 0, ha="right")
    ax.set_xlabel(xlabel or "arm")
    return xs


def plot_loss_curves(curves: dict, path, title: str = "Training loss") -> Path:
    """curves: {arm label: {"steps", "mean", "std", "n"}} -> mean over seeds with a ±1 std band.

    Left panel: the whole run; right panel: the second half zoomed, where arms differ.
    """
    plt = pyplot()
    with plt.rc_context(PLOT_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for zoom, ax in enumerate(axes):
            for label, c in curves.items():
                start = len(c["steps"]) // 2 if zoom else 0
                steps, mean, std = c["steps"][start:], c["mean"][start:], c["std"][start:]
                (line,) = ax.plot(steps, mean, lw=1.6, label=f"{label} (n={c['n']})")
                if c["n"] > 1:
                    ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                                    [m + s for m, s in zip(mean, std, strict=True)],
                                    color=line.get_color(), alpha=0.2, lw=0)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("train loss (nats/token)")
            ax.set_title("second half, zoomed" if zoom else "whole run")
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        band = " — mean over seeds, band = ±1 std" if any(c["n"] > 1 for c in curves.values()) else ""
        fig.suptitle(title + band)
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return Path(path)


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_run_curves(train: dict, val: dict, finals: dict, path, title: str = "Loss") -> Path:
    """One run's losses, all in nats/token: train {"steps", "loss"} per logged batch and their running mean,
    val {"steps", "loss"} (validation of the float model during and after training) and finals
    {label: (step, val_loss)} (the scored stages of the record, at the last step)."""
    plt = pyplot()
    with plt.rc_context(PLOT_STYLE):
        fig, ax = plt.subplots(figsize=(8, 4.8))
        if train["steps"]:
            window = max(1, len(train["steps"]) // 8)
            smooth = window > 1
            ax.plot(train["steps"], train["loss"], lw=0.8 if smooth else 1.6, alpha=0.35 if smooth else 1.0,
                    color="tab:blue", label="train loss (one batch)")
            if smooth:
                ax.plot(train["steps"], running_mean(train["loss"], window), lw=1.8, color="tab:blue",
                        label=f"train loss (mean of the last {window} logged batches)")
        if val["steps"]:
            ax.plot(val["steps"], val["loss"], "o-", lw=1.8, ms=5, color="tab:orange",
                    label="validation loss (float model)")
        styles = zip("sD^v", ("tab:green", "tab:red", "tab:purple", "tab:brown"), strict=True)
        for (label, (step, loss)), (marker, color) in zip(finals.items(), styles, strict=False):
            ax.plot([step], [loss], marker, ms=8, ls="none", color=color, label=f"validation loss, {label}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(frameon=False)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return Path(path)


def plot_metrics_vs_arm(arms: list[dict], metrics: list[str], path, xlabel: str | None = None) -> Path:
    """One panel per metric: mean ± 95% CI per arm. arms: [{"label", "x" (number or None), metric: (mean, ci)}].

    With a numeric swept value the arms sit at their values on the x axis; otherwise they are rows (y axis),
    so long arm labels stay readable.
    """
    plt = pyplot()
    numeric_x = [a["x"] for a in arms] if all(a.get("x") is not None for a in arms) else None
    with plt.rc_context(PLOT_STYLE):
        height = 4.6 if numeric_x else max(3.2, 0.45 * len(arms) + 1.8)
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics) + (0 if numeric_x else 2), height),
                                 squeeze=False, sharey=not numeric_x)
        for i, (ax, metric) in enumerate(zip(axes[0], metrics, strict=True)):
            means = [a[metric][0] for a in arms]
            cis = error_bars([a[metric][1] for a in arms])
            if numeric_x:
                xs = _arm_axis(ax, [a["label"] for a in arms], numeric_x, xlabel)
                ax.errorbar(xs, means, yerr=cis, fmt="o-", capsize=4, ms=6, lw=1.4)
                ax.ticklabel_format(axis="y", useOffset=False)
                if i == 0:
                    ax.set_ylabel("val_bpb (bits per byte)")
            else:
                ys = list(range(len(arms)))
                ax.errorbar(means, ys, xerr=cis, fmt="o", capsize=4, ms=6, lw=1.4)
                ax.set_yticks(ys)
                ax.set_yticklabels([a["label"] for a in arms])
                ax.invert_yaxis() if i == 0 else None
                ax.ticklabel_format(axis="x", useOffset=False)
                ax.set_xlabel("val_bpb (bits per byte)")
            ax.set_title(METRIC_TITLES.get(metric, metric))
        fig.suptitle("Validation bpb per arm (mean ± 95% CI over seeds; lower is better)")
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return Path(path)


def plot_quant_delta(arms: list[dict], path, xlabel: str | None = None) -> Path:
    """Bars of the quantization penalty (roundtrip - prequant bpb) per arm, with 95% CI error bars."""
    plt = pyplot()
    with plt.rc_context(PLOT_STYLE):
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(arms) + 3), 4.6))
        numeric = xlabel is not None and all(a.get("x") is not None for a in arms)
        labels = [f"{a['x']:g}" for a in arms] if numeric else [a["label"] for a in arms]
        xs = _arm_axis(ax, labels, None, xlabel if numeric else None)  # evenly spaced bars, values as labels
        means = [a["quant_delta"][0] for a in arms]
        cis = error_bars([a["quant_delta"][1] for a in arms])
        ax.bar(xs, means, yerr=cis, capsize=4, color="tab:orange", alpha=0.85)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_ylabel("quant delta (val_bpb after − before)")
        ax.set_title("Quantization penalty per arm (mean ± 95% CI)")
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return Path(path)


def plot_paired_deltas(arms: list[dict], metrics: list[str], path, base_label: str,
                       xlabel: str | None = None) -> Path:
    """One panel per metric: each arm's per-seed difference from the baseline run of the same seed (dots)
    and their mean ± 95% CI (t-distribution over the pairs). arms: [{"label", "x", metric: {"diffs",
    "mean", "ci"}}], the baseline left out."""
    plt = pyplot()
    numeric_x = [a["x"] for a in arms] if all(a.get("x") is not None for a in arms) else None
    with plt.rc_context(PLOT_STYLE):
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.6), squeeze=False)
        for i, (ax, metric) in enumerate(zip(axes[0], metrics, strict=True)):
            xs = _arm_axis(ax, [a["label"] for a in arms], numeric_x, xlabel)
            width = (max(xs) - min(xs)) or 1.0
            for x, a in zip(xs, arms, strict=True):  # the seeds just left of the mean, side by side
                diffs = a[metric]["diffs"]
                offsets = [-0.06 * width + (j - (len(diffs) - 1) / 2) * 0.015 * width for j in range(len(diffs))]
                ax.plot([x + o for o in offsets], diffs, "o", color="0.5", ms=4,
                        label="one seed" if x == xs[0] else None)
            means = [a[metric]["mean"] for a in arms]
            cis = error_bars([a[metric]["ci"] for a in arms])
            ax.errorbar(xs, means, yerr=cis, fmt="D", color="tab:blue", capsize=5, ms=6, lw=1.6,
                        label="mean ± 95% CI")
            ax.axhline(0.0, color="black", lw=0.9)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_title(METRIC_TITLES.get(metric, metric))
            if i == 0:
                ax.set_ylabel(f"Δ vs {base_label}, same seed")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.suptitle(f"Paired differences from the baseline {base_label} (arm − baseline; below 0 = lower)")
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return Path(path)


def plot_bytes(arms: list[dict], path, cap: int = 16_000_000) -> Path:
    """Stacked code + artifact bytes per arm (mean over seeds) against the size cap, in decimal MB."""
    plt = pyplot()
    with plt.rc_context(PLOT_STYLE):
        fig, ax = plt.subplots(figsize=(8, max(2.8, 0.55 * len(arms) + 1.8)))
        ys = list(range(len(arms)))
        code = [a["bytes_code"] / 1e6 for a in arms]
        art = [a["bytes_artifact"] / 1e6 for a in arms]
        over = [a["bytes_total"] > cap for a in arms]
        ax.barh(ys, art, color=["tab:red" if o else "tab:blue" for o in over], label="artifact (compressed weights)")
        ax.barh(ys, code, left=art, color="tab:green", label="code")
        for y, a in zip(ys, arms, strict=True):
            total = a["bytes_total"]
            ax.text(total / 1e6, y, f" {round(total):,}" + (" OVER" if total > cap else ""), va="center", fontsize=9)
        ax.axvline(cap / 1e6, color="tab:red", ls="--", lw=1.5, label=f"cap {cap:,} bytes")
        ax.set_yticks(ys)
        ax.set_yticklabels([a["label"] for a in arms])
        ax.invert_yaxis()
        ax.set_xlim(0, max(cap / 1e6, max(a["bytes_total"] for a in arms) / 1e6) * 1.25)
        ax.set_xlabel("size (MB, 10^6 bytes)")
        ax.set_title("Submission size per arm: code + artifact vs the cap")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08 - 0.3 / len(arms)), ncol=3, frameon=False)
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return Path(path)
