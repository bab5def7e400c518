"""Builds the Tornado application and runs the server.

Start-up first makes every declared model ready (a GGUF file converted once) and checks that it
can be served: one that cannot is refused in one log line, and listed as unavailable; with none
left the server exits with status 1. With no ``--initial-peers`` the server then starts an
embedded Petals swarm on 127.0.0.1 that hosts every servable model, waits until all blocks are
announced, then serves.
SIGINT and SIGTERM stop the server, disconnect from the swarm and stop the embedded swarm.

``server.py keys ...`` manages the API keys of a key database instead (``sessions.accounts.command``).
"""

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["keys"]:  # before the server's imports: it needs none of them
    from sessions.accounts.command import main as keys_command

    sys.exit(keys_command(sys.argv[2:]))

import asyncio  # noqa: E402
import ctypes
import ctypes.util
import dataclasses
import gc
import logging
import os
import signal
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import tornado.httpserver
import tornado.netutil
import tornado.web

from config import REPO_ROOT, Settings, choose_device, choose_dtype, parse_settings
from model_specs import DEFAULT_MODEL_FOLDER, ModelSpec
from handlers.anthropic_api import CountTokensHandler, MessagesHandler
from handlers.base import APIHandler
from handlers.context import context_settings
from handlers.health import HealthHandler, ReadyHandler
from handlers.http_generate import GenerateHandler
from handlers.metrics import MetricsHandler
from handlers.models import ModelsHandler
from handlers.openai_api import ChatCompletionHandler, CompletionHandler, ModelListHandler
from handlers.responses_api import ResponsesHandler, StoredResponseHandler
from handlers.swarm import SwarmHandler
from handlers.usage import UsageHandler
from handlers.websocket import GenerateWebSocket
from sessions.serving.manager import SessionManager, build_manager
from swarm.families import UnsupportedModel, check_servable

logger = logging.getLogger(__name__)

STATIC_DIR = REPO_ROOT / "static"
LOG_DIR = REPO_ROOT / ".logs"
WEBSOCKET_PING_INTERVAL = 25
# Messages up to this many times --max-message-bytes get an error reply; larger ones close the socket.
HARD_MESSAGE_SIZE_FACTOR = 4
SHUTDOWN_TIMEOUT = 10
# Connections the kernel queues before the server accepts them (Tornado's default: 128). A burst
# of connections past the queue is dropped, and each dropped client retries only a second later.
LISTEN_BACKLOG = 1024


