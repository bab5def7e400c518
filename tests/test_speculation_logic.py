"""Speculative decoding's logic on fakes: drafts, their length, the generation loop's use of the
tokens a step verified, and the acceptance rule's distribution.

That the swarm really rolls back, and that greedy output is the same token for token, is
proven on the real swarm (``test_rollback.py``, ``test_speculative_swarm.py``).
"""

import collections
import itertools
import json

import torch

from sessions.engine.speculation import PREDICTION, PROMPT_LOOKUP, DraftLength, GenerationSpeculation, NgramIndex
from sessions.engine.token_chooser import TokenChooser
from sessions.requests import GenerationRequest, SamplingParams
from tests.fakes import CharTokenizer, FakeTokenStream
from tests.test_session_logic import collect, executor, make_session  # noqa: F401  (a fixture)


def ids(text: str) -> list:
    return [ord(char) for char in text]


def test_the_longest_ngram_found_gives_the_tokens_that_followed_it():
    index = NgramIndex((3, 2))
    index.extend_to(ids("the cat sat; the dog sat; the c"))
    assert index.follow(ids("xx the c"), 4) == (5, tuple(ids("at s")))  # "e c" then "at s", at its only place
    assert index.follow(ids("e d"), 3)[1] == tuple(ids("og "))
    assert index.follow(ids("zq"), 3) == (0, ())
    index.extend_to(ids("something else entirely"))  # not a continuation: the index starts over
    assert index.follow(ids("the c"), 2) == (0, ())


def test_drafts_come_from_the_prediction_first_then_the_conversation_within_the_room():
    room = [100]
    speculation = GenerationSpeculation(8, lambda new_tokens: room[0] - new_tokens, ids("def add(a, b): return a + b"))
    draft = speculation.propose(ids("please: def add(a"), 0)
    assert draft.source == PREDICTION and draft.tokens == tuple(ids(", b)"))  # 4 tokens: the first length
    speculation.observe(draft, 4)  # all taken: the next draft may be twice as long
    draft = speculation.propose(ids("please: def add(a, b)"), 0)
    assert draft.tokens == tuple(ids(": return")) and len(draft.tokens) == 8
    speculation.observe(draft, 8)
    conversation = ids("roses are red; violets are blue; roses are")
    assert speculation.propose(conversation, 0).source == PROMPT_LOOKUP
    # What followed its latest place, as long as the draft length (at its most, 8).
    assert speculation.propose(conversation, 0).tokens == tuple(ids(" blue; r"))
    room[0] = 3  # the step may choose 3 tokens: a draft of 2 and the model's own
    assert speculation.propose(conversation, 0).tokens == tuple(ids(" b"))
    assert speculation.propose(conversation, 3).tokens == ()  # the new input takes the room


def test_the_draft_length_follows_the_acceptance_and_pauses_when_drafts_keep_failing():
    length = DraftLength(16)
    assert length.next() == 4
    length.observe(4, 4)
    assert length.next() == 8
    length.observe(8, 2)  # cut short: as long as what was taken, plus one
    assert length.next() == 3
    # On a slow CPU: a step takes 50 ms, and each drafted token adds 20 ms (0.4 of a step).
    length.observe_time(0, 0.05)
    length.observe_time(3, 0.11)
    for _ in range(4):  # four misses in a row while drafts do not pay: one token at a time, then
        length.observe(1, 0)  # no draft for 2 steps, then 4, ...
    assert not length.pays()
    assert [length.next() for _ in range(3)] == [0, 0, 1]
    for _ in range(4):
        length.observe(1, 0)
    assert [length.next() for _ in range(5)] == [0, 0, 0, 0, 1]
    length.observe(1, 1)  # a draft taken whole ends the pauses
    assert length.next() == 2


def test_on_a_network_misses_cost_little_and_drafting_goes_on():
    length = DraftLength(16)
    length.observe_time(0, 0.2)  # a step is mostly its trips: 200 ms, a drafted token adds 1 ms
    length.observe_time(4, 0.204)
    length.observe(4, 1)
    for _ in range(8):
        length.observe(1, 0)
    assert length.pays() and [length.next() for _ in range(3)] == [1, 1, 1]


