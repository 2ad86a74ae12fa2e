"""The app of `pipeline review`: the audit's findings on a page, one decision each, kept on disk.

Reads the audit folder (audit.json, audit.csv's rows as audit makes them, reviewed.csv
when there is one: `review_findings`) and the data folder (manifest.csv and the arrays,
for the pictures as the model saw them; report.json names the images folder, read only
for the pictures themselves, larger). Writes only reviewed.csv, through `Decisions`.
Answers:

    GET  /                 the page (server/review.html), self-contained
    GET  /api/suspects     the findings, each: path, kind, issues, label, split, suggestion (a
                           class), probability, suggested_action, score, copies, decision
    POST /api/decisions    {"path": ..., "action": "keep" | "relabel:CLASS" | "exclude" | null}
    GET  /api/review       classes, training examples per class, counts, the commands to run next
    GET  /api/image?path=P&view=model|file   one picture (PNG); only the files the review lists
    GET  /docs             the API's documentation, served offline

Every refusal is {"error": reason} with its status; no path a request names is joined to a
folder: it is looked up among the files the manifest and the findings list.
"""

from __future__ import annotations

import io
import json
import shlex
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pipeline import __version__
from pipeline.core import paths
from pipeline.data.data_folder import load_split, read_manifest
from pipeline.data.images import UnreadableImage, decode_image
from pipeline.server.guard import guard
from pipeline.server.review_findings import Decisions, ReviewError

EXAMPLES_PER_CLASS = 4  # training pictures shown beside a finding, of its class and of the suggested one
FILE_VIEW_SIDE = 320  # the picture from the images folder, at most this many pixels a side


class Pictures:
    """The pictures the review shows (`allowed`: the findings, their copies and the training
    examples), from the source rows of the data folder's arrays (what the model saw) or the
    files themselves, looked up by their path as the manifest names them."""

    def __init__(self, data_dir: Path, images_dir: Path | None, classes: list[str], allowed: set[str] = frozenset()):
        self.data_dir, self.classes, self.allowed = Path(data_dir), classes, set(allowed)
        self.row_of = {r["path"]: (r["split"], r["index"]) for r in read_manifest(data_dir) if not r["augmented"]}
        self.images_dir = Path(images_dir).resolve() if images_dir and Path(images_dir).is_dir() else None
        self._arrays: dict[str, np.ndarray] = {}

    def png(self, path: str, view: str) -> bytes | None:
        """The picture at `path` as PNG: from the images folder ("file") or the arrays ("model"),
        each falling back to the other; None when the review does not list it or neither reads."""
        if path not in self.allowed:
            return None
        order = (self._from_file, self._from_arrays) if view == "file" else (self._from_arrays, self._from_file)
        for source in order:
            pixels = source(path)
            if pixels is not None:
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                return buffer.getvalue()
        return None

    def _from_arrays(self, path: str) -> np.ndarray | None:
        if path not in self.row_of:
            return None
        split, index = self.row_of[path]
        if split not in self._arrays:
            self._arrays[split] = load_split(self.data_dir, split, len(self.classes))[0]
        X = self._arrays[split]
        if index >= len(X):
            return None
        row = np.asarray(X[index])
        return row[..., 0] if row.shape[-1] == 1 else row

    def _from_file(self, path: str) -> np.ndarray | None:
        if self.images_dir is None or Path(path).is_absolute() or ".." in Path(path).parts:
            return None
        file = (self.images_dir / path).resolve()
        if self.images_dir not in file.parents:  # a link that leaves the images folder: not shown
            return None
        try:
            picture = decode_image(file, "rgb", draft_size=FILE_VIEW_SIDE)
        except UnreadableImage:
            return None
        picture.thumbnail((FILE_VIEW_SIDE, FILE_VIEW_SIDE))  # the aspect kept; never enlarged
        return np.asarray(picture)


def training_examples(findings: dict, classes: list[str], finding_paths: set[str], pictures: Pictures) -> dict:
    """Per class, a few training pictures the fold models were surest of (the class's typical
    look) and that the audit does not doubt; in the manifest's order where audit.json has no verdicts."""
    chosen: dict[str, list[str]] = {c: [] for c in classes}
    verdicts = [
        v
        for v in findings.get("images", [])
        if v.get("split") == "train" and v.get("predicted") == v.get("given") and v["path"] not in finding_paths
    ]
    verdicts.sort(key=lambda v: (-v.get("given_probability", 0.0), v["path"]))
    candidates = [(v["given"], v["path"]) for v in verdicts]
    if not candidates:
        manifest = read_manifest(pictures.data_dir)
        candidates = [(r["label"], r["path"]) for r in manifest if r["split"] == "train" and not r["augmented"]]
    for cls, path in candidates:
        if cls in chosen and len(chosen[cls]) < EXAMPLES_PER_CLASS and path in pictures.row_of:
            chosen[cls].append(path)
    return chosen


