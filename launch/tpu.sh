#!/usr/bin/env bash
# Create Cloud TPU VMs, install pretrax on every worker, run the same `pretrax train` on all of them.
#
#   launch/tpu.sh COMMAND [--project=P] [--zone=Z] [--name=N] [--dry-run] [options] [args]
#
# Commands (`launch/tpu.sh COMMAND --help` for each):
#   create  --type=T --version=V [--spot | --queued] [--slices=S]   make the TPU VM(s)
#   setup   [--git=URL [--ref=REF]] [--python=PY]   copy this checkout (or clone URL) to every
#           worker and pip install it with the [tpu] extra
#   run     CONFIG WORKDIR [--config.KEY=VALUE ...]   the same `pretrax train` on every worker;
#           worker 0's output streams here, each worker also logs to DIR/logs/ on itself
#   logs    stream worker 0's log again (after Ctrl-C or a lost connection: the run goes on)
#   copy    SRC DEST   scp; write a path on the workers as tpu:PATH
#   status  the TPU VM's (or queued resource's) state
#   stop    [--vm]   SIGTERM pretrax on every worker (it saves a checkpoint and exits 75);
#           --vm then stops the VM(s) too
#   delete  delete the TPU VM(s) (the queued resource and its nodes with --queued or --slices)
#
# Settings, from flags or the environment:
#   --project  PRETRAX_TPU_PROJECT   --zone     PRETRAX_TPU_ZONE     --name  PRETRAX_TPU_NAME
#   --type     PRETRAX_TPU_TYPE      --version  PRETRAX_TPU_VERSION  (create only)
#   --slices   PRETRAX_TPU_SLICES    (default 1; more than 1 means queued resources, multi-slice)
#   --queued   PRETRAX_TPU_QUEUED=1  --dir     PRETRAX_TPU_DIR (default pretrax, in the home dir)
# A missing required setting stops the script with one line naming the flag and the variable,
# status 2. --dry-run prints every command (prefixed "+ ") and runs none.
#
# Resuming: `run` issues the identical command every time and pretrax resumes from WORKDIR, so
# after a preemption (spot) or `stop`, run the same `run` again (after create + setup if the VM
# was lost). Keep WORKDIR off the VMs' own disks for that (see README, "Train on a TPU VM").
set -euo pipefail

source "$(dirname "$0")/lib.sh"

command_help() {
  case $1 in
    create) cat <<'EOF'
launch/tpu.sh create --type=T --version=V [--spot | --queued] [--slices=S]

  --type     accelerator type, e.g. v5litepod-16, v4-32 (PRETRAX_TPU_TYPE)
  --version  TPU software version, e.g. v2-alpha-tpuv5-lite (PRETRAX_TPU_VERSION)
  --spot     spot capacity: cheaper, may be preempted (pretrax then resumes with the same `run`)
  --queued   ask through `gcloud compute tpus queued-resources create` and wait in line for
             capacity; with --spot too, a queued spot request
  --slices=S S slices of --type joined over the data-centre network (queued resources with
             --node-count=S; the nodes are NAME-0 ... NAME-(S-1)). Train with
             --config.mesh.dcn_data=S so data parallelism spans the slices.
EOF
      ;;
    setup) cat <<'EOF'
launch/tpu.sh setup [--git=URL [--ref=REF]] [--python=PY]

Copies the last commit of this checkout (git archive HEAD; uncommitted changes are not copied)
to DIR on every worker of every slice (--worker=all), or with --git clones (or fetches) URL there
and checks out REF (a commit, a tag or origin/BRANCH; default origin/HEAD), then makes DIR/.venv with PY (default python3; pretrax needs Python 3.11+) and runs
`pip install -e 'DIR[tpu]'`, which pulls JAX's TPU build.
EOF
      ;;
    run) cat <<'EOF'
launch/tpu.sh run CONFIG WORKDIR [--config.KEY=VALUE ...] [other pretrax train flags]