async def test_verified_drafts_give_the_same_text_in_fewer_steps(executor):  # noqa: F811
    text = "abcabcabcabcabcabc"
    plain_stream, fast_stream = FakeTokenStream(text), FakeTokenStream(text)
    request = GenerationRequest(inputs="abc", max_new_tokens=15)
    plain = await collect(make_session(executor, plain_stream).generate(request))
    fast_session = make_session(executor, fast_stream, draft_tokens=8)
    fast = await collect(fast_session.generate(request))
    assert [update.outputs for update in fast] == [update.outputs for update in plain] == [text[:15]]
    assert fast[-1].token_count == 15 and any(fast_stream.drafts)
    steps = fast_session.metrics.steps.labels("fake/model", "ok")._value.get()
    assert steps < 15 / 2  # most tokens came with a draft
    # The conversation ends where the plain one does: 14 tokens fed, the 15th pending.
    assert (fast_stream.fed, fast_stream.pending) == (plain_stream.fed, plain_stream.pending)
    drafted = fast_session.metrics.drafted_tokens.labels("fake/model", PROMPT_LOOKUP)._value.get()
    assert drafted >= 10 and fast[-1].prediction_tokens.accepted == 0


async def test_tokens_a_step_chose_past_a_stop_are_given_back(executor):  # noqa: F811
    text = "abcab.abcabcabc"
    stream = FakeTokenStream(text)
    session = make_session(executor, stream, draft_tokens=8)
    updates = await collect(session.generate(GenerationRequest(inputs="abcabcab.abcabc", max_new_tokens=1,
                                                              stop_sequence=".")))
    assert "".join(update.outputs for update in updates) == "abcab."
    assert updates[-1].finish_reason == "stop" and updates[-1].stopped_by_sequence
    # A draft ran past the stop; the conversation still ends at it, "." pending as after plain decoding.
    assert max(map(len, stream.drafts)) > 1
    assert stream.fed == ids("abcabcab.abcabc" + "abcab") and stream.pending == ord(".")
    again = await collect(session.generate(GenerationRequest(max_new_tokens=3)))
    assert again[-1].outputs == "abc"  # the model goes on after the stop, as it would have


async def test_a_prediction_s_accepted_and_rejected_tokens_are_counted(executor):  # noqa: F811
    stream = FakeTokenStream("The sky is blue today.")
    session = make_session(executor, stream, draft_tokens=8)
    updates = await collect(session.generate(GenerationRequest(inputs="Q", max_new_tokens=22,
                                                              prediction="The sky is grey today.")))
    assert updates[-1].outputs == "The sky is blue today."
    counts = updates[-1].prediction_tokens
    assert counts.accepted >= 10 and counts.rejected >= 1
    # Turned off by the request: no draft at all, the same text.
    stream = FakeTokenStream("The sky is blue today.")
    session = make_session(executor, stream, draft_tokens=8)
    updates = await collect(session.generate(GenerationRequest(inputs="Q", max_new_tokens=22, speculative=False,
                                                              prediction="The sky is grey today.")))
    assert updates[-1].outputs == "The sky is blue today." and not stream.drafts
    assert updates[-1].prediction_tokens is None


# --- The acceptance rule keeps the distribution -------------------------------------------------------------

VOCABULARY = 3
LENGTH = 3  # tokens per sample: 27 sequences
SAMPLES = 12_000
# chi-squared with 26 degrees of freedom: exceeded with probability 0.001 under the right distribution
CHI2_CRITICAL = 54.05


def bigram_logits(previous: int) -> torch.Tensor:
    """A fixed little model: the next token's logits given the previous one."""
    table = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.5, 0.3], [-0.5, 0.2, 1.0], [0.4, 0.0, 0.9]])
    return table[previous][None]


