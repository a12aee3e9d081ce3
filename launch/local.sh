#!/usr/bin/env bash
# Run a pretrax job on this machine's CPU, optionally pretending to have several devices or several
# hosts, so that sharded and multi-process code paths run as they would on an accelerator pod.
#
#   launch/local.sh CONFIG WORKDIR [--devices=N] [--processes=P] [--cores=LIST] [--logs=DIR]
#                   [--dry-run] [--config.KEY=VALUE ...]
#
#   launch/local.sh configs/tiny.py runs/tiny --devices=8 --config.mesh.fsdp=2
#   launch/local.sh configs/tiny.py runs/tiny2 --processes=2 --devices=4   # 2 "hosts" x 4 devices
#
# --devices=N    splits the CPU into N XLA devices per process (--xla_force_host_platform_device_count).
# --processes=P  starts P processes joined by jax.distributed on 127.0.0.1 (a free port), as the
#                hosts of a pod would be. Process 0 prints to this terminal, process I writes
#                LOGS/process_I.log. The first failure stops the others and is the exit
#                status; Ctrl-C sends SIGTERM to all of them (they save a checkpoint and exit 75),
#                a second Ctrl-C kills them.
# --cores=LIST   pins the job to these cores (taskset), e.g. 0 or 0-1; XLA's thread flags do not.
# --logs=DIR     where processes 1.. write their output: WORKDIR/logs by default, ./local-logs when
#                WORKDIR is a bucket (gs://...).
# --dry-run      prints the commands (prefixed "+ ") and runs nothing.
# PRETRAX        the command to run (default .venv/bin/pretrax, else pretrax on PATH); it may be
#                several words, e.g. PRETRAX='python -m pretrax.cli'.
set -euo pipefail

source "$(dirname "$0")/lib.sh"

positional=() devices="" processes=1 cores="" logs="" dry_run=0 rest=()
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --devices=*) devices=${arg#--devices=} ;;
    --processes=*) processes=${arg#--processes=} ;;
    --cores=*) cores=${arg#--cores=} ;;
    --logs=*) logs=${arg#--logs=} ;;
    --dry-run) dry_run=1 ;;
    *)
      # The first two words that are not flags are CONFIG and WORKDIR; the rest go to pretrax.
      if [[ $arg != -* && ${#positional[@]} -lt 2 ]]; then positional+=("$arg"); else rest+=("$arg"); fi ;;
  esac
done
if [[ ${#positional[@]} -ne 2 ]]; then
  usage >&2
  exit 2
fi
config=${positional[0]} workdir=${positional[1]}
if [[ -z $logs ]]; then
  if [[ $workdir == *://* ]]; then logs=local-logs; else logs=$workdir/logs; fi  # Logs are local files.
fi
if ! [[ $processes =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --processes=$processes: give a positive integer." >&2
  exit 2
fi

here=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n ${PRETRAX:-} ]]; then
  read -r -a pretrax <<< "$PRETRAX"
elif [[ -x $here/.venv/bin/pretrax ]]; then
  pretrax=("$here/.venv/bin/pretrax")
else
  pretrax=(pretrax)
fi

# Everything before the per-process flags: the same for every process.
command=()
[[ -n $cores ]] && command+=(taskset -c "$cores")
if [[ -n $devices ]]; then
  command+=(env "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices")
fi
command+=("${pretrax[@]}" train --config="$config" --workdir="$workdir" ${rest[@]+"${rest[@]}"})

if [[ $processes -eq 1 ]]; then
  if ((dry_run)); then show "${command[@]}"; exit 0; fi
  show "${command[@]}" >&2
  exec "${command[@]}"
fi

# Several processes: one coordinator port that nothing listens on now (the OS picks it).
if ((dry_run)); then
  port=PORT
else
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$logs"
fi
running=()
# Reaches every local process still running (see supervise in lib.sh).
stop_all() {
  local pid
  for pid in ${running[@]+"${running[@]}"}; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
for ((i = 0; i < processes; i++)); do
  one=("${command[@]}" --coordinator_address="127.0.0.1:$port" --num_processes="$processes"
       --process_id="$i")
  if ((dry_run)); then show "${one[@]}"; continue; fi
  start_process "$i" "$logs" "${one[@]}"
done
if ((dry_run)); then exit 0; fi

status=0
supervise || status=$?
if ((status)); then echo "local.sh: exit status $status; the other processes' logs: $logs/" >&2; fi
exit "$status"
