"""The pretrained backbone: its weights file read without torch, and the Keras port checked on real photos."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.training.efficientnet_lite import BACKBONES, blocks_of, load_weights
from pipeline.training.weights_file import read_state_dict, sha256_of

# TensorFlow's label_image example (tensorflow/examples/label_image) classifies this photo of
# Grace Hopper as "military uniform", ImageNet class 652 (653 in its 1001-label file).
GRACE_HOPPER_CLASS = 652


def grace_hopper() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def lite0_state():
    return load_weights("efficientnet-lite0")


def test_the_port_names_a_known_photo_as_imagenet_does():
    """The whole published network (backbone + its ImageNet classifier), fed the photo as
    predict would feed it: its top-1 is the label TensorFlow's own example gives."""
    from pipeline.data.images import preprocess
    from pipeline.training.efficientnet_lite import imagenet_classifier

    model = imagenet_classifier("efficientnet-lite0")
    pixels = preprocess(grace_hopper(), 224, "rgb").pixels[None]
    probabilities = np.asarray(model(pixels, training=False))[0]
    assert probabilities.argmax() == GRACE_HOPPER_CLASS
    assert probabilities[GRACE_HOPPER_CLASS] > 0.2  # 0.36 here: the label is not a near tie


def test_the_architecture_read_from_the_weights_is_efficientnet_lite0(lite0_state):
    blocks = blocks_of(lite0_state)
    assert len(blocks) == 16  # B0's 1, 2, 2, 3, 3, 4, 1
    assert [b.stride for b in blocks if b.stride == 2] == [2, 2, 2, 2]
    assert [b.filters_out for b in blocks][-1] == 320
    assert [b.kernel for b in blocks].count(5) == 9
    assert lite0_state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert all(a.dtype in (np.float32, np.int64) for a in lite0_state.values())


def test_a_grey_picture_gives_what_the_same_picture_as_rgb_gives(lite0_state):
    """A grey model folds the colours into the stem: the same features as R = G = B."""
    from pipeline.training.backbone import build_network

    grey = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 1), dtype=np.uint8)
    as_grey = build_network("efficientnet-lite0", (48, 48, 1), 3, lite0_state)
    as_rgb = build_network("efficientnet-lite0", (48, 48, 3), 3, lite0_state)
    features = [
        np.asarray(n.pooled(n.bottom(x, training=False), training=False))
        for n, x in ((as_grey, grey), (as_rgb, np.repeat(grey, 3, axis=-1)))
    ]
    np.testing.assert_allclose(features[0], features[1], atol=1e-4)


def weights_file() -> Path:
    return BACKBONES["efficientnet-lite0"].weights_path()


def test_a_missing_or_altered_weights_file_is_one_clear_error(tmp_path):
    spec = BACKBONES["efficientnet-lite0"]
    with pytest.raises(PipelineError, match="missing"):
        read_state_dict(tmp_path / "none.pth", spec.sha256)
    altered = tmp_path / "altered.pth"
    shutil.copyfile(weights_file(), altered)
    with open(altered, "r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(PipelineError, match="altered") as caught:
        read_state_dict(altered, spec.sha256)
    assert "\n" not in str(caught.value)


def test_the_cli_says_a_backbone_package_is_missing_in_one_line(monkeypatch):
    spec = BACKBONES["efficientnet-lite1"]
    monkeypatch.setitem(BACKBONES, "efficientnet-lite1", dataclasses.replace(spec, package="no_such_weights_package"))
    with pytest.raises(PipelineError, match="no_such_weights_package is not installed"):
        load_weights("efficientnet-lite1")


class _Payload:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-target",))


def test_a_weights_file_that_would_run_code_is_refused(tmp_path):
    """A file with the right checksum (the caller's) but a pickle that calls a function
    outside a state dict's few classes is refused before anything runs."""
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"w": _Payload()}, f, protocol=2)
    with pytest.raises(PipelineError, match="shutil.rmtree is not part of a state dict"):
        read_state_dict(path, sha256_of(path))
