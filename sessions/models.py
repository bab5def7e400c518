"""Loading a model's client side: its tokenizer and a Petals distributed model.

The client keeps the embeddings and the language-model head on this machine; the
transformer blocks are run by the swarm.
"""

import functools
import logging
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from config import Settings
from model_specs import ModelSpec
from sessions.formats.chat_format import ChatFormat
from sessions.formats.chat_template import ChatTemplate, ChatTemplateError
from sessions.formats.tokenizer_files import load_tokenizer
from sessions.formats.tool_syntax import SERVER, ToolSyntax
from swarm.families import check_servable
from swarm.petals_api import AutoDistributedModelForCausalLM, RemoteExpertWorker

logger = logging.getLogger(__name__)

# petals retries a failed step forever by default; a client would wait forever for a lost route.
MAX_RETRIES = 3


@dataclass
class LoadedModel:
    """A served model: its declaration, its tokenizer and its Petals client."""

    spec: ModelSpec
    tokenizer: PreTrainedTokenizerBase
    client: Any  # a petals AutoDistributedModelForCausalLM

    @property
    def stop_token(self) -> str:
        """The text that ends the model's turn in a chat: the configured one, else its EOS token."""
        return self.spec.chat.stop_token or self.tokenizer.eos_token

    @functools.cached_property
    def chat_template(self) -> Optional[ChatTemplate]:
        """The tokenizer's chat template, compiled (None: it has none, or none that compiles)."""
        try:
            return ChatTemplate.for_tokenizer(self.tokenizer)
        except ChatTemplateError as error:
            logger.warning("The chat template of %s is not used (%s)", self.spec.key, error)
            return None

    @functools.cached_property
    def chat_format(self) -> ChatFormat:
        """How a conversation is written for this model (role markers, stop sequences)."""
        return ChatFormat.for_template(self.chat_template, self.spec.chat, self.stop_token, self.spec.key)

    @functools.cached_property
    def tool_template(self) -> Optional[ChatTemplate]:
        """The chat template when it describes tools and writes calls in a syntax the server knows:
        the OpenAI chat API then renders conversations through it. None: the model's chat format."""
        template = self.chat_template
        return template if template is not None and template.tool_syntax is not None else None

    @property
    def tool_syntax(self) -> ToolSyntax:
        """How this model writes a tool call: as its chat template does, else in the server's format."""
        return self.tool_template.tool_syntax if self.tool_template is not None else SERVER

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its vocabulary string bounds its text)."""
        return max(len(token) for token in self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer)))))

    @functools.cached_property
    def state_bytes_per_token(self) -> int:
        """Memory one token of a session takes on this machine per server span (its hidden state)."""
        return self.client.config.hidden_size * self.client.dtype.itemsize

    @property
    def eos_token_id(self) -> Optional[int]:
        """The token that ends a generation."""
        return self.tokenizer.eos_token_id

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, without special tokens (a session's BOS is the caller's choice)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def num_blocks(self) -> int:
        """How many transformer blocks the swarm serves for this model."""
        return len(self.client.transformer.h)

    @property
    def sequence_manager(self) -> Any:
        """The client's router: the model's block names, its DHT handle, its routing table."""
        return self.client.transformer.h.sequence_manager

    def close(self) -> None:
        """Stops the client's background routing thread, its p2p replica and its DHT process."""
        manager = self.sequence_manager
        manager.shutdown()
        if manager.state.p2p is not None:
            RemoteExpertWorker.run_coroutine(manager.state.p2p.shutdown())
            manager.state.p2p = None
        manager.dht.shutdown()


def within_context(spec: ModelSpec, context_length: Optional[int]) -> ModelSpec:
    """``spec`` with sessions no longer than the model's ``context_length`` (None: not known): past
    it a model was never trained, and writes nonsense."""
    if context_length is None or spec.chat.max_session_length <= context_length:
        return spec
    logger.warning("%s: sessions of %d tokens are declared, but the model's context is %d tokens; using %d",
                   spec.key, spec.chat.max_session_length, context_length, context_length)
    return replace(spec, chat=replace(spec.chat, max_session_length=context_length))


def load_model(spec: ModelSpec, initial_peers: Sequence[str], device: str, torch_dtype: str,
               settings: Settings = Settings()) -> LoadedModel:
    """Loads the tokenizer and connects the Petals client of ``spec`` (blocking: run it in the executor);
    ``UnsupportedModel`` for a model this server cannot serve correctly.

    A server silent for ``settings.request_timeout`` seconds counts as failed, and petals routes
    around it; the client refreshes its routing table every ``settings.routing_update_period``.
    """
    logger.info("Loading %s from %s (%s, %s)", spec.key, spec.weights, device, torch_dtype)
    check_servable(spec.weights)
    tokenizer = load_tokenizer(spec.weights)
    options = {"initial_peers": list(initial_peers), "torch_dtype": getattr(torch, torch_dtype),
               "max_retries": MAX_RETRIES, "request_timeout": settings.request_timeout,
               "update_period": settings.routing_update_period, "dht_prefix": spec.swarm_prefix}
    if spec.adapter is not None:
        options["active_adapter"] = spec.adapter
    client = AutoDistributedModelForCausalLM.from_pretrained(spec.weights, **options).to(device)
    client.eval()
    spec = within_context(spec, getattr(client.config, "context_length", None))
    loaded = LoadedModel(spec=spec, tokenizer=tokenizer, client=client)
    # Computed here, in the executor, rather than on first use on the event loop.
    loaded.max_token_chars  # noqa: B018
    loaded.chat_format  # noqa: B018
    loaded.tool_template  # noqa: B018
    loaded.state_bytes_per_token  # noqa: B018
    logger.info("Connected %s: %d blocks served by the swarm", spec.key, loaded.num_blocks)
    return loaded
