"""Entry point: train a policy with COMAL or a baseline against a preference oracle.

    torchrun --nproc_per_node N train_ddp.py cfg.yaml [key=value ...]
    python train_ddp.py cfg.yaml [key=value ...]          # one process

Data parallelism is written out here (no DistributedDataParallel wrapper):
rank 0's parameters are broadcast at the start; every rank samples, judges
and trains on its own share of the prompts; before each optimizer step the
gradients are flattened into buckets and all-reduced (sum, then divide by
the world size: gloo has no AVG); micro-steps only accumulate locally.
gloo on CPU, nccl on CUDA. The algorithm itself is comal.run (Algorithm 3).

Every key of the config is in config.RUN_KEYS, with its meaning; the resolved config
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
import math
import os
import signal
import sys
import time

# CPU tensors of 2 MiB or more on transparent huge pages (read by torch once, at its import: so before it).
# With return_freed_memory (below), every freed buffer goes back to the system and a new one is faulted in;
# 2 MiB pages make those faults far fewer (measured in docs/sharded.md). Set it to 0 in the environment to
# turn it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
import torch.distributed as dist

import checkpoint
import comal
import config
import fsdp
import oracle as oracle_lib
from category_dist import EnumerationError, EnumerationStopped
from opponents import OPPONENTS
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
    """Everything distributed about one optimizer step, in the open: hand-written DDP. Every rank holds the whole
    model; before each optimizer step the gradients are flattened into buckets and all-reduced.
    ShardedTrainer (below, with fsdp.py) replaces the methods that differ when each rank holds 1/N of it."""

    def __init__(self, model, cfg, rank=0, world=1, device="cpu", log=None):
        self.model, self.cfg, self.rank, self.world = model, cfg, rank, world
        self.device = torch.device(device)
        self.log = log or (lambda *a, **k: None)
        self.last_checkpoint = None
        self.io_error = None  # rank 0's failed metrics write, raised on every rank at the iteration's end (io_check)
        self.lockstep = True  # whether forwards are collectives the ranks must run together (sharded)
        self.init_optimizer()

    @staticmethod
    def load_policy(path, cfg, rank, world, device, dtype, **kw):
        """The trained policy from a checkpoint directory: whole on every rank, fp32 (autocast computes in
        `dtype`); kw for from_pretrained."""
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True, **kw).to(device)
        if cfg["activation_checkpointing"]:
            fsdp.checkpoint_blocks(m)
        return m

    @staticmethod
    def load_frozen(path, cfg, rank, world, device, dtype, **kw):
        """A frozen copy (pi_ref, the opponent): whole, in `dtype`, no gradients."""
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True, **kw)
        for p in m.parameters():
            p.requires_grad_(False)
        return m.to(device).eval().to(dtype)

    def init_optimizer(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg["weight_decay"]},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=self.cfg["lr"])
        self.buckets = make_buckets(self.params, self.cfg["bucket_mb"] << 20)
        if self.world > 1:  # everyone starts from rank 0's weights
            for p in self.model.parameters():
                dist.broadcast(p.data, 0)

    def autocast(self):
        if config.compute_dtype(self.cfg, self.device) == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered(self, *models):
        """The models' weights whole for a rollout: they always are here."""
        yield

    @property
    def local_forwards(self):
        """Whether a frozen model's forwards need no collective, so that ranks may run different numbers of them
        (comal: frozen log-probs of only the rows the examples use)."""
        return True

    @property
    def share_prompts(self):
        """Whether log-prob forwards run each distinct prompt once for its n samples (sample.sequence_logprobs):
        not with activation checkpointing (its recomputation would run the shared prompt's KV cache twice)."""
        return not self.cfg["activation_checkpointing"]

    def all_done(self, local_done):
        """Whether every rank's sampler is done: each decides for itself (forwards are local)."""
        return local_done

    def all_reduce_sum(self, x):
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def reduce_grads(self):
        """Average gradients over ranks: one all-reduce per flat bucket, launched together, then unflattened.
        Returns the global gradient norm (equal on every rank)."""
        if self.world > 1:
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
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

    def update(self, lr, norm):
        """Clip by the global norm, AdamW (the learning rate is already in the param groups)."""
        if self.cfg["grad_clip"]:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg["grad_clip"], norm)  # = clip_grad_norm_, split
        self.optimizer.step()

    def copy_weights(self, dst, src):
        """dst <- src (pi_ref <- pi^k)."""
        with torch.no_grad():
            dst.load_state_dict(src.state_dict())

    def ema_weights(self, dst, src, kappa):
        """dst <- kappa src + (1 - kappa) dst (NashMP's target network)."""
        with torch.no_grad():
            for p_t, p in zip(dst.parameters(), src.parameters()):
                p_t.mul_(1 - kappa).add_(p.detach().to(p_t.dtype), alpha=kappa)

    def lr_at(self, step, steps):
        """Linear warmup over warmup_ratio of the iteration's steps, then cosine or linear (lr_schedule) to 0;
        restarted every iteration."""
        warm = math.ceil(self.cfg["warmup_ratio"] * steps)
        if step < warm:
            return self.cfg["lr"] * (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        if self.cfg["lr_schedule"] == "linear":
            return self.cfg["lr"] * (1 - progress)
        return self.cfg["lr"] * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, micro_losses, k, step, steps):
        """Accumulate the micro-batch losses (no communication), reduce the gradients once, clip, step. Returns
        the loss.

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
        norm = self.reduce_grads()
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):  # e.g. finite gradients whose sum overflows; equal on every rank
            raise TrainingError(f"non-finite gradient norm ({grad_norm}) at iteration {k} step {step} on every "
                                f"rank; the weights were not updated; {last}")
        try:
            self.update(lr, norm)
        except RuntimeError as e:  # e.g. a learning rate or moment that overflows the parameters' dtype in AdamW
            if "overflow" not in str(e):
                raise
            raise TrainingError(f"the optimizer step overflowed at iteration {k} step {step} ({str(e).splitlines()[0]}); "
                                f"the weights are damaged and nothing more is saved; {last}") from None
        loss = float(status[0]) / W
        self.log({"iteration": k, "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
        return loss

    def local_grads_finite(self):
        """This rank's own gradients before any reduction, elementwise: a norm of finite entries can overflow,
        which the global norm check in step() reports as such."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def weights_finite(self, models):
        """Whether every weight of `models` is finite (the same on every rank: rank 0's weights, synced steps)."""
        return all(bool(torch.isfinite(p).all()) for m in models for p in m.parameters())

    def load_optimizer(self, resume):
        """AdamW state from a checkpoint (safetensors, by parameter name)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        checkpoint.load_optimizer(self.optimizer, resume, params=[(names[id(p)], p) for p in self.params])
        self.last_checkpoint = resume

    def describe(self):
        return None


class ShardedTrainer(fsdp.ShardedMethods, Trainer):
    """parallel: fsdp. fsdp.ShardedMethods' methods take the place of Trainer's (optimizer on the shards,
    gradients reduce-scattered, collectives in forwards); step() is Trainer's."""


