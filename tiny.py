"""Tiny local models for the embedded default and the tests: no hub needed.

train_tokenizer():  a byte-level BPE tokenizer trained on given text, with
                    <|pad|>, <|bos|>, <|eos|> and a small chat template, as a
                    transformers PreTrainedTokenizerFast.
"""
import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]


def train_tokenizer(texts, vocab_size=512, chat_template=True):
    """A byte-level BPE tokenizer trained on `texts` (ids 0..5 are the special tokens, pad = 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def synthetic_text(n=400, seed=0):
    """Short pseudo-sentences over a small vocabulary of words (tokenizer training data for tests)."""
    words = ("rock paper scissors the a answer question good bad why how write explain list short long "
             "story poem code number one two three yes no because and or but not very more less").split()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        out.append(" ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=g).tolist()) + ".")
    return out
