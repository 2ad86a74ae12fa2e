"""serve: the API through FastAPI's TestClient, a real `pipeline serve` process, and the page
in a real headless Chromium; all on the session's tiny model and on 127.0.0.1 only."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import select
import shutil
import signal
import socket
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

from pipeline.core.settings import ServeSettings
from pipeline.serve import create_app, listening_socket
from tests.conftest import LOCAL, run_cli
from tests.test_html_report import CHROMIUM_FLAGS, chromium
from tests.test_images import bomb_png, truncated_jpeg

LIMITS = ServeSettings(max_upload_mb=0.25, max_files=4, workers=2)


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory) -> Path:
    """A copy of the session's model with evaluate's reports beside it, as artifacts/ holds them."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(trained["model"], root / "model")
    run_cli("evaluate", "--data", trained["data"], "--model", root / "model", "--out", root / "reports", "--quiet")
    return root / "model"


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served, LIMITS), base_url=LOCAL) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photos(trained) -> list[Path]:
    """Two PNGs and two JPEGs of each class."""
    return [path for name in ("cat", "dog", "fox") for path in sorted((trained["images"] / name).iterdir())[:4]]


def cli_predictions(model: Path, files: list[Path], *options) -> dict[str, dict]:
    """`pipeline predict --json` on the same files, by file name."""
    result = run_cli("predict", *files, "--model", model, "--json", "--quiet", *options)
    return {Path(p["file"]).name: p for p in json.loads(result.stdout)}


def assert_same_predictions(answer: list[dict], expected: dict[str, dict], atol: float = 1e-6) -> None:
    assert sorted(p["file"] for p in answer) == sorted(expected)
    for p in answer:
        e = expected[p["file"]]
        assert p["label"] == e["label"]
        assert [t["label"] for t in p["top_k"]] == [t["label"] for t in e["top_k"]]
        assert np.allclose([t["probability"] for t in p["top_k"]], [t["probability"] for t in e["top_k"]], atol=atol)
        assert abs(p["confidence"] - e["confidence"]) <= atol
        assert p["novelty"] is not None and abs(p["novelty"] - e["novelty"]) <= max(atol, 1e-5)


def upload(*paths: Path) -> list:
    return [("files", (path.name, path.read_bytes())) for path in paths]


