"""Serving: an OpenAI-compatible HTTP server over the continuous-batching engine (`minillama serve`).

    app.py        routes, request checks, OpenAI's error shape, API key, body limit
    protocol.py   request models and response objects
    chat.py       chat messages -> prompt ids (the checkpoint's template, or the plain one)
    scheduler.py  between the handlers and the engine: bounded queue, cancellation, heartbeat, draining
    engine_link.py  the engine's loop in a child process (or on a thread) and the pipe to it
    metrics.py    Prometheus metrics, a registry per server
    server.py     load a checkpoint, run uvicorn, drain on SIGTERM
"""

from minillama.serve.app import ServerState, build_app
from minillama.serve.chat import ChatFormatter
from minillama.serve.scheduler import QueueFull, Scheduler, ShuttingDown
from minillama.serve.server import ServeConfig, load_server, serve

__all__ = ["serve", "ServeConfig", "load_server", "build_app", "ServerState", "Scheduler", "ChatFormatter",
           "QueueFull", "ShuttingDown"]
