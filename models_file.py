"""The models file (``--models-file``): the models to serve declared in TOML, checked key by key.

Each ``[[models]]`` table declares one model (see ``models.example.toml``). Every mistake is
refused with one line naming the file, the entry and the key, before anything starts.
"""

import tomllib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

from model_specs import ChatSettings, FrontendSettings, ModelSpec, is_gguf
from sessions import request_rules
from sessions.request_rules import Bounds


class ModelsFileError(ValueError):
    """A models file that cannot be read as declared; the message names the file, the entry and the key."""


class _Problem(ValueError):
    """What is wrong with one key's value (the caller adds the file and the entry)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")


def _text(key: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _Problem(key, f"must be a string, not {_toml_type(value)}")
    if not allow_empty and not value.strip():
        raise _Problem(key, "must not be empty")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Problem(key, f"must be true or false, not {_toml_type(value)}")
    return value


def _count(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Problem(key, f"must be an integer, not {_toml_type(value)}")
    if value < 1:
        raise _Problem(key, f"must be at least 1, not {value}")
    return value


def _number(key: str, value: Any, bounds: Bounds) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Problem(key, f"must be a number, not {_toml_type(value)}")
    if value not in bounds:
        raise _Problem(key, f"must be in {bounds}, not {value}")
    return value


def _texts(key: str, value: Any) -> Tuple[str, ...]:
    if not isinstance(value, list):
        raise _Problem(key, f"must be a list of strings, not {_toml_type(value)}")
    return tuple(_text(f"{key}[{index}]", item) for index, item in enumerate(value))


def _dht_prefix(key: str, value: Any) -> str:
    prefix = _text(key, value)
    if "." in prefix or any(character.isspace() for character in prefix):
        raise _Problem(key, f"{prefix!r} must hold no dot (it separates a prefix from a block's number) "
                            "and no space")
    return prefix


def _table(key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _Problem(key, f"must be a table, not {_toml_type(value)}")
    return value


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
             dict: "a table"}
    return names.get(type(value), type(value).__name__)


# What the chat page reads from ``generation_params``, checked by the rules every API follows.
GENERATION_PARAMS: Dict[str, Callable[[str, Any], object]] = {
    "do_sample": _flag,
    "temperature": lambda key, value: _number(key, value, request_rules.TEMPERATURE),
    "top_p": lambda key, value: _number(key, value, request_rules.TOP_P),
}


def _generation_params(key: str, value: Any) -> Dict[str, object]:
    params = _table(key, value)
    _refuse_unknown(params, GENERATION_PARAMS, key + ".")
    return {name: GENERATION_PARAMS[name](f"{key}.{name}", item) for name, item in params.items()}


CHAT_KEYS: Dict[str, Callable[[str, Any], object]] = {
    "sep_token": lambda key, value: _text(key, value, allow_empty=True),
    "stop_token": _text,
    "extra_stop_sequences": _texts,
    "generation_params": _generation_params,
}


def _chat(key: str, value: Any) -> Dict[str, object]:
    chat = _table(key, value)
    if "max_session_length" in chat:
        raise _Problem(f"{key}.max_session_length", "belongs to the model's own table (the context length is "
                                                    "declared next to max_new_tokens_limit)")
    _refuse_unknown(chat, CHAT_KEYS, key + ".")
    return {name: CHAT_KEYS[name](f"{key}.{name}", item) for name, item in chat.items()}


# Every key of a [[models]] table, and how its value is checked (``path`` is checked apart).
ENTRY_KEYS: Dict[str, Callable[[str, Any], object]] = {
    "repository": _text,
    "path": _text,
    "dht_prefix": _dht_prefix,
    "adapter": _text,
    "aliases": _texts,
    "family": _text,
    "name": _text,
    "model_card": lambda key, value: _text(key, value, allow_empty=True),
    "license": lambda key, value: _text(key, value, allow_empty=True),
    "public_api": _flag,
    "max_new_tokens_limit": _count,
    "default_max_tokens": _count,
    "max_session_length": _count,
    "chat": _chat,
}


def _refuse_unknown(table: Mapping[str, Any], known: Mapping[str, Any], prefix: str = "") -> None:
    for key in table:
        if key not in known:
            raise _Problem(f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(known))})")


def _weights_path(value: str, base: Path) -> Path:
    """The entry's ``path``, relative to the models file's folder, that must be a folder or a GGUF file."""
    path = (base / Path(value).expanduser()).resolve()
    if path.is_dir() or (path.is_file() and is_gguf(path)):
        return path
    if path.is_file():
        raise _Problem("path", f"{path} is neither a folder nor a .gguf file")
    raise _Problem("path", f"{path} does not exist")


def _spec(entry: Mapping[str, Any], base: Path) -> ModelSpec:
    """The model one entry declares (its values checked)."""
    _refuse_unknown(entry, ENTRY_KEYS)
    values = {key: ENTRY_KEYS[key](key, value) for key, value in entry.items()}
    if "repository" not in values and "path" not in values:
        raise _Problem("repository", "missing: an entry names a hub repository, a local path, or both")
    path = _weights_path(values["path"], base) if "path" in values else None
    repository = values.get("repository") or (path.stem if is_gguf(path) else path.name)
    chat = values.get("chat", {})
    return ModelSpec(
        repository=repository,
        path=path,
        family=values.get("family") or (repository.split("/")[0] if "/" in repository else repository),
        frontend=FrontendSettings(name=values.get("name") or repository.split("/")[-1],
                                  model_card=values.get("model_card", ""), license=values.get("license", "")),
        chat=ChatSettings(
            max_session_length=values.get("max_session_length", ChatSettings.max_session_length),
            sep_token=chat.get("sep_token", ChatSettings.sep_token),
            stop_token=chat.get("stop_token"),
            extra_stop_sequences=chat.get("extra_stop_sequences", ()),
            generation_params=chat.get("generation_params", {}),
        ),
        dht_prefix=values.get("dht_prefix"),
        adapter=values.get("adapter"),
        aliases=values.get("aliases", ()),
        public_api=values.get("public_api", ModelSpec.public_api),
        max_new_tokens_limit=values.get("max_new_tokens_limit", ModelSpec.max_new_tokens_limit),
        default_max_tokens=values.get("default_max_tokens", ModelSpec.default_max_tokens),
    )


def _label(entry: Mapping[str, Any]) -> str:
    """How an entry is named in an error after its number: its repository or path, when readable."""
    names = [entry.get(key) for key in ("repository", "path")]
    return next((f" ({name})" for name in names if isinstance(name, str) and name.strip()), "")


def _check_unique_names(file: Path, entries: Sequence[Mapping[str, Any]], specs: Sequence[ModelSpec]) -> None:
    """Refuses a name (a model's key or an alias) that selects two models, or is given twice."""
    seen: Dict[str, int] = {}
    for number, (entry, spec) in enumerate(zip(entries, specs), start=1):
        for name in spec.names():
            if name in seen:
                key = "aliases" if name in spec.aliases else next(
                    key for key in ("adapter", "repository", "path") if key in entry)
                clash = ("is given twice in this entry" if seen[name] == number
                         else f"already names entry {seen[name]}{_label(entries[seen[name] - 1])}")
                raise ModelsFileError(f"{file}: [[models]] entry {number}{_label(entry)}: {key}: {name!r} {clash}")
            seen[name] = number


def read_models_file(file: Path) -> Tuple[ModelSpec, ...]:
    """The models ``file`` declares, in its order; ``ModelsFileError`` naming the file, the entry
    and the key for anything it does not declare right. Relative paths are the file's folder's."""
    try:
        document = tomllib.loads(Path(file).read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelsFileError(f"{file}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ModelsFileError(f"{file}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ModelsFileError(f"{file}: not valid TOML: {error}") from None
    for key in document:
        if key != "models":
            raise ModelsFileError(f"{file}: unknown top-level key {key!r} (each model is a [[models]] table)")
    entries = document.get("models")
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ModelsFileError(f"{file}: declares no model; declare each one in a [[models]] table")
    base = Path(file).resolve().parent
    specs: List[ModelSpec] = []
    for number, entry in enumerate(entries, start=1):
        try:
            specs.append(_spec(entry, base))
        except _Problem as problem:
            raise ModelsFileError(f"{file}: [[models]] entry {number}{_label(entry)}: {problem}") from None
    _check_unique_names(file, entries, specs)
    return tuple(specs)

