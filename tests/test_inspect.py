"""inspect: the same scan as prepare, reported, with nothing written anywhere."""

import json

from PIL import Image

from tests.conftest import run_cli, snapshot, write_image_folder


def messy_folder(root):
    images = write_image_folder(root, per_class=6, classes=("cat", "dog"))
    write_image_folder(root, per_class=30, classes=("fox",), size=40, seed=3)
    (images / "cat" / "empty.png").write_bytes(b"")
    (images / "dog" / "text.jpg").write_text("not a picture")
    (images / "dog" / "notes.txt").write_text("hello")
    (images / "dog" / ".DS_Store").write_bytes(b"\0")
    (images / "__MACOSX").mkdir()
    (images / "readme.md").write_text("files at the top are not classes")
    Image.new("RGBA", (50, 30), (1, 2, 3, 0)).save(images / "cat" / "wide.png")
    return images


def test_inspect_reports_and_writes_nothing(tmp_path, monkeypatch):
    images = messy_folder(tmp_path / "images")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    result = run_cli("inspect", images, "--json")
    assert snapshot(tmp_path) == before  # not the folder, not the working directory, nothing
    found = json.loads(result.stdout)
    assert found["classes"] == ["cat", "dog", "fox"]
    assert found["counts"]["cat"]["files"] == 8 and found["counts"]["cat"]["usable"] == 7
    assert found["counts"]["dog"]["skipped"] == 1 and found["counts"]["fox"]["usable"] == 30
    assert found["counts"]["cat"]["formats"] == {"JPEG": 3, "PNG": 4} and found["counts"]["cat"]["modes"]["RGBA"] == 1
    assert found["totals"] == {"files": 45, "usable": 43, "skipped": 2, "ignored": 4}
    assert found["sizes"]["width"] == {"min": 24, "median": 40.0, "max": 50}
    assert found["sizes"]["height"]["min"] == 24 and found["sizes"]["height"]["max"] == 40
    reasons = {s["path"]: s["reason"] for s in found["skipped"]}
    assert reasons["cat/empty.png"] == "empty file (0 bytes)" and "dog/text.jpg" in reasons
    ignored = {i["path"]: i["reason"] for i in found["ignored"]}
    assert set(ignored) == {"__MACOSX", "readme.md", "dog/notes.txt", "dog/.DS_Store"}
    assert any("imbalanced" in w and "'fox'" in w and "'cat'" in w for w in found["warnings"])

    monkeypatch.setattr("pipeline.inspect.POOL_FROM", 8)  # 45 files: use the worker pool too
    pooled = json.loads(run_cli("inspect", images, "--json", "--workers", "2").stdout)
    assert pooled == found  # same findings, in the same order, from the worker processes
    text = run_cli("inspect", images, "--workers", "2").stdout
    assert snapshot(tmp_path) == before
    for expected in ("nothing written", "would skip cat/empty.png", "ignored (hidden file)", "imbalanced", "median"):
        assert expected in text, expected


def test_prepare_warns_about_imbalance(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=5, classes=("cat", "dog"))
    write_image_folder(images, per_class=20, classes=("fox",), seed=2)
    result = run_cli("prepare", images, "--out", tmp_path / "data", "--size", "16", "--workers", "1")
    assert "warning: classes are imbalanced: the largest, 'fox'" in result.stdout
    for column in ("found", "skipped", "duplicates", "train", "val", "test"):
        assert column in result.stdout


def test_inspect_missing_folder_is_one_line(tmp_path):
    result = run_cli("inspect", tmp_path / "nope", expect=1)
    assert "does not exist" in result.output and "Traceback" not in result.output
