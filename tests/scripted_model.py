"""A tiny Llama whose weights are set by hand so that it plays one agent's turn: asked something,
it calls a shell tool with ``echo walnut``; once that call is in the conversation (with its
result), it answers ``Done``.

Random weights would not choose to call a tool under ``tool_choice: "auto"``, and an agent's client
does not ask for a call. This model does, by its logits alone; the server's grammar is what makes
its reply a valid call of one of the offered tools, as for any model. Every block's output and
MLP are zero but one attention head's, so a position's last hidden state is its own token's
embedding plus what that head found:

- dimension ``BIAS`` is 1 in every embedding: the lm-head turns it into a preference shared by
  every position (the end of the turn first, then the word ``echo``, the tool's name and its
  ``cmd`` argument, then a quote, then ``}`` over ``,``), which the grammar narrows to the tokens
  it allows there;
- a few tokens have a dimension of their own, so that the token that follows them is chosen: the
  generation prompt's last token opens a call, ``echo`` is followed by the cue word, and the cue
  by the string's closing quote;
- the head of the first block attends from every position to the cue word, when there is one
  before it, and writes that it saw it (``SEEN``): a conversation that already holds the call
  opens the reply with ``Done`` instead of a call, and the turn ends.

Rotary positions barely turn the head's query and key (a huge ``rope_theta``), so the cue is
found at any distance. Built in well under a second, the same every time.
"""

from pathlib import Path
from typing import Dict

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sessions.formats.tool_syntax import SERVER

HIDDEN = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
# Dimensions of the residual stream (the rest stay zero).
BIAS, AFTER_PROMPT, AFTER_COMMAND, AFTER_CUE, SEEN = range(5)
# The rotary pair of the head's query and key that turns slowest (index i pairs with i + HEAD_DIM / 2).
SLOW = HEAD_DIM // 2 - 1
QK_GAIN = 3.0  # the cue's attention score is then some 60, every other token's 0: it outweighs them all
CUE_WORD = " walnut"  # one token, and a word no agent's instructions hold


def _token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 1, text
    return ids[0]


def script_tokens(tokenizer, opening: str, tool: str, argument: str) -> Dict[str, int]:
    """The ids of the tokens the script writes, in ``tokenizer``'s vocabulary."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    cue = tokenizer(CUE_WORD, add_special_tokens=False)["input_ids"]
    assert len(cue) == 1, "the cue word must be one token"
    return {"prompt_end": tokenizer(prompt, add_special_tokens=False)["input_ids"][-1],
            "opening": _token(tokenizer, opening), "tool": _token(tokenizer, tool),
            "argument": _token(tokenizer, argument), "command": _token(tokenizer, "echo"), "cue": cue[0],
            "quote": _token(tokenizer, '"'), "spaced_quote": _token(tokenizer, ' "'),
            "close": _token(tokenizer, "}"), "answer": _token(tokenizer, "Done"), "end": tokenizer.eos_token_id}


def make_scripted_llama(path: Path, tokenizer_dir: Path, opening: str = SERVER.opening, tool: str = "exec_command",
                        argument: str = "cmd", max_positions: int = 8192) -> Path:
    """The model, saved with ``tokenizer_dir``'s tokenizer: it calls ``tool`` (its first token is
    enough among the offered tools) with ``{argument: "echo walnut"}``, written after ``opening``
    (the first token of a call in the model's tool syntax), then answers ``Done``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = script_tokens(tokenizer, opening, tool, argument)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, max_position_embeddings=max_positions,
        rope_theta=1e9, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in [model.model.norm] + [module for layer in model.model.layers
                                          for module in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight.fill_(1.0)

        embedding = model.model.embed_tokens.weight
        embedding[:, BIAS] = 1.0
        embedding[ids["prompt_end"], AFTER_PROMPT] = 1.0
        embedding[ids["command"], AFTER_COMMAND] = 1.0
        embedding[ids["cue"], AFTER_CUE] = 1.0

        # Head 0 of block 0: query from BIAS, key and value from the cue's own dimension, out to SEEN.
        attention = model.model.layers[0].self_attn
        attention.q_proj.weight[SLOW, BIAS] = QK_GAIN
        attention.k_proj.weight[SLOW, AFTER_CUE] = QK_GAIN
        attention.v_proj.weight[0, AFTER_CUE] = 1.0
        # The value read from the normalized cue token is about 8 / sqrt(2): scaled back to about 1.
        attention.o_proj.weight[SEEN, 0] = 2 ** 0.5 / 8

        head = model.lm_head.weight  # logits = head @ the normalized last hidden state
        head[ids["end"], BIAS] = 12.0
        head[ids["tool"], BIAS] = 10.0
        head[ids["argument"], BIAS] = 10.0
        head[ids["command"], BIAS] = 11.0  # inside a string, above the names
        head[ids["quote"], BIAS] = 5.0  # after a key's colon ' "' rather than ' ', then "echo" in the string
        head[ids["spaced_quote"], BIAS] = 5.0
        head[ids["close"], BIAS] = 3.0
        head[ids["opening"], AFTER_PROMPT] = 20.0
        head[ids["opening"], SEEN] = -40.0
        head[ids["answer"], AFTER_PROMPT] = 20.0  # only after the prompt and once the call was seen: 15
        head[ids["answer"], SEEN] = 20.0
        head[ids["answer"], BIAS] = -25.0
        head[ids["cue"], AFTER_COMMAND] = 30.0
        head[ids["quote"], AFTER_CUE] = 30.0
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
