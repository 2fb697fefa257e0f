"""Entry point: train a policy with COMAL or a baseline against a preference oracle.

    torchrun --nproc_per_node N train_ddp.py cfg.yaml [key=value ...]
    python train_ddp.py cfg.yaml [key=value ...]          # one process

Data parallelism is written out here (no DistributedDataParallel wrapper):
rank 0's parameters are broadcast at the start; every rank samples, judges
and trains on its own share of the prompts; before each optimizer step the
gradients are flattened into buckets and all-reduced (sum, then divide by
the world size: gloo has no AVG); micro-steps only accumulate locally.
gloo on CPU, nccl on CUDA. The algorithm itself is comal.run (Algorithm 3).

Every key of the config is in DEFAULTS, with its meaning; the resolved config
is written to <out_dir>/config.yaml, metrics to <out_dir>/metrics.jsonl, and a
checkpoint after every iteration to <out_dir>/checkpoints/iter-KKKKK (an HF
directory + trainer_state.pt, written under a temp name and renamed).
"""
import contextlib
import datetime
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

import comal
import oracle as oracle_lib

# key: (default, meaning). Types follow the defaults (an int is accepted for a float). The keys an
# algorithm reads (eta, tau, eta_tau, ref_update_every, pair_selection, clip_eps, kappa, ...) are not here:
# each algorithm's spec lists them (comal.ALGOS / comal.KEYS), and setting one the algorithm does not read
# is an error.
DEFAULTS = {
    "model": (None, "local HF directory of the base policy; null builds the tiny embedded base (tiny.py)"),
    "out_dir": ("runs/tiny", "where config.yaml, metrics.jsonl and checkpoints/ go"),
    "resume": ("auto", "auto: continue from the latest checkpoint in out_dir; never; or a checkpoint directory"),
    "seed": (0, "all randomness derives from (seed, purpose, iteration, rank): comal.seed_for"),
    "algo": ("comal", "one of " + ", ".join(comal.ALGOS)),
    "iterations": (30, "number of iterations k (one data subset each)"),
    "n_samples": (5, "responses per prompt (paper: 5)"),
    "temperature": (1.0, "sampling temperature (paper: 0.8; 1.0 samples mu itself, as the theory assumes)"),
    "top_p": (1.0, "nucleus sampling"),
    "max_new_tokens": (8, "response length limit (also Dr.GRPO's constant normaliser)"),
    "max_prompt_tokens": (1024, "prompts are truncated on the left to this many tokens"),
    "prompts": (None, "JSONL/JSON/Parquet file, a local `datasets` directory or name; null = synthetic prompts"),
    "prompt_field": ("prompt", "the field holding the instruction"),
    "prompt_split": ("train", "split of a `datasets` prompt set"),
    "num_subsets": (6, "the prompts are split into this many parts, used in turn (paper: 6)"),
    "prompts_per_iteration": (32, "prompts used per iteration, from the iteration's subset (0 = all of it)"),
    "lr": (5e-7, "AdamW peak learning rate (paper: 5e-7)"),
    "warmup_ratio": (0.1, "linear warmup fraction of each iteration's steps, then cosine to 0 (paper: 10%)"),
    "weight_decay": (0.0, "AdamW weight decay"),
    "batch_size": (32, "global examples per optimizer step (paper: 32)"),
    "micro_batch_size": (8, "examples per forward/backward on one rank"),
    "epochs": (1, "passes over each iteration's examples (paper: 1)"),
    "grad_clip": (1.0, "max global gradient norm (0 = off)"),
    "oracle": ({"kind": "category"}, "the preference oracle block (oracle.py)"),
    "eval_prompts": (16, "held-out prompts for exact category-game exploitability each iteration (0 = off)"),
    "eval_winrate": (True, "log the win rate of the updated policy against mu's responses"),
    "dtype": ("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), float32 or bfloat16; master weights stay fp32"),
    "bucket_mb": (25, "gradient all-reduce bucket size in MiB"),
    "parallel": ("ddp", "ddp (replicated weights, bucketed all-reduce) or fsdp (flat shards per block, ZeRO-3 style)"),
    "activation_checkpointing": (False, "recompute each transformer block in backward instead of storing its activations"),
    "keep_checkpoints": (0, "keep only the newest N checkpoints (0 = all)"),
    "cache_dir": ("runs/cache", "where the tiny embedded base is built once"),
}


def algo_keys():
    """Every key some algorithm of comal.ALGOS reads (an entry added by a fork or a test counts too)."""
    return {k: v for spec in comal.ALGOS.values() for k, v in spec.key_defs().items()}


