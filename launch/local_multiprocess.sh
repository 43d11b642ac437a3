#!/usr/bin/env bash
# N trainer processes on this machine, each with D fake CPU devices, joined by JAX's distributed
# runtime on localhost: the multi-host code path (one global mesh over all processes, each
# feeding its rows, process 0 logging, checkpoints written together), runnable without a
# cluster. The tests run it.
#
#   launch/local_multiprocess.sh [--dry-run] [--num_processes N] [--devices_per_process D] \
#       [--port PORT] [--log_dir DIR] [--module MODULE] -- TRAIN_ARGS...
#
#   launch/local_multiprocess.sh -- --config experiments/transfusion.py:tiny --workdir /tmp/run \
#       --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2
#
# --module runs another program that takes the same --coordinator_address, --num_processes and
# --process_id flags (default: transfusion_jax.train), e.g. evaluation split over the processes:
#
#   launch/local_multiprocess.sh --module transfusion_jax.evaluate -- --workdir /tmp/run
#
# Without --log_dir every process writes to this terminal (only process 0 logs). If one process
# fails the others are stopped and its exit status is returned; SIGTERM/SIGINT are passed on to
# every process (they agree on a step, checkpoint and exit 0, as a preempted job does).
# PYTHON picks the interpreter (default: python3).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

dry_run=0
num_processes=2
devices_per_process=4
port=""
log_dir=""
module="transfusion_jax.train"
python="${PYTHON:-python3}"
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --num_processes) num_processes="$2"; shift ;;
    --devices_per_process) devices_per_process="$2"; shift ;;
    --port) port="$2"; shift ;;
    --log_dir) log_dir="$2"; shift ;;
    --module) module="$2"; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (train arguments go after --)" >&2; usage 2 >&2 ;;
  esac
  shift
done
for value in "$num_processes" "$devices_per_process"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "error: expected a positive integer, got '$value'" >&2; exit 2; }
done
if [[ -z "$port" ]]; then  # a free port, chosen by the kernel
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
fi

command_of() {  # process $1's command, into the array `cmd`
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${devices_per_process}"
       "$python" -m "$module" "--coordinator_address=localhost:${port}"
       "--num_processes=${num_processes}" "--process_id=$1" "${train_args[@]}")
}
train_args=("$@")

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    command_of "$i"
    line="$(printf '%q ' "${cmd[@]}")"
    line="${line% }"
    [[ -n "$log_dir" ]] && line+=" > $(printf '%q' "${log_dir}/process_${i}.log") 2>&1"
    echo "$line &"
  done
  echo "wait"
  exit 0
fi

[[ -n "$log_dir" ]] && mkdir -p "$log_dir"
pids=()
stop_all() {
  local signal="$1"
  for pid in "${pids[@]}"; do kill "-${signal}" "$pid" 2>/dev/null || true; done
}
trap 'stop_all TERM' TERM INT
trap 'stop_all KILL' EXIT  # whatever happens, no process outlives the launcher

for ((i = 0; i < num_processes; i++)); do
  command_of "$i"  # started directly (no subshell between): $! is the trainer's pid
  if [[ -n "$log_dir" ]]; then
    "${cmd[@]}" >"${log_dir}/process_${i}.log" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  pids+=("$!")
done

# Poll rather than `wait -n`, which older bash (macOS: 3.2) lacks. Bash reaps the children as
# they end and keeps their status for `wait PID`.
status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    rc=0
    wait "$pid" || rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc  # the others would wait for this one forever: stop them
      echo "process ${pid} exited with status ${rc}: stopping the others" >&2
      stop_all TERM
    fi
  done
  running=(${still[@]+"${still[@]}"})
  ((${#running[@]})) && sleep 0.5
done
trap - EXIT
exit "$status"
