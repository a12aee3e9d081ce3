#!/usr/bin/env bash
# Run a pretrax job on this machine's CPU, optionally pretending to have several devices so that
# sharded code paths run as they would on an accelerator slice.
#
#   launch/local.sh CONFIG WORKDIR [--devices=N] [--cores=LIST] [--config.KEY=VALUE ...]
#
#   launch/local.sh configs/tiny.py runs/tiny --devices=8 --config.mesh.fsdp=2
#
# --devices=N  splits the CPU into N XLA devices (--xla_force_host_platform_device_count).
# --cores=LIST pins the job to these cores (taskset), e.g. 0 or 0-1; XLA's thread flags do not.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
config=$1 workdir=$2
shift 2
devices="" cores="" rest=()
for arg in "$@"; do
  case $arg in
    --devices=*) devices=${arg#--devices=} ;;
    --cores=*) cores=${arg#--cores=} ;;
    *) rest+=("$arg") ;;
  esac
done
here=$(cd "$(dirname "$0")/.." && pwd)
pretrax=${PRETRAX:-$here/.venv/bin/pretrax}
[[ -x $pretrax ]] || pretrax=pretrax
if [[ -n $devices ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
fi
command=("$pretrax" train --config="$config" --workdir="$workdir" "${rest[@]}")
if [[ -n $cores ]]; then
  command=(taskset -c "$cores" "${command[@]}")
fi
echo "+ ${command[*]}" >&2
exec "${command[@]}"
