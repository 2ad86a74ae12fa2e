"""Figures written next to the artifacts they describe (matplotlib, no display needed)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import atomic_write_bytes
from pipeline.core.progress import plain


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    # Every text drawn is plain: a class or file name holding "$" is not TeX (a "$\\foo$"
    # would end the whole figure with a parse error), whichever figure draws it.
    matplotlib.rcParams.update({"text.parse_math": False, "text.usetex": False})
    import matplotlib.pyplot as plt

    return plt


def save_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    """Counts, with each cell shaded by its row-normalised rate (recall per true class)."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(max(4.0, 0.55 * n + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    labels = [_short_name(name, 40) for name in classes]
    ax.set_xticks(range(n), labels, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test split)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(
                        j,
                        i,
                        f"{matrix[i, j]}\n{rates[i, j]:.0%}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=color,
                    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_training_curves(history: list[dict], best_epoch: int, path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, with the kept (best) epoch marked."""
    plt = _pyplot()
    epochs = [int(row["epoch"]) + 1 for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        for key, label, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "-s")):
            values = [row.get(key) for row in history]
            if values and all(v is not None for v in values):
                ax.plot(epochs, values, style, label=label, markersize=4)
        if best_epoch:
            ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xticks(_epoch_ticks(epochs))
        ax.legend()
    if history:
        axes[1].set_ylim(max(0.0, min(_finite_values(history, "accuracy")) - 0.05), 1.02)  # room for a line at 1.0
    fig.suptitle("Training curves (the model keeps the best epoch's weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CHILD_SECONDS = 120  # a child still drawing after this is stuck: the curves are drawn here instead


class TrainingCurvesBeside:
    """training_curves.png drawn by a child process (`python -m pipeline.plots`) while train
    saves and exports the model: matplotlib takes about a second and the LiteRT export two,
    each on one core, so the curves cost no wall time on a machine with a second core. The
    child reads the history from history.csv, already written. Where the child cannot start
    or fails, `wait` draws them here, as before. As a context manager, it waits on leaving
    the block, or ends the child if the block failed."""

    def __init__(self, history_csv: Path, best_epoch: int, path: Path):
        self.history_csv, self.best_epoch, self.path = Path(history_csv), best_epoch, Path(path)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.report.plots", str(self.history_csv), str(best_epoch), str(self.path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:  # no interpreter to start (a frozen build), no process left to start
            self.process = None

    def __enter__(self) -> TrainingCurvesBeside:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Waits for the curves; when the block failed, ends the child instead, so that it
        writes nothing into a temporary folder that is being removed."""
        if exc_type is None:
            self.wait()
        elif self.process is not None:
            self.process.kill()
            self.process.wait()

    def wait(self) -> None:
        if self.process is not None:
            try:
                drawn = self.process.wait(timeout=CHILD_SECONDS) == 0 and self.path.is_file()
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                drawn = False
            if drawn:
                return
        _curves_from_csv(self.history_csv, self.best_epoch, self.path)


def _curves_from_csv(history_csv: Path, best_epoch: int, path: Path) -> None:
    from pipeline.inference.model_folder import read_history

    save_training_curves(read_history(history_csv), best_epoch, path)


def save_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float, path: Path) -> None:
    """train --find-lr: loss per batch against the learning rate (log scale), smoothed, the suggestion marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, linewidth=1, label="batch loss")
    ax.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed")
    ax.axvline(suggestion, color="tab:red", linestyle="--", linewidth=1.5, label=f"suggested {suggestion:.2g}")
    finite = [v for v in smoothed if np.isfinite(v)]
    if finite:  # the blow-up at the end would flatten the useful part
        ax.set_ylim(min(finite) * 0.9, min(max(finite), finite[0] * 1.5) * 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("Learning-rate range test (pass the suggestion as --learning-rate)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()  # written beside the user's folders, not inside an atomic one: whole or not at all
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def _epoch_ticks(epochs: list[int]) -> list[int]:
    step = max(1, len(epochs) // 15 + (len(epochs) % 15 > 0))
    return epochs[::step]


def _finite_values(history: list[dict], metric: str) -> list[float]:
    values = [row[k] for row in history for k in (metric, f"val_{metric}") if np.isfinite(row.get(k, np.nan))]
    return values or [0.0]


MAX_CLASS_ROWS = 30  # samples.png shows at most this many classes; report.json has them all


def save_samples(
    X: np.ndarray, y: np.ndarray, n_originals: int, copies: int, classes: list[str], path: Path, per_class: int = 3
) -> None:
    """A few training images per class as the model sees them, each followed by its augmented copies.

    `X`/`y` are the train arrays as prepare writes them: the `n_originals` source images
    first, then `copies` blocks of augmented versions in the same order. Drawn with Pillow
    alone: prepare is the fast stage, and importing matplotlib would cost it half a second.
    """
    from PIL import Image, ImageDraw, ImageFont

    shown_copies = min(copies, 2)
    rows = classes[:MAX_CLASS_ROWS]
    side = X.shape[1] * max(1, -(-64 // X.shape[1]))  # nearest-neighbour upscale to >= 64 px: honest pixels
    border, gap, group_gap, label_width, header, caption = 2, 4, 14, 150, 34, 14
    tile = side + 2 * border
    group = (1 + shown_copies) * tile + shown_copies * gap
    width = label_width + per_class * group + (per_class - 1) * group_gap + gap * 2
    row_height = caption + tile + gap * 2
    canvas = Image.new("RGB", (width, header + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(ImageFont, 13)
    small = _font(ImageFont, 10)
    size = f"{X.shape[1]}x{X.shape[2]} {'grayscale' if X.shape[3] == 1 else 'RGB'}"
    more = f"; first {len(rows)} of {len(classes)} classes" if len(classes) > len(rows) else ""
    note = "; blue frames: augmented copies" if shown_copies else ""
    draw.text((gap * 2, 10), f"Training samples as the model sees them ({size}{more}{note})", fill="black", font=font)
    originals = np.asarray(y[:n_originals])
    for label, name in enumerate(rows):
        top = header + label * row_height
        draw.text((gap * 2, top + caption + tile // 2 - 7), _short_name(name), fill="black", font=font)
        for k, pick in enumerate(np.flatnonzero(originals == label)[:per_class]):
            for c in range(1 + shown_copies):
                x = label_width + k * (group + group_gap) + c * (tile + gap)
                color = (31, 119, 180) if c else (0, 0, 0)
                draw.text((x, top), "augmented" if c else ("original" if shown_copies else ""), fill=color, font=small)
                draw.rectangle((x, top + caption, x + tile - 1, top + caption + tile - 1), fill=color)
                pixels = np.asarray(X[pick + c * n_originals])
                image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
                canvas.paste(
                    image.convert("RGB").resize((side, side), Image.Resampling.NEAREST),
                    (x + border, top + caption + border),
                )
    canvas.save(path, optimize=False)


def _font(ImageFont, size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _show(ax, image: np.ndarray) -> None:
    image = np.asarray(image)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")


def _short_name(name: str, limit: int = 22) -> str:
    name = " ".join(plain(name).splitlines())  # no control character reaches the font (or a warning's text)
    return name if len(name) <= limit else name[: limit - 1] + "…"


MAX_GALLERY = 40  # misclassified.png shows the most confident mistakes first, at most this many


def save_misclassified(
    X: np.ndarray, y: np.ndarray, probabilities: np.ndarray, classes: list[str], names: list[str], path: Path
) -> int:
    """Test images the model got wrong, most confident mistakes first; returns how many were wrong.

    `X` is indexed by test row: the array, or a mapping of the rows shown (evaluate's Grad-CAM overlays)."""
    plt = _pyplot()
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != y)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    if len(wrong) == 0:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No misclassified test images:\nall {len(y)} predicted correctly.", ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return 0
    shown = wrong[:MAX_GALLERY]
    columns = min(8, len(shown))
    rows = -(-len(shown) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.95 * rows + 0.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        _show(ax, X[i])
        ax.set_title(
            f"true {_short_name(classes[y[i]], 12)}\npred {_short_name(classes[predicted[i]], 12)} {confidence[i]:.0%}"
            + (f"\n{_short_name(Path(names[i]).name, 18)}" if names[i] else ""),
            fontsize=7,
            pad=3,
        )
    more = f"; the {len(shown)} most confident of {len(wrong)}" if len(wrong) > len(shown) else ""
    fig.suptitle(f"Misclassified test images, worst first ({len(wrong)} of {len(y)} wrong{more})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(wrong)


if __name__ == "__main__":  # TrainingCurvesBeside's child: HISTORY_CSV BEST_EPOCH PNG
    _curves_from_csv(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
