# Shared by the launch scripts (sourced, not run): help from a script's header, quoting, dry runs.

# The calling script's header comment, without its '# '.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

# A word as any POSIX shell reads it back: bare when that is safe, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_words() {
  local word out=()
  for word in "$@"; do out+=("$(quote "$word")"); done
  echo "${out[*]}"
}

# The command about to run, to paste back into a shell.
show() { echo "+ $(quote_words "$@")"; }

# Runs a command, or with dry_run=1 only prints it (on stdout, so it can be saved or diffed).
run_cmd() {
  if ((${dry_run:-0})); then
    show "$@"
    return 0
  fi
  show "$@" >&2
  "$@"
}

# Waits for the background processes whose pids are in the array `running`; returns the first
# non-zero exit status (0 if none). The caller defines `stop_all SIGNAL`, which must reach every
# process of the job: it is called with TERM on the first failure (the others would wait for the
# lost process in their next collective) or on this script's first SIGINT/SIGTERM (JAX's preemption
# sync turns SIGTERM into one agreed step and a checkpoint), and with KILL 10 s after a failure or
# on a second interrupt.
# Starts process I of a job in the background, remembered in `running`: process 0 prints to the
# terminal, the others to LOGS/process_I.log.
start_process() {
  local i=$1 logs=$2
  shift 2
  show "$@" >&2
  if ((i == 0)); then
    "$@" < /dev/null &
  else
    "$@" < /dev/null > "$logs/process_$i.log" 2>&1 &
  fi
  running+=($!)
}

supervise() {
  local status=0 kill_at=0 pid rc still
  interrupts=0
  trap 'interrupts=$((interrupts + 1)); if ((interrupts == 1)); then stop_all TERM; else stop_all KILL; fi' INT TERM
  # Polls rather than `wait -n`: it works with the bash 3.2 that macOS ships and lets traps run.
  while ((${#running[@]})); do
    still=()
    for pid in "${running[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
      rc=0
      wait "$pid" || rc=$?
      if ((rc != 0 && status == 0)); then
        status=$rc
        if ((interrupts == 0)); then
          echo "$(basename "$0"): process $pid exited with status $rc; stopping the others." >&2
          stop_all TERM
          kill_at=$((SECONDS + 10))
        fi
      fi
    done
    running=(${still[@]+"${still[@]}"})
    if ((kill_at && SECONDS >= kill_at && ${#running[@]})); then stop_all KILL; kill_at=0; fi
    if ((${#running[@]})); then sleep 0.2; fi
  done
  trap - INT TERM
  return "$status"
}