class ConfigError(ValueError):
    """A bad config value: one line naming the key."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss): names step, rank and last good checkpoint."""


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def load_config(path, overrides):
    """DEFAULTS <- YAML file <- key=value overrides (values parsed as YAML)."""
    import yaml

    cfg = {k: v for k, (v, _) in DEFAULTS.items()}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must be a mapping of key: value")
        for key, value in data.items():
            set_key(cfg, key, value, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        set_key(cfg, key, yaml.safe_load(value) if value else None, "command line")
    return cfg


def as_number(value):
    """YAML 1.1 reads 1e-3 (no dot) as a string; numbers written that way are numbers here."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return [as_number(v) for v in value]
    return value


def set_key(cfg, key, value, where):
    if key.startswith("oracle."):  # oracle.kind=... edits the block
        cfg["oracle"] = dict(cfg["oracle"], **{key[len("oracle."):]: value})
        return
    algo = algo_keys()
    if key not in DEFAULTS and key not in algo:
        import difflib

        close = difflib.get_close_matches(key, list(DEFAULTS) + list(algo), n=3, cutoff=0.6)
        raise ConfigError(f"{key}: unknown config key ({where})" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if key in algo:
        if value is None:  # key=null: not set (the algorithm's default, or absent for one that does not read it)
            cfg.pop(key, None)
            return
        cfg[key] = as_number(value) if isinstance(algo[key][0], float) or key == "eta_tau" else value
        return
    cfg[key] = as_number(value) if isinstance(DEFAULTS[key][0], float) else value


def check_algorithm_keys(cfg):
    """The chosen algorithm's keys (comal.ALGOS): a set key it does not read is an error, its own keys get
    their defaults and checks, and per-round lists need an algorithm with rounds."""
    if cfg["algo"] not in comal.ALGOS:
        raise ConfigError(f"algo: unknown algorithm {cfg['algo']!r}; choose from {', '.join(comal.ALGOS)}")
    spec = comal.ALGOS[cfg["algo"]]
    try:
        comal.check_spec(cfg["algo"], spec)  # a forked or added entry is checked like the shipped ones
    except comal.SpecError as e:
        raise ConfigError(str(e)) from None
    defs = spec.key_defs()
    for key in algo_keys():
        if key in cfg and key not in defs:
            raise ConfigError(f"{key}: algo {cfg['algo']} does not read this key (it reads: {', '.join(defs)}); "
                              f"remove it or set {key}=null")
    for key, (default, _, check) in defs.items():
        if key not in cfg:
            cfg[key] = default
        if cfg[key] is not None and (msg := check(cfg[key])):
            raise ConfigError(f"{key} {msg}, got {cfg[key]!r}")
    if spec.ref != "rounds":
        for key in ("eta", "tau"):
            if isinstance(cfg.get(key), list):
                raise ConfigError(f"{key}: a per-round list needs an algorithm with reference rounds; "
                                  f"{cfg['algo']} has none, give one number")
    if spec.tau and "eta" in defs:  # Alg. 2: mu^(1 - eta tau) pi_ref^(eta tau), eq. 14's weight 1 - eta tau on mu
        lists = [v for v in (cfg["eta"], cfg["tau"]) if isinstance(v, list)]
        for t in range(max([len(v) for v in lists], default=1)):
            eta, tau = comal.round_params(cfg, t)
            if eta * tau >= 1:
                raise ConfigError(f"eta * tau = {eta * tau:g} >= 1 in round {t}: eta_tau must be < 1 "
                                  "(eq. 14 puts weight 1 - eta*tau on mu)")
    return spec


def check_config(cfg, world):
    """Reject wrong types and impossible values, naming the key; nothing is loaded yet."""
    for key, (default, _) in DEFAULTS.items():
        v = cfg[key]
        if default is None or v is None and key in ("model", "prompts"):
            continue
        ok = isinstance(v, type(default)) and not (isinstance(v, bool) and not isinstance(default, bool))
        if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{key} must be {type(default).__name__}, got {v!r}")
    spec = check_algorithm_keys(cfg)
    positive = ("iterations", "max_new_tokens", "max_prompt_tokens", "num_subsets", "batch_size",
                "micro_batch_size", "epochs", "bucket_mb")
    for key in positive:
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if not cfg["lr"] > 0:
        raise ConfigError(f"lr must be > 0, got {cfg['lr']}")
    for key in ("prompts_per_iteration", "eval_prompts", "keep_checkpoints", "grad_clip", "weight_decay"):
        if cfg[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {cfg[key]}")
    if cfg["n_samples"] < 2:
        raise ConfigError(f"n_samples must be >= 2 (preferences compare responses), got {cfg['n_samples']}")
    if not cfg["temperature"] > 0:
        raise ConfigError(f"temperature must be > 0 for training (greedy samples are all alike), got {cfg['temperature']}")
    if not 0 < cfg["top_p"] <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {cfg['top_p']}")
    if not 0 <= cfg["warmup_ratio"] < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {cfg['warmup_ratio']}")
    if cfg["parallel"] not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel must be ddp or fsdp, got {cfg['parallel']!r}")
    if cfg["dtype"] not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {cfg['dtype']!r}")
    if cfg["batch_size"] % (world * cfg["micro_batch_size"]):
        raise ConfigError(f"batch_size {cfg['batch_size']} is not divisible by world size {world} x "
                          f"micro_batch_size {cfg['micro_batch_size']}")
    if cfg["prompts_per_iteration"] and cfg["prompts_per_iteration"] % world:
        raise ConfigError(f"prompts_per_iteration {cfg['prompts_per_iteration']} is not divisible by world size {world}")
    if cfg["resume"] not in ("auto", "never") and not os.path.isfile(os.path.join(str(cfg["resume"]), "trainer_state.pt")):
        raise ConfigError(f"resume: {cfg['resume']} is not a checkpoint directory (no trainer_state.pt)")
    if cfg["model"] is not None:
        try:
            oracle_lib.check_model_dir(cfg["model"], "model")
        except oracle_lib.OracleError as e:
            raise ConfigError(str(e)) from None
    if cfg["prompts"] is not None and not isinstance(cfg["prompts"], str):
        raise ConfigError(f"prompts must be a path or a dataset name, got {cfg['prompts']!r}")
    # reads the prompts: a missing field or subsets too small for the world size are reported now
    per_iteration = len(iteration_prompts(load_prompts(cfg), cfg, 0, 0, world)) * world
    examples = per_iteration * comal.examples_per_group(spec, cfg)
    if spec.on_policy and (cfg["epochs"] != 1 or cfg["batch_size"] < examples):
        raise ConfigError(f"algo {cfg['algo']} learns on-policy (REINFORCE on y ~ pi): one optimizer step per "
                          f"iteration, so epochs must be 1 and batch_size >= the iteration's {examples} examples "
                          f"(prompts_per_iteration x n_samples); got epochs {cfg['epochs']}, batch_size {cfg['batch_size']}")
    try:
        cfg["oracle"] = oracle_lib.check_oracle_config(cfg["oracle"])
    except oracle_lib.OracleError as e:
        raise ConfigError(str(e)) from None
    if cfg["eval_prompts"] and cfg["oracle"]["kind"] != "category":
        cfg["eval_prompts"] = 0  # exploitability is exact only on the category game
    return cfg


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def load_prompts(cfg):
    """The instruction strings of the prompt set (synthetic when `prompts` is null)."""
    import tiny

    src, field = cfg["prompts"], cfg["prompt_field"]
    if src is None:
        per = cfg["prompts_per_iteration"] or 32
        return tiny.synthetic_prompts(per * cfg["num_subsets"], cfg["seed"])
    if os.path.isfile(src):
        rows = read_rows(src)
    elif os.path.isdir(src) or src.count("/") <= 1:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        try:
            import datasets

            ds = datasets.load_from_disk(src) if os.path.isdir(src) else datasets.load_dataset(src, split=cfg["prompt_split"])
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg["prompt_split"]]
            rows = list(ds)
        except Exception as e:
            raise ConfigError(f"prompts: cannot load {src!r} as a file or dataset ({str(e).splitlines()[0][:160]}); "
                              "offline, give a local JSONL/JSON/Parquet file or a saved dataset directory") from None
    else:
        raise ConfigError(f"prompts: {src} does not exist")
    if not rows:
        raise ConfigError(f"prompts: {src} has no rows")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict) or not isinstance(r.get(field), str)), None)
    if bad is not None:
        raise ConfigError(f"prompts: row {bad} of {src} has no string field {field!r} (set prompt_field)")
    return [r[field] for r in rows]


def read_rows(path):
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        with open(path) as f:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            data = json.load(f)
        return data if isinstance(data, list) else data.get("data", [])
    except (json.JSONDecodeError, OSError, ValueError) as e:
        raise ConfigError(f"prompts: cannot read {path}: {str(e).splitlines()[0]}") from None


def encode_prompts(tokenizer, prompts, max_tokens):
    """Token ids of each prompt in the policy's chat template (plain text if it has none), left-truncated."""
    out = []
    for x in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(x)["input_ids"]
        out.append(ids[-max_tokens:])
    return out


def iteration_prompts(prompts, cfg, k, rank, world):
    """This rank's prompts of iteration k: subset k mod num_subsets, its first prompts_per_iteration, every world-th."""
    S = cfg["num_subsets"]
    size = len(prompts) // S
    if size < world:
        raise ConfigError(f"num_subsets: {len(prompts)} prompts in {S} subsets leave fewer than {world} per subset")
    subset = prompts[(k % S) * size:(k % S + 1) * size]
    per = cfg["prompts_per_iteration"] or size - size % world
    if per > size:
        raise ConfigError(f"prompts_per_iteration {per} > {size} prompts per subset")
    return subset[:per][rank::world]


# ---------------------------------------------------------------------------
# The trainer: process group, hand-written gradient all-reduce, AdamW, schedule
# ---------------------------------------------------------------------------


class Trainer:
    """Everything distributed about one optimizer step, in the open."""

    def __init__(self, model, cfg, rank=0, world=1, device="cpu", log=None):
        self.model, self.cfg, self.rank, self.world = model, cfg, rank, world
        self.buckets = None
        self.device = torch.device(device)
        self.log = log or (lambda *a, **k: None)
        self.units = getattr(model, "flat_units", None)  # set by shard_model: parallel = fsdp
        self.last_checkpoint = None
        if self.units is not None:  # AdamW on this rank's fp32 master shards; decay applied by mask in step()
            self.params = [u.shard for u in self.units]
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg["lr"], weight_decay=0.0)
            return
        self.params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"])
        self.buckets = make_buckets(self.params, cfg["bucket_mb"] << 20)
        if world > 1:  # everyone starts from rank 0's weights
            for p in model.parameters():
                dist.broadcast(p.data, 0)

    def autocast(self):
        use_bf16 = self.cfg["dtype"] == "bfloat16" or (self.cfg["dtype"] == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def all_done(self, local_done):
        """Sharded runs: every forward is a collective, so a sampler stops only when all ranks are done."""
        if self.units is None or self.world == 1:
            return local_done
        t = torch.tensor([0.0 if local_done else 1.0], device=self.device)
        dist.all_reduce(t)
        return float(t) == 0.0

    def all_reduce_sum(self, x):
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def sync_grads(self):
        """Average gradients over ranks: one all-reduce per flat bucket, launched together, then unflattened."""
        if self.world == 1:
            return
        pending = []
        for bucket in self.buckets:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in bucket])
            pending.append((dist.all_reduce(flat, async_op=True), flat, bucket))
        for work, flat, bucket in pending:
            work.wait()
            flat /= self.world  # gloo has no ReduceOp.AVG
            offset = 0
            for p in bucket:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()

    def sharded_update(self, lr):
        """Clip by the global norm (one all-reduce of the squared shard norms), decay, AdamW, re-gather the root."""
        for u in self.units:
            if u.pending:  # parameters that got no gradient this step: scatter what there is
                u.reduce_scatter_grads()
            if u.shard.grad is None:
                u.shard.grad = torch.zeros_like(u.shard)
        sq = torch.stack([u.shard.grad.double().pow(2).sum() for u in self.units]).sum()
        if self.world > 1:
            dist.all_reduce(sq)
        grad_norm = float(sq.sqrt())
        clip = self.cfg["grad_clip"]
        if clip and clip / (grad_norm + 1e-6) < 1:  # as clip_grad_norm_
            for u in self.units:
                u.shard.grad.mul_(clip / (grad_norm + 1e-6))
        with torch.no_grad():
            if self.cfg["weight_decay"]:  # AdamW's decoupled decay, on >= 2-D parameters only (as DDP's groups)
                for u in self.units:
                    u.shard.mul_(1 - lr * self.cfg["weight_decay"] * u.decay_mask)
        self.optimizer.step()
        for u in self.units:
            u.shard.grad = None
            u.refresh()
        return grad_norm

    def copy_weights(self, dst, src):
        """dst <- src (pi_ref <- pi^k): shard by shard when sharded."""
        with torch.no_grad():
            if self.units is None:
                dst.load_state_dict(src.state_dict())
                return
            for ud, us in zip(dst.flat_units, src.flat_units):
                ud.shard.copy_(us.shard)
                ud.refresh()

    def ema_weights(self, dst, src, kappa):
        """dst <- kappa src + (1 - kappa) dst (NashMP's target network)."""
        with torch.no_grad():
            pairs = (zip(dst.parameters(), src.parameters()) if self.units is None else
                     ((ud.shard, us.shard) for ud, us in zip(dst.flat_units, src.flat_units)))
            for p_t, p in pairs:
                p_t.mul_(1 - kappa).add_(p.detach().to(p_t.dtype), alpha=kappa)
            if self.units is not None:
                for ud in dst.flat_units:
                    ud.refresh()

    def lr_at(self, step, steps):
        """Linear warmup over warmup_ratio of the iteration's steps, then cosine to 0 (restarted every iteration)."""
        warm = math.ceil(self.cfg["warmup_ratio"] * steps)
        if step < warm:
            return self.cfg["lr"] * (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return self.cfg["lr"] * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, micro_losses, k, step, steps):
        """Accumulate the micro-batch losses (no communication), all-reduce once, clip, step. Returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total, finite = 0.0, True
        for loss in micro_losses:
            finite &= bool(torch.isfinite(loss))
            loss.backward()
            total += float(loss.detach())
        status = torch.zeros(self.world + 1, dtype=torch.float64, device=self.device)
        status[0], status[1 + self.rank] = total if finite else 0.0, 0.0 if finite else 1.0
        if self.world > 1:
            dist.all_reduce(status)
        if status[1:].any():
            bad = [r for r in range(self.world) if status[1 + r] > 0]
            raise TrainingError(f"non-finite loss at iteration {k} step {step} on rank(s) {bad}; "
                                f"last good checkpoint: {self.last_checkpoint or 'none (no iteration finished)'}")
        lr = self.lr_at(step, steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.units is None:
            self.sync_grads()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg["grad_clip"] or float("inf")))
            self.optimizer.step()
        else:
            grad_norm = self.sharded_update(lr)
        loss = float(status[0]) / self.world
        self.log({"iteration": k, "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
        return loss


def make_buckets(params, cap_bytes):
    """Consecutive parameters grouped into buckets of at most cap_bytes (a larger tensor gets its own)."""
    buckets, cur, size = [], [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if cur and size + nbytes > cap_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += nbytes
    return buckets + ([cur] if cur else [])


# ---------------------------------------------------------------------------
# Sharded data parallelism (ZeRO-3 / FSDP style), written out
# ---------------------------------------------------------------------------
#
# Each transformer block is a unit: its parameters become one flat fp32 vector,
# padded to a multiple of the world size, of which rank r keeps slice r (the
# master shard that AdamW updates; its Adam moments exist for that slice only).
# The module's own parameters are views into a full-size buffer whose storage
# is allocated only while the block runs:
#   forward pre-hook   all_gather_single(full, shard)          (gather)
#   forward post-hook  free the storage; when the output needs a gradient, a
#                      hook on it gathers again just before the block's backward
#   after the block's last parameter gradient is accumulated:
#                      reduce_scatter_single(grad_shard, flat grads) / world, free
# The root unit (embeddings, final norm, output layer) is sharded the same way
# for master weights, gradients and Adam state, but stays gathered between
# optimizer steps: sequence_logprobs uses the output weight outside any module
# call (Llama-3-8B: 1.05B parameters, 2.1 GB in bf16).


class FlatUnit:
    """The parameters of one module as a flat vector sharded over the ranks."""

    def __init__(self, params, names, rank, world, compute_dtype):
        self.params, self.names, self.rank, self.world = params, names, rank, world
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.total = sum(self.numels)
        self.size = -(-self.total // world)  # shard length; the padded flat has size * world entries
        device = params[0].device
        flat = torch.zeros(self.size * world, dtype=torch.float32, device=device)
        flat[:self.total] = torch.cat([p.detach().float().flatten() for p in params])
        self.shard = torch.nn.Parameter(flat[rank * self.size:(rank + 1) * self.size].clone())  # fp32 master
        self.decay_mask = torch.cat([torch.full((n,), float(len(s) >= 2), device=device)
                                     for n, s in zip(self.numels, self.shapes)] +
                                    [torch.zeros(self.size * world - self.total, device=device)])[
            rank * self.size:(rank + 1) * self.size]
        self.full = torch.empty(self.size * world, dtype=compute_dtype, device=device)
        offset = 0
        for p, n, shape in zip(params, self.numels, self.shapes):
            p.data = self.full[offset:offset + n].view(shape)  # the module computes with views of `full`
            offset += n
        self.pending = 0  # parameter gradients accumulated in the current backward
        self.keep_gathered = False  # the root unit stays gathered between optimizer steps
        self.gathered = True
        self.free()

    def gather(self):
        if self.gathered:
            return
        self.full.untyped_storage().resize_(self.full.numel() * self.full.element_size())
        if self.world > 1:
            dist.all_gather_single(self.full, self.shard.detach().to(self.full.dtype))
        else:
            self.full.copy_(self.shard.detach())
        self.gathered = True

    def free(self):
        if self.gathered:
            self.full.untyped_storage().resize_(0)
            self.gathered = False

    def refresh(self):
        """Re-gather a unit kept gathered (the root) after its shards changed."""
        if self.keep_gathered:
            self.free()
            self.gather()

    def reduce_scatter_grads(self):
        """Average the full gradients over ranks into this rank's shard gradient, and drop the full ones."""
        flat = torch.zeros(self.size * self.world, dtype=torch.float32, device=self.full.device)
        offset = 0
        for p, n in zip(self.params, self.numels):
            if p.grad is not None:
                flat[offset:offset + n] = p.grad.flatten()
                p.grad = None
            offset += n
        if self.world > 1:
            out = torch.empty(self.size, dtype=torch.float32, device=flat.device)
            dist.reduce_scatter_single(out, flat)
            out /= self.world  # gloo has no ReduceOp.AVG
        else:
            out = flat
        self.shard.grad = out if self.shard.grad is None else self.shard.grad + out
        self.pending = 0

    def gathered_fp32(self, t=None):
        """The unpadded full vector of a shard-shaped tensor (default: the fp32 master shard); every rank takes
        part. Used for checkpoints (weights and Adam moments), one unit at a time."""
        t = self.shard.detach() if t is None else t
        full = torch.empty(self.size * self.world, dtype=t.dtype, device=t.device)
        if self.world > 1:
            dist.all_gather_single(full, t.contiguous())
        else:
            full.copy_(t)
        return full[:self.total]


