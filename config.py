"""What the server serves and how: models declared as data, plus every run-time setting.

Each setting has a default here, can be set with an environment variable
(``SWARM_CHAT_<NAME>``), and can be overridden by a ``server.py`` flag; ``server.py --help``
lists them all.
"""

import argparse
import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

from swarm.prefix import dht_prefix_for

REPO_ROOT = Path(__file__).resolve().parent
ENV_PREFIX = "SWARM_CHAT_"
PUBLIC_SWARM = "public"

# The embedded default: a real chat model that ships inside a registry package (see swarm/default_model.py).
MIB = 1024 * 1024
DEFAULT_MODEL_REPOSITORY = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_FOLDER = "SmolLM2-135M-Instruct"
# What a header name may be (an RFC 9110 token).
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class ChatSettings:
    """How the browser chat talks to a model: session size, turn separators, sampling defaults."""

    max_session_length: int = 2048
    sep_token: str = "\n"
    stop_token: Optional[str] = None  # None: the tokenizer's end-of-sequence token
    extra_stop_sequences: Tuple[str, ...] = ()
    generation_params: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class FrontendSettings:
    """What the chat page shows about a model."""

    name: str
    model_card: str = ""
    license: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """One model served by the swarm.

    ``repository`` is the model's name on the hub; ``path`` is a local folder holding the same
    weights (config, tokenizer, embeddings) when the hub cannot be reached, or a GGUF file that
    start-up converts once into such a folder (``path`` then names the folder). ``dht_prefix`` is
    the swarm's name for the model's blocks, when it is not the one derived from the repository
    (``swarm_prefix``).
    With an ``adapter``, clients address the model by the adapter's repository.
    """

    repository: str
    family: str
    frontend: FrontendSettings
    chat: ChatSettings = ChatSettings()
    path: Optional[Path] = None
    dht_prefix: Optional[str] = None
    adapter: Optional[str] = None
    aliases: Tuple[str, ...] = ()
    public_api: bool = True
    max_new_tokens_limit: int = 2048  # most tokens one request may ask for; chat.max_session_length caps max_length
    default_max_tokens: int = 512  # a /v1 reply's limit when the request sets none (less if the context is fuller)

    @property
    def key(self) -> str:
        """The string clients pass as ``model``."""
        return self.adapter or self.repository

    @property
    def swarm_prefix(self) -> str:
        """The swarm's name for the model's blocks, under which nodes announce them and clients look."""
        return self.dht_prefix or dht_prefix_for(self.repository)

    @property
    def weights(self) -> str:
        """Where the weights are loaded from: the local folder if any, else the hub."""
        return str(self.path) if self.path is not None else self.repository

    @property
    def gguf(self) -> bool:
        """Whether ``path`` is a GGUF file, still to be converted into a folder."""
        return self.path is not None and is_gguf(self.path)

    def names(self) -> Tuple[str, ...]:
        """Every name that selects this model."""
        return (self.key, *self.aliases)


def is_gguf(path: Path) -> bool:
    """Whether ``path`` names a GGUF file (by its extension; a folder so named is a folder)."""
    return path.suffix.lower() == ".gguf" and not path.is_dir()


def default_model(models_dir: Path) -> ModelSpec:
    """SmolLM2-135M-Instruct, converted once into ``models_dir`` from the package that ships it."""
    return ModelSpec(
        repository=DEFAULT_MODEL_REPOSITORY,
        family="SmolLM2",
        path=models_dir / DEFAULT_MODEL_FOLDER,
        aliases=("smollm2", "default"),
        frontend=FrontendSettings(
            name="SmolLM2 135M Instruct",
            model_card="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
            license="https://www.apache.org/licenses/LICENSE-2.0",
        ),
        chat=ChatSettings(
            max_session_length=8192,
            sep_token="<|im_end|>\n",
            stop_token="<|im_end|>",
            extra_stop_sequences=("<|endoftext|>",),
            generation_params={"do_sample": 1, "temperature": 0.6, "top_p": 0.9},
        ),
    )


