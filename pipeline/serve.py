"""serve: a model folder behind an HTTP API, and a page where a person drops photos.

Reads the model folder once, through predict's `load_classifier` (LiteRT when present, as
predict does), and the reports folder's metrics.json when it belongs to that model (the
page shows its test accuracy). Writes nothing: uploads are read into memory as they
arrive, the size and file-count limits are enforced while reading, and every image goes
through `Classifier.preprocess` (images.preprocess), so serve, predict and evaluate agree
on the same file. Answers:

    POST /predict   multipart files, or one raw image body -> the JSON list of predict --json
    GET  /health    model loaded, classes, engine, version     GET /classes
    GET  /          the page (serve_page.html)                  GET /docs  (FastAPI's)

`create_app` builds the FastAPI app (the tests drive it through TestClient); `serve_model`
binds the socket and runs the app under uvicorn until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from pipeline import __version__, paths
from pipeline.artifacts import read_json
from pipeline.errors import PipelineError
from pipeline.images import PREPROCESS_VERSION, UnreadableImage
from pipeline.predict import Classifier, load_classifier
from pipeline.settings import ServeSettings

RAW_NAME = "upload"  # the "file" of an image sent as the whole body
HOW_TO_SEND = "send image files as multipart/form-data, or one image as the body (image/* or application/octet-stream)"


class RequestError(Exception):
    """A request the server will not answer with predictions: `status` and a message naming why."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.extra = status, extra


class ModelWorkers:
    """`size` threads, each with its own single-threaded copy of the model.

    A LiteRT interpreter keeps its tensors between calls, so two threads must never run the
    same one: each worker thread adopts one copy for good. Requests wait for the next free
    worker, which also bounds how many uploads are decoded at once (a photo just under
    Pillow's bomb limit decodes to 270 MB) and how many threads the server has."""

    def __init__(self, model_dir: Path, engine: str, size: int):
        self.copies = [load_classifier(model_dir, engine, threads=1) for _ in range(size)]
        self.model = self.copies[0]  # for what the copies share: classes, size, colour, engine
        unclaimed: queue.SimpleQueue[Classifier] = queue.SimpleQueue()
        for classifier in self.copies:
            unclaimed.put(classifier)
        self._mine = threading.local()

        def adopt() -> None:  # runs once in each worker thread, as it starts
            self._mine.classifier = unclaimed.get_nowait()

        self._threads = ThreadPoolExecutor(size, thread_name_prefix="model", initializer=adopt)

    async def predict(self, uploads: list[tuple[str, bytes]], top_k: int, threshold: float) -> list[dict]:
        """predict --json's list for in-memory uploads, computed by the next free worker."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._predict, uploads, top_k, threshold)

    def _predict(self, uploads: list[tuple[str, bytes]], top_k: int, threshold: float) -> list[dict]:
        classifier: Classifier = self._mine.classifier
        pixels, unreadable = [], []
        for name, data in uploads:
            try:
                pixels.append(classifier.preprocess(data))
            except UnreadableImage as e:
                unreadable.append({"file": name, "error": str(e)})
        if unreadable:  # any unreadable file fails the request, naming each
            reasons = "; ".join(f"{u['file']}: {u['error']}" for u in unreadable)
            raise RequestError(
                422, f"{len(unreadable)} of {len(uploads)} file(s) unreadable: {reasons}", files=unreadable
            )
        probabilities = classifier.probabilities(pixels)
        return [classifier.label(name, p, top_k, threshold).as_dict() for (name, _), p in zip(uploads, probabilities)]


class _FileParts:
    """python-multipart's streaming parser, keeping each file part's bytes in memory.

    Parts without a filename (plain form fields) are read past; the file count is checked
    as each part's headers end, so the 65th file is refused before its bytes arrive."""

    def __init__(self, boundary: bytes, max_files: int):
        self.max_files = max_files
        self.files: list[tuple[str, bytearray]] = []
        self.ended = False
        self._field, self._value, self._headers = bytearray(), bytearray(), {}
        self._current: bytearray | None = None
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_end": self._end,
            },
        )

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def uploads(self) -> list[tuple[str, bytes]]:
        if not self.ended:
            raise RequestError(400, "the multipart body ended before its closing boundary")
        return [(name, bytes(data)) for name, data in self.files]

    def _part_begin(self) -> None:
        self._headers, self._current = {}, None

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"filename" not in options:
            return  # a form field, not a file
        if len(self.files) == self.max_files:
            raise RequestError(413, f"too many files: at most {self.max_files} in one request")
        self._current = bytearray()
        self.files.append((options[b"filename"].decode("utf-8", "replace") or RAW_NAME, self._current))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.extend(data[start:end])

    def _end(self) -> None:
        self.ended = True


class _RawBody:
    """One image sent as the whole body."""

    def __init__(self):
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data.extend(chunk)

    def uploads(self) -> list[tuple[str, bytes]]:
        return [(RAW_NAME, bytes(self.data))]


