"""A model of SRC's architecture and tokenizer with random weights, saved to DST (for memory and speed benches,
where the weights do not matter and the real ones cannot travel).

python bench/random_like.py SRC DST      # SRC: a local HF directory (config.json + tokenizer files suffice)
"""
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src, local_files_only=True))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(dst)
    print(f"{dst}: {model.config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"random weights")
