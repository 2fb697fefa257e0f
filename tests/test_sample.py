"""sample.py against model.generate, exact distributions and the naive log-softmax."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import sample

V, PAD, EOS, BOS = 61, 0, 1, 2


def tiny(arch, tie=True, std=0.3, seed=0):
    """A random tiny model whose logits are far from uniform (large init) so greedy paths vary."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS,
                          bos_token_id=BOS, tie_word_embeddings=tie, initializer_range=std)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=128, pad_token_id=PAD,
                         eos_token_id=EOS, bos_token_id=BOS, initializer_range=std, tie_word_embeddings=tie)
        model = GPT2LMHeadModel(cfg)
    return model.eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(3, V, (L - 1,), generator=g).tolist() for L in lengths]


def greedy_both(model, prompts, max_new_tokens):
    """Greedy samples of sample.generate and of model.generate (its new tokens) on the same left-padded prompts."""
    out = sample.generate(model, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0)
    ids, mask = sample.left_pad(prompts, PAD, "cpu")
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                            pad_token_id=PAD, eos_token_id=EOS)[:, ids.shape[1]:]
    return out, hf


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_model_generate_and_padding_is_invisible(arch):
    model = tiny(arch)
    prompts = prompts_of([7, 3, 12, 5])
    out, hf = greedy_both(model, prompts, 24)
    R = hf.shape[1]
    assert torch.equal(out.response_ids[:, :R], hf)
    assert (out.response_ids[:, R:] == PAD).all()
    assert len({tuple(r) for r in out.response_ids.tolist()}) > 1  # the outputs are not all the same
    for i, p in enumerate(prompts):  # each prompt alone gives the same tokens
        alone = sample.generate(model, [p], n=1, max_new_tokens=24, temperature=0)
        assert torch.equal(alone.response_ids[0], out.response_ids[i])


def test_eos_stops_rows_masks_the_rest_and_compaction_changes_nothing():
    model = tiny("llama", std=0.5, seed=3)
    prompts = prompts_of([4, 9, 6, 5, 8, 3], seed=4)
    # make a frequent token the EOS so that rows finish at different steps
    free = sample.generate(model, prompts, n=1, max_new_tokens=30, temperature=0, eos_token_ids=[])
    eos = int(free.response_ids[:, :10].flatten().mode().values)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = sample.generate(model, prompts, n=4, max_new_tokens=30, temperature=1.0, eos_token_ids=[eos], generator=g())
    b = sample.generate(model, prompts, n=4, max_new_tokens=30, temperature=1.0, eos_token_ids=[eos], generator=g(),
                        compact_fraction=2.0)  # never compacts
    ends = []
    for row in range(a.response_ids.shape[0]):
        ids, m = a.response_ids[row], a.response_mask[row]
        L = int(m.sum())
        assert (m[:L] == 1).all() and (m[L:] == 0).all() and (ids[L:] == PAD).all()
        assert (a.token_logps[row, L:] == 0).all() and (a.token_logps[row, :L] < 0).all()
        if L < 30:
            assert ids[L - 1] == eos and not (ids[:L - 1] == eos).any()
        ends.append(L)
    assert len(set(ends)) > 2 and min(ends) < 30
    # greedy decisions do not depend on the batch layout; sampling consumes the RNG differently
    # once rows are dropped, so compare greedy runs for compaction and sampled runs for repeatability
    ga = sample.generate(model, prompts, n=2, max_new_tokens=30, temperature=0, eos_token_ids=[eos])
    gb = sample.generate(model, prompts, n=2, max_new_tokens=30, temperature=0, eos_token_ids=[eos], compact_fraction=2.0)
    assert torch.equal(ga.response_ids, gb.response_ids) and torch.equal(ga.response_mask, gb.response_mask)
    torch.testing.assert_close(ga.token_logps, gb.token_logps, atol=1e-5, rtol=0)
    a2 = sample.generate(model, prompts, n=4, max_new_tokens=30, temperature=1.0, eos_token_ids=[eos], generator=g())
    assert torch.equal(a.response_ids, a2.response_ids)  # same generator state, same samples
    assert b.response_ids.shape == a.response_ids.shape


def test_decode_step_replaces_only_the_decode_forwards_and_keeps_the_batch_whole():
    model = tiny("llama", std=0.5, seed=3)
    prompts = prompts_of([4, 9, 6, 5], seed=4)
    free = sample.generate(model, prompts, n=1, max_new_tokens=20, temperature=0, eos_token_ids=[])
    eos = int(free.response_ids[:, :8].flatten().mode().values)  # rows finish at different steps
    calls, batches = [0], set()

    def step(**kw):  # what torch.compile(model) would be called with (the bench compiles it)
        calls[0] += 1
        batches.add(kw["input_ids"].shape[0])
        return model(**kw)

    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    ref = sample.generate(model, prompts, n=3, max_new_tokens=20, temperature=1.0, eos_token_ids=[eos], generator=g(),
                          compact_fraction=2.0)  # the eager path, never compacting: same RNG use
    got = sample.generate(model, prompts, n=3, max_new_tokens=20, temperature=1.0, eos_token_ids=[eos], generator=g(),
                          decode_step=step)
    assert torch.equal(got.response_ids, ref.response_ids) and torch.equal(got.response_mask, ref.response_mask)
    torch.testing.assert_close(got.token_logps, ref.token_logps, atol=1e-6, rtol=0)
    assert calls[0] == int(ref.response_mask.sum(-1).max()) - 1 and batches == {12}  # every decode step, never compacted


