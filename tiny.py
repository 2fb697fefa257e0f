"""Tiny local models for the embedded default and the tests: no hub needed.

train_tokenizer():  a byte-level BPE tokenizer trained on given text, with
                    <|pad|>, <|bos|>, <|eos|> and a small chat template, as a
                    transformers PreTrainedTokenizerFast.
build_base():       the embedded default's SFT'd policy.
save_reward_model(), save_judge(): untrained oracle models (a reward head, a causal LM judge) with their own
                    tokenizers, for the oracle tests and the GPU check's sharded oracle.
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


# ---------------------------------------------------------------------------
# The embedded default: a tiny instruction-following policy for the category game
# ---------------------------------------------------------------------------

TOPICS = ("weather music code history games food travel science sport art money health books space "
          "animals cities rivers math").split()
ASKS = ["tell me about", "what do you think of", "give one word on", "pick for", "choose about", "answer on"]
FILLER = "because it is the best one for this and that very good short answer".split()


def synthetic_prompts(n, seed):
    """n short instructions, deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, t, k = (int(torch.randint(0, m, (1,), generator=g)) for m in (len(ASKS), len(TOPICS), 100))
        out.append(f"{ASKS[a]} {TOPICS[t]} {k}")
    return out


def sft_responses(n, categories, probs, seed):
    """n responses "<category> <filler ...>" with the category drawn from probs."""
    g = torch.Generator().manual_seed(seed)
    cats = torch.multinomial(torch.tensor(probs, dtype=torch.float64), n, replacement=True, generator=g).tolist()
    out = []
    for c in cats:
        k = int(torch.randint(1, 4, (1,), generator=g))
        out.append(" ".join([categories[c]] + [FILLER[int(i)] for i in torch.randint(0, len(FILLER), (k,), generator=g)]))
    return out


def build_base(path, categories=("rock", "paper", "scissors"), probs=(0.2, 0.5, 0.3), hidden=64, layers=2,
               vocab=384, sft_steps=300, seed=0, log=print):
    """Train a tokenizer, build a small Llama and SFT it on category responses; save an HF directory at `path`.

    After SFT the policy's category distribution is close to `probs` for every
    prompt (the skewed start of the paper's toy experiment). Written to a temp
    name and renamed, so a killed build leaves nothing half-written.
    """
    import os
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    prompts = synthetic_prompts(2000, seed)
    responses = sft_responses(2000, list(categories), list(probs), seed + 1)
    tok = train_tokenizer(prompts + responses + synthetic_text(400, seed), vocab_size=vocab)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    texts = [tok.apply_chat_template([{"role": "user", "content": x}, {"role": "assistant", "content": y}], tokenize=False)
             for x, y in zip(prompts, responses)]
    prompt_lens = [len(tok.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True,
                                               tokenize=False)) for x in prompts]
    enc = [tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 2)
    for step in range(sft_steps):
        idx = torch.randint(0, len(texts), (32,), generator=g).tolist()
        L = max(len(enc[i]["input_ids"]) for i in idx)
        ids = torch.full((32, L), tok.pad_token_id)
        labels = torch.full((32, L), -100)
        for row, i in enumerate(idx):
            x = torch.tensor(enc[i]["input_ids"])
            ids[row, :len(x)] = x
            is_response = torch.tensor([s >= prompt_lens[i] for s, _ in enc[i]["offset_mapping"]])
            labels[row, :len(x)] = x.masked_fill(~is_response, -100)  # train on the response (and its EOS) only
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == sft_steps - 1:
            log(f"tiny base: SFT step {step} loss {loss.item():.3f}")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def llama_config(tok, **kw):
    """A 2-block Llama of width 32 for `tok`, with large initial weights (so an untrained head's scores differ)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       initializer_range=0.5, **kw)


def save_reward_model(path, seed, vocab, chat):
    """An untrained LlamaForSequenceClassification (one label) and its tokenizer (chat template or not) at path."""
    from transformers import LlamaForSequenceClassification

    tok = train_tokenizer(synthetic_text(seed=seed), vocab, chat_template=chat)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(llama_config(tok, num_labels=1)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_judge(path, seed=7):
    """An untrained LlamaForCausalLM judge and its tokenizer at path."""
    from transformers import LlamaForCausalLM

    tok = train_tokenizer(synthetic_text(seed=seed), 350)
    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