def trainer_for(model, cfg, rank=0, world=1, device="cpu", log=None):
    """The trainer of a model: ShardedTrainer when fsdp.shard_model / fsdp.load_sharded sharded it."""
    return (ShardedTrainer if hasattr(model, "flat_units") else Trainer)(model, cfg, rank, world, device, log)


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
# Models and the main loop
# ---------------------------------------------------------------------------


def category_metrics(game, state, eval_ids, prev, cfg, when=None, show=False):
    """Exact category distribution of the policy on the held-out prompts, its exploitability and win rate vs prev.
    The enumeration stops past its budget (TrainingError) and, when `when` names the evaluation, at a signal
    (Preempted). After an iteration it runs on: the iteration is done, and is saved before the stop."""
    tok = state["tokenizer"]
    try:
        dist_, pruned = game.policy_distribution(state["policy"], tok, eval_ids, [tok.eos_token_id],
                                                 cfg["max_new_tokens"], max_prefixes=cfg["eval_max_prefixes"],
                                                 should_stop=when and (lambda: STOP["signal"] is not None),
                                                 progress=show)
    except EnumerationStopped:
        raise Preempted(f"the exploitability evaluation {when}") from None
    except EnumerationError as e:
        raise TrainingError(str(e)) from None
    mean = dist_.mean(0)
    out = {"exploitability": float(game.exploitability(dist_).mean()),
           "exploitability_of_mean": float(game.exploitability(mean)),
           "category_dist": [round(float(x), 5) for x in mean], "category_mass_pruned": float(pruned.max()),
           "category_dist_per_prompt": [[round(float(x), 5) for x in row] for row in dist_]}  # diagnostics.py --steps
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
        raise ConfigError("usage: train_ddp.py CONFIG.yaml [key=value ...] [--check [--world N] [--gpu-gib G]] "
                          "(--help lists every key)")
    if "--check" in argv:  # everything checkable without a GPU, all problems at once, and the plans
        import preflight

        flags = {a: argv[argv.index(a) + 1] for a in ("--world", "--gpu-gib") if a in argv[:-1]}
        rest = [a for i, a in enumerate(argv) if a != "--check" and a not in flags and argv[i - 1] not in flags]
        return preflight.check(rest, int(flags.get("--world", 1)), float(flags.get("--gpu-gib", 80)))
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
    training frees each gathered block (and its full gradient) right after use, so the process would keep the
    freed blocks resident and the sharded peak would not fall below DDP's (bench/sharded_rss.py measures it,
    docs/sharded.md has the figures). Costs a page fault on each new buffer. M_MMAP_THRESHOLD is mallopt's
    -3; setting it also stops the dynamic raise.
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
        except OSError as e:  # out_dir or the disk: one line, on every rank's exit
            error = checkpoint.CheckpointError(checkpoint.os_problem(e))
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
    """Choose the checkpoint to resume (and check it may be), load the models and the oracle, start this segment
    of out_dir's files, and run the iterations."""
    master, out_dir = rank == 0, cfg["out_dir"]
    resume = on_rank0(lambda: checkpoint.choose_resume(out_dir, cfg["resume"], say), world, device)
    saved = checkpoint.read_state(resume) if resume else None
    refusal = checkpoint.resume_refusal(resume, saved, cfg) if saved else None
    if refusal:
        raise ConfigError(refusal)
    spec = comal.ALGOS[cfg["algo"]]
    base_path = base_policy_path(cfg, master, world, say)
    state, trainer = load_models(cfg, spec, base_path, resume, rank, world, device)
    oracle = oracle_lib.build_oracle(cfg["oracle"], device=device, shards=fsdp.oracle_shards(cfg, rank, world, device))
    metrics_path = os.path.join(out_dir, "metrics.jsonl")

    def log(record):  # rank 0; a failed write (a full disk) stops every rank at the iteration's end (io_check)
        if master and trainer.io_error is None:
            try:
                checkpoint.append_metrics(metrics_path, record)
            except OSError as e:
                trainer.io_error = e

    trainer.log = log
    if trainer.describe():
        say(trainer.describe())
    start = 0
    if resume is not None:
        trainer.load_optimizer(resume)
        start = saved["iteration"] + 1
        say(f"resumed from {resume}: iteration {start}" + (" (the run is finished)" if start >= cfg["iterations"] else ""))
    on_rank0(lambda: checkpoint.start_segment(out_dir, cfg, resume, start, say), world, device)
    return run_iterations(cfg, state, trainer, oracle, start, say)


