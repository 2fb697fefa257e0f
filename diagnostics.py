"""Research diagnostics of a train_ddp.py run on the category game, beside the paper's evaluation (eval.py).

    python diagnostics.py --steps RUN [--out DIR]                  # the model's step vs its algorithm's exact step
    python diagnostics.py --sampling-check RUN --samples 1000      # model.generate vs the exact enumeration

--steps (exact_steps, step_fit): per iteration, the step the model took (its logged exact category
distribution) against its algorithm's exact step from the same distribution (toy_game's closed form), and the
exact algorithm run from the logged start with the run's schedule; written to steps.md.
--sampling-check: the exact enumeration (category_dist) of the newest checkpoint against samples drawn with
transformers' own model.generate; written to sampling_check.md, an error if they disagree.
"""
import argparse
import math
import os
import sys

import torch

import checkpoint
import comal
import config
import eval as ev
import oracle as oracle_lib


def sampling_check(args, device):
    """An independent check of the exact enumeration on a run's newest checkpoint: `--samples` responses per
    held-out prompt (the run's eval_prompt_file / eval_prompts) drawn with transformers' own model.generate
    (temperature 1, no top-k / top-p), classified by the oracle, against policy_distribution. Each category's
    sampled frequency (mean over prompts) must lie within 4 standard errors (from the exact probabilities)
    plus the enumeration's unsettled mass; otherwise an EvalError. Writes sampling_check.md."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = args.sampling_check
    cfg_path = os.path.join(run, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise ev.EvalError(f"--sampling-check {run} has no config.yaml: not a train_ddp.py output directory")
    cfg = config.load_config(cfg_path, [])  # DEFAULTS <- the run's config.yaml
    game = oracle_lib.build_oracle(oracle_lib.check_oracle_config(cfg["oracle"]))
    if not isinstance(game, oracle_lib.CategoryGame) or not cfg["eval_prompts"]:
        raise ev.EvalError(f"--sampling-check {run}: needs a run on the category game with eval_prompts > 0")
    finished = checkpoint.list_checkpoints(run)
    if not finished:
        raise ev.EvalError(f"--sampling-check {run} has no checkpoints (checkpoints/iter-*)")
    path, n = finished[-1], args.samples
    if n < 100:
        raise ev.EvalError(f"--samples {n}: the sampling check needs at least 100 responses per prompt")
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = config.encode_prompts(tok, config.eval_prompt_texts(cfg), cfg["max_prompt_tokens"])
    exact, unsettled = game.policy_distribution(model, tok, ids, [tok.eos_token_id], cfg["max_new_tokens"])
    C = len(game.categories)
    counts = torch.zeros(len(ids), C + 1, dtype=torch.float64)
    torch.manual_seed(args.seed)
    for b, prompt in enumerate(ids):
        for s in range(0, n, args.batch_size * 16):
            m = min(args.batch_size * 16, n - s)
            x = torch.tensor([list(prompt)] * m, device=device)
            with torch.no_grad():
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0,
                                     top_k=0, top_p=1.0, max_new_tokens=cfg["max_new_tokens"],
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            cats = game.category(tok.batch_decode(out[:, x.shape[1]:], skip_special_tokens=True))
            counts[b] += torch.bincount(torch.where(cats < 0, C, cats), minlength=C + 1).double()
    sampled, p = (counts / n).mean(0), exact.mean(0)  # (C+1,): mean over prompts
    se = (exact * (1 - exact) / n).sum(0).sqrt() / len(ids)
    slack = 4 * se + unsettled.mean()
    names = game.categories + ["none"]
    lines = [f"checkpoint {os.path.basename(path)}: {n} samples x {len(ids)} prompts (model.generate, temperature 1) "
             f"vs the exact enumeration (unsettled mass {float(unsettled.mean()):.2e})", "",
             "| category | exact | sampled | SE | (sampled - exact) / SE |", "|---|---|---|---|---|"]
    lines += [f"| {names[c]} | {float(p[c]):.4f} | {float(sampled[c]):.4f} | {float(se[c]):.4f} | "
              f"{float((sampled[c] - p[c]) / se[c]) if se[c] > 0 else 0.0:+.2f} |" for c in range(C + 1)]
    out = args.out or os.path.join(run, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sampling_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = [names[c] for c in range(C + 1) if abs(float(sampled[c] - p[c])) > float(slack[c])]
    if bad:
        raise ev.EvalError(f"--sampling-check {run}: sampled frequency of {', '.join(bad)} outside 4 standard errors "
                        "of the exact enumeration")
    return {"exact": p.tolist(), "sampled": sampled.tolist(), "se": se.tolist(), "unsettled": float(unsettled.mean())}


def exact_steps(game, cfg, recs):
    """Does the model take its algorithm's step? For a run on the category game (metrics.jsonl records with
    category_dist, iteration -1 = the start), per iteration k: the exact step of the algorithm (toy_game's
    closed form, Alg. 2 / the spec's prox_gain) from the logged distribution of iteration k - 1, with pi_ref =
    the logged distribution at its round's start (ref "rounds") or the start (ref "base") and the round's eta,
    tau (comal.round_params), against the model's logged distribution at k: the cosine of their centred log
    changes and the ratio of their lengths. And the exact algorithm run from the logged start with the same
    schedule (its exploitability per iteration): whether the schedule itself converges, with every step exact.
    Per eval prompt when the run logged category_dist_per_prompt (averaged over prompts: the exploitabilities
    are then the trainer's logged metric), else on the mean distribution. Category level: exact when pi / pi_ref
    is equal across a category's responses (true of exact steps from a round start)."""
    import toy_game

    spec = comal.ALGOS[cfg["algo"]]
    if spec.prox_gain is None or spec.opponent != "none" or spec.sampler != "policy":
        raise ev.EvalError(f"--steps: {cfg['algo']} has no closed-form step from the policy alone (prox_gain, no "
                        f"opponent); the comparison is defined for comal, iter_ipo, inpo and their kin")
    if recs[0]["iteration"] != -1:
        raise ev.EvalError("--steps: metrics.jsonl has no start record (iteration -1)")
    A = game.extended_payoff()
    toy = toy_game.make_config(mode="noiseless", solver="auto")
    game4 = toy_game.make_game(A.tolist(), [0.25] * len(A))
    K = comal.round_length(spec, cfg)
    per_prompt = all("category_dist_per_prompt" in r for r in recs)
    tracks = [{r["iteration"]: r["category_dist_per_prompt"][j] for r in recs}
              for j in range(len(recs[0]["category_dist_per_prompt"]))] if per_prompt else \
             [{r["iteration"]: r["category_dist"] for r in recs}]
    tracks = [{k: torch.tensor(d, dtype=torch.float64).clamp(min=1e-12).log() for k, d in t.items()} for t in tracks]

    def step(log_pi, log_ref, k):
        eta, tau = comal.round_params(cfg, k // K)
        return toy_game.tabular_step(spec, game4, toy, None, log_pi, log_ref, tau if spec.tau else None, None, eta)

    centred = lambda d: d - d.mean()  # noqa: E731
    per = []  # per track: {iteration: row}
    for logs in tracks:
        rows, sim, sim_ref = {}, logs[-1], logs[-1]
        for k, _, round_start in comal.rounds(cfg["iterations"], K):
            if spec.ref == "rounds" and round_start:
                sim_ref = sim
            sim = step(sim, sim_ref, k)  # the exact algorithm from the start
            if k not in logs or k - 1 not in logs:
                continue
            ref = logs[-1] if spec.ref == "base" else logs.get(k - k % K - 1) if spec.ref == "rounds" else None
            exact = step(logs[k - 1], ref, k)
            d_m, d_x = centred(logs[k] - logs[k - 1]), centred(exact - logs[k - 1])
            rows[k] = {"model": logs[k].exp(), "exact_step": exact.exp(), "exact_algorithm": sim.exp(),
                       "cos": float(d_m @ d_x / (d_m.norm() * d_x.norm()).clamp(min=1e-30)),
                       "length_ratio": float(d_m.norm() / d_x.norm().clamp(min=1e-30)), "d_model": d_m, "d_exact": d_x}
        per.append(rows)
    return over_prompts(game, per)


def over_prompts(game, per):
    """exact_steps' rows averaged over the prompts (per: one {iteration: row} per prompt), at the iterations
    every prompt has; the centred changes kept per prompt (step_fit pools them)."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = []
    for k in sorted(set.intersection(*(set(r) for r in per))):
        rs = [r[k] for r in per]
        row = {"iteration": k, "prompts": len(rs), "cos": mean([r["cos"] for r in rs]),
               "length_ratio": mean([r["length_ratio"] for r in rs]),
               "d_model": [r["d_model"] for r in rs], "d_exact": [r["d_exact"] for r in rs]}
        for key in ("model", "exact_step", "exact_algorithm"):
            row[key] = mean([r[key] for r in rs]).tolist()
            name = "exploitability" if key == "model" else f"{key}_exploitability"
            row[name] = mean([float(game.exploitability(r[key])) for r in rs])
        out.append(row)
    return out


def step_fit(rows):
    """Pooled over the iterations and prompts of exact_steps' rows (centred log changes d_m of the model, d_x
    of the exact step): the realised fraction along the exact step b = sum d_m.d_x / sum |d_x|^2 (least
    squares), the share of the model's change that this explains, r2 = 1 - sum |d_m - b d_x|^2 / sum |d_m|^2,
    and, with two or more eval prompts, how alike the prompts' changes are (the pooled cosine of prompt 0's
    and prompt 1's changes at the same iteration: 1 when the model moves them together, whatever the step)."""
    dm = [d for r in rows for d in r["d_model"]]
    dx = [d for r in rows for d in r["d_exact"]]
    b = sum(float(m @ x) for m, x in zip(dm, dx)) / max(sum(float(x @ x) for x in dx), 1e-30)
    r2 = 1 - sum(float((m - b * x) @ (m - b * x)) for m, x in zip(dm, dx)) / max(sum(float(m @ m) for m in dm), 1e-30)
    pairs = [(r["d_model"][0], r["d_model"][1]) for r in rows if len(r["d_model"]) > 1]
    together = sum(float(u @ v) for u, v in pairs) / max(
        math.sqrt(sum(float(u @ u) for u, _ in pairs) * sum(float(v @ v) for _, v in pairs)), 1e-30) if pairs else None
    return {"fraction": b, "r2": r2, "prompts_together": together}


def steps_mode(args):
    """diagnostics.py --steps RUN: exact_steps of a run, as a table (steps.md in --out, default RUN/eval)."""
    run = args.steps
    cfg, game, recs = ev.category_run(run, "--steps")
    rows = exact_steps(game, cfg, recs)
    f3 = lambda v: "[" + ", ".join(f"{x:.3f}" for x in v) + "]"  # noqa: E731
    what = "mean over eval prompts" if rows and rows[0]["prompts"] > 1 else "of the mean distribution"
    lines = [f"| iteration | model | its exact step | cos | length ratio | exploitability ({what}): model / "
             "exact step / exact algorithm from the start |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['iteration']} | {f3(r['model'])} | {f3(r['exact_step'])} | {r['cos']:+.2f} | "
              f"{r['length_ratio']:.2f} | {r['exploitability']:.3f} / {r['exact_step_exploitability']:.3f} / "
              f"{r['exact_algorithm_exploitability']:.3f} |" for r in rows]
    if rows:
        cos = sorted(r["cos"] for r in rows)
        ratio = sorted(r["length_ratio"] for r in rows)
        lines += ["", f"{len(rows)} iterations: cosine mean {sum(cos) / len(cos):+.2f} (median {cos[len(cos) // 2]:+.2f}), "
                  f"length ratio median {ratio[len(ratio) // 2]:.2f}; final exploitability ({what}): model "
                  f"{rows[-1]['exploitability']:.4f}, the exact algorithm from the same start "
                  f"{rows[-1]['exact_algorithm_exploitability']:.4f}"]
        fit = step_fit(rows)
        lines += [f"pooled over iterations and prompts: the model's change = {fit['fraction']:.2f} x the exact step "
                  f"+ a rest; the exact step explains {fit['r2']:.2f} of its squared length" +
                  ("" if fit["prompts_together"] is None else
                   f"; cosine of eval prompt 0's and 1's changes {fit['prompts_together']:+.2f}")]
    out = args.out or os.path.join(run, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "steps.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", help="a train_ddp.py out_dir on the category game: per iteration, the model's step "
                   "against its algorithm's exact step, and the exact algorithm from the same start")
    p.add_argument("--sampling-check", help="a train_ddp.py out_dir on the category game: model.generate samples "
                   "(--samples per eval prompt) of its newest checkpoint against the exact enumeration")
    p.add_argument("--samples", type=int, default=1000, help="--sampling-check: responses per eval prompt (>= 100)")
    p.add_argument("--batch-size", type=int, default=16, help="--sampling-check: generate batches of 16x this")
    p.add_argument("--seed", type=int, default=0, help="--sampling-check: torch.manual_seed before sampling")
    p.add_argument("--out", default=None, help="where the table goes (default RUN/eval)")
    args = p.parse_args(argv)
    if bool(args.steps) == bool(args.sampling_check):
        raise ev.EvalError("give one of --steps RUN_DIR or --sampling-check RUN_DIR")
    if args.steps:
        return steps_mode(args)
    return sampling_check(args, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


def cli(argv=None):
    try:
        main(argv)
    except (ev.EvalError, oracle_lib.OracleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
