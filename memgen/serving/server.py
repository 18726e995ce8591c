"""Running the server: load the model, start the engine thread, serve with uvicorn, drain on SIGTERM.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the open ones to
finish; memgen also answers 503 to any new request on a connection that stays open, and stops
its engine only after every admitted request has finished. The process then exits 0.
"""

from __future__ import annotations

import hmac
import json
import signal
from pathlib import Path

from ..continuous import ContinuousConfig, ContinuousEngine
from .config import ServeConfig
from .schema import error_body


class GuardMiddleware:
    """Pure ASGI (streaming and disconnects pass untouched): body size, API key and draining checks."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        config = self.state.config
        refusal = None
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > config.max_body_bytes:
            refusal = (413, f"the request body has {length} bytes; this server accepts at most {config.max_body_bytes}")
        elif config.api_key and path.startswith("/v1"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                refusal = (401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        elif self.state.draining and scope.get("method") == "POST":
            refusal = (503, "the server is shutting down")
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message = refusal
        self.state.responses[status] += 1
        kind = {401: "authentication_error", 503: "service_unavailable"}.get(status, "invalid_request_error")
        payload = json.dumps(error_body(message, kind, None, status)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def build_server_app(model, config: ServeConfig, model_name: str, adapter: bool, experience=None):
    """(ASGI app, ServerState) for ``model``: the engine starts and drains with the app's lifespan."""
    from contextlib import asynccontextmanager

    from .app import ServerState, build_app

    engine = ContinuousEngine(
        model,
        ContinuousConfig(max_rows=config.max_rows, max_queue=config.max_queue, prefill_chunk=config.prefill_chunk),
        experience=experience,
    )
    state = ServerState(model, engine, config, model_name, adapter)
    app = build_app(state)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            state.draining = True
            engine.stop(drain=True)

    app.router.lifespan_context = lifespan
    return GuardMiddleware(app, state), state


def serve(model, config: ServeConfig, model_name: str, adapter: bool = False, experience=None) -> None:
    """Serve ``model`` until SIGTERM or Ctrl-C; returns once every admitted request has been answered."""
    import uvicorn

    app, state = build_server_app(model, config, model_name, adapter, experience)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True
            super().handle_exit(sig, frame)

    # uvicorn re-raises the signal it drained on once it has shut down; a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = DrainingServer(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level=config.log_level, timeout_graceful_shutdown=None
        )
    )
    server.run()


def default_model_name(model: str) -> str:
    """The name the API reports: the model path's last part without a .gguf suffix."""
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else (path.name or model)
