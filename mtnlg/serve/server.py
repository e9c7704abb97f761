"""Loading a fused model and running the OpenAI-compatible app under uvicorn.

    serve("runs/model", host="127.0.0.1", port=8000)     # blocks until SIGTERM / Ctrl-C

The engine starts with the app (FastAPI lifespan) and closes after uvicorn has let the
requests in flight finish: a shutdown never cuts a reply short within ``graceful_timeout``.
"""

from __future__ import annotations

import contextlib

from mtnlg.progress import get_logger
from mtnlg.serve.engine import Engine, EngineConfig

log = get_logger("mtnlg.serve")


def build_app(model_dir: str, model_name: str, device: str = "cpu", **engine_config):
    """The FastAPI app serving ``model_dir``, its engine started and stopped with it."""
    from mtnlg.formats.fused import load_fused
    from mtnlg.serve.openai_api import create_app

    model, cfg, tok = load_fused(model_dir, device=device)
    engine = Engine(model, tok, EngineConfig(**engine_config))
    app = create_app(engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        log.info("serving %s as %r (%d parameters, context %d tokens, batches of up to %d)", model_dir,
                 model_name, sum(p.numel() for p in model.parameters()), cfg.seq_length,
                 engine.config.max_batch_size)
        try:
            yield
        finally:
            engine.close()
            log.info("engine stopped: %s", engine.stats.as_dict())

    app.router.lifespan_context = lifespan
    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, model_name: str = "model",
          graceful_timeout: float = 30.0, device: str = "cpu", **engine_config) -> None:
    import signal

    import uvicorn

    app = build_app(model_dir, model_name, device=device, **engine_config)
    # uvicorn handles SIGTERM/SIGINT itself (stop accepting, drain, lifespan shutdown) and
    # then re-raises the signal to the handlers it found: make those a no-op, so that a
    # clean shutdown exits 0 instead of dying of the signal it already handled
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=graceful_timeout, log_level="info",
                    access_log=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("server stopped")