def model_from_source(source: str) -> ModelSpec:
    """A model named on the command line: a hub repository, a local folder or a GGUF file (named
    after the file, and converted at start-up); default settings, no aliases."""
    path = Path(source).expanduser()
    if path.is_dir() or is_gguf(path):
        if not path.exists():
            raise SystemExit(f"--model {source}: no such file")
        name = path.stem if is_gguf(path) else path.name
        return ModelSpec(
            repository=name,
            family=name,
            path=path.resolve(),
            frontend=FrontendSettings(name=name),
        )
    return ModelSpec(
        repository=source,
        family=source.split("/")[0],
        frontend=FrontendSettings(name=source.split("/")[-1], model_card=f"https://huggingface.co/{source}"),
    )


@dataclass(frozen=True)
class WarmPoolLimits:
    """How many finished sessions may wait for their next request, for how long, in how much memory."""

    max_sessions: int = 16  # 0: prefix reuse off
    max_age: float = 60.0  # seconds; the swarm's servers drop an idle session after 5 minutes
    max_state_bytes: int = 256 * 1024 * 1024  # client-side state the waiting sessions may hold
    max_per_client: int = 4
    headroom_tokens: int = 1024  # extra room a reusable session is opened with, for the next turn


@dataclass(frozen=True)
class ManagerSettings:
    """What the session manager enforces (at a limit it answers "busy" instead of queueing),
    and how its Petals clients treat the swarm."""

    max_sessions: int = 1000  # open inference sessions, all clients together
    max_sessions_per_client: int = 32  # open inference sessions of one client address
    max_connections: int = 10_000  # open WebSocket connections, all clients together
    max_connections_per_client: int = 64  # open WebSocket connections of one client, with or without a session
    max_messages_per_second: float = 20.0  # WebSocket messages one connection may send, on average
    max_client_bytes_per_second: int = MIB  # WebSocket bytes one client's connections may send together
    idle_timeout: float = 300.0  # seconds before an unused session is closed
    step_timeout: float = 300.0  # seconds one generation step may take, retries included
    request_timeout: float = 30.0  # seconds one server may stay silent before petals routes around it
    routing_update_period: float = 60.0  # seconds between refreshes of a client's view of the swarm
    # Bytes of client-side state all sessions may hold (petals keeps every token's hidden states
    # per server span, to replay them if that server fails); 0: a quarter of this machine's RAM.
    session_memory_budget: int = 0
    warm_pool: WarmPoolLimits = WarmPoolLimits()  # prefix reuse for the stateless APIs
    resume_grace: float = 60.0  # seconds a resumable WebSocket session waits for its client to come back
    draft_tokens: int = 16  # the longest draft a step verifies (speculative decoding); 0: off

    @property
    def session_memory_budget_bytes(self) -> int:
        """The budget in bytes, the automatic default resolved."""
        return self.session_memory_budget or machine_memory_bytes() // 4


def machine_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The most draft tokens a step may carry: petals' servers run a step of up to 128 tokens as one task.
MAX_DRAFT_TOKENS = 127


