"""Sharded data parallelism (ZeRO-3 / FSDP style), written out: parallel: fsdp.

Each transformer block is a unit: its parameters become one flat fp32 vector,
padded to a multiple of the world size, of which rank r keeps slice r (the
master shard that AdamW updates; its Adam moments exist for that slice only).
The module's own parameters are views into a full-size buffer whose storage
is allocated only while the block runs:
  forward pre-hook   all_gather_single(full, shard)          (gather)
  forward post-hook  free the storage; when the output needs a gradient, a
                     hook on it gathers again just before the block's backward
  after the block's last parameter gradient is accumulated:
                     reduce_scatter_single(grad_shard, flat grads) / world, free
The root unit (embeddings, final norm, output layer) is sharded the same way
for master weights, gradients and Adam state, but stays gathered between
optimizer steps: sequence_logprobs uses the output weight outside any module
call (Llama-3-8B: 1.05B parameters, 2.1 GB in bf16).

ShardedMethods holds what a trainer does differently on such a model; the
trainer itself (the optimizer step, its checks and schedule) is
train_ddp.Trainer, and train_ddp.ShardedTrainer puts the two together.
"""
import contextlib
import os

import torch
import torch.distributed as dist

import checkpoint
from keys import ConfigError


class ShardedMethods:
    """The methods of train_ddp.Trainer that differ when every rank holds 1/N of each parameter (flat units set
    by shard_model / load_sharded): AdamW on this rank's fp32 master shards, gradients reduce-scattered as each
    block's backward ends, clipping by the norm of the shards, weights copied shard by shard."""

    @staticmethod
    def load_policy(path, cfg, rank, world, device, dtype, **kw):
        """The trained policy: no rank ever holds it whole, a skeleton filled with this rank's slices."""
        return load_sharded(path, rank, world, device, dtype, activation_checkpointing=cfg["activation_checkpointing"])

    @staticmethod
    def load_frozen(path, cfg, rank, world, device, dtype, **kw):
        """A frozen copy, streamed: its shards kept in `dtype`."""
        return load_sharded(path, rank, world, device, dtype, master_dtype=dtype, frozen=True)

    def init_optimizer(self):
        self.units = self.model.flat_units
        self.params = [u.shard for u in self.units]  # decay by shard ranges in update()
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg["lr"], weight_decay=0.0)

    @contextlib.contextmanager
    def gathered(self, *models):
        """Forwards without collectives (rollout: gathered, the default): every unit of the sharded `models`
        gathered once, in the compute dtype, kept for the block and freed after, so sampling and the frozen
        log-probs run as on a plain model and the ranks need not decode in lockstep. rollout: sharded keeps
        the per-block gathers inside every forward (for models too large to gather whole)."""
        units = [u for m in models if m is not None for u in getattr(m, "flat_units", [])]  # unsharded: none
        local = self.cfg["rollout"] == "gathered"  # every unit gathered: forwards need no collective
        if not local:  # per-block gathers stay (ranks in lockstep); a frozen model's root is gathered here only
            units = [u for u in units if u is u.root and not u.keep_gathered]
        self.lockstep = not local
        try:
            with units_gathered(units):
                yield
        finally:
            self.lockstep = True

    @property
    def local_forwards(self):
        return self.world == 1 or self.cfg["rollout"] == "gathered"

    @property
    def share_prompts(self):
        return False  # per-block gathers run each block once per forward; a second forward over a KV cache would not

    def all_done(self, local_done):
        """Every forward is a collective, so a sampler stops only when all ranks are done (not needed inside
        `gathered`, where forwards are local)."""
        if self.world == 1 or not self.lockstep:
            return local_done
        t = torch.tensor([0.0 if local_done else 1.0], device=self.device)
        dist.all_reduce(t)
        return float(t) == 0.0

    def reduce_grads(self):
        """The global gradient norm from the shards (already reduce-scattered block by block in backward):
        one all-reduce of the squared shard norms."""
        for u in self.units:
            if u.pending:  # parameters that got no gradient this step: scatter what there is
                u.reduce_scatter_grads()
            if u.shard.grad is None:
                u.shard.grad = torch.zeros_like(u.shard)
        sq = torch.stack([u.shard.grad.double().pow(2).sum() for u in self.units]).sum()
        if self.world > 1:
            dist.all_reduce(sq)
        return sq.sqrt()

    def update(self, lr, norm):
        """Clip by the global norm, decay, AdamW, re-gather the root."""
        grad_norm, clip = float(norm), self.cfg["grad_clip"]
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

    def copy_weights(self, dst, src):
        with torch.no_grad():
            for ud, us in zip(dst.flat_units, src.flat_units):
                ud.shard.copy_(us.shard)
                ud.refresh()

    def ema_weights(self, dst, src, kappa):
        with torch.no_grad():
            for ud, us in zip(dst.flat_units, src.flat_units):
                ud.shard.mul_(1 - kappa).add_(us.shard.detach().to(ud.shard.dtype), alpha=kappa)
            for ud in dst.flat_units:
                ud.refresh()

    def local_grads_finite(self):
        """Checked as each unit scattered this rank's own gradients."""
        bad = [u.nonfinite for u in self.units if u.nonfinite is not None]
        for u in self.units:
            u.nonfinite = None
        return not bool(torch.stack(bad).any()) if bad else True

    def weights_finite(self, models):
        """Each rank checks its shards; all ranks agree."""
        tensors = [u.shard for m in models for u in m.flat_units]
        bad = torch.tensor([float(not all(bool(torch.isfinite(t).all()) for t in tensors))], device=self.device)
        if self.world > 1:
            dist.all_reduce(bad)
        return float(bad) == 0.0

    def load_optimizer(self, resume):
        """AdamW state from a checkpoint: this rank's slice of every unit."""
        checkpoint.load_optimizer(self.optimizer, resume, units=self.units)
        self.last_checkpoint = resume

    def describe(self):
        return (f"parallel: fsdp, {len(self.units)} units, {sum(u.size for u in self.units) / 1e6:.2f}M master "
                f"parameters on each of {self.world} rank(s)")


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
    at about half the cost of gloo's reduce_scatter, which goes through an all-reduce of the whole vector."""
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
                 activation_checkpointing=False, model_class=None, trust_remote_code=False):
    """A sharded model straight from a checkpoint directory: a meta-device skeleton (no weights), whose units
    each rank fills with its own slices of the safetensors files; non-persistent buffers (rotary inv_freq) are
    rebuilt by the model's own initialiser. At no time does a rank hold more than its shards and one unit.
    model_class: an Auto class (default AutoModelForCausalLM; the oracle's reward models: ...SequenceClassification);
    trust_remote_code: the class is the directory's own code (config.json's auto_map, e.g. ArmoRM's)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = (model_class or AutoModelForCausalLM).from_config(config, dtype=torch.float32,
                                                                  trust_remote_code=trust_remote_code)
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


@contextlib.contextmanager
def units_gathered(units):
    """Every one of `units` gathered in its compute dtype for the block, freed after (one kept gathered stays)."""
    roots = [u for u in units if u is u.root]  # embeddings first: the forward starts there
    for u in roots + [u for u in units if u is not u.root]:
        u.gather(async_op=True)  # all issued at once; each block's pre-hook waits for its own, so the
        u.pinned = True          # transfers of later blocks overlap the first forward's earlier blocks
    for u in roots:
        u.wait()  # the root has no hook of its own (its output layer is read outside a module call)
    try:
        yield
    finally:
        for u in units:
            u.wait()  # never free a buffer a transfer still writes into
            u.pinned = False
            if not u.keep_gathered:
                u.free()


class OracleShards:
    """parallel fsdp: where the oracle's reward models and judge live (oracle.build_oracle's `shards`). Held like
    the frozen copies: 1/N of each on every rank in the oracle's dtype, streamed from its safetensors (its own
    code too, with trust_remote_code), and gathered whole, one model at a time, only inside scoring(model):
    local forwards, each rank scoring the responses it sampled."""

    def __init__(self, rank, world, device):
        self.rank, self.world, self.device = rank, world, device

    def load(self, path, auto_class, dtype, trust_remote_code=False):
        return load_sharded(path, self.rank, self.world, self.device, dtype, master_dtype=dtype, frozen=True,
                            model_class=auto_class, trust_remote_code=trust_remote_code)

    def scoring(self, model):
        return units_gathered(model.flat_units)


def oracle_shards(cfg, rank, world, device):
    """OracleShards under parallel: fsdp; ddp: None, each rank loads the oracle's models whole."""
    return OracleShards(rank, world, device) if cfg["parallel"] == "fsdp" else None


def materialize_buffers(model, reader, device):
    """The skeleton's buffers: persistent ones from the checkpoint, derived ones recomputed by the model's
    _init_weights (rotary frequencies, Gemma's embedding scale), run with the module's own parameters stood in
    for by meta tensors (theirs are views of the flat units: only buffers take values); one that neither
    provides is refused rather than left garbage."""
    for prefix, module in model.named_modules():
        meta = [k for k, b in module._buffers.items() if b is not None and b.device.type == "meta"]
        if not meta:
            continue
        loaded = {}
        for k in meta:
            b, name = module._buffers[k], f"{prefix}.{k}" if prefix else k
            if k not in module._non_persistent_buffers_set and reader.has(name):
                loaded[k] = module._buffers[k] = reader.tensor(name).to(device, b.dtype)
            else:
                module._buffers[k] = torch.full(b.shape, float("nan") if b.is_floating_point() else 0, dtype=b.dtype,
                                                device=device)
        if len(loaded) < len(meta):
            own = module._parameters
            module._parameters = {k: p if p is None else torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                                                             requires_grad=False) for k, p in own.items()}
            try:
                model._init_weights(module)
            finally:
                module._parameters = own
            module._buffers.update(loaded)  # what the checkpoint holds wins over the initialiser
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
