"""Entry point: train a policy with COMAL or a baseline against a preference oracle.

    torchrun --nproc_per_node N train_ddp.py cfg.yaml [key=value ...]
    python train_ddp.py cfg.yaml [key=value ...]          # one process

Data parallelism is written out here (no DistributedDataParallel wrapper):
rank 0's parameters are broadcast at the start; every rank samples, judges
and trains on its own share of the prompts; before each optimizer step the
gradients are flattened into buckets and all-reduced (sum, then divide by
the world size: gloo has no AVG); micro-steps only accumulate locally.
gloo on CPU, nccl on CUDA. The algorithm itself is comal.run (Algorithm 3).

Every key of the config is in config.DEFAULTS, with its meaning; the resolved config
is written to <out_dir>/config.yaml (config-resumed-at-KKKKK.yaml for each
resumed segment), metrics to <out_dir>/metrics.jsonl, and a checkpoint after
every iteration (checkpoint_every: N, after every N-th and the last) to
<out_dir>/checkpoints/iter-KKKKK (checkpoint.py: an HF directory, safetensors
and JSON, a manifest written last). One run holds <out_dir>/run.lock. SIGTERM
or SIGUSR1 stops the run at the next optimizer step or iteration end on every
rank together: the unfinished iteration is abandoned (its weights are not
saved), an iteration end writes its checkpoint even when not due, the run
exits 0, and rerunning the same command redoes the iterations after the last
checkpoint, bitwise as if never stopped.
"""
import contextlib
import datetime
import json
import math
import os
import signal
import sys
import time

# CPU tensors of 2 MiB or more on transparent huge pages (read by torch once, at its import: so before it).
# With return_freed_memory (below), every freed buffer goes back to the system and a new one is faulted in:
# in 2 MiB pages that costs 2.3M page faults per rank for one sharded SmolLM2 iteration instead of 15.8M
# (training 64.7 s instead of 76.7 s; docs/sharded.md). Set it to 0 in the environment to turn it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
import torch.distributed as dist