def transformer_blocks(model):
    """The list of transformer blocks (Llama/Qwen/Mistral: model.layers; GPT-2: transformer.h)."""
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(base, name, None), torch.nn.ModuleList):
            return list(getattr(base, name))
    raise ConfigError(f"parallel: fsdp cannot find the transformer blocks of {type(model).__name__}")


def shard_model(model, rank, world, compute_dtype=torch.float32, activation_checkpointing=False):
    """Turn `model` into a sharded one in place; returns its units (blocks first, root last)."""
    if world > 1:  # every rank shards rank 0's weights
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    names = {id(p): n for n, p in model.named_parameters()}
    units, seen = [], set()

    def make_unit(module):
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        return FlatUnit(params, [names[id(p)] for p in params], rank, world, compute_dtype)

    for block in transformer_blocks(model):
        unit = make_unit(block)
        units.append(unit)

        def pre(module, args, unit=unit):
            unit.gather()

        def post(module, args, output, unit=unit):
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(out) and out.requires_grad:
                out.register_hook(lambda grad, unit=unit: unit.gather())  # gather again before this block's backward
            unit.free()

        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
    if activation_checkpointing:
        checkpoint_blocks(model)
    root = make_unit(model)
    root.keep_gathered = True
    units.append(root)
    root.gather()
    for unit in units:
        for p in unit.params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p, unit=unit: grad_ready(unit))
    model.flat_units = units
    return units


