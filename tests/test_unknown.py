""" "unknown": the novelty score, through the real CLI on the session's tiny model (colour noise).

Pictures of another kind (grey shapes) are answered "unknown", the test pictures are not;
evaluate --foreign measures it; a model folder from before novelty still predicts, never
"unknown"; the score itself is exact where it must be.
"""

import csv
import json
import shutil

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from pipeline.core import paths
from pipeline.data.data_folder import read_split_paths
from pipeline.inference import novelty
from pipeline.serve import create_app
from tests.conftest import run_cli


def write_shapes(folder, count: int = 8, size: int = 24):
    """Grey pictures of another kind than the colour-noise classes: circles and stripes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("L", (size, size), 255 if i % 2 else 30)
        draw = ImageDraw.Draw(image)
        if i % 4 < 2:
            draw.ellipse((4, 4, size - 4 - i % 3, size - 4), fill=120 + 10 * i)
        else:
            for x in range(0, size, 4 + i % 3):
                draw.rectangle((x, 0, x + 1, size), fill=200 - 10 * i)
        image.save(folder / f"shape_{i}.png")
    return folder


def test_a_tiny_model_says_unknown_for_another_kind_and_not_for_its_test_pictures(trained, tmp_path):
    info = json.loads((trained["model"] / paths.NOVELTY_FILE).read_text())
    assert info["version"] == novelty.NOVELTY_VERSION and info["set_on"] == "validation" and info["keep"] == 0.99
    assert info["threshold"] > 0 and info["bank_images"] == info["training_sources"]
    bank = np.load(trained["model"] / paths.NOVELTY_FEATURES_FILE, allow_pickle=False)
    assert bank.dtype == np.float16 and bank.shape == (info["bank_images"], info["dimensions"])
    settings = json.loads((trained["model"] / paths.TRAIN_SETTINGS_FILE).read_text())
    assert settings["model_folder_version"] == 2 and settings["novelty"]["threshold"] == info["threshold"]

    shapes = write_shapes(tmp_path / "shapes")
    test_files = [trained["images"] / p for p in read_split_paths(trained["data"], "test", 999) if p]
    result = run_cli("predict", shapes, *test_files, "--model", trained["model"], "--json", "--quiet")
    answers = {p["file"]: p for p in json.loads(result.stdout)}
    foreign = [answers[str(f)] for f in sorted(shapes.iterdir())]
    known = [answers[str(f)] for f in test_files]
    assert all(a["label"] == "unknown" and a["novelty"] > info["threshold"] for a in foreign)
    assert all(a["top_k"][0]["label"] in ("cat", "dog", "fox") for a in foreign)  # what it leaned towards
    assert sum(a["label"] == "unknown" for a in known) <= 1, [a["novelty"] for a in known]
    assert min(a["novelty"] for a in foreign) > max(a["novelty"] for a in known)

    # the terminal says it too; --novelty-threshold 0 turns it off, a higher one lets them through
    printed = run_cli("predict", shapes, "--model", trained["model"], "--quiet").stdout
    assert [line.split()[1] for line in printed.splitlines()] == ["unknown"] * len(foreign) and "novelty " in printed
    off = json.loads(
        run_cli("predict", shapes, "--model", trained["model"], "--json", "--novelty-threshold", "0").stdout
    )
    assert all(a["label"] != "unknown" and a["novelty"] is not None for a in off)
    high = max(a["novelty"] for a in foreign) + 1
    above = json.loads(
        run_cli("predict", shapes, "--model", trained["model"], "--json", "--novelty-threshold", high).stdout
    )
    assert not any(a["label"] == "unknown" for a in above)
    # "unknown" comes before and apart from "unsure": a threshold no confidence reaches
    both = json.loads(
        run_cli("predict", shapes, *test_files[:3], "--model", trained["model"], "--json", "--threshold", "1").stdout
    )
    assert {a["label"] for a in both} == {"unknown", "unsure"}


def test_evaluate_foreign_reports_auroc_and_rates_and_the_card_says_how(trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    shapes = write_shapes(tmp_path / "shapes", count=12)
    (shapes / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "reports"
    run_cli("evaluate", "--data", trained["data"], "--model", model, "--out", out, "--foreign", shapes, "--quiet")
    metrics = json.loads((out / paths.METRICS_FILE).read_text())["novelty"]
    assert (
        metrics["available"]
        and metrics["threshold"] == json.loads((model / paths.NOVELTY_FILE).read_text())["threshold"]
    )
    foreign = metrics["foreign"]
    assert foreign["n_foreign"] == 12 and foreign["auroc"] == 1.0 and foreign["foreign_accepted"] == 0.0
    assert foreign["known_refused"] == metrics["test_refused"] <= 0.1
    assert {"auroc", "fpr_at_95_tpr"} <= set(foreign["baseline"]) and "auroc_se" in foreign
    assert sum(metrics["histogram"]["known"]) == foreign["n_known"] and sum(metrics["histogram"]["foreign"]) == 12
    assert (out / paths.NOVELTY_PNG).is_file()
    page = (out / paths.REPORT_HTML).read_text()
    assert "Unknown pictures" in page and "AUROC" in page and str(shapes) in page
    card = (model / paths.MODEL_CARD_FILE).read_text()
    assert "## Unknown pictures" in card and "keeps 99% of the" in card and "AUROC 1.0000" in card
    printed = run_cli("evaluate", "--data", trained["data"], "--model", model, "--out", out, "--foreign", shapes).stdout
    assert "unknown: novelty above" in printed and "AUROC 1.0000" in printed


def test_serve_gives_novelty_and_unknown(trained, tmp_path):
    shapes = write_shapes(tmp_path / "shapes", count=2)
    client = TestClient(create_app(trained["model"]), base_url="http://127.0.0.1")
    health = client.get("/health").json()
    assert health["novelty"] and health["novelty_threshold"] > 0
    files = [("files", (p.name, p.read_bytes())) for p in sorted(shapes.iterdir())]
    answer = client.post("/predict", files=files).json()
    assert [a["label"] for a in answer] == ["unknown", "unknown"] and all(a["novelty"] > 0 for a in answer)
    answer = client.post("/predict", params={"novelty_threshold": 0}, files=files).json()
    assert all(a["label"] in ("cat", "dog", "fox") for a in answer)


def test_a_model_folder_from_before_novelty_still_predicts_and_says_why_not(trained, tmp_path):
    """A folder of model_folder_version 1: model.tflite with one output, no novelty.json."""
    from pipeline.inference.model_folder import load_keras_model

    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    (model / paths.NOVELTY_FILE).unlink()
    (model / paths.NOVELTY_FEATURES_FILE).unlink()
    load_keras_model(model).export(str(model / paths.TFLITE_FILE), format="litert", verbose=False)  # one output
    shapes = write_shapes(tmp_path / "shapes", count=2)
    for engine in ("litert", "keras"):
        result = run_cli("predict", shapes, "--model", model, "--json", "--engine", engine)
        answers = json.loads(result.stdout)
        assert all(a["novelty"] is None and a["label"] in ("cat", "dog", "fox") for a in answers)
        assert "trained before novelty" in result.stderr
    refused = run_cli("predict", shapes, "--model", model, "--novelty-threshold", "0.5", expect=1)
    assert (
        refused.output.startswith("error: --novelty-threshold needs a novelty score")
        and "Traceback" not in refused.output
    )
    csv_file = tmp_path / "p.csv"
    run_cli("predict", shapes, "--model", model, "--csv", csv_file, "--quiet")
    with open(csv_file, newline="") as f:
        assert all(row["novelty"] == "" for row in csv.DictReader(f))
    out = tmp_path / "reports"
    run_cli("evaluate", "--data", trained["data"], "--model", model, "--out", out, "--foreign", shapes, "--quiet")
    assert json.loads((out / paths.METRICS_FILE).read_text())["novelty"]["available"] is False
    # a novelty.json of another version is not scored, said so
    (model / paths.NOVELTY_FILE).write_text(json.dumps({"version": 99}))
    result = run_cli("predict", shapes, "--model", model, "--json")
    assert "novelty version 99" in result.stderr and all(a["novelty"] is None for a in json.loads(result.stdout))


def test_bad_novelty_options_are_one_line(trained, tmp_path):
    shapes = write_shapes(tmp_path / "shapes", count=1)
    result = run_cli("predict", shapes, "--model", trained["model"], "--novelty-threshold", "-1", expect=1)
    assert result.output.startswith("error: --novelty-threshold must be 0 (off) or more")
    result = run_cli("evaluate", "--data", trained["data"], "--model", trained["model"], "--out", tmp_path / "r",
                     "--foreign", tmp_path / "nowhere", expect=1)  # fmt: skip
    assert result.output.startswith("error: --foreign") and not (tmp_path / "r").exists()


def test_the_distance_is_exact_near_zero_and_the_threshold_keeps_its_share():
    rng = np.random.default_rng(0)
    train = rng.random((300, 16)).astype(np.float32)
    val = rng.random((200, 16)).astype(np.float32)
    bank, info = novelty.fit_novelty(train, val, keep=0.9)
    scorer = novelty.Novelty(novelty.normalised(bank), info["k"], info["threshold"], info)
    kept = np.mean(scorer.scores(val) <= info["threshold"])
    assert 0.9 <= kept < 0.9 + 1 / len(val)  # the lowest score keeping at least 90 %
    # a training image itself is at 0, and a rounding of 1e-7 stays that small (not sqrt(1e-7))
    itself = scorer.scores(novelty.normalised(bank)[:5])
    assert np.all(itself < 1e-6)
    nudged = scorer.scores(novelty.normalised(bank)[:5] * (1 + 1e-7))
    assert np.abs(nudged - itself).max() < 1e-6
    # without a validation split: each training image against the others, never itself
    _, alone = novelty.fit_novelty(train, np.zeros((0, 16)), keep=0.99)
    assert alone["set_on"].startswith("training") and alone["threshold"] > 0
    # the bank is capped, evenly drawn
    assert len(novelty.even_rows(100_000, novelty.MAX_BANK)) == novelty.MAX_BANK


def test_a_pickled_bank_is_refused(trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    np.save(model / paths.NOVELTY_FEATURES_FILE, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    result = run_cli("predict", trained["images"] / "cat", "--model", model, expect=1)
    assert "without pickle" in result.output and "Traceback" not in result.output


def test_the_inference_model_takes_a_pooled_vector_as_it_is_and_a_shared_layer_s_own_call():
    """The contract with `--backbone`: its pooled features (a vector) are the features, even when
    the layer named "features" was first called by another view of the network."""
    from pipeline.core.native_stderr import import_keras
    from pipeline.inference.model_folder import inference_model
    from pipeline.training.model import build_model

    keras = import_keras()
    layers = keras.layers
    pool = layers.GlobalAveragePooling2D(name="features")
    view_input = keras.Input((6, 6, 4))
    keras.Model(view_input, pool(view_input))  # another view calls the shared layer first
    pixels = keras.Input((8, 8, 3))
    model = keras.Model(pixels, layers.Dense(3, activation="softmax")(pool(layers.Conv2D(4, 3)(pixels))))
    assert [tuple(t.shape) for t in inference_model(model).outputs] == [(None, 3), (None, 4)]
    # the CNN's map, 6 x 6 x 64 at 32 px, averaged over a 3 x 3 grid
    assert [tuple(t.shape) for t in inference_model(build_model((32, 32, 3), 5)).outputs] == [(None, 5), (None, 576)]
    untitled = keras.Sequential([keras.Input((8, 8, 3)), layers.Flatten(), layers.Dense(2, activation="softmax")])
    assert inference_model(untitled) is None  # trained before novelty: probabilities only
