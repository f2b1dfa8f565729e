#!/usr/bin/env bash
# One-shot check of eca_flax on a fresh machine with one NVIDIA GPU, in at most 8.5 minutes.
#
#   benchmarks/gpu_check.sh [WHEEL_DIR]              # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run [WHEEL_DIR]    # anywhere, tiny sizes (tests/test_gpu_check.py)
#
# Needs Python 3.12 with jax (CUDA), flax, optax, orbax-checkpoint, pillow and tensorboard
# installed; no network and no TensorFlow. It installs only the wheels in WHEEL_DIR (into a
# private folder): what eca_flax's TensorFlow-free runtime adds, under 5 MB, fetched elsewhere by
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d WHEEL_DIR \
#     ml-collections grain array-record portpicker
#
# Prints, and writes to $OUT (or ./gpu_check_results): the device and versions; the benchmark
# of ECA-ResNet-50 in bf16 at batch 256, inference and train step, beside PyTorch (AMP,
# channels_last) when torch has CUDA; the input pipeline per core and on all host cores; and
# train.py for 300 steps on a generated JPEG folder at 224, the real pipeline and checkpoints
# included (end-to-end img/s). gpu_check.log holds everything, summary.md the figures.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
WHEELS=${1:-}
OUT=${OUT:-gpu_check_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl \
    || { echo "error: could not install the wheels in $WHEELS"; exit 1; }
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
if [ "$DRY" = 1 ]; then  # CPU-sized: every stage runs, nothing takes long (the tests' model)
  MODEL=test_eca_resnet BATCH=2 SIZE=32 REPEATS=1 IMAGES=48 MEASURE_S=0.25 PBATCH=8
  TRAIN_IMAGES=32 STEPS=4 TBATCH=8
else
  MODEL=eca_resnet50 BATCH=256 SIZE=224 REPEATS=5 IMAGES=1024 MEASURE_S=5 PBATCH=256
  TRAIN_IMAGES=10240 STEPS=300 TBATCH=256
fi
# Time limits of the three stages (s): 480 in all, 8.5 minutes with the start-up and the JPEGs.
# The pipeline stage times 10 runs (train/eval per core and all cores; threads against workers
# on 1, 2 and all cores) and the GIL profile.
MODEL_S=210 PIPELINE_S=120 TRAIN_S=150
# The dry run checks that every stage runs and reports, not its time: on a loaded CPU its
# stages may take several times longer, so their limits are only a guard against a hang.
if [ "$DRY" = 1 ]; then MODEL_S=600 PIPELINE_S=600 TRAIN_S=600; fi
SECTION() { echo; echo "=== $* ($(date +%T))"; }

SECTION "device and versions"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
python3 - <<'EOF'
import importlib.metadata as md, os, platform
import jax
print("python", platform.python_version(), "| cores", len(os.sched_getaffinity(0)))
print("jax devices:", jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections",
             "pillow", "torch", "tensorflow"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF

SECTION "model: python -m eca_flax.benchmark ($MODEL, bf16, batch $BATCH)"
TORCH=""
if python3 -c "import sys, torch, jax; sys.exit(0 if torch.cuda.is_available() or jax.default_backend() == 'cpu' else 1)" 2>/dev/null; then
  TORCH="--torch --channels-last"
fi
timeout "$MODEL_S" python3 -m eca_flax.benchmark --models "$MODEL" --batch-size "$BATCH" \
  --image-size "$SIZE" --dtype bfloat16 --mode both --no-plain --repeats "$REPEATS" $TORCH \
  | tee "$WORK/model.txt" || echo "error: the model benchmark failed or timed out"

SECTION "input pipeline: benchmarks/input_pipeline.py"
timeout "$PIPELINE_S" python3 benchmarks/input_pipeline.py --num_images "$IMAGES" --seconds "$MEASURE_S" \
  --batch_size "$PBATCH" | tee "$WORK/pipeline.txt" || echo "error: the pipeline benchmark failed"

SECTION "end to end: train.py, $STEPS steps of $TBATCH at $SIZE on JPEGs, checkpoints on"
python3 - "$WORK/jpegs" "$TRAIN_IMAGES" <<'EOF'
import pathlib, sys
sys.path.insert(0, "benchmarks")
from input_pipeline import write_jpegs
write_jpegs(pathlib.Path(sys.argv[1]), int(sys.argv[2]), val=max(16, int(sys.argv[2]) // 20))
EOF
start=$(date +%s)
timeout "$TRAIN_S" python3 train.py --config configs/eca_resnet50.py --workdir "$WORK/run" \
  --config.model="$MODEL" --config.k_size= --config.dataset="folder:$WORK/jpegs" \
  --config.image_size="$SIZE" --config.batch_size="$TBATCH" --config.dtype=bfloat16 \
  --config.num_train_steps="$STEPS" --config.log_every_steps=$((STEPS / 4)) \
  --config.checkpoint_every_steps=100 --config.eval_every_epochs=1000 \
  | tee "$WORK/train.txt" || echo "error: train.py failed or timed out"
echo "train.py wall time: $(( $(date +%s) - start )) s"

SECTION "summary ($OUT/summary.md)"
{
  echo "# gpu_check $(date -u +%FT%TZ)"
  grep -E "^(machine|\| )" "$WORK/model.txt" 2>/dev/null
  echo
  grep -E "^(\||[0-9]+ JPEGs)" "$WORK/pipeline.txt" 2>/dev/null
  echo
  grep -E "step [0-9]+/|final step" "$WORK/train.txt" 2>/dev/null
} | tee "$OUT/summary.md"