async def read_uploads(request: Request, max_bytes: int, max_files: int) -> list[tuple[str, bytes]]:
    """The request's images as (name, bytes), read into memory, never more than `max_bytes`."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind == b"multipart/form-data":
        if not options.get(b"boundary"):
            raise RequestError(400, "multipart/form-data without a boundary")
        body = _FileParts(options[b"boundary"], max_files)
    elif kind in (b"", b"application/octet-stream") or kind.startswith(b"image/"):
        body = _RawBody()
    else:
        hint = " (curl: -F file=@photo.jpg, or -H 'Content-Type: image/jpeg' --data-binary @photo.jpg)"
        raise RequestError(415, f"unsupported content type {kind.decode('latin-1')!r}: {HOW_TO_SEND}{hint}")
    too_large = RequestError(
        413, f"upload too large: at most {max_bytes / 2**20:.3g} MB in one request (--max-upload-mb)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large  # said before a byte of it is read
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise too_large  # a chunked body that never said its length: stopped as it crosses
            body.write(chunk)
    except MultipartParseError as e:
        raise RequestError(400, f"malformed multipart body ({e})") from None
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected before its upload ended") from None
    if received == 0:
        raise RequestError(400, f"empty body: {HOW_TO_SEND}")
    uploads = body.uploads()
    if not uploads:
        raise RequestError(400, f"no files in the multipart body: {HOW_TO_SEND}")
    return uploads


def find_metrics(model_dir: Path, reports_dir: Path | None, classes: list[str]) -> dict | None:
    """evaluate's metrics.json for this model: `reports_dir`, or the reports folder beside the
    model folder (artifacts/reports for artifacts/model). None when absent, or when it lists
    other classes or is older than the model (it measured an earlier one)."""
    folder = Path(reports_dir) if reports_dir is not None else Path(model_dir).parent / paths.REPORTS_DIR.name
    path = folder / paths.METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = read_json(path, "")
    except PipelineError:
        return None
    model_files = [Path(model_dir) / name for name in (paths.TFLITE_FILE, paths.MODEL_FILE)]
    newest_model = max((f.stat().st_mtime for f in model_files if f.is_file()), default=0)
    if not isinstance(metrics, dict) or metrics.get("classes") != classes or path.stat().st_mtime < newest_model:
        return None
    return {"accuracy": metrics.get("accuracy"), "n_test": metrics.get("n_test"), "path": str(path)}


def create_app(model_dir: Path, settings: ServeSettings | None = None, reports_dir: Path | None = None) -> FastAPI:
    """Load the model (`settings.workers` copies) and build the app that serves it."""
    settings = settings or ServeSettings()
    settings.check()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = settings.workers or cores
    model_workers = ModelWorkers(Path(model_dir), settings.engine, workers)
    model = model_workers.model
    metrics = find_metrics(model_dir, reports_dir, model.classes)
    max_bytes = int(settings.max_upload_mb * 2**20)
    page = resources.files("pipeline").joinpath("serve_page.html").read_text(encoding="utf-8")
    health = {
        "status": "ok",
        "model_loaded": True,
        "model": str(model_dir),
        "engine": model.engine,
        "classes": model.classes,
        "size": model.size,
        "color": model.color,
        "version": __version__,
        "preprocess_version": PREPROCESS_VERSION,
        "workers": workers,
        "max_upload_mb": settings.max_upload_mb,
        "max_files": settings.max_files,
        "test_accuracy": metrics["accuracy"] if metrics else None,
        "n_test": metrics["n_test"] if metrics else None,
    }

    app = FastAPI(
        title="pipeline serve",
        version=__version__,
        description=f"The image classifier in `{model_dir}`: {len(model.classes)} classes, {model.engine}.",
    )
    app.state.health = health

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(e), **e.extra}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return JSONResponse({"error": problems}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def the_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    def get_health() -> dict:
        """The model is loaded: its classes, engine, input size, the limits and the test accuracy."""
        return health

    @app.get("/classes")
    def get_classes() -> dict:
        """The class names, index = the model's output."""
        return {"classes": model.classes}

    @app.post("/predict", openapi_extra=_PREDICT_BODY)
    async def post_predict(
        request: Request,
        top_k: int = Query(1, ge=1, description="How many of the most likely labels to list."),
        threshold: float = Query(0.0, ge=0, le=1, description="Below this confidence the label is 'unknown'."),
    ) -> list[dict]:
        """Label, confidence and top k for each image, exactly as `pipeline predict --json` gives them."""
        uploads = await read_uploads(request, max_bytes, settings.max_files)
        return await model_workers.predict(uploads, top_k, threshold)

    return app


# /docs offers a file picker for this body, which the endpoint reads itself (see read_uploads).
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind before serving, so an address in use is one line, not a uvicorn log."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise PipelineError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart binds through TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        reason = "the address is already in use (another server? pick --port)" if e.errno == 98 else e.strerror
        raise PipelineError(f"cannot listen on {host}:{port}: {reason or e}") from None
    return sock


def serve_model(
    model_dir: Path, settings: ServeSettings, reports_dir: Path | None = None, say: Callable[[str], None] = print
) -> None:
    """Serve until Ctrl-C or SIGTERM, then finish the requests in flight and return."""
    settings.check()
    app = create_app(model_dir, settings, reports_dir)  # a bad model folder fails before the port is taken
    sock = listening_socket(settings.host, settings.port)
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=10)
    )
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    health = app.state.health
    say(
        f"serving {model_dir} ({len(health['classes'])} classes, {health['engine']}, {health['workers']} worker(s)) "
        f"on {url}  (page: {url}/  API: {url}/docs  Ctrl-C stops)"
    )
    if reports_dir is not None and health["test_accuracy"] is None:
        say(f"note: {reports_dir} holds no metrics.json for this model: the page shows no test accuracy")
    if host not in ("127.0.0.1", "::1", "localhost"):
        say(f"note: listening on {host}: anyone who can reach this machine can use the model (no authentication)")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down cleanly and passed the signal on: stopping is what was asked
    finally:
        sock.close()
    say("server stopped")
