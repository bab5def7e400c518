"""The OpenAI-compatible API through a client none of us wrote: langchain-openai's ChatOpenAI."""

import json

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.helpers import wait_for_no_sessions

DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France? Answer in one sentence."


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny in {city}"


@pytest.fixture
def chat(ws_port):
    return ChatOpenAI(base_url=f"http://127.0.0.1:{ws_port}/v1", api_key="unused", model=DEFAULT, temperature=0,
                      max_tokens=32, max_retries=0)


async def test_invoke_and_stream_agree(chat, manager):
    reply = await chat.ainvoke(QUESTION)
    assert "Paris" in reply.content
    streamed = "".join([chunk.content async for chunk in chat.astream(QUESTION)])
    assert streamed == reply.content
    await wait_for_no_sessions(manager)


async def test_structured_output_on_a_pydantic_model(chat):
    city = await chat.with_structured_output(City, method="json_schema").ainvoke(
        "Name the capital of France and its country.")
    assert isinstance(city, City) and city.name and city.country


async def test_a_tool_call_round_trip(chat):
    with_tools = chat.bind_tools([get_weather], tool_choice="required")
    question = HumanMessage("What is the weather in Paris?")
    asked = await with_tools.ainvoke([question])
    assert asked.tool_calls, (asked.content, asked.response_metadata)
    [call] = asked.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = await chat.bind_tools([get_weather], tool_choice="none").ainvoke([question, asked, result])
    assert answer.content and not answer.tool_calls
    assert json.dumps(call["args"])  # the arguments came back as parsed JSON
