"""``mtnlg serve MODEL [--host 127.0.0.1 --port 8000 --served-model-name NAME --max-batch-size 8 --max-queue 64]``.

Serves a fused model (the output of `mtnlg fuse`, local, gs:// or s3://) with the OpenAI
API: point any OpenAI client at ``http://HOST:PORT/v1``. ``--api-key`` (or the environment's
``MTNLG_API_KEY``) requires ``Authorization: Bearer KEY`` on every route but ``/health`` and
``/ready``. SIGTERM or Ctrl-C drains: new requests get 503 while those in flight finish (up
to ``--graceful-timeout`` seconds), then it exits 0. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "MTNLG_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="fused model directory (from `mtnlg fuse`), local, gs:// or s3://")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients ask for (default: the model directory's name)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="requests decoded together: the slots of the running batch (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="when idle, how long the first request waits for others to start with it (default 20 ms)")
    p.add_argument("--max-prefill-tokens", type=int, default=256,
                   help="prompt tokens run between two decoding steps; a longer prompt runs in chunks (default 256)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to let requests in flight finish on shutdown (default 30)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; unset: no key)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="most prompt + completion tokens of one request (default: the model's context)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20,
                   help="largest request body; larger ones get 413 (default 1048576)")


def served_name(model: str) -> str:
    return os.path.basename(model.rstrip("/")) or "model"


def main(args: argparse.Namespace) -> int:
    from mtnlg.serve.server import serve

    serve(args.model, host=args.host, port=args.port, model_name=args.served_model_name or served_name(args.model),
          max_batch_size=args.max_batch_size, max_queue=args.max_queue, batch_wait_ms=args.batch_wait_ms,
          max_prefill_tokens=args.max_prefill_tokens,
          graceful_timeout=args.graceful_timeout, device=args.device, api_key=args.api_key,
          max_model_len=args.max_model_len, max_request_bytes=args.max_request_bytes)
    return 0
