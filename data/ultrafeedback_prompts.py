"""Turn a local copy of UltraFeedback into the paper recipes' prompt file: one {"prompt": ...} per line.

python data/ultrafeedback_prompts.py SRC --out /data/ultrafeedback/prompts.jsonl [--field instruction] [--seed 0]
                                     [--split NAME] [--exclude HELD_OUT.jsonl]

SRC is what you copied from a machine with hub access: a Parquet file or a
folder of them (e.g. openbmb/UltraFeedback's data/*.parquet), a folder written
by `datasets`' save_to_disk, or a JSONL file. The paper (Sec. 5) trains on
UltraFeedback's 64K instructions (openbmb/UltraFeedback: 63,967 rows, field
`instruction`; HuggingFaceH4/ultrafeedback_binarized calls it `prompt`, and the
field is found automatically when --field is not given). Empty and repeated
instructions are dropped, the rest shuffled with --seed so that the recipes'
six consecutive subsets (num_subsets: 6) are alike, and written to --out.

Held-out prompts for evaluation (the paper does not name its set): e.g.
HuggingFaceH4/ultrafeedback_binarized's test_prefs split (--split picks a
split of a save_to_disk folder, or the Parquet files named after it); then
--exclude that file when writing the training prompts, since openbmb's 64K
rows contain it.
"""
import argparse
import glob
import json
import os
import random
import sys


def read(src, split=None):
    """The rows of SRC; split: a DatasetDict's split (default train, else its first), or, in a folder of
    Parquet files, those whose name starts with it."""
    if os.path.isdir(src) and os.path.isfile(os.path.join(src, "dataset_info.json")) or \
            os.path.isfile(os.path.join(src, "dataset_dict.json")):
        import datasets

        ds = datasets.load_from_disk(src)
        if isinstance(ds, datasets.DatasetDict):
            if split is not None and split not in ds:
                sys.exit(f"error: {src} has no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split or "train"] if (split or "train") in ds else next(iter(ds.values()))
        return list(ds)
    files = sorted(glob.glob(os.path.join(src, "**", "*.parquet"), recursive=True)) if os.path.isdir(src) else [src]
    if split is not None and os.path.isdir(src):
        files = [f for f in files if os.path.basename(f).startswith(split)]
    if not files or not all(os.path.isfile(f) for f in files):
        sys.exit(f"error: {src}: no Parquet file{f' named {split}*' if split else ''}, save_to_disk folder or "
                 "JSONL file there")
    rows = []
    for f in files:
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows += pq.read_table(f).to_pylist()
        else:
            with open(f) as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.add_argument("--field", default=None, help="default: instruction, else prompt, whichever the rows have")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default=None, help="a split of SRC (e.g. test_prefs); default: train")
    p.add_argument("--exclude", default=None, help="a prompts file written by this script (held-out prompts) "
                   "whose instructions are dropped")
    args = p.parse_args(argv)
    rows = read(args.src, args.split)
    if not rows:
        sys.exit(f"error: {args.src} has no rows")
    field = args.field or next((f for f in ("instruction", "prompt") if isinstance(rows[0].get(f), str)), None)
    if field is None or not isinstance(rows[0].get(field), str):
        sys.exit(f"error: {args.src}: rows have no string field {args.field or 'instruction or prompt'} "
                 f"(fields: {', '.join(rows[0])}); pass --field")
    held_out = set()
    if args.exclude:
        try:
            with open(args.exclude) as f:
                held_out = {json.loads(line)["prompt"] for line in f if line.strip()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"error: --exclude {args.exclude}: not a prompts file of this script ({type(e).__name__}: {e})")
    seen, prompts = set(held_out), []
    for r in rows:
        x = r.get(field)
        if isinstance(x, str) and x.strip() and x not in seen:
            seen.add(x)
            prompts.append(x)
    random.Random(args.seed).shuffle(prompts)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        f.writelines(json.dumps({"prompt": x}) + "\n" for x in prompts)
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.out}: {len(prompts)} prompts (field {field!r}; {len(rows) - len(prompts)} empty, repeated or "
          f"held out dropped), {len(prompts) // 6} per subset with num_subsets: 6")


if __name__ == "__main__":
    main()
