"""`dynamoe serve`: an OpenAI-compatible HTTP server with dynamic batching and a per-request compute dial."""

from dynamoe.serve.app import ServeSettings, create_app, serve_checkpoint
from dynamoe.serve.engine import Engine, EngineLimits

__all__ = ["Engine", "EngineLimits", "ServeSettings", "create_app", "serve_checkpoint"]
