"""What the server serves and how: models declared as data, plus every run-time setting.

Each setting is declared once, as a field of ``Settings``: its default, type, bounds and help.
Its flag (``server.py --help`` lists them), its environment variable (``SWARM_CHAT_<NAME>``;
flags win), its checks and its row of the documentation's settings table are all made from that
declaration.
"""

import argparse
import dataclasses
import ipaddress
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from model_specs import ModelSpec, default_model, model_from_source
from models_file import ModelsFileError, read_models_file

REPO_ROOT = Path(__file__).resolve().parent
ENV_PREFIX = "SWARM_CHAT_"
PUBLIC_SWARM = "public"

MIB = 1024 * 1024
# What a header name may be (an RFC 9110 token).
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class Setting:
    """How one run-time setting is read and checked: the rest (its flag, environment variable,
    default and type) follows from the ``Settings`` field that carries it."""

    help: str
    minimum: Optional[float] = None  # the smallest value allowed
    above: Optional[float] = None  # values must be greater than this
    maximum: Optional[float] = None
    choices: Tuple[str, ...] = ()
    metavar: Optional[str] = None
    flag: Optional[str] = None  # when not --<field name>
    shown_default: Optional[str] = None  # how the settings table shows the default, when not as is
    check: Optional[Callable[[str], Optional[str]]] = None  # a problem with one value, or None


def setting(default, help: str, **how) -> Any:
    """A ``Settings`` field: its default, and how the command line and environment set it."""
    factory = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(metadata={"setting": Setting(help, **how)}, **factory)


def _network_problem(value: str) -> Optional[str]:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{value!r} is not an address or a network"
    return None


def _header_problem(value: str) -> Optional[str]:
    return None if HEADER_NAME.fullmatch(value) else f"{value!r} is not a header name"


# The most draft tokens a step may carry: petals' servers run a step of up to 128 tokens as one task.
MAX_DRAFT_TOKENS = 127


