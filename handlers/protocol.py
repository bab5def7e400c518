"""The wire protocol's requests: JSON messages and form fields parsed into typed requests.

Parsing checks every field's type and range and raises ``BadRequest`` with a message that
names the field; nothing here touches a model or a session (nor imports torch or petals).
"""

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from handlers.native_replies import RequestId
from sessions import request_rules as rules
from sessions.errors import BadRequest
from sessions.request_rules import Bounds
from sessions.requests import GenerationRequest, SamplingParams


@dataclass(frozen=True)
class OpenSessionMessage:
    """``{"type": "open_inference_session", "model": ..., "max_length": ...}``"""

    model: Optional[str]
    max_length: int
    resumable: bool = False  # the session may outlive its connection (the reply carries a resume token)
    queue_updates: bool = False  # on a full server, tell the client its place in line while it waits


@dataclass(frozen=True)
class ResumeSessionMessage:
    """``{"type": "resume_inference_session", "session_id": ..., "resume_token": ..., "last_seq": ...}``"""

    session_id: str
    resume_token: str
    last_seq: int  # the last reply the client received; later ones are sent again


@dataclass(frozen=True)
class GenerateMessage:
    """``{"type": "generate", ...}``"""

    request: GenerationRequest


@dataclass(frozen=True)
class CancelMessage:
    """``{"type": "stop"}``: end the running generation now."""


