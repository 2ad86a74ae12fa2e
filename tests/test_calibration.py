"""Calibration (temperature, ECE, thresholds), "unsure", Grad-CAM and TTA.

The hand examples check the arithmetic; the rest runs on one tiny model trained here on a
planted folder: `marked` images carry a white square in their top-left corner, `plain_a`
and `plain_b` are the same grey noise, so the model can only memorise which is which and
is over-confident between them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.core.settings import ServeSettings
from pipeline.inference import calibration as cal
from pipeline.inference.classifier import load_classifier
from pipeline.serve import create_app
from tests.conftest import LOCAL, run_cli

MARK = slice(1, 7)  # the planted square, in 24-pixel images


def test_ece_against_a_hand_computed_example():
    # 15 bins: 0.9 falls in bin 13 (0.867, 0.933]: 4 images, 3 right, gap |0.75 - 0.9| = 0.15;
    # 0.6 = 9/15 is the top edge of bin 8 (0.533, 0.6]: 2 images, 1 right, gap |0.5 - 0.6| = 0.1.
    confidence = np.array([0.9, 0.9, 0.9, 0.9, 0.6, 0.6])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    assert cal.expected_calibration_error(confidence, correct) == pytest.approx((4 * 0.15 + 2 * 0.1) / 6)
    bins = cal.reliability_bins(confidence, correct)
    assert len(bins) == 15 and [b["count"] for b in bins if b["count"]] == [2, 4]
    assert bins[8]["count"] == 2 and bins[8]["accuracy"] == 0.5 and bins[13]["confidence"] == pytest.approx(0.9)
    assert cal.expected_calibration_error(np.array([1.0, 0.5]), np.array([True, False])) == pytest.approx(0.25)


def test_lowest_threshold_and_risk_coverage_by_hand():
    confidence = np.array([0.6, 0.99, 0.8, 0.9, 0.7])
    correct = np.array([0, 1, 0, 1, 1], dtype=bool)
    # most confident first: 0.99 right, 0.9 right, 0.8 wrong, 0.7 right, 0.6 wrong
    # answered accuracy: 1, 1, 2/3, 3/4, 3/5
    assert cal.lowest_threshold(confidence, correct, 0.75, z=0) == {
        "threshold": 0.7,
        "coverage": 0.8,
        "accuracy": 0.75,
        "answered": 4,
    }
    assert cal.lowest_threshold(confidence, correct, 0.99, z=0)["threshold"] == 0.9
    assert cal.lowest_threshold(confidence, correct, 0.5, z=0)["coverage"] == 1.0
    assert cal.lowest_threshold(np.array([0.9, 0.9]), np.array([True, False]), 0.9, z=0) is None  # ties together
    curve = cal.risk_coverage(confidence, correct)
    assert [p["coverage"] for p in curve] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert [p["accuracy"] for p in curve] == pytest.approx([0.6, 0.75, 2 / 3, 1, 1])


def test_the_threshold_must_reach_the_target_beyond_chance():
    # 10 answered, all right: the 95 % Wilson lower bound is 10 / (10 + 1.645^2) = 0.787
    confidence, correct = np.linspace(0.99, 0.9, 10), np.ones(10, dtype=bool)
    assert cal.wilson_lower_bound(1.0, 10) == pytest.approx(10 / (10 + 1.645**2))
    assert cal.lowest_threshold(confidence, correct, 0.78)["threshold"] == pytest.approx(0.9)
    assert cal.lowest_threshold(confidence, correct, 0.80) is None
    assert cal.lowest_threshold(confidence, correct, 0.80, z=0)["coverage"] == 1.0
    # 300 right, then a run of 30 wrong at lower confidence: the bound stops before the run
    confidence = np.linspace(0.999, 0.5, 330)
    correct = np.r_[np.ones(300, dtype=bool), np.zeros(30, dtype=bool)]
    found = cal.lowest_threshold(confidence, correct, 0.95)
    assert found["answered"] < 330 and found["accuracy"] >= 0.95
    assert cal.wilson_lower_bound(found["accuracy"], found["answered"]) >= 0.95


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_temperature_recovers_a_known_over_confidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 5)) * 3
    truth = softmax(logits / 2.5)  # the labels follow logits / 2.5: softmax(logits) is over-confident
    y = np.array([rng.choice(5, p=p) for p in truth])
    over_confident = softmax(logits)
    temperature = cal.fit_temperature(over_confident, y)
    assert temperature == pytest.approx(2.5, rel=0.08)
    calibrated = cal.apply_temperature(over_confident, temperature)
    assert (calibrated.argmax(axis=1) == over_confident.argmax(axis=1)).all()
    assert cal.negative_log_likelihood(calibrated, y) < cal.negative_log_likelihood(over_confident, y)
    before = cal.expected_calibration_error(over_confident.max(axis=1), over_confident.argmax(axis=1) == y)
    after = cal.expected_calibration_error(calibrated.max(axis=1), calibrated.argmax(axis=1) == y)
    floor = cal.ece_noise_floor(calibrated.max(axis=1))
    assert after < before / 3 and after <= floor["p95"] and 0 < floor["p5"] < floor["mean"] < floor["p95"]


def test_a_temperature_for_the_mean_of_two_views():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3000, 4)) * 3
    y = np.array([rng.choice(4, p=p) for p in softmax(logits / 2.0)])
    p = softmax(logits)
    assert cal.fit_temperature(np.stack([p, p]), y) == pytest.approx(cal.fit_temperature(p, y), abs=1e-4)
    other = softmax(logits + rng.normal(size=logits.shape))  # a second view, as a mirror image gives

    def nll_of_mean(t):
        return cal.negative_log_likelihood((cal.apply_temperature(p, t) + cal.apply_temperature(other, t)) / 2, y)

    both, alone = cal.fit_temperature(np.stack([p, other]), y), cal.fit_temperature(p, y)
    assert both != alone and nll_of_mean(both) < nll_of_mean(alone)
    assert nll_of_mean(both) <= min(nll_of_mean(both * 0.97), nll_of_mean(both * 1.03))  # the minimum


def test_no_mistake_on_validation_keeps_the_probabilities():
    # all right: the NLL only falls as T -> 0; sharpening every answer on no evidence is refused
    p = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    assert cal.fit_temperature(p, np.array([0, 1, 0])) == 1.0
    assert cal.fit_temperature(p, np.array([0, 1, 1])) != 1.0


def test_a_temperature_set_by_two_mistakes_is_not_kept():
    # sample_data's case: 180 validation images, two confident mistakes. T fitted on all of
    # them sharpens (T < 1); fitted on 4/5 it raises the NLL of the held-out 1/5 holding a
    # mistake, so no temperature is kept and the probabilities stay as the network gave them.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 180)
    p = np.full((180, 10), 0.03 / 9)
    p[np.arange(180), y] = 0.97
    for i in (7, 100):
        p[i] = 0.001
        p[i, (y[i] + 1) % 10] = 0.97
        p[i] /= p[i].sum()
    assert cal.fit_temperature(p, y) < 1
    temperature, check = cal.checked_temperature(p, y)
    assert temperature == 1.0 and not check["kept"] and check["mistakes"] == 2
    assert check["held_out_nll"] > check["held_out_nll_without"]
    record = cal.calibrate_on_validation(p, y)
    assert record["temperature"] == 1.0 and record["after"]["nll"] == pytest.approx(record["before"]["nll"])

    # an over-confident model with many mistakes keeps its temperature
    logits = rng.normal(size=(2000, 10))
    logits[np.arange(2000), rng.integers(0, 10, 2000)] += 2
    truth = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(10, p=row) for row in truth])
    temperature, check = cal.checked_temperature(cal.apply_temperature(truth, 1 / 2.5), labels)
    assert check["kept"] and temperature == pytest.approx(2.5, rel=0.1)


def write_planted_folder(root: Path, per_class: int = 40) -> Path:
    rng = np.random.default_rng(1)
    for name in ("marked", "plain_a", "plain_b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(60, 190, size=(24, 24, 1)).repeat(3, axis=2).astype(np.uint8)
            if name == "marked":
                pixels[MARK, MARK] = 255
            Image.fromarray(pixels).save(root / name / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path]:
    """prepare (no flip, no augmentation: the mark stays in its corner) and 20 epochs of train."""
    root = tmp_path_factory.mktemp("planted")
    images = write_planted_folder(root / "images")
    data, model, reports = root / "data", root / "model", root / "reports"
    run_cli("prepare", images, "--out", data, "--size", "24", "--no-flip", "--augment", "0", "--val-size", "0.3", "-q")
    trained = run_cli(
        "train", "--data", data, "--out", model, "--epochs", "20", "--patience", "20", "--batch-size", "16",
        "--precision", "float32", "--quiet",
    )  # fmt: skip
    run_cli("evaluate", "--data", data, "--model", model, "--out", reports, "--quiet")
    return {"root": root, "images": images, "data": data, "model": model, "reports": reports, "train": trained}


def raw_validation_probabilities(planted) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.inference.model_folder import load_keras_model

    X, y = np.load(planted["data"] / "X_val.npy"), np.load(planted["data"] / "y_val.npy")
    return np.asarray(load_keras_model(planted["model"]).predict_on_batch(X), dtype=np.float64), y


def test_train_fits_a_temperature_that_lowers_validation_nll_and_changes_no_class(planted):
    calibration = json.loads((planted["model"] / "calibration.json").read_text())
    settings = json.loads((planted["model"] / "settings.json").read_text())
    assert calibration["temperature"] > 1  # over-confident between the two indistinguishable classes
    assert calibration["after"]["nll"] < calibration["before"]["nll"]
    assert settings["calibration"]["temperature"] == calibration["temperature"]
    assert settings["calibration"]["val_nll_after"] < settings["calibration"]["val_nll_before"]
    assert "calibrated on validation: temperature" in planted["train"].stdout
    raw, y = raw_validation_probabilities(planted)
    assert cal.negative_log_likelihood(raw, y) == pytest.approx(calibration["before"]["nll"], abs=1e-5)
    calibrated = cal.apply_temperature(raw, calibration["temperature"])
    assert cal.negative_log_likelihood(calibrated, y) == pytest.approx(calibration["after"]["nll"], abs=1e-5)
    assert (calibrated.argmax(axis=1) == raw.argmax(axis=1)).all()
    assert set(calibration["thresholds"]) == {"0.95", "0.99"}


def test_predict_serve_and_evaluate_give_the_same_calibrated_numbers(planted):
    with open(planted["reports"] / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    files = [planted["images"] / r["path"] for r in rows]
    by_cli = {
        p["file"]: p for p in json.loads(run_cli("predict", *files, "--model", planted["model"], "--json").stdout)
    }
    client = TestClient(create_app(planted["model"], ServeSettings(workers=1)), base_url=LOCAL)
    keras = load_classifier(planted["model"], "keras")
    raw = keras.probabilities_before_and_after([keras.preprocess(f) for f in files])[0]
    for row, file, raw_p in zip(rows, files, raw):
        served = client.post("/predict", files=[("files", (file.name, file.read_bytes()))]).json()[0]
        predicted = by_cli[str(file)]
        assert row["predicted"] == predicted["top_k"][0]["label"] == served["top_k"][0]["label"]
        assert predicted["label"] == served["label"] and predicted["novelty"] == served["novelty"]
        assert abs(float(row["confidence"]) - predicted["confidence"]) < 2e-6
        assert abs(served["confidence"] - predicted["confidence"]) < 1e-9
        assert (raw_p.max() - predicted["confidence"]) > 1e-4 or raw_p.max() > 0.9999  # the temperature applied
    metrics = json.loads((planted["reports"] / "metrics.json").read_text())
    block = metrics["calibration"]
    assert block["temperature"] == keras.temperature and len(block["reliability"]) == 15
    assert block["after"]["nll"] == pytest.approx(metrics["loss"], abs=1e-6)
    assert "test images are answered" in block["advice"] and block["ece_noise_floor"]["draws"] == 200
    html = (planted["reports"] / "report.html").read_text()
    assert "Calibration: how far to trust the confidence" in html and block["advice"].split(":")[0] in html
    assert (planted["reports"] / "reliability.png").is_file() and (planted["reports"] / "risk_coverage.png").is_file()


def test_unsure_below_the_recorded_threshold_with_the_top_k(planted):
    # 36 validation images: 12 marked ones all right, so the Wilson bound shows 0.8 (12 / 14.7)
    # there, and 0.95, which needs 52 right in a row, nowhere.
    calibration = json.loads((planted["model"] / "calibration.json").read_text())
    assert calibration["thresholds"]["0.95"] is None
    recorded = cal.threshold_for(calibration, 0.8)["threshold"]
    files = sorted((planted["images"]).rglob("*.png"))[::4]
    options = ("--model", planted["model"], "--json", "--top-k", "2", "--quiet", "--novelty-threshold", "0")
    plain = json.loads(run_cli("predict", *files, *options).stdout)
    unsure = json.loads(run_cli("predict", *files, *options, "--target-accuracy", "0.8").stdout)
    for before, after in zip(plain, unsure):
        assert after["label"] == ("unsure" if before["confidence"] < recorded else before["label"])
        assert after["top_k"] == before["top_k"] and len(after["top_k"]) == 2
    assert {"unsure"} < {p["label"] for p in unsure}  # some unsure, some answered
    settings = ServeSettings(workers=1, target_accuracy=0.8, novelty_threshold=0)  # "unsure" alone
    client = TestClient(create_app(planted["model"], settings), base_url=LOCAL)
    assert client.get("/health").json()["threshold"] == recorded
    sent = [("files", (f.name, f.read_bytes())) for f in files[:8]]
    assert [p["label"] for p in client.post("/predict", files=sent).json()] == [p["label"] for p in unsure[:8]]
    both = run_cli("predict", files[0], *options, "--threshold", "0.5", "--target-accuracy", "0.9", expect=1)
    assert "not both" in both.output and "Traceback" not in both.output
    unreached = run_cli("predict", files[0], *options, "--target-accuracy", "0.95", expect=1)
    assert "no confidence threshold reached" in unreached.output and "Traceback" not in unreached.output
    refused = client.post("/predict", params={"target_accuracy": 0.95}, files=sent[:1])
    assert refused.status_code == 422 and "no confidence threshold reached" in refused.json()["error"]


def test_gradcam_puts_the_planted_class_on_its_corner_and_explain_writes_one_png_each(planted, tmp_path):
    from pipeline.inference.gradcam import heatmaps
    from pipeline.inference.model_folder import load_keras_model

    files = sorted((planted["images"] / "marked").glob("*.png"))[:12]
    classifier = load_classifier(planted["model"], "keras")
    pixels = np.stack([classifier.preprocess(f) for f in files])
    heat = heatmaps(load_keras_model(planted["model"]), pixels, [classifier.classes.index("marked")] * len(files))
    h = heat.shape[1]
    corner = heat[:, : h // 2, : h // 2].sum(axis=(1, 2)) / np.maximum(heat.sum(axis=(1, 2)), 1e-12)
    assert np.mean(corner) > 0.5 and np.median(corner) > 0.5, corner  # a quarter of the image holds most of it
    averaged = heatmaps(load_keras_model(planted["model"]), pixels[:2], [0, 0], method="gradcam")
    assert averaged.shape == heat[:2].shape and 0 <= averaged.min() and averaged.max() <= 1
    out = tmp_path / "why"
    result = run_cli("predict", *files[:3], "--model", planted["model"], "--explain", out)
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{f.stem}.gradcam.png" for f in files[:3]) and "heatmap" in result.stderr
    assert Image.open(out / written[0]).size[0] >= 160
    client = TestClient(create_app(planted["model"], ServeSettings(workers=1)), base_url=LOCAL)
    png = client.post("/explain", files=[("files", (files[0].name, files[0].read_bytes()))])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    gallery = planted["reports"] / "misclassified_gradcam.png"
    # the planted model mistakes the two plain classes for each other: there is a gallery to show
    assert gallery.is_file() and "Grad-CAM heatmaps" in (planted["reports"] / "report.html").read_text()


def test_tta_is_the_mean_of_the_image_and_its_mirror(trained, planted, tmp_path):
    classifier = load_classifier(trained["model"])
    assert classifier.flips  # prepare's default mirrors images
    rng = np.random.default_rng(3)  # grey noise: no colour class is sure of it, so the mirror shows
    X = rng.integers(0, 256, size=(12, 16, 16, 1)).repeat(3, axis=3).astype(np.uint8)
    mirrored = np.ascontiguousarray(X[:, :, ::-1])
    t_tta = classifier.calibration["tta_temperature"]  # fitted for the mean of the two views
    expected = cal.apply_temperature(classifier.run(X)[0], t_tta) + cal.apply_temperature(
        classifier.run(mirrored)[0], t_tta
    )
    expected /= 2
    assert np.allclose(classifier.probabilities(X, tta=True), expected, atol=1e-12)
    assert not np.allclose(classifier.probabilities(X), expected, atol=1e-4)  # the mirror changes something
    photo = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, size=(24, 24, 1)).repeat(3, axis=2).astype(np.uint8)).save(photo)
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirror.png")
    options = ("--model", trained["model"], "--json", "--top-k", "3", "--quiet")
    one, two = (json.loads(run_cli("predict", f, *options).stdout)[0] for f in (photo, tmp_path / "mirror.png"))
    both = json.loads(run_cli("predict", photo, *options, "--tta").stdout)[0]
    classes = classifier.classes
    views = [
        np.array([next(t["probability"] for t in p["top_k"] if t["label"] == c) for c in classes]) for p in (one, two)
    ]
    # predict gave softmax(log p / T); softmax(log p / T_tta) is that tempered again by T_tta / T
    retempered = [cal.apply_temperature(v[None], t_tta / classifier.temperature)[0] for v in views]
    for t in both["top_k"]:
        assert t["probability"] == pytest.approx(np.mean([r[classes.index(t["label"])] for r in retempered]), abs=1e-5)
    no_flip = run_cli("predict", photo, "--model", planted["model"], "--json", "--tta")
    assert "--no-flip" in no_flip.stderr
    metrics = json.loads(run_cli("evaluate", "--data", trained["data"], "--model", trained["model"], "--out",
                                 tmp_path / "reports", "--tta", "--json", "--quiet").stdout)  # fmt: skip
    assert metrics["tta"] is True


def test_without_a_validation_split_no_temperature_and_train_says_so(tmp_path):
    from tests.conftest import write_image_folder

    images = write_image_folder(tmp_path / "images", per_class=8, size=16)
    run_cli("prepare", images, "--out", tmp_path / "data", "--size", "16", "--val-size", "0", "--quiet")
    result = run_cli("train", "--data", tmp_path / "data", "--out", tmp_path / "model", "--epochs", "1")
    assert "no validation split, so no temperature" in result.stderr
    assert not (tmp_path / "model" / "calibration.json").exists()
    assert json.loads((tmp_path / "model" / "settings.json").read_text())["calibration"]["temperature"] is None
    photo = sorted((images / "cat").iterdir())[0]
    refused = run_cli("predict", photo, "--model", tmp_path / "model", "--target-accuracy", "0.9", expect=1)
    assert "use --threshold" in refused.output and "Traceback" not in refused.output
