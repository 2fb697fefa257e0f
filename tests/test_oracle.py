"""oracle.py: the category game, the Bradley-Terry mixture (eq. 4) and the pairwise judge on tiny saved models."""
import json
import os

import pytest
import torch
import yaml

import category_dist
import oracle
import tiny
import toy_game
from tiny import llama_config, save_judge, save_reward_model

PROMPTS = ["why rock", "write a short poem", "list two numbers"]
RESPONSES = ["rock is good", "paper beats it because", "scissors and more", "the answer is no",
             "very long story about code", "yes."]


REMOTE_CODE = '''"""A reward model whose head is its own code (as ArmoRM's gating head is): a Llama trunk, a regression layer
to several objectives, a frozen transform matrix and a gating MLP on the last token; its output carries `score`."""
from dataclasses import dataclass

import torch
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class GatedOutput(ModelOutput):
    score: torch.FloatTensor = None
    rewards: torch.FloatTensor = None


class GatedRewardModel(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        k = config.num_objectives
        self.regression_layer = torch.nn.Linear(config.hidden_size, k, bias=False)
        self.gating = torch.nn.Sequential(torch.nn.Linear(config.hidden_size, 16), torch.nn.ReLU(), torch.nn.Linear(16, k))
        self.post_init()
        self.reward_transform_matrix = torch.nn.Parameter(torch.ones(k, k) / k + torch.arange(k * k).view(k, k) / k ** 2,
                                                          requires_grad=False)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        # the trunk called with the keywords of code written for transformers 4 (ArmoRM's does this)
        h = self.model(input_ids, attention_mask=attention_mask, position_ids=None, past_key_values=None,
                       inputs_embeds=None, use_cache=False, output_attentions=False, output_hidden_states=False,
                       return_dict=True)[0]
        last = attention_mask.sum(-1) - 1  # right padding
        h = h[torch.arange(h.shape[0]), last]
        rewards = self.regression_layer(h) @ self.reward_transform_matrix
        score = (torch.softmax(self.gating(h), -1) * rewards).sum(-1)
        return GatedOutput(score=score, rewards=rewards)
'''


