#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (or several, multi-slice), one trainer process per TPU VM
# worker. Creates the slice or reuses it, copies this checkout (git HEAD) to every worker,
# installs it with jax[tpu], and runs the trainer on all workers at once. The trainer finds the
# slice itself (jax.distributed auto-detection on a TPU VM; multi-slice: the MEGASCALE_*
# variables the queued resource sets), so the command is the same as on one machine.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --accelerator v5p-32 [--project PROJECT]
#       [--version RUNTIME] [--queued] [--num_slices N] [--spot] [--dry-run] -- TRAIN_ARGS...
#
#   launch/tpu_pod.sh --name tf-16b --zone us-east5-a --accelerator v5p-64 -- \
#       --config experiments/transfusion.py:0.16b,mesh=fsdp --workdir gs://BUCKET/runs/0.16b
#
# --queued (implied by --num_slices > 1) asks through a queued resource, which waits for
# capacity; the slices are then NAME-0 ... NAME-(N-1). The workdir must be reachable by every
# worker: a gs:// bucket. --dry-run prints every command instead of running it; the commands
# that create the slice are printed after the one that checks whether it exists.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

dry_run=0
name="" zone="" accelerator="" project="" version="" queued=0 num_slices=1 spot=0
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name) name="$2"; shift ;;
    --zone) zone="$2"; shift ;;
    --accelerator) accelerator="$2"; shift ;;
    --project) project="$2"; shift ;;
    --version) version="$2"; shift ;;
    --queued) queued=1 ;;
    --num_slices) num_slices="$2"; shift ;;
    --spot) spot=1 ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (train arguments go after --)" >&2; usage 2 >&2 ;;
  esac
  shift
done
for required in name zone accelerator; do
  [[ -n "${!required}" ]] || { echo "error: --${required} is required" >&2; exit 2; }
done
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || { echo "error: --num_slices=${num_slices}: expected a positive integer" >&2; exit 2; }
((num_slices > 1)) && queued=1
(($#)) || { echo "error: no train arguments after -- (--config ... --workdir gs://...)" >&2; exit 2; }

if [[ -z "$version" ]]; then  # the TPU VM runtime image of each generation
  case "$accelerator" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

quote() {  # words as one shell line: each single-quoted unless made of safe characters only
  local word out=() sq="'" escaped="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$word")
    else out+=("'${word//"$sq"/"$escaped"}'"); fi
  done
  echo "${out[*]}"
}
run() {  # a command: printed exactly on --dry-run, else run
  if ((dry_run)); then quote "$@"; else "$@"; fi
}
note() { if ((dry_run)); then echo "# $*"; else echo "$*" >&2; fi; }

where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
tpu_vm=(gcloud compute tpus tpu-vm)
queued_resources=(gcloud alpha compute tpus queued-resources)

# --- 1. the slice(s): reuse when present, else create
if ((queued)); then
  if ((dry_run)) || ! run "${queued_resources[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
    ((dry_run)) && run "${queued_resources[@]}" describe "$name" "${where[@]}"
    note "if the queued resource does not exist yet:"
    create=("${queued_resources[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator"
            --runtime-version="$version")
    if ((num_slices > 1)); then
      create+=(--node-count="$num_slices" --node-prefix="$name")
    else
      create+=(--node-id="$name")
    fi
    ((spot)) && create+=(--spot)
    run "${create[@]}"
  fi
  note "waiting for the queued resource to be ACTIVE"
  state_cmd=("${queued_resources[@]}" describe "$name" "${where[@]}" --format=value\(state.state\))
  if ((dry_run)); then run "${state_cmd[@]}"; else
    until [[ "$("${state_cmd[@]}")" == ACTIVE ]]; do sleep 30; done
  fi
else
  if ((dry_run)) || ! "${tpu_vm[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
    ((dry_run)) && run "${tpu_vm[@]}" describe "$name" "${where[@]}"
    note "if the TPU VM does not exist yet:"
    create=("${tpu_vm[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator"
            --version="$version")
    ((spot)) && create+=(--spot)
    run "${create[@]}"
  fi
fi
nodes=("$name")
if ((num_slices > 1)); then
  nodes=()
  for ((i = 0; i < num_slices; i++)); do nodes+=("${name}-${i}"); done
fi

# --- 2. the code on every worker: this checkout's HEAD, installed with jax for TPUs
tarball="${TMPDIR:-/tmp}/transfusion_jax-${name}.tar.gz"
run git archive --format=tar.gz --output="$tarball" HEAD
setup='rm -rf ~/transfusion_jax && mkdir -p ~/transfusion_jax && tar -xzf ~/transfusion_jax.tar.gz -C ~/transfusion_jax && cd ~/transfusion_jax && python3 -m pip install -q -e . "jax[tpu]>=0.10.2,<0.11"'
for node in "${nodes[@]}"; do
  run "${tpu_vm[@]}" scp "$tarball" "${node}:~/transfusion_jax.tar.gz" "${where[@]}" --worker=all
  run "${tpu_vm[@]}" ssh "$node" "${where[@]}" --worker=all --command="$setup"
done

# --- 3. the trainer on every worker of every slice, at once
train="cd ~/transfusion_jax && python3 -m transfusion_jax.train $(quote "$@")"
if ((queued)); then
  run "${queued_resources[@]}" ssh "$name" "${where[@]}" --node=all --worker=all --command="$train"
else
  run "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all --command="$train"
fi
