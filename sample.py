"""KV-cached batched sampling and the one log-prob function of comal.

generate():  each prompt is prefilled once; its KV cache is replicated for
             its n samples into a cache preallocated for the whole response
             and updated in place; rows that emit EOS stop, and the batch is
             compacted when enough rows have finished that the smaller batch
             pays for the copy.
sequence_logprobs():  per-token and per-sequence log-probs of response tokens
             with a fused, chunked output layer: logits exist only chunk by
             chunk, in forward and in backward, never as a (B, T, V) tensor.

Both work for any transformers causal LM whose logits are the output layer
applied to `base_model(...).last_hidden_state`, then optionally scaled and
soft-capped (logit_transform: Cohere's logit_scale, Granite's logits_scaling,
Falcon-H1's lm_head_multiplier, Gemma-2/3's final_logit_softcapping). The
trainer calls check_logprob_path() on the policy it loads (its frozen copies
share its architecture): a model whose own logits differ from that form is
refused with one line naming it, never trained on silently wrong log-probs. Left padding everywhere; positions are
counted from the first real token, so a padded batch computes exactly what
each row alone does.
"""
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import StaticCache

from keys import Key, integer, number, problem


@dataclass
class Samples:
    """n samples per prompt; row i*n + j is sample j of prompt i.

    prompt_ids (N, P) left-padded, prompt_mask (N, P); response_ids (N, R)
    right-padded with pad_token_id after EOS, response_mask (N, R) (the EOS
    token itself counts as response); token_logps (N, R) log-probs of the
    sampled tokens at temperature 1 (0 where masked).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    token_logps: torch.Tensor

    def sequences(self):
        """(input_ids, attention_mask, response_mask) of prompt + response, as sequence_logprobs takes them."""
        input_ids = torch.cat([self.prompt_ids, self.response_ids], 1)
        attention_mask = torch.cat([self.prompt_mask, self.response_mask], 1)
        response_mask = torch.cat([torch.zeros_like(self.prompt_mask), self.response_mask], 1)
        return input_ids, attention_mask, response_mask

    def to(self, device):
        return Samples(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def cat_samples(parts, pad_token_id):
    """One Samples from several (e.g. generate called on chunks of the prompts): prompts padded further on the
    left and responses on the right (masks 0, log-probs 0), which changes no row's log-probs (positions
    count from each row's first real token)."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    R = max(p.response_ids.shape[1] for p in parts)
    pad = lambda t, n, left, value: F.pad(t, (n, 0) if left else (0, n), value=value)  # noqa: E731
    return Samples(
        torch.cat([pad(p.prompt_ids, P - p.prompt_ids.shape[1], True, pad_token_id) for p in parts]),
        torch.cat([pad(p.prompt_mask, P - p.prompt_mask.shape[1], True, 0) for p in parts]),
        torch.cat([pad(p.response_ids, R - p.response_ids.shape[1], False, pad_token_id) for p in parts]),
        torch.cat([pad(p.response_mask, R - p.response_mask.shape[1], False, 0) for p in parts]),
        torch.cat([pad(p.token_logps, R - p.token_logps.shape[1], False, 0.0) for p in parts]))


def left_pad(prompts, pad_token_id, device):
    """(ids, mask) of shape (B, P) from a list of token-id lists, padded on the left."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def positions(mask):
    """Position ids counted from each row's first real token (left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def cache_kwargs(model, cache):
    """The cache keyword of this model's forward ('cache' in newer transformers, else 'past_key_values')."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}


def filter_logits(logits, top_k=0, top_p=1.0):
    """Restrict (N, V) logits to the top-k tokens, then to the smallest set of
    most likely tokens whose probability reaches top_p (others -> -inf)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


SAMPLING = {  # generate's sampling arguments (keys.Key); its signature's defaults are these
    "n": Key(1, "responses per prompt", integer(1)),
    "max_new_tokens": Key(128, "response length limit in tokens", integer(1)),
    "temperature": Key(1.0, "softmax temperature (0 = greedy)", number(0)),
    "top_p": Key(1.0, "nucleus sampling: the smallest set of tokens with this much probability", number(0, 1, lo_open=True)),
    "top_k": Key(0, "sample among the k most likely tokens (0 = off)", integer(0)),
}