class NotFoundHandler(APIHandler):
    """Answers unknown paths with a JSON 404."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404, "No such endpoint: %s", self.request.path)


def make_app(config: Settings, manager: SessionManager) -> tornado.web.Application:
    """The application: every route; handlers read ``config`` and ``manager`` from its settings
    (``handlers.context``)."""
    return tornado.web.Application(
        [
            (r"/()", tornado.web.StaticFileHandler, {"path": str(STATIC_DIR), "default_filename": "index.html"}),
            (r"/swarm", tornado.web.RedirectHandler, {"url": "/swarm.html"}),
            (r"/health", HealthHandler),
            (r"/ready", ReadyHandler),
            (r"/metrics", MetricsHandler),
            (r"/api/v1/swarm", SwarmHandler),
            (r"/api/v1/models", ModelsHandler),
            (r"/api/v1/generate", GenerateHandler),
            (r"/api/v1/usage", UsageHandler),
            (r"/v1/models", ModelListHandler),
            (r"/v1/completions", CompletionHandler),
            (r"/v1/chat/completions", ChatCompletionHandler),
            (r"/v1/responses", ResponsesHandler),
            (r"/v1/responses/([A-Za-z0-9_-]{1,128})", StoredResponseHandler),
            (r"/v1/messages", MessagesHandler),
            (r"/v1/messages/count_tokens", CountTokensHandler),
            (r"/api/v2/generate", GenerateWebSocket),
            (r"/(.+\.(?:html|js|css|svg|png|ico|woff2))", tornado.web.StaticFileHandler, {"path": str(STATIC_DIR)}),
        ],
        default_handler_class=NotFoundHandler,
        websocket_ping_interval=WEBSOCKET_PING_INTERVAL,
        websocket_max_message_size=HARD_MESSAGE_SIZE_FACTOR * config.max_message_bytes,
        **context_settings(config, manager),
    )


def prepare_weights(spec: ModelSpec, models_dir: Path) -> ModelSpec:
    """``spec`` with its weights on disk: the default model converted once from its package, a GGUF
    file converted once into a folder under ``models_dir`` (the spec then names the folder);
    ``UnsupportedModel`` for a GGUF file the converter cannot read as a model it knows."""
    from swarm.default_model import ensure_default_model

    if spec.path == models_dir / DEFAULT_MODEL_FOLDER:
        ensure_default_model(models_dir)
    elif spec.gguf:
        from swarm.convert_gguf import convert_gguf_once

        logger.info("Converting %s into %s (once)", spec.path, models_dir)
        try:
            return dataclasses.replace(spec, path=convert_gguf_once(spec.path, models_dir))
        except ValueError as error:  # what the converter refuses: another architecture or tokenizer
            raise UnsupportedModel(f"Cannot serve {spec.path}: {error}") from None
    elif spec.path is not None and not Path(spec.path).is_dir():
        raise SystemExit(f"model folder {spec.path} does not exist")
    return spec


def prepare_models(config: Settings) -> Tuple[Tuple[ModelSpec, ...], Dict[str, str]]:
    """Every declared model made ready before any node starts: its weights on disk (``prepare_weights``)
    and its family and config checked (a hub model's config comes from the hub, as petals' would).

    Returns the models (a GGUF one naming its converted folder) and the refused ones: the key of each
    model this server cannot serve with why, each logged in one line."""
    models: List[ModelSpec] = []
    refusals: Dict[str, str] = {}
    for spec in config.models:
        try:
            spec = prepare_weights(spec, config.models_dir)
            check_servable(spec.weights)
        except UnsupportedModel as refusal:
            logger.error("%s", refusal)
            refusals[spec.key] = str(refusal)
        models.append(spec)
    return tuple(models), refusals


def split_cpu_threads(requested_node_threads: int) -> tuple:
    """(node, client) torch threads when the swarm shares this machine's CPU with the server.

    Measured on 2 cores (bench/swarm_vs_local.py): one thread each beats both using two, since
    a decoding step alternates between the node (blocks) and the client (output head).
    """
    cores = os.cpu_count() or 1
    node_threads = requested_node_threads or max(1, cores // 2)
    return node_threads, max(1, cores - node_threads)


def start_embedded_swarm(config: Settings, models: Sequence[ModelSpec], device: str, torch_dtype: str):
    """Starts a local swarm hosting ``models`` and waits until it is complete."""
    from swarm.local import LocalSwarm, SwarmModel, count_blocks

    node_threads = config.swarm_threads
    if device == "cpu":
        import torch

        node_threads, client_threads = split_cpu_threads(config.swarm_threads)
        torch.set_num_threads(client_threads)
        logger.info("CPU threads: %d per swarm node, %d for the server", node_threads, client_threads)
    swarm = LocalSwarm(LOG_DIR, device=device, torch_dtype=torch_dtype, threads=node_threads).start()
    try:
        swarm_models = []
        for spec in models:
            model = SwarmModel(path=spec.weights, dht_prefix=spec.swarm_prefix,
                               num_blocks=count_blocks(spec.weights))
            logger.info("Loading %d blocks of %s into the embedded swarm", model.num_blocks, spec.key)
            swarm.add_node(model)
            swarm_models.append(model)

        def report(model, announced):
            logger.info("Blocks announced for %s: %d/%d", model.dht_prefix, announced, model.num_blocks)

        swarm.wait_until_ready(swarm_models, on_progress=report)
    except BaseException:
        swarm.stop()
        raise
    return swarm


# Allocations between two collections of the youngest objects (Python's default: 700).
YOUNG_COLLECTION_THRESHOLD = 20_000


def freeze_start_up_heap() -> None:
    """Takes the objects alive after start-up (modules, tokenizers, model clients: about 330,000
    for the default model) out of the garbage collector's reach. A full collection over them
    pauses every thread, the event loop included, for about half a second on a small CPU; after
    the freeze it walks only what serving creates.

    Serving then collects the youngest objects less often: Python weighs a full collection every
    70,000 allocations by default and runs one whenever the heap grew by a quarter, so a burst
    of new connections (a few hundred objects each) set off one full collection after another
    over a growing heap."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
    logger.info("Froze %d start-up objects out of garbage collection (a full collection took %.0f ms)",
                gc.get_freeze_count(), 1000 * (time.perf_counter() - started))