@dataclass(frozen=True)
class Settings:
    """Every run-time setting of the server."""

    models: Tuple[ModelSpec, ...]
    models_file: Optional[Path] = None  # a TOML file declaring the models (see models.example.toml)
    host: str = "0.0.0.0"
    port: int = 5000
    initial_peers: Tuple[str, ...] = ()  # empty: start an embedded swarm on 127.0.0.1
    device: str = "auto"
    torch_dtype: str = "auto"
    step_timeout: float = 300.0
    request_timeout: float = 30.0
    routing_update_period: float = 60.0
    idle_timeout: float = 300.0
    max_sessions: int = 1000
    max_sessions_per_client: int = 32
    max_connections: int = 10_000
    max_connections_per_client: int = 64
    max_messages_per_second: float = 20.0
    max_client_bytes_per_second: int = MIB
    session_memory_budget_mib: int = 0  # client-side state of all sessions; 0: a quarter of the RAM
    warm_sessions: int = 16  # finished stateless sessions kept for prefix reuse; 0: reuse off
    warm_session_ttl: float = 60.0  # seconds one waits for a request that continues it
    warm_memory_mib: int = 256  # client-side state the warm sessions may hold
    reuse_headroom_tokens: int = 1024  # extra room a stateless session opens with, for the next turn
    resume_grace: float = 60.0  # seconds a resumable WebSocket session outlives its connection
    draft_tokens: int = 16  # the longest draft a step verifies (speculative decoding); 0: off
    trusted_proxies: Tuple[str, ...] = ()  # addresses or networks whose client_ip_header is believed
    client_ip_header: str = "X-Forwarded-For"  # the only header read for the client behind them
    executor_workers: int = 8
    models_dir: Path = REPO_ROOT / ".models"
    swarm_threads: int = 0  # torch threads per embedded swarm node; 0: split the CPU with the server
    allowed_origins: Tuple[str, ...] = ()  # pages allowed to use the WebSocket and (CORS) /v1 APIs; empty: any
    max_message_bytes: int = 256 * 1024
    max_body_bytes: int = 1024 * 1024  # largest HTTP request body; larger ones are refused unread (413)
    api_key: Optional[str] = None  # when set, every API that serves models requires it
    debug: bool = False
    log_level: str = "INFO"

    @property
    def manager_settings(self) -> ManagerSettings:
        """What the session manager enforces and how its clients treat the swarm."""
        return ManagerSettings(max_sessions=self.max_sessions, max_sessions_per_client=self.max_sessions_per_client,
                               max_connections=self.max_connections,
                               max_connections_per_client=self.max_connections_per_client,
                               max_messages_per_second=self.max_messages_per_second,
                               max_client_bytes_per_second=self.max_client_bytes_per_second,
                               idle_timeout=self.idle_timeout, step_timeout=self.step_timeout,
                               request_timeout=self.request_timeout,
                               routing_update_period=self.routing_update_period,
                               session_memory_budget=self.session_memory_budget_mib * MIB,
                               warm_pool=WarmPoolLimits(max_sessions=self.warm_sessions,
                                                        max_age=self.warm_session_ttl,
                                                        max_state_bytes=self.warm_memory_mib * MIB,
                                                        max_per_client=min(WarmPoolLimits.max_per_client,
                                                                           self.max_sessions_per_client),
                                                        headroom_tokens=self.reuse_headroom_tokens),
                               resume_grace=self.resume_grace, draft_tokens=self.draft_tokens)

    @property
    def embedded_swarm(self) -> bool:
        """True when no swarm is named, so the server starts its own."""
        return not self.initial_peers


