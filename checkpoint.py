"""Checkpoints and the run directory: what a checkpoint holds, how it is checked, how a run resumes.

    <out_dir>/checkpoints/iter-KKKKK/          the policy pi^{k+1} after iteration k
        config.json, model*.safetensors, tokenizer files   an HF directory (from_pretrained loads it)
        ref/, opponent/                        the frozen copies that are state of the run (HF directories)
        optimizer.safetensors                  AdamW moments and step counts, by parameter name (ddp)
        optimizer/unit-UUUUU.safetensors       the same per sharded unit, unpadded (fsdp; any world size reads it)
                                               (neither with optimizer_reset: iteration, which zeroes the moments
                                               before the next iteration's first step: they are never read)
        trainer_state.json                     iteration, world size, parallel mode, the config that produced it
        manifest.json                          written last: every file's size and sha256, the config hash

No pickles: tensors are safetensors, everything else JSON, and nothing else in
the directory is ever read (a stray *.pt or *.bin is ignored; the policy and
its copies are loaded with use_safetensors). There is no RNG state: every
generator of a run is seeded from (seed, purpose, iteration, rank)
(comal.seed_for), so an iteration redone after a resume draws the same numbers.

A checkpoint is written under iter-KKKKK.tmp, its manifest last, then renamed;
a directory of the same iteration already there (a redone iteration) is moved
aside first and deleted after. Resume verifies the newest checkpoint against its
manifest and falls back, saying so in one line, to the newest good one.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time

import torch

FORMAT = "comal-checkpoint-2"

# Keys that may change when a run resumes: they do not change what the run computes (how the work is split
# over devices, what is evaluated, where files go, how long it runs). Any other change must be named in
# resume_changes.
RESUMABLE = {"out_dir", "resume", "resume_changes", "iterations", "eval_prompts", "eval_prompt_file", "eval_max_prefixes",
             "eval_winrate", "keep_checkpoints", "checkpoint_every", "cache_dir", "bucket_mb", "micro_batch_size", "parallel",
             "activation_checkpointing"}


class CheckpointError(RuntimeError):
    """A checkpoint or out_dir that cannot be used: one line naming the file and what is wrong."""


def checkpoint_dir(out_dir, k):
    return os.path.join(out_dir, "checkpoints", f"iter-{k:05d}")


def list_checkpoints(out_dir, finished=True):
    """Checkpoint directories of a run, oldest first: those with a manifest (finished=True), or every
    iter-KKKKK directory (finished=False; temp and replaced directories never count)."""
    root = os.path.join(out_dir, "checkpoints")
    names = sorted(d for d in os.listdir(root) if re.fullmatch(r"iter-\d{5}", d)) if os.path.isdir(root) else []
    paths = [os.path.join(root, d) for d in names]
    return [p for p in paths if os.path.isfile(os.path.join(p, "manifest.json"))] if finished else paths


def config_sha256(cfg):
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def json_safe(x):
    """Non-finite floats become null (strict JSON readers reject NaN); containers recursively."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_json(path, obj):
    """Atomically: a temp file, then rename."""
    with open(path + ".tmp", "w") as f:
        json.dump(json_safe(obj), f, indent=1, allow_nan=False)
    os.replace(path + ".tmp", path)


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------


def save_checkpoint(out_dir, k, state, trainer, cfg, copies):
    """Write iteration k's checkpoint (every rank calls this; rank 0 writes). Refuses non-finite weights.

    copies: the names in `state` of the frozen models that are state of the run ("ref", "opponent").
    Sharded runs gather one unit at a time, so no rank ever holds the whole model or optimizer state. A write
    that fails (a full disk, a read-only out_dir) stops every rank together with one CheckpointError; the
    unfinished <checkpoint>.tmp is ignored by the resume and replaced by the next attempt.
    """
    models = [state["policy"]] + [state[key] for key in copies]
    moments = cfg["optimizer_reset"] == "never"  # otherwise Trainer.step zeroes them before they are used again
    if not trainer.weights_finite(models):  # collective: every rank agrees
        raise CheckpointError(f"iteration {k}: the weights are not finite; nothing was saved "
                              f"(last good checkpoint: {trainer.last_checkpoint or 'none'})")
    path = checkpoint_dir(out_dir, k)
    tmp, writes = path + ".tmp", Writes(trainer.rank == 0)
    writes(start_dir, tmp, state["tokenizer"])
    optimizer = trainer.optimizer if moments else None
    if hasattr(state["policy"], "flat_units"):  # parallel: fsdp (fsdp.shard_model)
        save_sharded(state["policy"], tmp, writes, optimizer)
        for key in copies:
            save_sharded(state[key], os.path.join(tmp, key), writes)
    else:
        writes(save_whole, tmp, state, copies, optimizer)
    writes(write_json, os.path.join(tmp, "trainer_state.json"), {
        "format": FORMAT, "iteration": k, "world": trainer.world, "parallel": cfg["parallel"], "copies": copies,
        "rng": "none: every generator is seeded by comal.seed_for(seed, purpose, iteration, rank)",
        "config": cfg, "config_sha256": config_sha256(cfg)})
    writes(write_manifest, tmp, k, cfg)
    writes(replace_dir, tmp, path)
    if cfg["keep_checkpoints"]:
        writes(prune, out_dir, k, cfg["keep_checkpoints"])
    if trainer.all_reduce_sum(float(writes.error is not None)):  # every rank waits for rank 0's writes
        raise CheckpointError(f"iteration {k}: its checkpoint could not be written to {tmp} "
                              f"({os_problem(writes.error) if writes.error else 'on rank 0'}); nothing of it is "
                              f"saved; last good checkpoint: {trainer.last_checkpoint or 'none'}")
    trainer.last_checkpoint = path
    return path


