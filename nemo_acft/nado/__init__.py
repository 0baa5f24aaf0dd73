"""Math of the method (torch only; optionally a tensor-parallel process group).

Public API: :func:`guided_log_probs`, :func:`token_log_probs`, :func:`closed_form_kl`,
:func:`nado_loss`, :func:`kl_penalty` (per-domain λ and the δ gate), the fused CE + KL pass
(:mod:`.fused`), a reference's q as top-k ids and a tail bucket and the LM loss against it
(:mod:`.sparse`), and the vocab-parallel reductions they are built from.
"""

from nemo_acft.nado.losses import (closed_form_kl, cross_entropy, distribution_stats,
                                   guided_log_probs, kl_penalty, nado_loss, token_log_probs)
from nemo_acft.nado.sparse import SparseQ, fused_ce_sparse_kl, sparse_reference_q
from nemo_acft.nado.vocab_parallel import (
    all_reduce_sum,
    mask_padded_vocab,
    to_shards,
    vocab_log_softmax,
    vocab_logsumexp,
    vocab_max,
    vocab_gather,
    vocab_select,
    vocab_sum,
    vocab_top_k,
)

__all__ = [
    "closed_form_kl",
    "cross_entropy",
    "distribution_stats",
    "guided_log_probs",
    "kl_penalty",
    "nado_loss",
    "token_log_probs",
    "all_reduce_sum",
    "mask_padded_vocab",
    "to_shards",
    "vocab_log_softmax",
    "vocab_logsumexp",
    "vocab_max",
    "vocab_select",
    "vocab_sum",
    "vocab_gather",
    "vocab_top_k",
    "SparseQ",
    "fused_ce_sparse_kl",
    "sparse_reference_q",
]
