"""sample.py on every architecture family the trainer accepts: greedy sampling equals model.generate and
sequence_logprobs equals the model's own log-softmax, including output transforms (Gemma-2's final-logit
softcapping, Cohere's logit scale, Granite's logits scaling); a model with an unknown transform is refused."""
import functools

import pytest
import torch
import transformers as tf

import sample
from test_sample import BOS, EOS, PAD, V, greedy_both, prompts_of
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS,
              bos_token_id=BOS, initializer_range=0.3)
ARCHS = {  # name: (config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    # a small cap so that softcapping changes the log-probs a lot (Gemma-2-9B uses 30)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0,
                                                      "sliding_window": 16}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 3.0}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def build(arch, seed=0):
    cfg_cls, model_cls, extra = ARCHS[arch]
    kw = {k: v for k, v in dict(COMMON, **extra).items() if v is not None}
    torch.manual_seed(seed)
    cfg = getattr(tf, cfg_cls)(**kw)
    if hasattr(cfg, "attn_implementation"):
        cfg._attn_implementation = "eager"
    return getattr(tf, model_cls)(cfg).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_generate_and_logprobs_equal_the_model_itself(arch):
    model = build(arch)
    prompts = prompts_of([7, 3, 10, 5])
    out, hf = greedy_both(model, prompts, 12)
    assert torch.equal(out.response_ids[:, :hf.shape[1]], hf), arch
    # log-probs of sampled sequences (temperature 1, left-padded) against the model's own full logits
    s = sample.generate(model, prompts, n=2, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    input_ids, att, resp = s.sequences()
    tok, seq = sample.sequence_logprobs(model, input_ids, att, resp)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=att, position_ids=sample.positions(att)).logits.float()
    naive = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]
    assert resp.sum() > 10
    assert (tok[:, 1:] - naive).abs().max() < 1e-4, arch
    assert (s.token_logps - tok[:, -s.token_logps.shape[1]:]).abs().max() < 1e-4, arch  # the sampler's own
    assert sample.check_logprob_path(model) < 1e-4


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite"])
def test_output_transforms_matter_and_their_gradients_are_exact(arch):
    """Without the transform the log-probs would be far off (the bug this guards against); the fused
    backward through scale and tanh equals autograd through the model's own logits."""
    model = build(arch).double()
    ids = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(2))
    att = torch.ones_like(ids)
    resp = att.clone()
    resp[:, :3] = 0
    head = model.get_output_embeddings()
    with torch.no_grad():
        h = model.base_model(input_ids=ids, attention_mask=att).last_hidden_state
        plain = torch.log_softmax(head(h)[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]
    ours = sample.sequence_logprobs(model, ids, att, resp)[0]
    assert (ours[:, 1:] - plain).abs().max() > 0.05  # the transform is not negligible here
    w = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        if fused:
            tok = sample.sequence_logprobs(model, ids, att, resp, chunk_tokens=5)[0]
        else:
            logits = model(input_ids=ids, attention_mask=att).logits
            tok = torch.zeros_like(w)
            tok[:, 1:] = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]
        (tok * w).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 1e-3
    assert torch.allclose(grads[0], grads[1], atol=1e-9, rtol=1e-7)