# glibc's malloc: allocations from this size up are mapped apart and unmapped when freed.
MMAP_THRESHOLD_BYTES = 128 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number


def return_large_buffers_to_the_system() -> None:
    """Fixes glibc's mmap threshold. By default it rises to the size of the largest buffer freed
    (up to 32 MiB), after which request bodies and long prompts are carved from the heap and
    their memory stays with the process once freed; at a fixed threshold they go back at once."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        pass


def public_url(host: str, port: int) -> str:
    """A URL a browser on this machine can open."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{shown}:{port}/"


async def serve(config: Settings, initial_peers: Sequence[str], device: str, torch_dtype: str,
                refusals: Mapping[str, str]) -> None:
    """Connects to the swarm, serves until SIGINT or SIGTERM, then disconnects. The ``refusals``
    (model key: why it cannot be served) are listed as unavailable and refused with that reason."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_requested.set)
    manager = build_manager(config.models, initial_peers, device, torch_dtype,
                            settings=config,
                            refusals=refusals)
    try:
        await manager.start()
        freeze_start_up_heap()
        sockets = tornado.netutil.bind_sockets(config.port, config.host, backlog=LISTEN_BACKLOG)
        app = make_app(config, manager)
        http_server = tornado.httpserver.HTTPServer(app)
        http_server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        logger.info("ready: %s", public_url(config.host, port))
        await stop_requested.wait()
        logger.info("Shutting down")
        http_server.stop()
        for websocket in list(app.settings["websockets"]):
            websocket.close(1001, "Server shutting down")
        await asyncio.wait_for(http_server.close_all_connections(), SHUTDOWN_TIMEOUT)
    except asyncio.TimeoutError:
        logger.warning("Some connections did not close within %d s", SHUTDOWN_TIMEOUT)
    finally:
        await manager.close()


def configure_logging(level: str) -> None:
    """Plain timestamped lines on stderr for our modules and petals alike."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the server; returns the exit status."""
    config = parse_settings(argv)
    configure_logging(config.log_level)
    return_large_buffers_to_the_system()
    # Until the event loop takes over, SIGTERM stops start-up the way Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    device = choose_device(config.device)
    torch_dtype = choose_dtype(device, config.torch_dtype)
    started = time.monotonic()
    swarm = None
    try:
        models, refusals = prepare_models(config)
        servable = [spec for spec in models if spec.key not in refusals]
        if not servable:  # each refusal is logged in its one line
            return 1
        config = dataclasses.replace(config, models=models)
        if config.embedded_swarm:
            swarm = start_embedded_swarm(config, servable, device, torch_dtype)
            initial_peers = swarm.initial_peers
        else:
            initial_peers = list(config.initial_peers)
        logger.info("Swarm ready after %.1f s; connecting the clients", time.monotonic() - started)
        asyncio.run(serve(config, initial_peers, device, torch_dtype, refusals))
    except KeyboardInterrupt:
        logger.info("Interrupted")
    except UnsupportedModel as error:  # one clear line, not a traceback
        logger.error("%s", error)
        return 1
    finally:
        if swarm is not None:
            swarm.stop()
    logger.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