def game_metrics(game, state, trainer, eval_ids, prev, cfg, groups):
    """(the category game's metrics of the updated policy, its distribution for the next call): category_metrics
    on the eval prompts, and the categories of this iteration's samples (what its step was computed from)."""
    with trainer.gathered(state["policy"]):
        cm, prev = category_metrics(game, state, eval_ids, prev, cfg, show=trainer.rank == 0)
    cats = game.category([y for g in groups for y in g])
    cm["sample_category_counts"] = [int(trainer.all_reduce_sum(float((cats == c).sum())))
                                    for c in [*range(len(game.categories)), -1]]
    return cm, prev


def run_iterations(cfg, state, trainer, oracle, start, say):
    """comal.run from iteration `start`, with this run's callbacks: each iteration's prompts (prompts_for), and
    after it its metrics, exploitability on the category game, checkpoint and printed line (after_iteration)."""
    from tqdm import tqdm

    rank, world, log, out_dir = trainer.rank, trainer.world, trainer.log, cfg["out_dir"]
    tokenizer = state["tokenizer"]
    prompts = load_prompts(cfg)
    game = oracle if isinstance(oracle, oracle_lib.CategoryGame) and cfg["eval_prompts"] else None
    eval_ids = encode_prompts(tokenizer, config.eval_prompt_texts(cfg), cfg["max_prompt_tokens"]) if game else None
    prev = start_metrics(game, state, trainer, eval_ids, cfg, start, say)  # the previous iterate's distribution
    bar = tqdm(total=max(0, cfg["iterations"] - start), desc=cfg["algo"], disable=rank != 0, file=sys.stderr)
    current = {}  # iteration k: (start time, prompts, token ids), shared by prompts_for and after_iteration
    silent, t_start, last = [], time.time(), {}  # iterations without preference signal; the last metrics
    copies = saved_copies(comal.ALGOS[cfg["algo"]])

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
        if cfg["eval_winrate"]:
            m["winrate_vs_mu"] = winrate_vs_mu(state, trainer, cfg, oracle, k, x, x_ids, [g[0] for g in groups])
        for key in ("response_length", "tokens_per_s"):
            m[key] = trainer.all_reduce_sum(m[key]) / world
        m["seconds"] = time.time() - t0
        if game:
            cm, prev = game_metrics(game, state, trainer, eval_ids, prev, cfg, groups)
            m.update(cm)
        io_check(trainer, k)
        stop = k + 1 < cfg["iterations"] and trainer.all_reduce_sum(float(STOP["signal"] is not None)) > 0
        due = (k + 1) % cfg["checkpoint_every"] == 0 or k + 1 == cfg["iterations"] or stop
        m["checkpoint"] = checkpoint.save_checkpoint(out_dir, k, state, trainer, cfg, copies) if due else None
        log(m)
        last.update(m)
        say(iteration_line(k, m, game))
        if not m["preference_signal"]:
            silent.append(k)
            say(f"warning: iteration {k} had no preference signal: every win rate of its samples is 1/2 (e.g. every "
                "response in no category), so its step moved the policy by nothing but its regularisers")
        bar.update(1)
        if stop:
            raise Preempted(f"the end of iteration {k}; rerun the same command to continue from {m['checkpoint']}")

    try:
        comal.run(state, trainer, cfg, oracle, prompts_for, start, after_iteration)
    finally:
        bar.close()  # before any final message
    io_check_last(trainer)
    if last:
        say(run_summary(cfg, last, start, time.time() - t_start, game, silent))
    return state


