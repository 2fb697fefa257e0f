"""Pairwise win-rate matrices between checkpoints, and the training dynamics of one run.

    python eval.py --models base=DIR comal=DIR iter_ipo=DIR --prompts FILE --oracle ORACLE.yaml --out DIR
    python eval.py --run RUN_DIR [--prompts FILE --oracle ORACLE.yaml] [--out DIR]
    torchrun --nproc_per_node N eval.py ...        # prompts are split across ranks

Matrix mode (the paper's Tables 1/2/5/6): every model answers every prompt
once (sample.py; greedy unless --temperature > 0, --n samples per prompt,
seeded), the oracle judges every pair of models on every prompt, and
M[i][j] = 100 * mean over prompts of P(y_i > y_j) (row beats column), so
M[i][j] + M[j][i] = 100; "Avg" is the mean of a row over the other models.
Written to OUT: winrate.md, winrate.csv, winrate_se.csv (standard errors over
prompts), heatmap.png, lengths.csv. Generations are cached in
OUT/generations/ (keyed by the checkpoint's files, the prompts and the
sampling settings) and judgments in OUT/judgments.json, so adding a model
generates and judges only what is new.

Run mode (Figures 2/5, Table 3-style lengths): each checkpoint of a
train_ddp.py run against the base policy and against the previous iterate,
average response length per iteration; on the category game also the exact
exploitability and the category distribution per iteration (simplex plot).
Written to OUT (default RUN_DIR/eval): dynamics.csv, dynamics.md and PNGs.

Figure 1 mode: runs on the category game drawn in the paper's Figure 1 layout. Research diagnostics of a
run on the category game (the exact enumeration against sampling, the model's step against its algorithm's
exact step) are in diagnostics.py.
"""
import argparse
import csv
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

import checkpoint
import comal
import config
import model_dirs
import oracle as oracle_lib

GENERATED = []  # names of the models generated for in this process (tests count them)


class EvalError(ValueError):
    """Bad eval input: one line naming it, before any generation."""


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def check_checkpoint(path, name):
    try:
        config = model_dirs.check_model_dir(path, f"model {name}")
    except oracle_lib.OracleError as e:
        raise EvalError(str(e)) from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise EvalError(f"model {name}: {path} is a {', '.join(archs)}, not a causal LM checkpoint")
    return path


