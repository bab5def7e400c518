"""A tool call read as it is written (``CallStreamer``): its name once known, then its arguments'
text piece by piece, joining to the call's arguments, in every tool syntax and any cut of the text."""

import json

import pytest

from sessions.formats.tool_syntax import HERMES, LLAMA_JSON, SERVER

ARGUMENTS = {"city": "Par}is </tool_call>", "days": [1, {"unit": "C"}], "note": "é\"\\"}
SYNTAXES = [SERVER, HERMES, LLAMA_JSON]


def stream(syntax, text: str, piece: int):
    """The names told and the argument text told, for ``text`` pushed ``piece`` characters at a time."""
    streamer = syntax.streamer()
    names, arguments, told_before_end = [], "", []
    for start in range(0, len(text), piece):
        delta = streamer.push(text[start:start + piece])
        names += [delta.name] if delta.name else []
        arguments += delta.arguments
        told_before_end.append(arguments)
    call, rest = streamer.finish()
    names += [rest.name] if rest.name else []
    return call, names, arguments + rest.arguments, told_before_end


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda syntax: syntax.name)
@pytest.mark.parametrize("piece", [1, 2, 5, 1000])
def test_the_name_comes_once_then_arguments_that_join_to_the_calls(syntax, piece):
    text = syntax.write("get_weather", ARGUMENTS)
    call, names, arguments, told = stream(syntax, text, piece)
    assert names == ["get_weather"]
    assert json.loads(arguments) == ARGUMENTS == call.arguments
    assert arguments == json.dumps(ARGUMENTS, ensure_ascii=False)  # exactly as written
    if piece == 1:  # told as it is written: all of the arguments are out before the call's last character
        assert told[-2].startswith(arguments[:-1])


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda syntax: syntax.name)
def test_a_call_cut_short_tells_what_was_written_and_is_no_call(syntax):
    text = syntax.write("get_weather", ARGUMENTS)[:len(syntax.opening) + 60]
    call, names, arguments, _ = stream(syntax, text, 3)
    assert call is None and names == ["get_weather"]
    assert text.endswith(arguments) and arguments.startswith('{"city": ')


def test_text_that_never_names_a_function_tells_nothing():
    call, names, arguments, _ = stream(SERVER, "<tool_call>{\"nam", 2)
    assert (call, names, arguments) == (None, [], "")


def test_a_call_written_in_another_key_order_is_told_whole_at_the_end():
    text = SERVER.opening + json.dumps({"arguments": {"a": 1}, "name": "f"}) + SERVER.closing
    call, names, arguments, told = stream(SERVER, text, 4)
    assert names == ["f"] and json.loads(arguments) == {"a": 1} and told[-1] == ""