Message = Union[OpenSessionMessage, ResumeSessionMessage, GenerateMessage, CancelMessage]
MAX_INT_DIGITS = 18
# A request's id: short text, or an integer a JavaScript client reads back exactly (2^53 - 1).
MAX_REQUEST_ID_CHARS = 128
MAX_EXACT_JSON_INTEGER = 2 ** 53 - 1
# How much of a client's value an error message quotes.
SHOWN_CHARS = 80
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def shown(value: Any) -> str:
    """A client's value as an error message quotes it: cut short, since it may be huge."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"... ({len(text)} characters)"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Union[int, float]) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def optional_int(params: Mapping[str, Any], name: str, minimum: int = 1) -> Optional[int]:
    """An integer field (JSON number or decimal string), at least ``minimum``, or None if absent."""
    value = params.get(name)
    if value is None:
        return None
    digits = value.strip().removeprefix("-") if isinstance(value, str) else ""
    # Only ASCII decimal digits, and few of them: int() refuses thousands of digits, and
    # str.isdigit() accepts characters such as "²" that int() does not.
    if digits.isascii() and digits.isdecimal() and len(digits) <= MAX_INT_DIGITS:
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{name} must be an integer, got {shown(value)}")
    if value < minimum:
        raise BadRequest(f"{name} must be at least {minimum}, got {shown(value)}")
    return value


def optional_float(params: Mapping[str, Any], name: str, bounds: Bounds) -> Optional[float]:
    """A finite number field within ``bounds``, or None if absent."""
    given = value = params.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise BadRequest(f"{name} must be a number, got {shown(value)}") from None
    if not _is_number(value):
        raise BadRequest(f"{name} must be a number, got {shown(value)}")
    # float() reads "inf", "nan" and "1e999" (infinite), and JSON has Infinity, NaN and integers of
    # hundreds of digits: none of them is a setting.
    if not _is_finite(value):
        raise BadRequest(f"{name} must be a finite number, got {shown(given)}")
    if value not in bounds:
        raise BadRequest(f"{name} must be in {bounds}, got {shown(value)}")
    return float(value)


def optional_bool(params: Mapping[str, Any], name: str) -> Optional[bool]:
    """A flag given as true/false, 1/0, or their strings; None if absent."""
    value = params.get(name)
    if value is None or isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise BadRequest(f"{name} must be true/false or 1/0, got {shown(value)}")


def optional_str(params: Mapping[str, Any], name: str, allow_empty: bool = True) -> Optional[str]:
    """A string field, or None if absent."""
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise BadRequest(f"{name} must not be empty")
    return value


def optional_str_list(params: Mapping[str, Any], name: str) -> Tuple[str, ...]:
    """A list of non-empty strings (a single string counts as a list of one)."""
    value = params.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise BadRequest(f"{name} must be a list of non-empty strings")
    return tuple(value)


def generation_request(params: Mapping[str, Any], allow_stop_sequence: bool = True) -> GenerationRequest:
    """The generation parameters shared by the WebSocket and HTTP APIs."""
    max_length = optional_int(params, "max_length")
    max_new_tokens = optional_int(params, "max_new_tokens")
    if max_length is None and max_new_tokens is None:
        raise BadRequest("Either max_length or max_new_tokens is required")
    temperature = optional_float(params, "temperature", rules.TEMPERATURE)
    sampling = SamplingParams(
        do_sample=bool(optional_bool(params, "do_sample")),
        temperature=1.0 if temperature is None else temperature,  # 0: greedy
        top_k=rules.top_k_or_none(optional_int(params, "top_k", minimum=int(rules.TOP_K.low))),
        top_p=optional_float(params, "top_p", rules.TOP_P),
        repetition_penalty=optional_float(params, "repetition_penalty", rules.REPETITION_PENALTY),
    )
    stop_sequence = optional_str(params, "stop_sequence", allow_empty=False) if allow_stop_sequence else None
    extra_stop_sequences = optional_str_list(params, "extra_stop_sequences") if allow_stop_sequence else ()
    if extra_stop_sequences and stop_sequence is None:
        raise BadRequest("extra_stop_sequences need a stop_sequence")
    speculative = optional_bool(params, "speculative")
    return GenerationRequest(
        inputs=optional_str(params, "inputs"),
        prediction=optional_str(params, "prediction", allow_empty=False),
        speculative=True if speculative is None else speculative,
        visible_text=bool(optional_bool(params, "visible_text")) if allow_stop_sequence else False,
        trace_route=bool(optional_bool(params, "trace_route")),
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_sequence=stop_sequence,
        extra_stop_sequences=extra_stop_sequences,
    )


def decode_frame(raw: Union[str, bytes], max_chars: int) -> Dict[str, Any]:
    """One WebSocket message as a JSON object, checked for size before it is parsed."""
    if len(raw) > max_chars:
        raise BadRequest(f"Message too large: {len(raw)} characters, the limit is {max_chars}")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise BadRequest(f"Message is not valid JSON: {type(error).__name__}: {error}") from None
    if not isinstance(data, dict):
        raise BadRequest("Message must be a JSON object")
    return data


def request_id(data: Mapping[str, Any]) -> RequestId:
    """The message's ``id``, which its replies echo: a string of up to ``MAX_REQUEST_ID_CHARS``
    characters or an integer that JSON readers keep exact; None when absent."""
    value = data.get("id")
    if value is None or (isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_EXACT_JSON_INTEGER:
        return value
    raise BadRequest(f"id must be a string of at most {MAX_REQUEST_ID_CHARS} characters or an integer "
                     f"of at most {MAX_EXACT_JSON_INTEGER} in size, got {shown(value)}")


def parse_message(data: Mapping[str, Any]) -> Message:
    """One WebSocket message (``decode_frame``'s object) as a typed request."""
    kind = data.get("type")
    if kind == "open_inference_session":
        max_length = optional_int(data, "max_length")
        if max_length is None:
            raise BadRequest("max_length is required")
        return OpenSessionMessage(model=optional_str(data, "model", allow_empty=False), max_length=max_length,
                                  resumable=bool(optional_bool(data, "resumable")),
                                  queue_updates=bool(optional_bool(data, "queue_updates")))
    if kind == "resume_inference_session":
        session_id, token = optional_str(data, "session_id"), optional_str(data, "resume_token")
        if not session_id or not token:
            raise BadRequest("session_id and resume_token are required")
        last_seq = optional_int(data, "last_seq", minimum=0)
        return ResumeSessionMessage(session_id, token, 0 if last_seq is None else last_seq)
    if kind == "generate":
        request = generation_request(data)
        return GenerateMessage(request=replace(request, from_position=optional_int(data, "from_position")))
    if kind == "stop":
        return CancelMessage()
    raise BadRequest(f"Unknown message type {shown(kind)}; expected open_inference_session, "
                     "resume_inference_session, generate or stop")
