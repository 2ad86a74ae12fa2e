"""What each stage can be told, with its defaults: the one place they are set.

Light on purpose (no numpy, no TensorFlow): the CLI reads its option defaults from here
without slowing `pipeline --help`, and the values a run used are saved with its artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.errors import PipelineError

COLOR_MODES = ("rgb", "grayscale")
NEAR_DUPLICATE_DISTANCE = 6  # bits of 64: candidates; their pixels then say which are copies
# Candidates within the distance are copies when their grey 32x32 thumbnails correlate this
# much (the 1 % of pixels that differ most set aside): 97-98 % of ordinary copies (resized,
# JPEG 30-95, EXIF-rotated, +-15 % brightness), every patched one, and 5 of the 7,219 look-alike
# candidates of the case letters and the letters (docs/prepare.md, bench/near_copies.py).
COPY_CORRELATION = 0.98
MAX_NEAR_DUPLICATE_DISTANCE = 16  # of 64 bits: beyond, two unrelated pictures' hashes meet often
SPLIT_OFF_POINTS = 5  # a class's split share this many points from the asked one is a warning
IMBALANCE_RATIO = 3.0  # largest/smallest class above this is a warning (prepare, inspect)
PRECISIONS = ("auto", "float32", "bfloat16", "float16")  # float16: mixed, for GPUs
EXPORT_FORMATS = ("litert-int8", "onnx", "openvino", "saved-model")  # `pipeline export --format`
ENGINES = ("auto", "litert", "keras", *EXPORT_FORMATS)  # an export runs under its format's name
SCHEDULES = ("one-cycle", "constant")
PEAK_RATE, PEAK_RATE_BATCH = 3e-3, 64  # the default peak learning rate, measured at this batch size
CLASS_WEIGHTS = ("none", "balanced")
FLOAT_EXPORT_DIFFERENCE = 1e-3  # a float export that moves a probability further is broken, not rounded
INFERENCE_BATCH = 256  # images per model call in evaluate and predict
CNN = "cifar-cnn"  # the design's network, trained from scratch: train's default
# train --backbone: each pretrained network and the input side it was pretrained at (prepare --size)
BACKBONE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
BACKBONES = (CNN, *BACKBONE_SIZES)
BACKBONE_PEAK_RATE = 3e-4  # Adam's peak rate fine-tuning a backbone's top stages (bench/RESULTS.md)


@dataclass
class PrepareSettings:
    size: int = 32  # square side in pixels; the CIFAR-style CNN was designed for 32x32
    color: str = "rgb"  # "rgb" or "grayscale"
    test_size: float = 0.2  # fraction of each class's source images kept for evaluate
    val_size: float = 0.1  # fraction for validation (early stopping); 0 turns it off
    augment: int = 1  # augmented copies added per training image (train split only)
    flip: bool = True  # mirror left-right when augmenting; off for digits, text, or left/right classes
    seed: int = 42  # same seed, same folder: byte-identical arrays and manifest
    workers: int = 0  # decoding processes; 0 = every available core
    strict: bool = False  # any skipped file or warning fails the run
    near_duplicate_distance: int = NEAR_DUPLICATE_DISTANCE  # perceptual-hash bits; -1 = off
    scheduler: str = ""  # Dask scheduler address (tcp://host:8786) for the per-file work; "" = local processes
    cache: str = ""  # per-file cache folder; "" = .cache beside --out (artifacts/.cache)
    no_cache: bool = False  # decode every file, neither reading nor writing the cache
    cache_limit_gb: float = 20.0  # least recently used entries go beyond this
    fixes: str = ""  # an audit.csv whose actions (keep, relabel:CLASS, exclude) apply to the scan; "" = none

    def check(self) -> None:
        if not self.cache_limit_gb > 0:
            raise PipelineError(f"--cache-limit-gb must be above 0, got {self.cache_limit_gb}")
        if not 10 <= self.size <= 1024:  # the two conv-pool stages need 10 pixels
            raise PipelineError(f"--size must be between 10 and 1024, got {self.size}")
        if self.color not in COLOR_MODES:
            raise PipelineError(f"--color must be one of {', '.join(COLOR_MODES)}, got {self.color!r}")
        if not 0 < self.test_size < 1:
            raise PipelineError(f"--test-size must be between 0 and 1, got {self.test_size}")
        if not 0 <= self.val_size < 1 or self.test_size + self.val_size >= 1:
            raise PipelineError("--val-size must be at least 0 and --test-size + --val-size below 1")
        if self.augment < 0:
            raise PipelineError(f"--augment must be 0 or more, got {self.augment}")
        if self.workers < 0:
            raise PipelineError(f"--workers must be 0 (all cores) or more, got {self.workers}")
        if not -1 <= self.near_duplicate_distance <= MAX_NEAR_DUPLICATE_DISTANCE:
            raise PipelineError(
                f"--near-duplicate-distance must be -1 (off) to {MAX_NEAR_DUPLICATE_DISTANCE} bits, "
                f"got {self.near_duplicate_distance}"
            )


@dataclass
class TrainSettings:
    epochs: int = 6  # the budget: the one-cycle schedule spans it; early stopping may end sooner
    batch_size: int = 64  # measured: as fast per image as 128 on 2 CPU cores, more accurate in few epochs
    seed: int = 42
    patience: int = 5  # epochs without a better validation loss before stopping
    learning_rate: float | None = None  # Adam's peak rate (top of the one-cycle); None: PEAK_RATE scaled to the batch
    schedule: str = "one-cycle"  # one-cycle: warm-up to the peak, cosine decay over the epochs; or constant
    warmup: float = 0.25  # share of the steps spent warming up to the peak (one-cycle)
    class_weight: str = "none"  # balanced: each class weighted by n / (classes * its training count), second half
    tensorboard: bool = False  # write TensorBoard logs to the model folder
    precision: str = "auto"  # auto: mixed float16 on one GPU, mixed bfloat16 on CPUs with native bf16, else float32
    in_memory_mb: int = -1  # arrays up to this size train from memory via tf.data; -1: half the free memory
    resume: bool = False  # continue from the checkpoint beside --out (training.checkpoints); else start over
    backbone: str = CNN  # or a pretrained network of BACKBONE_SIZES, fine-tuned (training.backbone)

    def check(self) -> None:
        if self.backbone not in BACKBONES:
            raise PipelineError(f"--backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.epochs < 1:
            raise PipelineError(f"--epochs must be at least 1, got {self.epochs}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise PipelineError(f"--learning-rate must be above 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise PipelineError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.patience < 1:
            raise PipelineError(f"--patience must be at least 1, got {self.patience}")
        if self.precision not in PRECISIONS:
            raise PipelineError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise PipelineError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.warmup < 1:
            raise PipelineError(f"warmup must be at least 0 and below 1, got {self.warmup}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise PipelineError(f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weight!r}")

    def peak_learning_rate(self) -> float:
        """--learning-rate if given; a backbone's BACKBONE_PEAK_RATE; else PEAK_RATE scaled by the square root
        of batch / PEAK_RATE_BATCH (the square-root rule for Adam: a batch 4x larger takes steps 2x larger)."""
        if self.learning_rate is not None:
            return self.learning_rate
        if self.backbone != CNN:
            return BACKBONE_PEAK_RATE
        return float(f"{PEAK_RATE * (self.batch_size / PEAK_RATE_BATCH) ** 0.5:.3g}")


def check_unsure(threshold: float, target_accuracy: float | None) -> None:
    """--threshold and --target-accuracy (predict, serve): one or the other, each in range."""
    if not 0 <= threshold <= 1:
        raise PipelineError(f"--threshold must be between 0 and 1, got {threshold}")
    if target_accuracy is not None:
        if not 0 < target_accuracy < 1:
            raise PipelineError(f"--target-accuracy must be above 0 and below 1, got {target_accuracy}")
        if threshold > 0:
            raise PipelineError("give --threshold or --target-accuracy, not both")


def check_novelty(novelty_threshold: float | None) -> None:
    """--novelty-threshold (predict, serve): None is the model's own, 0 is off, else above 0."""
    if novelty_threshold is not None and not novelty_threshold >= 0:
        raise PipelineError(f"--novelty-threshold must be 0 (off) or more, got {novelty_threshold}")


