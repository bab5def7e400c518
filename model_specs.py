"""What a served model is: its name on the hub and in the swarm, where its weights are, its
chat settings and what the chat page shows of it; the embedded default model; and a model named
only by its source on the command line. ``config`` declares which models a server serves, from
flags or a models file (``models_file``)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Tuple

from swarm.prefix import dht_prefix_for

# The embedded default: a real chat model that ships inside a registry package (see swarm/default_model.py).
DEFAULT_MODEL_REPOSITORY = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_FOLDER = "SmolLM2-135M-Instruct"


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
