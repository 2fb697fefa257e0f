"""The exact category distribution of a language model's responses on the category game (oracle.CategoryGame):
the engine behind exploitability on a transformer (train_ddp, eval.py).

policy_distribution enumerates response prefixes while their first word can still become a category, by
batched forwards (no sampling); the tail of each next-token distribution is settled at once from a per-token
table (token_table, tail_fates) built once per tokenizer. Tested against brute-force enumeration
(tests/test_oracle.py).
"""
import collections
import copy
import hashlib
import math
import string

import torch


def token_table(game, tokenizer, vocab_size):
    """Per-token texts and fates, built once per tokenizer, for settling the tail of a prefix's next-token
    distribution without decoding each (prefix + token). first: decode([v]) (exact after the prompt);
    cont: the text v adds after other tokens, decode([a, v]) minus decode([a]) (a leading space a
    sentencepiece tokenizer drops at the start stays here). fate_*: outcome() of a response that is
    just that text, open / at the cap. by_char: ids of the tokens whose cont text starts with each
    (lowercased) non-space character."""
    cached = game.token_table_cache  # (tokenizer, vocab_size, table): the last one built for this game
    if cached is not None and cached[0] is tokenizer and cached[1] == vocab_size:  # holds the tokenizer: its id
        return cached[2]                                                            # is not reused
    key = table_key(game, tokenizer, vocab_size)
    if key is not None and key in TABLES:  # the same tokenizer, loaded again, and the same game
        game.token_table_cache = (tokenizer, vocab_size, TABLES[key])
        return TABLES[key]
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
    head = tokenizer.decode([anchor], skip_special_tokens=True)
    first = tokenizer.batch_decode([[v] for v in range(vocab_size)], skip_special_tokens=True)
    pair = tokenizer.batch_decode([[anchor, v] for v in range(vocab_size)], skip_special_tokens=True)
    cont = [p[len(head):] if p.startswith(head) else "\ufffd" for p in pair]  # unusable -> never settled
    fate = lambda texts, ended: torch.tensor([game.outcome(s, ended) for s in texts])  # noqa: E731
    by_char = {}
    for v, s in enumerate(cont):
        if s and not s[0].isspace():
            by_char.setdefault(s[0].lower(), []).append(v)
    table = {
        "first": first, "cont": cont, "fate_first": (fate(first, False), fate(first, True)),
        "fate_cont": (fate(cont, False), fate(cont, True)),
        "starts_ws": torch.tensor([bool(s) and s[0].isspace() for s in cont]),
        "empty": torch.tensor([not s for s in cont]),
        "bad": torch.tensor(["\ufffd" in s for s in cont]),
        "by_char": {c: torch.tensor(v) for c, v in by_char.items()}}
    game.token_table_cache = (tokenizer, vocab_size, table)
    if key is not None:
        if len(TABLES) >= 4:
            TABLES.pop(next(iter(TABLES)))  # the oldest
        TABLES[key] = table
    return table


TABLES = {}  # table_key -> token table: the 4 newest, across CategoryGame objects and tokenizer loads


