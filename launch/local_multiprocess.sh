#!/usr/bin/env bash
# Several processes on one machine, one per GPU (or N CPU processes for a multi-host rehearsal),
# talking through jax.distributed with an explicit coordinator on 127.0.0.1.
#
#   launch/local_multiprocess.sh [--dry-run] NUM_PROCESSES CONFIG WORKDIR [--config.key=value ...]
#
# On a machine with GPUs, process i sees only GPU i (CUDA_VISIBLE_DEVICES); without GPUs each
# process gets CXR_JAX_CPU_DEVICES fake CPU devices (default 4) and gloo collectives. Every
# process reads its own part of each split; only process 0 writes logs, reports and metadata.
# The exit status is the first non-zero status of a process (75: preempted, rerun to resume).
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
if [ $# -lt 3 ]; then
  echo "usage: $0 [--dry-run] NUM_PROCESSES CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
n=$1 config=$2 workdir=$3
shift 3
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NUM_PROCESSES must be a positive integer, got '$n'" >&2
  exit 2
fi
port=${CXR_JAX_COORDINATOR_PORT:-12355}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=1
else
  gpus=0
fi
pids=()
for ((i = 0; i < n; i++)); do
  if [ "$gpus" = 1 ]; then
    env_vars=(CUDA_VISIBLE_DEVICES="$i")
  else
    env_vars=(JAX_PLATFORMS=cpu
              XLA_FLAGS="--xla_force_host_platform_device_count=${CXR_JAX_CPU_DEVICES:-4}")
  fi
  cmd=(env "${env_vars[@]}" python -m cxr_jax.main --config="$config" --workdir="$workdir"
       --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@")
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    printf '&\n'
  else
    "${cmd[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" || code=$?
  if [ "$status" = 0 ]; then
    status=$code
  fi
done
exit "$status"
