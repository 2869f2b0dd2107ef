"""`minillama serve`: start the engine (a child process that loads the checkpoint), and run the app under uvicorn
until SIGTERM or Ctrl-C.

    serve(ServeConfig(checkpoint="runs/default/step-1000", port=8000))

Shutdown. On SIGTERM the server keeps listening but answers new /v1/ requests with 503 (and /health with 503,
so a load balancer takes it out), lets the running requests finish for up to `grace_s`, cancels what is left,
then closes and returns (exit code 0). A second SIGTERM, or Ctrl-C, stops at once.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from types import FrameType

from minillama.errors import MinillamaError
from minillama.serve.app import DEFAULT_HEALTH_STALL_S, DEFAULT_MAX_BODY_BYTES, ServerState, build_app
from minillama.serve.chat import ChatFormatter
from minillama.serve.engine_link import EngineProcess, build_engine
from minillama.serve.metrics import ServerMetrics
from minillama.serve.scheduler import Scheduler
from minillama.tokenizer import load_tokenizer

log = logging.getLogger("minillama.serve")

API_KEY_ENV = "MINILLAMA_API_KEY"


@dataclass
class ServeConfig:
    """What `minillama serve` takes (see its --help)."""

    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the checkpoint path as given (vLLM's default too)
    max_batch: int = 32
    max_queue: int = 256
    max_context: int | None = None  # positions per sequence (default: the model's max_seq_len)
    max_cached_tokens: int | None = None  # KV admission budget in tokens (default: the whole cache)
    prefill_chunk: int = 512
    quantize: str | None = None
    group_size: int | None = None
    draft: str | None = None
    draft_tokens: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    compile: bool | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    grace_s: float = 30.0
    health_stall_s: float = DEFAULT_HEALTH_STALL_S
    engine_in_process: bool = False  # the engine on a thread of the server's process, not a child (engine_link.py)

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_chunk", "max_body_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise MinillamaError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise MinillamaError(f"--port must be in 0..65535, got {self.port}")
        if self.grace_s < 0 or self.health_stall_s <= 0:
            raise MinillamaError(f"--grace must be >= 0 and the health stall limit > 0, got {self.grace_s} and "
                                 f"{self.health_stall_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise MinillamaError("the API key is empty; give a non-empty --api-key or MINILLAMA_API_KEY")


def load_server(config: ServeConfig) -> ServerState:
    """The engine (loaded as `minillama generate` loads it; in a child process unless `engine_in_process`), its
    scheduler thread (started) and the app's state."""
    config.check()
    if config.engine_in_process:
        engine = build_engine(config)
        tokenizer = engine.tokenizer
    else:
        engine = EngineProcess(config)  # returns once the child has loaded (and compiled)
        tokenizer = load_tokenizer(config.checkpoint)
    scheduler = Scheduler(engine, max_queue=config.max_queue, metrics=ServerMetrics())
    scheduler.start()
    return ServerState(scheduler, tokenizer, ChatFormatter.from_checkpoint(config.checkpoint, tokenizer),
                       model_name=config.served_model_name or config.checkpoint, api_key=config.api_key,
                       max_body_bytes=config.max_body_bytes, health_stall_s=config.health_stall_s)


def curl_example(url: str, model_name: str, api_key_set: bool) -> str:
    """One curl command line that works against this server (with a key: from $MINILLAMA_API_KEY)."""
    body = {"model": model_name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if api_key_set else ""
    return (f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(json.dumps(body))}")


def serve(config: ServeConfig) -> None:
    """Run the server until it is stopped (module docstring)."""
    import uvicorn

    state = load_server(config)
    app = build_app(state)

    class DrainingServer(uvicorn.Server):
        """uvicorn, with SIGTERM draining first (module docstring)."""

        draining = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig == signal.SIGTERM and not self.draining:
                self.draining = True
                print("minillama: SIGTERM: finishing running requests, taking no new ones", file=sys.stderr,
                      flush=True)
                threading.Thread(target=self._drain, name="minillama-drain", daemon=True).start()
                return
            # Ctrl-C: uvicorn's graceful stop; a second signal, or any signal while draining: stop now.
            self.force_exit = self.should_exit or self.draining
            self.should_exit = True

        def _drain(self) -> None:
            state.scheduler.drain(config.grace_s)
            self.should_exit = True

        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers else config.port
                host = f"[{config.host}]" if ":" in config.host else config.host
                url = f"http://{host}:{port}"
                print(f"minillama: serving {state.model_name!r} at {url}/v1 (chat template: "
                      f"{state.chat.template_name}; {state.scheduler.info.max_batch} sequences at once, context "
                      f"{state.max_len})", flush=True)
                print(curl_example(url, state.model_name, config.api_key is not None), flush=True)

    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                               timeout_graceful_shutdown=5, lifespan="off")
    server = DrainingServer(uv_config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        if server.started:
            raise
    finally:
        state.scheduler.stop()
    if not server.started:
        raise MinillamaError(f"could not listen on {config.host}:{config.port} (in use, or not an address here)")


def api_key_from(flag: str | None) -> str | None:
    """--api-key, else $MINILLAMA_API_KEY, else none (no auth)."""
    return flag if flag is not None else (os.environ.get(API_KEY_ENV) or None)


__all__ = ["ServeConfig", "serve", "load_server", "curl_example", "api_key_from", "API_KEY_ENV"]