def next_commands(audit_dir: Path, data_dir: Path, images_dir: str | None, reviewed: Path) -> list[str]:
    """What to run once the review is done: prepare with the decisions, then train."""
    prepare = ["pipeline", "prepare", images_dir or "IMAGES", "--fixes", str(reviewed)]
    train = ["pipeline", "train"]
    if Path(data_dir).resolve() != paths.DATA_DIR.resolve():
        prepare += ["--out", str(data_dir)]
        train += ["--data", str(data_dir)]
    return [" ".join(shlex.quote(part) for part in prepare), " ".join(shlex.quote(part) for part in train)]


def create_review_app(
    audit_dir: Path,
    data_dir: Path,
    findings: dict,
    items: list[dict],
    decisions: Decisions,
    images_dir: str | None,
    host: str = "127.0.0.1",
) -> FastAPI:
    """The app over one audit's findings (`items`) and the decisions kept in `decisions`,
    served on `host` (a foreign Host header gets 400, another site's page 403: server/guard.py)."""
    classes = findings["classes"]
    by_path = {found["path"]: found for found in items}
    finding_paths = set(by_path)
    pictures = Pictures(data_dir, Path(images_dir) if images_dir else None, classes)
    examples = training_examples(findings, classes, finding_paths, pictures)
    copies = {copy["path"] for found in items for copy in found["copies"]}
    pictures.allowed = finding_paths | copies | {path for shown in examples.values() for path in shown}
    commands = next_commands(audit_dir, data_dir, images_dir, decisions.path)
    kinds = list(dict.fromkeys(found["kind"] for found in items))
    page = resources.files("pipeline.server").joinpath("review.html").read_text(encoding="utf-8")
    app = FastAPIOffline(
        title="pipeline review",
        version=__version__,
        description=f"The findings of the audit in `{audit_dir}`, and the decisions taken on them.",
    )
    _answer_errors_in_json(app)

    def with_decision(found: dict) -> dict:
        return {**found, "decision": decisions.taken.get(found["path"])}

    def counts() -> dict:
        return {"total": len(items), "left": decisions.left(), "kept_aside": len(decisions.kept_aside)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def the_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/api/review")
    def get_review() -> JSONResponse:
        """The classes, a few training pictures of each, the counts and the commands to run next."""
        return _no_store(
            {
                "audit_dir": str(audit_dir),
                "data_dir": str(data_dir),
                "images_dir": images_dir,
                "reviewed_csv": str(decisions.path),
                "classes": classes,
                "kinds": kinds,
                "examples": examples,
                "next_commands": commands,
                **counts(),
            }
        )

    @app.get("/api/suspects")
    def get_suspects() -> JSONResponse:
        """Every finding in the page's order, with the decision taken on it (null: none yet)."""
        return _no_store([with_decision(found) for found in items])

    @app.post("/api/decisions", openapi_extra=_DECISION_BODY)
    async def post_decision(request: Request) -> JSONResponse:
        """Decide one finding: keep, relabel:CLASS or exclude (null: undecided again). It is in
        reviewed.csv when the answer comes."""
        body = await _json_body(request)
        await run_in_threadpool(decisions.decide, body["path"], body["action"])  # the loop serves pictures meanwhile
        return _no_store({**with_decision(by_path[body["path"]]), **counts()})

    @app.get("/api/image", response_class=Response)
    def get_image(
        path: str = Query(description="A file as the manifest names it (relative to the images folder)."),
        view: str = Query("model", pattern="^(model|file)$", description="model: as prepared; file: the file."),
    ) -> Response:
        """One listed picture as PNG: as the model saw it, or the file itself (at most 320 px a side)."""
        png = pictures.png(path, view)
        if png is None:
            raise ReviewError(404, f"no picture for {path!r}: the review shows only the files it lists")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    guard(app, host)  # as serve's: no other site's page may read the findings or post a decision
    return app


async def _json_body(request: Request) -> dict:
    # Read as JSON whatever its Content-Type says (curl -d sends a form's): what keeps other
    # sites' pages out is the guard's Origin check, which every browser's cross-site POST meets.
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReviewError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict) or "path" not in body or "action" not in body:
        raise ReviewError(422, 'send {"path": ..., "action": "keep" | "relabel:CLASS" | "exclude" | null}')
    return body


def _no_store(content) -> JSONResponse:
    return JSONResponse(content, headers={"Cache-Control": "no-store"})


def _answer_errors_in_json(app: FastAPI) -> None:
    @app.exception_handler(ReviewError)
    async def review_error(request: Request, e: ReviewError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return JSONResponse({"error": problems}, status_code=422)


_DECISION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["path", "action"],
                    "properties": {
                        "path": {"type": "string", "description": "as GET /api/suspects lists it"},
                        "action": {
                            "type": "string",
                            "nullable": True,
                            "description": "keep, exclude or relabel:CLASS; null: undecided again",
                        },
                    },
                }
            }
        },
    }
}
