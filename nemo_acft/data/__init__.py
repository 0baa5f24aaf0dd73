"""Data: the built-in corpus, readers for real data files, token tensors with deterministic
batches, the tokenizer interface and the built-in SentencePiece model. Imports nothing of the
package but :mod:`nemo_acft.io_utils`."""

from nemo_acft.data.corpus import domains, generate_corpus
from nemo_acft.data.files import read_prompts, read_records
from nemo_acft.data.lexicon import load_lexicon
from nemo_acft.data.lm_dataset import LMDataset, batch_indices, encode_records, make_prompts
from nemo_acft.data.run_data import RunData, build_data, pretrain_texts
from nemo_acft.data.tokenizer import TextTokenizer, sentencepiece_config, train_sentencepiece

__all__ = ["LMDataset", "RunData", "TextTokenizer", "batch_indices", "build_data", "domains",
           "encode_records", "generate_corpus", "load_lexicon", "make_prompts", "pretrain_texts",
           "read_prompts", "read_records", "sentencepiece_config", "train_sentencepiece"]
