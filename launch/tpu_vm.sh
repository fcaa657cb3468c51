#!/usr/bin/env bash
# Runs a cxr_jax config on every host of a Cloud TPU VM slice (multi-host via jax.distributed).
#
#   launch/tpu_vm.sh [--dry-run] TPU_NAME ZONE configs/lstm_attention.py gs://BUCKET/workdir \
#       [--config.x=y ...]
#
# Every host runs the same command; jax.distributed.initialize() finds its peers from the TPU
# metadata, each host reads its own part of the data (tfds.even_splits) and only process 0 writes
# logs, reports and checkpoint metadata. TFDS data must be reachable by every host: set
# --config.data.data_dir to a GCS path (gs://...) holding the prepared data sets (WORKSPACE.md).
# --dry-run prints every command instead of running it. Exit status 75 from the job means it was
# preempted after saving a checkpoint: run the same command again to resume.
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
if [ $# -lt 4 ]; then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
overrides=""
for arg in "$@"; do
  overrides+=" $(printf '%q' "$arg")"
done

run() {
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Ship this checkout to every host, install it next to the TPU build of JAX, then run.
run gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$zone" "$repo" "$tpu":~/cxr_jax
run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all --zone="$zone" --command="set -e; \
cd ~/cxr_jax && python3 -m venv .venv && . .venv/bin/activate && \
pip install -q -e . 'jax[tpu]' && \
python -m cxr_jax.main --distributed --config=$(printf '%q' "$config") \
--workdir=$(printf '%q' "$workdir")$overrides"
