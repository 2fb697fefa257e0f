"""Preference oracles P(y > y' | x): the category game, a mixture of Bradley-Terry
reward models (eq. 4) and a pairwise LLM judge.

Every oracle has the same three methods; prompts and responses are strings.
    prob(prompts, responses_a, responses_b)    -> (B,) P(a > b), in [0, 1], P(a>b) + P(b>a) = 1
    sample(prompts, responses_a, responses_b, generator) -> (B,) Bernoulli labels (lambda_P), 1 = a wins
    winrate_matrix(prompts, groups)            -> (B, n, n) M[b, i, j] = P(y_i > y_j | x_b), diagonal 1/2
winrate_matrix feeds best/worst pair selection, the win-rate rewards of Alg. 5
(r_i = 1/G sum_j M[i, j]) and evaluation; it does the shared work once: a
reward model scores each distinct response once, a judge sees each ordered
pair once.

Build one from a config block with build_oracle({"kind": ..., ...}); check_oracle_config
validates the block (keys, types, paths, heads, templates) without loading any weights. KINDS maps
each kind to its class, which checks and reads its own block.

    kind: category        categories: [rock, paper, scissors]   payoff: [[...]] (default App. I)
    kind: bt_mixture      models: [{path: DIR, weight: 0.5}, {path: DIR2, weight: 0.5}]
    kind: pairwise_judge  path: DIR   template: "...{instruction}...{output_a}...{output_b}..."

Models are loaded from local directories only (no hub is assumed reachable).
"""
import contextlib
import json
import math
import string

import torch

import category_dist
from keys import Key, flag, integer, one_of, optional, positive, problem, text
from model_dirs import (OracleError, chat_text, check_model_dir, check_reward_model_dir, default_device,
                        load_tokenizer, model_dtype, wants_chat_template)

PAPER_PAYOFF = [[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]]  # App. I; NE [4/11, 3/11, 4/11]
PAPER_CATEGORIES = ["rock", "paper", "scissors"]

# A judge prompt in the spirit of App. K's pairwise oracle: instruction, two outputs, answer "Output (a)" or "Output (b)".
DEFAULT_JUDGE_TEMPLATE = (
    "You are a careful evaluator. Read the instruction and the two outputs, then say which "
    "output follows the instruction better. Answer with exactly \"Output (a)\" or \"Output (b)\".\n\n"
    "# Instruction:\n{instruction}\n\n# Output (a):\n{output_a}\n\n# Output (b):\n{output_b}\n\n"
    "# Which is better, Output (a) or Output (b)?"
)


class Oracle:
    """Shared sampling and matrix logic; subclasses implement prob (and may override winrate_matrix), and read
    their own `oracle:` config block: KEYS (besides kind: {key: keys.Key}, each value checked by its own check),
    check_config (the relations between keys and the paths; no weights loaded), from_config."""

    KEYS = {}
    ITEM_OF, ITEM_KEYS = None, {}  # a list-valued key and the keys of each of its entries (BTMixture: models)

    @classmethod
    def check_config(cls, block, check_paths=True):
        """The block (each key already checked by KEYS) with defaults filled; OracleError on a bad value."""
        return dict(block)

    @classmethod
    def from_config(cls, cfg, device):
        raise NotImplementedError

    SHARDABLE = False  # from_config(cfg, device, shards=...) loads each model by shards.load and runs its forwards
    #                    inside `with scoring_of(shards)(model):` (train_ddp under fsdp: fsdp.OracleShards); entering
    #                    scoring gathers (a collective), so every rank enters it as often, even with no pairs

    def models(self):
        """The torch modules the oracle holds (sharded under fsdp: each gathered only while it scores)."""
        return []

    def prob(self, prompts, responses_a, responses_b):
        raise NotImplementedError

    def sample(self, prompts, responses_a, responses_b, generator=None):
        """Bernoulli preference labels y ~ lambda_P: 1.0 where a is preferred (float32, CPU)."""
        p = self.prob(prompts, responses_a, responses_b).to(torch.float64)
        return torch.bernoulli(p, generator=generator).to(torch.float32)

    def winrate_matrix(self, prompts, groups):
        """(B, n, n) from n responses per prompt; generic version: prob() on the pairs i < j."""
        check_groups(prompts, groups)
        n = len(groups[0])
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        xs = [x for x in prompts for _ in pairs]
        a = [g[i] for g in groups for i, _ in pairs]
        b = [g[j] for g in groups for _, j in pairs]
        p = self.prob(xs, a, b).view(len(prompts), len(pairs)) if pairs else torch.zeros(len(prompts), 0)
        M = torch.full((len(prompts), n, n), 0.5)
        for k, (i, j) in enumerate(pairs):
            M[:, i, j] = p[:, k]
            M[:, j, i] = 1 - p[:, k]
        return M


