"""The FastAPI app of `pipeline serve`: its routes, its model workers and its error replies.

`create_app` loads the model folder (`settings.workers` single-threaded copies, each
owned by one thread) and answers POST /predict, POST /explain (one image's Grad-CAM overlay
as a PNG; model.keras is read with the rest at the start and built on the first such
request, so a retrain meanwhile changes nothing), GET /health, /classes, the page
at / and the API's documentation at /docs (and /redoc), whose scripts and styles the app
serves itself from the fastapi-offline package, so the pages work without internet. The
tests drive it through TestClient.
"""

from __future__ import annotations

import asyncio
import os
import queue
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from pipeline import __version__
from pipeline.core import paths
from pipeline.core.artifacts import read_json_optional
from pipeline.core.errors import PipelineError
from pipeline.core.settings import ServeSettings
from pipeline.data.images import PREPROCESS_VERSION, UnreadableImage, decoded_pixels
from pipeline.inference.classifier import Classifier, load_classifier
from pipeline.server.guard import guard
from pipeline.server.limits import RETRY_AFTER, Admission, inflight_limits, return_freed_memory
from pipeline.server.uploads import RequestError, read_uploads


class ModelWorkers:
    """`size` threads, each with its own single-threaded copy of the model, and the queue before them.

    A LiteRT interpreter keeps its tensors between calls, so two threads must never run the
    same one: each worker thread adopts one copy for good. A request waits for the next
    free worker at most `queue_timeout` seconds (then 503); only the workers decode, so at
    most `size` pictures are decoded at once, each within the request's pixel budget.
    /explain's Keras model is the one of the folder as it was at the start: model.keras is
    read into memory with the rest, and built from those bytes on the first /explain."""

    def __init__(self, model_dir: Path, engine: str, size: int, queue_timeout: float = 30.0):
        from threadpoolctl import threadpool_limits

        # numpy's BLAS on one thread too (the novelty's product with the training features): its
        # own threads, woken for one picture beside busy workers, cost more than the product
        # (median 37 ms against 0.5 ms for the letters' 3,084 features, measured on 2 busy cores)
        self._blas = threadpool_limits(1, user_api="blas")
        self.copies = [load_classifier(model_dir, engine, threads=1) for _ in range(size)]
        self.model = self.copies[0]  # for what the copies share: classes, size, colour, engine
        self.queue_timeout = queue_timeout
        unclaimed: queue.SimpleQueue[Classifier] = queue.SimpleQueue()
        for classifier in self.copies:
            unclaimed.put(classifier)
        self._mine = threading.local()
        self._free = asyncio.Semaphore(size)  # a worker is taken here, in the event loop, before its thread
        keras_file = Path(model_dir) / paths.MODEL_FILE
        self._keras_bytes = keras_file.read_bytes() if keras_file.is_file() else None  # 2-3 MB for the CNN
        self._keras, self._keras_lock = None, threading.Lock()

        def adopt() -> None:  # runs once in each worker thread, as it starts
            self._mine.classifier = unclaimed.get_nowait()

        self._threads = ThreadPoolExecutor(size, thread_name_prefix="model", initializer=adopt)

    async def predict(
        self,
        uploads: list[tuple[str, bytes]],
        top_k: int,
        threshold: float,
        tta: bool = False,
        novelty_threshold: float = 0.0,
    ) -> list[dict]:
        """predict --json's list for in-memory uploads, computed by the next free worker."""
        return await self._run(self._predict, uploads, top_k, threshold, tta, novelty_threshold)

    async def explain(self, upload: tuple[str, bytes]) -> bytes:
        """The Grad-CAM overlay (PNG) of one upload's predicted class, by the next free worker."""
        if self._keras is None and self._keras_bytes is None:
            raise RequestError(404, f"the model folder has no {paths.MODEL_FILE}: /explain needs the Keras model")
        return await self._run(self._explain, upload)

    async def _run(self, work, *args):
        """`work(*args)` in the next free worker thread, after waiting at most queue_timeout for one."""
        try:
            await asyncio.wait_for(self._free.acquire(), self.queue_timeout)
        except TimeoutError:
            raise RequestError(
                503,
                f"the server is busy: no model worker was free within {self.queue_timeout:g} s (--queue-timeout); "
                f"retry after {RETRY_AFTER} s",
                headers={"retry-after": str(RETRY_AFTER)},
            ) from None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, work, *args)
        finally:
            self._free.release()

    def _explain(self, upload: tuple[str, bytes]) -> bytes:
        from pipeline.inference.gradcam import heatmaps, overlay_png

        pixels = self._read(self._mine.classifier, [upload])[0][None]
        with self._keras_lock:  # one Keras model, built on the first request, for every worker
            if self._keras is None:
                self._keras = _keras_from(self._keras_bytes)
                self._keras_bytes = None
            predicted = self._mine.classifier.probabilities(pixels).argmax(axis=1)
            return overlay_png(pixels[0], heatmaps(self._keras, pixels, predicted)[0])

    @staticmethod
    def _read(classifier: Classifier, uploads: list[tuple[str, bytes]]) -> list:
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
        return pixels

    def _predict(
        self, uploads: list[tuple[str, bytes]], top_k: int, threshold: float, tta: bool, novelty_threshold: float
    ) -> list[dict]:
        classifier: Classifier = self._mine.classifier
        found = classifier.infer(self._read(classifier, uploads), tta=tta)
        novelty = found.novelty if found.novelty is not None else [None] * len(uploads)
        return [
            classifier.label(name, p, top_k, threshold, n, novelty_threshold).as_dict()
            for (name, _), p, n in zip(uploads, found.probabilities, novelty)
        ]