def checkpoint_blocks(model):
    """Activation checkpointing per transformer block: keep only its input, recompute it in backward.

    The block's forward is wrapped, so module hooks (the sharded gathers) run
    once on the outer call; the recomputation finds the weights gathered again
    by the hook on the block's output gradient.
    """
    import torch.utils.checkpoint

    for block in transformer_blocks(model):
        inner = block.forward
        block.forward = lambda *a, inner=inner, **kw: torch.utils.checkpoint.checkpoint(inner, *a, use_reentrant=False, **kw)


def grad_ready(unit):
    unit.pending += 1
    if unit.pending == len(unit.params):  # every parameter of the block has its gradient: scatter, then free
        unit.reduce_scatter_grads()
        if not unit.keep_gathered:
            unit.free()


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def checkpoint_dir(out_dir, k):
    return os.path.join(out_dir, "checkpoints", f"iter-{k:05d}")


def list_checkpoints(out_dir):
    """Paths of the finished checkpoints of a run, oldest first (temp directories are not finished)."""
    root = os.path.join(out_dir, "checkpoints")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return [os.path.join(root, d) for d in names if d.startswith("iter-") and not d.endswith(".tmp")
            and os.path.isfile(os.path.join(root, d, "trainer_state.pt"))]


def latest_checkpoint(out_dir):
    done = list_checkpoints(out_dir)
    return done[-1] if done else None


