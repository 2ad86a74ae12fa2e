"""review: the audit's findings through the JSON API, a real `pipeline review` process killed
with SIGKILL, `prepare --fixes reviewed.csv` closing the loop, and the page in a real
headless Chromium; all on 127.0.0.1."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.core.artifacts import MARKER
from pipeline.review import review_app
from pipeline.serve import listening_socket
from pipeline.server.review_app import Pictures
from pipeline.server.review_findings import CSV_COLUMNS, KINDS
from tests.conftest import LOCAL, read_manifest, run_cli, snapshot, write_image_folder
from tests.test_html_report import CHROMIUM_FLAGS, chromium
from tests.test_serve import chromedriver, raw_request


@pytest.fixture
def review(audited, tmp_path) -> dict:
    """A copy of the session's audit folder (each test writes its own reviewed.csv)."""
    audit = tmp_path / "audit"
    shutil.copytree(audited["out"], audit)
    return {**audited, "audit": audit, "reviewed": audit / "reviewed.csv"}


def reviewed_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        return {row["path"]: row for row in reader}


def test_the_findings_come_label_issues_first_and_each_decision_is_on_disk_when_answered(review):
    client = TestClient(review_app(review["audit"], review["data"]), base_url=LOCAL)
    suspects = client.get("/api/suspects").json()
    kinds = [s["kind"] for s in suspects]
    assert kinds[0] == "label_issue" and kinds == sorted(kinds, key=KINDS.index)
    by_path = {s["path"]: s for s in suspects}
    assert len(by_path) == len(suspects)  # one finding per file; `issues` names all of its lists
    manifest = {row["path"]: row["label"] for row in read_manifest(review["data"])}
    for path, true_class in review["moved"].items():
        found = by_path[path]
        assert found["kind"] == "label_issue" and found["label"] == manifest[path] == path.split("/")[0]
        assert found["suggested_action"] == f"relabel:{true_class}" and found["suggestion"] == true_class
        assert 0.5 <= found["probability"] <= 1 and found["decision"] is None
    black = by_path["cat/black.png"]
    assert black["suggested_action"] == "exclude" and "dark" in black["issues"]  # flat: left out, whatever its label
    assert all(s["path"] in manifest for s in suspects)
    summary = client.get("/api/review").json()
    assert summary["classes"] == ["cat", "dog", "fox"] and summary["left"] == summary["total"] == len(suspects)
    assert all(
        len(summary["examples"][c]) == 4 and set(summary["examples"][c]) <= set(manifest) for c in "cat dog fox".split()
    )
    assert summary["next_commands"][0].startswith(f"pipeline prepare {review['images']} --fixes {review['reviewed']}")

    decided = {}
    wanted = [(path, f"relabel:{true_class}") for path, true_class in review["moved"].items()]
    wanted += [("cat/black.png", "exclude"), (wanted[0][0], "keep"), ("cat/blurred.png", "relabel:dog")]
    for path, action in wanted:
        answer = client.post("/api/decisions", json={"path": path, "action": action})
        assert answer.status_code == 200, answer.text
        decided[path] = action
        assert answer.json()["decision"] == action and answer.json()["left"] == len(suspects) - len(decided)
        rows = reviewed_rows(review["reviewed"])  # on disk before the answer came
        assert {p: r["action"] for p, r in rows.items()} == decided
    assert rows[wanted[1][0]]["class"] == wanted[1][0].split("/")[0] and rows[wanted[1][0]]["issues"] == "label"
    # null: undecided again, and out of the file (nothing undecided is applied)
    assert client.post("/api/decisions", json={"path": "cat/blurred.png", "action": None}).json()["decision"] is None
    del decided["cat/blurred.png"]
    assert {p: r["action"] for p, r in reviewed_rows(review["reviewed"]).items()} == decided
    # the suggestion as listed (a class) is read as relabel to it; JSON is read as JSON, sent
    # as curl -d sends it (a form's content type) or with none
    path, true_class = wanted[1][0], wanted[1][1][len("relabel:") :]
    body = json.dumps({"path": path, "action": by_path[path]["suggestion"]})
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {}):
        answer = client.post("/api/decisions", content=body, headers=headers)
        assert answer.status_code == 200 and answer.json()["decision"] == f"relabel:{true_class}", answer.text
    assert {p: r["action"] for p, r in reviewed_rows(review["reviewed"]).items()} == decided

    refused = {
        "unknown path": ({"json": {"path": "cat/nothere.png", "action": "keep"}}, 404, "not among the audit's findings"),
        "unknown class": ({"json": {"path": wanted[0][0], "action": "relabel:wolf"}}, 422, "class 'wolf' does not exist"),
        "unknown action": ({"json": {"path": wanted[0][0], "action": "delete"}}, 422, "cannot read the action 'delete'"),
        "no action": ({"json": {"path": wanted[0][0]}}, 422, '"action"'),
        "not JSON": ({"content": b"{path", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        "a form": ({"data": {"path": wanted[0][0], "action": "keep"}}, 400, "not valid JSON"),
        "not an object": ({"json": ["keep"]}, 422, '"action"'),
    }  # fmt: skip
    before = review["reviewed"].read_bytes()
    for case, (request, status, words) in refused.items():
        answer = client.post("/api/decisions", **request)
        assert answer.status_code == status and words in answer.json()["error"], (case, answer.text)
    assert review["reviewed"].read_bytes() == before

    again = TestClient(
        review_app(review["audit"], review["data"]), base_url=LOCAL
    )  # reopened: the decisions taken are shown
    assert {s["path"]: s["decision"] for s in again.get("/api/suspects").json() if s["decision"]} == decided
    assert again.get("/api/review").json()["left"] == len(suspects) - len(decided)


def test_pictures_are_served_only_for_the_files_the_review_lists(review, tmp_path):
    client = TestClient(review_app(review["audit"], review["data"]), base_url=LOCAL)
    path = next(iter(review["moved"]))
    for view, side in (("model", 16), ("file", 24)):  # as prepared, and the file itself
        answer = client.get("/api/image", params={"path": path, "view": view})
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(answer.content)) as picture:
            assert picture.size == (side, side)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    shown = {s["path"] for s in client.get("/api/suspects").json()}
    shown |= {p for paths in client.get("/api/review").json()["examples"].values() for p in paths}
    unlisted = next(row["path"] for row in read_manifest(review["data"]) if row["path"] not in shown)
    for probe in ("../secret.png", str(outside), "cat/../../secret.png", unlisted, "", "cat"):
        answer = client.get("/api/image", params={"path": probe, "view": "file"})
        assert answer.status_code == 404 and "only the files it lists" in answer.json()["error"], probe
    assert client.get("/api/image", params={"path": path, "view": "raw"}).status_code == 422
    # a listed file whose path leaves the images folder through a link is not read
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    (images / "cat" / "link.png").symlink_to(outside)
    pictures = Pictures(review["data"], images, ["cat", "dog", "fox"], {"cat/link.png", "../secret.png"})
    assert pictures.png("cat/link.png", "file") is None and pictures.png("../secret.png", "file") is None
    page = client.get("/")
    assert page.status_code == 200 and "<script>" in page.text
    assert not re.search(r"(src|href)=\"(https?:)?//|https?://", page.text)  # nothing from anywhere else
    assert "innerHTML" not in page.text  # names reach the page as text nodes only


def test_label_conflicts_and_near_copies_are_shown_with_their_copies_and_fixed_by_prepare(tmp_path):
    """The same file in cat/ and dog/ (prepare leaves both out) and a resized, re-encoded copy
    of a fox in dog/ (a near copy across classes, as prepare's report.json lists it; audit.json
    has it under either key): each file once, with its copies; relabelling the dog twin makes
    the twins agree, and prepare --fixes reviewed.csv keeps the picture."""
    images = write_image_folder(tmp_path / "images", per_class=8)
    shutil.copy(images / "cat" / "cat_001.jpg", images / "dog" / "twin.jpg")
    with Image.open(images / "fox" / "fox_002.png") as picture:
        picture.resize((30, 30)).save(images / "dog" / "copy_of_fox.jpg", quality=95)
    data = tmp_path / "data"
    run_cli("prepare", images, "--out", data, "--size", "16", "--quiet")
    report = json.loads((data / "report.json").read_text())
    assert report["label_conflicts"][0]["paths"] == ["cat/cat_001.jpg", "dog/twin.jpg"]
    near = report["cross_class_near_copies"]
    assert [sorted(group["paths"]) for group in near] == [["dog/copy_of_fox.jpg", "fox/fox_002.png"]]
    audit = tmp_path / "audit"
    audit.mkdir()
    findings = {
        "data_dir": str(data),
        "classes": ["cat", "dog", "fox"],
        "label_issues": [],
        "fits_no_class": [],
        "health": {},
        "exact_duplicates_across_classes": report["label_conflicts"],
        "near_duplicates_across_classes": near,
        "cross_class_near_copies": near,
        # doubted, but learned: shown last; one of them blurry too, shown with the health issues
        "learned_anyway": [
            {
                "path": path,
                "split": "train",
                "given": "cat",
                "suggested": "fox",
                "score": 0.3,
                "learned_probability": 0.9,
            }
            for path in ("cat/cat_004.png", "cat/cat_006.png")
        ],
    }
    findings["health"] = {
        "blurry": [{"path": "cat/cat_004.png", "split": "train", "class": "cat", "score": 0.2, "flat": False}]
    }
    (audit / "audit.json").write_text(json.dumps(findings))
    client = TestClient(review_app(audit), base_url=LOCAL)  # --data: the folder audit.json names
    suspects = {s["path"]: s for s in client.get("/api/suspects").json()}
    kinds = ["label_conflict"] * 2 + ["near_copy"] * 2 + ["blurry", "learned_anyway"]
    assert [s["kind"] for s in suspects.values()] == kinds
    assert suspects["cat/cat_004.png"]["issues"] == ["learned_anyway", "blurry"]
    learned = suspects["cat/cat_006.png"]
    assert (learned["suggestion"], learned["learned_probability"], learned["suggested_action"]) == ("fox", 0.9, "keep")
    assert suspects["dog/twin.jpg"]["copies"] == [{"path": "cat/cat_001.jpg", "class": "cat"}]
    assert suspects["fox/fox_002.png"]["copies"] == [{"path": "dog/copy_of_fox.jpg", "class": "dog"}]
    assert suspects["dog/twin.jpg"]["suggested_action"] == "keep" and suspects["dog/twin.jpg"]["suggestion"] is None
    # not in the arrays (prepare left it out): the picture comes from the images folder
    answer = client.get("/api/image", params={"path": "dog/twin.jpg", "view": "model"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert client.post("/api/decisions", json={"path": "dog/twin.jpg", "action": "relabel:cat"}).status_code == 200
    assert client.post("/api/decisions", json={"path": "fox/fox_002.png", "action": "exclude"}).status_code == 200
    before = snapshot(images)
    run_cli(
        "prepare", images, "--out", tmp_path / "fixed", "--size", "16", "--fixes", audit / "reviewed.csv", "--quiet"
    )
    assert snapshot(images) == before
    fixed = json.loads((tmp_path / "fixed" / "report.json").read_text())
    assert fixed["label_conflicts"] == [] and "fox/fox_002.png" not in {
        r["path"] for r in read_manifest(tmp_path / "fixed")
    }


EVIL = '<img src=x onerror="document.title=1">'
FORMULA = '=HYPERLINK("evil.example","x").png'


def test_hostile_names_reach_the_page_as_text_and_come_back_from_reviewed_csv(tmp_path):
    """A class folder named like HTML and a file named like a spreadsheet formula: the page in
    a real browser shows them as text, and prepare --fixes reads reviewed.csv's cells back."""
    browser, driver_path = chromium(), chromedriver()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    images = write_image_folder(tmp_path / "images", per_class=8, classes=("cat", EVIL))
    shutil.copy(images / "cat" / "cat_003.jpg", images / "cat" / FORMULA)
    data, audit = tmp_path / "data", tmp_path / "audit"
    run_cli("prepare", images, "--out", data, "--size", "16", "--quiet")
    suspect = {"path": f"{EVIL}/{EVIL}_001.jpg", "split": "train", "given": EVIL, "suggested": "cat", "score": 0.1}
    odd = {"path": f"cat/{FORMULA}", "split": "train", "given": "cat", "suggested": EVIL, "score": 0.2}
    audit.mkdir()
    (audit / "audit.json").write_text(
        json.dumps(
            {
                "data_dir": str(data),
                "classes": sorted(["cat", EVIL]),
                "label_issues": [{**suspect, "suggested_probability": 0.9}],
                "fits_no_class": [{**odd, "suggested_probability": 0.5}],
                "health": {},
                "exact_duplicates_across_classes": [],
                "near_duplicates_across_classes": [],
            }
        )
    )
    app = review_app(audit)
    client = TestClient(app, base_url=LOCAL)
    assert client.post("/api/decisions", json={"path": odd["path"], "action": "exclude"}).status_code == 200
    assert client.post("/api/decisions", json={"path": suspect["path"], "action": "relabel:cat"}).status_code == 200

    import uvicorn

    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".finding .path")]
        assert shown == [suspect["path"], odd["path"]]
        assert driver.execute_script('return document.querySelectorAll("img[src=x]").length') == 0
        assert driver.title == "Review the audit"  # the onerror never ran
        assert f"filed as {EVIL}" in driver.find_elements(By.CSS_SELECTOR, ".finding")[0].text
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    run_cli(
        "prepare", images, "--out", tmp_path / "fixed", "--size", "16", "--fixes", audit / "reviewed.csv", "--quiet"
    )
    applied = {fix["path"]: fix for fix in json.loads((tmp_path / "fixed" / "report.json").read_text())["fixes"]}
    assert applied[odd["path"]]["action"] == "exclude" and applied[suspect["path"]]["to"] == "cat"


def test_an_earlier_reviews_rows_are_kept_and_an_unreadable_one_is_never_overwritten(review):
    """Decisions on files a new audit no longer lists (excluded or relabelled by the last
    prepare --fixes) stay in reviewed.csv, so the next prepare --fixes still applies them."""
    first, second = list(review["moved"])[:2]
    review["reviewed"].write_text(
        f"path,action\n{first},exclude\ncat/cat_003.jpg,relabel:dog\n{first},keep\n{second},relabel:wolf\n",
        encoding="utf-8",
    )
    client = TestClient(review_app(review["audit"], review["data"]), base_url=LOCAL)
    # a file listed twice: its last row holds; a file this audit does not list, or a class that
    # is gone: kept as it is, until a decision on that file replaces it
    assert {s["path"]: s["decision"] for s in client.get("/api/suspects").json() if s["decision"]} == {first: "keep"}
    assert client.get("/api/review").json()["kept_aside"] == 2
    client.post("/api/decisions", json={"path": first, "action": "exclude"})
    client.post("/api/decisions", json={"path": second, "action": "keep"})
    rows = [(r["path"], r["action"]) for r in csv.DictReader(review["reviewed"].open(newline=""))]
    assert sorted(rows[:2]) == sorted([(first, "exclude"), (second, "keep")])
    assert rows[2:] == [("cat/cat_003.jpg", "relabel:dog")]
    review["reviewed"].write_bytes(b"\xff\xfe not a CSV \x00")
    result = run_cli("review", "--audit", review["audit"], "--data", review["data"], expect=1)
    assert result.output.startswith("error: ") and "move it aside" in result.output
    assert review["reviewed"].read_bytes() == b"\xff\xfe not a CSV \x00"


def test_a_new_audit_keeps_the_decisions_of_the_review(review, monkeypatch):
    # the folds one after the other in this process, as on one core: no worker processes to start
    monkeypatch.setattr("pipeline.training.out_of_fold.available_cores", lambda: 1)
    decided = "path,class,split,issues,suggested,score,action\ncat/cat_000.png,cat,train,label,dog,0.1,exclude\n"
    review["reviewed"].write_text(decided, encoding="utf-8")
    run_cli("audit", "--data", review["data"], "--out", review["audit"], "--folds", "2", "--epochs", "1", "--quiet")
    assert (review["audit"] / "audit.json").stat().st_mtime > (review["out"] / "audit.json").stat().st_mtime
    assert review["reviewed"].read_text(encoding="utf-8") == decided


def test_user_errors_are_one_line(review, tmp_path):
    missing = run_cli("review", "--audit", tmp_path / "nothing", expect=1)
    assert missing.output.startswith("error: ") and "pipeline audit" in missing.output
    other = tmp_path / "other"
    run_cli("prepare", write_image_folder(tmp_path / "two", per_class=4, classes=("a", "b")), "--out", other, "--quiet")
    wrong = run_cli("review", "--audit", review["audit"], "--data", other, expect=1)
    assert wrong.output.startswith("error: ") and "other classes" in wrong.output and "Traceback" not in wrong.output
    assert "--port" in run_cli("review", "--audit", review["audit"], "--port", "70000", expect=1).output


def start_review(audit: Path, data: Path) -> tuple[subprocess.Popen, int]:
    """A real `pipeline review` process on a free loopback port."""
    entry = Path(sys.executable).with_name("pipeline")
    command = [str(entry)] if entry.exists() else [sys.executable, "-m", "pipeline"]
    process = subprocess.Popen(
        [*command, "review", "--audit", str(audit), "--data", str(data), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    said, deadline = "", time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([process.stderr], [], [], 0.5)[0]:
            line = process.stderr.readline()
            said += line
            if line.startswith("reviewing "):
                return process, int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
    process.kill()
    raise AssertionError(f"no reviewing line (exit {process.poll()}):\n{said}")


def post_decision(port: int, path: str, action: str | None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = json.dumps({"path": path, "action": action})
        connection.request("POST", "/api/decisions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_decisions_posted_at_once_all_survive_a_sigkill_and_prepare_applies_them_all(review, tmp_path):
    """The issue's check: after audit, decisions through the API (every finding, then half of
    them changed, eight clients at once), a SIGKILL of the server: reviewed.csv holds every one
    answered last, and prepare --fixes applies them all."""
    process, port = start_review(review["audit"], review["data"])
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/api/suspects")
        suspects = json.loads(connection.getresponse().read())
        connection.close()
        paths = [s["path"] for s in suspects]
        classes = ["cat", "dog", "fox"]
        # every finding decided: the suggestion, or keep, exclude, or another class in turn
        actions = {
            p: [s["suggested_action"], "keep", "exclude", f"relabel:{classes[i % 3]}"][i % 4]
            for i, (p, s) in enumerate(zip(paths, suspects))
        }
        with ThreadPoolExecutor(8) as clients:
            answers = list(clients.map(lambda p: post_decision(port, p, actions[p]), paths))
            # then half of them changed, at once too: the last answer for a file is what holds
            changed = {p: "keep" if actions[p] != "keep" else "exclude" for p in paths[::2]}
            answers += list(clients.map(lambda p: post_decision(port, p, changed[p]), changed))
        actions.update(changed)
        assert all(status == 200 for status, _ in answers), answers
        assert len(answers) >= 12 and len(actions) >= 8
        # serve's protections: another site's page (403) or name (DNS rebinding, 400) changes nothing
        url, body = f"http://127.0.0.1:{port}", json.dumps({"path": paths[0], "action": "relabel:fox"}).encode()
        same = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json"}
        for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null"):
            assert raw_request(url, "POST", "/api/decisions", {**same, "Origin": origin}, body) == 403, origin
        assert raw_request(url, "POST", "/api/decisions", {**same, "Host": f"evil.example:{port}"}, body) == 400
        assert raw_request(url, "GET", "/api/suspects", {"Host": f"evil.example:{port}"}) == 400
        assert raw_request(url, "GET", "/api/suspects", {"Host": f"localhost:{port}"}) == 200
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    rows = reviewed_rows(review["reviewed"])
    assert {p: r["action"] for p, r in rows.items()} == actions
    left = [f for f in os.listdir(review["audit"]) if f.startswith(".") and f != MARKER]
    assert not left  # no temporary file left behind (the folder's marker is no temporary file)

    fixed = tmp_path / "fixed"
    run_cli("prepare", review["images"], "--out", fixed, "--size", "16", "--fixes", review["reviewed"], "--quiet")
    applied = {fix["path"]: fix for fix in json.loads((fixed / "report.json").read_text())["fixes"]}
    manifest = {row["path"]: row["label"] for row in read_manifest(fixed)}
    for path, action in actions.items():
        given = rows[path]["class"]
        if action == "exclude":
            assert applied[path]["action"] == "exclude" and path not in manifest
        elif action.startswith("relabel:") and action != f"relabel:{given}":
            assert applied[path] == {"path": path, "action": "relabel", "from": given, "to": action[8:]}
            assert manifest[path] == action[8:]
        else:
            assert path not in applied and manifest[path] == given


def test_the_page_in_a_real_browser_decides_by_click_and_by_key_and_a_sigkill_loses_nothing(review, tmp_path):
    browser, driver_path = chromium(), chromedriver()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    process, port = start_review(review["audit"], review["data"])
    url = f"http://127.0.0.1:{port}/"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,900"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    decisions = lambda d: [c.get_attribute("data-decision") for c in d.find_elements(By.CSS_SELECTOR, ".finding")]  # noqa: E731
    counter = lambda d: d.find_element(By.ID, "counter").text  # noqa: E731
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        cards = driver.find_elements(By.CSS_SELECTOR, ".finding")
        total = len(cards)
        assert counter(driver).startswith(f"{total} of {total} findings left")
        suggestion = cards[0].find_element(By.CSS_SELECTOR, "button.suggested").get_attribute("data-action")
        assert cards[0].get_attribute("data-kind") == "label_issue" and suggestion.startswith("relabel:")
        # by key: the first finding has the focus; Enter takes the suggestion and moves on
        driver.switch_to.active_element.send_keys(Keys.ENTER)
        wait.until(lambda d: decisions(d)[0] == suggestion)
        # by click: the third finding's exclude button; the focus moves on to the fourth
        cards[2].find_element(By.CSS_SELECTOR, 'button[data-action="exclude"]').click()
        wait.until(lambda d: decisions(d)[2] == "exclude")
        wait.until(lambda d: "current" in cards[3].get_attribute("class"))
        # by keys alone: K keeps the fourth, then R and a class's first letters relabel the fifth
        driver.switch_to.active_element.send_keys("k")
        wait.until(lambda d: decisions(d)[3] == "keep")
        wait.until(lambda d: "current" in cards[4].get_attribute("class"))
        driver.switch_to.active_element.send_keys("r")
        driver.switch_to.active_element.send_keys("fo", Keys.ENTER)
        wait.until(lambda d: decisions(d)[4] == "relabel:fox")
        driver.switch_to.active_element.send_keys("u")  # undo: the fifth is undecided again
        wait.until(lambda d: decisions(d)[4] == "")
        wait.until(lambda d: counter(d).startswith(f"{total - 3} of {total}"))
        expected = {
            c.find_element(By.CSS_SELECTOR, ".path").text: c.get_attribute("data-decision")
            for c in cards
            if c.get_attribute("data-decision")
        }
        driver.refresh()  # a reload shows the decisions taken
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        assert decisions(driver)[:5] == [suggestion, "", "exclude", "keep", ""]
        assert counter(driver).startswith(f"{total - 3} of {total}")
        assert "--fixes" in driver.find_element(By.ID, "commands").text
        shot = tmp_path / "review.png"
        assert driver.save_screenshot(str(shot))
        requested = [
            message["params"]["request"]["url"]
            for entry in driver.get_log("performance")
            if (message := json.loads(entry["message"])["message"])["method"] == "Network.requestWillBeSent"
        ]
    finally:
        driver.quit()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    rows = reviewed_rows(review["reviewed"])
    assert {p: r["action"] for p, r in rows.items()} == expected and len(expected) == 3
    network = [u for u in requested if u.split(":", 1)[0] in ("http", "https", "ws", "wss")]
    assert network and all(u.startswith(f"http://127.0.0.1:{port}/") for u in network), network
    with Image.open(shot) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] >= 1000
        assert np.asarray(image.convert("RGB"), dtype=np.int16).std() > 20  # not a blank page
    if os.environ.get("PIPELINE_DOCS_SCREENSHOTS"):  # =docs: the picture in docs/review.md (see there)
        shutil.copy(shot, Path(os.environ["PIPELINE_DOCS_SCREENSHOTS"]) / "review.png")
