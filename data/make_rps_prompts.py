"""Write the rock-paper-scissors prompt set of the Figure 1 runs: data/rps_train.jsonl (100), data/rps_eval.jsonl (20).

Chat prompts {"instruction": ...} (no system message) that ask for one of
rock, paper, scissors in one word, in many phrasings and situations; the
category game's oracle (oracle.CategoryGame) judges the first word of the
answer with the paper's 3x3 payoff (App. I). Opening line x situation x
request x the order the three options are named, deduplicated, shuffled with
a fixed seed and split. Rerun to regenerate: python data/make_rps_prompts.py
"""
import itertools
import json
import os
import random

OPENINGS = [
    "Let's play rock, paper, scissors.",
    "We are playing a game of rock paper scissors.",
    "Time for a round of rock-paper-scissors!",
    "I challenge you to rock, paper, scissors.",
    "Quick game: rock, paper or scissors.",
    "You and I are about to play rock paper scissors.",
]
SITUATIONS = [
    "",
    "It is the first round.",
    "This round decides the winner.",
    "The score is tied.",
    "We play best of three.",
    "Your friend is waiting for your move.",
    "You lost the last round.",
    "You won the last round.",
    "We are settling who does the dishes.",
    "A crowd is watching.",
]
REQUESTS = [
    "Answer with one word: {o}.",
    "Reply with exactly one word, {o}.",
    "What do you play? One word only: {o}.",
    "Choose one of {o} and answer with that single word.",
    "Say your move as one word ({o}).",
    "Pick {o}. Respond with just the word.",
]
ORDERS = list(itertools.permutations(["rock", "paper", "scissors"]))


def options(order):
    return f"{order[0]}, {order[1]} or {order[2]}"


def main(seed=0, n_train=100, n_eval=20, out_dir=None):
    rng = random.Random(seed)
    rows = set()
    while len(rows) < n_train + n_eval:
        parts = [rng.choice(OPENINGS), rng.choice(SITUATIONS), rng.choice(REQUESTS).format(o=options(rng.choice(ORDERS)))]
        rows.add(" ".join(p for p in parts if p))
    rows = sorted(rows)
    rng.shuffle(rows)
    here = out_dir or os.path.dirname(os.path.abspath(__file__))
    for name, part in (("rps_train.jsonl", rows[:n_train]), ("rps_eval.jsonl", rows[n_train:])):
        with open(os.path.join(here, name), "w") as f:
            f.writelines(json.dumps({"instruction": x}) + "\n" for x in part)


if __name__ == "__main__":
    main()
