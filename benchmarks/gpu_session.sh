#!/usr/bin/env bash
# One accelerator session, in at most 9.5 minutes: the kernels, then the train step before and after
# issue 17's changes (chunked loss, cuDNN variable-length attention, llama_1b without remat), then
# Mixture-of-Experts (issue 25): the expert MLP's kernels and the 8-expert model's train step. Run
# from the repository root of a copy carrying .gpu_wheels/ (benchmarks/gpu_wheels.sh):
#
#   bash benchmarks/gpu_session.sh                      # on the lent GPU machine
#   DRY_RUN=1 OUT=/tmp/s PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh   # CPU, 2-3 min
#   ONLY='versions moe throughput_llama_1b_after throughput_moe_8x_1b' \
#       bash benchmarks/gpu_session.sh                  # those stages alone (and wheels)
#
# Writes into $OUT (default /tmp/gpu_session):
#   session.jsonl       one {"stage", "rc", "seconds"} line per stage (124: it ran out of time)
#   kernels.jsonl       benchmarks/kernels.py's records (versions, matmul, attention, loss), then
#                       benchmarks/moe_kernels.py's ('moe': forward + backward of the expert MLP
#                       by dense matmuls of the same FLOPs, dropless ragged_dot with and without
#                       XLA's cuDNN ragged-dot fusion, fixed capacity 1.25, and the routing alone,
#                       for moe_8x_1b's and moe_64e's shapes: ms, useful TFLOP/s, speed against
#                       the dense MLP, and what the grouped matmul lowered to, with a verdict)
#   throughput_*.json   benchmarks/throughput.py's rows: gpt2_small and llama_1b "before"
#                       (model.loss_chunk=0, model.max_segments=0; llama also model.remat=full)
#                       and "after" (the configs' defaults, llama_1b at its micro-batch of 8
#                       sequences per device), and gpt2_small after with 8
#                       documents per row (--segments=8), at batch sizes that fit one GPU; then
#                       moe_8x_1b as llama_1b after (the same batch, micro-batch and active FLOPs
#                       per token; MFU counts active parameters): the goal is at least 0.75 of
#                       llama_1b after's tokens/s
#   STAGE.log           each stage's output
# A failing stage is recorded and the next one runs; the exit status is 1 if any failed.
# Prints each stage's line and, at the end, one line per throughput run and the MoE ratio.
#
# No package index there: pretrax comes from src/ (PYTHONPATH), and the carried wheels of whatever
# that Python lacks go into $SITE. The train step is timed on the Python standard library's
# sources with a character tokenizer (no corpus is carried) and each config's own vocabulary size.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
SITE=${SITE:-/tmp/pretrax-gpu-site}
# Seconds for all stages together; each is cut to what is left. The device allows 600 a command:
# 30 stay for the last stage's kill grace and the summary.
SESSION_LIMIT=${SESSION_LIMIT:-570}
ONLY=${ONLY:-}  # Stage names to run (wheels always runs); empty: all.
mkdir -p "$OUT"
rm -f "$OUT/session.jsonl" "$OUT/kernels.jsonl" "$OUT"/throughput_*.json
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# Deterministic reductions (which the tests set) slow the GPU down: never time with them.
export XLA_FLAGS="${XLA_FLAGS:-}"
XLA_FLAGS=${XLA_FLAGS//--xla_gpu_deterministic_ops=true/}
[ "$DRY_RUN" = 1 ] && export JAX_PLATFORMS=cpu
export PYTHON SITE
FAILED=0

run_stage() {  # NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [ -n "$ONLY" ] && [ "$name" != wheels ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  local left=$((SESSION_LIMIT - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit > 0)); then
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
  else
    echo "skipped: the session's $SESSION_LIMIT s were spent" > "$OUT/$name.log"
    rc=124
  fi
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" \
      | tee -a "$OUT/session.jsonl"
  if ((rc != 0)); then
    FAILED=1
    tail -n 15 "$OUT/$name.log"
  fi
}

install_wheels() {  # The carried wheels of the modules this Python cannot find, into $SITE.
  local missing
  missing=$("$PYTHON" - <<'EOF'
import importlib.util

# module: the wheel that provides it (gpu_wheels.sh downloads each).
WHEELS = {'grain': 'grain', 'array_record': 'array_record', 'cloudpickle': 'cloudpickle',
          'portpicker': 'portpicker', 'ml_collections': 'ml_collections',
          'zstandard': 'zstandard', 'tensorboardX': 'tensorboardX', 'absl': 'absl-py',
          'etils': 'etils', 'fsspec': 'fsspec', 'zipp': 'zipp',
          'typing_extensions': 'typing_extensions', 'yaml': 'PyYAML',
          'google.protobuf': 'protobuf', 'packaging': 'packaging', 'psutil': 'psutil'}


def found(module):
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:  # A parent package (google) is missing.
    return False


print(' '.join(wheel for module, wheel in WHEELS.items() if not found(module)))
EOF
  ) || return 1
  if [ -n "$missing" ]; then
    echo "installing into $SITE: $missing"
    # shellcheck disable=SC2086  # One word per wheel.
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
        --find-links .gpu_wheels --target "$SITE" $missing || return 1
  fi
  "$PYTHON" -c 'import grain, ml_collections, etils.epath, pretrax.train; print("imports ok")'
}
export -f install_wheels

run_stage wheels 30 bash -c install_wheels

KERNELS=("$PYTHON" benchmarks/kernels.py --out="$OUT")
[ "$DRY_RUN" = 1 ] && KERNELS+=(--dry_run)
run_stage versions 20 "${KERNELS[@]}" --stage=versions
run_stage matmul 30 "${KERNELS[@]}" --stage=matmul
run_stage attention 90 "${KERNELS[@]}" --stage=attention
run_stage loss 55 "${KERNELS[@]}" --stage=loss

BEFORE=(--config.model.loss_chunk=0 --config.model.max_segments=0)
if [ "$DRY_RUN" = 1 ]; then
  STEPS=(--steps=1 --warmup=0 --pipeline_batches=2)
  # A given peak: measuring the CPU's takes seconds per run.
  GPT2=(configs/tiny.py --config.peak_flops=1e11)
  LLAMA=(configs/tiny.py:llama --config.peak_flops=1e11)
  # 2 of 4 experts of half its MLP (256) a token: its FLOPs per token, as moe_8x_1b's.
  MOE=("${LLAMA[@]}" --config.model.moe.num_experts=4 --config.model.moe.top_k=2
       --config.model.moe.expert_dim=128)
else
  STEPS=(--steps=10 --warmup=2 --pipeline_batches=2)
  DATA=(--config.data.path=none --config.data.fallback=python-stdlib
        --config.tokenizer.model_type=char)
  GPT2=(configs/gpt2_small.py "${DATA[@]}" --config.model.vocab_size=50304
        --config.data.batch_size=64 --config.optim.grad_accum_steps=1)
  LLAMA=(configs/llama_1b.py "${DATA[@]}" --config.model.vocab_size=32000
         --config.data.batch_size=16)
  # `pretrax plan --devices=1` (XLA:CPU's upper bound) puts it at 114 of the H200's 139 GiB.
  MOE=(configs/moe_8x_1b.py "${DATA[@]}" --config.model.vocab_size=32000
       --config.data.batch_size=16)
fi

throughput() {  # NAME LIMIT_SECONDS CONFIG [ARGS...]
  local name=$1 limit=$2 config=$3
  shift 3
  run_stage "throughput_$name" "$limit" "$PYTHON" benchmarks/throughput.py --config="$config" \
      --json="$OUT/throughput_$name.json" "${STEPS[@]}" "$@"
}

throughput gpt2_small_before 45 "${GPT2[@]}" "${BEFORE[@]}"
throughput gpt2_small_after 45 "${GPT2[@]}" --segments=1
throughput gpt2_small_after_8segments 40 "${GPT2[@]}" --segments=8
throughput llama_1b_before 65 "${LLAMA[@]}" "${BEFORE[@]}" --config.model.remat=full \
    --config.optim.grad_accum_steps=1
throughput llama_1b_after 65 "${LLAMA[@]}" --segments=1 --config.optim.grad_accum_steps=2

MOE_KERNELS=("$PYTHON" benchmarks/moe_kernels.py --out="$OUT" --stage=moe)
[ "$DRY_RUN" = 1 ] && MOE_KERNELS+=(--dry_run)
run_stage moe 90 "${MOE_KERNELS[@]}"
# llama_1b after's settings, so that the two differ only by the experts; 3.5B parameters to
# build and compile (a llama_1b process took ~110 s on the H200): whatever time is left.
throughput moe_8x_1b 180 "${MOE[@]}" --segments=1 --config.optim.grad_accum_steps=2

"$PYTHON" - "$OUT" <<'EOF'
import glob, json, os, sys

for path in sorted(glob.glob(os.path.join(sys.argv[1], 'throughput_*.json'))):
  with open(path) as f:
    row = json.load(f)
  print(f'{os.path.basename(path)}: {row["step_ms"]:.1f} ms/step, {row["tokens_per_s"]:,.0f} '
        f'tokens/s, MFU {row["mfu"]:.1%}, compile {row["compile_s"]:.0f} s')


def per_token(name):  # (tokens/s, training FLOPs per token) of a throughput run, if it ran.
  path = os.path.join(sys.argv[1], f'throughput_{name}.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    row = json.load(f)
  return row['tokens_per_s'], row['flops_per_step'] / (row['batch_size'] * row['seq_len'])


moe, dense = per_token('moe_8x_1b'), per_token('llama_1b_after')
if moe and dense:  # Issue 25's goal, at (about) equal active FLOPs per token.
  print(f"moe_8x_1b: {moe[0] / dense[0]:.2f}x llama_1b after's tokens/s at {moe[1] / dense[1]:.3f}x "
        'its FLOPs per token (goal: at least 0.75x)')
EOF
exit $FAILED
