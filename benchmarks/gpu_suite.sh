#!/usr/bin/env bash
# Every GPU measurement of issue 16 (goals 2 and 5; bn_impl's and max pooling's GPU defaults), in
# three parts that each fit one call of the device tool (a 15-minute lease: run part 1 first; parts 2 and 3
# in later leases). Each part writes its tables and JSON under $OUT (default /tmp/gpu_suite), one
# step at a time, so a part cut short keeps what it finished.
#
#   bash benchmarks/gpu_suite.sh --fetch-wheels   # here, once: the wheels the GPU image lacks
#   bash benchmarks/gpu_suite.sh 1                # there (device run, carry [".whl"],
#                                                 # timeout_s=600; its steps are capped at 570 s)
#
# Part 1: ResNet-50 against eager and compiled torch, fp32 and bf16, batch 64, plus bf16 at
#         batch 256 (the >= 50%-of-peak goal); PDA at the reference setting (462,251 forward
#         passes, MobileNet v1 width 0.5) in fp32 and bf16 at chunk sizes 256 and 4096, and how
#         far the bf16 heat maps are from the fp32 ones;
#         BatchNorm's fused vs autodiff gradient on the GPU (ResNet-50, DenseNet-121).
# Part 2: the other backbones (MobileNet v1, ResNet-101, DenseNet-121, VGG-16, AlexNet).
# Part 3: the papers' models (000 MobileNet + LSTM attention, 001 BSL+FAM+SAM, 002
#         weighted-BCE ResNet-50, 003 custom CNN, 004 U-Net and MSA-DenseNet-121 + FW).
# The GPU image has JAX, flax, optax, orbax and torch but not ml-collections (carried as a
# wheel); nothing here imports TensorFlow or TFDS.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [[ "${1:-}" == --fetch-wheels ]]; then
  grep -qxF '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
    || { mkdir -p "$(git rev-parse --git-common-dir)/info"
         echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d .whl 'ml-collections>=1.0.0'
  ls .whl
  exit 0
fi

part="${1:?usage: gpu_suite.sh 1|2|3 (or --fetch-wheels)}"
out="${OUT:-/tmp/gpu_suite}"
mkdir -p "$out"
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  > "$out/gpu.csv" 2>&1
python3 -c 'import jax, flax, optax, torch; print("jax", jax.__version__, jax.devices(),
"flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)' \
  2>&1 | tee "$out/versions.txt"

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in $out/NAME.log.
step() {
  local name="$1" limit="$2"
  shift 2
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -E 'Warning|warn\(' | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

case "$part" in
  1)
    step peers_resnet50 220 python3 benchmarks/peers.py --rows=resnet50 --batch=64 \
      --json "$out/peers_resnet50.json"
    step peers_resnet50_b256 110 python3 benchmarks/peers.py --rows=resnet50 --batch=256 \
      --dtypes=bfloat16 --peers=compiled --json "$out/peers_resnet50_b256.json"
    step pda_reference 160 bash -c "python3 benchmarks/pda.py --only-reference --quick \
      --reference-chunks=4096 --json '$out/pda_fp32.json' --save-maps /tmp/pda_fp32.npz \
      && python3 benchmarks/pda.py --only-reference --quick --reference-chunks=4096 \
      --dtype=bfloat16 --json '$out/pda_bf16.json' --save-maps /tmp/pda_bf16.npz \
      && python3 benchmarks/pda.py --compare-maps /tmp/pda_fp32.npz /tmp/pda_bf16.npz"
    step bn_impl 80 python3 benchmarks/conv_impl.py --models=resnet50,densenet121 \
      --impls=xla@autodiff,xla@fused --batch=64 --rounds=2 --no_torch \
      --json "$out/bn_impl.json"
    ;;
  2)
    step max_pool 45 python3 benchmarks/max_pool.py --batch=64 --json "$out/max_pool.json"
    step peers_backbones 495 python3 benchmarks/peers.py \
      --rows=mobilenet_v1,densenet121,vgg16,resnet101,alexnet --json "$out/peers_backbones.json"
    ;;
  3)
    papers='MobileNet + LSTM attention,BSL+FAM+SAM,resnet50 weighted BCE,custom_cnn,unet'
    step peers_papers 540 python3 benchmarks/peers.py --rows="$papers,MSA-DenseNet-121 + FW" \
      --json "$out/peers_papers.json"
    ;;
  *)
    echo "unknown part $part: 1, 2 or 3" >&2
    exit 2
    ;;
esac
