"""Tiny random Hugging Face models built offline (no download): a Llama (a byte-level BPE
tokenizer trained with ``tokenizers`` on a few sentences, and a ``LlamaForCausalLM`` of 2 layers
with grouped-query attention, saved with ``save_pretrained``) and a 1-layer BERT sequence
classifier (the oracles' tests)."""

from __future__ import annotations

from pathlib import Path

TEXT = ("the quick brown fox jumps over the lazy dog . a model that reads text and writes "
        "text . people of every group deserve respect and kindness . the weather today is "
        "mild and the river runs to the sea . numbers like 1 2 3 4 5 6 7 8 9 0 and words")


def corpus(n_words: int = 6000, seed: int = 0):
    """Sentences of :data:`TEXT` and of pseudo-words from a fixed seed (enough merges for a
    vocabulary of ~1,000)."""
    import random

    rng = random.Random(seed)
    syl = ["ka", "lo", "mi", "ten", "ra", "su", "vo", "nel", "pa", "dri", "ou", "ze", "bar", "qui"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(n_words)]
    return [TEXT] * 20 + [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]


def tiny_llama(out: Path, *, vocab: int = 1000, tied: bool = False, seed: int = 0,
               rope_theta: float = 50000.0, sentencepiece: bool = False) -> Path:
    """Write the tiny model and its tokenizer to ``out`` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    if sentencepiece:  # Llama 1/2 style: tokenizer.model (SentencePiece), read by LlamaTokenizer
        import io

        import sentencepiece as spm
        from transformers import LlamaTokenizer

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf,
                                       vocab_size=vocab, model_type="bpe", unk_id=0, bos_id=1,
                                       eos_id=2, pad_id=-1, hard_vocab_limit=False,
                                       num_threads=1, minloglevel=2)
        (out / "tokenizer.model").write_bytes(buf.getvalue())
        tok = LlamaTokenizer(vocab_file=str(out / "tokenizer.model"), legacy=True)
    else:
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      min_frequency=1)
        tk.train_from_iterator(corpus(), trainer=trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>")
    tok.save_pretrained(str(out))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=rope_theta,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, initializer_range=0.05)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, so that a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "a", "nice", "idiot",
              "good", "day", "what", "stupid", "person"]


def tiny_bert(folder, num_labels, id2label=None, problem_type=None, seed=0):
    """A 1-layer BERT classifier with its config and tokenizer (a ``vocab.txt``: transformers
    builds the fast tokenizer from it when loading) saved in ``folder``; the weights are the
    caller's to save (``model.save_pretrained(folder)``)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(BERT_WORDS) + "\n")
    # positional vocab path: transformers 5 ignores vocab_file= as a keyword (CPU-STACK.md)
    tokenizer = transformers.BertTokenizer(str(vocab))
    config = transformers.BertConfig(
        vocab_size=len(BERT_WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
        id2label=id2label or {i: f"LABEL_{i}" for i in range(num_labels)},
        label2id={v: k for k, v in (id2label or {i: f"LABEL_{i}" for i in
                                                 range(num_labels)}).items()},
        problem_type=problem_type)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():  # let the [CLS] output depend on the words, not only on init noise
        for name, p in model.named_parameters():
            if "attention" in name and name.endswith("weight") and "LayerNorm" not in name:
                p.normal_(0, 1.0)
        model.bert.embeddings.word_embeddings.weight.normal_(0, 1.0)
        model.bert.pooler.dense.weight.normal_(0, 1.0)
        model.classifier.weight.normal_(0, 1.0)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