def save_checkpoint(out_dir, k, state, trainer, cfg):
    """HF directory (safetensors, loadable by from_pretrained) + trainer_state.pt, under a temp name, renamed.

    Sharded runs write one safetensors file per unit (an HF sharded checkpoint
    with its index) and one optimizer file per unit, gathering a single unit
    at a time, so no rank ever holds the whole model or optimizer state.
    """
    path = checkpoint_dir(out_dir, k)
    tmp = path + ".tmp"
    if trainer.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        state["tokenizer"].save_pretrained(tmp)
    sharded = trainer.units is not None
    copies = saved_copies(comal.ALGOS[cfg["algo"]])
    if sharded:
        save_sharded(state["policy"], tmp, trainer.rank, trainer.optimizer)
        for key in copies:
            save_sharded(state[key], os.path.join(tmp, key), trainer.rank)
    if trainer.rank == 0:
        if not sharded:
            state["policy"].save_pretrained(tmp)
        torch.save({
            "iteration": k,
            "sharded": sharded,
            "optimizer": None if sharded else trainer.optimizer.state_dict(),
            **{key: state[key].state_dict() if key in copies and not sharded else None for key in ("ref", "opponent")},
            "config": cfg,
        }, os.path.join(tmp, "trainer_state.pt"))
        os.replace(tmp, path)
        if cfg["keep_checkpoints"]:
            for old in list_checkpoints(out_dir)[:-cfg["keep_checkpoints"]]:
                shutil.rmtree(old, ignore_errors=True)
    if trainer.world > 1:
        dist.barrier()
    trainer.last_checkpoint = path
    return path


