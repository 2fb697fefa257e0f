"""Per-rank memory plan of a training config on N ranks, from the model's architecture alone, and the disk
plan of its checkpoints. Printed by `python bench/plan.py CONFIG --world N` and `train_ddp.py CONFIG --check`.

The model is built on the meta device (no weights, no hub): --arch names one
of the shipped recipes' architectures (their public config.json numbers,
below) or a local directory with a config.json; default: the config's model.
Printed per rank, in GiB: the persistent state (fp32 master weights or
shards, gradients, AdamW moments, the gathered root, the frozen pi_ref /
opponent) and the two peaks on top of it: the rollout (the gathered policy
when rollout: gathered, the KV cache of prompts x n x (prompt + response)
tokens) and one training micro-batch (activations with and without
activation checkpointing, the fused log-prob's logits chunk, one gathered
block and its fp32 gradient during the reduce-scatter). The state rows are
exact parameter arithmetic, checked against the bytes the trainers hold
(tests/test_sharded.py); activations are an estimate (saved tensors of a
Llama-style block, in the compute dtype). The oracle's models are derived
from their own config.json when their directories are here, else from the
`arch` of each oracle model entry (oracle_plan: shards under fsdp, each
gathered whole in turn while it scores: a third peak). --measured prints the plan's
two peaks next to the largest rollout_peak_gib / train_peak_gib that a CUDA
run of the same config logged (torch.cuda.max_memory_allocated per phase).
"""
import functools
import math

import torch

import comal
import config
import fsdp
import model_dirs
from keys import ConfigError
from opponents import OPPONENTS

# the public config.json numbers of the recipes' models (configs/llama3_8b_*.yaml, configs/qwen25_7b_*.yaml)
ARCHS = {
    "llama3_8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "qwen25_7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2_1p5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)),
}
GIB = 2 ** 30


def architecture(arch):
    """(HF config, [parameters per transformer block], root parameters) of a meta-device model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch in ARCHS:
        hf = AutoConfig.for_model(ARCHS[arch][0], **ARCHS[arch][1])
        *blocks, root = named_units(arch, AutoModelForCausalLM)
        return hf, blocks, root
    hf = AutoConfig.from_pretrained(arch, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    *blocks, root = unit_sizes(model)
    return hf, blocks, root


@functools.lru_cache(maxsize=None)
def named_units(arch, auto_class):
    """unit_sizes of a named architecture (ARCHS) with `auto_class`'s head, built once on the meta device."""
    from transformers import AutoConfig

    with torch.device("meta"):
        return tuple(unit_sizes(auto_class.from_config(AutoConfig.for_model(ARCHS[arch][0], **ARCHS[arch][1]))))


