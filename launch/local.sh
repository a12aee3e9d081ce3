#!/usr/bin/env bash
# Run a pretrax job on this machine's CPU, optionally pretending to have several devices or several
# hosts, so that sharded and multi-process code paths run as they would on an accelerator pod.
#
#   launch/local.sh CONFIG WORKDIR [--devices=N] [--processes=P] [--cores=LIST] [--dry-run]
#                   [--config.KEY=VALUE ...]
#
#   launch/local.sh configs/tiny.py runs/tiny --devices=8 --config.mesh.fsdp=2
#   launch/local.sh configs/tiny.py runs/tiny2 --processes=2 --devices=4   # 2 "hosts" x 4 devices
#
# --devices=N    splits the CPU into N XLA devices per process (--xla_force_host_platform_device_count).
# --processes=P  starts P processes joined by jax.distributed on 127.0.0.1 (a free port), as the
#                hosts of a pod would be. Process 0 prints to this terminal, process I writes
#                WORKDIR/logs/process_I.log. The first failure stops the others and is the exit
#                status; Ctrl-C sends SIGTERM to all of them (they save a checkpoint and exit 75),
#                a second Ctrl-C kills them.
# --cores=LIST   pins the job to these cores (taskset), e.g. 0 or 0-1; XLA's thread flags do not.
# --dry-run      prints the commands (prefixed "+ ") and runs nothing.
# PRETRAX        the command to run (default .venv/bin/pretrax, else pretrax on PATH); it may be
#                several words, e.g. PRETRAX='python -m pretrax.cli'.
set -euo pipefail

# The header comment above, without its '# '.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
# The exact command, quoted so that it can be pasted back into a shell.
show() { local line; line=$(printf ' %q' "$@"); echo "+${line}"; }

positional=() devices="" processes=1 cores="" dry_run=0 rest=()
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --devices=*) devices=${arg#--devices=} ;;
    --processes=*) processes=${arg#--processes=} ;;
    --cores=*) cores=${arg#--cores=} ;;
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
  mkdir -p "$workdir/logs"
fi
# Signal every process still running.
running=()
signal_all() {
  local pid
  for pid in ${running[@]+"${running[@]}"}; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
interrupts=0
on_interrupt() {
  interrupts=$((interrupts + 1))
  # First: SIGTERM, which JAX's preemption sync turns into one agreed step and a checkpoint.
  if ((interrupts == 1)); then signal_all TERM; else signal_all KILL; fi
}
trap on_interrupt INT TERM

for ((i = 0; i < processes; i++)); do
  one=("${command[@]}" --coordinator_address="127.0.0.1:$port" --num_processes="$processes"
       --process_id="$i")
  if ((dry_run)); then show "${one[@]}"; continue; fi
  show "${one[@]}" >&2
  if ((i == 0)); then
    "${one[@]}" &
  else
    "${one[@]}" > "$workdir/logs/process_$i.log" 2>&1 &
  fi
  running+=($!)
done
if ((dry_run)); then exit 0; fi

# Poll rather than `wait -n`: it works with the bash 3.2 that macOS ships, and lets the trap run.
status=0 kill_at=0
while ((${#running[@]})); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    rc=0
    wait "$pid" || rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
      if ((interrupts == 0)); then
        echo "local.sh: process $pid exited with status $rc; stopping the others" \
             "(their logs: $workdir/logs/)." >&2
      fi
      # The others would wait for the lost process in their next collective: TERM, then KILL.
      signal_all TERM
      kill_at=$((SECONDS + 10))
    fi
  done
  running=(${still[@]+"${still[@]}"})
  if ((kill_at && SECONDS >= kill_at)); then signal_all KILL; fi
  if ((${#running[@]})); then sleep 0.2; fi
done
exit "$status"