def parse_models(items):
    models = {}
    for item in items or []:
        if "=" not in item:
            raise EvalError(f"--models takes NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        if not name or any(c in name for c in "/\\|,"):
            raise EvalError(f"--models: bad model name {name!r}")
        if name in models:
            raise EvalError(f"--models: model name {name!r} given twice")
        models[name] = check_checkpoint(path, name)
    if len(models) < 2:
        raise EvalError(f"a win-rate matrix needs at least two models, got {len(models)}")
    return models


def load_prompt_file(src, field):
    """Instructions from a JSONL/JSON/Parquet file or a `datasets` name (AlpacaEval: field `instruction`)."""

    try:
        return config.prompt_file(src, field)
    except config.ConfigError as e:
        raise EvalError(str(e)) from None


# ---------------------------------------------------------------------------
# Generation (cached) and judging (cached)
# ---------------------------------------------------------------------------


def checkpoint_key(path, prompts, settings):
    """Hash of the checkpoint's files (name, size, mtime), the prompts and the sampling settings."""
    h = hashlib.sha256()
    for f in sorted(os.listdir(path)):
        if f.endswith((".safetensors", ".bin", ".json")):
            st = os.stat(os.path.join(path, f))
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(json.dumps(prompts).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def world_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_lists(local, rank, world):
    """Per-prompt results of every rank's slice (prompts rank::world) back in prompt order."""
    if world == 1:
        return local
    parts = [None] * world
    dist.all_gather_object(parts, local)
    out = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def generate_for(name, path, prompts, settings, cache_dir, device):
    """(responses (P, n) strings, lengths (P, n) token counts), from the cache or by sampling."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sample

    key = checkpoint_key(path, prompts, settings)
    cache = os.path.join(cache_dir, f"{name}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["responses"], saved["lengths"], key
    rank, world = world_info()
    GENERATED.append(name)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                 dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.to(device).eval()
    mine = prompts[rank::world]
    ids = config.encode_prompts(tok, mine, settings["max_prompt_tokens"])
    gen = torch.Generator(device=device).manual_seed(settings["seed"] * 1009 + rank)
    responses, lengths = [], []
    n, B = settings["n"], settings["batch_size"]
    for s in range(0, len(ids), B):
        out = sample.generate(model, ids[s:s + B], n=n, max_new_tokens=settings["max_new_tokens"],
                              temperature=settings["temperature"], top_p=settings["top_p"], generator=gen,
                              pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out.response_ids, skip_special_tokens=True)
        eos = torch.isin(out.response_ids, torch.tensor([tok.eos_token_id], device=out.response_ids.device))
        lens = (out.response_mask.sum(-1) - (eos & out.response_mask.bool()).sum(-1)).tolist()
        for i in range(len(texts) // n):
            responses.append(texts[i * n:(i + 1) * n])
            lengths.append(lens[i * n:(i + 1) * n])
    responses, lengths = gather_lists(responses, rank, world), gather_lists(lengths, rank, world)
    if rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        with open(cache + ".tmp", "w") as f:
            json.dump({"key": key, "path": os.path.abspath(path), "responses": responses, "lengths": lengths}, f)
        os.replace(cache + ".tmp", cache)
    del model
    return responses, lengths, key


def judge_pair(oracle, prompts, resp_a, resp_b):
    """(P,) per-prompt win rate of a over b: mean over all sample pairs of P(y_a > y_b)."""
    rank, world = world_info()
    xs, a, b, owner = [], [], [], []
    for p in range(rank, len(prompts), world):
        for ya in resp_a[p]:
            for yb in resp_b[p]:
                xs.append(prompts[p]), a.append(ya), b.append(yb), owner.append(p)
    local = {}
    if xs:
        probs = oracle.prob(xs, a, b).double().tolist()
        for p, v in zip(owner, probs):
            local.setdefault(p, []).append(v)
    mine = [sum(local[p]) / len(local[p]) for p in range(rank, len(prompts), world)]
    return gather_lists(mine, rank, world)


def oracle_key(block):
    return hashlib.sha256(json.dumps(block, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pairwise_matrix(names, gens, prompts, oracle, okey, judgments_path):
    """M (K, K) in %, SE (K, K), using and extending the judgment cache."""
    cache = {}
    if os.path.isfile(judgments_path):
        with open(judgments_path) as f:
            cache = json.load(f)
    K = len(names)
    M, SE = torch.full((K, K), 50.0, dtype=torch.float64), torch.zeros(K, K, dtype=torch.float64)
    judged = 0
    for i in range(K):
        for j in range(i + 1, K):
            a, b = sorted((i, j), key=lambda m: gens[names[m]][2])  # one entry per unordered pair
            key = f"{okey}|{gens[names[a]][2]}|{gens[names[b]][2]}"
            if key not in cache:
                cache[key] = judge_pair(oracle, prompts, gens[names[a]][0], gens[names[b]][0])
                judged += 1
            w = torch.tensor(cache[key], dtype=torch.float64)  # (P,) win rate of a over b per prompt
            if a != i:
                w = 1 - w  # (P,) win rate of i over j
            M[i, j], M[j, i] = 100 * w.mean(), 100 * (1 - w).mean()
            SE[i, j] = SE[j, i] = 100 * w.std() / len(w) ** 0.5 if len(w) > 1 else 0.0
    rank, _ = world_info()
    if rank == 0 and judged:
        with open(judgments_path + ".tmp", "w") as f:
            json.dump(cache, f)
        os.replace(judgments_path + ".tmp", judgments_path)
    return M, SE


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def write_tables(out, names, M, SE, lengths):
    K = len(names)
    avg = [float(sum(M[i, j] for j in range(K) if j != i) / (K - 1)) for i in range(K)]
    with open(os.path.join(out, "winrate.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model"] + names + ["Avg"])
        for i, n in enumerate(names):
            w.writerow([n] + [f"{float(M[i, j]):.4f}" for j in range(K)] + [f"{avg[i]:.4f}"])
    with open(os.path.join(out, "winrate_se.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model"] + names)
        for i, n in enumerate(names):
            w.writerow([n] + [f"{float(SE[i, j]):.4f}" for j in range(K)])
    with open(os.path.join(out, "lengths.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "mean_response_tokens"])
        for n in names:
            w.writerow([n, f"{lengths[n]:.2f}"])
    lines = ["| row beats column (%) | " + " | ".join(names) + " | Avg |", "|---" * (K + 2) + "|"]
    for i, n in enumerate(names):
        cells = ["-" if i == j else f"{float(M[i, j]):.1f} ± {float(SE[i, j]):.1f}" for j in range(K)]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {avg[i]:.1f} |")
    lines += ["", "| model | mean response length (tokens) |", "|---|---|"]
    lines += [f"| {n} | {lengths[n]:.1f} |" for n in names]
    with open(os.path.join(out, "winrate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return avg


def heatmap(path, names, M):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * K + 2, 1.0 * K + 1.5))
    im = ax.imshow(M.numpy(), cmap="RdBu", vmin=0, vmax=100)
    ax.set_xticks(range(K), names, rotation=30, ha="right")
    ax.set_yticks(range(K), names)
    for i in range(K):
        for j in range(K):
            if i != j:
                ax.text(j, i, f"{float(M[i, j]):.1f}", ha="center", va="center", fontsize=9)
    ax.set_title("win rate of row over column (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def line_plot(path, xs, series, ylabel, title, hline=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (ys, err) in series.items():
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=label)
    if hline is not None:
        ax.axhline(hline, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The two modes
# ---------------------------------------------------------------------------


def settings_of(args, max_new_tokens, temperature=1.0):
    """The sampling settings: the flags, else the run's response length and temperature (given here); --greedy
    is one greedy response per prompt."""
    if args.max_new_tokens is None:
        args.max_new_tokens = max_new_tokens
    if args.temperature is None:
        args.temperature = 0.0 if args.greedy else temperature if temperature is not None else 1.0
    if args.greedy:
        if args.temperature != 0 or (args.samples or 1) > 1:
            raise EvalError("--greedy is one response per prompt at temperature 0: drop --temperature / --samples")
        args.samples = 1
    args.samples = 4 if args.samples is None else args.samples
    if args.samples < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise EvalError("--samples, --max-new-tokens and --batch-size must be >= 1")
    if args.temperature < 0:
        raise EvalError(f"--temperature must be >= 0, got {args.temperature}")
    if args.samples > 1 and args.temperature == 0:
        raise EvalError("--samples > 1 needs --temperature > 0 (greedy samples are identical)")
    return {"n": args.samples, "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "max_prompt_tokens": args.max_prompt_tokens, "seed": args.seed, "batch_size": args.batch_size}


def runs_max_new_tokens(models):
    """(max_new_tokens of the train_ddp.py runs the checkpoints come from (CKPT/../../config.yaml) when they
    agree, else 512; a line saying which)."""
    import yaml

    found = {}
    for name, path in models.items():
        cfg_path = os.path.join(path, "..", "..", "config.yaml")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                found[name] = (yaml.safe_load(f) or {}).get("max_new_tokens")
    values = set(found.values()) - {None}
    if len(values) == 1:
        n, why = values.pop(), f"the max_new_tokens of the runs of {', '.join(found)}"
    else:
        n, why = 512, "the runs disagree" if values else "no checkpoint is in a train_ddp.py run"
    return n, f"eval.py: --max-new-tokens {n} ({why}; set --max-new-tokens to choose)"


def matrix_mode(args, device):
    models = parse_models(args.models)
    if not args.prompts:
        raise EvalError("--prompts is required with --models")
    if not args.oracle:
        raise EvalError("--oracle ORACLE.yaml is required with --models")
    prompts = load_prompt_file(args.prompts, args.prompt_field or config.RUN_KEYS["prompt_field"].default)
    block = oracle_lib.load_oracle_yaml(args.oracle)
    chosen, said = runs_max_new_tokens(models) if args.max_new_tokens is None else (None, None)
    settings = settings_of(args, chosen)
    if said:  # after the flags are checked: a bad input stays one line
        print(said, file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    oracle = oracle_lib.build_oracle(block, device=device)
    names = list(models)
    gens = {n: generate_for(n, models[n], prompts, settings, os.path.join(args.out, "generations"), device)
            for n in names}
    M, SE = pairwise_matrix(names, gens, prompts, oracle, oracle_key(block), os.path.join(args.out, "judgments.json"))
    lengths = {n: sum(sum(x) for x in gens[n][1]) / sum(len(x) for x in gens[n][1]) for n in names}
    rank, _ = world_info()
    if rank == 0:
        avg = write_tables(args.out, names, M, SE, lengths)
        heatmap(os.path.join(args.out, "heatmap.png"), names, M)
        print(open(os.path.join(args.out, "winrate.md")).read())
        return {"names": names, "M": M, "SE": SE, "avg": avg, "lengths": lengths}
    return None


def run_mode(args, device):
    """eval.py --run RUN: each checkpoint's win rate against the base and the previous iterate, its mean response
    length and, on the category game, its exact exploitability; dynamics.csv / .md and plots in --out."""
    import yaml

    run = args.run
    cfg_path = os.path.join(run, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise EvalError(f"--run {run} has no config.yaml: not a train_ddp.py output directory")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    with checkpoint.readers_lock(run):  # a training still running prunes none of its checkpoints until this ends
        return run_dynamics(args, run, cfg, device)


def run_dynamics(args, run, cfg, device):
    """run_mode's work on the run's checkpoints, listed once."""
    import tiny

    finished = checkpoint.list_checkpoints(run)
    ckpts = [os.path.basename(p) for p in finished]
    if not ckpts:
        raise EvalError(f"--run {run} has no checkpoints (checkpoints/iter-*)")
    base = cfg.get("model") or os.path.join(cfg.get("cache_dir", "runs/cache"), "tiny-base-v1")
    check_checkpoint(base, "base")
    block = oracle_lib.load_oracle_yaml(args.oracle) if args.oracle else oracle_lib.check_oracle_config(cfg["oracle"])
    game = block.get("kind", "category") == "category"
    if args.prompts:
        prompts = load_prompt_file(args.prompts, args.prompt_field or cfg.get("prompt_field", "prompt"))
    elif game:
        prompts = tiny.synthetic_prompts(args.num_prompts, cfg.get("seed", 0) + 999)
    else:
        raise EvalError("--prompts is required for a run whose oracle is not the category game")
    settings = settings_of(args, cfg.get("max_new_tokens", 512), cfg.get("temperature", 1.0))  # the run's, by default
    out = args.out or os.path.join(run, "eval")
    os.makedirs(out, exist_ok=True)
    oracle = oracle_lib.build_oracle(block, device=device)
    paths = dict(base=base, **dict(zip(ckpts, finished)))
    gens = {n: generate_for(n, paths[n], prompts, settings, os.path.join(out, "generations"), device)
            for n in progress(paths, "sampling")}
    rows = dynamics_rows(ckpts, gens, prompts, oracle, oracle_key(block), os.path.join(out, "judgments.json"))
    if game:  # exact category distributions (not from samples): exploitability, exact win rates
        exact = {n: exact_distribution(paths[n], prompts, oracle, settings, cfg.get("max_new_tokens"), device)
                 for n in progress(paths, "exact distributions")}
        E = oracle.extended_payoff()
        win = lambda a, b: 100 * float(torch.einsum("pi,ij,pj->p", exact[a], E, exact[b]).mean())  # noqa: E731
        for k, (row, c) in enumerate(zip(rows, ckpts)):
            row["exploitability"] = float(oracle.exploitability(exact[c]).mean())
            row["category_dist"] = [round(float(x), 5) for x in exact[c].mean(0)]
            row["winrate_vs_base_exact"], row["winrate_vs_prev_exact"] = win(c, "base"), win(c, (["base"] + ckpts)[k])
    if world_info()[0] != 0:
        return None
    base_len = sum(map(sum, gens["base"][1])) / sum(map(len, gens["base"][1]))
    lines = write_dynamics(out, rows, base_len, game)
    dynamics_plots(out, rows, base_len, cfg.get("algo", "run"), oracle if game else None)
    print("\n".join(lines))
    return rows


def progress(items, desc):
    """A tqdm bar over items on rank 0 (stderr)."""
    from tqdm import tqdm

    return tqdm(list(items), desc=desc, leave=False, disable=world_info()[0] != 0, file=sys.stderr)


def dynamics_rows(ckpts, gens, prompts, oracle, okey, jpath):
    """Per checkpoint: its win rate (%, with its standard error) against the base and against the previous
    iterate (the base for the first), and its mean response length."""
    rows = []
    for k, c in enumerate(ckpts):
        prev = (["base"] + ckpts)[k]
        Mb, SEb = pairwise_matrix([c, "base"], gens, prompts, oracle, okey, jpath)
        Mp, SEp = pairwise_matrix([c, prev], gens, prompts, oracle, okey, jpath)
        lens = gens[c][1]
        rows.append({"iteration": int(c.split("-")[1]), "checkpoint": c, "winrate_vs_base": float(Mb[0, 1]),
                     "se_vs_base": float(SEb[0, 1]), "winrate_vs_prev": float(Mp[0, 1]),
                     "se_vs_prev": float(SEp[0, 1]), "mean_length": sum(map(sum, lens)) / sum(map(len, lens))})
    return rows


def exact_distribution(path, prompts, oracle, settings, max_new_tokens, device):
    """(P, C + 1) the exact category distribution of a checkpoint on the prompts (oracle.policy_distribution)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = config.encode_prompts(tok, prompts, settings["max_prompt_tokens"])
    return oracle.policy_distribution(model, tok, ids, [tok.eos_token_id], max_new_tokens)[0]


def write_dynamics(out, rows, base_len, game):
    """dynamics.csv and dynamics.md in out; returns the markdown table's lines."""
    with open(os.path.join(out, "dynamics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    extra = " vs base, exact | vs previous, exact | exploitability |" if game else ""
    lines = ["| iteration | vs base (%) | vs previous (%) | mean length |" + extra,
             "|---|---|---|---|" + ("---|---|---|" if game else ""),
             f"| base | - | - | {base_len:.1f} |" + (" - | - | |" if game else "")]
    for r in rows:
        lines.append(f"| {r['iteration']} | {r['winrate_vs_base']:.1f} ± {r['se_vs_base']:.1f} | "
                     f"{r['winrate_vs_prev']:.1f} ± {r['se_vs_prev']:.1f} | {r['mean_length']:.1f} |" +
                     (f" {r['winrate_vs_base_exact']:.1f} | {r['winrate_vs_prev_exact']:.1f} | "
                      f"{r['exploitability']:.4f} |" if game else ""))
    with open(os.path.join(out, "dynamics.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def dynamics_plots(out, rows, base_len, algo, game=None):
    """winrate.png and length.png; on the category game (game: its oracle) exploitability.png and, with 3
    categories, the simplex trajectory."""
    its = [r["iteration"] for r in rows]
    line_plot(os.path.join(out, "winrate.png"), its,
              {"vs base": ([r["winrate_vs_base"] for r in rows], [r["se_vs_base"] for r in rows]),
               "vs previous iterate": ([r["winrate_vs_prev"] for r in rows], [r["se_vs_prev"] for r in rows])},
              "win rate (%)", f"{algo}: win rate per iteration", hline=50)
    line_plot(os.path.join(out, "length.png"), its, {"mean length": ([r["mean_length"] for r in rows], None)},
              "tokens", "mean response length", hline=base_len)
    if game is None:
        return
    line_plot(os.path.join(out, "exploitability.png"), its,
              {"exploitability": ([r["exploitability"] for r in rows], None)}, "exploitability",
              "exact exploitability of the category distribution", hline=0)
    if len(game.categories) == 3:
        import toy_game

        traj = [torch.tensor(r["category_dist"][:3], dtype=torch.float64) for r in rows]
        toy_game.plot({algo: {"policies": [(p / p.sum()).tolist() for p in traj],
                              "exploitability": [r["exploitability"] for r in rows]}},
                      toy_game.make_game(game.A.tolist()), os.path.join(out, "simplex.png"),
                      title="category distribution per iteration")


def category_run(run, flag):
    """(config, game, records) of a train_ddp.py out_dir on the category game: its config.yaml over the defaults,
    its oracle, and the metrics.jsonl records with a category distribution (iteration -1 = the start), by
    iteration. One EvalError naming `flag` and the run for anything else."""
    cfg_path, metrics = os.path.join(run, "config.yaml"), os.path.join(run, "metrics.jsonl")
    if not (os.path.isfile(cfg_path) and os.path.isfile(metrics)):
        raise EvalError(f"{flag} {run}: no config.yaml and metrics.jsonl (not a train_ddp.py out_dir)")
    cfg = config.load_config(cfg_path, [])
    game = oracle_lib.build_oracle(oracle_lib.check_oracle_config(cfg["oracle"]))
    if not isinstance(game, oracle_lib.CategoryGame):
        raise EvalError(f"{flag} {run}: needs a run on the category game")
    try:
        lines = checkpoint.metrics_lines(metrics, lambda msg: print(msg, file=sys.stderr))
    except checkpoint.CheckpointError as e:
        raise EvalError(f"{flag} {run}: {e}") from None
    recs = sorted((r for _, r in lines if "category_dist" in r), key=lambda r: r["iteration"])
    if not recs:
        raise EvalError(f"{flag} {run}: no exploitability in metrics.jsonl (eval_prompts: 0?)")
    return cfg, game, recs


def regularized_distance(game, cfg, recs):
    """For a run regularised towards its start (an algorithm with ref "base" and a tau, e.g. INPO): the NE of
    J_tau (eq. 2) on the game with "none" (extended_payoff), pi_ref = the start's mean category distribution
    (iteration -1), tau of the last iteration; returns (that NE, total variation of the final distribution to
    it). The KL of eq. 2 over responses reduces to one over categories because the payoff depends on the
    category only. None for other runs."""
    import toy_game

    spec = comal.ALGOS.get(cfg.get("algo"))
    if spec is None or spec.ref != "base" or "tau" not in recs[-1] or recs[0]["iteration"] != -1:
        return None
    start = torch.tensor(recs[0]["category_dist"], dtype=torch.float64)
    star = toy_game.regularized_nash(game.extended_payoff(), start.clamp(min=1e-300).log(), recs[-1]["tau"]).exp()
    final = torch.tensor(recs[-1]["category_dist"], dtype=torch.float64)
    return star.tolist(), float((final - star).abs().sum() / 2)


def figure1_mode(args):
    """The paper's Figure 1 layout for language-model runs on the category game: each run's trajectory of
    category distributions on the simplex and all runs' exact exploitability per iteration, read from their
    metrics.jsonl (iteration -1 = the start); writes figure1.png and figure1.md."""
    import toy_game

    results, rows, payoff = {}, [], None
    for run in args.figure1:
        cfg, game, recs = category_run(run, "--figure1")
        if len(game.categories) != 3:
            raise EvalError(f"--figure1 {run}: needs the category game with 3 categories")
        if payoff is not None and not torch.equal(payoff, game.A):
            raise EvalError(f"--figure1 {run}: its payoff differs from the first run's")
        payoff = game.A
        name = cfg.get("algo", "run")
        name = name if name not in results else f"{name} ({os.path.basename(os.path.normpath(run))})"
        dists = [torch.tensor(r["category_dist"][:3], dtype=torch.float64) for r in recs]
        results[name] = {"policies": [(d / d.sum()).tolist() for d in dists],  # on the simplex: "none" left out
                         "exploitability": [r["exploitability"] for r in recs]}
        e = results[name]["exploitability"]
        reg = regularized_distance(game, cfg, recs)
        if reg is not None:
            results[name]["regularized_nash"], results[name]["tv_to_regularized_nash"] = reg
        rows.append(f"| {name} | {len(recs) - 1} | {e[0]:.4f} | {e[-1]:.4f} | {max(e[len(e) - len(e) // 3:]):.4f} | "
                    f"{[round(x, 3) for x in recs[-1]['category_dist'][:3]]} | {recs[-1]['category_dist'][3]:.4f} | "
                    + (f"{reg[1]:.4f} (to {[round(x, 3) for x in reg[0]]})" if reg else "-") + " |")
    os.makedirs(args.out, exist_ok=True)
    toy_game.plot(results, toy_game.make_game(payoff.tolist()), os.path.join(args.out, "figure1.png"),
                  title="category distribution per iteration (exact) and exploitability")
    table = ["| run | iterations | start | final | max over the last third | final categories | none | "
             "TV to its regularised NE |", "|---|---|---|---|---|---|---|---|"] + rows
    with open(os.path.join(args.out, "figure1.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    return results


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where the default is 'not given' (None) and the help says why."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsShown,
                                epilog="Cost: --models samples every model on every prompt and judges every pair of "
                                "models (K (K-1) / 2 x prompts x samples^2 oracle calls); --run does that for every "
                                "checkpoint against the base and the previous one, plus, on the category game, the "
                                "exact enumeration of each checkpoint (the tiny default's 30: about a minute on 2 "
                                "CPU cores); --figure1 only reads metrics.jsonl.")
    p.add_argument("--models", nargs="+", help="NAME=CHECKPOINT_DIR ...: a win-rate matrix")
    p.add_argument("--run", help="a train_ddp.py out_dir: training dynamics of its checkpoints")
    p.add_argument("--figure1", nargs="+", help="train_ddp.py out_dirs on the category game: Figure 1's layout")
    p.add_argument("--prompts", help="JSONL/JSON/Parquet file or a datasets name (--run on the category game: "
                   "synthetic prompts if not given)")
    p.add_argument("--prompt-field", default=None, help="the field holding the instruction (default: the run's "
                   f"prompt_field with --run, else {config.RUN_KEYS['prompt_field'].default!r}, as in training)")
    p.add_argument("--num-prompts", type=int, default=64, help="run mode on the category game: synthetic prompts")
    p.add_argument("--oracle", help="YAML file with an oracle: block (--run: the run's oracle if not given)")
    p.add_argument("--out", default=None, help="output directory (required with --models and --figure1; --run: "
                   "RUN_DIR/eval)")
    p.add_argument("--samples", type=int, default=None, help="samples per prompt (default 4); a win rate averages "
                   "every pair of samples of a prompt, its standard error is over the prompts")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the run's with "
                   "--run, else 1.0)")
    p.add_argument("--greedy", action="store_true", help="one greedy response per prompt instead of samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the run's max_new_tokens (--models: the checkpoints' runs', else 512)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="a longer prompt keeps its chat template "
                   "and its instruction is cut from the left, as in training")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per rank: seed * 1009 + rank)")
    args = p.parse_args(argv)
    if sum(map(bool, (args.models, args.run, args.figure1))) != 1:
        raise EvalError("give one of --models NAME=DIR ... (a win-rate matrix), --run RUN_DIR (training dynamics) "
                        "or --figure1 RUN_DIR ... (runs on the category game, Figure 1's layout); the research "
                        "diagnostics are in diagnostics.py")
    if args.figure1:
        if not args.out:
            raise EvalError("--out DIR is required with --figure1")
        return figure1_mode(args)
    if args.models and not args.out:
        raise EvalError("--out DIR is required with --models")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        out = matrix_mode(args, device) if args.models else run_mode(args, device)
        if distributed:
            dist.barrier()  # rank 0 still writes tables: a gloo rank torn down before it can abort at exit
        return out
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def cli(argv=None):
    try:
        main(argv)
    except (EvalError, oracle_lib.OracleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