def unit_sizes(model):
    """Parameters of each fsdp unit of `model`: its transformer blocks, then the root (everything else; a tied
    weight counted once, where it first appears)."""
    seen, sizes = set(), []
    for part in fsdp.transformer_blocks(model) + [model]:
        ps = [p for p in part.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        sizes.append(sum(p.numel() for p in ps))
    return sizes


def plan(cfg, hf, blocks, root, world, device="cuda"):
    """{row: bytes per rank}. The units of parallel: fsdp are the blocks and the root, each padded to N."""
    c = config.compute_dtype(cfg, device).itemsize  # the trainers' compute dtype (bf16: 2 bytes)
    spec = comal.ALGOS[cfg["algo"]]
    P = sum(blocks) + root
    shard = sum(math.ceil(n / world) for n in blocks + [root])  # this rank's entries over all units
    opp = OPPONENTS[spec.opponent]  # a frozen copy of the policy for the opponent, in its dtype (opponents.py)
    frozen = ([c] if spec.ref != "none" else []) + ([4 if opp.copy == "float32" else c] if opp and opp.copy else [])
    rows = {}
    if cfg["parallel"] == "fsdp":
        rows["master shards (fp32)"] = 4 * shard
        rows["gradient shards (fp32)"] = 4 * shard
        rows["AdamW moments (fp32)"] = 8 * shard
        rows["root, kept gathered"] = c * root
        rows["frozen copies (shards)"] = sum(b * shard for b in frozen)
        rollout_weights = c * P if cfg["rollout"] == "gathered" else c * max(blocks)
        unit_transient = (c + 4 + 4) * max(blocks)  # gathered block, its full gradient, the flat being scattered
    else:
        rows["weights (fp32)"] = 4 * P
        rows["gradients (fp32)"] = 4 * P
        rows["AdamW moments (fp32)"] = 8 * P
        rows["frozen copies"] = sum(b * P for b in frozen)
        rollout_weights = 0
        unit_transient = 4 * min(P, cfg["bucket_mb"] << 20) * 2  # a bucket and its all-reduced copy
    H, L, V = hf.hidden_size, hf.num_hidden_layers, hf.vocab_size
    kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or H // hf.num_attention_heads
    inter = getattr(hf, "intermediate_size", 4 * H)
    T = cfg["max_prompt_tokens"] + cfg["max_new_tokens"]
    # prompts in one generate call: rollout_batch_size, at most this rank's share (0 = the whole subset: unknown here)
    per = min(filter(None, (cfg["rollout_batch_size"], cfg["prompts_per_iteration"] // world)), default=0)
    if not per:
        raise SystemExit("error: prompts_per_iteration 0 (the whole subset) and rollout_batch_size 0: one generate "
                         "call over the whole subset, whose KV cache this plan cannot bound; set rollout_batch_size")
    kv = L * 2 * kv_heads * head_dim * c * per * cfg["n_samples"] * T
    if opp and opp.rollout_models > 1:  # its rollout: several models gathered together, a KV cache each
        rollout_weights *= opp.rollout_models
        kv *= opp.rollout_models
    tokens = cfg["micro_batch_size"] * T
    per_layer = tokens * c * (6 * H + 2 * kv_heads * head_dim + 4 * inter)  # saved tensors of one block
    logits = 4 * min(tokens, 1024) * V * 2  # the fused log-prob's fp32 chunk and its gradient
    rows_peak = {
        "rollout: gathered weights": rollout_weights,
        "rollout: KV cache": kv,
        "training: activations, no checkpointing": per_layer * L + logits,
        "training: activations, activation_checkpointing": tokens * c * H * L + per_layer + logits,
        "training: gathered unit / gradient buckets": unit_transient,
    }
    return rows, rows_peak


def oracle_units(entry, auto_class):
    """unit_sizes of one oracle model, built on the meta device from its directory's config.json (its own code
    with trust_remote_code) when it is here, else from its `arch` entry (a name of ARCHS, the head of
    `auto_class`); None when neither says. A named arch must agree with a present directory's config.json."""
    import os

    from transformers import AutoConfig

    where, arch, path = entry.get("where", "oracle"), entry.get("arch"), str(entry["path"])
    if arch is not None and arch not in ARCHS:
        raise ConfigError(f"{where}.arch {arch!r} is not one of {', '.join(ARCHS)}")
    remote = bool(entry.get("trust_remote_code"))
    if os.path.isfile(os.path.join(path, "config.json")):
        hf = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=remote)
        if arch is not None:
            kind, kw = ARCHS[arch]
            off = {k: (getattr(hf, k, None), v) for k, v in kw.items() if getattr(hf, k, None) != v}
            if hf.model_type != kind or off:
                raise ConfigError(f"{where}.arch {arch} disagrees with {path}/config.json (model_type "
                                  f"{hf.model_type}; config.json vs arch: {off}): fix or drop the arch entry")
    elif arch is not None:
        return list(named_units(arch, auto_class))
    else:
        return None
    with torch.device("meta"):
        return unit_sizes(auto_class.from_config(hf, trust_remote_code=remote))


def oracle_plan(block, world, parallel, device="cuda"):
    """(bytes each rank holds of the oracle's models between scorings, bytes gathered on top while one scores)
    from each model's own config.json, or its `arch` entry before its weights are here (oracle_units); None
    when a model has neither. Under fsdp each model is held as shards of its blocks and root
    (fsdp.OracleShards) and gathered whole, one at a time, to score: the largest one's full (padded) buffers;
    under ddp each is whole on every rank."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if block.get("kind") == "bt_mixture":
        entries = [dict(m, where=f"oracle.models[{k}]") for k, m in enumerate(block["models"])]
        cls = AutoModelForSequenceClassification
    elif block.get("kind") == "pairwise_judge":
        entries, cls = [block], AutoModelForCausalLM
    else:
        return 0, 0  # the category game holds no model; another kind's models are not modelled here
    b = model_dirs.model_dtype(device, block.get("dtype")).itemsize  # the dtype the oracle loads its models in
    held, gathered = 0, 0
    for m in entries:
        units = oracle_units(m, cls)
        if units is None:
            return None
        if parallel == "fsdp":
            held += b * sum(math.ceil(n / world) for n in units)
            gathered = max(gathered, b * sum(math.ceil(n / world) * world for n in units))
        else:
            held += b * sum(units)
    return held, gathered


def report(cfg, arch, world, gpu_gib=80.0):
    """(lines of the per-rank plan in GiB with its peaks, rollout bytes, {activation_checkpointing: training
    bytes}, scoring bytes or None) of cfg on `world` ranks; arch: a recipe architecture name or a model
    directory. The oracle's models (oracle_plan) are in the state, and gathered one at a time in a third peak,
    scoring, after the rollout's buffers are freed; a model with neither its directory nor an arch entry is
    NOT counted, and the plan says so."""
    hf, blocks, root = architecture(arch)
    rows, peaks = plan(cfg, hf, blocks, root, world)
    derived = oracle_plan(cfg["oracle"], world, cfg["parallel"])
    if derived is not None:
        rows["oracle models (shards under fsdp)"] = derived[0]
        peaks["scoring: one oracle model gathered"] = derived[1]
    state = sum(rows.values())
    lines = [f"memory on {world} rank(s), parallel {cfg['parallel']}, {(sum(blocks) + root) / 1e9:.2f}B parameters, "
             f"per rank (GiB):"]
    lines += [f"  {k:50s} {v / GIB:8.2f}" for k, v in {**rows, **peaks}.items()]
    rollout = state + peaks["rollout: gathered weights"] + peaks["rollout: KV cache"]
    scoring = state + derived[1] if derived is not None else None
    train = {}
    for ckpt in (False, True):
        act = peaks["training: activations, activation_checkpointing" if ckpt else "training: activations, no checkpointing"]
        train[ckpt] = state + act + peaks["training: gathered unit / gradient buckets"]
        fits = "fits" if max(rollout, train[ckpt], scoring or 0) <= gpu_gib * GIB else "does NOT fit"
        lines.append(f"  peak, activation_checkpointing={str(ckpt).lower():5s}: rollout {rollout / GIB:.1f}, training "
                     f"{train[ckpt] / GIB:.1f}" + (f", scoring {scoring / GIB:.1f}" if scoring else "") +
                     f" -> {fits} in {gpu_gib:g} GiB" +
                     ("  <- this config" if ckpt == bool(cfg["activation_checkpointing"]) else ""))
    if derived is None:
        lines.append("  NOT counted: the oracle's models (neither their directories nor an arch entry for each)")
    return lines, rollout, train, scoring


def disk(cfg, arch):
    """(bytes of one checkpoint, how many are kept, a line): the policy in fp32 (safetensors), AdamW's two fp32
    moments unless optimizer_reset: iteration, and the frozen copies that are state of the run (pi_ref when it
    is updated in rounds, the opponent's copy), in their dtype (bf16 on GPU for a compute-dtype copy)."""
    hf, blocks, root = architecture(arch)
    P = sum(blocks) + root
    spec, opp = comal.ALGOS[cfg["algo"]], OPPONENTS[comal.ALGOS[cfg["algo"]].opponent]
    c = config.compute_dtype(cfg, "cuda").itemsize
    one = 4 * P + (8 * P if cfg["optimizer_reset"] == "never" else 0) + (c * P if spec.ref == "rounds" else 0)
    one += (4 if opp.copy == "float32" else c) * P if opp and opp.copy else 0
    written = math.ceil(cfg["iterations"] / cfg["checkpoint_every"])
    kept = min(written, cfg["keep_checkpoints"]) if cfg["keep_checkpoints"] else written
    line = (f"disk: {one / 1e9:.3g} GB per checkpoint x {kept} kept (keep_checkpoints {cfg['keep_checkpoints']}, "
            f"checkpoint_every {cfg['checkpoint_every']}) = {one * kept / 1e9:.3g} GB")
    return one, kept, line
