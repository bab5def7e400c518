"""Text formats around a model: chat turns and templates, tool-call syntax, tokenizer files."""