def test_a_model_with_an_unknown_output_transform_is_refused():
    model = build("llama")
    inner = model.forward

    def forward(*a, **kw):  # a made-up architecture: logits halved after the output layer
        out = inner(*a, **kw)
        out.logits = out.logits * 0.5
        return out

    model.forward = forward
    with pytest.raises(sample.UnsupportedModel, match="LlamaForCausalLM.*logit_transform"):
        sample.check_logprob_path(model)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shared_prompt_forward_equals_the_whole_batch_in_values_and_gradients(arch):
    """sequence_logprobs(share_prompts=True) (each distinct prompt once, its samples over a copy of its KV
    cache) against one forward of every row: same log-probs and the same gradient of every parameter (fp32), on
    left-padded prompts of different lengths with 3 samples each of different response lengths
    (gemma2: sliding window 16 < prompt + response, so the cached path crosses the window)."""
    model = build(arch)
    s = sample.generate(model, prompts_of([7, 3, 14]), n=3, max_new_tokens=8, temperature=1.0,
                        generator=torch.Generator().manual_seed(1))
    ids, att, resp = s.sequences()
    P = s.prompt_ids.shape[1]
    for i in range(len(ids)):  # responses of 3..8 tokens, right-padded as after an EOS
        att[i, P + 3 + i % 6:] = resp[i, P + 3 + i % 6:] = 0
        ids[i, P + 3 + i % 6:] = PAD
    assert ids.shape[1] > 16 and len(set(resp.sum(-1).tolist())) > 3
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    out = []
    for share in (True, False):
        model.zero_grad()
        tok = sample.sequence_logprobs(model, ids, att, resp, share_prompts=share)[0]
        (tok * w).sum().backward()
        out.append((tok.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (t_shared, g_shared), (t_plain, g_plain) = out
    assert (t_plain * resp).abs().sum() > 1 and g_plain.abs().max() > 1e-3
    assert (t_shared - t_plain).abs().max() < 1e-5, arch  # fp32 (float64 gives NaN in Gemma-2's own padded rows)
    assert (g_shared - g_plain).abs().max() <= 1e-5 * g_plain.abs().max(), arch


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_repeated_rows_run_once_and_equal_every_row_run(arch):
    """sequence_logprobs(unique_rows=True) (identical rows forwarded once, their log-probs copied) against every
    row run: the same log-probs and gradients in fp32, with and without share_prompts, on a batch where rows repeat
    within a prompt's samples and where two rows share their tokens but not their response mask (not identical);
    the forward really is smaller (a spy counts rows); a model that draws dropout in training runs every row."""
    model = build(arch)
    s = sample.generate(model, prompts_of([7, 3]), n=3, max_new_tokens=4, temperature=1.0,
                        generator=torch.Generator().manual_seed(1))
    ids, att, resp = (torch.cat([x, x[[0, 0, 4, 1]]]) for x in s.sequences())  # rows 6, 7 = row 0; 8 = 4; 9 = 1
    resp[9, -1] = 0  # same tokens as row 1, one response token fewer: a different row
    first, inverse = sample.distinct_rows(ids, att, resp)
    assert first.tolist() == sorted(set(first.tolist())) and torch.equal(inverse[first], torch.arange(len(first)))
    assert len(first) <= 7 and inverse[6] == inverse[7] == inverse[0] and inverse[8] == inverse[4] != inverse[9]
    for i in range(len(ids)):
        j = int(first[inverse[i]])
        assert torch.equal(ids[i], ids[j]) and torch.equal(resp[i], resp[j]) and torch.equal(att[i], att[j])
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    seen = []
    real = model.base_model.forward

    @functools.wraps(real)  # inspect.signature sees the real forward's: sample.cache_kwargs picks its keyword
    def spy(*a, **kw):
        seen.append(kw["input_ids"].shape[0])
        return real(*a, **kw)

    model.base_model.forward = spy
    for share in (False, True):
        out = []
        for unique in (True, False):
            model.zero_grad()
            seen.clear()
            tok, seq = sample.sequence_logprobs(model, ids, att, resp, share_prompts=share, unique_rows=unique)
            (tok * w).sum().backward()
            out.append((tok.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]), max(seen)))
            assert torch.equal(seq, tok.sum(-1))
        (t_u, g_u, rows_u), (t_all, g_all, rows_all) = out
        assert rows_u == len(first) < rows_all == len(ids)
        assert (t_u - t_all).abs().max() < 1e-5 and (t_all * resp).abs().sum() > 1
        assert (g_u - g_all).abs().max() <= 1e-5 * g_all.abs().max()
    model.base_model.forward = real
    model.config.attention_dropout = 0.1
    model.train()
    assert sample.has_dropout(model)
    seen.clear()
    model.base_model.forward = spy
    sample.sequence_logprobs(model, ids, att, resp, unique_rows=True)
    assert max(seen) == len(ids)  # dropout: each row its own mask