Runs `DIR/.venv/bin/pretrax train --config=CONFIG --workdir=WORKDIR ...` on every worker of every
slice at once (--worker=all). JAX finds the other workers (and slices) by itself: no coordinator
flags. Worker 0 of slice 0 streams its output here; every worker appends its output to
DIR/logs/train-slice<K>-worker<W>.log on itself. Ctrl-C (or a lost connection) ends only the
streaming: pretrax goes on (`logs` streams again; `stop` stops it). WORKDIR must be a path every
worker shares. The command is the same every time: run it again to resume.
EOF
      ;;
    copy) cat <<'EOF'
launch/tpu.sh copy SRC DEST [--worker=W]

scp between here and the workers; write the workers' side as tpu:PATH (relative to the home dir).
  launch/tpu.sh copy data.txt tpu:pretrax/data.txt            # to every worker of every slice
  launch/tpu.sh copy tpu:pretrax/logs ./tpu-logs               # from worker 0 of slice 0
--worker=W picks the workers (0, 1,3, all); directories are copied recursively.
EOF
      ;;
    logs) echo 'launch/tpu.sh logs   the last 100 lines of worker 0'"'"'s log, then new ones until pretrax exits' ;;
    status) echo 'launch/tpu.sh status   describes the TPU VM(s), or the queued resource with --queued/--slices' ;;
    stop) cat <<'EOF'
launch/tpu.sh stop [--vm]

Sends SIGTERM to the `pretrax train` that `run` started on every worker: the workers agree on a
step, save a checkpoint and exit 75; `run` again resumes. --vm then stops the TPU VM(s) as well.
EOF
      ;;
    delete) echo 'launch/tpu.sh delete   deletes the TPU VM(s); with --queued or --slices>1, the queued resource and its nodes' ;;
  esac
}

die() { echo "tpu.sh${subcommand:+ $subcommand}: $*" >&2; exit 2; }

subcommand=""
case ${1:-} in
  create|setup|run|logs|copy|status|stop|delete) subcommand=$1; shift ;;
  -h|--help|help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

project=${PRETRAX_TPU_PROJECT:-} zone=${PRETRAX_TPU_ZONE:-} name=${PRETRAX_TPU_NAME:-}
type=${PRETRAX_TPU_TYPE:-} version=${PRETRAX_TPU_VERSION:-} slices=${PRETRAX_TPU_SLICES:-1}
queued=${PRETRAX_TPU_QUEUED:-0} dir=${PRETRAX_TPU_DIR:-pretrax}
dry_run=0 spot=0 git_url="" git_ref="" python=python3 worker="" stop_vm=0 args=()
for arg in "$@"; do
  case $arg in
    -h|--help) command_help "$subcommand"; exit 0 ;;
    --project=*) project=${arg#*=} ;;
    --zone=*) zone=${arg#*=} ;;
    --name=*) name=${arg#*=} ;;
    --type=*) type=${arg#*=} ;;
    --version=*) version=${arg#*=} ;;
    --slices=*) slices=${arg#*=} ;;
    --dir=*) dir=${arg#*=} ;;
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --git=*) git_url=${arg#*=} ;;
    --ref=*) git_ref=${arg#*=} ;;
    --python=*) python=${arg#*=} ;;
    --worker=*) worker=${arg#*=} ;;
    --vm) stop_vm=1 ;;
    *) args+=("$arg") ;;
  esac
done

missing=()
[[ -n $project ]] || missing+=("--project (or PRETRAX_TPU_PROJECT)")
[[ -n $zone ]] || missing+=("--zone (or PRETRAX_TPU_ZONE)")
[[ -n $name ]] || missing+=("--name (or PRETRAX_TPU_NAME)")
if [[ $subcommand == create ]]; then
  [[ -n $type ]] || missing+=("--type (or PRETRAX_TPU_TYPE)")
  [[ -n $version ]] || missing+=("--version (or PRETRAX_TPU_VERSION)")
