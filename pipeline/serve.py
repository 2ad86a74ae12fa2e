"""serve: a model folder behind an HTTP API, and a page where a person drops photos.

Reads the model folder once, through `inference.classifier.load_classifier` (LiteRT when present, as
predict does), and the reports folder's metrics.json when it belongs to that model (the
page shows its test accuracy). Writes nothing: uploads are read into memory as they
arrive, the size and file-count limits are enforced while reading, and every image goes
through `Classifier.preprocess` (images.preprocess), so serve, predict and evaluate agree
on the same file. Answers:

    POST /predict   multipart files, or one raw image body -> the JSON list of predict --json
    GET  /health    model loaded, classes, engine, version     GET /classes
    GET  /          the page (server/page.html)                  GET /docs  (FastAPI's)

`server.app.create_app` builds the FastAPI app (the tests drive it through TestClient);
`serve_model`
binds the socket and runs the app under uvicorn until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.settings import ServeSettings
from pipeline.server.app import create_app
from pipeline.server.limits import uvicorn_options


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
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
            **uvicorn_options(),
        )
    )
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    health = app.state.health
    say(
        f"serving {model_dir} ({len(health['classes'])} classes, {health['engine']}, {health['workers']} worker(s)) "
        f"on {url}  (page: {url}/  API: {url}/docs  Ctrl-C stops)"
    )
    if not health["novelty"] and settings.novelty_threshold is None:
        say(f"note: {health['novelty_note']}")
    if reports_dir is not None and health["test_accuracy"] is None:
        say(f"note: {reports_dir} holds no metrics.json for this model: the page shows no test accuracy")
    if host not in ("127.0.0.1", "::1", "localhost"):
        say(
            f"note: listening on {host}: anyone who can reach this machine can use the model (no authentication); "
            "requests must name this machine (its name, or an address in digits) or an --allowed-host"
        )
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down cleanly and passed the signal on: stopping is what was asked
    finally:
        sock.close()
    say("server stopped")
