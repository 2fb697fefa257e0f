#!/usr/bin/env bash
# The GPU side of every bench in one go (about 10 minutes on one H100/H200); on a machine without CUDA it runs
# the CPU-fallback parts at small sizes, so the script itself is checked everywhere.
#   bash bench/gpu_check.sh [OUT_DIR]        # prints each bench's lines; OUT_DIR keeps the tiny run
# Not yet in it: a torch.compile'd decode step (the issue asks to keep it only if faster and greedy-equal).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)}
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEV=cuda; echo "== device: $(python -c 'import torch; print(torch.cuda.get_device_name(0))')"
  SAMPLE=(--dtype bf16); LOGPROB=(); MEM=(--device cuda --worlds 1); RSS=(--nproc 1)
else
  DEV=cpu; echo "== device: CPU fallback ($(nproc) cores), small sizes"
  SAMPLE=(--prompts 4 --n 2 --new 16 --min-prompt 16 --max-prompt 32); LOGPROB=(--tokens 512 --seq 128 --vocab 32000)
  MEM=(--hidden 128 --layers 2 --vocab 2048); RSS=(--nproc 2)
fi
echo "== sampler vs model.generate";            python bench/sample_bench.py "${SAMPLE[@]}"
echo "== fused log-prob vs log_softmax.gather"; python bench/logprob_bench.py "${LOGPROB[@]}"
echo "== per-rank state, ddp vs fsdp";          python bench/memory.py "${MEM[@]}"
echo "== the tiny default, one process ($DEV)"
python train_ddp.py configs/tiny.yaml out_dir="$OUT/tiny" iterations=3 resume=never 2>&1 | tr "\r" "\n" | grep -E "exploitability|^error"
if [ -d runs/cache/smollm2-135m-instruct ]; then
  echo "== whole-process peak, rollout and training, ddp vs fsdp (SmolLM2-135M)"; python bench/sharded_rss.py "${RSS[@]}"
else
  echo "== sharded_rss skipped: run 'python smollm2.py convert' first (needs requirements-demo.txt)"
fi
