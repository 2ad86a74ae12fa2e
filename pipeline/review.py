"""review: the audit's findings on a page, one click or key each, every decision kept on disk.

Reads the audit folder audit wrote (audit.json; its reviewed.csv when an earlier review left
one) and the data folder prepare wrote (the manifest and arrays show the pictures as the
model saw them; report.json names the images folder, whose files the page shows larger and
which is never written). Writes one file, the audit folder's reviewed.csv: audit.csv's
columns, one row per decided finding, rewritten atomically after each decision, so that
`pipeline prepare IMAGES --fixes artifacts/audit/reviewed.csv` applies what was decided and
nothing else. `server.review_app` is the app (the tests drive it through TestClient);
`review_audit` binds the socket and serves it under uvicorn until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

from pipeline.core import paths
from pipeline.core.artifacts import csv_read_row, read_json, read_json_optional
from pipeline.core.errors import PipelineError
from pipeline.core.settings import ReviewSettings
from pipeline.data.data_folder import load_classes


def review_app(audit_dir: Path, data_dir: Path | None = None, host: str = ReviewSettings.host):
    """The review's FastAPI app over `audit_dir`'s findings, to be served on `host`; `data_dir`:
    the one audited (audit.json names it) unless given."""
    from pipeline.audit import audit_csv
    from pipeline.server.review_app import create_review_app
    from pipeline.server.review_findings import Decisions, review_items

    audit_dir = Path(audit_dir)
    findings = read_json(audit_dir / paths.AUDIT_JSON, "run `pipeline audit` first")
    if not isinstance(findings, dict) or not isinstance(findings.get("classes"), list):
        raise PipelineError(f"{audit_dir / paths.AUDIT_JSON} is not an audit's findings: run `pipeline audit` again")
    data_dir = Path(data_dir) if data_dir is not None else _audited_data(findings)
    classes = load_classes(data_dir)
    if classes != findings["classes"]:
        named = lambda names: ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")  # noqa: E731
        raise PipelineError(
            f"{data_dir} holds other classes ({named(classes)}) than the audit in {audit_dir} "
            f"({named(findings['classes'])}): give --data the folder that was audited"
        )
    rows = [csv_read_row(row) for row in csv.DictReader(io.StringIO(audit_csv(findings), newline=""))]
    items = review_items(findings, rows)
    decisions = Decisions(audit_dir / paths.AUDIT_REVIEWED, items, rows, classes)
    images_dir = (read_json_optional(data_dir / paths.PREPARE_REPORT_FILE) or {}).get("images_dir")
    app = create_review_app(audit_dir, data_dir, findings, items, decisions, images_dir, host)
    app.state.summary = {"findings": len(items), "decided": len(decisions.taken), "kept_aside": decisions.kept_aside}
    return app


def _audited_data(findings: dict) -> Path:
    recorded = findings.get("data_dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return paths.DATA_DIR


def review_audit(
    audit_dir: Path, data_dir: Path | None, settings: ReviewSettings, say: Callable[[str], None] = print
) -> None:
    """Serve the review until Ctrl-C or SIGTERM; every decision answered is already on disk."""
    settings.check()
    from pipeline.serve import listening_socket

    app = review_app(audit_dir, data_dir, settings.host)  # a missing audit fails before the port is taken
    sock = listening_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    summary = app.state.summary
    say(
        f"reviewing {summary['findings']} findings of {audit_dir} ({summary['decided']} decided already) "
        f"on {url}/  (decisions: {Path(audit_dir) / paths.AUDIT_REVIEWED}  Ctrl-C stops)"
    )
    if summary["kept_aside"]:
        say(
            f"note: reviewed.csv holds {len(summary['kept_aside'])} decision(s) on files this audit does not "
            "list (or with a class it does not know): kept as they are"
        )
    if host not in ("127.0.0.1", "::1", "localhost"):
        say(f"note: listening on {host}: anyone who can reach this machine can change the decisions")
    _run(app, sock)
    say("review stopped: every decision is in reviewed.csv")


def _run(app, sock) -> None:
    """uvicorn on the bound socket, with serve's bounds on connections and slow clients."""
    import uvicorn

    from pipeline.server.limits import uvicorn_options

    server = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5, **uvicorn_options()
        )
    )
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down cleanly: stopping is what was asked
    finally:
        sock.close()
