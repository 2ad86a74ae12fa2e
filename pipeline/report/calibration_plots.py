"""evaluate's figures of how far to trust an answer: the reliability diagram, the
risk-coverage curve and the novelty histogram.

Reads the calibration block evaluate computes (inference.calibration.evaluation_report) and
its novelty block (inference.novelty.novelty_report); writes reliability.png,
risk_coverage.png and novelty.png into evaluate's (temporary) reports folder.
Beside plots.py, which is at its size: same matplotlib Agg backend, nothing shown.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.report.plots import _pyplot


def save_reliability(report: dict, path: Path) -> None:
    """Accuracy against confidence per bin after the temperature (bars), before it (line), and
    the diagonal a calibrated model follows; the gap is what ECE sums."""
    plt = _pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(6, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    bins = report["reliability"]
    width = bins[0]["high"] - bins[0]["low"]
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    filled = [(c, b) for c, b in zip(centres, bins) if b["count"]]
    ax.bar(
        [c for c, _ in filled],
        [b["accuracy"] for _, b in filled],
        width=width * 0.9,
        color="tab:blue",
        alpha=0.75,
        label="accuracy (calibrated)",
    )
    ax.plot(
        [b["confidence"] for _, b in filled], [b["accuracy"] for _, b in filled], "o", color="tab:blue", markersize=3
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    before, after, floor = report["before"], report["after"], report["ece_noise_floor"]
    temperature = report.get("temperature")
    ax.set_title(
        f"Reliability (test split): ECE {before['ece']:.2%} -> {after['ece']:.2%}"
        + (f" at temperature {temperature:.2f}" if temperature else " (no temperature)")
        + f"\nnoise floor of a calibrated model on {sum(b['count'] for b in bins)} images: "
        f"{floor['p5']:.2%}-{floor['p95']:.2%}",
        fontsize=9,
    )
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    counts.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="tab:gray")
    counts.set_xlabel("confidence (top probability)")
    counts.set_ylabel("images")
    counts.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_risk_coverage(report: dict, path: Path) -> None:
    """The accuracy of the images answered against the share answered as the threshold rises,
    with each recorded --target-accuracy threshold marked where it lands on the test split."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    curve = report["risk_coverage"]
    ax.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], "-", color="tab:blue")
    for target, found in (report.get("thresholds_on_test") or {}).items():
        if found and found["accuracy"] is not None:
            ax.plot(found["coverage"], found["accuracy"], "o", color="tab:red")
            ax.annotate(
                f"--target-accuracy {target}\n(confidence >= {found['threshold']:.2f})",
                (found["coverage"], found["accuracy"]),
                textcoords="offset points",
                xytext=(-10, -28),
                ha="right",
                fontsize=7,
            )
    ax.set_xlabel("share of test images answered (the rest 'unsure')")
    ax.set_ylabel("accuracy of those answered")
    ax.set_xlim(0, 1.02)
    low = min((p["accuracy"] for p in curve), default=0.0)
    ax.set_ylim(max(0.0, low - 0.05), 1.01)
    ax.grid(alpha=0.3)
    ax.set_title("Risk-coverage: raise the threshold, answer fewer, be right more often", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_novelty_histogram(report: dict, path: Path) -> None:
    """The novelty of the test pictures and of the foreign ones (where given) over the same
    bins, each as a share of its own count, and the threshold above which a picture is "unknown"."""
    plt = _pyplot()
    histogram, foreign = report["histogram"], report.get("foreign")
    edges = histogram["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = (edges[1] - edges[0]) if len(edges) > 1 else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for counts, colour, name in (
        (histogram["known"], "tab:blue", "test pictures"),
        (histogram["foreign"], "tab:red", "foreign pictures"),
    ):
        if counts is None or not sum(counts):
            continue
        ax.bar(centres, [c / sum(counts) for c in counts], width=width * 0.9, color=colour, alpha=0.55,
               label=f"{name} ({sum(counts)})")  # fmt: skip
    if report["threshold"] > 0:
        ax.axvline(report["threshold"], color="black", linestyle="--", label=f"threshold {report['threshold']:.3f}")
    title = f"Novelty: {report['test_refused']:.1%} of test pictures above the threshold"
    if foreign:
        title += f"\nforeign: AUROC {foreign['auroc']:.3f}, {foreign['foreign_accepted']:.1%} accepted"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("novelty (distance to the nearest training image's features)")
    ax.set_ylabel("share of pictures")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