def scoring_of(shards):
    """The context a model scores in: shards.scoring (fsdp.OracleShards: the model gathered whole for the block)
    or, for models loaded whole, nothing to do."""
    return shards.scoring if shards is not None else lambda model: contextlib.nullcontext()


def check_groups(prompts, groups):
    if len(prompts) != len(groups):
        raise ValueError(f"{len(prompts)} prompts but {len(groups)} response groups")
    if len({len(g) for g in groups}) > 1:
        raise ValueError("every prompt needs the same number of responses in winrate_matrix")


ARCH_KEY = Key(None, "the model's architecture for the memory plan before its weights are here (bench/plan.py; a "
               "name of memory_plan.ARCHS, checked against its config.json by --check); not read by training",
               optional(text))
MODEL_COMMON = {  # the keys of every oracle kind that runs models
    "dtype": Key("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16",
                 one_of("auto", "float32", "bfloat16", "float16")),
    "batch_size": Key(8, "sequences per forward", integer(1)),
    "max_length": Key(4096, "tokens per scored sequence (longer ones keep their end)", integer(1)),
}


def check_block(block, defs, where, what=""):
    """One mapping of keys (an oracle block, one of its models): an unknown key, or a value its Key's check
    refuses, is an OracleError naming it."""
    unknown = sorted(set(block) - set(defs))
    if unknown:
        raise OracleError(f"{where}.{unknown[0]}: unknown key{what} (allowed: {', '.join(sorted(defs))})")
    for name, value in block.items():
        if msg := problem(f"{where}.{name}", defs[name], value):
            raise OracleError(msg)


def check_pairs(prompts, responses_a, responses_b):
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"prob needs equal lengths, got {len(prompts)} prompts, "
                         f"{len(responses_a)} responses_a, {len(responses_b)} responses_b")


# ---------------------------------------------------------------------------
# 1. The category game (the embedded default)
# ---------------------------------------------------------------------------