def save_sharded(model, path, rank, optimizer=None):
    """Stream a sharded model to an HF directory, one unit (and its Adam moments) gathered at a time."""
    from safetensors.torch import save_file

    units = model.flat_units
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    weight_map, total = {}, 0
    for i, u in enumerate(units):
        full = u.gathered_fp32()  # collective: every rank takes part, rank 0 writes
        if rank == 0:
            tensors, offset = {}, 0
            for name, n, shape in zip(u.names, u.numels, u.shapes):
                tensors[name] = full[offset:offset + n].view(shape).clone()
                offset += n
            fname = f"model-{i + 1:05d}-of-{len(units):05d}.safetensors"
            save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in tensors})
            total += 4 * u.total
        del full
        if optimizer is not None and optimizer.state.get(u.shard):
            st = optimizer.state[u.shard]
            moments = {key: u.gathered_fp32(st[key]).clone() for key in ("exp_avg", "exp_avg_sq")}
            if rank == 0:
                os.makedirs(os.path.join(path, "optimizer"), exist_ok=True)
                torch.save({"step": st["step"], **moments}, os.path.join(path, "optimizer", f"unit-{i:05d}.pt"))
    if rank == 0:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        config = model.config
        dtype = getattr(config, "dtype", None)
        config.dtype = torch.float32  # the master weights are saved
        config.save_pretrained(path)
        config.dtype = dtype
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(path)