@dataclass
class AuditSettings:
    # 4 folds of train's 6 epochs: on the letters with 5 % planted (bench/audit_bench.py, two
    # plantings, before data.label_issues' in-sample check) the label issues reached 0.90
    # precision at 0.92-0.94 recall, where 3 x 6 reached 0.88-0.90 at 0.91-0.93 and 5 x 6
    # 0.90-0.92 at 0.90-0.96 for 3.9x one train; 4 x 5 and 5 x 4 ranked worse. With the check,
    # 0.923-0.934 at 0.927-0.955 (three plantings, each +-0.04 by chance). The folds two at a time on two cores
    # (training.out_of_fold) cost 2.1-2.7x one train (one after the other: 2.8-3.25x).
    folds: int = 4  # out-of-fold models; each trains on the other folds' images
    epochs: int = 6  # each fold's budget
    batch_size: int = 64
    seed: int = 42  # same seed, same data folder: the same folds and the same issues
    precision: str = "auto"  # as train's: mixed bfloat16 on CPUs with native bf16 (twice as fast), else float32
    backbone: str = CNN  # or a pretrained network: a logistic head per fold on its cached features (seconds)

    def check(self) -> None:
        if self.backbone not in BACKBONES:
            raise PipelineError(f"--backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.folds < 2:
            raise PipelineError(f"--folds must be at least 2, got {self.folds}")
        if self.epochs < 1:
            raise PipelineError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise PipelineError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise PipelineError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class PredictSettings:
    top_k: int = 1  # how many of the most likely labels to show
    threshold: float = 0.0  # below this (calibrated) top probability the label is "unsure"
    target_accuracy: float | None = None  # "unsure" below the lowest threshold reaching it on validation
    engine: str = "auto"  # auto: LiteRT when installed and model.tflite exists, else Keras
    tta: bool = False  # average over the image and its mirror image, where prepare allowed flips
    explain: str = ""  # a folder for one Grad-CAM overlay PNG per image; "" = none
    novelty_threshold: float | None = None  # above this novelty the label is "unknown"; None: the model's, 0: off

    def check(self) -> None:
        if self.top_k < 1:
            raise PipelineError(f"--top-k must be at least 1, got {self.top_k}")
        check_unsure(self.threshold, self.target_accuracy)
        check_novelty(self.novelty_threshold)
        if self.engine not in ENGINES:
            raise PipelineError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")


@dataclass
class InspectSettings:
    workers: int = 0  # decoding processes; 0 = every available core

    def check(self) -> None:
        if self.workers < 0:
            raise PipelineError(f"--workers must be 0 (all cores) or more, got {self.workers}")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"  # loopback: only this machine can connect; 0.0.0.0 opens it to the network
    port: int = 8000  # 0: any free port (the one chosen is printed)
    max_upload_mb: float = 20.0  # one request's whole body; a larger one gets 413 while it is still arriving
    max_files: int = 64  # images in one request
    workers: int = 0  # requests answered at once, each with its own copy of the model; 0 = one per core
    engine: str = "auto"  # as predict: LiteRT when installed and model.tflite exists, else Keras
    threshold: float = 0.0  # as predict: the default of /predict's threshold
    target_accuracy: float | None = None  # as predict: its threshold is /predict's default
    novelty_threshold: float | None = None  # as predict: /predict's default; None: the model's, 0: off
    max_inflight: int = 0  # POST requests held (reading, queued, computed); more get 503; 0: 256 (the connections)
    max_inflight_mb: float = 0.0  # upload bytes those requests hold; 0: 5 uploads at --max-upload-mb, at least 64
    read_timeout: float = 30.0  # seconds for one request's body to arrive; a slower one gets 408
    queue_timeout: float = 30.0  # seconds a request waits for a model worker; a longer wait gets 503
    max_megapixels: float = 24.0  # pixels one request decodes (a JPEG at its reduced draft size); more get 413
    allowed_host: tuple[str, ...] = ()  # Host names accepted beside the served host (a name the machine is reached by)

    def check(self) -> None:
        check_unsure(self.threshold, self.target_accuracy)
        check_novelty(self.novelty_threshold)
        if self.max_inflight < 0 or self.max_inflight_mb < 0:
            raise PipelineError("--max-inflight and --max-inflight-mb must be 0 (the defaults) or more")
        if not self.read_timeout > 0:
            raise PipelineError(f"--read-timeout must be above 0 seconds, got {self.read_timeout}")
        if not self.queue_timeout > 0:
            raise PipelineError(f"--queue-timeout must be above 0 seconds, got {self.queue_timeout}")
        if not self.max_megapixels > 0:
            raise PipelineError(f"--max-megapixels must be above 0, got {self.max_megapixels}")
        if not 0 <= self.port <= 65535:
            raise PipelineError(f"--port must be between 0 and 65535, got {self.port}")
        if not self.max_upload_mb > 0:
            raise PipelineError(f"--max-upload-mb must be above 0, got {self.max_upload_mb}")
        if self.max_files < 1:
            raise PipelineError(f"--max-files must be at least 1, got {self.max_files}")
        if self.workers < 0:
            raise PipelineError(f"--workers must be 0 (one per core) or more, got {self.workers}")
        if self.engine not in ENGINES:
            raise PipelineError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")


@dataclass
class ReviewSettings:
    host: str = "127.0.0.1"  # loopback, as serve: the decisions are one person's
    port: int = 8001  # beside serve's 8000, so both can run at once; 0: any free port

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise PipelineError(f"--port must be between 0 and 65535, got {self.port}")


@dataclass
class ExportSettings:
    format: str | None = "litert-int8"  # one of EXPORT_FORMATS (the CLI insists on --format)
    calibration_images: int = 300  # training images that set the int8 ranges (evenly spaced over the split)
    min_agreement: float = 0.99  # share of test images where the export's top-1 must equal Keras'
    max_difference: float | None = None  # largest probability difference; None: 1e-3 for float exports, none for int8

    def check(self) -> None:
        if self.format is None:
            raise PipelineError(f"export needs --format: one of {', '.join(EXPORT_FORMATS)}")
        if self.format not in EXPORT_FORMATS:
            raise PipelineError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        if self.calibration_images < 1:
            raise PipelineError(f"--calibration-images must be at least 1, got {self.calibration_images}")
        if not 0 <= self.min_agreement <= 1:
            raise PipelineError(f"--min-agreement must be between 0 and 1, got {self.min_agreement}")
        if self.max_difference is not None and not 0 <= self.max_difference <= 1:
            raise PipelineError(f"--max-difference must be between 0 and 1, got {self.max_difference}")

    def difference_bound(self) -> float:
        """A float export computes what Keras computes, up to rounding; int8 moves probabilities by
        design (steps of 1/256), so only its agreement is bounded unless asked."""
        if self.max_difference is not None:
            return self.max_difference
        return 1.0 if self.format == "litert-int8" else FLOAT_EXPORT_DIFFERENCE