def choose_device(requested: str = "auto") -> str:
    """The device for the client side: CUDA when present, else the CPU."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_dtype(device: str, requested: str = "auto") -> str:
    """Half precision on CUDA; bfloat16 on a CPU with AVX-512; float32 otherwise."""
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "float16"
    try:
        import cpufeature

        if cpufeature.CPUFeature.get("AVX512f") and cpufeature.CPUFeature.get("OS_AVX512"):
            return "bfloat16"
    except Exception:  # cpufeature cannot read this CPU: stay on the safe choice
        pass
    return "float32"


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


class ExtendFlagDefault(argparse.Action):
    """Each use of the flag adds its values; the first replaces the default (the environment's)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*(current if current is not self.default else ()), *values])


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    """The command line of ``server.py``; each flag's default comes from its environment variable."""
    defaults = Settings(models=())
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="Chat web app, HTTP API and WebSocket API over a Petals swarm.",
        epilog=f"Every flag can also be set with an environment variable {ENV_PREFIX}<FLAG> "
        f"(for example {ENV_PREFIX}PORT=8080); flags win.",
    )

    def add(flag, help_text, **kwargs):
        env_value = environ.get(_env_name(flag))
        if env_value is not None:
            if kwargs.get("nargs") in ("*", "+"):
                env_value = env_value.split()
            elif kwargs.get("action") == "store_true":
                env_value = env_value.lower() in ("1", "true", "yes", "on")
            kwargs["default"] = env_value
        parser.add_argument(flag, help=f"{help_text} [env {_env_name(flag)}]", **kwargs)

    add("--host", "address to listen on", default=defaults.host)
    add("--port", "port to listen on", type=int, default=defaults.port)
    add(
        "--initial-peers",
        f"multiaddrs of an existing swarm to join, or '{PUBLIC_SWARM}' for the public Petals swarm; "
        "none (the default) starts an embedded swarm on 127.0.0.1",
        nargs="*",
        default=[],
        metavar="ADDR",
    )
    add(
        "--model",
        "models to serve instead of the default one, with default settings: hub repositories, local folders "
        "or .gguf files (converted once into --models-dir); may be repeated; not with --models-file",
        nargs="+",
        action=ExtendFlagDefault,
        default=None,
        dest="models",
        metavar="REPO_OR_PATH",
    )
    add("--models-file", "a TOML file declaring the models to serve and their settings (names, aliases, chat "
        "settings, limits; see models.example.toml); not with --model", type=Path, default=defaults.models_file,
        metavar="PATH")
    add("--device", "device for embeddings and the embedded swarm: auto, cpu, cuda, cuda:N", default=defaults.device)
    add(
        "--torch-dtype",
        "dtype: auto (float16 on CUDA, bfloat16 on CPUs with AVX-512, else float32), float32, bfloat16, float16",
        default=defaults.torch_dtype,
    )
    add("--step-timeout", "seconds a generation step may take, retries through other servers included",
        type=float, default=defaults.step_timeout)
    add("--request-timeout", "seconds one swarm server may stay silent before it counts as failed and the "
        "step is retried through another", type=float, default=defaults.request_timeout)
    add("--routing-update-period", "seconds between refreshes of the clients' view of which servers hold which "
        "blocks", type=float, default=defaults.routing_update_period)
    add("--idle-timeout", "seconds an unused inference session stays open", type=float,
        default=defaults.idle_timeout)
    add("--max-sessions", "open inference sessions, all clients together (more are refused with 503)", type=int,
        default=defaults.max_sessions)
    add("--max-sessions-per-client", "open inference sessions per client address, and HTTP generation requests "
        "one client may have in flight (more are refused with 429)",
        type=int, default=defaults.max_sessions_per_client)
    add("--max-connections", "open WebSocket connections, all clients together (more are refused)", type=int,
        default=defaults.max_connections)
    add("--max-connections-per-client", "open WebSocket connections per client, with or without a session "
        "(more are refused)", type=int, default=defaults.max_connections_per_client)
    add("--max-messages-per-second", "WebSocket messages one connection may send per second on average (a burst "
        "of twice that is allowed; the server reads more only as the rate allows)", type=float,
        default=defaults.max_messages_per_second)
    add("--max-client-bytes-per-second", "bytes one client's WebSocket connections may send per second together "
        "(a second's worth at once); the server reads more only as this allows", type=int,
        default=defaults.max_client_bytes_per_second)
    add("--session-memory-budget-mib", "MiB of client-side state (each token's hidden states per server span) all "
        "sessions together may hold; new sessions are refused past it (0: a quarter of this machine's RAM)",
        type=int, default=defaults.session_memory_budget_mib)
    add("--warm-sessions", "finished sessions of /v1 and /api/v1/generate requests kept warm, so that a request "
        "continuing the same conversation feeds only its new tokens through the swarm (0: prefix reuse off)",
        type=int, default=defaults.warm_sessions)
    add("--warm-session-ttl", "seconds a warm session waits for a request that continues it", type=float,
        default=defaults.warm_session_ttl)
    add("--warm-memory-mib", "MiB of client-side state the warm sessions together may hold", type=int,
        default=defaults.warm_memory_mib)
    add("--reuse-headroom-tokens", "tokens of extra room a stateless request's session is opened with, so that "
        "the conversation's next turn fits in it", type=int, default=defaults.reuse_headroom_tokens)
    add("--resume-grace", "seconds a resumable WebSocket session waits for its client to reconnect", type=float,
        default=defaults.resume_grace)
    add("--draft-tokens", "the most tokens one swarm step verifies ahead (speculative decoding, drafted from the "
        "conversation and the request's prediction; the output is unchanged); 0 turns it off", type=int,
        default=defaults.draft_tokens)
    add("--trusted-proxies", "addresses or networks (CIDR) of reverse proxies whose --client-ip-header names the "
        "client; none: the peer address is the client", nargs="*", default=[], metavar="CIDR")
    add("--client-ip-header", "the header the trusted proxies set to the client address: X-Forwarded-For (its "
        "right-most hop that is not a trusted proxy), X-Real-IP, Forwarded (its for=) or another; no other "
        "header is read", default=defaults.client_ip_header, metavar="HEADER")
    add("--executor-workers", "threads that run blocking Petals calls", type=int, default=defaults.executor_workers)
    add("--models-dir", "where converted local models are cached", type=Path, default=defaults.models_dir)
    add("--swarm-threads", "torch threads per embedded swarm node (0: automatic)", type=int,
        default=defaults.swarm_threads)
    add("--allowed-origins", "origins (e.g. https://chat.example.org) whose pages may use the WebSocket API and, "
        "through CORS, the /v1 API; none: any", nargs="*", default=[], metavar="ORIGIN")
    add("--max-message-bytes", "largest WebSocket message answered (larger ones get an error reply)", type=int,
        default=defaults.max_message_bytes)
    add("--max-body-bytes", "largest HTTP request body (larger ones get 413 before they are read)", type=int,
        default=defaults.max_body_bytes)
    add("--api-key", "require this key (Authorization: Bearer KEY) on every API that serves models, "
        "the WebSocket included",
        default=None)
    add("--debug", "tracebacks in error replies, Tornado debug mode", action="store_true", default=defaults.debug)
    add("--log-level", "DEBUG, INFO, WARNING or ERROR", default=defaults.log_level)
    return parser