def check_sampling_args(prompts, **args):
    for name, value in args.items():
        if msg := problem(name, SAMPLING[name], value):
            raise ValueError(msg)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")


@torch.inference_mode()
def generate(model, prompts, n=1, max_new_tokens=128, temperature=1.0, top_p=1.0, top_k=0,
             eos_token_ids=None, generator=None, pad_token_id=None, device=None, compact_fraction=0.25,
             all_done=None, decode_step=None):
    """Sample n responses for each prompt (lists of token ids); returns Samples.

    temperature 0 is greedy. eos_token_ids default to the model's
    generation/config eos ids; pad_token_id to its pad id, else the first EOS.
    `generator` (on the model's device) makes sampling repeatable. The batch is
    compacted once at least `compact_fraction` of the running rows finished.
    Results are returned on `device` (default: the model's device).
    `all_done(local_done) -> bool` keeps ranks in lockstep when every forward
    is a collective (sharded weights): decoding stops only when all ranks are
    done, and a rank never compacts its batch to nothing.
    `decode_step` replaces the model in the one-token decode forwards (e.g.
    torch.compile(model)); the batch is then never compacted, so every decode
    step has the same shapes and the cache tensors keep their addresses.
    """
    check_sampling_args(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k)
    dev = next(model.parameters()).device
    eos_token_ids, pad = eos_and_pad(model, prompts, eos_token_ids, pad_token_id)
    prompt_ids, prompt_mask = left_pad(prompts, pad, dev)
    B, P = prompt_ids.shape
    N, L = B * n, P + max_new_tokens
    decoder = Decoder(model, prompt_ids, prompt_mask, n, L, decode_step)
    logits = decoder.logits
    if decode_step is not None:  # a compiled step keeps static shapes: the batch is never compacted
        compact_fraction = float("inf")
    mask = torch.zeros(N, L, dtype=torch.long, device=dev)  # attention mask over the whole cache
    mask[:, :P] = prompt_mask.repeat_interleave(n, 0)
    next_pos = prompt_mask.sum(-1).repeat_interleave(n, 0)  # (N,) position id of the next token

    response = torch.full((N, max_new_tokens), pad, dtype=torch.long, device=dev)
    logps = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=dev)
    rows = torch.arange(N, device=dev)  # original row of each running row
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=dev)
    finished = torch.zeros(N, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        tok = next_token(logits, temperature, top_k, top_p, generator)
        response[rows, t] = tok
        # temperature-1 log-prob of the sampled token, what the losses need (no (N, V) log-softmax)
        logps[rows, t] = logits.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        if len(eos_token_ids):
            finished |= torch.isin(tok, eos)
        done = bool(finished.all())
        if t == max_new_tokens - 1 or (all_done(done) if all_done is not None else done):
            break
        mask[:, P + t] = 1
        if bool(finished.any()) and compact_fraction * len(rows) <= int(finished.sum()) < len(rows):
            idx = (~finished).nonzero().squeeze(-1)  # drop finished rows from the cache and the batch
            decoder.keep(idx)
            rows, tok, mask, next_pos, finished = rows[idx], tok[idx], mask[idx], next_pos[idx], finished[idx]
        # Finished rows not yet dropped keep decoding; what they produce after EOS is masked below.
        logits = decoder.step(tok, mask, next_pos, P + t)
        next_pos = next_pos + 1
    # Everything after each row's first EOS is padding and carries no log-prob.
    is_eos = torch.isin(response, eos) if len(eos_token_ids) else torch.zeros_like(response, dtype=torch.bool)
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return Samples(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0),
                   response.masked_fill(after, pad), (~after).long(), logps.masked_fill(after, 0.0)).to(
                   dev if device is None else device)


class Mixture:
    """A geometric mixture of causal LMs that share a tokenizer, sampled token by token: the next-token logits
    are sum_i w_i log_softmax(logits_i), e.g. Nash-MD's pi^(1 - beta) pi_ref^beta. generate() takes one in
    place of a model (its config, generation config and device are the first model's)."""

    def __init__(self, models, weights):
        if len(models) != len(weights) or not models:
            raise ValueError("a Mixture needs one weight per model")
        self.models, self.weights = list(models), [float(w) for w in weights]
        self.config, self.generation_config = models[0].config, getattr(models[0], "generation_config", None)

    def parameters(self):
        return self.models[0].parameters()


