"""The testbed tokenizer: byte-level BPE trained on the training split, digits kept one per token.

Digits are split before BPE (so `164` is `1 6 4` and addition is learnable digit by digit); letters
of the sequences domain are space-separated and so are single tokens too. The result is a
`PreTrainedTokenizerFast` that `AutoTokenizer` loads offline from a model folder.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moebench.testbed.data import SEPARATOR, mixed_stream
from moebench.testbed.domains import DOMAINS

EOS = "<|endoftext|>"
VOCAB_SIZE = 800


def train_tokenizer(n_items: int = 40_000, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the BPE tokenizer on `n_items` training-split instances of all domains."""
    source = mixed_stream("train", seed, weights=dict.fromkeys(DOMAINS, 1.0))
    texts = [next(source).text + SEPARATOR for _ in range(n_items)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=256,
    )

