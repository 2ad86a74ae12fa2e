"""Int8 weights chosen by GPTQ before the LiteRT converter quantizes the model.

The converter quantizes each conv, depthwise conv and dense kernel per output channel,
symmetric on [-127, 127] (scale = the channel's largest |weight| / 127, after it folds the
BatchNorm that follows, a per-channel factor that leaves that grid as it is), and rounds
each weight to the nearest step. Nearest is not best: a pretrained backbone's first layers
are small edge filters whose weights nearly cancel on smooth image regions, so the rounding
errors, which do not cancel, come out large beside what the filter says, and the classes
move.
GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323) quantizes a kernel one input weight at a time and moves
the error of each onto the weights not yet quantized, weighted by the inputs' second
moments on the calibration images, which minimizes the layer's output error on them.

Here the kernels are set, for the conversion only, to values already on the converter's
grid (each channel keeps its largest weight, so its scale is the same): the converter's own
rounding then changes nothing, but for a channel whose folded bias would overflow int32 at that
scale (a dead channel: the converter widens its scale). The layer inputs are the float
model's, all taken in one pass over the calibration images. Measured on EfficientNet-Lite0
fine-tuned on Fashion-MNIST at 224 px (bench/RESULTS.md, int8): the int8 weights alone (in
Keras, activations float) moved the pooled features by 13 % rounded to nearest, by 4 % with
GPTQ; the whole int8 model agreed with Keras on 95.6 % of 5,897 photos it never saw, 96.5 %
with GPTQ (133 photos against 81: p = 0.0005), 97.8 % once the pixel scaling was converted
exactly too (converters._pixel_scaling_as_sub_then_mul), 98.3 % with the head's Dense held to a
finer grid (converters._coarse_and_residual_dense).
"""

from __future__ import annotations

import contextlib

import numpy as np

MAX_FAN_IN = 4096  # inputs per output; a wider layer (a large Flatten) keeps nearest rounding
DAMPING = 0.01  # of the mean diagonal, GPTQ's choice: keeps the inverse of a thin H finite
BATCH = 16
GPTQ_BLOCK = 128


@contextlib.contextmanager
def gptq_weights(model, calibration: np.ndarray):
    """Within the block, `model`'s kernels are the GPTQ-rounded ones; restored after."""
    rounded = gptq_kernels(model, calibration)
    originals = {name: model.get_layer(name).kernel.numpy() for name in rounded}
    try:
        for name, kernel in rounded.items():
            model.get_layer(name).kernel.assign(kernel)
        yield
    finally:
        for name, kernel in originals.items():
            model.get_layer(name).kernel.assign(kernel)


def gptq_kernels(model, calibration: np.ndarray) -> dict[str, np.ndarray]:
    """Layer name -> its kernel, GPTQ-rounded on `calibration` (float pixels of the model's input)."""
    found = _roundable(model)
    if not found:
        return {}
    moments = _input_moments(model, found, calibration)
    return {
        layer.name: _from_rows(gptq(_rows(layer.kernel.numpy(), _depthwise(layer)), H), layer.kernel.shape)
        for (layer, _), H in zip(found, moments)
    }


def nearest_kernel(kernel: np.ndarray, depthwise: bool) -> np.ndarray:
    """The converter's own rounding, for comparison: each output's weights to the nearest of its
    symmetric int8 steps."""
    rows = _rows(kernel, depthwise)
    scale = np.abs(rows).max(axis=1, keepdims=True) / 127
    scale[scale == 0] = 1.0
    return _from_rows(np.round(rows / scale) * scale, kernel.shape)


def _rows(kernel: np.ndarray, depthwise: bool) -> np.ndarray:
    """A row per output: (kh, kw, in, out) and (in, out) kernels by their last axis, a depthwise
    (kh, kw, channels, 1) by its channel axis."""
    kernel = np.asarray(kernel, dtype=np.float64)
    return kernel.reshape(-1, kernel.shape[2]).T if depthwise else kernel.reshape(-1, kernel.shape[-1]).T


def _from_rows(rows: np.ndarray, shape) -> np.ndarray:
    return rows.T.reshape(tuple(shape)).astype(np.float32)


def _roundable(model) -> list[tuple]:
    """(layer, its input in `model`'s graph) for each kernel the converter quantizes per channel."""
    from pipeline.core.native_stderr import import_keras

    keras = import_keras()
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            ok = layer.depth_multiplier == 1
        elif isinstance(layer, keras.layers.Conv2D):
            ok = layer.groups == 1 and int(np.prod(layer.kernel.shape[:-1])) <= MAX_FAN_IN
        elif isinstance(layer, keras.layers.Dense):
            ok = layer.kernel.shape[0] <= MAX_FAN_IN
        else:
            ok = False
        tensor = (
            _graph_input(keras, model, layer, rank=2 if isinstance(layer, keras.layers.Dense) else 4) if ok else None
        )
        if tensor is not None:
            found.append((layer, tensor))
    return found


