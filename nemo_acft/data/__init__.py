"""Data: the built-in corpus, an offline tokenizer, and readers for real data files."""

from nemo_acft.data.corpus import domains, generate_corpus
from nemo_acft.data.files import read_prompts, read_records
from nemo_acft.data.lm_dataset import LMDataset, batch_indices, encode_records, make_prompts
from nemo_acft.data.tokenizer import ByteTokenizer, WordTokenizer, build_tokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "LMDataset", "WordTokenizer", "build_tokenizer", "load_tokenizer", "batch_indices", "domains", "encode_records",
           "generate_corpus", "make_prompts", "read_prompts", "read_records"]