def start_metrics(game, state, trainer, eval_ids, cfg, start, say):
    """The start's exact exploitability on the category game (logged as iteration -1 on a fresh run); returns the
    start's mean category distribution (None without a game or when the run is finished)."""
    if not game or start >= cfg["iterations"]:
        return None
    with trainer.gathered(state["policy"]):  # every rank evaluates: with sharded weights each forward is a collective
        m, prev = category_metrics(game, state, eval_ids, None, cfg, "of the start (nothing to save yet: rerun the "
                                   "same command)" if start == 0 else f"at the resume from iteration {start}",
                                   show=trainer.rank == 0)
    if start == 0:
        trainer.log({"iteration": -1, **m})
    say(f"start: exploitability {m['exploitability']:.4f}  categories {m['category_dist']}")
    return prev


def io_check(trainer, k):
    """Collective, at the end of iteration k: rank 0's metrics writes failed (trainer.io_error) -> every rank
    stops with one CheckpointError (rank 0 prints it), before the iteration's checkpoint."""
    if trainer.all_reduce_sum(float(trainer.io_error is not None)):
        cause = checkpoint.os_problem(trainer.io_error) if trainer.io_error is not None else "on rank 0"
        raise checkpoint.CheckpointError(f"iteration {k}: metrics.jsonl could not be written ({cause}); nothing of "
                                         f"iteration {k} is saved; last good checkpoint: {trainer.last_checkpoint or 'none'}")


def io_check_last(trainer):
    """After the last iteration (its record may have failed): rank 0 alone, no collective left."""
    if trainer.io_error is not None:
        raise checkpoint.CheckpointError(f"metrics.jsonl: {checkpoint.os_problem(trainer.io_error)}; the checkpoints "
                                         f"are complete (last: {trainer.last_checkpoint})")


def run_summary(cfg, m, start, seconds, game, silent):
    """The run's last line: what it reached, how long it took, where its outputs are; and whether it learnt."""
    done = cfg["iterations"] - start
    reached = (f"exploitability {m['exploitability']:.4f}" if game else
               f"win rate vs mu {m['winrate_vs_mu']:.3f}" if "winrate_vs_mu" in m else f"loss {m['loss']:.4f}")
    line = (f"done: {done} iteration(s) in {seconds:.0f}s, {reached} after iteration {cfg['iterations'] - 1}; "
            f"metrics.jsonl and checkpoints in {cfg['out_dir']}")
    if len(silent) == done:
        line += ("\nwarning: no iteration had a preference signal (every win rate 1/2): the policy learnt nothing "
                 "from the oracle; check that its responses can win (the category game reads the first word)")
    return line