class CategoryGame(Oracle):
    """P(y > y') = A[c(y), c(y')], where c(y) is the response's first word if it is a category.

    The rule: strip the response, take its first whitespace-separated word,
    strip surrounding punctuation, lowercase it (unless case_sensitive); its
    index in `categories` is the category, otherwise c(y) = -1 ("none"). A
    response in no category loses to every categorised one and ties another
    uncategorised one, i.e. the game is A extended by a dominated action
    (extended_payoff). The prompt is ignored: the game is the same for every x.
    """

    def __init__(self, categories=None, payoff=None, case_sensitive=False):
        self.categories = list(categories or PAPER_CATEGORIES)
        self.case_sensitive = case_sensitive
        self.A = torch.tensor(payoff if payoff is not None else PAPER_PAYOFF, dtype=torch.float64)
        self.index = {(c if case_sensitive else c.lower()): i for i, c in enumerate(self.categories)}
        self.token_table_cache = None  # category_dist.token_table's last table (it holds the tokenizer)


    KEYS = {
        "categories": Key(PAPER_CATEGORIES, "the categories; a response's category is its first word",
                          lambda v: None if isinstance(v, list) and len(v) >= 2 and all(
                              isinstance(c, str) and c.split() == [c] for c in v)
                          else "must be a list of at least 2 single words"),
        "payoff": Key(PAPER_PAYOFF, "C x C payoff A[c(y), c(y')] = P(y > y'), A + A^T = 1: a list of rows or a JSON "
                      "file; required for other than 3 categories",
                      lambda v: None if isinstance(v, (list, str)) else "must be a list of rows or a JSON file"),
        "case_sensitive": Key(False, "match the first word to the categories case-sensitively", flag),
    }

    @classmethod
    def check_config(cls, block, check_paths=True):
        cats = block.get("categories", PAPER_CATEGORIES)
        keyed = [c if block.get("case_sensitive", False) else c.lower() for c in cats]
        if len(set(keyed)) != len(keyed):
            raise OracleError(f"oracle.categories has duplicates: {cats}")
        payoff = block.get("payoff", PAPER_PAYOFF if len(cats) == 3 else None)
        if payoff is None:
            raise OracleError(f"oracle.payoff is required for {len(cats)} categories (the default is the 3x3 of App. I)")
        if isinstance(payoff, str):
            payoff = load_payoff_file(payoff)
        try:
            validate_payoff(payoff)
        except OracleError as e:
            raise OracleError(f"oracle.{e}") from None
        if len(payoff) != len(cats):
            raise OracleError(f"oracle.payoff is {len(payoff)}x{len(payoff)} but there are {len(cats)} categories")
        return {"categories": cats, "payoff": payoff, "case_sensitive": block.get("case_sensitive", False)}

    @classmethod
    def from_config(cls, cfg, device):
        return cls(cfg["categories"], cfg["payoff"], cfg["case_sensitive"])

    def category(self, responses):
        """(B,) long: the category index of each response, -1 for none."""
        out = []
        for y in responses:
            words = y.split(maxsplit=1)
            w = words[0].strip(string.punctuation) if words else ""
            out.append(self.index.get(w if self.case_sensitive else w.lower(), -1))
        return torch.tensor(out, dtype=torch.long)

    def extended_payoff(self):
        """(C+1, C+1): A plus a last "none" action that loses to every category and ties itself."""
        C = len(self.categories)
        E = torch.full((C + 1, C + 1), 0.5, dtype=torch.float64)
        E[:C, :C] = self.A
        E[:C, C] = 1.0
        E[C, :C] = 0.0
        return E

    def prob(self, prompts, responses_a, responses_b):
        check_pairs(prompts, responses_a, responses_b)
        E = self.extended_payoff()
        ca, cb = self.category(responses_a), self.category(responses_b)  # -1 indexes the "none" row
        return E[ca, cb].to(torch.float32)

    def winrate_matrix(self, prompts, groups):
        check_groups(prompts, groups)
        E = self.extended_payoff()
        c = torch.stack([self.category(g) for g in groups]) if groups else torch.zeros(0, 0, dtype=torch.long)
        return E[c[:, :, None], c[:, None, :]].to(torch.float32)  # (B, n, n)

    def could_still_match(self, text):
        """Whether a response starting with `text` (its first word not yet ended) can still fall in a category."""
        word = text.lstrip()
        core = word.lstrip(string.punctuation)
        if not self.case_sensitive:
            core = core.lower()
        if not core:
            return True
        return any(c.startswith(core) or (core.startswith(c) and not core[len(c):].strip(string.punctuation))
                   for c in self.index)

    def outcome(self, text, ended):
        """The fate of a response whose decoded text so far is `text`: its category index if it has ended
        (`ended`: EOS or the length cap) or its first word is complete (whitespace after it); otherwise C
        ("none") when no category can follow, C + 1 ("open") while one still can (always, while the text ends
        in a character cut between tokens)."""
        C, s = len(self.categories), text.lstrip()
        if not ended and "\ufffd" in text:  # a character cut between tokens: whatever it becomes, still open
            return C + 1
        if ended or len(s.split(maxsplit=1)) > 1 or (s and s != s.rstrip()):
            c = int(self.category([text])[0])
            return C if c < 0 else c
        return C + 1 if self.could_still_match(text) else C

    def policy_distribution(self, model, tokenizer, prompt_ids, eos_token_ids, max_new_tokens=None, **kw):
        """(B, C+1) exact category distribution of the policy's responses to each prompt ("none" last) and the
        (B,) mass left unsettled: category_dist.policy_distribution (kw: its budget, stop and progress)."""
        return category_dist.policy_distribution(self, model, tokenizer, prompt_ids, eos_token_ids, max_new_tokens,
                                                 **kw)

    def exploitability(self, p):
        """max_c (E p)_c - 1/2 for a distribution p over the C categories (or C+1 with "none" last).

        0 iff p is a Nash equilibrium; the best response is always a category,
        so mass on "none" only raises exploitability.
        """
        p = torch.as_tensor(p, dtype=torch.float64)
        C = len(self.categories)
        if p.shape[-1] == C:
            p = torch.cat([p, p.new_zeros(p.shape[:-1] + (1,))], -1)
        if p.shape[-1] != C + 1:
            raise ValueError(f"exploitability needs a distribution over {C} categories (+ none), got {p.shape[-1]}")
        return ((p @ self.extended_payoff().T).max(-1).values - 0.5)


