"""Grad-CAM heatmaps: where in the image the model found the class it gave.

Both methods start from the keras-io grad_cam example's gradients: of the class's score
before the softmax, with respect to the last convolution's output.
- "gradcam" (Selvaraju et al. 2017, the keras-io example): the gradients averaged over the
  positions weigh the output's channels; the ReLU of the weighted sum is the heatmap.
- "hirescam" (Draelos & Carin 2020), the default: gradient times output at each position,
  summed over channels, then the ReLU. On a network that pools globally before its last
  layer the two are the same map; on this CNN (Flatten, then Dense) the score is exactly
  this sum (its layers after the last convolution are piecewise linear), whereas averaging
  the gradients over positions mixes the corner's weights with everywhere else's: on a
  class told apart by a mark in one corner, Grad-CAM's map came out negative everywhere
  (all zero after its ReLU) while HiResCAM put 99 % of the heat on the mark
  (tests/test_calibration.py).
Each map is scaled to 0-1.

Reads a loaded Keras model (model_folder.load_keras_model); writes the overlay PNGs that
`predict --explain DIR` asks for (`write_overlays`, each atomically), and gives evaluate and
serve the overlays as arrays or PNG bytes. The network is run layer by layer (its first
layers up to the last Conv2D, then the rest but the softmax) instead of as a sub-model cut
from `model.inputs`: a Sequential model loaded from model.keras need not have the symbolic
inputs and outputs that a sub-model needs in Keras 3 (keras-io#1903, keras#20116), and
every model folder of the CNN pipeline has written, old ones included, is such a stack of
layers. A model that is a graph (`train --backbone`: residual blocks) is cut at its last map
(the head's ReLU6 before pooling) with a sub-model, which a functional model loaded from
model.keras supports; the layers after it are one chain.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import atomic_write_bytes
from pipeline.core.errors import PipelineError
from pipeline.core.native_stderr import import_keras, import_tensorflow
from pipeline.data.image_folder import shown

BATCH = 64
OVERLAY_SIDE = 160  # overlays are upscaled to at least this many pixels a side
HEAT_WEIGHT = 0.45  # the heatmap's share of each overlay pixel


def _split_at_last_conv(model):
    """(layers up to and with the last Conv2D, the layers after it that give the class scores
    before the softmax, and a final Dense whose softmax is inside it, or None)."""
    keras = import_keras()
    layers = list(model.layers)
    convs = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        raise PipelineError("this model has no convolution layer to explain: --explain needs a CNN from train")
    if isinstance(model, keras.Sequential):
        head, tail = layers[: convs[-1] + 1], layers[convs[-1] + 1 :]
    else:  # a graph (train --backbone): the sub-model up to its last map, then the chain of layers after it
        last_map = max(i for i, layer in enumerate(layers) if len(layer.output.shape) == 4)
        head, tail = [keras.Model(model.inputs, layers[last_map].output)], layers[last_map + 1 :]
    last = tail[-1] if tail else None
    if isinstance(last, keras.layers.Activation) and last.get_config().get("activation") == "softmax":
        return head, tail[:-1], None
    if isinstance(last, keras.layers.Dense) and last.get_config().get("activation") == "softmax":
        return head, tail[:-1], last  # the scores: its kernel and bias, without its softmax
    raise PipelineError("this model does not end in a softmax: --explain cannot find the class scores")


METHODS = ("hirescam", "gradcam")


def heatmaps(model, pixels: np.ndarray, class_indices, method: str = "hirescam") -> np.ndarray:
    """The heatmap of `class_indices[i]` for each uint8 image: (N, h, w) in 0-1 at the last
    convolution's resolution (all 0 where no position raised the class's score)."""
    if method not in METHODS:
        raise PipelineError(f"heatmap method must be one of {', '.join(METHODS)}, got {method!r}")
    tf = import_tensorflow()
    head, tail, softmax_dense = _split_at_last_conv(model)
    pixels, class_indices = np.asarray(pixels), np.asarray(class_indices, dtype=np.int64)
    out = []
    for start in range(0, len(pixels), BATCH):
        x = tf.convert_to_tensor(pixels[start : start + BATCH], dtype=tf.float32)
        for layer in head:
            x = layer(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            scores = x
            for layer in tail:
                scores = layer(scores)
            if softmax_dense is not None:
                scores = tf.matmul(scores, softmax_dense.kernel) + softmax_dense.bias
            picked = tf.gather(scores, class_indices[start : start + BATCH], batch_dims=1)
        grads = tape.gradient(picked, x)
        if method == "gradcam":
            grads = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # one weight per channel
        cam = tf.nn.relu(tf.reduce_sum(x * grads, axis=-1)).numpy()
        top = cam.reshape(len(cam), -1).max(axis=1)
        out.append(cam / np.where(top > 0, top, 1.0)[:, None, None])
    return np.concatenate(out) if out else np.zeros((0, 1, 1))


def _jet(heat: np.ndarray) -> np.ndarray:
    """The jet colour map (blue, cyan, yellow, red) for values 0-1, as uint8 RGB."""
    rgb = np.stack([np.clip(1.5 - np.abs(4 * heat - c), 0, 1) for c in (3, 2, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The image (nearest-upscaled to OVERLAY_SIDE or more) with the heatmap (bilinear) over it, uint8 RGB."""
    from PIL import Image

    image = np.asarray(image)
    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    scale = max(1, -(-OVERLAY_SIDE // rgb.shape[0]))
    side = (rgb.shape[1] * scale, rgb.shape[0] * scale)
    big = np.asarray(Image.fromarray(rgb).resize(side, Image.Resampling.NEAREST), dtype=np.float64)
    heat_big = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(side, Image.Resampling.BILINEAR))
    mixed = (1 - HEAT_WEIGHT) * big + HEAT_WEIGHT * _jet(np.clip(heat_big, 0, 1)).astype(np.float64)
    return np.clip(mixed.round(), 0, 255).astype(np.uint8)


def overlay_png(image: np.ndarray, heat: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(overlay(image, heat)).save(buffer, format="PNG")
    return buffer.getvalue()


MAX_STEM_BYTES = 120  # of a heatmap's name, well under the 255 bytes a file name may have


def overlay_names(files: list[str]) -> list[str]:
    """One PNG name per file, none twice (a/x.png and b/x.png are x and x-2; letter case
    aside, for the file systems that ignore it): its stem, cut to MAX_STEM_BYTES of UTF-8
    (bytes that were not UTF-8 written as \\xNN), plus .gradcam.png."""
    names, taken = [], set()
    for file in files:
        stem = shown(Path(file).stem).encode("utf-8")[:MAX_STEM_BYTES].decode("utf-8", "ignore") or "image"
        name, n = f"{stem}.gradcam.png", 1
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}.gradcam.png"
        taken.add(name.casefold())
        names.append(name)
    return names


def write_overlays(folder: Path, files: list[str], pixels: np.ndarray, heat: np.ndarray) -> list[Path]:
    """`predict --explain DIR`: one overlay PNG per file in `folder` (created), each written atomically."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"--explain {folder} is a file: give a folder for the heatmaps")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image, h in zip(overlay_names(files), pixels, heat):
        atomic_write_bytes(folder / name, overlay_png(image, h))
        written.append(folder / name)
    return written