class Writes:
    """Rank 0's file writes of one checkpoint: fn(*a) until one fails with an OS error, then nothing, so every
    rank still takes part in the sharded gathers between the writes and all stop together afterwards."""

    def __init__(self, master):
        self.master, self.error = master, None

    def __call__(self, fn, *a):
        if self.master and self.error is None:
            try:
                fn(*a)
            except Exception as e:
                if not is_os_error(e):
                    raise
                self.error = e


def is_os_error(e):
    """An OSError, or a Rust library's report of one (safetensors' SafetensorError, tokenizers' Exception:
    '... (os error 28)')."""
    return (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"
            or bool(re.search(r"\(os error \d+\)", str(e))))


def os_problem(e):
    """One phrase for an OS-level error: its path and cause (safetensors' errors carry the cause in the text)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def start_dir(tmp, tokenizer):
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tokenizer.save_pretrained(tmp)


def save_whole(tmp, state, copies, optimizer):
    """ddp: the policy and its copies as HF directories, the AdamW moments by parameter name."""
    from safetensors.torch import save_file

    state["policy"].save_pretrained(tmp)
    for key in copies:
        state[key].save_pretrained(os.path.join(tmp, key))
    if optimizer is not None:
        names = {id(p): n for n, p in state["policy"].named_parameters()}
        tensors = {f"{names[id(p)]}.{field}": v.detach().cpu().clone().contiguous()
                   for p, st in optimizer.state.items() for field, v in st.items()}
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))


def prune(out_dir, k, keep):
    """keep_checkpoints: after iteration k's checkpoint is written, delete all but the newest `keep` finished
    checkpoints up to k (k's among them). Later ones (damaged, skipped by the resume) are left for the run to
    overwrite: ordering by name alone would keep them and delete the checkpoint just written. Nothing is
    deleted while eval.py reads the checkpoints (readers_lock)."""
    import fcntl

    with open(os.path.join(out_dir, "checkpoints", "readers.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # eval.py --run is reading them (readers_lock): pruned after a later checkpoint
            return
        older = [p for p in list_checkpoints(out_dir) if int(p[-5:]) < k]
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def readers_lock(out_dir):
    """A shared lock that eval.py --run holds while it reads a run's checkpoints: prune deletes nothing while
    any reader holds it. Where the lock file cannot be made (no checkpoints yet, a copy on a read-only mount:
    nothing prunes it there) the block runs without it."""
    import fcntl

    try:
        f = open(os.path.join(out_dir, "checkpoints", "readers.lock"), "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_SH)
        yield


def write_manifest(path, k, cfg):
    """Sizes and sha256 of every file under `path`; the last file written, so it marks the checkpoint finished."""
    files = {}
    for root, _, names in os.walk(path):
        for name in sorted(names):
            f = os.path.join(root, name)
            files[os.path.relpath(f, path)] = {"bytes": os.path.getsize(f), "sha256": sha256_file(f)}
    write_json(os.path.join(path, "manifest.json"), {"format": FORMAT, "iteration": k,
                                                     "config_sha256": config_sha256(cfg), "files": files})


def replace_dir(tmp, path):
    """tmp -> path; an existing path (the same iteration, redone) is moved aside first, then deleted."""
    old = path + ".replaced"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_sharded(model, path, writes, optimizer=None):
    """Stream a sharded model to an HF directory, one unit (and its Adam moments) gathered at a time: every rank
    takes part in the gathers, rank 0 writes (through `writes`, a Writes)."""
    from safetensors.torch import save_file

    units = model.flat_units
    writes(lambda: os.makedirs(path, exist_ok=True))
    weight_map, total = {}, 0
    for i, u in enumerate(units):
        full = u.gathered_fp32()  # collective
        fname = f"model-{i + 1:05d}-of-{len(units):05d}.safetensors"
        tensors = u.split(full)
        writes(lambda: save_file({name: t.clone() for name, t in tensors.items()}, os.path.join(path, fname),
                                 metadata={"format": "pt"}))
        weight_map.update({name: fname for name in tensors})
        total += 4 * u.total
        full = tensors = None  # the gathered unit is freed before the next one
        if optimizer is not None and optimizer.state.get(u.shard):
            st = optimizer.state[u.shard]
            moments = {key: u.gathered_fp32(st[key]).clone() for key in ("exp_avg", "exp_avg_sq")}
            writes(lambda: os.makedirs(os.path.join(path, "optimizer"), exist_ok=True))
            writes(save_file, {"step": st["step"].detach().cpu().reshape(()).clone(), **{k: v.cpu() for k, v in moments.items()}},
                   os.path.join(path, "optimizer", f"unit-{i:05d}.safetensors"))
    writes(write_json, os.path.join(path, "model.safetensors.index.json"),
           {"metadata": {"total_size": total}, "weight_map": weight_map})
    writes(save_hf_config, model, path)


def save_hf_config(model, path):
    config = model.config
    dtype = getattr(config, "dtype", None)
    config.dtype = torch.float32  # the master weights are saved
    config.save_pretrained(path)
    config.dtype = dtype
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)


# ---------------------------------------------------------------------------
# Checking and resuming
# ---------------------------------------------------------------------------


def verify(path):
    """None if the checkpoint matches its manifest, else what is wrong (one phrase)."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        old = " (an older comal's pickle format, not loaded)" if os.path.isfile(os.path.join(path, "trainer_state.pt")) else ""
        return f"no manifest.json{old}"
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files = manifest["files"]
        assert manifest["format"] == FORMAT and isinstance(files, dict) and "trainer_state.json" in files
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return "manifest.json is unreadable or not this format"
    root = os.path.realpath(path)
    for rel, entry in files.items():
        f = os.path.join(path, rel)
        if os.path.isabs(rel) or ".." in rel.split("/") or not os.path.realpath(f).startswith(root + os.sep):
            return f"manifest entry {rel!r} is outside the checkpoint"
        if not os.path.isfile(f):
            return f"{rel} is missing"
        if os.path.getsize(f) != entry["bytes"]:
            return f"{rel} has {os.path.getsize(f)} bytes, the manifest says {entry['bytes']}"
        if sha256_file(f) != entry["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return iteration_problem(path, manifest)


def iteration_problem(path, manifest):
    """The iteration a checkpoint says it is, by its directory name (iter-KKKKK), its manifest and its
    trainer_state.json, must agree: a checkpoint renamed or edited into another place of the run is refused."""
    try:
        said = {"manifest.json": manifest["iteration"], "trainer_state.json": read_state(path)["iteration"]}
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable or not this format"
    name = os.path.basename(os.path.normpath(path))
    if re.fullmatch(r"iter-\d{5}", name):
        said["the directory name"] = int(name[5:])
    if len(set(map(repr, said.values()))) > 1:
        return "its iteration disagrees: " + ", ".join(f"{what} says {k!r}" for what, k in said.items())
    return None


def read_state(path):
    """trainer_state.json of a verified checkpoint."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def choose_resume(out_dir, resume, say):
    """The checkpoint a run continues from (rank 0 decides; the caller broadcasts).

    auto: the newest checkpoint in out_dir that matches its manifest; a bad newer one is named in one line.
    never: none (check_config has refused a non-empty out_dir). A path: that checkpoint, which must verify,
    and out_dir must not hold later checkpoints (a branch goes to a new out_dir).
    """
    if resume == "never":
        return None
    if resume != "auto":
        problem = verify(resume)
        if problem:
            raise CheckpointError(f"resume: {resume} cannot be used: {problem}")
        k = read_state(resume)["iteration"]
        later = [p for p in list_checkpoints(out_dir, finished=False) if int(p[-5:]) > k]
        if later:
            raise CheckpointError(f"resume: out_dir {out_dir} already has checkpoints after iteration {k} "
                                  f"(newest {os.path.basename(later[-1])}); continue a branch in a new out_dir")
        return resume
    candidates = list_checkpoints(out_dir, finished=False)
    bad = []
    for path in reversed(candidates):
        problem = verify(path)
        if problem is None:
            if bad:
                say(f"warning: skipped {'; '.join(bad)}; resuming from {path}")
            return path
        bad.append(f"{path}: {problem}")
    if bad:
        raise CheckpointError(f"no usable checkpoint in {out_dir} ({'; '.join(bad)}); move them aside to start over")
    return None


def config_changes(saved, cfg):
    """Keys outside RESUMABLE whose value differs between the checkpoint's config and this one."""
    return sorted(k for k in set(saved) | set(cfg) if k not in RESUMABLE and saved.get(k) != cfg.get(k))


def resume_refusal(resume, saved, cfg):
    """Why the run `cfg` may not continue from checkpoint `resume` (its trainer_state `saved`), or None: what
    produced the earlier iterations must still be what runs now (the caller raises ConfigError with it)."""
    changed = [key for key in config_changes(saved["config"], cfg) if key not in cfg["resume_changes"]]
    if changed:
        diff = ", ".join(f"{key} ({saved['config'].get(key)!r} -> {cfg.get(key)!r})" for key in changed)
        return (f"resume: the config differs from {resume}'s in {diff}; set resume_changes=[{', '.join(changed)}] "
                f"to continue with the change, or start a new out_dir")
    if cfg["optimizer_reset"] == "never" and saved["config"].get("optimizer_reset", "never") != "never":
        return (f"resume: {resume} was written with optimizer_reset=iteration and holds no AdamW moments to "
                f"continue with optimizer_reset=never; resume with optimizer_reset=iteration")
    if saved["parallel"] != cfg["parallel"]:
        return (f"resume: {resume} was written with parallel={saved['parallel']}; its optimizer state is not read "
                f"by parallel={cfg['parallel']}: resume with parallel={saved['parallel']}")
    return None


def start_segment(out_dir, cfg, resume, start, warn=print):
    """Rank 0, before iteration `start`: metrics.jsonl keeps only the iterations before it (a run that never
    finished an iteration starts it over; a torn last line is dropped with a warning); config.yaml is the first
    segment's config, and each resumed segment gets its own config-resumed-at-KKKKK.yaml."""
    import yaml

    metrics = os.path.join(out_dir, "metrics.jsonl")
    if resume is not None and os.path.isfile(metrics):  # drop what the interrupted iteration logged
        kept = [line for line, r in metrics_lines(metrics, warn) if r.get("iteration", -1) < start]
        with open(metrics, "w") as f:
            f.writelines(kept)
    elif os.path.isfile(metrics):
        os.remove(metrics)
    names = ["config.yaml"] if resume is None or not os.path.isfile(os.path.join(out_dir, "config.yaml")) else []
    names += [f"config-resumed-at-{start:05d}.yaml"] if resume is not None else []
    for name in names:
        with open(os.path.join(out_dir, name), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)


def metrics_lines(path, warn=print):
    """[(line, record)] of a metrics.jsonl, oldest first. A last line that is not a whole JSON record (its write
    was cut by a full disk or a kill) is dropped with one warning naming the file and line; an earlier one is a
    CheckpointError naming it (the file was edited or damaged: nothing is guessed)."""
    with open(path) as f:
        lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    out = []
    for j, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            assert isinstance(record, dict) and line.endswith("\n")
        except (ValueError, AssertionError):
            if j < len(lines) - 1:
                raise CheckpointError(f"{path} line {number} is not a JSON record ({line.strip()[:60]!r}); "
                                      "fix or delete that line") from None
            warn(f"warning: dropped the torn last line {number} of {path} ({line.strip()[:60]!r})")
            continue
        out.append((line, record))
    return out


def append_metrics(path, record):
    """One record as one line, written by one os.write (a line is never interleaved with another; a write cut
    short by a full disk is an OSError here and a torn last line that metrics_lines drops on resume)."""
    data = (json.dumps(json_safe(record), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(28, "No space left on device (a short write)", path)
    finally:
        os.close(fd)


def load_optimizer(optimizer, path, params=None, units=None):
    """AdamW state from a checkpoint: by parameter name (ddp: params = [(name, p)]) or each rank's slice of
    every unit (sharded: written by any number of ranks)."""
    from safetensors import safe_open

    if units is None:
        f = os.path.join(path, "optimizer.safetensors")
        if not os.path.isfile(f):
            return
        with safe_open(f, "pt", device="cpu") as g:
            keys = set(g.keys())
            for name, p in params:
                if f"{name}.exp_avg" in keys:
                    optimizer.state[p] = {"step": g.get_tensor(f"{name}.step"),
                                          **{k: g.get_tensor(f"{name}.{k}").to(p.device) for k in ("exp_avg", "exp_avg_sq")}}
        return
    for i, u in enumerate(units):
        f = os.path.join(path, "optimizer", f"unit-{i:05d}.safetensors")
        if not os.path.isfile(f):
            continue
        lo, hi = u.rank * u.size, min((u.rank + 1) * u.size, u.total)
        with safe_open(f, "pt", device="cpu") as g:  # this rank's slice only
            st = {"step": g.get_tensor("step")}
            for key in ("exp_avg", "exp_avg_sq"):
                mine = torch.zeros(u.size, dtype=torch.float32, device=u.shard.device)
                if hi > lo:
                    mine[:hi - lo] = g.get_slice(key)[lo:hi].to(u.shard.device)
                st[key] = mine
        optimizer.state[u.shard] = st


# ---------------------------------------------------------------------------
# One run per out_dir
# ---------------------------------------------------------------------------


def lock_out_dir(out_dir):
    """An exclusive lock on out_dir for this process's lifetime (rank 0 holds it).

    flock on <out_dir>/run.lock: the OS releases it when the holder dies, even by kill -9, so a lock left
    by a dead run is never in the way (the file's host/pid/start then only describe that run). Returns the
    open file (keep it) or raises CheckpointError naming the holder.
    """
    import fcntl

    path = os.path.join(out_dir, "run.lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        what = "is a file, not a directory" if os.path.isfile(out_dir) else f"cannot be written ({os_problem(e)})"
        raise CheckpointError(f"out_dir {out_dir} {what}; choose another out_dir") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "an unknown process"
        f.close()
        raise CheckpointError(f"out_dir {out_dir} is in use by another run ({holder}); wait for it to end or "
                              "choose another out_dir") from None
    except OSError as e:  # a filesystem without flock: run unprotected, but say so
        print(f"warning: cannot lock {path} ({e.strerror}); a second run on this out_dir would not be stopped",
              file=sys.stderr)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def run_files(out_dir):
    """What a previous run left in out_dir (resume=never refuses these)."""
    return [n for n in ("metrics.jsonl", "config.yaml", "checkpoints") if os.path.exists(os.path.join(out_dir, n))]


# ---------------------------------------------------------------------------
# Reading a checkpoint in slices (sharded mode: each rank reads only its part)
# ---------------------------------------------------------------------------


class SafetensorsReader:
    """The tensors of an HF checkpoint directory (one safetensors file or an index), read by name in slices.

    flat_range(name, shape, a, b) returns entries [a, b) of the flattened tensor, reading only the rows that
    hold them (get_slice), so a rank that owns 1/N of a unit reads about 1/N of its bytes.
    """

    def __init__(self, path):
        import contextlib

        from safetensors import safe_open

        index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
        self.stack = contextlib.ExitStack()
        self.path, self.handles, self.where = path, {}, {}
        if os.path.isfile(index):
            with open(index) as f:
                self.where = dict(json.load(f)["weight_map"])
        elif os.path.isfile(single):
            with safe_open(single, "pt") as g:
                self.where = {k: "model.safetensors" for k in g.keys()}
        else:
            raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json "
                                  "(parallel: fsdp reads the weights in slices from safetensors)")
        self.open = lambda fname: safe_open(os.path.join(path, fname), "pt", device="cpu")
        self.bytes_read = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def has(self, name):
        return name in self.where

    def handle(self, name):
        if name not in self.where:
            raise CheckpointError(f"{self.path} has no tensor {name!r} (the model's parameters and the checkpoint's "
                                  "names differ)")
        fname = self.where[name]
        if fname not in self.handles:
            self.handles[fname] = self.stack.enter_context(self.open(fname))
        return self.handles[fname]

    def tensor(self, name):
        t = self.handle(name).get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def flat_range(self, name, shape, a, b):
        sl = self.handle(name).get_slice(name)
        if tuple(sl.get_shape()) != tuple(shape):
            raise CheckpointError(f"{self.path}: {name} has shape {tuple(sl.get_shape())}, the model expects "
                                  f"{tuple(shape)}")
        if len(shape) <= 1:
            t = sl[a:b] if len(shape) == 1 else self.handle(name).get_tensor(name).reshape(1)[a:b]
        else:
            row = 1
            for d in shape[1:]:
                row *= d
            r0, r1 = a // row, -(-b // row)
            rows = sl[r0:r1]  # whole rows: at most one partial row read beyond each end
            self.bytes_read += rows.numel() * rows.element_size()
            return rows.reshape(-1)[a - r0 * row:b - r0 * row]
        self.bytes_read += t.numel() * t.element_size()
        return t
