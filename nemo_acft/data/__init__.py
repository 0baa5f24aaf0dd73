"""Data: the built-in corpus, an offline tokenizer, and readers for real data files."""

from nemo_acft.data.corpus import domains, generate_corpus
from nemo_acft.data.files import read_prompts, read_records
from nemo_acft.data.tokenizer import WordTokenizer

__all__ = ["WordTokenizer", "domains", "generate_corpus", "read_prompts", "read_records"]