# ---------------------------------------------------------------------------
# Loading models from local directories
# ---------------------------------------------------------------------------


def validate_payoff(A):
    """Return a payoff matrix (list of lists) as a float64 tensor, or raise OracleError naming the problem:
    square, at least 2x2, finite entries in [0, 1], A + A^T = 1."""
    if not isinstance(A, list) or not A or not all(isinstance(row, list) for row in A):
        raise OracleError("payoff must be a JSON list of lists (a square matrix)")
    n = len(A)
    if n < 2:
        raise OracleError("payoff must be at least 2x2")
    for i, row in enumerate(A):
        if len(row) != n:
            raise OracleError(f"payoff is not square: row {i} has {len(row)} entries, expected {n}")
        for j, a in enumerate(row):
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
                raise OracleError(f"payoff[{i}][{j}] = {a!r} is not a finite number")
            if not 0.0 <= a <= 1.0:
                raise OracleError(f"payoff[{i}][{j}] = {a} is outside [0, 1]")
    for i in range(n):
        for j in range(i, n):
            if abs(A[i][j] + A[j][i] - 1.0) > 1e-6:
                raise OracleError(f"payoff[{i}][{j}] + payoff[{j}][{i}] = {A[i][j] + A[j][i]:.8g}, must be 1 (P(a>b) + P(b>a) = 1)")
    return torch.tensor(A, dtype=torch.float64)


# ---------------------------------------------------------------------------
# 2. Mixture of Bradley-Terry reward models (eq. 4)
# ---------------------------------------------------------------------------


class RewardModel:
    """One sequence-classification reward model with its own tokenizer and chat template."""

    def __init__(self, path, device, dtype=None, batch_size=8, max_length=4096, use_chat_template=None,
                 reward_index=0, trust_remote_code=False, shards=None):
        from transformers import AutoModelForSequenceClassification

        self.path, self.device, self.batch_size, self.max_length = path, device, batch_size, max_length
        self.use_chat_template, self.reward_index = use_chat_template, reward_index
        self.tokenizer = load_tokenizer(path, f"reward model {path}")
        self.tokenizer.padding_side = "right"
        self.scoring = scoring_of(shards)
        try:
            self.model = self.load(AutoModelForSequenceClassification, model_dtype(device, dtype), trust_remote_code,
                                   shards)
        except Exception as e:  # the directory's own code was written against some transformers version
            if not trust_remote_code or isinstance(e, OracleError):
                raise
            import transformers
            raise OracleError(f"reward model {path}: its own code (trust_remote_code) failed to load with transformers "
                              f"{transformers.__version__}: {type(e).__name__}: {e}") from e
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # rows end at their last non-pad token
        self.model.eval()
        self.calls = 0  # number of sequences scored, for tests and logging

    def load(self, auto_class, dtype, trust_remote_code, shards):
        if shards is not None:  # sharded (train_ddp under fsdp): a missing head fails in the streamed load
            return shards.load(self.path, auto_class, dtype, trust_remote_code)
        model, info = auto_class.from_pretrained(self.path, dtype=dtype, local_files_only=True, output_loading_info=True,
                                                 trust_remote_code=trust_remote_code)  # e.g. ArmoRM's gating head
        if info["missing_keys"]:
            raise OracleError(f"reward model {self.path}: weights missing from the checkpoint "
                              f"({', '.join(sorted(info['missing_keys'])[:3])}): it has no trained reward head")
        return model.to(self.device)

    @torch.no_grad()
    def score(self, prompts, responses):
        """(B,) float64 rewards r(x, y), longest-first batches of `batch_size`."""
        texts = [chat_text(self.tokenizer, x, y, self.use_chat_template) for x, y in zip(prompts, responses)]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), dtype=torch.float64)
        with self.scoring(self.model):
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length,
                                     # a chat template writes its own BOS; adding special tokens again would double it
                                     add_special_tokens=not wants_chat_template(self.tokenizer, self.use_chat_template),
                                     ).to(self.device)
                output = self.model(**enc)
                score = getattr(output, "score", None)  # ArmoRM returns its preference score here
                reward = score.reshape(len(idx), -1)[:, 0] if score is not None else output.logits[:, self.reward_index]
                out[idx] = reward.double().cpu()
                self.calls += len(idx)
        return out


