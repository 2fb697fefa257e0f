"""The run's configuration: every key with its default, meaning and check (RUN_KEYS), YAML + key=value loading,
validation before anything loads (one line naming the key), and the prompt set (files, datasets, the chat
template, the subset of each iteration). train_ddp.py and eval.py read their inputs through here.
"""
import copy
import json
import os

import torch

import checkpoint
import comal
import examples
import model_dirs
import oracle as oracle_lib
import smollm2  # noqa: F401 -- adds the offline demo's oracle kind, minilm_rubrics, to oracle.KINDS
from keys import ConfigError  # noqa: F401 -- config.ConfigError, as callers name it
from keys import Key, flag, help_lines, integer, mapping, number, one_of, optional, problem, strings, text

# The run's keys (keys.Key: default, meaning, check). The keys an algorithm reads (eta, tau, eta_tau,
# ref_update_every, pair_selection, clip_eps, kappa, ...) are not here: each algorithm's spec lists them
# (comal.ALGOS / comal.KEYS), and setting one the algorithm does not read is an error.
RUN_KEYS = {
    "model": Key(None, "local HF directory of the base policy; null builds the tiny embedded base (tiny.py)",
                 optional(text)),
    "out_dir": Key("runs/tiny", "where config.yaml, metrics.jsonl and checkpoints/ go", text),
    "resume": Key("auto", "auto: continue from the newest good checkpoint in out_dir (a fresh start if it has "
                  "none); never: start fresh, refused if out_dir holds a run; or a checkpoint directory", text),
    "resume_changes": Key([], "keys allowed to differ from the checkpoint's config on resume, e.g. [lr]; any other "
                          "change to what defines the run (algo, eta, lr, batch sizes, oracle, model, seed, ...) "
                          "is refused", strings),
    "seed": Key(0, "all randomness derives from (seed, purpose, iteration, rank): comal.seed_for", integer()),
    "algo": Key("comal", "one of " + ", ".join(comal.ALGOS), text),
    "iterations": Key(30, "number of iterations k (one data subset each)", integer(1)),
    "n_samples": Key(5, "responses per prompt (paper: 5); preferences compare at least 2", integer(2)),
    "temperature": Key(1.0, "sampling temperature (paper: 0.8; 1.0 samples mu itself, as the theory assumes)",
                       number(0, lo_open=True, why=" for training (greedy samples are all alike)")),
    "top_p": Key(1.0, "nucleus sampling", number(0, 1, lo_open=True)),
    "max_new_tokens": Key(8, "response length limit (also Dr.GRPO's constant normaliser)", integer(1)),
    "max_prompt_tokens": Key(1024, "a longer prompt keeps its chat template whole and its instruction is cut from "
                             "the left (the template alone needs several tokens)", integer(8)),
    "prompts": Key(None, "JSONL/JSON/Parquet file, a local `datasets` directory or name; null = synthetic prompts",
                   optional(text)),
    "prompt_field": Key("prompt", "the field holding the instruction", text),
    "prompt_split": Key("train", "split of a `datasets` prompt set", text),
    "num_subsets": Key(6, "the prompts are split into this many parts, used in turn (paper: 6)", integer(1)),
    "prompts_per_iteration": Key(32, "prompts used per iteration, from the iteration's subset (0 = all of it)",
                                 integer(0)),
    "lr": Key(5e-7, "AdamW peak learning rate, in (0, 1] (paper: 5e-7)", number(0, 1, lo_open=True)),
    "warmup_ratio": Key(0.1, "linear warmup fraction of each iteration's steps, then lr_schedule's decay to 0 "
                        "(paper: 10%)", number(0, 1, hi_open=True)),
    "lr_schedule": Key("cosine", "the decay after warmup, restarted every iteration: cosine (Sec. 5, App. J) or "
                       "linear (App. K)", one_of("cosine", "linear")),
    "weight_decay": Key(0.0, "AdamW weight decay", number(0)),
    "batch_size": Key(32, "global examples per optimizer step, at most an iteration's examples (paper: 32)",
                      integer(1)),
    "micro_batch_size": Key(8, "examples per forward/backward on one rank", integer(1)),
    "epochs": Key(1, "passes over each iteration's examples (paper: 1)", integer(1)),
    "grad_clip": Key(1.0, "max global gradient norm (0 = off)", number(0)),
    "optimizer_reset": Key("never", "AdamW moments: never reset (kept across iterations) or zeroed at the start of "
                           "every iteration (iteration: each iteration's loss minimised from scratch, as the paper "
                           "fine-tunes anew each iteration; checkpoints then hold no moments)",
                           one_of("never", "iteration")),
    "fit_gap": Key(False, "log how much of the achievable decrease of each iteration's own loss the optimizer "
                   "realised: the loss before and after training and its minimum over free per-response log-probs "
                   "(comal.fit_gap; one more forward); not for surrogate or token-level losses", flag),
    "oracle": Key({"kind": "category"}, "the preference oracle block (oracle.py; its keys are listed below)", mapping),
    "eval_prompts": Key(16, "held-out prompts for exact category-game exploitability each iteration (0 = off)",
                        integer(0)),
    "eval_max_prefixes": Key(20000, "the exact category enumeration's budget: response prefixes expanded per eval "
                             "prompt (the tiny default and SmolLM2 need ~1000); past it the run stops with one line",
                             integer(1)),
    "eval_prompt_file": Key(None, "held-out prompts for eval_prompts (a prompts-like file, field prompt_field; "
                            "the first eval_prompts rows); null = synthetic instructions", optional(text)),
    "eval_winrate": Key(True, "log the win rate of the updated policy against mu's responses", flag),
    "dtype": Key("auto", "auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16 (any device: autocast, frozen "
                 "copies and fsdp's gathered weights in bf16); master weights, AdamW and gradient reduction stay fp32",
                 one_of("auto", "float32", "bfloat16")),
    "bucket_mb": Key(25, "gradient all-reduce bucket size in MiB", integer(1)),
    "parallel": Key("ddp", "ddp (replicated weights, bucketed all-reduce) or fsdp (flat shards per block, "
                    "ZeRO-3 style)", one_of("ddp", "fsdp")),
    "rollout_batch_size": Key(0, "prompts per generate call on each rank (0 = all of the iteration's at once); the "
                              "KV cache holds rollout_batch_size x n_samples x (prompt + max_new_tokens) tokens",
                              integer(0)),
    "rollout": Key("gathered", "fsdp: gathered (sample and precompute log-probs from weights gathered once per "
                   "phase) or sharded (per-block gathers in every forward, for models too large to gather whole)",
                   one_of("gathered", "sharded")),
    "activation_checkpointing": Key(False, "recompute each transformer block in backward instead of storing its "
                                    "activations", flag),
    "keep_checkpoints": Key(0, "keep only the newest N checkpoints (0 = all)", integer(0)),
    "checkpoint_every": Key(1, "write a checkpoint after every N-th iteration, the last one and any stopped by a "
                            "signal; a resume redoes the iterations after the newest checkpoint", integer(1)),
    "cache_dir": Key("runs/cache", "where the tiny embedded base is built once", text),
}


