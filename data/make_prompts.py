"""Write the demo's instruction set: data/smollm2_train.jsonl (300) and data/smollm2_eval.jsonl (60).

AlpacaEval-style rows {"instruction": ...}. Templates of common instruction
kinds (explain, list, compare, write, advise, define, plan, rewrite,
classify, reason) crossed with topics from many domains, deduplicated,
shuffled with a fixed seed and split. Rerun to regenerate: python data/make_prompts.py
"""
import json
import os
import random

TOPICS = {
    "science": ["photosynthesis", "gravity", "the water cycle", "black holes", "vaccines", "climate change",
                "electricity", "plate tectonics", "DNA", "the immune system", "rainbows", "volcanoes"],
    "tech": ["the internet", "password managers", "machine learning", "spreadsheets", "version control",
             "cloud storage", "electric cars", "smartphone batteries", "open source software", "email spam filters"],
    "daily": ["meal planning", "saving money", "morning routines", "houseplants", "moving to a new city",
              "cooking rice", "cleaning a kitchen", "learning to swim", "packing for a trip", "time management"],
    "society": ["recycling", "public libraries", "voting", "remote work", "volunteering", "city parks",
                "public transport", "museums", "local newspapers", "community gardens"],
    "arts": ["jazz", "haiku", "watercolor painting", "film photography", "the novel", "street art", "opera",
             "board games", "origami", "stand-up comedy"],
    "health": ["sleep", "stretching", "drinking water", "walking", "stress", "posture", "healthy snacks",
               "screen time", "meditation", "sunscreen"],
}
TEMPLATES = [
    "Explain {t} to a ten-year-old.",
    "Give three practical tips about {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "Write a short poem about {t}.",
    "Summarize what someone should know about {t} in two sentences.",
    "What is a common misconception about {t}?",
    "Write a friendly text message inviting a friend to learn about {t}.",
    "Describe {t} in exactly one sentence.",
    "List five questions a curious student might ask about {t}.",
    "How would you explain {t} to someone who is skeptical?",
    "Write a catchy title for a blog post about {t}.",
    "What is the history of {t}, in brief?",
    "Give a step-by-step plan for a beginner interested in {t}.",
    "Why do people care about {t}?",
    "Write a two-line joke about {t}.",
    "Compare {t} with {u}.",
    "What do {t} and {u} have in common?",
    "Which matters more for a happy life, {t} or {u}? Answer briefly.",
]


def main(seed=0, n_train=300, n_eval=60):
    rng = random.Random(seed)
    topics = [t for group in TOPICS.values() for t in group]
    rows = set()
    while len(rows) < n_train + n_eval:
        template = rng.choice(TEMPLATES)
        t, u = rng.sample(topics, 2)
        text = template.format(t=t, u=u)
        rows.add(text[0].upper() + text[1:])
    rows = sorted(rows)
    rng.shuffle(rows)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, part in (("smollm2_train.jsonl", rows[:n_train]), ("smollm2_eval.jsonl", rows[n_train:])):
        with open(os.path.join(here, name), "w") as f:
            f.writelines(json.dumps({"instruction": x}) + "\n" for x in part)


if __name__ == "__main__":
    main()