def exact_distribution(sampling: SamplingParams) -> dict:
    """Each sequence's probability under the model with ``sampling`` (temperature only)."""
    probabilities = {}
    for sequence in itertools.product(range(VOCABULARY), repeat=LENGTH):
        probability, previous = 1.0, VOCABULARY  # the start token is the table's last row
        for token in sequence:
            probability *= float(torch.softmax(bigram_logits(previous) / sampling.temperature, -1)[0, token])
            previous = token
        probabilities[sequence] = probability
    return probabilities


def sample(sampling: SamplingParams, draft_for, seed: int, accept_all: bool = False) -> tuple:
    """One sequence, each token chosen with a guess ``draft_for(position, previous)`` (or none)."""
    chooser = TokenChooser(sampling.__class__(**{**sampling.__dict__, "seed": seed}), CharTokenizer(), VOCABULARY)
    tokens, previous = [], VOCABULARY
    for position in range(LENGTH):
        guess = draft_for(position, previous)
        token = guess if accept_all and guess is not None else chooser.choose(
            torch.tensor([tokens]), bigram_logits(previous), draft=guess)
        tokens.append(token)
        previous = token
    return tuple(tokens)


def chi_squared(counts: collections.Counter, expected: dict) -> float:
    return sum((counts[sequence] - SAMPLES * p) ** 2 / (SAMPLES * p) for sequence, p in expected.items())


def test_sampling_with_drafts_keeps_the_output_distribution():
    sampling = SamplingParams(do_sample=True, temperature=0.8)
    expected = exact_distribution(sampling)
    drafts = {  # guesses of every kind: the likeliest, an unlikely one, one that depends on the past
        "likely": lambda position, previous: 0,
        "unlikely": lambda position, previous: 2 if position != 1 else None,
        "echo": lambda position, previous: previous % VOCABULARY,
    }
    for name, draft_for in drafts.items():
        counts = collections.Counter(sample(sampling, draft_for, seed) for seed in range(SAMPLES))
        assert chi_squared(counts, expected) < CHI2_CRITICAL, name
    # The test would see a rule that trusted the guesses.
    counts = collections.Counter(sample(sampling, drafts["likely"], seed, accept_all=(seed % 4 == 0))
                                 for seed in range(SAMPLES))
    assert chi_squared(counts, expected) > CHI2_CRITICAL


def test_greedy_choice_with_a_draft_is_the_likeliest_token_whatever_the_guess():
    chooser = TokenChooser(SamplingParams(), CharTokenizer(), VOCABULARY)
    assert [chooser.choose(torch.tensor([[]]), bigram_logits(1), draft=guess) for guess in (None, 0, 1, 2)] == [1] * 4


async def test_tokens_a_constraint_allows_alone_are_chosen_whatever_the_logits(default_model_dir):
    from transformers import AutoTokenizer

    from sessions.engine.grammar import GrammarCompiler

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    schema = {"type": "object", "properties": {"temperature_in_celsius": {"type": "integer"}},
              "required": ["temperature_in_celsius"], "additionalProperties": False}
    sampling = SamplingParams(do_sample=True, temperature=1.5, seed=7, json_schema=json.dumps(schema))
    chooser = TokenChooser(sampling, tokenizer, len(tokenizer), await GrammarCompiler().compile(tokenizer, sampling))
    generator = torch.Generator().manual_seed(0)
    written, certain_seen = [], 0
    for _ in range(3):  # the opening brace and the key's first tokens, one at a time
        forced, certain = chooser.forced_tokens(), chooser.forced_tokens(certain_only=True)
        assert certain == forced[:len(certain)]
        assert chooser.forced_tokens(certain_only=True) == certain  # looking ahead left the constraint as it was
        certain_seen += len(certain)
        for token in certain:  # random logits, sampled: the certain tokens come all the same
            assert chooser.choose(torch.tensor([written]), torch.randn(1, len(tokenizer), generator=generator),
                                  draft=token) == token
            written.append(token)
        if not certain:
            written.append(chooser.choose(torch.tensor([written]), torch.randn(1, len(tokenizer), generator=generator)))
    assert certain_seen >= 3 and tokenizer.decode(written).startswith('{"temperature_in_celsius":')