def algo_keys():
    """Every key some algorithm of comal.ALGOS reads (an entry added by a fork or a test counts too)."""
    return {k: v for spec in comal.ALGOS.values() for k, v in spec.key_defs().items()}


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def load_config(path, overrides):
    """RUN_KEYS' defaults <- YAML file <- key=value overrides (values parsed as YAML)."""
    import yaml

    cfg = {name: copy.deepcopy(k.default) for name, k in RUN_KEYS.items()}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}: "
                              f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
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
    if key not in RUN_KEYS and key not in algo:
        import difflib

        close = difflib.get_close_matches(key, list(RUN_KEYS) + list(algo), n=3, cutoff=0.6)
        raise ConfigError(f"{key}: unknown config key ({where})" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if key in algo:
        if value is None:  # key=null: not set (the algorithm's default, or absent for one that does not read it)
            cfg.pop(key, None)
            return
        cfg[key] = as_number(value) if isinstance(algo[key].default, float) or key == "eta_tau" else value
        return
    cfg[key] = as_number(value) if isinstance(RUN_KEYS[key].default, float) else value


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
    unread = [key for key in algo_keys() if key in cfg and key not in defs]
    if unread:
        one = len(unread) == 1
        raise ConfigError(f"{', '.join(unread)}: algo {cfg['algo']} does not read {'this key' if one else 'these keys'} "
                          f"(it reads: {', '.join(defs)}); remove {'it' if one else 'them'} or set "
                          + " ".join(f"{k}=null" for k in unread))
    for key, k in defs.items():
        if key not in cfg:
            cfg[key] = k.default
        if msg := problem(key, k, cfg[key]):
            raise ConfigError(msg)
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
    try:  # the loss itself, once, on a synthetic group: an undeclared key or a missing field named now
        examples.check_loss(cfg["algo"], spec, cfg, comal.hyper(spec, cfg, *comal.round_params(cfg, 0)))
    except comal.SpecError as e:
        raise ConfigError(str(e)) from None
    return spec


def compute_dtype(cfg, device):
    """The dtype the forwards run in, on every device alike: bf16 for dtype bfloat16 (and auto on CUDA), else
    fp32. In bf16: autocast, frozen copies and fsdp's gathered weights in bf16; the master weights, AdamW state
    and the gradients' reduction (DDP buckets, fsdp's reduce-scatter) stay fp32."""
    bf16 = cfg["dtype"] == "bfloat16" or (cfg["dtype"] == "auto" and torch.device(device).type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def check_config(cfg, world):
    """Reject wrong types and impossible values, naming the key; nothing is loaded yet. Each key's own check
    (RUN_KEYS, the algorithm's keys), then the relations between keys, then the files the config names."""
    for name, k in RUN_KEYS.items():
        if msg := problem(name, k, cfg[name]):
            raise ConfigError(msg)
    spec = check_algorithm_keys(cfg)
    if cfg["rollout"] == "sharded" and cfg["parallel"] != "fsdp":
        raise ConfigError("rollout: sharded needs parallel: fsdp (DDP always samples from its whole weights)")
    if cfg["fit_gap"] and (spec.surrogate or spec.token_level):
        raise ConfigError(f"fit_gap: algo {cfg['algo']}'s loss is a policy-gradient surrogate or token-level; its "
                          "minimum over free sequence log-probs is not its step, so there is no gap to measure; "
                          "set fit_gap false")
    if cfg["batch_size"] % (world * cfg["micro_batch_size"]):
        raise ConfigError(f"batch_size {cfg['batch_size']} is not divisible by world size {world} x "
                          f"micro_batch_size {cfg['micro_batch_size']}")
    if cfg["prompts_per_iteration"] and cfg["prompts_per_iteration"] % world:
        raise ConfigError(f"prompts_per_iteration {cfg['prompts_per_iteration']} is not divisible by world size {world}")
    if cfg["resume"] not in ("auto", "never") and not os.path.isfile(os.path.join(str(cfg["resume"]), "manifest.json")):
        raise ConfigError(f"resume: {cfg['resume']} is not a finished checkpoint directory (no manifest.json)")
    if cfg["resume"] == "never" and (found := checkpoint.run_files(cfg["out_dir"])):
        raise ConfigError(f"resume=never: out_dir {cfg['out_dir']} already holds a run ({', '.join(found)}); "
                          "choose a new out_dir, move it aside, or use resume=auto to continue it")
    unknown = [k for k in cfg["resume_changes"] if k not in RUN_KEYS and k not in algo_keys()]
    if unknown:
        raise ConfigError(f"resume_changes: {unknown} are not config keys")
    if cfg["model"] is not None:
        try:
            model_dirs.check_model_dir(cfg["model"], "model")
        except oracle_lib.OracleError as e:
            raise ConfigError(str(e)) from None
    # reads the prompts: a missing field or subsets too small for the world size are reported now
    per_iteration = len(iteration_prompts(load_prompts(cfg), cfg, 0, 0, world)) * world
    n_examples = per_iteration * examples.examples_per_group(spec, cfg)
    if cfg["batch_size"] > n_examples:  # each step is divided by batch_size: a larger one would shrink every step
        raise ConfigError(f"batch_size {cfg['batch_size']} is larger than an iteration's {n_examples} examples "
                          f"({per_iteration} prompts x {n_examples // per_iteration} per group of n_samples "
                          f"{cfg['n_samples']}); set batch_size <= {n_examples}")
    if spec.on_policy and (cfg["epochs"] != 1 or cfg["batch_size"] < n_examples):
        raise ConfigError(f"algo {cfg['algo']} learns on-policy (REINFORCE on y ~ pi): one optimizer step per "
                          f"iteration, so epochs must be 1 and batch_size >= the iteration's {n_examples} examples "
                          f"(prompts_per_iteration x n_samples); got epochs {cfg['epochs']}, batch_size {cfg['batch_size']}")
    try:
        cfg["oracle"] = oracle_lib.check_oracle_config(cfg["oracle"])
    except oracle_lib.OracleError as e:
        raise ConfigError(str(e)) from None
    if cfg["eval_prompt_file"] is not None:
        if cfg["oracle"]["kind"] != "category" or not cfg["eval_prompts"]:
            raise ConfigError("eval_prompt_file is read only for the category game's exact exploitability "
                              "(oracle kind category and eval_prompts > 0)")
        n = len(eval_prompt_texts(cfg))
        if n < cfg["eval_prompts"]:
            raise ConfigError(f"eval_prompts {cfg['eval_prompts']} > the {n} rows of eval_prompt_file "
                              f"{cfg['eval_prompt_file']}")
    if cfg["eval_prompts"] and cfg["oracle"]["kind"] != "category":
        cfg["eval_prompts"] = 0  # exploitability is exact only on the category game
    return cfg


def eval_prompt_texts(cfg):
    """The held-out instructions of the exploitability evaluation: eval_prompt_file's first eval_prompts rows,
    or synthetic ones."""
    import tiny

    if cfg["eval_prompt_file"] is None:
        return tiny.synthetic_prompts(cfg["eval_prompts"], cfg["seed"] + 12345)
    return prompt_file(cfg["eval_prompt_file"], cfg["prompt_field"])[:cfg["eval_prompts"]]


def prompt_file(src, field, split="eval"):
    """Every instruction of one prompt file or dataset (held-out sets: eval_prompt_file, eval.py --prompts)."""
    return load_prompts({"prompts": src, "prompt_field": field, "prompt_split": split, "prompts_per_iteration": 0,
                         "num_subsets": 1, "seed": 0})


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
        rows, where = read_rows(src)
    elif os.path.isdir(src) or src.count("/") <= 1:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        try:
            import datasets

            ds = datasets.load_from_disk(src) if os.path.isdir(src) else datasets.load_dataset(src, split=cfg["prompt_split"])
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg["prompt_split"]]
            rows = list(ds)
            where = [f"row {i}" for i in range(len(rows))]
        except Exception as e:
            raise ConfigError(f"prompts: cannot load {src!r} as a file or dataset ({str(e).splitlines()[0][:160]}); "
                              "offline, give a local JSONL/JSON/Parquet file or a saved dataset directory") from None
    else:
        raise ConfigError(f"prompts: {src} does not exist")
    if not rows:
        raise ConfigError(f"prompts: {src} has no rows")
    for r, w in zip(rows, where):
        if not isinstance(r, dict) or not isinstance(r.get(field), str):
            raise ConfigError(f"prompts: {w} of {src} has no string field {field!r} (set prompt_field)")
        if not r[field].strip():
            raise ConfigError(f"prompts: {w} of {src} has an empty {field!r}")
    return [r[field] for r in rows]


def read_rows(path):
    """(rows, where each row is: 'line N' of a JSONL file, 'row N' otherwise)."""
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
            return rows, [f"row {i}" for i in range(len(rows))]
        with open(path) as f:
            if path.endswith(".jsonl"):
                rows, where = [], []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ConfigError(f"prompts: line {i} of {path} is not valid JSON ({e.msg}, "
                                              f"column {e.colno})") from None
                        where.append(f"line {i}")
                return rows, where
            data = json.load(f)
        rows = data if isinstance(data, list) else data.get("data", [])
        return rows, [f"row {i}" for i in range(len(rows))]
    except (json.JSONDecodeError, OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"prompts: cannot read {path}: {str(e).splitlines()[0]}") from None


def encode_prompts(tokenizer, prompts, max_tokens, cut=None):
    """Token ids of each prompt in the policy's chat template (plain text if it has none).

    A prompt over max_tokens keeps the template whole (its head, e.g. <|bos|><|user|>, and the generation
    prompt at the end): its instruction is cut from the left until the whole fits. The indices of cut
    prompts are appended to `cut`.
    """
    chat = bool(getattr(tokenizer, "chat_template", None))

    def encode(x):
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(x)["input_ids"]

    out = []
    for i, x in enumerate(prompts):
        ids = encode(x)
        if len(ids) > max_tokens:
            words = tokenizer(x, add_special_tokens=False)["input_ids"]
            while len(ids) > max_tokens:
                words = words[len(ids) - max_tokens:]  # re-encoding may merge tokens differently: repeat
                if not words:
                    raise ConfigError(f"max_prompt_tokens {max_tokens} is shorter than the chat template alone "
                                      f"({len(encode(''))} tokens)")
                ids = encode(tokenizer.decode(words))
            if cut is not None:
                cut.append(i)
        out.append(ids)
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
        raise ConfigError(f"prompts_per_iteration {per} > {size} prompts per subset ({len(prompts)} prompts / "
                          f"num_subsets {S}); lower num_subsets, or set prompts_per_iteration <= {size} (0 = all)")
    return subset[:per][rank::world]


def help_text():
    """`train_ddp.py --help`: every key with its default and meaning, from RUN_KEYS, the algorithms' keys (with
    the algorithms that read each) and the oracle kinds' KEYS."""
    import yaml

    def show(v):
        text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        return text if len(text) <= 60 else text[:57] + "..."

    lines = ["usage: python train_ddp.py CONFIG.yaml [key=value ...]",
             "       torchrun --nproc_per_node N train_ddp.py CONFIG.yaml [key=value ...]",
             "", "Keys (YAML file, then key=value overrides; an unknown key is an error with the closest names):"]
    lines += help_lines(RUN_KEYS, show)
    lines += ["", "Algorithm keys: only the algorithms listed read each one; setting it for another is an error",
              "(key=null unsets a key a config file set):"]
    decls = []  # [key, Key, readers]: two algorithms' own_keys may declare one key differently
    for name, spec in comal.ALGOS.items():
        for key, k in spec.key_defs().items():
            same = [d for d in decls if d[0] == key and d[1] == k]
            same[0][2].append(name) if same else decls.append([key, k, [name]])
    for key, k, readers in decls:
        lines += help_lines({key: k}, show) + [f"      read by: {', '.join(readers)}"]
    lines += ["", "Oracle block (oracle: {kind: ..., KEY: ...}; oracle.KEY=value on the command line edits one key):"]
    for kind, cls in oracle_lib.KINDS.items():
        lines.append(f"  kind: {kind}")
        lines += help_lines(cls.KEYS, show, indent="    ")
        if cls.ITEM_KEYS:
            lines.append(f"    each entry of {cls.ITEM_OF}:")
            lines += help_lines(cls.ITEM_KEYS, show, indent="      ")
    return "\n".join(lines)
