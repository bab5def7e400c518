"""A GGUF file whose tokenizer is SentencePiece BPE (``tokenizer.ggml.model`` "llama", as llama.cpp writes
Llama 2's and Mistral 7B's) converts into a fast tokenizer that encodes text as SentencePiece itself and
as transformers' own conversion of the same model do, and decodes it back; what cannot be mapped is
refused.

The SentencePiece models are trained here on a small corpus with Llama 2's options (no normalization,
a space prepended, digits split, bytes for characters outside the vocabulary).
"""

import json
from pathlib import Path

import pytest
import sentencepiece
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast
from transformers.convert_slow_tokenizer import import_protobuf

from swarm.convert_gguf import convert_gguf
from tests.gguf_writer import write_sentencepiece_gguf

# Larger than the trained vocabularies: the file pads the rest with unused pieces, as llama.cpp does.
MODEL_VOCAB_SIZE = 640
TRAINED_VOCAB_SIZE = 600
CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A swarm of small machines serves one large language model, each holding a few of its blocks.
Tokenizers cut text into pieces; each piece has an id, and the model reads the ids.
She said: "I don't think they'll come today, but we're ready if they do."
In 2024 the price rose from 3.50 to 4.75, an increase of 35 percent over 12 months.
def main():
    return sum(values) / len(values)  # the mean
Our café serves crème brûlée, and the naïve visitor orders it twice.
Numbers like 10, 200, 3000 and 45678 are split into single digits before merging.
Spaces matter:  two spaces,   three spaces, and a tab\tbetween words.
The weather today is cloudy with a chance of rain in the evening and wind from the north.
Reading, writing and arithmetic are taught in every school of the country.
Models are converted once at start-up and reused until the file changes.
"""
# Control tokens besides BOS and EOS, as Mistral 7B v0.3's.
CONTROL_TOKENS = ["[INST]", "[/INST]"]
SAMPLE_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " a leading space",
    "   three leading spaces, two  inside and trailing ones  ",
    "line one\nline two\n\n\tindented\r\nend\n",
    "digits 0123456789 and 3.14159, 2024-06-01",
    "café crème naïve Ωmega",  # letters of the corpus and one outside it
    "日本語 and 한국어",  # outside the vocabulary: bytes
    "emoji 🦀 and flags 🇫🇷!",
    "x",
    "",
]


def _train(tmp_path: Path, model_type: str) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 3)
    prefix = tmp_path / model_type
    # Llama 2's own training options, as far as they matter for encoding.
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type=model_type, vocab_size=TRAINED_VOCAB_SIZE,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=CONTROL_TOKENS,
        num_threads=1, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    """A SentencePiece BPE model file."""
    return _train(tmp_path_factory.mktemp("sentencepiece"), "bpe")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint for the file's tensors."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=MODEL_VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _convert(tmp_path: Path, checkpoint: Path, model_file: Path, **options) -> Path:
    gguf_path = write_sentencepiece_gguf(checkpoint, model_file, tmp_path / "model.gguf", **options)
    return convert_gguf(gguf_path, tmp_path / "converted")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, checkpoint, bpe_model) -> Path:
    """The folder converted from a GGUF file with the BPE model as its tokenizer."""
    return _convert(tmp_path_factory.mktemp("gguf-sentencepiece"), checkpoint, bpe_model)


@pytest.fixture(scope="module")
def tokenizer(converted):
    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def processor(bpe_model) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(bpe_model))


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_ids_are_sentencepieces_own(tokenizer, processor, text):
    assert tokenizer.encode(text) == [processor.bos_id()] + processor.encode(text)


@pytest.fixture(scope="module")
def transformers_conversion(bpe_model) -> LlamaTokenizerFast:
    """transformers' own fast tokenizer for the BPE model, converted from the model file."""
    return LlamaTokenizerFast(vocab_file=str(bpe_model), legacy=False)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_ids_are_those_of_transformers_own_conversion(tokenizer, transformers_conversion, text):
    assert tokenizer.encode(text) == transformers_conversion.encode(text)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_decoding_gives_the_text_back(tokenizer, processor, text):
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text
    assert processor.decode(processor.encode(text)) == text  # what SentencePiece gives too


def test_characters_outside_the_vocabulary_become_their_bytes(tokenizer, processor):
    text = "日本語 🦀"
    assert processor.piece_to_id("日") == processor.unk_id()  # not a piece of the vocabulary
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
    assert pieces == ["▁"] + [f"<0x{byte:02X}>" for byte in "日本語".encode()] + ["▁"] + [
        f"<0x{byte:02X}>" for byte in "🦀".encode()]


def test_the_converted_folder_declares_the_special_tokens(converted, tokenizer, processor):
    settings = json.loads((converted / "tokenizer_config.json").read_text())
    assert {key: settings[key] for key in ("bos_token", "eos_token", "unk_token", "add_bos_token")} == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    config = json.loads((converted / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (processor.bos_id(), processor.eos_id())
    assert len(tokenizer) == config["vocab_size"] == MODEL_VOCAB_SIZE  # the unused pieces padding the file too
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        processor.bos_id(), processor.eos_id(), processor.unk_id())


def test_control_tokens_are_single_ids_and_skipped_when_decoding(tokenizer, processor):
    inst, end_inst = (processor.piece_to_id(token) for token in CONTROL_TOKENS)
    ids = tokenizer.encode("[INST] Hi there [/INST]</s>world", add_special_tokens=False)
    # The text after a control token starts with a space of its own, as llama.cpp cuts it.
    assert ids == [inst] + processor.encode(" Hi there ") + [end_inst, processor.eos_id()] + processor.encode("world")
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert "Hi there" in decoded and "world" in decoded and "[INST]" not in decoded and "</s>" not in decoded


def test_merges_follow_the_scores_not_the_ids(tmp_path, checkpoint, bpe_model, processor):
    # The normal pieces listed in reverse: merging by id order would merge the wrong pairs first.
    normal = [index for index in range(processor.get_piece_size())
              if not (processor.is_control(index) or processor.is_unknown(index) or processor.is_byte(index))]
    order = [index for index in range(processor.get_piece_size()) if index not in normal] + normal[::-1]
    tokenizer = AutoTokenizer.from_pretrained(_convert(tmp_path, checkpoint, bpe_model, order=order))
    for text in SAMPLE_TEXTS:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
        assert pieces == processor.encode(text, out_type=str), text


def _without_space_prefix(model_file: Path) -> sentencepiece.SentencePieceProcessor:
    # transformers' own copy of SentencePiece's protobuf module: the package's would clash with it.
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


def test_the_files_bos_and_space_prefix_settings_are_followed(tmp_path, checkpoint, bpe_model):
    folder = _convert(tmp_path, checkpoint, bpe_model, add_bos=False, add_space_prefix=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = _without_space_prefix(bpe_model)
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is False
    for text in SAMPLE_TEXTS:
        assert tokenizer.encode(text) == reference.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("kind, options, message", [
    ("unigram", {}, "not a whole number as in a BPE model"),
    ("bpe", {"token_types": {300: 7}}, "unknown GGUF token type 7"),
    ("bpe", {"token_types": {300: 6}}, "byte token .* is not of the form <0xNN>"),
])
def test_what_cannot_be_mapped_is_refused(tmp_path, checkpoint, bpe_model, kind, options, message):
    model_file = bpe_model if kind == "bpe" else _train(tmp_path, kind)
    gguf_path = write_sentencepiece_gguf(checkpoint, model_file, tmp_path / "model.gguf", **options)
    with pytest.raises(ValueError, match=message):
        convert_gguf(gguf_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