class Decoder:
    """generate's forwards: each model's StaticCache, prefilled once per prompt and replicated for its n
    samples; `logits` (N, V) float, the next token's. A Mixture combines its models' log-softmaxes; a plain
    model's logits are its own. decode_step (a compiled forward) replaces a plain model in the decode steps."""

    def __init__(self, model, prompt_ids, prompt_mask, n, L, decode_step=None):
        mixture = isinstance(model, Mixture)
        if mixture and decode_step is not None:
            raise ValueError("decode_step compiles one model's forward; a Mixture has several")
        self.models, self.weights = (model.models, model.weights) if mixture else ([model], None)
        parts = [prefill(m, prompt_ids, prompt_mask, n, L) for m in self.models]
        self.caches, self.kwargs = [c for c, _, _ in parts], [kw for _, kw, _ in parts]
        if decode_step is not None:  # static addresses for a compiled step (CUDA graphs need them)
            for layer in self.caches[0].layers:
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
            self.models = [decode_step]
        self.logits = self.combine([lg for _, _, lg in parts])

    def combine(self, logits):
        if self.weights is None:
            return logits[0]
        return sum(w * torch.log_softmax(lg, -1) for w, lg in zip(self.weights, logits))

    def step(self, tok, mask, pos, cache_position):
        """The logits after feeding `tok` (N,) at cache position `cache_position` (positions `pos` (N,))."""
        where = torch.tensor([cache_position], device=tok.device)
        outs = [m(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], cache_position=where, **kw)
                for m, kw in zip(self.models, self.kwargs)]
        self.logits = self.combine([o.logits[:, -1].float() for o in outs])
        return self.logits

    def keep(self, idx):
        """Only the rows idx go on (the others finished)."""
        for cache in self.caches:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]


def next_token(logits, temperature, top_k, top_p, generator):
    """(N,) the next token of each row: greedy at temperature 0, else sampled from the filtered softmax."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def eos_and_pad(model, prompts, eos_token_ids=None, pad_token_id=None):
    """The EOS ids (default: the model's generation config, else its config) and the pad id (default: its pad
    id, else the first EOS); an error if padding is needed and there is neither."""
    cfg = model.config
    if eos_token_ids is None:
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        eos = eos if eos is not None else cfg.eos_token_id
        eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    eos_token_ids = [int(e) for e in eos_token_ids]
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_token_ids[0] if eos_token_ids else None)
    if pad_token_id is None and (len({len(p) for p in prompts}) > 1 or eos_token_ids):
        raise ValueError("pad_token_id: the model has no pad or eos token, and padding is needed; pass pad_token_id")
    return eos_token_ids, 0 if pad_token_id is None else int(pad_token_id)


def prefill(model, prompt_ids, prompt_mask, n, L):
    """Each (left-padded) prompt's forward once into a StaticCache of L positions, then the cache replicated for
    its n samples: (cache, the cache's forward kwargs, (B n, V) float logits of the next token)."""
    cache = StaticCache(config=model.config, max_cache_len=L)
    cache_kw = cache_kwargs(model, cache)  # inspected once, not per decoded token
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions(prompt_mask),
                logits_to_keep=1, **cache_kw)
    for layer in cache.layers:
        layer.keys = layer.keys.repeat_interleave(n, 0)
        layer.values = layer.values.repeat_interleave(n, 0)
    return cache, cache_kw, out.logits[:, -1].float().repeat_interleave(n, 0)


# ---------------------------------------------------------------------------
# Log-probs: the one function used by sampler tests, training and evaluation
# ---------------------------------------------------------------------------


