#!/usr/bin/env bash
# Run one pretrax job over several machines without a scheduler: ssh into each host and start
# `pretrax train` there, joined through jax.distributed with the first host as the coordinator.
#
#   launch/multinode.sh --hosts=H1,H2,... CONFIG WORKDIR [--config.KEY=VALUE ...]
#       [--port=1234] [--coordinator=HOST] [--dir=DIR] [--pretrax=CMD] [--ssh=CMD] [--logs=DIR] [--dry-run]
#
#   launch/multinode.sh --hosts=gpu1,gpu2 configs/gpt2_small.py /shared/runs/gpt2 \
#       --config.mesh.dcn_data=2
#
# Host I runs, in DIR (default: the ssh login directory):
#   PRETRAX train --config=CONFIG --workdir=WORKDIR ... --coordinator_address=H1:PORT
#       --num_processes=N --process_id=I
# One process per host, driving all of its GPUs. Every host needs pretrax installed (--pretrax,
# default .venv/bin/pretrax in DIR) and WORKDIR on storage they all share. The first host must
# accept connections on PORT from the others; --coordinator names it as the others reach it when
# that differs from its name in --hosts (an ssh alias, user@host).
#
# The first host's output streams here; host I's goes to LOGS/process_I.log here (default
# multinode-logs). The first failure stops the other hosts (SIGTERM, then SIGKILL 10 s later) and
# is the exit status; Ctrl-C sends SIGTERM everywhere, so every host saves a checkpoint and exits
# 75; run the same command again to resume. --ssh replaces `ssh` (e.g. --ssh='ssh -p 2222').
# --dry-run prints every command (prefixed "+ ") and runs none.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

hosts="" port=1234 coordinator="" dir="" pretrax=.venv/bin/pretrax ssh_cmd=ssh logs=multinode-logs dry_run=0
positional=() rest=()
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --hosts=*) hosts=${arg#*=} ;;
    --port=*) port=${arg#*=} ;;
    --coordinator=*) coordinator=${arg#*=} ;;
    --dir=*) dir=${arg#*=} ;;
    --pretrax=*) pretrax=${arg#*=} ;;
    --ssh=*) ssh_cmd=${arg#*=} ;;
    --logs=*) logs=${arg#*=} ;;
    --dry-run) dry_run=1 ;;
    *)
      if [[ $arg != -* && ${#positional[@]} -lt 2 ]]; then positional+=("$arg"); else rest+=("$arg"); fi ;;
  esac
done
die() { echo "multinode.sh: $*" >&2; exit 2; }
[[ -n $hosts ]] || die "missing --hosts=H1,H2,... (the first host is the coordinator)."
((${#positional[@]} == 2)) || die "give CONFIG and WORKDIR (see launch/multinode.sh --help)."
[[ $port =~ ^[0-9]+$ ]] || die "--port=$port: give a TCP port number."
IFS=, read -r -a host_list <<< "$hosts"
read -r -a ssh_words <<< "$ssh_cmd"
read -r -a pretrax_words <<< "$pretrax"
num=${#host_list[@]}
coordinator=${coordinator:-${host_list[0]#*@}}:$port
# Where process I records the pid that a stop signals: one file per job (port) and process.
pidfile() { echo "/tmp/pretrax-multinode-$port-$1.pid"; }

# The command line one host runs; `sh -c` records its pid, then becomes pretrax.
# GPU XLA flags, each for a reason (as launch/slurm.sbatch):
#   latency-hiding scheduler: FSDP's all-gathers and reduce-scatters overlap the matmuls.
xla_flags=--xla_gpu_enable_latency_hiding_scheduler=true

remote_command() {
  local train=(env "XLA_FLAGS=$xla_flags" "${pretrax_words[@]}" train --config="${positional[0]}" --workdir="${positional[1]}"
               ${rest[@]+"${rest[@]}"} --coordinator_address="$coordinator" --num_processes="$num"
               --process_id="$1")
  local line="sh -c 'echo \$\$ > $(pidfile "$1"); exec \"\$@\"' pretrax $(quote_words "${train[@]}")"
  if [[ -n $dir ]]; then line="cd $(quote "$dir") && $line"; fi
  echo "$line"
}

running=()
# Signals pretrax on every host through its pid file; KILL also ends the local ssh sessions.
stop_all() {
  local i pid signal
  for ((i = 0; i < num; i++)); do
    # Only a live pretrax: the recorded pid may be stale and belong to something else by now.
    signal="pid=\$(cat $(pidfile "$i") 2>/dev/null) && grep -qa pretrax /proc/\$pid/cmdline && kill -$1 \$pid"
    "${ssh_words[@]}" -o BatchMode=yes "${host_list[i]}" "$signal" < /dev/null > /dev/null 2>&1 &
  done
  if [[ $1 == KILL ]]; then
    for pid in ${running[@]+"${running[@]}"}; do kill "$pid" 2>/dev/null || true; done
  fi
}

if ((!dry_run)); then mkdir -p "$logs"; fi
for ((i = 0; i < num; i++)); do
  one=("${ssh_words[@]}" -o BatchMode=yes "${host_list[i]}" "$(remote_command "$i")")
  if ((dry_run)); then show "${one[@]}"; continue; fi
  start_process "$i" "$logs" "${one[@]}"
done
if ((dry_run)); then exit 0; fi

status=0
supervise || status=$?
if ((status)); then echo "multinode.sh: exit status $status; the other hosts' output: $logs/" >&2; fi
exit "$status"