def _keras_from(data: bytes):
    """The Keras model from model.keras' bytes as read at the start (safe mode, as always)."""
    from pipeline.inference.model_folder import load_keras_model

    with tempfile.TemporaryDirectory(prefix="pipeline-serve-") as folder:
        (Path(folder) / paths.MODEL_FILE).write_bytes(data)
        return load_keras_model(Path(folder))


def find_metrics(model_dir: Path, reports_dir: Path | None, classes: list[str]) -> dict | None:
    """evaluate's metrics.json for this model: `reports_dir`, or the reports folder beside the
    model folder (artifacts/reports for artifacts/model). None when absent, or when it lists
    other classes or is older than the model (it measured an earlier one)."""
    folder = Path(reports_dir) if reports_dir is not None else Path(model_dir).parent / paths.REPORTS_DIR.name
    path = folder / paths.METRICS_FILE
    metrics = read_json_optional(path)
    if metrics is None:
        return None
    model_files = [Path(model_dir) / name for name in (paths.TFLITE_FILE, paths.MODEL_FILE)]
    newest_model = max((f.stat().st_mtime for f in model_files if f.is_file()), default=0)
    if metrics.get("classes") != classes or path.stat().st_mtime < newest_model:
        return None
    return {"accuracy": metrics.get("accuracy"), "n_test": metrics.get("n_test"), "path": str(path)}


def create_app(model_dir: Path, settings: ServeSettings | None = None, reports_dir: Path | None = None) -> FastAPI:
    """Load the model (`settings.workers` copies) and build the app that serves it."""
    settings = settings or ServeSettings()
    settings.check()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    model_workers = ModelWorkers(Path(model_dir), settings.engine, settings.workers or cores, settings.queue_timeout)
    model = model_workers.model
    # /docs and /redoc with Swagger UI's and ReDoc's files from an installed package, served by
    # the app itself: FastAPI's own pages load them from a CDN, blank on a machine offline.
    app = FastAPIOffline(
        title="pipeline serve",
        version=__version__,
        description=f"The image classifier in `{model_dir}`: {len(model.classes)} classes, {model.engine}.",
    )
    app.state.health = _health(model_dir, model_workers, settings, find_metrics(model_dir, reports_dir, model.classes))
    app.state.health["threshold"] = model.threshold(settings.threshold, settings.target_accuracy)
    app.state.health["temperature"] = model.temperature
    app.state.health["novelty_threshold"] = model.novelty_threshold(settings.novelty_threshold)
    app.state.health["novelty"] = model.novelty is not None  # False: a folder trained before novelty scores
    app.state.health["novelty_note"] = model.novelty_note  # why not, when not
    _answer_errors_in_json(app)
    _add_routes(app, model_workers, settings)
    _add_explain_route(app, model_workers, settings)
    _bound_what_requests_hold(app, settings, len(model_workers.copies))
    guard(
        app, settings.host, settings.allowed_host
    )  # outermost: a foreign Host or a cross-site page is refused before anything is held
    return app


def _bound_what_requests_hold(app: FastAPI, settings: ServeSettings, workers: int) -> None:
    """Requests in flight and the upload bytes they hold, bounded (503 beyond); slow bodies, 408."""
    max_requests, max_bytes = inflight_limits(
        settings.max_inflight, settings.max_inflight_mb, workers, settings.max_upload_mb
    )
    app.add_middleware(
        Admission,
        max_requests=max_requests,
        max_bytes=max_bytes,
        max_upload_bytes=int(settings.max_upload_mb * 2**20),
        read_timeout=settings.read_timeout,
    )
    app.state.health.update(
        max_inflight=max_requests,
        max_inflight_mb=max_bytes / 2**20,
        read_timeout=settings.read_timeout,
        queue_timeout=settings.queue_timeout,
        max_megapixels=settings.max_megapixels,
    )
    return_freed_memory()