@dataclass(frozen=True)
class Settings:
    """Every run-time setting of the server, each declared once: ``build_parser`` makes its flag
    and environment variable, ``parse_settings`` checks it, and ``settings_table`` documents it."""

    models: Tuple[ModelSpec, ...] = setting(
        (), "models to serve instead of the default one, with default settings: hub repositories, local folders "
        "or .gguf files (converted once into --models-dir); may be repeated; not with --models-file",
        flag="--model", metavar="REPO_OR_PATH", shown_default="the default model")
    models_file: Optional[Path] = setting(
        None, "a TOML file declaring the models to serve and their settings (names, aliases, chat settings, "
        "limits; see models.example.toml); not with --model", metavar="PATH")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface; see docs/deployment.md "
                        "before exposing the server)")
    port: int = setting(5000, "port to listen on", minimum=0, maximum=65535)
    initial_peers: Tuple[str, ...] = setting(
        (), f"multiaddrs of an existing swarm to join, or '{PUBLIC_SWARM}' for the public Petals swarm; none starts "
        "an embedded swarm on 127.0.0.1", metavar="ADDR", shown_default="none: an embedded swarm")
    device: str = setting("auto", "device for embeddings and the embedded swarm: auto (CUDA if present, else the "
                          "CPU), cpu, cuda, cuda:N")
    torch_dtype: str = setting("auto", "dtype: auto (float16 on CUDA, bfloat16 on CPUs with AVX-512, else float32), "
                               "float32, bfloat16, float16",
                               choices=("auto", "float32", "bfloat16", "float16"))
    step_timeout: float = setting(300.0, "seconds a generation step may take, retries through other servers "
                                  "included", above=0)
    request_timeout: float = setting(30.0, "seconds one swarm server may stay silent before it counts as failed and "
                                     "the step is retried through another", above=0)
    routing_update_period: float = setting(60.0, "seconds between refreshes of the clients' view of which servers "
                                           "hold which blocks", above=0)
    idle_timeout: float = setting(300.0, "seconds an unused inference session stays open", above=0)
    max_sessions: int = setting(1000, "open inference sessions, all clients together (more are refused with 503)",
                                minimum=1)
    max_sessions_per_client: int = setting(
        32, "open inference sessions per client address, and HTTP generation requests one client may have in "
        "flight (more are refused with 429)", minimum=1)
    max_connections: int = setting(10_000, "open WebSocket connections, all clients together (more are refused)",
                                   minimum=1)
    max_connections_per_client: int = setting(64, "open WebSocket connections per client, with or without a session "
                                              "(more are refused)", minimum=1)
    max_messages_per_second: float = setting(
        20.0, "WebSocket messages one connection may send per second on average (a burst of twice that is "
        "allowed; the server reads more only as the rate allows)", above=0)
    max_client_bytes_per_second: int = setting(
        MIB, "bytes one client's WebSocket connections may send per second together (a second's worth at once); "
        "the server reads more only as this allows", minimum=1)
    max_message_bytes: int = setting(
        256 * 1024, "largest WebSocket message answered, in characters of its text (larger ones get an error "
        "reply; a frame of more than four times this many bytes closes the connection)", minimum=1)
    max_body_bytes: int = setting(MIB, "largest HTTP request body (larger ones get 413 before they are read)",
                                  minimum=1)
    session_memory_budget_mib: float = setting(
        0, "MiB of client-side state (each token's hidden states per server span) all sessions together may hold; "
        "new sessions are refused past it (0: a quarter of this machine's RAM)", minimum=0)
    warm_sessions: int = setting(
        16, "finished sessions of /v1 and /api/v1/generate requests kept warm, so that a request continuing the same "
        "conversation feeds only its new tokens through the swarm (0: prefix reuse off)", minimum=0)
    warm_session_ttl: float = setting(60.0, "seconds a warm session waits for a request that continues it", above=0)
    warm_memory_mib: float = setting(256, "MiB of client-side state the warm sessions together may hold", minimum=0)
    reuse_headroom_tokens: int = setting(1024, "tokens of extra room a stateless request's session is opened with, "
                                         "so that the conversation's next turn fits in it", minimum=0)
    resume_grace: float = setting(60.0, "seconds a resumable WebSocket session waits for its client to reconnect",
                                  above=0)
    stored_responses: int = setting(
        1024, "/v1/responses replies kept (store: true) for GET and previous_response_id, all clients together, the "
        "oldest forgotten first; one client keeps at most a quarter of them (0: none kept)", minimum=0)
    stored_response_ttl: float = setting(3600.0, "seconds a stored /v1/responses reply is kept", above=0)
    max_choices: int = setting(
        4, "the most choices (n) one /v1 completion may ask for: each is a row of the request's one swarm session, "
        "which holds an attention cache per row (more are refused with 400)", minimum=1)
    draft_tokens: int = setting(
        16, "the most tokens one swarm step verifies ahead (speculative decoding, drafted from the conversation and "
        "the request's prediction; the output is unchanged); 0 turns it off", minimum=0, maximum=MAX_DRAFT_TOKENS)
    trusted_proxies: Tuple[str, ...] = setting(
        (), "addresses or networks (CIDR) of reverse proxies whose --client-ip-header names the client; none: the "
        "peer address is the client", metavar="CIDR", check=_network_problem)
    client_ip_header: str = setting(
        "X-Forwarded-For", "the header the trusted proxies set to the client address: X-Forwarded-For (its "
        "right-most hop that is not a trusted proxy), X-Real-IP, Forwarded (its for=) or another; no other header "
        "is read", metavar="HEADER", check=_header_problem)
    allowed_origins: Tuple[str, ...] = setting(
        (), "origins (e.g. https://chat.example.org) whose pages may use the WebSocket API and, through CORS, the "
        "/v1 API; none: any", metavar="ORIGIN")
    api_key: Optional[str] = setting(None, "require this key (Authorization: Bearer KEY) on every API that serves "
                                     "models, the WebSocket included")
    keys_db: Optional[Path] = setting(
        None, "a SQLite file of API keys with their limits, and of the usage accounted per key, model and day "
        "(created if missing; manage it with: server.py keys --db PATH ...); none: only --api-key, and usage is "
        "not kept", metavar="PATH")
    allow_anonymous: bool = setting(False, "with --keys-db or --api-key, also serve clients that bring no key, "
                                    "within the --anonymous-* limits per address (without any key configured, "
                                    "everyone is)")
    anonymous_requests_per_minute: int = setting(0, "generation requests per minute one anonymous client address "
                                                 "may make (0: no limit)", minimum=0)
    anonymous_tokens_per_minute: int = setting(0, "prompt and reply tokens per minute one anonymous client address "
                                               "may spend (0: no limit)", minimum=0)
    anonymous_daily_tokens: int = setting(0, "prompt and reply tokens one anonymous client address may spend per "
                                          "UTC day (0: no limit; kept in memory only)", minimum=0)
    queue_timeout: float = setting(
        30.0, "seconds a new session waits in line for room when the server holds --max-sessions (or its memory "
        "budget is spent) before it is refused; clients are told their place (0: refused at once)", minimum=0)
    queue_size: int = setting(256, "new sessions that may wait in line for room, all clients together (one client "
                              "at most --max-sessions-per-client of them)", minimum=0)
    executor_workers: int = setting(8, "threads that run blocking Petals calls", minimum=1)
    steps_in_flight: int = setting(
        0, "the most swarm steps running at once, all sessions together (clients take turns for them; fewer "
        "leave less of a first-come queue on the swarm's servers, more keep more servers busy); 0: two per "
        "model on the embedded swarm (one node each), and on a joined swarm as many as keep steps from queueing "
        "on its servers, found from the steps' times (1 to --executor-workers)", minimum=0)
    models_dir: Path = setting(REPO_ROOT / ".models", "where converted local models are cached", metavar="PATH",
                               shown_default=".models/")
    swarm_threads: int = setting(0, "torch threads per embedded swarm node (0: automatic)", minimum=0)
    debug: bool = setting(False, "tracebacks in error replies and Tornado's debug mode (autoreload): not for "
                          "production")
    log_level: str = setting("INFO", "how much the server logs", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    @property
    def session_memory_budget_bytes(self) -> int:
        """The sessions' memory budget in bytes, the automatic default resolved."""
        return int(self.session_memory_budget_mib * MIB) or machine_memory_bytes() // 4

    @property
    def warm_pool_limits(self) -> "WarmPoolLimits":
        """How many finished sessions may wait for their next request, for how long, in how much memory."""
        return WarmPoolLimits(max_sessions=self.warm_sessions, max_age=self.warm_session_ttl,
                              max_state_bytes=int(self.warm_memory_mib * MIB),
                              max_per_client=min(WARM_SESSIONS_PER_CLIENT, self.max_sessions_per_client),
                              headroom_tokens=self.reuse_headroom_tokens)

    @property
    def response_store_limits(self) -> "StoreLimits":
        """How many /v1/responses replies are kept, per client, and for how long."""
        return StoreLimits(max_responses=self.stored_responses, max_age=self.stored_response_ttl,
                           max_per_owner=responses_per_owner(self.stored_responses))

    @property
    def steps_in_flight_limit(self) -> int:
        """The steps that may run at once, the embedded swarm's default resolved (0: one per executor
        worker, or as many as ``adapts_steps_in_flight`` finds)."""
        if self.steps_in_flight or not self.embedded_swarm:
            return self.steps_in_flight
        return EMBEDDED_STEPS_IN_FLIGHT_PER_MODEL * len(self.models)

    @property
    def adapts_steps_in_flight(self) -> bool:
        """Whether the steps in flight are found from their times (a joined swarm, no fixed number)."""
        return not self.steps_in_flight and not self.embedded_swarm

    @property
    def embedded_swarm(self) -> bool:
        """True when no swarm is named, so the server starts its own."""
        return not self.initial_peers


DEFAULTS = Settings()
# Steps in flight per model of the embedded swarm, whose one node per model takes them one at a
# time: one running and one waiting keep it busy, and leave no queue for a client's turn to wait in.
EMBEDDED_STEPS_IN_FLIGHT_PER_MODEL = 2
# Warm sessions one client may have waiting, at most.
WARM_SESSIONS_PER_CLIENT = 4


@dataclass(frozen=True)
class WarmPoolLimits:
    """The warm pool's limits, as ``Settings.warm_pool_limits`` derives them (defaults: the settings')."""

    max_sessions: int = DEFAULTS.warm_sessions  # 0: prefix reuse off
    max_age: float = DEFAULTS.warm_session_ttl  # seconds; the swarm's servers drop an idle session after 5 minutes
    max_state_bytes: int = int(DEFAULTS.warm_memory_mib * MIB)
    max_per_client: int = WARM_SESSIONS_PER_CLIENT
    headroom_tokens: int = DEFAULTS.reuse_headroom_tokens


def responses_per_owner(stored_responses: int) -> int:
    """How many stored responses one client may keep: a quarter of the store (at least one)."""
    return max(1, stored_responses // 4)


@dataclass(frozen=True)
class StoreLimits:
    """The response store's limits, as ``Settings.response_store_limits`` derives them: responses in all
    and per owner, the bytes they hold in all, and seconds each is kept."""

    max_responses: int = DEFAULTS.stored_responses  # 0: none kept
    max_per_owner: int = responses_per_owner(DEFAULTS.stored_responses)
    max_bytes: int = 64 * MIB
    max_age: float = DEFAULTS.stored_response_ttl


def machine_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def declared_settings() -> List[Tuple[dataclasses.Field, Setting]]:
    """Every setting, in the order ``--help`` and the settings table list them."""
    return [(declared, declared.metadata["setting"]) for declared in dataclasses.fields(Settings)]


def flag_of(declared: dataclasses.Field) -> str:
    """A setting's command-line flag."""
    return declared.metadata["setting"].flag or "--" + declared.name.replace("_", "-")


def env_name(declared: dataclasses.Field) -> str:
    """A setting's environment variable: ``SWARM_CHAT_`` and its flag in capitals."""
    return ENV_PREFIX + flag_of(declared).lstrip("-").replace("-", "_").upper()


def _value_type(declared: dataclasses.Field) -> type:
    """The type one value of a setting has: the field's, unwrapped from Optional and Tuple."""
    kind = declared.type
    while typing.get_origin(kind) in (Union, tuple):
        kind = typing.get_args(kind)[0]
    return str if kind is ModelSpec else kind  # models are named by their sources


def _is_list(declared: dataclasses.Field) -> bool:
    return typing.get_origin(declared.type) is tuple


class ExtendFlagDefault(argparse.Action):
    """Each use of the flag adds its values; the first replaces the default (the environment's)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*(current if current is not self.default else ()), *values])


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    """The command line of ``server.py``; each flag's default comes from its environment variable."""
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="Chat web app, HTTP API and WebSocket API over a Petals swarm.",
        epilog=f"Every flag can also be set with an environment variable {ENV_PREFIX}<FLAG> "
        f"(for example {ENV_PREFIX}PORT=8080); flags win.",
    )
    for declared, how in declared_settings():
        kind, env_value = _value_type(declared), environ.get(env_name(declared))
        options: Dict[str, Any] = {"dest": declared.name, "help": f"{how.help} [env {env_name(declared)}]"}
        if kind is bool:
            options.update(action="store_true", default=declared.default if env_value is None
                           else env_value.strip().lower() in ("1", "true", "yes", "on"))
        elif _is_list(declared):
            options.update(nargs="*", action=ExtendFlagDefault, type=kind, metavar=how.metavar,
                           default=list(declared.default) if env_value is None else env_value.split())
        else:
            options.update(type=kind, choices=how.choices or None, metavar=how.metavar,
                           default=declared.default if env_value is None else env_value)
        parser.add_argument(flag_of(declared), **options)
    return parser


def _problem(how: Setting, value: Any) -> Optional[str]:
    """What is wrong with one value of a setting, or None."""
    if how.minimum is not None and value < how.minimum:
        return "must not be negative" if how.minimum == 0 else f"must be at least {how.minimum:g}"
    if how.above is not None and value <= how.above:
        return "must be positive" if how.above == 0 else f"must be greater than {how.above:g}"
    if how.maximum is not None and value > how.maximum:
        return f"must be at most {how.maximum:g}"
    return how.check(value) if how.check else None


def declared_models(args: argparse.Namespace) -> Tuple[ModelSpec, ...]:
    """The models to serve: the models file's, ``--model``'s (default settings), or the default one."""
    if args.models and args.models_file is not None:
        raise SystemExit("--model and --models-file both name the models to serve (flags, or SWARM_CHAT_MODEL and "
                         "SWARM_CHAT_MODELS_FILE): use one; a models file can declare every model")
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
    """Settings from defaults, environment variables and flags, in increasing precedence, each checked
    against its declaration."""
    args = build_parser(environ).parse_args(argv)
    values = {}
    for declared, how in declared_settings():
        value = getattr(args, declared.name)
        for item in value if _is_list(declared) else [value]:
            problem = None if item is None or declared.name == "models" else _problem(how, item)
            if problem:
                raise SystemExit(f"{flag_of(declared)}: {problem}" if how.check else
                                 f"{flag_of(declared)} {problem}")
        values[declared.name] = tuple(value) if _is_list(declared) else value
    values["models"] = declared_models(args)
    return Settings(**values)


def settings_table() -> str:
    """The documentation's settings table (docs/operations.md), made from the declarations."""
    rows = ["| flag | environment | default | what it sets |", "|---|---|---|---|"]
    for declared, how in declared_settings():
        flag = flag_of(declared) + (f" {how.metavar}" if how.metavar else "") + ("..." if _is_list(declared) else "")
        rows.append(f"| `{flag}` | `{env_name(declared)}` | {how.shown_default or _shown(declared.default)} | "
                    f"{how.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def _shown(default: Any) -> str:
    if default in (None, ()):
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float):
        return f"`{default:g}`"
    return f"`{default}`"