def winrate_vs_mu(state, trainer, cfg, oracle, k, x, x_ids, responses):
    """P(pi^{k+1} > mu) on iteration k's prompts x: one fresh sample of the new policy per prompt against the
    first of the responses it trained on, averaged over all ranks' prompts."""
    policy, tokenizer = state["policy"], state["tokenizer"]
    gen = torch.Generator(device=trainer.device).manual_seed(comal.seed_for(cfg["seed"], "eval_winrate", k, trainer.rank))
    policy.eval()
    with trainer.autocast(), trainer.gathered(policy):
        _, new = comal.sample_groups(policy, tokenizer, x_ids, dict(cfg, n_samples=1), gen, trainer.all_done)
    wins = float(oracle.prob(x, [g[0] for g in new], responses).double().sum())
    return trainer.all_reduce_sum(wins) / trainer.all_reduce_sum(float(len(x)))


def iteration_line(k, m, game):
    """The line printed after iteration k (metrics m)."""
    if game:
        return (f"iteration {k:3d}  exploitability {m['exploitability']:.4f}  categories {m['category_dist']}  "
                f"loss {m['loss']:.4f}  {m['seconds']:.1f}s")
    return (f"iteration {k:3d}  loss {m['loss']:.4f}  win rate vs mu {m.get('winrate_vs_mu', float('nan')):.3f}  "
            f"length {m['response_length']:.1f}  {m['seconds']:.1f}s")


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
    opp = OPPONENTS[spec.opponent]
    return [key for key, used in (("ref", spec.ref == "rounds"), ("opponent", bool(opp and opp.copy))) if used]


def load_models(cfg, spec, base_path, resume, rank, world, device):
    """(state, trainer): the policy (from the checkpoint when resuming, checked to give the log-probs of its own
    logits: sample.check_logprob_path) and the spec's frozen copies pi_ref and opponent. A checkpoint is read
    from its safetensors only (nothing in it is unpickled)."""
    from transformers import AutoTokenizer

    import sample

    start_path = resume or base_path
    tokenizer = AutoTokenizer.from_pretrained(start_path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = config.compute_dtype(cfg, device)
    cls = ShardedTrainer if cfg["parallel"] == "fsdp" else Trainer  # its load_policy / load_frozen

    def load(path, dtype, frozen=True):
        kw = {"use_safetensors": True} if resume and path.startswith(resume) else {}  # nothing unpickled
        m = (cls.load_frozen if frozen else cls.load_policy)(path, cfg, rank, world, device, dtype, **kw)
        m.config.pad_token_id = tokenizer.pad_token_id
        return m

    policy = load(start_path, dtype, frozen=False)
    try:  # once: pi_ref and the opponent are copies of the same architecture
        sample.check_logprob_path(policy)
    except sample.UnsupportedModel as e:
        raise ConfigError(f"model {start_path}: {e}") from None
    state = {"policy": policy, "tokenizer": tokenizer, "ref": None, "opponent": None}

    def saved(key):  # a checkpoint holds ref/ and opponent/ beside the policy (checkpoint.save_checkpoint)
        if resume and os.path.isdir(os.path.join(resume, key)):
            return os.path.join(resume, key)
        if resume:  # only after resume_changes=[algo]
            print(f"warning: {resume} has no {key}/ (another algorithm wrote it): {key} starts as the policy",
                  file=sys.stderr)
        return start_path

    if spec.ref == "base":
        state["ref"] = load(base_path, dtype)
    elif spec.ref == "rounds":
        state["ref"] = load(saved("ref"), dtype)
    opp = OPPONENTS[spec.opponent]
    if opp and opp.copy:  # the opponent's own copy (opponents.py), in its dtype
        state["opponent"] = load(saved("opponent"), torch.float32 if opp.copy == "float32" else dtype)
    return state, cls(policy, cfg, rank, world, device)


def cli(argv=None):
    """Exit 0 when done or stopped by a signal (resumable), 2 with one line on rank 0 for a bad config, a bad
    checkpoint or a run that cannot go on (the other ranks stop silently: every rank has the same error)."""
    rank = os.environ.get("RANK", "0")
    try:
        status = main(argv)
        if status:  # --check found problems
            return status
    except Preempted as e:
        if rank == "0":
            print(f"stopped by {STOP['signal']} at {e}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:  # SIGINT in any phase: checkpoints are written whole or not at all
        if rank == "0":
            print("interrupted (SIGINT): rerun the same command to continue from the newest checkpoint", file=sys.stderr)
        return 130
    except (ConfigError, oracle_lib.OracleError, TrainingError, checkpoint.CheckpointError) as e:
        if rank == "0":
            print(f"error: {e}", file=sys.stderr)
        else:  # torchrun stops the other ranks as soon as one exits: let rank 0 print first
            time.sleep(2)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