class BTMixture(Oracle):
    """P(a > b | x) = sum_k w_k sigmoid(r_k(x, a) - r_k(x, b))   (eq. 4; the paper: two models, w = 1/2 each).

    A mixture of Bradley-Terry models is not a Bradley-Terry model: the
    preference can cycle, which is what makes the game general.
    """

    def __init__(self, reward_models, weights):
        self.reward_models, self.weights = reward_models, list(weights)

    KEYS = {
        "models": Key(None, "the reward models of eq. 4, a list of mappings with the keys below (path required)",
                      lambda v: None if isinstance(v, list) and v else "must be a non-empty list of {path: DIR, weight: w}"),
        **MODEL_COMMON,
    }
    ITEM_OF, ITEM_KEYS = "models", {
        "path": Key(None, "local directory of a *ForSequenceClassification reward model", text),
        "weight": Key(None, "its weight w_k in the mixture (default: equal weights; they must sum to 1)", positive),
        "use_chat_template": Key(None, "score the (prompt, response) in the model's chat template (default: if it "
                                 "has one)", optional(flag)),
        "reward_index": Key(0, "which output of the head is the reward", integer(0)),
        "max_length": Key(None, "this model's token limit (default: the block's max_length)", optional(integer(1))),
        "trust_remote_code": Key(False, "run the model's own code (custom reward heads, e.g. ArmoRM)", flag),
        "arch": ARCH_KEY,
    }

    @classmethod
    def check_config(cls, block, check_paths=True):
        models = block.get("models")
        if models is None:
            raise OracleError("oracle.models is required: a non-empty list of {path: DIR, weight: w}")
        for k, m in enumerate(models):
            where = f"oracle.models[{k}]"
            if not isinstance(m, dict) or "path" not in m:
                raise OracleError(f"{where} must be a mapping with a path (and a weight), got {m!r}")
            check_block(m, cls.ITEM_KEYS, where)
            if check_paths:
                check_reward_model_dir(m, where)
        check_weights([m.get("weight", 1.0 / len(models)) for m in models], "oracle.models")
        return dict(block)

    SHARDABLE = True

    @classmethod
    def from_config(cls, cfg, device, shards=None):
        common = {k: cfg[k] for k in ("dtype", "batch_size", "max_length") if k in cfg}
        keys = ("use_chat_template", "reward_index", "max_length", "trust_remote_code")
        rms = [RewardModel(m["path"], device, shards=shards, **dict(common, **{k: m[k] for k in keys if k in m}))
               for m in cfg["models"]]
        return cls(rms, [m.get("weight", 1.0 / len(cfg["models"])) for m in cfg["models"]])

    def models(self):
        return [rm.model for rm in self.reward_models if isinstance(getattr(rm, "model", None), torch.nn.Module)]

    def rewards(self, prompts, responses):
        """(K, B) rewards; each distinct (prompt, response) is scored once per reward model."""
        keys = list(zip(prompts, responses))
        distinct = list(dict.fromkeys(keys))
        where = {k: i for i, k in enumerate(distinct)}
        idx = torch.tensor([where[k] for k in keys], dtype=torch.long)
        xs, ys = [k[0] for k in distinct], [k[1] for k in distinct]
        return torch.stack([rm.score(xs, ys)[idx] for rm in self.reward_models])

    def prob(self, prompts, responses_a, responses_b):
        check_pairs(prompts, responses_a, responses_b)
        B = len(prompts)
        r = self.rewards(list(prompts) * 2, list(responses_a) + list(responses_b))  # (K, 2B)
        w = torch.tensor(self.weights, dtype=torch.float64)
        return (w[:, None] * torch.sigmoid(r[:, :B] - r[:, B:])).sum(0).to(torch.float32)  # (B,)

    def winrate_matrix(self, prompts, groups):
        check_groups(prompts, groups)
        B, n = len(groups), len(groups[0]) if groups else 0
        r = self.rewards([x for x, g in zip(prompts, groups) for _ in g], [y for g in groups for y in g])
        r = r.view(-1, B, n)  # (K, B, n)
        w = torch.tensor(self.weights, dtype=torch.float64)
        M = (w[:, None, None, None] * torch.sigmoid(r[..., :, None] - r[..., None, :])).sum(0)  # (B, n, n)
        return M.to(torch.float32)


# ---------------------------------------------------------------------------
# 3. Pairwise judge
# ---------------------------------------------------------------------------