def _health(model_dir: Path, model_workers: ModelWorkers, settings: ServeSettings, metrics: dict | None) -> dict:
    """GET /health's answer: the model, its input, the limits and the test accuracy."""
    model = model_workers.model
    return {
        "status": "ok",
        "model_loaded": True,
        "model": str(model_dir),
        "engine": model.engine,
        "classes": model.classes,
        "size": model.size,
        "color": model.color,
        "version": __version__,
        "preprocess_version": PREPROCESS_VERSION,
        "workers": len(model_workers.copies),
        "max_upload_mb": settings.max_upload_mb,
        "max_files": settings.max_files,
        "test_accuracy": metrics["accuracy"] if metrics else None,
        "n_test": metrics["n_test"] if metrics else None,
    }


def _answer_errors_in_json(app: FastAPI) -> None:
    """Every refusal is {"error": "..."} with its status, as the page and clients read it."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(e), **e.extra}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return JSONResponse({"error": problems}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)


def _add_routes(app: FastAPI, model_workers: ModelWorkers, settings: ServeSettings) -> None:
    model, health = model_workers.model, app.state.health
    max_bytes = int(settings.max_upload_mb * 2**20)
    page = resources.files("pipeline.server").joinpath("page.html").read_text(encoding="utf-8")

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
        threshold: float | None = Query(
            None, ge=0, le=1, description="Below this calibrated confidence the label is 'unsure' (default: serve's)."
        ),
        target_accuracy: float | None = Query(
            None, gt=0, lt=1, description="'unsure' below the lowest confidence reaching this accuracy on validation."
        ),
        tta: bool = Query(False, description="Average over the image and its mirror image (where prepare flipped)."),
        novelty_threshold: float | None = Query(
            None, ge=0, description="Above this novelty the label is 'unknown' (default: serve's; 0: off)."
        ),
    ) -> list[dict]:
        """Label, calibrated confidence, novelty and top k for each image, exactly as `pipeline predict --json`
        gives them."""
        cut = _threshold(model, health, threshold, target_accuracy)
        unknown_above = health["novelty_threshold"] if novelty_threshold is None else novelty_threshold
        if unknown_above > 0 and model.novelty is None:
            raise RequestError(422, f"novelty_threshold needs a novelty score: {model.novelty_note}")
        uploads = await read_uploads(request, max_bytes, settings.max_files)
        check_pixels(uploads, settings.max_megapixels, model.size)
        return await model_workers.predict(uploads, top_k, cut, tta, unknown_above)


def check_pixels(uploads: list[tuple[str, bytes]], max_megapixels: float, size: int) -> None:
    """413 before any decoding when the request's pictures add up to more than its pixel
    budget (--max-megapixels): a 30 KB PNG can hold 16 million 16-bit pixels."""
    pixels = sum(decoded_pixels(data, size) for _, data in uploads)
    if pixels > max_megapixels * 1e6:
        raise RequestError(
            413,
            f"too many pixels: the pictures hold {pixels / 1e6:.3g} megapixels, "
            f"at most {max_megapixels:g} in one request (--max-megapixels)",
        )


def _threshold(model: Classifier, health: dict, threshold: float | None, target_accuracy: float | None) -> float:
    """A request's threshold: its own, its target accuracy's, or serve's (--threshold, --target-accuracy)."""
    if threshold is not None and target_accuracy is not None:
        raise RequestError(422, "give threshold or target_accuracy, not both")
    if target_accuracy is None:
        return health["threshold"] if threshold is None else threshold
    try:
        return model.threshold(0.0, target_accuracy)
    except PipelineError as e:
        raise RequestError(422, str(e).replace("--", "")) from None


def _add_explain_route(app: FastAPI, model_workers: ModelWorkers, settings: ServeSettings) -> None:
    max_bytes = int(settings.max_upload_mb * 2**20)

    @app.post("/explain", openapi_extra=_PREDICT_BODY, response_class=Response)
    async def post_explain(request: Request) -> Response:
        """One image's Grad-CAM heatmap over it (PNG): where the model found the class it gave."""
        uploads = await read_uploads(request, max_bytes, 1)
        check_pixels(uploads, settings.max_megapixels, model_workers.model.size)
        return Response(await model_workers.explain(uploads[0]), media_type="image/png")


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
