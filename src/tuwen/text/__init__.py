"""Text tokenizer (BERT WordPiece through ``tokenizers``; Chinese split per character)."""
from .tokenizer import TextTokenizer, remove_cjk_spaces

__all__ = ["TextTokenizer", "remove_cjk_spaces"]