class PairwiseJudge(Oracle):
    """A causal LM reads (instruction, output a, output b) and answers which is better.

    q(x, a, b) = p(answer_a) / (p(answer_a) + p(answer_b)) at the first token where
    the two answer strings differ (their common prefix is appended to the prompt).
    Both orders are judged and averaged,
        P(a > b) = (q(x, a, b) + 1 - q(x, b, a)) / 2,
    so position bias cancels and P(a > b) + P(b > a) = 1 exactly.
    """

    def __init__(self, path, device, template=DEFAULT_JUDGE_TEMPLATE, answer_a="Output (a)", answer_b="Output (b)",
                 dtype=None, batch_size=8, max_length=4096, use_chat_template=None, shards=None):
        from transformers import AutoModelForCausalLM

        check_template(template)
        self.path, self.device, self.template = path, device, template
        self.batch_size, self.max_length, self.use_chat_template = batch_size, max_length, use_chat_template
        self.tokenizer = load_tokenizer(path, f"judge {path}")
        self.prefix_ids, self.token_a, self.token_b = answer_tokens(self.tokenizer, answer_a, answer_b)
        self.scoring = scoring_of(shards)
        if shards is not None:  # sharded (train_ddp under fsdp)
            self.model = shards.load(path, AutoModelForCausalLM, model_dtype(device, dtype))
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype(device, dtype),
                                                              local_files_only=True).to(device)
        self.model.eval()
        self.calls = 0

    KEYS = {
        "path": Key(None, "local directory of the causal LM judge (required)", text),
        "template": Key(DEFAULT_JUDGE_TEMPLATE, "the judge's prompt, with {instruction}, {output_a} and {output_b}",
                        text),
        "answer_a": Key("Output (a)", "the answer that says the first output is better", text),
        "answer_b": Key("Output (b)", "the answer that says the second output is better", text),
        "use_chat_template": Key(None, "wrap the judge's prompt in its chat template (default: if it has one)",
                                 optional(flag)),
        "arch": ARCH_KEY,
        **MODEL_COMMON,
    }

    @classmethod
    def check_config(cls, block, check_paths=True):
        if "path" not in block:
            raise OracleError("oracle.path is required for kind pairwise_judge (a local causal LM directory)")
        check_template(block.get("template", DEFAULT_JUDGE_TEMPLATE))
        if check_paths:
            config = check_model_dir(block["path"], "oracle.path")
            archs = getattr(config, "architectures", None) or []
            if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
                raise OracleError(f"oracle.path: {block['path']} is a {', '.join(archs)}, not a causal LM judge")
        return dict(block)

    SHARDABLE = True

    @classmethod
    def from_config(cls, cfg, device, shards=None):
        keys = ("template", "answer_a", "answer_b", "use_chat_template", "dtype", "batch_size", "max_length")
        return cls(cfg["path"], device, shards=shards, **{k: cfg[k] for k in keys if k in cfg})

    def models(self):
        return [self.model]

    def judge_ids(self, prompt, first, second):
        text = self.template.format(instruction=prompt, output_a=first, output_b=second)
        text = chat_text(self.tokenizer, text, None, self.use_chat_template)
        ids = self.tokenizer(text, add_special_tokens=not wants_chat_template(self.tokenizer, self.use_chat_template))[
            "input_ids"]
        ids = ids[-(self.max_length - len(self.prefix_ids)):]  # keep the question at the end if too long
        return ids + self.prefix_ids

    @torch.no_grad()
    def first_wins(self, prompts, firsts, seconds):
        """(B,) float64 q: the judge's probability that the first-shown output is better."""
        from sample import left_pad, output_logits, positions

        seqs = [self.judge_ids(x, a, b) for x, a, b in zip(prompts, firsts, seconds)]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = torch.empty(len(seqs), dtype=torch.float64)
        with self.scoring(self.model):
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                ids, mask = left_pad([seqs[i] for i in idx], self.tokenizer.pad_token_id, self.device)
                h = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                                          use_cache=False).last_hidden_state[:, -1]  # (b, H)
                logits = output_logits(self.model, h).float()  # (b, V): only the last position reaches the output
                two = torch.stack([logits[:, self.token_a], logits[:, self.token_b]], -1)
                out[idx] = torch.softmax(two.double(), -1)[:, 0].cpu()
                self.calls += len(idx)
        return out

    def prob(self, prompts, responses_a, responses_b):
        check_pairs(prompts, responses_a, responses_b)
        B = len(prompts)
        q = self.first_wins(list(prompts) * 2, list(responses_a) + list(responses_b), list(responses_b) + list(responses_a))
        return ((q[:B] + 1 - q[B:]) / 2).to(torch.float32)

    def winrate_matrix(self, prompts, groups):
        """Each ordered pair (i, j), i != j, is judged once; M[i, j] = (q[i, j] + 1 - q[j, i]) / 2."""
        check_groups(prompts, groups)
        B, n = len(groups), len(groups[0]) if groups else 0
        ordered = [(i, j) for i in range(n) for j in range(n) if i != j]
        q = torch.full((B, n, n), 0.5, dtype=torch.float64)
        if ordered:
            qs = self.first_wins([x for x in prompts for _ in ordered], [g[i] for g in groups for i, _ in ordered],
                                 [g[j] for g in groups for _, j in ordered]).view(B, len(ordered))
            for k, (i, j) in enumerate(ordered):
                q[:, i, j] = qs[:, k]
        return ((q + 1 - q.transpose(1, 2)) / 2).to(torch.float32)