fi
if ((${#missing[@]})); then
  line=$(printf ', %s' "${missing[@]}")
  die "missing ${line#, }."
fi
[[ $slices =~ ^[1-9][0-9]*$ ]] || die "--slices=$slices: give a positive integer."
((slices == 1)) || queued=1  # Multi-slice capacity only comes as queued resources.

where=(--project="$project" --zone="$zone")
# The TPU VM of each slice: one named NAME, or NAME-0 ... NAME-(S-1) made by --node-count.
nodes=("$name")
if ((slices > 1)); then
  nodes=()
  for ((k = 0; k < slices; k++)); do nodes+=("$name-$k"); done
fi

case $subcommand in
  create)
    ((${#args[@]} == 0)) || die "unexpected arguments: ${args[*]}"
    capacity=()
    if ((spot)); then capacity=(--spot); fi
    if ((queued)); then
      shape=(--node-id="$name")
      ((slices == 1)) || shape=(--node-count="$slices" --node-prefix="$name")
      run_cmd gcloud compute tpus queued-resources create "$name" "${where[@]}" \
        --accelerator-type="$type" --runtime-version="$version" "${shape[@]}" \
        ${capacity[@]+"${capacity[@]}"}
    else
      run_cmd gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
        --accelerator-type="$type" --version="$version" ${capacity[@]+"${capacity[@]}"}
    fi
    ;;

  setup)
    ((${#args[@]} == 0)) || die "unexpected arguments: ${args[*]}"
    py=$(quote "$python")
    # Ubuntu 22.04 TPU images ship Python 3.10; say so plainly rather than fail inside pip.
    install="if ! $py -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then"
    install+=" echo \"\$(hostname): pretrax needs Python 3.11+; $py is older or missing. Install one"
    install+=" (e.g. sudo apt-get install -y python3.11-venv) and run setup --python=python3.11.\"; exit 1; fi;"
    install+=" cd $(quote "$dir") && $py -m venv .venv"
    install+=" && .venv/bin/pip install -q -U pip && .venv/bin/pip install -e '.[tpu]'"
    if [[ -n $git_url ]]; then
      # Fetch, then check out REF detached: a second setup moves every worker to the same commit.
      fetch="if [ -d $(quote "$dir")/.git ]; then git -C $(quote "$dir") fetch -q --tags origin;"
      fetch+=" else git clone -q $(quote_words "$git_url" "$dir"); fi"
      fetch+="; git -C $(quote "$dir") checkout -q --detach $(quote "${git_ref:-origin/HEAD}")"
      remote="set -e; $fetch; $install"
    else
      repo=$(cd "$(dirname "$0")/.." && pwd)
      if [[ -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
        echo "tpu.sh setup: note: uncommitted changes in $repo are not copied (HEAD is)." >&2
      fi
      archive=${TMPDIR:-/tmp}/pretrax-$name.tar.gz
      run_cmd git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
      for node in "${nodes[@]}"; do
        run_cmd gcloud compute tpus tpu-vm scp "$archive" "$node:pretrax.tar.gz" "${where[@]}" \
          --worker=all
      done
      remote="set -e; mkdir -p $(quote_words "$dir"); tar -xzf pretrax.tar.gz -C $(quote_words "$dir"); $install"
    fi
    for node in "${nodes[@]}"; do
      run_cmd gcloud compute tpus tpu-vm ssh "$node" "${where[@]}" --worker=all --command="$remote"
    done
    ;;

  run)
    positional=() train_flags=()
    for arg in ${args[@]+"${args[@]}"}; do
      if [[ $arg == -* ]]; then train_flags+=("$arg"); else positional+=("$arg"); fi
    done
    ((${#positional[@]} == 2)) || die "give CONFIG and WORKDIR (see launch/tpu.sh run --help)."
    train=(.venv/bin/pretrax train --config="${positional[0]}" --workdir="${positional[1]}"
           ${train_flags[@]+"${train_flags[@]}"})
    # On each worker, pretrax writes only to its log and ignores SIGHUP, so a lost connection or a
    # Ctrl-C here ends the streaming, not the run (`logs` streams again, `stop` stops it).
    # `sh -c` records the pid that `stop` signals, then becomes pretrax.
    started="nohup sh -c 'echo \$\$ > logs/train.pid; exec \"\$@\"' pretrax $(quote_words "${train[@]}")"
    worker_number='$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)'
    pids=()
    for ((k = slices - 1; k >= 0; k--)); do
      remote="cd $(quote "$dir") && mkdir -p logs || exit 1; w=$worker_number; log=logs/train-slice$k-worker\$w.log"
      remote+="; touch \$log || exit 1; from=\$((\$(wc -c < \$log) + 1)); echo \"=== \$(date)\" >> \$log"
      remote+="; $started >> \$log 2>&1 < /dev/null & train=\$!"
      if ((k == 0)); then  # Worker 0 of slice 0 streams its log here.
        remote+="; if [ \"\$w\" = 0 ]; then tail -c +\$from -f --pid=\$train \$log & fi"
      fi
      remote+="; wait \$train; status=\$?; wait; exit \$status"
      if ((k == 0)); then
        rc=0
        run_cmd gcloud compute tpus tpu-vm ssh "${nodes[0]}" "${where[@]}" --worker=all \
          --command="$remote" || rc=$?
      else
        run_cmd gcloud compute tpus tpu-vm ssh "${nodes[k]}" "${where[@]}" --worker=all \
          --command="$remote" &
        pids+=($!)
      fi
    done
    for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || ((rc)) || rc=$?; done
    exit "$rc"
    ;;

  logs)
    follow="cd $(quote "$dir") && log=logs/train-slice0-worker0.log && pid=\$(cat logs/train.pid 2>/dev/null);"
    follow+=" if kill -0 \"\$pid\" 2>/dev/null; then tail -n 100 -f --pid=\$pid \$log; else tail -n 100 \$log; fi"
    run_cmd gcloud compute tpus tpu-vm ssh "${nodes[0]}" "${where[@]}" --worker=0 --command="$follow"
    ;;

  copy)
    ((${#args[@]} == 2)) || die "give SRC and DEST, one of them tpu:PATH (see launch/tpu.sh copy --help)."
    src=${args[0]} dest=${args[1]}
    if [[ $dest == tpu:* && $src != tpu:* ]]; then
      for node in "${nodes[@]}"; do
        run_cmd gcloud compute tpus tpu-vm scp --recurse "$src" "$node:${dest#tpu:}" "${where[@]}" \
          --worker="${worker:-all}"
      done
    elif [[ $src == tpu:* && $dest != tpu:* ]]; then
      run_cmd gcloud compute tpus tpu-vm scp --recurse "${nodes[0]}:${src#tpu:}" "$dest" \
        "${where[@]}" --worker="${worker:-0}"
    else
      die "exactly one of SRC and DEST must be tpu:PATH."
    fi
    ;;

  status)
    if ((queued)); then
      run_cmd gcloud compute tpus queued-resources describe "$name" "${where[@]}"
    else
      run_cmd gcloud compute tpus tpu-vm describe "$name" "${where[@]}"
    fi
    ;;

  stop)
    # Only a live pretrax: after a reboot the recorded pid may belong to something else.
    signal="cd $(quote_words "$dir") && pid=\$(cat logs/train.pid 2>/dev/null);"
    signal+=" if grep -qa pretrax /proc/\$pid/cmdline 2>/dev/null && kill -TERM \$pid;"
    signal+=" then echo \"\$(hostname): sent SIGTERM to pretrax\"; else echo \"\$(hostname): no pretrax running\"; fi"
    for node in "${nodes[@]}"; do
      run_cmd gcloud compute tpus tpu-vm ssh "$node" "${where[@]}" --worker=all --command="$signal"
    done
    if ((stop_vm)); then
      for node in "${nodes[@]}"; do run_cmd gcloud compute tpus tpu-vm stop "$node" "${where[@]}"; done
    fi
    ;;

  delete)
    if ((queued)); then
      # --force: delete the nodes the queued resource made, not only the request.
      run_cmd gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force
    else
      run_cmd gcloud compute tpus tpu-vm delete "$name" "${where[@]}"
    fi
    ;;
esac
