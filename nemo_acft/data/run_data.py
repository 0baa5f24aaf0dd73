"""Everything data-shaped a run needs, rebuilt identically by every process of every world from
the config and the model's tokenizer: the pre-training, training and held-out token tensors,
the training prompts (oracle blocks, RL) and the evaluation prompts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List

from nemo_acft.data.corpus import domains as builtin_domains
from nemo_acft.data.corpus import generate_corpus
from nemo_acft.data.files import read_prompts, read_records
from nemo_acft.data.lm_dataset import LMDataset, encode_records, make_prompts

log = logging.getLogger("nemo_acft")


@dataclass
class RunData:
    """Token tensors and prompt pools of a run."""

    tokenizer: Any
    domains: List[str]
    pretrain: LMDataset
    train: LMDataset
    heldout: LMDataset
    train_prompts: List[str]
    eval_prompts: List[str]


def records(data: Dict[str, Any], seed: int):
    """``(pretrain, train, heldout-for-perplexity, prompt source texts, domain names)`` records
    of the ``data`` section: the generated corpus or the files."""
    if data["source"] == "builtin":
        b = data["builtin"]
        n_pre, n_train, n_held = b["pretrain_records"], b["train_records"], b["heldout_records"]
        corpus = generate_corpus(n_pre + n_train + n_held, seed=seed,
                                 toxic_fraction=b["toxic_fraction"],
                                 chat_share_of_toxic=b["chat_share_of_toxic"])
        pre, train, held = (corpus[:n_pre], corpus[n_pre:n_pre + n_train],
                            corpus[n_pre + n_train:])
        # utility: perplexity on held-out general text, i.e. the records without an insult
        return pre, train, [r for r in held if not r["toxic"]], [r["text"] for r in held], \
            builtin_domains()
    skip = data["skip_malformed"]
    train, n_bad = read_records(data["train_file"], skip)
    pre, n_bad_pre = (read_records(data["pretrain_file"], skip) if data["pretrain_file"]
                      else (train, 0))
    held, n_bad_held = read_records(data["heldout_file"], skip)
    if n_bad + n_bad_pre + n_bad_held:
        log.warning("skipped %d malformed lines (train %d, pretrain %d, heldout %d)",
                    n_bad + n_bad_pre + n_bad_held, n_bad, n_bad_pre, n_bad_held)
    names = sorted({r["domain"] for r in pre + train + held})
    return pre, train, held, [r["text"] for r in held], names


def build_data(data: Dict[str, Any], evaluation: Dict[str, Any], tokenizer, seq_length: int,
               seed: int) -> RunData:
    """The run's data encoded with ``tokenizer`` (a :class:`~nemo_acft.data.TextTokenizer`) at
    ``seq_length`` tokens."""
    pre, train, held, prompt_source, names = records(data, seed)
    lo, hi = data["prompt_words"]
    if data.get("prompts_file"):
        eval_prompts, _ = read_prompts(data["prompts_file"], data["skip_malformed"])
    else:
        eval_prompts = make_prompts(prompt_source, lo, hi, seed + 1)
    return RunData(
        tokenizer=tokenizer, domains=names,
        pretrain=encode_records(pre, tokenizer, seq_length, names),
        train=encode_records(train, tokenizer, seq_length, names),
        heldout=encode_records(held[: evaluation["ppl_records"]], tokenizer, seq_length, names),
        train_prompts=make_prompts([r["text"] for r in train], lo, hi, seed + 2),
        eval_prompts=eval_prompts[: evaluation["prompts"]],
    )


def pretrain_texts(data: Dict[str, Any], seed: int) -> List[str]:
    """The texts the built-in tokenizer is trained on: pre-training and training records, each
    once (the pre-training file may be the training file)."""
    pre, train, _, _, _ = records(data, seed)
    same = data["source"] == "files" and data["pretrain_file"] in (None, data["train_file"])
    return [r["text"] for r in (train if same else pre + train)]