def logit_transform(model):
    """(scale, softcap) such that the model's logits are softcap * tanh(scale * z / softcap), z = the output
    layer's output (softcap None: scale * z). Read from the config attributes transformers models use."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere, Cohere2: logits * logit_scale
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite (logits), MiniCPM3 (hidden): / logits_scaling
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "lm_head_multiplier", None) is not None:  # Falcon-H1
        scale *= float(cfg.lm_head_multiplier)
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma-2/3: cap * tanh(logits / cap)
    return scale, (float(softcap) if softcap else None)


def _transform(z, scale, softcap):
    """(logits, d logits / d z) of the output layer's z, in z's dtype."""
    z = z * scale if scale != 1.0 else z
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, scale * (1 - t * t)


def output_logits(model, hidden):
    """The model's own logits from its last hidden states (output layer, scale, softcap): for the few
    positions read outside the fused function (the judge's answer token)."""
    scale, softcap = logit_transform(model)
    return _transform(model.get_output_embeddings()(hidden), scale, softcap)[0]


class FusedTokenLogprob(torch.autograd.Function):
    """log softmax(T(h W^T + b))[target] for (M, H) hidden states, chunk by chunk; T = logit_transform.

    Forward keeps only the (M,) log-sum-exp; backward recomputes each chunk's
    logits, so peak memory is O(chunk * V) instead of O(M * V).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, scale=1.0, softcap=None):
        M = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
        logp = torch.empty(M, dtype=acc, device=hidden.device)
        lse = torch.empty(M, dtype=acc, device=hidden.device)
        for s in range(0, M, chunk):
            logits = _transform(F.linear(hidden[s:s + chunk], weight, bias).to(acc), scale, softcap)[0]  # (c, V)
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            logp[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.scale, ctx.softcap = chunk, scale, softcap
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, scale, softcap = ctx.chunk, ctx.scale, ctx.softcap
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and ctx.needs_input_grad[2] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            logits, dlogits = _transform(F.linear(h, weight, bias).to(acc), scale, softcap)
            # d logp / d logits = onehot(target) - softmax(logits), then the chain rule through T
            g = -torch.exp(logits - lse[s:s + chunk, None])  # (c, V)
            g.scatter_add_(-1, targets[s:s + chunk, None], torch.ones_like(g[:, :1]))
            g.mul_(grad_logp[s:s + chunk, None].to(acc))
            g = g * dlogits if dlogits is not None else (g * scale if scale != 1.0 else g)
            if grad_h is not None:
                grad_h[s:s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(g.T, h.to(acc))
            if grad_b is not None:
                grad_b += g.sum(0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _last_hidden(model, input_ids, attention_mask, response_mask=None):
    """(B, T, H) last hidden states. With response_mask: rows whose columns before the first response column
    (of any row) are equal -- a prompt's n samples -- share one forward of those columns, and the rest of each
    row runs over a copy of that prompt's KV cache (autograd flows through the copy into the shared forward).
    The same function of the inputs as one forward of the whole batch (test_architectures, test_loop)."""
    base = model.base_model
    pos = positions(attention_mask)
    cols = response_mask.any(0).nonzero() if response_mask is not None else None
    split = int(cols[0]) if cols is not None and len(cols) else 0
    if split == 0:
        return base(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False).last_hidden_state
    from transformers import DynamicCache

    prefix, inverse = torch.unique(torch.cat([input_ids[:, :split], attention_mask[:, :split]], 1), dim=0,
                                   return_inverse=True)  # (U, 2 * split): each distinct prompt once; (B,) its index
    ids, mask = prefix[:, :split], prefix[:, split:]
    cache = DynamicCache(config=model.config)
    head = base(input_ids=ids, attention_mask=mask, position_ids=positions(mask), **cache_kwargs(base, cache))
    cache.batch_select_indices(inverse)  # (U, ...) -> (B, ...): each row's prompt keys and values
    tail = base(input_ids=input_ids[:, split:], attention_mask=attention_mask, position_ids=pos[:, split:],
                **cache_kwargs(base, cache))
    return torch.cat([head.last_hidden_state[inverse], tail.last_hidden_state], 1)


def sequence_logprobs(model, input_ids, attention_mask, response_mask, chunk_tokens=None, share_prompts=False,
                      unique_rows=False):
    """Per-token (B, T) and per-sequence (B,) log-probs of the response tokens.

    Token t's log-prob (under the model's prediction from positions < t) is at
    index t; positions with response_mask 0 are 0. Only response positions
    reach the output layer, in chunks of `chunk_tokens` rows (default: about
    64M logits per chunk), log-softmax in fp32. share_prompts: each distinct
    prompt (the columns before the first response token) runs once for all
    its rows (_last_hidden); not with activation checkpointing (its recompute
    would append to the cache again) nor sharded per-block gathers.
    unique_rows: identical rows (a prompt's n samples repeat short answers
    often) run once and their log-probs are copied (autograd sums the copies'
    gradients into the one forward): the same function of the inputs, unless
    the model draws dropout (then every row runs, each with its own mask).
    """
    if unique_rows and not (model.training and has_dropout(model)):
        first, inverse = distinct_rows(input_ids, attention_mask, response_mask)
        if len(first) < input_ids.shape[0]:
            tok, _ = sequence_logprobs(model, input_ids[first], attention_mask[first], response_mask[first],
                                       chunk_tokens, share_prompts)  # (U, T)
            tok = tok[inverse]  # (B, T)
            return tok, tok.sum(-1)
    hidden = _last_hidden(model, input_ids, attention_mask, response_mask if share_prompts else None)
    head = model.get_output_embeddings()
    B, T = input_ids.shape
    sel = response_mask[:, 1:].bool()  # token t+1 is predicted at position t
    h = hidden[:, :-1][sel]  # (M, H)
    targets = input_ids[:, 1:][sel]  # (M,)
    V = head.weight.shape[0]
    chunk = chunk_tokens or max(1, (1 << 26) // V)
    logp = FusedTokenLogprob.apply(h, head.weight, head.bias, targets, chunk, *logit_transform(model))  # (M,)
    token_logps = torch.zeros(B, T, dtype=logp.dtype, device=input_ids.device)
    token_logps[:, 1:] = token_logps[:, 1:].masked_scatter(sel, logp)
    return token_logps, token_logps.sum(-1)


def distinct_rows(*columns):
    """(first, inverse): the first index (U,) of each distinct row of the (B, T) tensors taken together, in
    order of appearance, and the (B,) position of every row's distinct row in `first`."""
    key = torch.cat([c.to(torch.int64) for c in columns], 1)  # (B, sum T)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)  # (B,) index of the row's distinct value
    B = key.shape[0]
    first = torch.full((int(inverse.max()) + 1 if B else 0,), B, dtype=torch.int64, device=key.device)
    first.scatter_reduce_(0, inverse, torch.arange(B, device=key.device), "amin")  # (U,) first row of each
    order = torch.argsort(first)  # distinct rows in order of appearance
    return first[order], torch.argsort(order)[inverse]