def test_predict_answers_as_predict_json_does(client, served, photos):
    expected = cli_predictions(served, photos, "--top-k", "3")
    answer = client.post("/predict", params={"top_k": 3}, files=upload(*photos[:4]))
    assert answer.status_code == 200, answer.text
    assert_same_predictions(answer.json(), {p.name: expected[p.name] for p in photos[:4]})
    for photo in photos:  # one at a time, as the page sends them, multipart and raw body
        one = client.post("/predict", params={"top_k": 3}, files=upload(photo))
        assert_same_predictions(one.json(), {photo.name: expected[photo.name]})
        raw = client.post("/predict?top_k=3", content=photo.read_bytes(), headers={"Content-Type": "image/png"})
        assert_same_predictions([{**raw.json()[0], "file": photo.name}], {photo.name: expected[photo.name]})
    # --threshold: below it the label is unsure, on both sides
    cut = sorted(p["confidence"] for p in expected.values())[len(expected) // 2]
    expected = cli_predictions(served, photos, "--top-k", "2", "--threshold", str(cut))
    answer = client.post("/predict", params={"top_k": 2, "threshold": cut}, files=upload(*photos[:4]))
    assert_same_predictions(answer.json(), {p.name: expected[p.name] for p in photos[:4]})


def bad_requests(tmp_path: Path, photo: Path) -> dict[str, tuple[dict, int, str]]:
    """{case: (TestClient.post keyword arguments, status, words the error must hold)}."""
    cut = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    bomb = bomb_png(tmp_path / "bomb.png").read_bytes()
    good = photo.read_bytes()
    over_limit = b"\xff" * int(LIMITS.max_upload_mb * 2**20 + 1)
    multipart = {"Content-Type": "multipart/form-data; boundary=xyz"}
    return {
        "not an image": ({"files": [("files", ("letter.png", b"Dear user, not a picture."))]}, 422, "not an image"),
        "truncated": ({"files": [("files", ("cut.jpg", cut))]}, 422, "truncated"),
        # over the pixel budget (--max-megapixels), refused from its header before Pillow's own bomb check
        "decompression bomb": ({"files": [("files", ("bomb.png", bomb))]}, 413, "--max-megapixels"),
        "raw decompression bomb": ({"content": bomb, "headers": {"Content-Type": "image/png"}}, 413, "too many pixels"),
        "empty body": ({"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "empty body"),
        "empty file": ({"files": [("files", ("empty.jpg", b""))]}, 422, "empty file"),
        "one bad among good": ({"files": [("files", ("a.png", good)), ("files", ("x.png", b"x"))]}, 422, "x.png"),
        "wrong content type": ({"json": {"image": "cat"}}, 415, "unsupported content type 'application/json'"),
        "form fields only": ({"data": {"image": "cat"}}, 415, "application/x-www-form-urlencoded"),
        "no file part": ({"content": b"--xyz\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--xyz--\r\n", "headers": multipart}, 400, "no files"),
        "malformed multipart": ({"content": b"this is no multipart body", "headers": multipart}, 400, "multipart"),
        "no boundary": ({"content": b"x", "headers": {"Content-Type": "multipart/form-data"}}, 400, "boundary"),
        "too many files": ({"files": [("files", (f"{i}.png", good)) for i in range(5)]}, 413, "too many files"),
        "over --max-upload-mb": ({"content": over_limit, "headers": {"Content-Type": "image/png"}}, 413, "too large"),
        # no Content-Length: the limit is found while reading
        "over the limit, chunked": ({"content": iter([over_limit[:99999]] * 4), "headers": {"Content-Type": "image/png"}}, 413, "too large"),
        "top_k 0": ({"params": {"top_k": 0}, "content": good, "headers": {"Content-Type": "image/png"}}, 422, "top_k"),
        "threshold 2": ({"params": {"threshold": 2}, "content": good}, 422, "threshold"),
        "threshold not a number": ({"params": {"threshold": "high"}, "content": good}, 422, "threshold"),
    }  # fmt: skip


def test_bad_input_gets_a_4xx_naming_it_and_the_next_request_is_served(client, served, photos, tmp_path):
    expected = cli_predictions(served, photos[:1])
    for case, (request, status, words) in bad_requests(tmp_path, photos[0]).items():
        answer = client.post("/predict", **request)
        assert answer.status_code == status, (case, answer.text)
        assert words in answer.json()["error"], (case, answer.json())
        after = client.post("/predict", files=upload(photos[0]))
        assert after.status_code == 200, (case, after.text)
        assert_same_predictions(after.json(), expected)
    answer = client.post("/predict", files=[("files", ("x.png", b"x")), ("files", ("y.txt", b"y"))]).json()
    assert [f["file"] for f in answer["files"]] == ["x.png", "y.txt"]  # every unreadable file is named


def test_the_keras_engine_answers_the_same(served, photos):
    expected = cli_predictions(served, photos, "--top-k", "2")
    keras_app = TestClient(create_app(served, ServeSettings(engine="keras", workers=2)), base_url=LOCAL)
    assert keras_app.get("/health").json()["engine"] == "keras"
    answer = keras_app.post("/predict", params={"top_k": 2}, files=upload(*photos))
    assert_same_predictions(answer.json(), expected, atol=1e-4)  # predict ran LiteRT: as close as the engines agree


def test_health_classes_and_a_self_contained_page(client, served):
    classes = json.loads((served / "classes.json").read_text())
    metrics = json.loads((served.parent / "reports" / "metrics.json").read_text())
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True and health["engine"] == "litert"
    assert health["classes"] == classes and health["version"] and health["workers"] == 2
    assert health["test_accuracy"] == metrics["accuracy"]  # found beside the model folder
    assert client.get("/classes").json() == {"classes": classes}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script>" in page.text and 'type="file"' in page.text and "multiple" in page.text
    assert not re.search(r"https?://|(src|href)=\"//", page.text)  # nothing fetched from anywhere
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/nothing").json() == {"error": "Not Found"}


def test_reports_of_another_model_are_not_shown(served, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(served, model)
    reports = tmp_path / "reports"
    reports.mkdir()
    metrics = json.loads((served.parent / "reports" / "metrics.json").read_text())
    (reports / "metrics.json").write_text(json.dumps({**metrics, "classes": ["a", "b", "c"]}))
    assert TestClient(create_app(model, LIMITS), base_url=LOCAL).get("/health").json()["test_accuracy"] is None
    given = TestClient(create_app(model, LIMITS, reports_dir=served.parent / "reports"), base_url=LOCAL)
    assert given.get("/health").json()["test_accuracy"] == metrics["accuracy"]  # --reports


def multipart_body(paths: list[Path]) -> tuple[bytes, str]:
    boundary = "pipeline-test-boundary"
    body = io.BytesIO()
    for path in paths:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'.encode())
        body.write(b"Content-Type: application/octet-stream\r\n\r\n" + path.read_bytes() + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def post(port: int, body: bytes, content_type: str, query: str = "") -> tuple[int, object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", f"/predict{query}", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def read_serving_line(process: subprocess.Popen, timeout: float = 60) -> str:
    """stderr up to the line that names the URL; fails with what was said if the server exits."""
    said, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([process.stderr], [], [], 0.5)[0]:
            line = process.stderr.readline()
            said += line
            if line.startswith("serving "):
                return line
    raise AssertionError(f"no serving line (exit {process.poll()}):\n{said}")


def test_a_real_server_process_answers_clients_at_once_and_stops_on_sigterm(served, photos):
    expected = cli_predictions(served, photos, "--top-k", "2")
    entry = Path(sys.executable).with_name("pipeline")
    command = [str(entry)] if entry.exists() else [sys.executable, "-m", "pipeline"]
    process = subprocess.Popen(
        [*command, "serve", "--model", str(served), "--port", "0", "--max-upload-mb", "0.25"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_serving_line(process)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/health")
        assert json.loads(connection.getresponse().read())["model_loaded"] is True
        connection.close()

        def predict_one(path: Path) -> list[dict]:
            status, answer = post(port, *multipart_body([path]), query="?top_k=2")
            assert status == 200, answer
            return answer

        with ThreadPoolExecutor(8) as clients:  # 8 clients at once, 24 requests: no answer mixed up
            answers = list(clients.map(predict_one, photos * 2))
        for photo, answer in zip(photos * 2, answers):
            assert_same_predictions(answer, {photo.name: expected[photo.name]})
        assert post(port, b"not an image", "image/jpeg")[0] == 422
        assert post(port, b"\0" * 2**20, "image/png")[0] == 413
        assert_same_predictions(predict_one(photos[0]), {photos[0].name: expected[photos[0].name]})
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "server stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_user_errors_are_one_line(served, tmp_path):
    missing = run_cli("serve", "--model", tmp_path / "nothing", expect=1)
    assert missing.output.startswith("error: ") and "pipeline train" in missing.output
    assert "Traceback" not in missing.output
    assert "--max-upload-mb" in run_cli("serve", "--model", served, "--max-upload-mb", "0", expect=1).output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a subprocess, so that a server that did start would be killed by the timeout
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "serve", "--model", str(served), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: " + (
        "the address is already in use (another server? pick --port)"
    )


@pytest.fixture(scope="module")
def live_server(served):
    """The app under uvicorn in a thread of this process, on a free loopback port."""
    import uvicorn

    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(served, LIMITS), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def chromedriver() -> str:
    found = shutil.which("chromedriver")
    if not found:
        if os.environ.get("PIPELINE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromedriver is required (PIPELINE_REQUIRE_CHROMIUM=1) but not installed")
        pytest.skip("chromedriver not installed (apt-get install chromium-driver)")
    return found


def test_the_page_in_a_real_browser_labels_two_dropped_photos(live_server, served, photos, tmp_path):
    browser, driver_path = chromium(), chromedriver()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chosen = [photos[0], photos[-1]]  # a cat PNG and a fox JPEG
    expected = cli_predictions(served, chosen, "--top-k", "3")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,800"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get(live_server + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#classes .class")) == 3)
        assert "test accuracy" in driver.find_element(By.ID, "model").text
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in chosen))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.card[data-state="done"]')) == 2)
        for card in driver.find_elements(By.CSS_SELECTOR, ".card"):
            name = card.find_element(By.CSS_SELECTOR, ".name").text
            assert card.get_attribute("data-label") == expected[name]["label"]
            assert len(card.find_elements(By.CSS_SELECTOR, ".bar")) == 3  # the top 3 of three classes
            assert driver.execute_script("return arguments[0].querySelector('img').naturalWidth", card) > 0
        # "why?": the heatmap from POST /explain replaces the photo (overlays are 160 px or more a side)
        card = driver.find_elements(By.CSS_SELECTOR, ".card")[0]
        card.find_element(By.CSS_SELECTOR, "button.why").click()
        wait.until(lambda d: "heatmap:" in card.find_element(By.CSS_SELECTOR, "button.why").text)
        width = "return arguments[0].querySelector('img').naturalWidth"
        wait.until(lambda d: d.execute_script(width, card) >= 160)
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    with Image.open(shot) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] >= 1000
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert pixels.std() > 20  # not a blank page


def test_workers_silencing_native_stderr_at_once_leave_stderr_whole(capfd):
    """Each worker's first model call allocates tensors with fd 2 pointed away; two at once
    once restored each other's copies and left a closed sys.stderr (a server that could not
    say "server stopped")."""
    from pipeline.core.native_stderr import quiet_native_stderr

    before, stream = os.fstat(2), sys.stderr

    def swap(_):
        for _ in range(50):
            with quiet_native_stderr():
                time.sleep(0.0005)

    with ThreadPoolExecutor(8) as threads:
        list(threads.map(swap, range(8)))
    after = os.fstat(2)
    assert sys.stderr is stream and not sys.stderr.closed
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    print("still heard", file=sys.stderr)
    assert "still heard" in capfd.readouterr().err


def test_the_api_docs_render_offline_and_ask_nothing_beyond_loopback(live_server, tmp_path):
    """/docs in a real browser: Swagger UI draws every route, and every request the page makes
    (its scripts, styles, icon and the OpenAPI schema) goes to the server itself."""
    browser, driver_path = chromium(), chromedriver()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,800"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get(live_server + "/docs")
        paths = lambda d: {e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}  # noqa: E731
        WebDriverWait(driver, 30).until(lambda d: {"/predict", "/health", "/classes"} <= paths(d))
        requested = [
            message["params"]["request"]["url"]
            for entry in driver.get_log("performance")
            if (message := json.loads(entry["message"])["message"])["method"] == "Network.requestWillBeSent"
        ]
    finally:
        driver.quit()
    assert any(url.endswith("/openapi.json") for url in requested)
    assert any(url.endswith(".js") for url in requested)  # Swagger UI's bundle, from the app
    # the browser's own chrome:// pages aside, every request over a network goes to the server
    network = [url for url in requested if url.split(":", 1)[0] in ("http", "https", "ws", "wss")]
    outside = [url for url in network if not url.startswith(live_server + "/")]
    assert network and not outside, outside


def test_the_docs_pages_name_no_other_host(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert re.findall(r"https?://[^\s\"'<>]+", html) == [], page


def raw_request(url: str, method: str, path: str, headers: dict, body: bytes = b"") -> int:
    """The status of one request with exactly these headers (Host included), by http.client."""
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_a_foreign_host_gets_400_and_a_cross_site_page_403_but_scripts_and_the_page_are_served(live_server, photos):
    port = live_server.rsplit(":", 1)[1]
    body, kind = multipart_body(photos[:1])
    same = {"Host": f"127.0.0.1:{port}", "Content-Type": kind}
    assert raw_request(live_server, "POST", "/predict", same, body) == 200  # curl, a script: no Origin
    assert raw_request(live_server, "POST", "/predict", {**same, "Origin": f"http://127.0.0.1:{port}"}, body) == 200
    assert raw_request(live_server, "POST", "/predict", {**same, "Host": f"localhost:{port}"}, body) == 200
    # DNS rebinding: another site's name pointed at 127.0.0.1 arrives with that name as Host
    assert raw_request(live_server, "GET", "/classes", {"Host": f"evil.example:{port}"}) == 400
    assert raw_request(live_server, "POST", "/predict", {**same, "Host": "evil.example"}, body) == 400
    for origin in ("http://evil.example", f"http://127.0.0.1:{int(port) + 1}", "https://127.0.0.1", "null"):
        assert raw_request(live_server, "POST", "/predict", {**same, "Origin": origin}, body) == 403, origin
        assert raw_request(live_server, "POST", "/explain", {**same, "Origin": origin}, body) == 403, origin


def test_a_wildcard_bind_accepts_this_machines_names_any_address_and_the_names_given(served):
    from pipeline.server.guard import allowed_hosts

    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "[::1]", "localhost"]
    assert "[::1]" in allowed_hosts("::1")
    wide = allowed_hosts("0.0.0.0", ("photos.lan",))
    assert {socket.gethostname().lower(), "photos.lan", "localhost"} <= set(wide) and "evil.example" not in wide
    app = create_app(served, ServeSettings(host="0.0.0.0", workers=1, allowed_host=("photos.lan",)))
    for host, status in [
        ("10.1.2.3:8000", 200),  # the machine's address on the network, in digits: nothing to re-point
        ("[fe80::1]:8000", 200),
        ("photos.lan:8000", 200),
        (f"{socket.gethostname()}:8000", 200),
        ("evil.example:8000", 400),
        ("10.1.2.3.evil.example", 400),
    ]:
        answer = TestClient(app, base_url=f"http://{host}").get("/classes")
        assert answer.status_code == status, (host, answer.text)
    assert TestClient(create_app(served, LIMITS), base_url="http://10.1.2.3").get("/classes").status_code == 400
