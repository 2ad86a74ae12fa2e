"""CPU and wall microseconds per training image at several batch sizes, pipeline's input
path (uint8 through tf.data, scaling in the model) against the tutorial's (float64 arrays,
batch 32), in one process after one traced warm-up each: what a batch size buys in speed.

    python bench/batch_cost.py DATA_DIR 32 64 128 256

CPU time per image is the steadier figure on a shared machine; wall time moves with the load.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core.native_stderr import import_keras


def timed(run) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    keras = import_keras()
    from pipeline.training.batches import batches
    from pipeline.training.model import PixelStats, build_model, compile_model

    data = Path(sys.argv[1])
    X, y = np.load(data / "X_train.npy"), np.load(data / "y_train.npy")
    classes = int(y.max()) + 1
    stats = PixelStats.of(X)  # the network train builds: standardized by the training pixels
    for batch in map(int, sys.argv[2:]):
        model = compile_model(build_model(X.shape[1:], classes, stats), 1e-3)
        dataset, _ = batches(X, y, batch, 0, True, True)
        model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)  # tracing
        n = 3000 // batch
        cpu, wall = timed(lambda: model.fit(dataset, steps_per_epoch=n, epochs=1, verbose=0))  # noqa: B023
        print(
            f"pipeline batch {batch}: cpu {1e6 * cpu / (n * batch):.0f} us/image, wall {1e6 * wall / (n * batch):.0f}"
        )
    X64, Y = X.astype("float") / 256, keras.utils.to_categorical(y, classes)
    model = build_model(X.shape[1:], classes)
    model.compile(loss="categorical_crossentropy", optimizer="adam")
    model.fit(X64[:96], Y[:96], batch_size=32, epochs=1, verbose=0)
    n = 3000 // 32 * 32
    cpu, wall = timed(lambda: model.fit(X64[:n], Y[:n], batch_size=32, epochs=1, verbose=0))
    print(f"tutorial batch 32 (float64): cpu {1e6 * cpu / n:.0f} us/image, wall {1e6 * wall / n:.0f}")


if __name__ == "__main__":
    main()