def has_dropout(model):
    """Whether a forward in training mode draws random masks: a Dropout module with p > 0, or a config
    *dropout* probability > 0 (attention dropout inside scaled_dot_product_attention is not a module)."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    cfg = getattr(model, "config", None)
    values = cfg.to_dict().items() if hasattr(cfg, "to_dict") else ()
    return any("dropout" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for k, v in values)


class UnsupportedModel(ValueError):
    """A model whose logits sequence_logprobs cannot reproduce: one line naming the architecture."""


@torch.no_grad()
def check_logprob_path(model, tokens=12, tol=1e-3):
    """Refuse a model whose own logits are not what sequence_logprobs computes (an output transform this
    file does not know): one short forward of both on a few tokens, compared in fp32."""
    dev = next(model.parameters()).device
    V = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, V, (1, tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones_like(ids)
    resp = mask.clone()
    resp[:, 0] = 0
    was_training = model.training
    model.eval()
    try:
        ours = sequence_logprobs(model, ids, mask, resp)[0][0, 1:].float()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
        theirs = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    finally:
        model.train(was_training)
    err = float((ours - theirs).abs().max())
    if not err <= tol:  # also catches NaN
        raise UnsupportedModel(
            f"{type(model).__name__} ({model.config.model_type}): its logits are not the output layer "
            f"(x logit scale, softcap) of the last hidden state that sequence_logprobs computes "
            f"(max log-prob difference {err:.3g} > {tol}); add its output transform to sample.logit_transform")
    return err
