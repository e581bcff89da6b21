"""Run an app with uvicorn on a free loopback port in a background thread (tests, benchmarks, scripts)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn
from fastapi import FastAPI

from dynamoe.serve.app import uvicorn_config


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve an app of `create_app` until the block ends; yields its base URL, e.g. http://127.0.0.1:54321."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))  # port 0: the kernel picks a free one, with no race between choosing and binding
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dynamoe-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
