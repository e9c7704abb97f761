"""Loading a fused model and running the OpenAI-compatible app under uvicorn.

    serve("runs/model", host="127.0.0.1", port=8000)     # blocks until SIGTERM / Ctrl-C

The engine starts with the app (FastAPI lifespan) and closes after the requests in flight
have finished. SIGTERM (or Ctrl-C) drains: ``/ready`` turns 503 and new requests get 503
(so a load balancer sends them elsewhere) while the requests in flight finish, for up to
``graceful_timeout`` seconds; then uvicorn stops and the process exits 0. A second signal
stops at once.
"""

from __future__ import annotations

import contextlib
import threading
import time

from mtnlg.progress import get_logger
from mtnlg.serve.engine import Engine, EngineConfig

log = get_logger("mtnlg.serve")


def build_app(model_dir: str, model_name: str, device: str = "cpu", api_key: str | None = None,
              max_model_len: int | None = None, max_request_bytes: int = 1 << 20, **engine_config):
    """The FastAPI app serving ``model_dir``, its engine started and stopped with it."""
    from mtnlg.formats.fused import load_fused
    from mtnlg.serve.openai_api import create_app

    model, cfg, tok = load_fused(model_dir, device=device)
    engine = Engine(model, tok, EngineConfig(**engine_config))
    app = create_app(engine, model_name, api_key=api_key, max_model_len=max_model_len,
                     max_request_bytes=max_request_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        log.info("serving %s as %r (%d parameters, context %d tokens, continuous batching on %d slots%s)", model_dir,
                 model_name, sum(p.numel() for p in model.parameters()), max_model_len or cfg.seq_length,
                 engine.config.max_batch_size, ", API key required" if api_key else "")
        try:
            yield
        finally:
            engine.close()
            log.info("engine stopped: %s", engine.stats.as_dict())

    app.router.lifespan_context = lifespan
    return app


def draining_server(config, state, graceful_timeout: float):
    """A ``uvicorn.Server`` whose first SIGTERM/SIGINT drains ``state`` (a ``ServeState``)
    and stops once no request is in flight or ``graceful_timeout`` has passed."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.draining:  # a second signal: stop without waiting
                return super().handle_exit(sig, frame)
            state.drain()
            log.info("draining: %d requests in flight, new ones get 503 (up to %.0f s)", state.in_flight,
                     graceful_timeout)
            threading.Thread(target=self._exit_when_idle, name="mtnlg-serve-drain", daemon=True).start()

        def _exit_when_idle(self):
            deadline = time.monotonic() + graceful_timeout
            while state.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            if state.in_flight > 0:
                log.warning("%d requests still in flight after %.0f s: stopping anyway", state.in_flight,
                            graceful_timeout)
            self.should_exit = True

    return DrainingServer(config)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, model_name: str = "model",
          graceful_timeout: float = 30.0, device: str = "cpu", api_key: str | None = None,
          max_model_len: int | None = None, max_request_bytes: int = 1 << 20, **engine_config) -> None:
    import signal

    import uvicorn

    app = build_app(model_dir, model_name, device=device, api_key=api_key, max_model_len=max_model_len,
                    max_request_bytes=max_request_bytes, **engine_config)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=graceful_timeout, log_level="info",
                            access_log=False)
    server = draining_server(config, app.state.serving, graceful_timeout)
    # uvicorn re-raises the signals it handled to the handlers it found once it has stopped:
    # make those a no-op, so that a clean shutdown exits 0 instead of dying of that signal
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("server stopped")
