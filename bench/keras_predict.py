"""The predict reference: load model.keras with Keras and call it on one image, as a script would.

python bench/keras_predict.py MODEL_DIR IMAGE
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

model_dir, image = Path(sys.argv[1]), sys.argv[2]
size = json.loads((model_dir / "preprocess.json").read_text())["size"]
classes = json.loads((model_dir / "classes.json").read_text())
model = keras.saving.load_model(model_dir / "model.keras", compile=False)
pixels = np.asarray(Image.open(image).convert("RGB").resize((size, size)))[None]
probabilities = np.asarray(model(pixels))[0]
print(image, classes[int(probabilities.argmax())], f"{probabilities.max():.3f}")
