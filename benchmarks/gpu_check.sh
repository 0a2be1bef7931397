#!/usr/bin/env bash
# The GPU figures in one script, for a lent machine with a short lease (one H100 or H200,
# its image's python3 with jax[cuda], transformers and torch; nothing installed here).
# Runs from the repository root; results go to $OUT (default out/gpu). Each part has its own
# time limit so that one failure leaves the others' figures.
#
#   bash benchmarks/gpu_check.sh            # decode (with HF on CUDA) + Conf cost, at most 8 min
# (H100, 2026-11-27: decode + attention + policies took 298 s in all, most of it compiling the 4B
# programs, 20-32 s each; run the script with a lease call limit of >= 500 s.)
#   PARTS="decode attention policies interpolate" bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PARTS=${PARTS:-"decode policies"}
PRESET=${PRESET:-qwen3-4b}  # tiny: a smoke check of this script on any machine
py=python3

{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  $py -c "import jax, flax, optax, orbax.checkpoint, transformers, torch; print('jax', jax.__version__, \
'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

part() {  # part NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 secs=$2
  shift 2
  echo "=== $name (limit ${secs}s): $*"
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^\['
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc"
  return "$rc"
}

for p in $PARTS; do
  case $p in
    decode)  # Qwen3-4B shape, bf16: tokens/s against the HBM roofline, and HF transformers on CUDA
      part decode 200 $py benchmarks/decode.py --preset "$PRESET" --dtype bfloat16 --batch 1,16 \
        --json "$OUT/decode_${PRESET}_bf16.json" \
      || part decode_nohf 150 $py benchmarks/decode.py --preset "$PRESET" --dtype bfloat16 --batch 1,16 --no-hf \
        --json "$OUT/decode_${PRESET}_bf16.json" ;;
    policies)  # Conf scoring vs λ=1 generation on a full Qwen3-4B-shaped random pair
      part policies 280 $py benchmarks/policies.py --no-toy --preset "$PRESET" --layers 0 --vocab 0 \
        --dtype bfloat16 --think-len 1024 --large-repeats 1 --json "$OUT/policies_${PRESET}_bf16.json" ;;
    attention)  # one layer's decode attention: dami_jax's cache-first dots vs query-first (float32, exact dots)
      part attention 90 env JAX_DEFAULT_MATMUL_PRECISION=highest $py benchmarks/attention_dots.py --repeats 10 \
        --json "$OUT/attention_dots_gpu.json" ;;
    interpolate)  # delta (per-row λ) vs merged decode
      part interpolate 200 $py benchmarks/interpolate.py --preset "$PRESET" --dtype bfloat16 --skip a,c \
        --new-tokens 32 --decode-repeats 2 --json "$OUT/interpolate_${PRESET}_bf16.json" ;;
    *) echo "unknown part $p" ;;
  esac
done
