#!/usr/bin/env bash
# Train on TPU slices of a GKE cluster: a JobSet of one Job per slice and one pod per TPU VM
# host, each pod running the trainer from a container image that has transfusion_jax
# installed (with jax[tpu]). GKE sets TPU_WORKER_HOSTNAMES and TPU_WORKER_ID in every pod, from
# which jax.distributed finds the slice; for several slices the MEGASCALE_* variables below
# join them over the data-center network.
#
#   launch/gke_jobset.sh --name NAME --image IMAGE --tpu v5p --topology 2x2x4 [--num_slices N]
#       [--chips_per_host 4] [--manifest FILE] [--xpk CLUSTER] [--dry-run] -- TRAIN_ARGS...
#
#   launch/gke_jobset.sh --name tf-07b --image us-docker.pkg.dev/P/R/transfusion:latest \
#       --tpu v6e --topology 8x8 -- --config experiments/transfusion.py:0.76b,mesh=fsdp \
#       --workdir gs://BUCKET/runs/0.76b
#
# --tpu is v5p, v6e, v5e or v4 (the GKE TPU accelerator of the node pool); --topology the
# slice's chip topology. Writes the manifest to --manifest (default: NAME.jobset.yaml in a
# temporary folder) and runs `kubectl apply -f` on it; --xpk CLUSTER runs the same workload
# through `xpk workload create` instead. --dry-run prints the manifest and the command.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

dry_run=0 name="" image="" tpu="" topology="" num_slices=1 chips_per_host=4 manifest="" xpk=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name) name="$2"; shift ;;
    --image) image="$2"; shift ;;
    --tpu) tpu="$2"; shift ;;
    --topology) topology="$2"; shift ;;
    --num_slices) num_slices="$2"; shift ;;
    --chips_per_host) chips_per_host="$2"; shift ;;
    --manifest) manifest="$2"; shift ;;
    --xpk) xpk="$2"; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (train arguments go after --)" >&2; usage 2 >&2 ;;
  esac
  shift
done
for required in name image tpu topology; do
  [[ -n "${!required}" ]] || { echo "error: --${required} is required" >&2; exit 2; }
done
for value in "$num_slices" "$chips_per_host"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "error: expected a positive integer, got '$value'" >&2; exit 2; }
done
[[ "$topology" =~ ^[1-9][0-9]*(x[1-9][0-9]*)+$ ]] || { echo "error: --topology=${topology}: expected e.g. 2x2x4 or 8x8" >&2; exit 2; }
case "$tpu" in
  v5p) accelerator="tpu-v5p-slice" ;;
  v6e) accelerator="tpu-v6e-slice" ;;
  v5e) accelerator="tpu-v5-lite-podslice" ;;
  v4) accelerator="tpu-v4-podslice" ;;
  *) echo "error: --tpu=${tpu}: expected v5p, v6e, v5e or v4" >&2; exit 2 ;;
esac
(($#)) || { echo "error: no train arguments after -- (--config ... --workdir gs://...)" >&2; exit 2; }
chips=$((${topology//x/*}))
((chips % chips_per_host == 0)) || { echo "error: --topology=${topology} (${chips} chips) is not a multiple of --chips_per_host=${chips_per_host}" >&2; exit 2; }
hosts=$((chips / chips_per_host))
case "$tpu" in  # the accelerator-type name: TensorCores for v4/v5p, chips for v5e/v6e
  v5p | v4) tpu_type="${tpu}-$((2 * chips))" ;;
  v5e) tpu_type="v5litepod-${chips}" ;;
  *) tpu_type="${tpu}-${chips}" ;;
esac

quote() {  # words as one shell line: each single-quoted unless made of safe characters only
  local word out=() sq="'" escaped="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$word")
    else out+=("'${word//"$sq"/"$escaped"}'"); fi
  done
  echo "${out[*]}"
}
yaml_list() {  # words as a YAML flow list of double-quoted strings
  local word out=()
  for word in "$@"; do word=${word//\\/\\\\}; out+=("\"${word//\"/\\\"}\""); done
  local IFS=,
  echo "[${out[*]}]"
}

if [[ -n "$xpk" ]]; then
  command=(xpk workload create --cluster="$xpk" --workload="$name" --docker-image="$image"
           --tpu-type="$tpu_type" --num-slices="$num_slices"
           --command="python3 -m transfusion_jax.train $(quote "$@")")
  if ((dry_run)); then quote "${command[@]}"; exit 0; fi
  exec "${command[@]}"
fi

multislice_env=""
if ((num_slices > 1)); then  # slice 0's first pod coordinates; GKE's DNS names it
  multislice_env="
              - name: JOBSET_NAME
                valueFrom: {fieldRef: {fieldPath: \"metadata.annotations['jobset.sigs.k8s.io/jobset-name']\"}}
              - name: REPLICATED_JOB_NAME
                valueFrom: {fieldRef: {fieldPath: \"metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']\"}}
              - name: MEGASCALE_COORDINATOR_ADDRESS
                value: \"\$(JOBSET_NAME)-\$(REPLICATED_JOB_NAME)-0-0.\$(JOBSET_NAME)\"
              - name: MEGASCALE_NUM_SLICES
                value: \"${num_slices}\"
              - name: MEGASCALE_SLICE_ID
                valueFrom: {fieldRef: {fieldPath: \"metadata.annotations['jobset.sigs.k8s.io/job-index']\"}}"
fi
jobset="apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: ${name}
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool  # a slice per Job
spec:
  failurePolicy:
    maxRestarts: 3  # the trainer resumes from its last checkpoint
  network:
    enableDNSHostnames: true
  replicatedJobs:
  - name: slice
    replicas: ${num_slices}
    template:
      spec:
        parallelism: ${hosts}
        completions: ${hosts}
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            hostNetwork: true
            dnsPolicy: ClusterFirstWithHostNet
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: ${accelerator}
              cloud.google.com/gke-tpu-topology: ${topology}
            terminationGracePeriodSeconds: 300  # SIGTERM: the trainer checkpoints, then exits
            containers:
            - name: train
              image: ${image}
              command: [\"python3\", \"-m\", \"transfusion_jax.train\"]
              args: $(yaml_list "$@")
              ports:
              - containerPort: 8471  # TPU runtime
              - containerPort: 8080  # multi-slice (megascale)
              - containerPort: 8476  # jax.distributed coordinator
              securityContext:
                privileged: true
              env:
              - name: JAX_PLATFORMS
                value: tpu${multislice_env}
              resources:
                limits:
                  google.com/tpu: ${chips_per_host}"

if [[ -z "$manifest" ]]; then
  manifest="${TMPDIR:-/tmp}/${name}.jobset.yaml"
fi
apply=(kubectl apply -f "$manifest")
if ((dry_run)); then
  echo "# ${manifest}:"
  echo "$jobset"
  quote "${apply[@]}"
  exit 0
fi
echo "$jobset" >"$manifest"
exec "${apply[@]}"
