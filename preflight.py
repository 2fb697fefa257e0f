"""`train_ddp.py CONFIG [key=value ...] --check [--world N] [--gpu-gib G]`: everything a run needs that can be
checked without a GPU and without loading weights, every problem at once, then the memory and disk plans.

Checked: each key's value, the algorithm's keys and its loss on a synthetic group, the model directory (config,
weights, a tokenizer that loads, its chat template), the prompt set and its field, the held-out prompt file,
every model directory of the oracle (and its head), and, when all of that holds, the relations between keys
(config.check_config). A reward model's own code (trust_remote_code) is imported, not run (model_dirs.check_remote_code).
"""
import memory_plan
import model_dirs
import oracle as oracle_lib
from config import (ConfigError, RUN_KEYS, check_algorithm_keys, check_config, eval_prompt_texts, iteration_prompts,
                    load_config, load_prompts)
from keys import problem


def problems_of(cfg, world):
    """Every problem of cfg that can be found without loading weights, as one-line messages."""
    found = [msg for name, k in RUN_KEYS.items() if (msg := problem(name, k, cfg[name]))]
    if found:  # the checks below read these values
        return found
    for what, check in (("algorithm", lambda: check_algorithm_keys(cfg)), ("model", lambda: check_model(cfg)),
                        ("prompts", lambda: iteration_prompts(load_prompts(cfg), cfg, 0, 0, world)),
                        ("eval_prompt_file", lambda: cfg["eval_prompt_file"] and eval_prompt_texts(cfg))):
        try:
            check()
        except (ConfigError, oracle_lib.OracleError) as e:
            found.append(str(e))
    found += oracle_problems(cfg["oracle"])
    if not found:
        try:
            check_config(cfg, world)
        except (ConfigError, oracle_lib.OracleError) as e:
            found.append(str(e))
    return found


def check_model(cfg):
    """The policy's directory: a config, weights, a tokenizer that loads (and says whether it has a chat template)."""
    if cfg["model"] is None:
        return
    model_dirs.check_model_dir(cfg["model"], "model")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg["model"], local_files_only=True)
    except Exception as e:  # a broken tokenizer file: any loader error, named
        raise ConfigError(f"model: the tokenizer of {cfg['model']} does not load ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]})") from None
    if not getattr(tok, "chat_template", None):
        print(f"check: note: the tokenizer of {cfg['model']} has no chat template: prompts are plain text")


def oracle_problems(block):
    """The oracle block's problems; each of its model directories on its own line."""
    if not isinstance(block, dict):
        return [f"oracle must be a mapping with a 'kind' key, got {block!r}"]
    found = []
    models = block.get("models") if block.get("kind") == "bt_mixture" else None
    if isinstance(models, list):
        for i, m in enumerate(models):
            if isinstance(m, dict) and "path" in m:
                try:
                    model_dirs.check_reward_model_dir(m, f"oracle.models[{i}]")
                except oracle_lib.OracleError as e:
                    found.append(str(e))
    try:
        oracle_lib.check_oracle_config(block, check_paths=not found)
    except oracle_lib.OracleError as e:
        found.append(str(e))
    return found


def check(argv, world=1, gpu_gib=80.0):
    """Exit status: 0 (and the plans printed) when nothing is wrong, 2 with every problem listed."""
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"check: 1 problem:\n  - {e}")
        return 2
    found = problems_of(cfg, world)
    if found:
        print(f"check: {len(found)} problem(s) with {argv[0]}:\n" + "\n".join(f"  - {p}" for p in found))
        return 2
    try:  # the plan reads the oracle's arch entries against their config.json
        lines = memory_plan.report(cfg, cfg["model"], world, gpu_gib)[0] if cfg["model"] is not None else None
    except ConfigError as e:
        print(f"check: 1 problem with {argv[0]}:\n  - {e}")
        return 2
    print(f"check: {argv[0]} is ready to run on {world} rank(s)")
    if lines is None:
        print("check: model null: the tiny embedded base (built at the first run); no plan printed")
        return 0
    print("\n".join(lines + [memory_plan.disk(cfg, cfg["model"])[2]]))
    return 0