def check_template(template):
    if not isinstance(template, str):
        raise OracleError(f"oracle.template must be a string, got {type(template).__name__}")
    missing = [s for s in ("{instruction}", "{output_a}", "{output_b}") if s not in template]
    if missing:
        raise OracleError(f"oracle.template is missing the slot(s) {', '.join(missing)}: the judge must see "
                          "the instruction and both outputs")
    try:
        template.format(instruction="", output_a="", output_b="")
    except (KeyError, IndexError, ValueError) as e:
        raise OracleError(f"oracle.template has a stray format field {e} (write literal braces as {{{{ }}}})") from None


def answer_tokens(tokenizer, answer_a, answer_b):
    """(common prefix ids, token id of a, token id of b) at the first position the two answers differ."""
    ia = tokenizer(answer_a, add_special_tokens=False)["input_ids"]
    ib = tokenizer(answer_b, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(ia), len(ib)) and ia[k] == ib[k]:
        k += 1
    if k == len(ia) or k == len(ib):
        raise OracleError(f"oracle answers {answer_a!r} and {answer_b!r} do not differ in a token "
                          "(one is a prefix of the other)")
    return ia[:k], ia[k], ib[k]


# ---------------------------------------------------------------------------
# The config-level factory
# ---------------------------------------------------------------------------

KINDS = {"category": CategoryGame, "bt_mixture": BTMixture, "pairwise_judge": PairwiseJudge}  # kind: Oracle class
# (smollm2.py adds the offline demo's minilm_rubrics; a new oracle is a class with KEYS, check_config, from_config)


def check_weights(weights, where):
    if abs(sum(weights) - 1) > 1e-6:
        raise OracleError(f"{where} weights sum to {sum(weights):.6g}, must sum to 1 (eq. 4 is a mixture)")


def check_oracle_config(block, check_paths=True):
    """Validate an `oracle:` block without loading any weights (each key by its kind's KEYS, then the kind's
    check_config); raise OracleError naming the key. Returns the block with its defaults."""
    if not isinstance(block, dict):
        raise OracleError(f"oracle must be a mapping with a 'kind' key, got {block!r}")
    kind = block.get("kind", "category")
    if kind not in KINDS:
        raise OracleError(f"oracle.kind: unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    check_block({k: v for k, v in block.items() if k != "kind"}, KINDS[kind].KEYS, "oracle", f" for kind {kind}")
    return {"kind": kind, **KINDS[kind].check_config(block, check_paths)}


def load_payoff_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise OracleError(f"oracle.payoff: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise OracleError(f"oracle.payoff: {path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def build_oracle(block=None, device=None, shards=None):
    """An Oracle from a config block (default: the category game of App. I). shards (train_ddp under fsdp:
    fsdp.OracleShards): how a kind whose SHARDABLE is set loads its models and holds them while they score;
    default: whole on `device`."""
    cfg = check_oracle_config(block if block is not None else {"kind": "category"})
    kind, device = KINDS[cfg["kind"]], torch.device(device) if device is not None else default_device()
    if shards is not None and kind.SHARDABLE:
        return kind.from_config(cfg, device, shards=shards)
    return kind.from_config(cfg, device)


def load_oracle_yaml(path):
    """The `oracle:` block of a YAML file (the whole file if it has no such key), validated."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise OracleError(f"cannot read oracle config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise OracleError(f"oracle config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    block = data.get("oracle", data) if isinstance(data, dict) else data
    check_oracle_config(block)
    return block
