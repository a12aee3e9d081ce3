#!/usr/bin/env bash
# One accelerator session for issue 28 (start-up, FP8, GPT-2 small's MFU), in at most 8 minutes,
# then, by name, the stages of earlier sessions. Run from the repository root of a copy carrying
# .gpu_wheels/ (benchmarks/gpu_wheels.sh):
#
#   bash benchmarks/gpu_session.sh                      # on the lent GPU machine
#   DRY_RUN=1 OUT=/tmp/s PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh   # CPU, ~2 min
#   ONLY='versions fp8' bash benchmarks/gpu_session.sh  # those stages alone (and wheels)
#   ONLY=all bash benchmarks/gpu_session.sh             # every stage, earlier sessions' too
#
# The default stages, each with its budget in seconds, from what 2026-12-04's H200 session measured
# (../shared/gpu-runs/2026-12-04: wheels 4 s, versions 3 s, one throughput.py process 107-116 s of
# wall for a 19-25 s compile, 12 steps under 6 s):
#   wheels 30, versions 20
#   throughput_gpt2_small 150     gpt2_small at the config's defaults (64 x 1024), in bfloat16 and
#                                 then with model.fp8 (model.fp8_min_dim=768, so that its 768-wide
#                                 projections convert) on the same state in the same process: one
#                                 process (116 s) and a second compile and its steps (~25 s); the
#                                 compilation cache starts empty, so its start-up is a cold one
#   throughput_gpt2_small_restart 60   the same bfloat16 run again: the restart's time to its first
#                                 step, its programs loaded from the cache the stage before filled
#   throughput_llama_1b 170       llama_1b (16 x 2048, 2 micro-batches) in bfloat16, then with
#                                 model.fp8 (the default threshold 1024: q, o and the MLP; k and v
#                                 are 512 wide): 107 s, a second compile and its steps (~35 s)
#   fp8 50                        benchmarks/fp8.py: each projection shape of both models, plain
#                                 bfloat16 against FP8 forward + backward, FP8's error against
#                                 float32 beside bfloat16's, and the FP8 GEMMs XLA compiled
# Each stage is cut to what is left of SESSION_LIMIT (480). Every throughput row holds the start-up
# breakdown (pretrax.startup); `--nooptimizer` leaves out the optimizer's separate timing (one
# compile fewer).
#
# The earlier sessions' stages run when ONLY names them (or ONLY=all): the kernels (matmul,
# attention, loss: benchmarks/kernels.py), gpt2_small and llama_1b before and after issue 17
# (throughput_gpt2_small_before, _after, _after_8segments, throughput_llama_1b_before, _after),
# and Mixture-of-Experts (moe: benchmarks/moe_kernels.py; throughput_moe_8x_1b).
#
# Writes into $OUT (default /tmp/gpu_session):
#   session.jsonl       one {"stage", "rc", "seconds"} line per stage run (124: out of time)
#   kernels.jsonl       benchmarks/kernels.py's, fp8.py's and moe_kernels.py's records
#   throughput_*.json   benchmarks/throughput.py's rows (*_fp8.json: the FP8 row of a stage)
#   STAGE.log           each stage's output
#   cache/              the compilation cache (PRETRAX_CACHE_DIR), empty when the session starts
# A failing stage is recorded and the next one runs; the exit status is 1 if any failed.
# Prints each stage's line and, at the end, one line per throughput row and the issue's goals.
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
# Seconds for all stages together; each is cut to what is left (issue 28: 8 minutes).
SESSION_LIMIT=${SESSION_LIMIT:-480}
# Stage names to run (wheels always runs); empty: issue 28's; 'all': every stage.
ONLY=${ONLY:-}
DEFAULT_STAGES='versions throughput_gpt2_small throughput_gpt2_small_restart throughput_llama_1b fp8'
mkdir -p "$OUT"
rm -rf "$OUT/session.jsonl" "$OUT/kernels.jsonl" "$OUT"/throughput_*.json "$OUT/cache"
# A cache of this session's own, empty at its start: the first run of each step is a cold one.
export PRETRAX_CACHE_DIR="$OUT/cache"
unset JAX_COMPILATION_CACHE_DIR
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
  local wanted=${ONLY:-$DEFAULT_STAGES}
  if [ "$name" != wheels ] && [ "$wanted" != all ] && [[ " $wanted " != *" $name "* ]]; then
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
          'google.protobuf': 'protobuf', 'packaging': 'packaging', 'psutil': 'psutil',
          'filelock': 'filelock'}


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
FP8_KERNELS=("$PYTHON" benchmarks/fp8.py --out="$OUT" --stage=fp8)
MOE_KERNELS=("$PYTHON" benchmarks/moe_kernels.py --out="$OUT" --stage=moe)
if [ "$DRY_RUN" = 1 ]; then
  KERNELS+=(--dry_run)
  FP8_KERNELS+=(--dry_run)
  MOE_KERNELS+=(--dry_run)
fi