def declared_models(args: argparse.Namespace) -> Tuple[ModelSpec, ...]:
    """The models to serve: the models file's, ``--model``'s (default settings), or the default one."""
    from models_file import ModelsFileError, read_models_file  # it builds on this module's ModelSpec

    if args.models and args.models_file is not None:
        raise SystemExit(f"--model and --models-file both name the models to serve (flags, or {_env_name('--model')} "
                         f"and {_env_name('--models-file')}): use one; a models file can declare every model")
    if args.models_file is not None:
        try:
            return read_models_file(args.models_file)
        except ModelsFileError as error:
            raise SystemExit(str(error)) from None
    if not args.models:
        return (default_model(args.models_dir),)
    models = tuple(model_from_source(source) for source in args.models)
    keys = [spec.key for spec in models]
    for key in keys:
        if keys.count(key) > 1:
            raise SystemExit(f"--model names {key!r} twice")
    return models


def parse_settings(argv: Optional[Sequence[str]] = None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Settings from defaults, environment variables and flags, in increasing precedence."""
    args = build_parser(environ).parse_args(argv)
    models = declared_models(args)
    for flag in ("executor_workers", "max_sessions", "max_sessions_per_client", "max_body_bytes", "max_connections",
                 "max_connections_per_client", "max_client_bytes_per_second"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("session_memory_budget_mib", "warm_sessions", "warm_memory_mib", "reuse_headroom_tokens",
                 "draft_tokens"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must not be negative")
    if args.draft_tokens > MAX_DRAFT_TOKENS:  # a swarm server runs longer steps block by block
        raise SystemExit(f"--draft-tokens must be at most {MAX_DRAFT_TOKENS}")
    for flag in ("step_timeout", "request_timeout", "routing_update_period", "idle_timeout",
                 "max_messages_per_second", "warm_session_ttl", "resume_grace"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be positive")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if f.name != "models"}
    values["initial_peers"] = tuple(args.initial_peers)
    values["allowed_origins"] = tuple(args.allowed_origins)
    values["trusted_proxies"] = tuple(args.trusted_proxies)
    for network in values["trusted_proxies"]:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise SystemExit(f"--trusted-proxies: {network!r} is not an address or a network") from None
    if not HEADER_NAME.fullmatch(args.client_ip_header):
        raise SystemExit(f"--client-ip-header: {args.client_ip_header!r} is not a header name")
    return Settings(models=models, **values)