def save_remote_code_reward_model(path, seed, vocab):
    """A tiny reward model loadable only with trust_remote_code: its class lives in the directory's own
    modeling_gated.py (config.json's auto_map), as ArmoRM's does."""
    import importlib.util

    os.makedirs(path, exist_ok=True)
    (path / "modeling_gated.py").write_text(REMOTE_CODE)
    spec = importlib.util.spec_from_file_location(f"modeling_gated_{seed}", path / "modeling_gated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = tiny.train_tokenizer(tiny.synthetic_text(seed=seed), vocab, chat_template=True)
    torch.manual_seed(seed)
    config = llama_config(tok, num_objectives=3)
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_gated.GatedRewardModel"}
    config.architectures = ["GatedRewardModel"]
    module.GatedRewardModel(config).save_pretrained(path)
    config.save_pretrained(path)  # save_pretrained of an unregistered class drops auto_map: write it back
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("oracle_models")
    return {"rm1": save_reward_model(d / "rm1", 1, 300, chat=True),
            "rm2": save_reward_model(d / "rm2", 2, 420, chat=False),  # another tokenizer, no chat template
            "judge": save_judge(d / "judge")}


def all_pairs(prompts=PROMPTS, responses=RESPONSES):
    xs, a, b = [], [], []
    for x in prompts:
        for i, ya in enumerate(responses):
            for yb in responses[i + 1:]:
                xs.append(x), a.append(ya), b.append(yb)
    return xs, a, b


# ---------------------------------------------------------------------------
# Category game
# ---------------------------------------------------------------------------


def test_category_game_reproduces_the_payoff_on_hand_written_responses():
    game = oracle.build_oracle({"kind": "category"})
    written = ["Rock, obviously.", "paper", "  scissors! cut", "rocks are not rock", "", "paper-thin"]
    assert game.category(written).tolist() == [0, 1, 2, -1, -1, -1]
    cats = ["rock wins", "Paper.", "scissors"]
    A = torch.tensor(oracle.PAPER_PAYOFF)
    for i, a in enumerate(cats):
        for j, b in enumerate(cats):
            assert game.prob(["x"], [a], [b]).item() == pytest.approx(A[i, j].item(), abs=0)
    # an uncategorised response loses to every category and ties another uncategorised one
    assert game.prob(["x"] * 4, ["hello", "rock", "hello", "no"], ["paper", "hello", "nope", "yes"]).tolist() == [0, 1, .5, .5]
    M = game.winrate_matrix(["x", "y"], [cats + ["none"], ["scissors", "rock", "rock", "paper"]])
    assert torch.equal(M[0, :3, :3], A)
    assert M[0, 3].tolist() == [0, 0, 0, 0.5] and M[0, :3, 3].tolist() == [1, 1, 1]
    xs, a, b = ["y"] * 16, [], []
    for ya in ["scissors", "rock", "rock", "paper"]:
        for yb in ["scissors", "rock", "rock", "paper"]:
            a.append(ya), b.append(yb)
    assert torch.equal(M[1].flatten(), game.prob(xs, a, b))


def test_category_game_exploitability_matches_the_tabular_game():
    game = oracle.CategoryGame()
    A = torch.tensor(oracle.PAPER_PAYOFF, dtype=torch.float64)
    assert abs(float(game.exploitability(toy_game.PAPER_NE))) < 1e-15
    p = [0.2, 0.5, 0.3]
    assert float(game.exploitability(p)) == pytest.approx(toy_game.exploitability(A, p), abs=1e-15)
    assert float(game.exploitability(p)) == pytest.approx(0.2 * 0.2 + 0.9 * 0.5 + 0.5 * 0.3 - 0.5)  # scissors is the best response
    # mass on "none" only adds exploitability: the best response to [NE * 0.9, 0.1 none] wins 0.1 * 1 more
    q = [x * 0.9 for x in toy_game.PAPER_NE] + [0.1]
    assert float(game.exploitability(q)) == pytest.approx(0.9 * 0.5 + 0.1 - 0.5)
    batch = game.exploitability(torch.tensor([p, toy_game.PAPER_NE]))
    assert batch.shape == (2,)
    # a 4-category game from a payoff file
    payoff = [[0.5, 1, 0, 0.5], [0, 0.5, 1, 0.5], [1, 0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]
    g4 = oracle.build_oracle({"kind": "category", "categories": ["a", "b", "c", "d"], "payoff": payoff})
    assert g4.prob(["x"], ["a"], ["b"]).item() == 1.0 and float(g4.exploitability([0.25] * 4)) == pytest.approx(0)


# ---------------------------------------------------------------------------
# Bradley-Terry mixture (eq. 4)
# ---------------------------------------------------------------------------


def bt(models, weights=(0.3, 0.7)):
    return oracle.build_oracle({"kind": "bt_mixture", "batch_size": 4, "models": [
        {"path": models["rm1"], "weight": weights[0]}, {"path": models["rm2"], "weight": weights[1]}]}, device="cpu")


def reward_by_hand(path, x, y, chat):
    """One unpadded forward of the saved model: the reward r(x, y)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": x}, {"role": "assistant", "content": y}], tokenize=False)
    else:
        text = f"{x}\n\n{y}"
    ids = tok(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0])


def test_bt_mixture_is_eq4_and_symmetric(models):
    o = bt(models)
    xs, a, b = all_pairs()
    p_ab, p_ba = o.prob(xs, a, b), o.prob(xs, b, a)
    assert p_ab.shape == (len(xs),) and ((p_ab >= 0) & (p_ab <= 1)).all()
    assert (p_ab + p_ba - 1).abs().max() < 1e-6
    assert p_ab.std() > 0.01  # the random models do prefer some responses
    for k in (0, 7, 20):  # eq. 4 by hand, from single unpadded forwards
        r1 = [reward_by_hand(models["rm1"], xs[k], y, True) for y in (a[k], b[k])]
        r2 = [reward_by_hand(models["rm2"], xs[k], y, False) for y in (a[k], b[k])]
        s = lambda d: 1 / (1 + torch.exp(-torch.tensor(d, dtype=torch.float64)))  # noqa: E731
        hand = 0.3 * s(r1[0] - r1[1]) + 0.7 * s(r2[0] - r2[1])
        assert abs(p_ab[k].item() - hand.item()) < 1e-5


def test_bt_mixture_scores_each_distinct_response_once(models):
    o = bt(models)
    groups = [RESPONSES[:4] + RESPONSES[:1], RESPONSES[1:]]  # a duplicate inside the first group
    M = o.winrate_matrix(PROMPTS[:2], groups)
    assert [rm.calls for rm in o.reward_models] == [4 + 5, 4 + 5]  # 5 responses, 4 distinct; then 5 for another prompt
    assert torch.allclose(M + M.transpose(1, 2), torch.ones_like(M), atol=1e-6)
    assert torch.equal(M.diagonal(dim1=1, dim2=2), torch.full((2, 5), 0.5))
    # the matrix equals prob() on each pair, which re-scores but gives the same numbers
    for bi, (x, g) in enumerate(zip(PROMPTS[:2], groups)):
        a = [g[i] for i in range(5) for j in range(5)]
        b = [g[j] for i in range(5) for j in range(5)]
        assert torch.allclose(M[bi].flatten(), o.prob([x] * 25, a, b), atol=1e-6)
    before = [rm.calls for rm in o.reward_models]
    o.prob(["q"] * 10, ["same"] * 10, ["other"] * 10)
    assert [rm.calls - c for rm, c in zip(o.reward_models, before)] == [2, 2]


def test_sample_is_reproducible_and_its_mean_is_prob(models):
    o = bt(models)
    xs, a, b = all_pairs(PROMPTS[:1], RESPONSES[:4])  # 6 pairs
    p = o.prob(xs, a, b).double()
    reps = 4000
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    y1 = o.sample(xs * reps, a * reps, b * reps, g())
    y2 = o.sample(xs * reps, a * reps, b * reps, g())
    y3 = o.sample(xs * reps, a * reps, b * reps, torch.Generator().manual_seed(12))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert set(y1.unique().tolist()) <= {0.0, 1.0}
    mean = y1.view(reps, -1).double().mean(0)
    z = (mean - p) / (p * (1 - p) / reps).sqrt()
    assert z.abs().max() < 4.0  # 6 two-sided tests at ~6e-5 each
    chi2 = float((z ** 2).sum())
    assert chi2 < 22.46  # chi-square, 6 dof, 99.9%


# ---------------------------------------------------------------------------
# Pairwise judge
# ---------------------------------------------------------------------------


def test_judge_averages_both_orders_and_matches_a_hand_computation(models):
    o = oracle.build_oracle({"kind": "pairwise_judge", "path": models["judge"], "batch_size": 3}, device="cpu")
    xs, a, b = all_pairs(PROMPTS[:2], RESPONSES[:4])
    p_ab, p_ba = o.prob(xs, a, b), o.prob(xs, b, a)
    assert (p_ab + p_ba - 1).abs().max() < 1e-6 and p_ab.std() > 1e-3
    # by hand: one unpadded forward per order, full logits, softmax over the two answer tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["judge"])
    lm = AutoModelForCausalLM.from_pretrained(models["judge"]).eval()
    ta, tb = tok("Output (a)", add_special_tokens=False)["input_ids"], tok("Output (b)", add_special_tokens=False)["input_ids"]
    k = next(i for i in range(len(ta)) if ta[i] != tb[i])

    def q(x, first, second):
        text = oracle.DEFAULT_JUDGE_TEMPLATE.format(instruction=x, output_a=first, output_b=second)
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"] + ta[:k]
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([ids])).logits[0, -1].double()
        return torch.softmax(logits[[ta[k], tb[k]]], 0)[0]

    for i in (0, 5, 9):
        hand = (q(xs[i], a[i], b[i]) + 1 - q(xs[i], b[i], a[i])) / 2
        assert abs(p_ab[i].item() - hand.item()) < 1e-5
    # the matrix judges each ordered pair once and agrees with prob
    calls = o.calls
    M = o.winrate_matrix(PROMPTS[:2], [RESPONSES[:4], RESPONSES[1:5]])
    assert o.calls - calls == 2 * 4 * 3
    assert torch.allclose(M + M.transpose(1, 2), torch.ones_like(M), atol=1e-6)
    g = RESPONSES[1:5]
    assert torch.allclose(M[1].flatten(), o.prob([PROMPTS[1]] * 16, [y for y in g for _ in g], [y for _ in g for y in g]),
                          atol=1e-6)


# ---------------------------------------------------------------------------
# The factory and bad input
# ---------------------------------------------------------------------------


def test_factory_builds_each_kind_from_yaml(models, tmp_path):
    blocks = {
        "category": {"kind": "category", "categories": ["rock", "paper", "scissors"]},
        "bt_mixture": {"kind": "bt_mixture", "models": [{"path": models["rm1"], "weight": 0.5},
                                                        {"path": models["rm2"], "weight": 0.5}]},
        "pairwise_judge": {"kind": "pairwise_judge", "path": models["judge"], "answer_a": "Output (a)",
                           "answer_b": "Output (b)"},
    }
    types = {"category": oracle.CategoryGame, "bt_mixture": oracle.BTMixture, "pairwise_judge": oracle.PairwiseJudge}
    for kind, block in blocks.items():
        f = tmp_path / f"{kind}.yaml"
        f.write_text(yaml.safe_dump({"oracle": block}))
        built = oracle.build_oracle(oracle.load_oracle_yaml(str(f)), device="cpu")
        assert isinstance(built, types[kind])
        p = built.prob(["why rock"], ["rock is good"], ["paper"])
        assert p.shape == (1,) and 0 <= p.item() <= 1


def expect_error(block, *needles, **kw):
    with pytest.raises(oracle.OracleError) as e:
        oracle.check_oracle_config(block, **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_factory_rejects_unknown_kinds_keys_and_values(models):
    expect_error({"kind": "elo"}, "oracle.kind", "'elo'", "category, bt_mixture, pairwise_judge")
    expect_error({"kind": "category", "temperature": 1}, "oracle.temperature", "unknown key", "category")
    expect_error({"kind": "bt_mixture", "models": [{"path": models["rm1"], "wieght": 1}]}, "oracle.models[0].wieght")
    expect_error({"kind": "bt_mixture", "models": [{"path": models["rm1"], "weight": 0.5},
                                                   {"path": models["rm2"], "weight": 0.2}]}, "sum to 0.7")
    expect_error({"kind": "bt_mixture", "models": [{"path": models["rm1"], "weight": -1}]}, "oracle.models[0].weight", "> 0")
    expect_error({"kind": "bt_mixture", "models": []}, "oracle.models")
    expect_error({"kind": "bt_mixture", "models": [models["rm1"]]}, "oracle.models[0]", "mapping")
    expect_error({"kind": "bt_mixture", "models": [{"path": models["rm1"]}], "batch_size": 0}, "oracle.batch_size", ">= 1")
    expect_error({"kind": "pairwise_judge", "path": models["judge"], "dtype": "fp8"}, "oracle.dtype")
    expect_error({"kind": "pairwise_judge"}, "oracle.path", "required")
    expect_error({"kind": "category", "categories": ["rock"]}, "oracle.categories")
    expect_error({"kind": "category", "categories": ["rock", "Rock", "x"]}, "duplicates")
    expect_error({"kind": "category", "categories": ["a", "b"]}, "oracle.payoff is required")
    expect_error({"kind": "category", "payoff": [[0.5, 0.6], [0.4, 0.5]]}, "oracle.payoff", "2x2", "3 categories")
    expect_error({"kind": "category", "categories": ["a", "b"], "payoff": [[0.5, 0.7], [0.4, 0.5]]}, "must be 1")
    expect_error({"kind": "category", "case_sensitive": "yes"}, "oracle.case_sensitive", "true or false")
    expect_error("category", "oracle must be a mapping")


def test_bad_paths_fail_before_loading_with_one_line(models, tmp_path):
    expect_error({"kind": "pairwise_judge", "path": "meta-llama/Llama-3-OffsetBias-8B"}, "does not exist",
                 "hub name", "local directory")
    expect_error({"kind": "pairwise_judge", "path": str(tmp_path / "nowhere")}, "does not exist")
    (tmp_path / "empty").mkdir()
    expect_error({"kind": "pairwise_judge", "path": str(tmp_path / "empty")}, "no config.json")
    (tmp_path / "f.txt").write_text("x")
    expect_error({"kind": "pairwise_judge", "path": str(tmp_path / "f.txt")}, "is a file")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(open(os.path.join(models["rm1"], "config.json")).read())
    expect_error({"kind": "bt_mixture", "models": [{"path": str(noweights)}]}, "oracle.models[0]", "no weights")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_text("")
    expect_error({"kind": "pairwise_judge", "path": str(broken)}, "oracle.path", "cannot read")
    # a causal LM is not a reward model; a reward model is not a judge
    expect_error({"kind": "bt_mixture", "models": [{"path": models["judge"]}]}, "LlamaForCausalLM", "no reward head")
    expect_error({"kind": "pairwise_judge", "path": models["rm1"]}, "LlamaForSequenceClassification", "not a causal LM")
    expect_error({"kind": "bt_mixture", "models": [{"path": models["rm1"], "reward_index": 3}]}, "reward_index")
    with pytest.raises(oracle.OracleError, match="cannot read oracle config"):
        oracle.load_oracle_yaml(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("oracle: [unclosed")
    with pytest.raises(oracle.OracleError, match="not valid YAML"):
        oracle.load_oracle_yaml(str(tmp_path / "bad.yaml"))
    (tmp_path / "payoff.json").write_text(json.dumps([[0.5, 0.1], [0.9]]))
    expect_error({"kind": "category", "categories": ["a", "b"], "payoff": str(tmp_path / "payoff.json")}, "not square")


def test_a_reward_models_own_code_that_does_not_import_is_one_line_before_loading(tmp_path):
    """trust_remote_code: the class in the directory's auto_map is imported by the config check, before any
    weights load; code written for another transformers (ArmoRM's imports LLAMA_INPUTS_DOCSTRING, which
    transformers 5 no longer has) is one OracleError naming the model, the version and the import."""
    path = save_remote_code_reward_model(tmp_path / "rm", 3, 300)
    block = {"kind": "bt_mixture", "models": [{"path": path, "trust_remote_code": True}]}
    assert oracle.check_oracle_config(block)["kind"] == "bt_mixture"  # it imports
    code = tmp_path / "rm" / "modeling_gated.py"
    code.write_text(code.read_text().replace(
        "from transformers.utils import ModelOutput",
        "from transformers.utils import ModelOutput\nfrom transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING"))
    expect_error(block, "oracle.models[0]", "modeling_gated.GatedRewardModel", "does not import with transformers",
                 "LLAMA_INPUTS_DOCSTRING")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    (tmp_path / "rm" / "config.json").write_text(json.dumps(dict(config, auto_map={})))
    expect_error(block, "auto_map names no AutoModelForSequenceClassification")


def test_bad_templates_and_answers(models):
    j = {"kind": "pairwise_judge", "path": models["judge"]}
    expect_error(dict(j, template="Which is better? {output_a} or {output_b}"), "oracle.template", "{instruction}")
    expect_error(dict(j, template="{instruction}: {output_a}"), "{output_b}")
    expect_error(dict(j, template="{instruction} {output_a} {output_b} {score}"), "stray format field", "score")
    expect_error(dict(j, template=3), "oracle.template must be a string")
    expect_error(dict(j, answer_a=1), "oracle.answer_a", "must be a string")
    expect_error(dict(j, use_chat_template="auto"), "oracle.use_chat_template", "true or false")
    with pytest.raises(oracle.OracleError, match="do not differ"):
        oracle.build_oracle(dict(j, answer_a="Output", answer_b="Output (b)"), device="cpu")


def test_policy_distribution_honours_max_new_tokens_against_brute_force(base):
    """The exact category distribution of a response capped at max_new_tokens, against every 1- and 2-token
    response enumerated by brute force: a first word still open at the cap is what the oracle sees (e.g.
    "roc" is none, "rock" cut before "s" is rock)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    game = oracle.CategoryGame()
    prompt = tok.apply_chat_template([{"role": "user", "content": tiny.synthetic_prompts(1, 5)[0]}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    eos, C = tok.eos_token_id, len(game.categories)

    @torch.no_grad()
    def next_logp(prefixes):
        batch = torch.tensor([ids + p for p in prefixes])
        return torch.log_softmax(model(input_ids=batch).logits[:, -1].double(), -1)

    def category(seq):
        text = tok.decode(seq[:seq.index(eos)] if eos in seq else seq, skip_special_tokens=True)
        return int(game.category([text])[0])

    first = next_logp([[]])[0]  # (V,)
    brute1 = torch.zeros(C + 1, dtype=torch.float64)
    for t in range(len(first)):
        brute1[category([t])] += first[t].exp()
    brute2 = torch.zeros(C + 1, dtype=torch.float64)
    open_ = [t for t in range(len(first)) if t != eos]
    second = next_logp([[t] for t in open_])  # (V-1, V)
    brute2[category([eos])] += first[eos].exp()
    for row, t in enumerate(open_):
        p = (first[t] + second[row]).exp()
        for u in range(len(first)):
            brute2[category([t, u])] += p[u]
    for cap, brute in ((1, brute1), (2, brute2)):
        got, pruned = game.policy_distribution(model, tok, [ids], [eos], cap, min_mass=1e-12)
        assert float((got[0] - brute).abs().max()) < 1e-6 + float(pruned.max()), (cap, got, brute)  # fp32 forwards
        # Only tokens above 20% are decoded and expanded; the rest of each step's vocabulary is settled from the
        # token table (tail_fates). Left unsettled is exactly the first-token tail whose word is still open
        # (nothing at the cap, where every response ends).
        got, pruned = game.policy_distribution(model, tok, [ids], [eos], cap, min_mass=0.2)
        open_tail = sum(float(first[t].exp()) for t in range(len(first)) if cap > 1 and t != eos and first[t].exp() <= 0.2
                        and game.outcome(tok.decode([t], skip_special_tokens=True), False) == C + 1)
        assert abs(float(pruned[0]) - open_tail) < 1e-6, (cap, pruned, open_tail)
        assert float((got[0] - brute).abs().max()) < 1e-6 + float(pruned[0]), (cap, got, brute)
        assert float((got[0, :C] - brute[:C]).clamp(min=0).max()) < 1e-6  # unsettled mass only adds to "none"
    assert float((brute1 - brute2).abs().max()) > 1e-4  # the cap matters for this model
    # the vocabulary tail after an open prefix, settled from the token table (kept per text), is what outcome()
    # says of the prefix's text followed by each token's text: for every token, open and at the cap
    table = category_dist.token_table(game, tok, len(first))
    every = torch.arange(len(table["cont"]))
    for text in ["r", "roc", "rock", "Rock", "sc", "pap", ".", "I", "\"rock"]:
        for at_cap in (False, True):
            want = torch.tensor([game.outcome(text + s, at_cap) for s in table["cont"]])
            for _ in range(2):  # computed, then from the memo
                assert torch.equal(category_dist.tail_fates(game, table, text, 1, every, at_cap), want), (text, at_cap)
    # the table is shared with a game of the same rule whose tokenizer is loaded again, and with no other rule
    assert category_dist.token_table(oracle.CategoryGame(), AutoTokenizer.from_pretrained(base), len(first)) is table
    two = oracle.CategoryGame(categories=["rock", "paper"])
    other = category_dist.token_table(two, tok, len(first))
    assert other is not table
    assert torch.equal(other["fate_cont"][0], torch.tensor([two.outcome(s, False) for s in other["cont"]]))