import checkpoint
import comal
import oracle as oracle_lib
import config
from config import ConfigError, check_config, encode_prompts, iteration_prompts, load_config, load_prompts


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss or gradient): names step, rank and last good checkpoint."""


class Preempted(Exception):
    """SIGTERM / SIGUSR1 arrived: every rank stops together at a safe point; the run exits 0."""


STOP = {"signal": None}  # set by the signal handler, read at each optimizer step and iteration end


def request_stop(signum, frame):
    STOP["signal"] = signal.Signals(signum).name


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
        self.lockstep = True  # sharded forwards are collectives (False inside `gathered`)
        if self.units is not None:  # AdamW on this rank's fp32 master shards; decay by shard ranges in step()
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

    @contextlib.contextmanager
    def gathered(self, *models):
        """Forwards without collectives (rollout: gathered, the default): every unit of the sharded `models`
        gathered once, in the compute dtype, kept for the block and freed after, so sampling and the frozen
        log-probs run as on a plain model and the ranks need not decode in lockstep. rollout: sharded keeps
        today's per-block gathers inside every forward (for models too large to gather whole)."""
        units = [u for m in models if m is not None for u in getattr(m, "flat_units", None) or []]
        local = self.cfg["rollout"] == "gathered"  # every unit gathered: forwards need no collective
        if not local:  # per-block gathers stay (ranks in lockstep); a frozen model's root is gathered here only
            units = [u for u in units if u is u.root and not u.keep_gathered]
        if not units:
            yield
            return
        roots = [u for u in units if u is u.root]  # embeddings first: the forward starts there
        for u in roots + [u for u in units if u is not u.root]:
            u.gather(async_op=True)  # all issued at once; each block's pre-hook waits for its own, so the
            u.pinned = True          # transfers of later blocks overlap the first forward's earlier blocks
        for u in roots:
            u.wait()  # the root has no hook of its own (its output layer is read outside a module call)
        self.lockstep = not local
        try:
            yield
        finally:
            self.lockstep = True
            for u in units:
                u.wait()  # never free a buffer a transfer still writes into
                u.pinned = False
                if not u.keep_gathered:
                    u.free()

    @property
    def local_forwards(self):
        """Whether a frozen model's forwards need no collective (DDP, one rank, or gathered rollouts), so that
        ranks may run different numbers of them (comal: frozen log-probs of only the rows the examples use)."""
        return self.units is None or self.world == 1 or self.cfg["rollout"] == "gathered"

    @property
    def share_prompts(self):
        """Whether log-prob forwards run each distinct prompt once for its n samples (sample.sequence_logprobs):
        unsharded and without activation checkpointing (per-block gathers and recomputation run each block once
        per forward; a second forward over a KV cache would break both)."""
        return self.units is None and not self.cfg["activation_checkpointing"]

    def all_done(self, local_done):
        """Sharded runs: every forward is a collective, so a sampler stops only when all ranks are done
        (not needed inside `gathered`, where forwards are local)."""
        if self.units is None or self.world == 1 or not self.lockstep:
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

    def sharded_grad_norm(self):
        """The global gradient norm from the shards: one all-reduce of the squared shard norms."""
        for u in self.units:
            if u.pending:  # parameters that got no gradient this step: scatter what there is
                u.reduce_scatter_grads()
            if u.shard.grad is None:
                u.shard.grad = torch.zeros_like(u.shard)
        sq = torch.stack([u.shard.grad.double().pow(2).sum() for u in self.units]).sum()
        if self.world > 1:
            dist.all_reduce(sq)
        return float(sq.sqrt())

    def sharded_update(self, lr, grad_norm):
        """Clip by the global norm, decay, AdamW, re-gather the root."""
        clip = self.cfg["grad_clip"]
        if clip and clip / (grad_norm + 1e-6) < 1:  # as clip_grad_norm_
            for u in self.units:
                u.shard.grad.mul_(clip / (grad_norm + 1e-6))
        with torch.no_grad():
            if self.cfg["weight_decay"]:  # AdamW's decoupled decay, on >= 2-D parameters only (as DDP's groups)
                for u in self.units:
                    for a, b in u.decay_ranges:
                        u.shard[a:b].mul_(1 - lr * self.cfg["weight_decay"])
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
        """Accumulate the micro-batch losses (no communication), all-reduce once, clip, step. Returns the loss.

        Nothing is updated, on any rank, when a loss or a gradient is not finite (TrainingError) or when a stop
        signal arrived on some rank (Preempted): one all-reduce of [loss sum, stop, per-rank bad loss, per-rank
        bad gradient] decides for all ranks together, and the global gradient norm (equal on every rank) is
        checked once more after the reduction, before clipping and the optimizer step.
        """
        self.optimizer.zero_grad(set_to_none=True)
        total, finite = 0.0, True
        for loss in micro_losses:
            finite &= bool(torch.isfinite(loss))
            loss.backward()
            total += float(loss.detach())
        W = self.world
        status = torch.zeros(2 + 2 * W, dtype=torch.float64, device=self.device)
        status[0], status[1] = total if finite else 0.0, float(STOP["signal"] is not None)
        status[2 + self.rank] = 0.0 if finite else 1.0
        status[2 + W + self.rank] = float(not self.local_grads_finite())
        if W > 1:
            dist.all_reduce(status)
        last = f"last good checkpoint: {self.last_checkpoint or 'none (no iteration finished)'}"
        for what, flags in (("loss", status[2:2 + W]), ("gradient (finite loss)", status[2 + W:])):
            if flags.any():
                bad = [r for r in range(W) if flags[r] > 0]
                raise TrainingError(f"non-finite {what} at iteration {k} step {step} on rank(s) {bad}; "
                                    f"the weights were not updated; {last}")
        if status[1] > 0:
            raise Preempted(f"iteration {k} step {step}: the iteration is abandoned (nothing of it is saved); rerun "
                            f"the same command to redo it from {self.last_checkpoint or 'the start'}")
        lr = self.lr_at(step, steps)  # each iteration's schedule starts anew ...
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if step == 0 and self.cfg["optimizer_reset"] == "iteration":  # ... and, if asked, its AdamW moments: Alg. 2's
            self.optimizer.state.clear()  # minimisation of iteration k without k-1's momentum (each rank its own)
        if self.units is None:
            self.sync_grads()
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            grad_norm = float(norm)
        else:
            grad_norm = self.sharded_grad_norm()
        if not math.isfinite(grad_norm):  # e.g. finite gradients whose sum overflows; equal on every rank
            raise TrainingError(f"non-finite gradient norm ({grad_norm}) at iteration {k} step {step} on every "
                                f"rank; the weights were not updated; {last}")
        clip = self.cfg["grad_clip"]
        if self.units is None:
            if clip:
                torch.nn.utils.clip_grads_with_norm_(self.params, clip, norm)  # = clip_grad_norm_, split
            self.optimizer.step()
        else:
            self.sharded_update(lr, grad_norm)
        loss = float(status[0]) / W
        self.log({"iteration": k, "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
        return loss

    def local_grads_finite(self):
        """This rank's own gradients before any reduction (sharded: checked as each unit scatters them)."""
        if self.units is not None:
            bad = [u.nonfinite for u in self.units if u.nonfinite is not None]
            for u in self.units:
                u.nonfinite = None
            return not bool(torch.stack(bad).any()) if bad else True
        grads = [p.grad for p in self.params if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())  # elementwise: a norm
        # of finite entries can overflow, which the global norm check below reports as such

    def weights_finite(self, models):
        """Whether every weight of `models` is finite, agreed by all ranks (sharded: each checks its shards)."""
        tensors = [u.shard for m in models for u in m.flat_units] if self.units is not None else \
                  [p for m in models for p in m.parameters()]
        bad = torch.tensor([float(not all(bool(torch.isfinite(t).all()) for t in tensors))], device=self.device)
        if self.world > 1 and self.units is not None:
            dist.all_reduce(bad)
        return float(bad) == 0.0


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

    def __init__(self, params, names, rank, world, compute_dtype, master_dtype=torch.float32, reader=None,
                 device=None):
        self.names, self.rank, self.world = names, rank, world
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.total = sum(self.numels)
        self.size = -(-self.total // world)  # shard length; the padded flat has size * world entries
        device = torch.device(device) if device is not None else params[0].device
        lo, hi = rank * self.size, (rank + 1) * self.size
        if reader is None:  # from the module's own values (the same on every rank)
            flat = torch.zeros(self.size * world, dtype=master_dtype, device=device)
            flat[:self.total] = torch.cat([p.detach().to(master_dtype).flatten() for p in params])
            shard = flat[lo:hi].clone()
            del flat
        else:  # streamed: only this rank's slice of each parameter is read from the checkpoint
            shard = torch.zeros(self.size, dtype=master_dtype, device=device)
        self.decay_ranges = []  # [a, b) of this shard that AdamW decays (>= 2-D parameters, as DDP's groups)
        offset = 0
        for name, n, shape in zip(names, self.numels, self.shapes):
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                if len(shape) >= 2:
                    self.decay_ranges.append((a - lo, b - lo))
                if reader is not None:
                    shard[a - lo:b - lo] = reader.flat_range(name, shape, a - offset, b - offset).to(device, master_dtype)
            offset += n
        self.shard = torch.nn.Parameter(shard, requires_grad=any(p.requires_grad for p in params))  # the master
        self.full = torch.empty(self.size * world, dtype=compute_dtype, device=device)
        self.params, self.replaced, offset = [], {}, 0
        for p, n, shape in zip(params, self.numels, self.shapes):
            view = self.full[offset:offset + n].view(shape)  # the module computes with views of `full`
            if p.device.type == "meta":  # a skeleton's parameter: a new one, set on its modules by shard_model
                new = torch.nn.Parameter(torch.empty(0, dtype=compute_dtype, device=device), requires_grad=p.requires_grad)
                self.replaced[id(p)], p = new, new
            p.data = view  # .data: the gathers into `full` must not bump the version autograd saved
            self.params.append(p)
            offset += n
        self.pending = 0  # parameter gradients accumulated in the current backward
        self.nonfinite = None  # whether this rank's own gradients were non-finite (a tensor: no sync here)
        self.keep_gathered = False  # the root unit stays gathered between optimizer steps
        self.root = None  # shard_model: the root unit points to itself
        self.pinned = False  # gathered for a whole rollout (trainer.gathered): the hooks neither gather nor free
        self.gathered = True
        self.in_flight = None  # (work, source) of an async gather not yet waited for
        self.free()

    def gather(self, async_op=False):
        """Allocate the full buffer and all-gather the shards into it. async_op: return at once; the values are
        there after wait(), which every later gather() call (the forward pre-hook) does first."""
        if self.gathered:
            if not async_op:
                self.wait()
            return
        self.full.untyped_storage().resize_(self.full.numel() * self.full.element_size())
        if self.world > 1:
            src = self.shard.detach().to(self.full.dtype)  # kept alive until the transfer is done
            work = dist.all_gather_single(self.full, src, async_op=async_op)
            self.in_flight = (work, src) if async_op else None
        else:
            self.full.copy_(self.shard.detach())
        self.gathered = True

    def wait(self):
        if self.in_flight is not None:
            self.in_flight[0].wait()
            self.in_flight = None

    def free(self):
        if self.gathered and not self.pinned:
            self.wait()
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
        bad = ~torch.isfinite(flat).all()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        if self.world > 1:
            out = reduce_scatter_sum(flat, self.size, self.world)
            out /= self.world  # gloo has no ReduceOp.AVG
        else:
            out = flat
        self.shard.grad = out if self.shard.grad is None else self.shard.grad + out
        self.pending = 0

    def split(self, flat):
        """{name: view} of the unit's parameters in an unpadded full vector (e.g. gathered_fp32's)."""
        out, offset = {}, 0
        for name, n, shape in zip(self.names, self.numels, self.shapes):
            out[name] = flat[offset:offset + n].view(shape)
            offset += n
        return out

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


def reduce_scatter_sum(flat, size, world):
    """This rank's (size,) slice of the sum over ranks of `flat` (size * world,). nccl: reduce_scatter. gloo: one
    all_to_all (rank j receives every rank's slice j) and a local sum -- the same numbers (tests/test_sharded.py)
    in half the time of gloo's reduce_scatter, which goes through an all-reduce of the whole vector (2 ranks,
    14 MB: 13 vs 28 ms on the 2-core CPU)."""
    if dist.get_backend() != "gloo":
        out = torch.empty(size, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_single(out, flat)
        return out
    parts = torch.empty_like(flat)
    dist.all_to_all_single(parts, flat)
    return parts.view(world, size).sum(0)


def transformer_blocks(model):
    """The list of transformer blocks (Llama/Qwen/Mistral: model.layers; GPT-2: transformer.h)."""
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(base, name, None), torch.nn.ModuleList):
            return list(getattr(base, name))
    raise ConfigError(f"parallel: fsdp cannot find the transformer blocks of {type(model).__name__}")


def shard_model(model, rank, world, compute_dtype=torch.float32, activation_checkpointing=False, master_dtype=torch.float32,
                reader=None, device=None, keep_root=True):
    """Turn `model` into a sharded one in place; returns its units (blocks first, root last).

    Either from the model's own weights (rank 0's, broadcast), or, for a meta-device skeleton, streamed: each
    rank reads only its slices from `reader` (checkpoint.SafetensorsReader) and no rank ever holds the model.
    master_dtype: fp32 for a trained model; a frozen one keeps its shards in its compute dtype.
    keep_root: the root unit stays gathered between steps (the policy: its output layer is used outside a module
    call); a frozen model's root is gathered only inside trainer.gathered, for its log-prob forwards.
    """
    if world > 1 and reader is None:  # every rank shards rank 0's weights
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    names = {id(p): n for n, p in model.named_parameters()}
    units, seen = [], set()

    def make_unit(module):
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        unit = FlatUnit(params, [names[id(p)] for p in params], rank, world, compute_dtype, master_dtype, reader, device)
        for m in model.modules():  # a skeleton's meta parameters are replaced everywhere (tied ones included)
            for key, p in list(m._parameters.items()):
                if p is not None and id(p) in unit.replaced:
                    m._parameters[key] = unit.replaced[id(p)]
        unit.replaced = {}
        seen.update(id(p) for p in unit.params)
        return unit

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
    root.root = root
    root.keep_gathered = keep_root
    units.append(root)
    if keep_root:
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


def load_sharded(path, rank, world, device, compute_dtype, master_dtype=torch.float32, frozen=False,
                 activation_checkpointing=False):
    """A sharded model straight from a checkpoint directory: a meta-device skeleton (no weights), whose units
    each rank fills with its own slices of the safetensors files; non-persistent buffers (rotary inv_freq) are
    rebuilt by the model's own initialiser. At no time does a rank hold more than its shards and one unit."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if frozen:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    with checkpoint.SafetensorsReader(path) as reader:
        shard_model(model, rank, world, compute_dtype, activation_checkpointing, master_dtype, reader, device,
                    keep_root=not frozen)
        materialize_buffers(model, reader, device)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def materialize_buffers(model, reader, device):
    """The skeleton's buffers: persistent ones from the checkpoint, derived ones recomputed by the model's
    _init_weights (e.g. rotary frequencies); one that neither provides is refused rather than left garbage."""
    for prefix, module in model.named_modules():
        meta = [k for k, b in module._buffers.items() if b is not None and b.device.type == "meta"]
        if not meta:
            continue
        for k in meta:
            b, name = module._buffers[k], f"{prefix}.{k}" if prefix else k
            if k not in module._non_persistent_buffers_set and reader.has(name):
                module._buffers[k] = reader.tensor(name).to(device, b.dtype)
            else:
                module._buffers[k] = torch.full(b.shape, float("nan") if b.is_floating_point() else 0, dtype=b.dtype,
                                                device=device)
        if not list(module.parameters(recurse=False)):
            model._init_weights(module)
        bad = [k for k in meta if module._buffers[k].is_floating_point() and not torch.isfinite(module._buffers[k]).all()]
        if bad:
            raise ConfigError(f"parallel: fsdp cannot rebuild the buffer {prefix}.{bad[0]} of "
                              f"{type(module).__name__} from a checkpoint; use parallel: ddp for this model")


def grad_ready(unit):
    unit.pending += 1
    if unit.pending == len(unit.params):  # every parameter of the block has its gradient: scatter, then free
        unit.reduce_scatter_grads()
        if not unit.keep_gathered:
            unit.free()


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
           "category_dist": [round(float(x), 5) for x in mean], "category_mass_pruned": float(pruned.max()),
           "category_dist_per_prompt": [[round(float(x), 5) for x in row] for row in dist_]}  # eval.py --steps
    if prev is not None:  # P(pi^{k+1} > pi^k), exact on the category game
        out["winrate_vs_prev_exact"] = float(mean @ game.extended_payoff() @ prev)
    return out, mean


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        if os.environ.get("RANK", "0") == "0":
            print(config.help_text())
        return
    if not argv or argv[0].startswith("-"):
        raise ConfigError("usage: train_ddp.py CONFIG.yaml [key=value ...] (--help lists every key)")
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", 0)) if distributed else 0
    world = int(os.environ.get("WORLD_SIZE", 1)) if distributed else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if distributed else 0
    cfg = check_config(load_config(argv[0], argv[1:]), world)  # before anything heavy happens
    STOP["signal"] = None
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # a scheduler's preemption notice: stop at the next safe point
        signal.signal(sig, request_stop)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        return_freed_memory()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world))))  # the cores we may use
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    try:
        train(cfg, rank, world, device)
        if distributed:
            dist.barrier()  # every rank done before gloo is torn down (one torn down early can abort at exit)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def return_freed_memory(threshold=1 << 20):
    """CPU runs: have glibc map every allocation over 1 MiB on its own and unmap it when freed.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, after which
    blocks of that size come from the heap, and freed heap blocks below its top stay resident. Sharded
    training frees each gathered block (and its full gradient) right after use, so the process kept the
    freed blocks: peak RSS per rank of bench/sharded_rss.py (SmolLM2-135M, N = 2) fsdp 4.15 GiB with the
    default, 2.55 with this; ddp 4.05 either way. Costs page faults on each new buffer (training time
    measured in docs/sharded.md). M_MMAP_THRESHOLD is mallopt's -3; setting it also stops the dynamic raise.
    A MALLOC_MMAP_THRESHOLD_ in the environment is the user's choice and is left alone; not glibc: nothing."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # 1 on success
    except (OSError, AttributeError):
        return False


def on_rank0(fn, world, device):
    """fn() on rank 0 only (file-system decisions: the lock, which checkpoint to resume); its result, a string,
    is broadcast. If it raises, every rank raises (rank 0 with the message): no rank is left waiting."""
    result, error = "", None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn() or ""
        except (checkpoint.CheckpointError, ConfigError) as e:
            error = e
    if world == 1:
        if error:
            raise error
        return result or None
    data = torch.zeros(4096, dtype=torch.uint8, device=device)
    raw = result.encode()[:4095]
    data[0] = 1 if error else 0
    data[1:1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(data, 0)
    if data[0]:
        raise error or checkpoint.CheckpointError("stopped by rank 0 (its message says why)")
    raw = bytes(data[1:].cpu().tolist()).rstrip(b"\0").decode()
    return raw or None


def train(cfg, rank, world, device):
    """Lock out_dir, choose the checkpoint to resume, load the policy and the spec's frozen copies, and run
    comal.run (Algorithm 3) with this trainer, checkpointing after every checkpoint_every-th iteration."""
    from tqdm import tqdm

    master = rank == 0
    out_dir = cfg["out_dir"]
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if master else (lambda msg: None)
    lock = []  # rank 0 holds <out_dir>/run.lock while the run lasts
    on_rank0(lambda: lock.append(checkpoint.lock_out_dir(out_dir)), world, device)
    try:
        return train_locked(cfg, rank, world, device, say)
    finally:
        for f in lock:
            f.close()


def train_locked(cfg, rank, world, device, say):
    from tqdm import tqdm

    import tiny

    master, out_dir = rank == 0, cfg["out_dir"]
    resume = on_rank0(lambda: checkpoint.choose_resume(out_dir, cfg["resume"], say), world, device)
    saved = checkpoint.read_state(resume) if resume else None
    if saved:  # what produced the earlier iterations must still be what runs now
        changed = [key for key in checkpoint.config_changes(saved["config"], cfg) if key not in cfg["resume_changes"]]
        if changed:
            diff = ", ".join(f"{key} ({saved['config'].get(key)!r} -> {cfg.get(key)!r})" for key in changed)
            raise ConfigError(f"resume: the config differs from {resume}'s in {diff}; set resume_changes="
                              f"[{', '.join(changed)}] to continue with the change, or start a new out_dir")
        if cfg["optimizer_reset"] == "never" and saved["config"].get("optimizer_reset", "never") != "never":
            raise ConfigError(f"resume: {resume} was written with optimizer_reset=iteration and holds no AdamW "
                              f"moments to continue with optimizer_reset=never; resume with optimizer_reset=iteration")
        if saved["parallel"] != cfg["parallel"]:
            raise ConfigError(f"resume: {resume} was written with parallel={saved['parallel']}; its optimizer state "
                              f"is not read by parallel={cfg['parallel']}: resume with parallel={saved['parallel']}")
    spec = comal.ALGOS[cfg["algo"]]
    base_path = base_policy_path(cfg, master, world, say)
    state, trainer = load_models(cfg, spec, base_path, resume, rank, world, device)
    oracle = oracle_lib.build_oracle(cfg["oracle"], device=device)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")

    def log(record):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(checkpoint.json_safe(record), allow_nan=False) + "\n")

    trainer.log = log
    if trainer.units is not None:
        say(f"parallel: fsdp, {len(trainer.units)} units, {sum(u.size for u in trainer.units) / 1e6:.2f}M "
            f"master parameters on each of {world} rank(s)")
    start = 0
    if resume is not None:
        load_trainer_state(resume, trainer)
        start = saved["iteration"] + 1
        if master and os.path.isfile(metrics_path):  # drop what the interrupted iteration logged
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("iteration", -1) < start]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        say(f"resumed from {resume}: iteration {start}" + (" (the run is finished)" if start >= cfg["iterations"] else ""))
    elif master and os.path.isfile(metrics_path):  # a run that never finished an iteration: start over
        os.remove(metrics_path)
    if master:  # config.yaml is the first segment's; each resumed segment gets its own file
        import yaml

        names = ["config.yaml"] if resume is None or not os.path.isfile(os.path.join(out_dir, "config.yaml")) else []
        names += [f"config-resumed-at-{start:05d}.yaml"] if resume is not None else []
        for name in names:
            with open(os.path.join(out_dir, name), "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)

    tokenizer, policy = state["tokenizer"], state["policy"]
    prompts = load_prompts(cfg)
    game = oracle if isinstance(oracle, oracle_lib.CategoryGame) and cfg["eval_prompts"] else None
    eval_ids = encode_prompts(tokenizer, config.eval_prompt_texts(cfg), cfg["max_prompt_tokens"]) if game else None
    prev = None  # the previous iterate's mean category distribution
    if game and start < cfg["iterations"]:  # every rank evaluates: with sharded weights each forward is a collective
        with trainer.gathered(policy):
            m, prev = category_metrics(game, state, eval_ids, None, cfg["max_new_tokens"])
        if start == 0:
            log({"iteration": -1, **m})
        say(f"start: exploitability {m['exploitability']:.4f}  categories {m['category_dist']}")
    bar = tqdm(total=max(0, cfg["iterations"] - start), desc=cfg["algo"], disable=not master, file=sys.stderr)
    current = {}  # iteration k: (start time, prompts, token ids), shared by prompts_for and after_iteration
    copies = saved_copies(spec)

    def prompts_for(k):
        x, cut = iteration_prompts(prompts, cfg, k, rank, world), []
        current[k] = (time.time(), x, encode_prompts(tokenizer, x, cfg["max_prompt_tokens"], cut))
        if cut:
            say(f"iteration {k}: {len(cut)} prompt(s) on rank 0 longer than max_prompt_tokens "
                f"{cfg['max_prompt_tokens']}: their instructions were cut from the left (the chat template kept)")
        return current[k][1:]

    def after_iteration(k, m):
        nonlocal prev
        t0, x, x_ids = current.pop(k)
        groups = m.pop("groups")
        responses = [g[0] for g in groups]
        if cfg["eval_winrate"]:  # P(pi^{k+1} > mu) on this iteration's prompts, one fresh sample each
            gen = torch.Generator(device=device).manual_seed(comal.seed_for(cfg["seed"], "eval_winrate", k, rank))
            policy.eval()
            with trainer.autocast(), trainer.gathered(policy):
                _, new = comal.sample_groups(policy, tokenizer, x_ids, dict(cfg, n_samples=1), gen, trainer.all_done)
            wins = float(oracle.prob(x, [g[0] for g in new], responses).double().sum())
            m["winrate_vs_mu"] = trainer.all_reduce_sum(wins) / trainer.all_reduce_sum(float(len(x)))
        for key in ("response_length", "tokens_per_s"):
            m[key] = trainer.all_reduce_sum(m[key]) / world
        m["seconds"] = time.time() - t0
        if game:
            with trainer.gathered(policy):
                cm, prev = category_metrics(game, state, eval_ids, prev, cfg["max_new_tokens"])
            m.update(cm)
            # the categories of this iteration's samples (mu on the training prompts, all ranks): what the step
            # was computed from, next to the eval prompts' exact distribution of the same policy (iteration k-1)
            cats = game.category([y for g in groups for y in g])
            m["sample_category_counts"] = [int(trainer.all_reduce_sum(float((cats == c).sum())))
                                           for c in [*range(len(game.categories)), -1]]
        stop = k + 1 < cfg["iterations"] and trainer.all_reduce_sum(float(STOP["signal"] is not None)) > 0
        due = (k + 1) % cfg["checkpoint_every"] == 0 or k + 1 == cfg["iterations"] or stop
        m["checkpoint"] = checkpoint.save_checkpoint(out_dir, k, state, trainer, cfg, copies) if due else None
        log(m)
        if game:
            say(f"iteration {k:3d}  exploitability {m['exploitability']:.4f}  "
                f"categories {m['category_dist']}  loss {m['loss']:.4f}  {m['seconds']:.1f}s")
        else:
            say(f"iteration {k:3d}  loss {m['loss']:.4f}  win rate vs mu {m.get('winrate_vs_mu', float('nan')):.3f}  "
                f"length {m['response_length']:.1f}  {m['seconds']:.1f}s")
        bar.update(1)
        if stop:
            raise Preempted(f"the end of iteration {k}; rerun the same command to continue from {m['checkpoint']}")

    try:
        comal.run(state, trainer, cfg, oracle, prompts_for, start, after_iteration)
    finally:
        bar.close()  # before any final message
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
    logits: sample.check_logprob_path) and the spec's frozen copies pi_ref and opponent. A checkpoint is read
    from its safetensors only (nothing in it is unpickled)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sample

    start_path = resume or base_path
    tokenizer = AutoTokenizer.from_pretrained(start_path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sharded = cfg["parallel"] == "fsdp"
    compute_dtype = torch.bfloat16 if device.type == "cuda" and cfg["dtype"] != "float32" else torch.float32

    def load(path):
        kw = {"use_safetensors": True} if resume and path.startswith(resume) else {}
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True, **kw).to(device)
        m.config.pad_token_id = tokenizer.pad_token_id
        return m

    def frozen(path, dtype):
        if sharded:  # streamed: shards kept in the frozen model's own dtype
            m = load_sharded(path, rank, world, device, dtype, master_dtype=dtype, frozen=True)
            m.config.pad_token_id = tokenizer.pad_token_id
            return m
        m = load(path).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m.to(dtype)

    if sharded:  # no rank ever holds the whole policy: a skeleton filled with this rank's slices
        policy = load_sharded(start_path, rank, world, device, compute_dtype,
                              activation_checkpointing=cfg["activation_checkpointing"])
        policy.config.pad_token_id = tokenizer.pad_token_id
    else:
        policy = load(start_path)
    try:  # once: pi_ref and the opponent are copies of the same architecture
        sample.check_logprob_path(policy)
    except sample.UnsupportedModel as e:
        raise ConfigError(f"model {start_path}: {e}") from None
    state = {"policy": policy, "tokenizer": tokenizer, "ref": None, "opponent": None}
    # a checkpoint holds ref/ and opponent/ beside the policy (checkpoint.save_checkpoint)
    def saved(key):
        if resume and os.path.isdir(os.path.join(resume, key)):
            return os.path.join(resume, key)
        if resume:  # only after resume_changes=[algo]
            print(f"warning: {resume} has no {key}/ (another algorithm wrote it): {key} starts as the policy",
                  file=sys.stderr)
        return start_path

    if spec.ref == "base":
        state["ref"] = frozen(base_path, compute_dtype)
    elif spec.ref == "rounds":
        state["ref"] = frozen(saved("ref"), compute_dtype)
    if spec.opponent != "none":  # an EMA accumulates small steps: fp32
        state["opponent"] = frozen(saved("opponent"), torch.float32 if spec.opponent == "ema" else compute_dtype)
    if not sharded and cfg["activation_checkpointing"]:
        checkpoint_blocks(policy)
    return state, Trainer(policy, cfg, rank, world, device)


def load_trainer_state(resume, trainer):
    """AdamW state from a checkpoint (safetensors: by parameter name, or each rank's slice of every unit)."""
    if trainer.units is not None:
        checkpoint.load_optimizer(trainer.optimizer, resume, units=trainer.units)
    else:
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        checkpoint.load_optimizer(trainer.optimizer, resume, params=[(names[id(p)], p) for p in trainer.params])
    trainer.last_checkpoint = resume


def cli(argv=None):
    """Exit 0 when done or stopped by a signal (resumable), 2 with one line on rank 0 for a bad config, a bad
    checkpoint or a run that cannot go on (the other ranks stop silently: every rank has the same error)."""
    rank = os.environ.get("RANK", "0")
    try:
        main(argv)
    except Preempted as e:
        if rank == "0":
            print(f"stopped by {STOP['signal']} at {e}", file=sys.stderr)
        return 0
    except (ConfigError, oracle_lib.OracleError, TrainingError, checkpoint.CheckpointError) as e:
        if rank == "0":
            print(f"error: {e}", file=sys.stderr)
        else:  # torchrun stops the other ranks as soon as one exits: let rank 0 print first
            time.sleep(2)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