def table_key(game, tokenizer, vocab_size):
    """What a token table depends on, for a fast tokenizer: its whole serialisation (vocabulary, merges, added
    tokens, normaliser, decoder), its decode options, the vocabulary size and the game's class and rule
    (categories, case). None otherwise: the table is then built per game."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    h.update(repr((type(tokenizer).__name__, getattr(tokenizer, "clean_up_tokenization_spaces", None), vocab_size,
                   type(game).__module__, type(game).__qualname__, tuple(game.categories),
                   game.case_sensitive)).encode())
    return h.hexdigest()


def tail_fates(game, table, text, depth, idx, at_cap):
    """outcome() of prefix text `text` (depth tokens, first word still open) followed by each token of idx
    (token ids, or a (V,) bool mask), from the token table: the response is text + that token's text
    (checked by the caller on every token it decodes). Tokens whose text is not a whole character stay "open" (unsettled).
    The fates of the whole vocabulary after a text are kept (the last 4096 texts): the same prefix texts
    ("Rock", "Sc", "I") recur across prompts and iterations."""
    if depth == 0:
        return table["fate_first"][at_cap][idx]
    memo = table.setdefault("memo", collections.OrderedDict())
    key = (text, bool(at_cap))
    if key not in memo:
        memo[key] = vocab_fates(game, table, text, at_cap).to(torch.int8)  # C + 2 < 128 fates
        if len(memo) > 4096:
            memo.popitem(last=False)
    memo.move_to_end(key)
    return memo[key][idx].long()

def vocab_fates(game, table, text, at_cap):
    """(V,) tail_fates of every token after `text` (depth > 0)."""
    C = len(game.categories)
    word = text.lstrip()
    core = word.strip(string.punctuation)
    if not core:  # nothing or only punctuation so far: the category is decided by the token's own text
        fates = table["fate_cont"][at_cap].clone()
        if word:
            fates[table["starts_ws"]] = C  # a word of punctuation only, ended: none
    else:
        fates = torch.full((len(table["cont"]),), C, dtype=torch.long)
        fates[table["starts_ws"]] = game.outcome(text + " ", True)  # the open word ended by whitespace
        fates[table["empty"]] = game.outcome(text, at_cap)  # e.g. a skipped special token
        low = word.lstrip(string.punctuation)
        low = low if game.case_sensitive else low.lower()
        nexts = {c[len(low)].lower() for c in game.index if c.startswith(low) and len(c) > len(low)}
        if any(low.startswith(c) for c in game.index):  # a category word, maybe with punctuation after it
            nexts |= set(string.punctuation)
        for ch in nexts:  # the tokens that may continue the word: decided one by one
            for v in table["by_char"].get(ch, torch.zeros(0, dtype=torch.long)).tolist():
                fates[v] = game.outcome(text + table["cont"][v], at_cap)
    for v in table["bad"].nonzero().squeeze(-1).tolist():  # a cut character: exact once the response ends
        fates[v] = game.outcome(text + table["cont"][v], at_cap)
    return fates

class EnumerationError(ValueError):
    """The enumeration of one prompt passed its budget of prefixes: one line naming the prompt and the fix."""


class EnumerationStopped(Exception):
    """should_stop() said so (a signal arrived) between two steps of the enumeration."""


@torch.no_grad()
def policy_distribution(game, model, tokenizer, prompt_ids, eos_token_ids, max_new_tokens=None, min_mass=1e-6,
                        batch_size=256, max_prefixes=None, should_stop=None, progress=False):
    """(B, C+1) exact category distribution of the policy's responses to each prompt ("none" last), and the
    (B,) mass left unsettled (the error bound, counted as "none", which can only raise exploitability).

    Enumerates response prefixes while their first word is open and can still become a category, by
    batched forwards (no sampling): a response ends when the decoded text has a complete first word
    (whitespace after it), an EOS, or max_new_tokens tokens (the sampler's cap: the oracle then judges
    the truncated text, e.g. "roc" is none). Next tokens of probability >= min_mass are decoded and
    expanded one by one; the rest of the vocabulary (the tail) is settled at once from a per-token
    table (token_table, tail_fates): ended in a category, none, or still open. Only the still-open tail
    is unsettled. The table assumes decoding concatenates token texts (byte-level BPE, sentencepiece
    after the first token); every decoded token checks it, and a prefix where it fails leaves its whole
    tail unsettled. Each prompt is prefilled once into a KV cache; the open prefixes of a step (all of
    one length) run as a batch over its copies (tested against brute-force enumeration).

    A model that rarely ends its first word (an untrained one never does) opens ~V prefixes per step: past
    max_prefixes expanded prefixes for one prompt, EnumerationError; should_stop() is asked before every
    batch of forwards (EnumerationStopped); progress shows a bar over the prompts.
    """
    from tqdm import tqdm

    C = len(game.categories)
    dist = torch.zeros(len(prompt_ids), C + 1, dtype=torch.float64)
    pruned = torch.zeros(len(prompt_ids), dtype=torch.float64)
    for b, prompt in enumerate(tqdm(prompt_ids, desc="exact category distribution", leave=False, disable=not progress)):
        prompt, expanded = [int(t) for t in prompt], 0
        cache, first = prefill_prompt(model, prompt)
        table = token_table(game, tokenizer, len(first))  # built on the first call for this tokenizer
        eos_ids = torch.tensor(sorted(e for e in set(map(int, eos_token_ids)) if e < len(first)), dtype=torch.long)
        frontier = [([], "", 0.0)]  # (response prefix, its text, log-prob); all prefixes of a step have one length
        while frontier:
            nxt = []
            expanded += len(frontier)
            if max_prefixes is not None and expanded > max_prefixes:
                raise EnumerationError(
                    f"eval prompt {b}: the exact category enumeration passed {max_prefixes} prefixes (eval_max_prefixes)"
                    f" at response length {len(frontier[0][0])}: the model rarely ends its first word (an untrained "
                    "one never does); set eval_prompts=0 to train without exploitability, or raise eval_max_prefixes")
            for s in range(0, len(frontier), batch_size):
                if should_stop is not None and should_stop():
                    raise EnumerationStopped()
                chunk = frontier[s:s + batch_size]
                prefixes = [r for r, _, _ in chunk]
                logp = next_logps(model, prompt, cache, prefixes) if prefixes[0] else first[None]  # (b, V)
                for (r, text, lp), row in zip(chunk, logp):
                    at_cap = max_new_tokens is not None and len(r) + 1 >= max_new_tokens
                    mass, opened = settle(game, tokenizer, table, eos_ids, r, text, lp + row, at_cap, min_mass)
                    dist[b, :C + 1] += mass[:C + 1]
                    pruned[b] += mass[C + 1]
                    nxt += opened
            frontier = nxt
    dist[:, C] += pruned
    return dist, pruned


def settle(game, tokenizer, table, eos_ids, r, text, total, at_cap, min_mass):
    """One open prefix r (its text) and the (V,) log-probs `total` of r + each next token: the (C + 3,) mass
    that ends in each category / none (C) / unsettled (C + 1) / expanded (C + 2), and the expanded prefixes
    still open [(r + [v], text, log-prob)]. Tokens of probability >= min_mass are decoded one by one, the
    tail at once from the token table when decoding concatenates token texts."""
    C = len(game.categories)
    big = total > math.log(min_mass)
    big[eos_ids] = False  # EOS ends the response as it stands: settled below
    fates = torch.full((len(total),), C + 1, dtype=torch.long)
    fates[eos_ids] = game.outcome(text, True)
    concatenates = "\ufffd" not in text
    opened = []
    for v in big.nonzero().squeeze(-1).tolist():
        seq = r + [v]
        new = tokenizer.decode(seq, skip_special_tokens=True)
        concatenates &= new == (text + table["cont"][v] if r else table["first"][v])
        fates[v] = fate = game.outcome(new, at_cap)
        if fate == C + 1:
            opened.append((seq, new, float(total[v])))
    if concatenates:
        tail = ~big  # (V,) bool: the tokens not decoded one by one, EOS aside
        tail[eos_ids] = False
        fates[tail] = tail_fates(game, table, text, len(r), tail, at_cap)
    fates[big & (fates == C + 1)] = C + 2  # expanded: counted at the next step
    return torch.zeros(C + 3, dtype=torch.float64).index_add_(0, fates, total.exp()), opened


def prefill_prompt(model, prompt):
    """(KV cache of the prompt, (V,) log-probs of the first response token): once per prompt."""
    from transformers import DynamicCache

    from sample import cache_kwargs

    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt], device=dev)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, **cache_kwargs(model, cache))
    return cache, torch.log_softmax(out.logits[0, -1].double(), -1).cpu()


def next_logps(model, prompt, cache, prefixes):
    """(len(prefixes), V) next-token log-probs after prompt + each prefix (all of one length d >= 1): a copy of
    the prompt's cache replicated for the batch, only the d prefix tokens are run."""
    from sample import cache_kwargs

    dev = next(model.parameters()).device
    batch = copy.deepcopy(cache)
    batch.batch_repeat_interleave(len(prefixes))
    P, d = len(prompt), len(prefixes[0])
    out = model(input_ids=torch.tensor(prefixes, device=dev),
                attention_mask=torch.ones(len(prefixes), P + d, dtype=torch.long, device=dev),
                position_ids=torch.arange(P, P + d, device=dev).expand(len(prefixes), -1), logits_to_keep=1,
                **cache_kwargs(model, batch))
    return torch.log_softmax(out.logits[:, -1].double(), -1).cpu()