def load_sharded_optimizer(optimizer, units, path):
    """Adam moments from per-unit files written by any number of ranks: each rank takes its slice."""
    for i, u in enumerate(units):
        f = os.path.join(path, "optimizer", f"unit-{i:05d}.pt")
        if not os.path.isfile(f):
            continue
        saved = torch.load(f, map_location=u.shard.device, weights_only=False)
        st = {"step": saved["step"]}
        for key in ("exp_avg", "exp_avg_sq"):
            padded = torch.zeros(u.size * u.world, dtype=saved[key].dtype, device=u.shard.device)
            padded[:u.total] = saved[key]
            st[key] = padded[u.rank * u.size:(u.rank + 1) * u.size].clone()
        optimizer.state[u.shard] = st


# ---------------------------------------------------------------------------
# Models and the main loop
# ---------------------------------------------------------------------------


def category_metrics(game, state, eval_ids, prev, max_new_tokens):
    """Exact category distribution of the policy on the held-out prompts, its exploitability and win rate vs prev."""
    tok = state["tokenizer"]
    dist_, pruned = game.policy_distribution(state["policy"], tok, eval_ids, [tok.eos_token_id], max_new_tokens)
    mean = dist_.mean(0)
    out = {"exploitability": float(game.exploitability(dist_).mean()),
           "exploitability_of_mean": float(game.exploitability(mean)),
           "category_dist": [round(float(x), 5) for x in mean], "category_mass_pruned": float(pruned.max())}
    if prev is not None:  # P(pi^{k+1} > pi^k), exact on the category game
        out["winrate_vs_prev_exact"] = float(mean @ game.extended_payoff() @ prev)
    return out, mean


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise ConfigError("usage: train_ddp.py CONFIG.yaml [key=value ...]")
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", 0)) if distributed else 0
    world = int(os.environ.get("WORLD_SIZE", 1)) if distributed else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if distributed else 0
    cfg = check_config(load_config(argv[0], argv[1:]), world)  # before anything heavy happens
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    try:
        train(cfg, rank, world, device)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, rank, world, device):
    """Load the policy and the spec's frozen copies, resume, and run comal.run (Algorithm 3) with this trainer."""
    from tqdm import tqdm

    import tiny

    master = rank == 0
    out_dir = cfg["out_dir"]
    if master:
        os.makedirs(out_dir, exist_ok=True)
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if master else (lambda msg: None)
    spec = comal.ALGOS[cfg["algo"]]
    base_path = base_policy_path(cfg, master, world, say)
    resume = latest_checkpoint(out_dir) if cfg["resume"] == "auto" else (None if cfg["resume"] == "never" else cfg["resume"])
    state, trainer = load_models(cfg, spec, base_path, resume, rank, world, device)
    oracle = oracle_lib.build_oracle(cfg["oracle"], device=device)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")

    def log(record):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    trainer.log = log
    if trainer.units is not None:
        say(f"parallel: fsdp, {len(trainer.units)} units, {sum(u.size for u in trainer.units) / 1e6:.2f}M "
            f"master parameters on each of {world} rank(s)")
    start = 0
    if resume is not None:
        start = load_trainer_state(resume, state, trainer, device) + 1
        if master and os.path.isfile(metrics_path):  # drop what the interrupted iteration logged
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line).get("iteration", -1) < start]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        say(f"resumed from {resume}: iteration {start}")
    elif master and os.path.isfile(metrics_path):
        os.remove(metrics_path)
    if master:
        import yaml

        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)

    tokenizer, policy = state["tokenizer"], state["policy"]
    prompts = load_prompts(cfg)
    game = oracle if isinstance(oracle, oracle_lib.CategoryGame) and cfg["eval_prompts"] else None
    eval_ids = encode_prompts(tokenizer, tiny.synthetic_prompts(cfg["eval_prompts"], cfg["seed"] + 12345),
                              cfg["max_prompt_tokens"]) if game else None
    prev = None  # the previous iterate's mean category distribution
    if game:  # every rank evaluates the same prompts: with sharded weights each forward is a collective
        m, prev = category_metrics(game, state, eval_ids, None, cfg["max_new_tokens"])
        if start == 0:
            log({"iteration": -1, **m})
        say(f"start: exploitability {m['exploitability']:.4f}  categories {m['category_dist']}")
    bar = tqdm(total=cfg["iterations"] - start, desc=cfg["algo"], disable=not master, file=sys.stderr)
    current = {}  # iteration k: (start time, prompts, token ids), shared by prompts_for and after_iteration

    def prompts_for(k):
        x = iteration_prompts(prompts, cfg, k, rank, world)
        current[k] = (time.time(), x, encode_prompts(tokenizer, x, cfg["max_prompt_tokens"]))
        return current[k][1:]

    def after_iteration(k, m):
        nonlocal prev
        t0, x, x_ids = current.pop(k)
        responses = m.pop("responses")
        if cfg["eval_winrate"]:  # P(pi^{k+1} > mu) on this iteration's prompts, one fresh sample each
            gen = torch.Generator(device=device).manual_seed(comal.seed_for(cfg["seed"], "eval_winrate", k, rank))
            policy.eval()
            with trainer.autocast():
                _, new = comal.sample_groups(policy, tokenizer, x_ids, dict(cfg, n_samples=1), gen, trainer.all_done)
            wins = float(oracle.prob(x, [g[0] for g in new], responses).double().sum())
            m["winrate_vs_mu"] = trainer.all_reduce_sum(wins) / trainer.all_reduce_sum(float(len(x)))
        for key in ("response_length", "tokens_per_s"):
            m[key] = trainer.all_reduce_sum(m[key]) / world
        m["seconds"] = time.time() - t0
        if game:
            cm, prev = category_metrics(game, state, eval_ids, prev, cfg["max_new_tokens"])
            m.update(cm)
        m["checkpoint"] = save_checkpoint(out_dir, k, state, trainer, cfg)
        log(m)
        if game:
            say(f"iteration {k:3d}  exploitability {m['exploitability']:.4f}  "
                f"categories {m['category_dist']}  loss {m['loss']:.4f}  {m['seconds']:.1f}s")
        else:
            say(f"iteration {k:3d}  loss {m['loss']:.4f}  win rate vs mu {m.get('winrate_vs_mu', float('nan')):.3f}  "
                f"length {m['response_length']:.1f}  {m['seconds']:.1f}s")
        bar.update(1)

    comal.run(state, trainer, cfg, oracle, prompts_for, start, after_iteration)
    bar.close()
    return state