def test_chunked_rollout_equals_one_batch():
    """comal.sample_groups with rollout_batch_size: chunks concatenated by cat_samples give the one-batch
    result (greedy: the same tokens; the log-probs of the padded whole equal each chunk's)."""
    import comal

    model = tiny("llama", std=0.5, seed=3)
    prompts = prompts_of([4, 9, 6, 5, 8, 3, 7], seed=4)
    tok = type("Tok", (), {"pad_token_id": PAD, "batch_decode": lambda self, ids, **kw: [str(r.tolist()) for r in ids]})()
    cfg = dict(n_samples=2, max_new_tokens=12, temperature=0, top_p=1.0)
    whole, texts = comal.sample_groups(model, tok, prompts, cfg, None)
    parts, texts3 = comal.sample_groups(model, tok, prompts, dict(cfg, rollout_batch_size=3), None)
    assert texts3 == texts and len(texts3) == len(prompts)
    R = whole.response_ids.shape[1]
    assert parts.response_ids.shape[1] == R and torch.equal(parts.response_ids, whole.response_ids)
    assert torch.equal(parts.response_mask, whole.response_mask)
    torch.testing.assert_close(parts.token_logps, whole.token_logps, atol=1e-5, rtol=0)
    ids, att, resp = parts.sequences()
    lp = sample.sequence_logprobs(model, ids, att, resp)[0][:, -R:]
    torch.testing.assert_close(lp, parts.token_logps, atol=1e-4, rtol=0)
    assert parts.prompt_ids.shape[1] == whole.prompt_ids.shape[1] == 9  # chunks padded to the longest prompt


