#!/usr/bin/env bash
# Runs a cxr_jax config on every host of a Cloud TPU VM slice (multi-host via jax.distributed).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/lstm_attention.py gs://BUCKET/workdir [--config.x=y ...]
#
# Every host runs the same command; jax.distributed.initialize() finds its peers from the TPU
# metadata, each host reads its own part of the data (tfds.even_splits) and only process 0 writes
# logs, reports and checkpoint metadata. TFDS data must be reachable by every host: set
# --config.data.data_dir to a GCS path (gs://...) holding the prepared data sets (WORKSPACE.md).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
# Ship this checkout to every host, install it next to the TPU build of JAX, then run.
gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$zone" "$repo" "$tpu":~/cxr_jax
gcloud compute tpus tpu-vm ssh "$tpu" --worker=all --zone="$zone" --command="
  set -e; cd ~/cxr_jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  python -m cxr_jax.main --distributed --config=$config --workdir=$workdir $*"