def base_policy_path(cfg, master, world, say):
    """The base policy pi_0: the user's checkpoint, or the tiny embedded one built once in cache_dir."""
    import tiny

    if cfg["model"] is not None:
        return cfg["model"]
    path = os.path.join(cfg["cache_dir"], "tiny-base-v1")
    if master and not os.path.isdir(path):
        os.makedirs(cfg["cache_dir"], exist_ok=True)
        say(f"building the tiny embedded base policy in {path} (once)")
        tiny.build_base(path, log=say)
    if world > 1:
        dist.barrier()
    return path


def saved_copies(spec):
    """The frozen copies whose weights are state of the run (saved beside the policy): pi_ref when it is
    updated in rounds, the opponent always. A fixed pi_ref = pi_0 is reloaded from the base."""
    return [key for key, used in (("ref", spec.ref == "rounds"), ("opponent", spec.opponent != "none")) if used]


def load_models(cfg, spec, base_path, resume, rank, world, device):
    """(state, trainer): the policy (from the checkpoint when resuming, checked to give the log-probs of its own
    logits: sample.check_logprob_path) and the spec's frozen copies pi_ref and opponent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sample

    start_path = resume or base_path
    tokenizer = AutoTokenizer.from_pretrained(start_path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sharded = cfg["parallel"] == "fsdp"
    compute_dtype = torch.bfloat16 if device.type == "cuda" and cfg["dtype"] != "float32" else torch.float32

    def load(path):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).to(device)
        m.config.pad_token_id = tokenizer.pad_token_id
        return m

    def frozen(path, dtype):
        m = load(path).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        if not sharded:
            return m.to(dtype)
        shard_model(m, rank, world, dtype)
        return m

    policy = load(start_path)
    try:  # once: pi_ref and the opponent are copies of the same architecture
        sample.check_logprob_path(policy)
    except sample.UnsupportedModel as e:
        raise ConfigError(f"model {start_path}: {e}") from None
    state = {"policy": policy, "tokenizer": tokenizer, "ref": None, "opponent": None}
    # sharded runs saved ref/ and opponent/ beside the policy; unsharded ones keep them in trainer_state.pt
    saved = lambda key: os.path.join(resume, key) if resume and os.path.isdir(os.path.join(resume, key)) else start_path  # noqa: E731
    if spec.ref == "base":
        state["ref"] = frozen(base_path, compute_dtype)
    elif spec.ref == "rounds":
        state["ref"] = frozen(saved("ref"), compute_dtype)
    if spec.opponent != "none":  # an EMA accumulates small steps: fp32
        state["opponent"] = frozen(saved("opponent"), torch.float32 if spec.opponent == "ema" else compute_dtype)
    if sharded:
        shard_model(policy, rank, world, compute_dtype, cfg["activation_checkpointing"])
    elif cfg["activation_checkpointing"]:
        checkpoint_blocks(policy)
    return state, Trainer(policy, cfg, rank, world, device)


def load_trainer_state(resume, state, trainer, device):
    """Optimizer and frozen copies from a checkpoint; returns its iteration."""
    saved = torch.load(os.path.join(resume, "trainer_state.pt"), map_location=device, weights_only=False)
    if trainer.units is not None:  # written by any number of ranks: each takes its slice
        load_sharded_optimizer(trainer.optimizer, trainer.units, resume)
    elif saved["optimizer"] is not None:
        trainer.optimizer.load_state_dict(saved["optimizer"])
    for key in ("ref", "opponent"):
        if saved.get(key) is not None and state[key] is not None and trainer.units is None:
            state[key].load_state_dict(saved[key])
    trainer.last_checkpoint = resume
    return saved["iteration"]


def cli(argv=None):
    try:
        main(argv)
    except (ConfigError, oracle_lib.OracleError, TrainingError) as e:
        rank = os.environ.get("RANK", "0")
        print(f"error{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