def reference_first_token_probs(model, prompt, temperature, top_k, top_p):
    """softmax(logits / t) restricted to top-k then top-p, written with sort + loops."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double() / temperature
    order = torch.argsort(logits, descending=True).tolist()
    if top_k:
        order = order[:top_k]
    p = torch.softmax(logits[order], 0)
    keep, mass = [], 0.0
    for tok, q in zip(order, p.tolist()):
        if mass >= top_p:
            break
        keep.append(tok)
        mass += q
    probs = torch.zeros(V, dtype=torch.float64)
    probs[keep] = torch.softmax(logits[keep], 0)
    return probs


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 8, 1.0), (0.9, 12, 0.9)])
def test_first_token_distribution_chi_square(temperature, top_k, top_p):
    model = tiny("llama", std=0.08)
    prompt = prompts_of([6])[0]
    n = 6000
    out = sample.generate(model, [prompt], n=n, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out.response_ids[:, 0], minlength=V).double()
    probs = reference_first_token_probs(model, prompt, temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0  # nothing outside the top-k / top-p set
    support = probs > 0
    expected = n * probs[support]
    assert (expected > 5).sum() >= 5
    big = expected > 5  # pool rare tokens into one cell
    obs = torch.cat([counts[support][big], counts[support][~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(exp) - 1
    # 99.9% quantile of chi-square via the Wilson-Hilferty approximation
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < crit, (chi2, crit, dof)
    # the returned log-probs are those of temperature 1, unfiltered
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    torch.testing.assert_close(out.token_logps[:, 0], full[out.response_ids[:, 0]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sampler_and_trainer_logprobs_agree(arch):
    model = tiny(arch)
    out = sample.generate(model, prompts_of([5, 11, 8]), n=3, max_new_tokens=16, temperature=1.0,
                          generator=torch.Generator().manual_seed(2))
    ids, am, rm = out.sequences()
    tok, seq = sample.sequence_logprobs(model, ids, am, rm)
    P = out.prompt_ids.shape[1]
    assert (tok[:, :P] == 0).all()
    torch.testing.assert_close(tok[:, P:], out.token_logps, atol=1e-4, rtol=0)
    torch.testing.assert_close(seq, out.token_logps.sum(-1), atol=1e-4, rtol=0)


def naive_logprobs(model, ids, am, rm):
    logits = model(input_ids=ids, attention_mask=am, position_ids=sample.positions(am)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * rm[:, 1:]
    tok = torch.cat([torch.zeros_like(lp[:, :1]), lp], 1)
    return tok, tok.sum(-1)


@pytest.mark.parametrize("arch,tie,padded", [("llama", True, True), ("llama", False, False), ("gpt2", True, True)])
def test_fused_logprobs_values_and_gradients_equal_naive(arch, tie, padded):
    model = tiny(arch, tie=tie, std=0.05)  # moderate activations: fp32 summation-order noise stays < 1e-6
    prompts = prompts_of([6, 3, 9] if padded else [6, 6, 6])
    ids, am = sample.left_pad(prompts, PAD, "cpu")
    g = torch.Generator().manual_seed(9)
    resp = torch.randint(3, V, (3, 7), generator=g)
    rmask = torch.ones(3, 7, dtype=torch.long)
    if padded:
        rmask[1, 4:] = 0
        resp[1, 4:] = PAD
    ids, am = torch.cat([ids, resp], 1), torch.cat([am, rmask], 1)
    rm = torch.cat([torch.zeros_like(sample.left_pad(prompts, PAD, "cpu")[1]), rmask], 1)
    weights, tok_weights = torch.randn(3), 0.5 * torch.randn(ids.shape)  # a loss using both outputs
    grads = []
    for fn in (lambda: sample.sequence_logprobs(model, ids, am, rm, chunk_tokens=5), lambda: naive_logprobs(model, ids, am, rm)):
        model.zero_grad()
        tok, seq = fn()
        ((seq * weights).sum() + (tok * tok_weights).sum()).backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()}, tok.detach(), seq.detach()))
    (g_fused, tok_f, seq_f), (g_naive, tok_n, seq_n) = grads
    torch.testing.assert_close(tok_f, tok_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(seq_f, seq_n, atol=1e-5, rtol=0)
    for name in g_naive:
        torch.testing.assert_close(g_fused[name], g_naive[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    head = model.get_output_embeddings().weight
    assert head.grad is not None and head.grad.abs().sum() > 0  # reaches the (tied) output embedding


def test_bf16_runs_and_stays_close_to_fp32():
    model = tiny("llama")
    prompts = prompts_of([5, 8])
    out32 = sample.generate(model, prompts, n=2, max_new_tokens=8, temperature=0)
    ids, am, rm = out32.sequences()
    t32, s32 = sample.sequence_logprobs(model, ids, am, rm)
    model16 = model.to(torch.bfloat16)
    out16 = sample.generate(model16, prompts, n=2, max_new_tokens=8, temperature=0)
    assert out16.token_logps.dtype == torch.float32 and out16.response_ids.shape == out32.response_ids.shape
    t16, s16 = sample.sequence_logprobs(model16, ids, am, rm)
    assert t16.dtype == torch.float32
    torch.testing.assert_close(s16, s32.detach(), atol=0.2, rtol=0.05)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(n=0), "n must"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
])
def test_bad_arguments_name_themselves(kwargs, needle):
    model = tiny("llama")
    with pytest.raises(ValueError, match=needle):
        sample.generate(model, prompts_of([4]), **kwargs)


def test_model_without_pad_or_eos_needs_a_pad_token():
    model = tiny("llama")
    model.config.pad_token_id = None
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id"):
        sample.generate(model, prompts_of([4, 6]), max_new_tokens=2)
    out = sample.generate(model, prompts_of([4, 6]), max_new_tokens=2, pad_token_id=5)  # explicit pad works
    assert out.response_ids.shape == (2, 2)


def test_generate_signature_defaults_are_the_declared_sampling_keys():
    import inspect

    params = inspect.signature(sample.generate).parameters
    assert {k: params[k].default for k in sample.SAMPLING} == {k: v.default for k, v in sample.SAMPLING.items()}
    with pytest.raises(ValueError, match=r"^top_k must be an int >= 0, got -1$"):
        sample.check_sampling_args([[1]], top_k=-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_mixture_samples_the_geometric_mixture_of_its_models(arch):
    """generate on a Mixture (Nash-MD's pi^(1 - beta) pi_ref^beta) equals a slow reference that runs both models on
    the whole sequence at every step and mixes their log-softmaxes: greedy tokens and the mixture's log-probs
    (an EOS ends a row)."""
    a, b = tiny(arch, seed=0), tiny(arch, seed=5)
    prompts, beta, T = prompts_of([5, 9, 3], seed=2), 0.3, 12
    mix = sample.Mixture([a, b], [1 - beta, beta])
    out = sample.generate(mix, prompts, n=1, max_new_tokens=T, temperature=0, eos_token_ids=[7])
    for i, p in enumerate(prompts):
        seq, lps = list(p), []
        for _ in range(T):
            with torch.no_grad():
                lp = sum(w * torch.log_softmax(m(input_ids=torch.tensor([seq])).logits[0, -1].float(), -1)
                         for m, w in ((a, 1 - beta), (b, beta)))
            t = int(lp.argmax())
            seq.append(t)
            lps.append(float(lp[t] - torch.logsumexp(lp, -1)))
            if t == 7:
                break
        got = out.response_ids[i, :len(lps)].tolist()
        assert got == seq[len(p):], (i, got, seq[len(p):])
        assert torch.allclose(out.token_logps[i, :len(lps)], torch.tensor(lps), atol=1e-5)
        assert int(out.response_mask[i].sum()) == len(lps)
    alone = sample.generate(a, prompts, n=1, max_new_tokens=T, temperature=0)
    assert not torch.equal(alone.response_ids, out.response_ids)  # beta moved the samples
    one = sample.generate(sample.Mixture([a, b], [1.0, 0.0]), prompts, n=1, max_new_tokens=T, temperature=0)
    assert torch.equal(one.response_ids, alone.response_ids)  # weight 0: the first model alone
