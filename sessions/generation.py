"""The generation loop: one ``generate`` request run step by step in a chat session.

It feeds the new input, steps the session's token stream one token at a time, turns tokens
into text, watches for stop sequences, end of sequence and length limits, and yields the
replies the request asked for (one per ``max_new_tokens`` tokens, or one per chunk until a
stop when streaming). While a streamed reply is on its way to the client, the next step
already runs; if the generation is stopped meanwhile, that step's token is kept unsent: it
opens the next generation if the model just goes on, and is dropped if new input comes.
"""

from typing import TYPE_CHECKING, AsyncIterator, Optional

from sessions.admission import Admission
from sessions.errors import InvalidRequest, MaxLengthExceeded
from sessions.requests import GenerationRequest, GenerationUpdate
from sessions.stops import StopStringFilter

if TYPE_CHECKING:
    from sessions.session import ChatSession, StartedStep


async def run_generation(session: "ChatSession", request: GenerationRequest,
                         ticket: int) -> AsyncIterator[GenerationUpdate]:
    """Runs one generation in ``session`` (whose turn it is); the last reply has ``stop=True``."""
    if session.stopped(ticket):
        yield GenerationUpdate(outputs="", stop=True, token_count=0, finish_reason="cancelled")
        return
    stop_token_id = await _stop_token_id(session, request)
    if request.input_ids is not None:
        input_ids = list(request.input_ids)
    elif request.inputs:
        Admission.check_text_length(request.inputs, session.max_length, session.model.max_token_chars)
        input_ids = await session.encode(request.inputs)
    else:
        input_ids = []
    # A token a stopped generation chose ahead of need, never sent: the next token if the model
    # just goes on, but new input follows the token before it.
    carried, session.carried_token = session.carried_token, None
    if carried is not None and input_ids:
        session.stream.discard_pending()
        carried = None
    if not input_ids and session.stream.pending is None:
        raise InvalidRequest("inputs are required to start a session")
    total_limit = min(session.max_length, request.max_length or session.max_length)
    needed = session.length_with(input_ids)
    if needed > session.max_length or (input_ids and request.max_length is not None and needed + 1 > total_limit):
        # Refused before anything is fed: the session and its decoder stay as they were.
        raise MaxLengthExceeded(f"Maximum length exceeded: prefix {session.stream.position} + current "
                                f"{needed - session.stream.position} leaves no room for a new token within "
                                f"the maximum {total_limit}")
    stops = StopStringFilter(request.stop_sequences)
    session.stream.route.reset()
    eos_token_id = session.model.eos_token_id
    session.decoder.add_context(input_ids)
    ahead: Optional[StartedStep] = None  # the next step, started while a reply is on its way
    while True:
        chunk_tokens, chunk_text, finish_reason, chunk_logprobs = 0, "", None, []
        while request.max_new_tokens is None or chunk_tokens < request.max_new_tokens:
            if session.stopped(ticket):
                if ahead is not None:  # its token was chosen for a continuation that has not come
                    session.carried_token = await session.finish_step(ahead)
                    ahead = None
                finish_reason = "cancelled"
                break
            if carried is not None:
                token, carried = carried, None
            else:
                if request.max_length is not None and session.length_with(input_ids) + 1 > total_limit:
                    finish_reason = "length"  # the client's max_length is reached
                    break
                step, ahead = ahead or session.start_step(input_ids, request.sampling), None
                token = await session.finish_step(step)
                if request.sampling.logprobs is not None:  # no other step runs until this one is read
                    chunk_logprobs.append(session.stream.last_logprobs)
            input_ids = []
            chunk_tokens += 1
            chunk_text += session.decoder.push([token])
            if token == eos_token_id:
                finish_reason = "stop"
                break
        visible = stops.push(chunk_text)
        if stops.matched:
            if stop_token_id is not None and stops.matched_stop != request.stop_sequence:
                # The next turn must follow the stop token, as if the model had written it.
                session.stream.replace_pending(stop_token_id)
            if finish_reason != "cancelled":
                finish_reason = "stop"
        elif finish_reason is None and not request.streaming:
            finish_reason = "length"  # the one reply has its max_new_tokens
        if finish_reason is not None:
            visible += stops.flush()
        elif _room_for_a_step(session, request, total_limit):
            # The swarm works on the next token while this reply travels to the client.
            ahead = session.start_step([], request.sampling)
        yield GenerationUpdate(outputs=chunk_text, stop=finish_reason is not None, token_count=chunk_tokens,
                               finish_reason=finish_reason, text=visible, stopped_by_sequence=stops.matched,
                               logprobs=tuple(chunk_logprobs),
                               route=session.stream.route.summary() if finish_reason and request.trace_route else None)
        if finish_reason is not None:
            return


def _room_for_a_step(session: "ChatSession", request: GenerationRequest, total_limit: int) -> bool:
    """Whether the session and the request's ``max_length`` allow another step."""
    if request.max_length is not None and session.length_with([]) + 1 > total_limit:
        return False
    return session.length_with([]) <= session.max_length


async def _stop_token_id(session: "ChatSession", request: GenerationRequest) -> Optional[int]:
    """The single token of ``stop_sequence``, required when extra stop sequences are given."""
    if not request.extra_stop_sequences or request.stop_sequence is None:
        return None
    ids = await session.encode(request.stop_sequence)
    if len(ids) != 1:
        raise InvalidRequest("extra_stop_sequences need a stop_sequence that is exactly one token "
                             f"({request.stop_sequence!r} is {len(ids)} tokens)")
    return ids[0]
