"""Test accuracy of several train settings on one prepared folder, one after another in one
process (TensorFlow loads once): how train's defaults were chosen.

    python bench/tune_train.py DATA_DIR NAME:EPOCHS,BATCH,PEAK_RATE,SCHEDULE[,WARMUP[,PATIENCE[,SEED]]] ...
    python bench/tune_train.py bench/work/letters_data b64:8,64,3e-3,one-cycle b128:8,128,4.2e-3,one-cycle

Each setting trains into DATA_DIR/../tune/NAME with `train_model` (as `pipeline train`
does) and prints one JSON line: the test accuracy, epochs run, fit seconds, training
images/s and the CPU seconds of the whole setting. Accuracy does not depend on how busy
the machine is; the speeds do (compare them only between runs made side by side).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core.native_stderr import import_keras
from pipeline.core.settings import TrainSettings
from pipeline.train import train_model


def main() -> None:
    keras = import_keras()
    data = Path(sys.argv[1])
    X_test, y_test = np.load(data / "X_test.npy"), np.load(data / "y_test.npy")
    for spec in sys.argv[2:]:
        name, values = spec.split(":")
        f = values.split(",")
        settings = TrainSettings(
            epochs=int(f[0]),
            batch_size=int(f[1]),
            learning_rate=float(f[2]),
            schedule=f[3],
            warmup=float(f[4]) if len(f) > 4 else TrainSettings.warmup,
            patience=int(f[5]) if len(f) > 5 else TrainSettings.patience,
            seed=int(f[6]) if len(f) > 6 else TrainSettings.seed,
        )
        out = data.parent / "tune" / name
        cpu, wall = time.process_time(), time.perf_counter()
        summary = train_model(data, out, settings)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        model = keras.saving.load_model(out / "model.keras", compile=False)
        accuracy = float((model.predict(X_test, batch_size=256, verbose=0).argmax(1) == y_test).mean())
        row = {
            "name": name,
            "settings": values,
            "test_accuracy": round(accuracy, 4),
            "epochs_run": summary["epochs_run"],
            "fit_s": summary["seconds"],
            "images_per_s": summary["train_images_per_s"],
            "cpu_s": round(cpu, 1),
            "wall_s": round(wall, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