BEFORE=(--config.model.loss_chunk=0 --config.model.max_segments=0)
if [ "$DRY_RUN" = 1 ]; then
  STEPS=(--steps=1 --warmup=0 --pipeline_batches=2)
  # A given peak: measuring the CPU's takes seconds per run. bfloat16 and a threshold that converts
  # the tiny projections, so that the FP8 rows run the FP8 path.
  GPT2=(configs/tiny.py --config.peak_flops=1e11)
  LLAMA=(configs/tiny.py:llama --config.peak_flops=1e11)
  GPT2_FP8=("${GPT2[@]}" --config.model.dtype=bfloat16 --config.model.fp8_min_dim=16)
  LLAMA_FP8=("${LLAMA[@]}" --config.model.dtype=bfloat16 --config.model.fp8_min_dim=16)
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
  GPT2_FP8=("${GPT2[@]}" --config.model.fp8_min_dim=768)
  LLAMA_FP8=("${LLAMA[@]}" --config.optim.grad_accum_steps=2)
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

# ---- Issue 28 (the default) ---------------------------------------------------------------------
run_stage versions 20 "${KERNELS[@]}" --stage=versions
throughput gpt2_small 150 "${GPT2_FP8[@]}" --fp8_too --nooptimizer
throughput gpt2_small_restart 60 "${GPT2_FP8[@]}" --nooptimizer
throughput llama_1b 170 "${LLAMA_FP8[@]}" --fp8_too --nooptimizer
run_stage fp8 50 "${FP8_KERNELS[@]}"

# ---- Earlier sessions' (ONLY names them, or ONLY=all) --------------------------------------------
run_stage matmul 30 "${KERNELS[@]}" --stage=matmul
run_stage attention 90 "${KERNELS[@]}" --stage=attention
run_stage loss 55 "${KERNELS[@]}" --stage=loss
# One throughput.py process each: 107-116 s on the H200 (2026-12-04).
throughput gpt2_small_before 130 "${GPT2[@]}" "${BEFORE[@]}"
throughput gpt2_small_after 130 "${GPT2[@]}" --segments=1
throughput gpt2_small_after_8segments 130 "${GPT2[@]}" --segments=8
throughput llama_1b_before 130 "${LLAMA[@]}" "${BEFORE[@]}" --config.model.remat=full \
    --config.optim.grad_accum_steps=1
throughput llama_1b_after 130 "${LLAMA[@]}" --segments=1 --config.optim.grad_accum_steps=2
run_stage moe 90 "${MOE_KERNELS[@]}"
# llama_1b after's settings, so that the two differ only by the experts; 3.5B parameters to
# build and compile: whatever time is left.
throughput moe_8x_1b 180 "${MOE[@]}" --segments=1 --config.optim.grad_accum_steps=2

"$PYTHON" - "$OUT" <<'EOF'
import glob, json, os, sys

OUT = sys.argv[1]


def row(name):  # A throughput row of this session, if it ran.
  path = os.path.join(OUT, f'throughput_{name}.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


for path in sorted(glob.glob(os.path.join(OUT, 'throughput_*.json'))):
  name = os.path.basename(path)[len('throughput_'):-len('.json')]
  r = row(name)
  print(f'{name}: {r["step_ms"]:.1f} ms/step, {r["tokens_per_s"]:,.0f} tokens/s, MFU '
        f'{r["mfu"]:.1%}, compile {r["compile_s"]:.1f} s, start-up {r["startup_s"]:.1f} s '
        f'({r["startup_over_compile"]:.2f}x the compile; programs loaded '
        f'{r["startup_programs_loaded"]}, compiled {r["startup_programs_compiled"]})')

# Issue 28's goals.
gpt2, gpt2_fp8, restart = row('gpt2_small'), row('gpt2_small_fp8'), row('gpt2_small_restart')
llama, llama_fp8 = row('llama_1b'), row('llama_1b_fp8')
if gpt2:
  best = max(filter(None, [gpt2, gpt2_fp8]), key=lambda r: r['mfu'])
  print(f"gpt2_small: MFU {gpt2['mfu']:.1%} without fp8, best "
        f"{best['mfu']:.1%} ({'fp8' if best is gpt2_fp8 else 'without fp8'}; goal: at least 50%)")
  print(f"gpt2_small cold start-up: {gpt2['startup_s']:.1f} s to the first step, "
        f"{gpt2['startup_over_compile']:.2f}x its {gpt2['compile_s']:.1f} s compile (goal: at "
        'most 1.5x)')
if gpt2 and restart:
  print(f"gpt2_small restarted with the cache: {restart['startup_s']:.1f} s to the first step "
        f"(cold: {gpt2['startup_s']:.1f} s)")
if llama and llama_fp8:
  print(f"llama_1b: fp8 {llama_fp8['tokens_per_s'] / llama['tokens_per_s']:.3f}x bfloat16's "
        'tokens/s (goal: at least 1.15x)')

moe, dense = row('moe_8x_1b'), row('llama_1b_after')
if moe and dense:  # Issue 25's goal, at (about) equal active FLOPs per token.
  per_token = [r['flops_per_step'] / (r['batch_size'] * r['seq_len']) for r in (moe, dense)]
  print(f"moe_8x_1b: {moe['tokens_per_s'] / dense['tokens_per_s']:.2f}x llama_1b after's tokens/s "
        f'at {per_token[0] / per_token[1]:.3f}x its FLOPs per token (goal: at least 0.75x)')
EOF
exit $FAILED
