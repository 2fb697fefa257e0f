#!/usr/bin/env bash
# The GPU side of every bench in one go; on a machine without CUDA it runs the CPU-fallback parts at small
# sizes, so the script itself is checked everywhere.
#   bash bench/gpu_check.sh [OUT_DIR] [SECONDS]   # prints each bench's lines; OUT_DIR keeps the runs
# Every part is time-limited and the whole script ends within SECONDS (default on CUDA 540: a 10-minute
# device call with room for the start; on CPU 1800), cheapest parts first, the torch.compile'd sampler last. A failing or
# timed-out part is reported and the others still run; the exit status is the number of failed parts.
# (The first attempt on an H200, with per-part limits that summed past the call's, was killed with no output.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)}
FAILED=0
part() {  # part TITLE SECONDS CMD...: one bench, limited to SECONDS and to what is left, its failure counted
  local title=$1 secs=$2; shift 2
  local left=$(( END - $(date +%s) - 5 ))
  [ "$secs" -le "$left" ] || secs=$left
  echo "== $title (limit ${secs} s)"
  [ "$secs" -gt 0 ] || { echo "!! $title: no time left"; FAILED=$((FAILED + 1)); return; }
  timeout "$secs" "$@" 2>&1 | tr "\r" "\n" | grep -vE "%\|| *\[A$|^\s*$" ; local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "!! $title: exit $rc"; FAILED=$((FAILED + 1)); }
}
plan_vs_cuda() {  # plan_vs_cuda NAME MODEL_DIR key=value...: one iteration on one GPU, then the plan next to its peaks
  local name=$1 model=$2; shift 2
  part "$name: one iteration on one GPU (nccl, world 1)" 90 python -m torch.distributed.run --standalone \
    --nproc_per_node 1 train_ddp.py configs/tiny.yaml model="$model" out_dir="$OUT/$name" resume=never "$@"
  part "$name: bench/plan.py next to the measured CUDA peaks" 30 python bench/plan.py configs/tiny.yaml \
    model="$model" "$@" --world 1 --arch "$model" --measured "$OUT/$name/metrics.jsonl"
  grep -h '"sample_s"' "$OUT/$name/metrics.jsonl" 2>/dev/null | python -c "import json, sys
for r in map(json.loads, sys.stdin): print(f\"  iteration {r['iteration']}: rollout {r['sample_s']:.2f} s, training {r['train_s']:.2f} s\")"
}
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  END=$(( $(date +%s) + ${2:-540} ))
  echo "== device: $(python -c 'import torch, transformers; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "transformers", transformers.__version__)')"
  part "sampler vs model.generate (bf16)" 90 python bench/sample_bench.py --dtype bf16
  part "fused log-prob vs log_softmax.gather" 60 python bench/logprob_bench.py
  part "per-rank state, ddp vs fsdp" 60 python bench/memory.py --device cuda --worlds 1
  [ -d runs/cache/tiny-base-v1 ] || python -c "import tiny; tiny.build_base('runs/cache/tiny-base-v1')"
  plan_vs_cuda tiny runs/cache/tiny-base-v1 iterations=3
  python -c "import tiny; tiny.save_reward_model('$OUT/rm1', 1, 300, True); tiny.save_reward_model('$OUT/rm2', 2, 420, False)"
  plan_vs_cuda tiny-rm-oracle-fsdp runs/cache/tiny-base-v1 iterations=2 eval_prompts=0 parallel=fsdp \
    "oracle={kind: bt_mixture, models: [{path: $OUT/rm1}, {path: $OUT/rm2}]}"  # the sharded oracle, bf16, nccl
  SMOL=runs/cache/smollm2-135m-instruct
  if [ ! -f $SMOL/model.safetensors ] && [ -d runs/cache/smollm2-shape ]; then
    SMOL=$OUT/smollm2-random; python bench/random_like.py runs/cache/smollm2-shape $SMOL
  fi
  if [ -d $SMOL ]; then
    GAME=(iterations=1 prompts_per_iteration=32 n_samples=4 max_new_tokens=256 batch_size=32 micro_batch_size=8
          epochs=1 eval_prompts=0 eval_winrate=false lr=1e-5)
    plan_vs_cuda smollm2-ddp $SMOL "${GAME[@]}" parallel=ddp
    plan_vs_cuda smollm2-fsdp-ckpt $SMOL "${GAME[@]}" parallel=fsdp activation_checkpointing=true
  fi
  part "sampler with its decode step torch.compile'd (bf16)" 240 python bench/sample_bench.py --dtype bf16 \
    --prompts 16 --n 4 --new 64 --compile default,reduce-overhead
else
  END=$(( $(date +%s) + ${2:-1800} ))
  echo "== device: CPU fallback ($(nproc) cores), small sizes"
  part "sampler vs model.generate" 600 python bench/sample_bench.py --prompts 4 --n 2 --new 16 --min-prompt 16 --max-prompt 32
  part "fused log-prob vs log_softmax.gather" 600 python bench/logprob_bench.py --tokens 512 --seq 128 --vocab 32000
  part "per-rank state, ddp vs fsdp" 600 python bench/memory.py --hidden 128 --layers 2 --vocab 2048
  part "the tiny default, one process (cpu)" 600 python train_ddp.py configs/tiny.yaml out_dir="$OUT/tiny" \
    iterations=3 resume=never
  python -c "import tiny; tiny.save_reward_model('$OUT/rm1', 1, 300, True); tiny.save_reward_model('$OUT/rm2', 2, 420, False)"
  part "a sharded two-reward-model oracle, one process (cpu)" 600 python train_ddp.py configs/tiny.yaml \
    out_dir="$OUT/tiny_rm" iterations=2 resume=never eval_prompts=0 parallel=fsdp \
    "oracle={kind: bt_mixture, models: [{path: $OUT/rm1}, {path: $OUT/rm2}]}"
  if [ -d runs/cache/smollm2-135m-instruct ]; then
    part "whole-process peak, rollout and training, ddp vs fsdp (SmolLM2-135M)" 1200 python bench/sharded_rss.py --nproc 2 --repeats 1
  else
    echo "== sharded_rss skipped: run 'python smollm2.py convert' first (needs requirements-demo.txt)"
  fi
fi
echo "== $FAILED part(s) failed"
exit $FAILED