def _graph_input(keras, model, layer, rank: int):
    """The layer's input in this model's graph: a layer called more than once (a Sequential
    built again, a backbone's training views) has an input per call."""
    for node in getattr(layer, "_inbound_nodes", []):
        tensor = node.input_tensors[0]
        if len(tensor.shape) != rank:  # a Dense on a feature map, say: left to the converter
            continue
        try:
            keras.Model(model.inputs[0], tensor)
        except ValueError:  # another call's, not reached from this model's input
            continue
        return tensor
    return None


def _input_moments(model, found: list[tuple], calibration: np.ndarray) -> list[np.ndarray]:
    """Each layer's H = E[x x^T] over the vectors its kernel multiplies (a conv's patches) on
    `calibration`: (n, n) shared by every output, or (channels, k, k) for a depthwise conv."""
    from pipeline.core.native_stderr import import_keras, import_tensorflow

    keras, tf = import_keras(), import_tensorflow()
    probe = keras.Model(model.inputs[0], [tensor for _, tensor in found])
    sums: list = [0.0] * len(found)
    counts = [0] * len(found)
    for start in range(0, len(calibration), BATCH):
        outputs = probe(np.asarray(calibration[start : start + BATCH], dtype=np.float32), training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for i, ((layer, _), x) in enumerate(zip(found, outputs)):
            vectors = _input_vectors(tf, layer, x)  # (positions, n) or (channels, positions, k)
            sums[i] = sums[i] + tf.matmul(vectors, vectors, transpose_a=True).numpy().astype(np.float64)
            counts[i] += int(vectors.shape[-2])
    return [total / max(count, 1) for total, count in zip(sums, counts)]


def _input_vectors(tf, layer, x):
    if len(x.shape) == 2:  # a Dense's input
        return x
    kh, kw = layer.kernel_size
    patches = tf.image.extract_patches(
        x,
        sizes=[1, kh, kw, 1],
        strides=[1, *layer.strides, 1],
        rates=[1, *layer.dilation_rate, 1],
        padding=layer.padding.upper(),
    )  # (batch, h, w, kh*kw*channels), in the kernel's (kh, kw, channels) order
    channels = int(x.shape[-1])
    if _depthwise(layer):
        return tf.transpose(tf.reshape(patches, (-1, kh * kw, channels)), (2, 0, 1))
    return tf.reshape(patches, (-1, kh * kw * channels))


def _depthwise(layer) -> bool:
    return type(layer).__name__ == "DepthwiseConv2D"


def gptq(W: np.ndarray, H: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """`W` (rows, n) rounded row by row onto symmetric int8 steps of the row's own scale
    (largest |w| / 127, that weight kept), the rounding errors spread by H: (n, n) shared by
    every row, or (rows, n, n). Returns the rounded values (integer steps times the scale)."""
    W = np.array(W, dtype=np.float64)
    rows, n = W.shape
    scale = np.abs(W).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    pinned = np.abs(W).argmax(axis=1)
    pinned_step = np.sign(W[np.arange(rows), pinned]) * 127.0
    U = _inverse_cholesky(H, damping)  # upper: H^-1 = U^T U
    steps = np.empty_like(W)
    # GPTQ's lazy batches: the error of each column moves the rest of its block at once, and
    # the columns after the block by one matrix product (a Flatten's 2,304 inputs: 20 s -> 1 s)
    for start in range(0, n, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, n)
        block, errors = W[:, start:end].copy(), np.zeros((rows, end - start))
        for i in range(end - start):
            column = start + i
            step = np.clip(np.round(block[:, i] / scale), -127, 127)
            step = np.where(pinned == column, pinned_step, step)
            steps[:, column] = step
            errors[:, i] = (block[:, i] - step * scale) / U[..., column, column]
            block[:, i:] -= errors[:, i, None] * U[..., column, column:end]
        if end < n:
            trailing = U[..., start:end, end:]
            W[:, end:] -= errors @ trailing if trailing.ndim == 2 else np.einsum("rb,rbn->rn", errors, trailing)
    return steps * scale[:, None]


def _inverse_cholesky(H: np.ndarray, damping: float) -> np.ndarray:
    H = np.array(H, dtype=np.float64)
    n = H.shape[-1]
    diagonal = np.diagonal(H, axis1=-2, axis2=-1)
    dead = diagonal <= 0  # an input always zero: its weights cannot matter; GPTQ's fix
    mean = diagonal.mean(axis=-1, keepdims=True)
    mean = np.where(mean > 0, mean, 1.0)
    eye = np.eye(n)
    H = H + (damping * mean)[..., None] * eye + dead[..., None] * eye
    inverse = np.linalg.inv(H)
    inverse = (inverse + np.swapaxes(inverse, -1, -2)) / 2
    return np.swapaxes(np.linalg.cholesky(inverse), -1, -2)
