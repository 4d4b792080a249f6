#!/usr/bin/env bash
# The whole flow on a CUDA GPU, on generated CIFAR-format data: train 2 epochs in bf16 and in fp16,
# resnet-eval, resnet-predict, SIGTERM + resume, torchrun with 1 process, compile=true, and
# deterministic=true twice (equal weights), and no host sync inside a training step
# (scripts/sync_check.py). Prints a table of what passed, with img/s.
# Without a CUDA GPU it says so and exits 0.
#
#   pip install -e ".[test]" && bash scripts/gpu_smoke.sh     (the data comes from tests/conftest.py)
set -uo pipefail
PYTHON=${PYTHON:-python}
if ! $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_smoke: no CUDA GPU here (torch.cuda.is_available() is False); nothing to do"
    exit 0
fi
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
# CIFAR-10 python batches of learnable synthetic images, and the tests' sitecustomize that makes
# torchvision's integrity check expect their md5 sums instead of the official files'.
export RESNET_TRAIN_TEST_CIFAR_MD5="$WORK/cifar-md5.json" PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
$PYTHON - "$HERE/../tests" <<'EOF' || exit 1
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import conftest
Path("sitecustomize.py").write_text(conftest.SITECUSTOMIZE)
conftest.write_cifar(Path("data"), n_train=5600, n_test=1000)
conftest.write_image_folder(Path("photos"), {"test": 24}, num_classes=10)
EOF
$PYTHON - <<'EOF'
import torch
print(f"GPU: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, torch {torch.__version__}")
EOF

COMMON="model=resnet18 batch_size=256 dataset.val_size=500 num_workers=2 progress=false tensorboard.images=false"
ROWS=()
failed=0
record() {  # name, exit status, run dir (for img/s), seconds
    local status=PASS ips=""
    [ "$2" -eq 0 ] || { status="FAIL (exit $2)"; failed=1; }
    [ -n "$3" ] && [ -f "$3/metrics.json" ] && ips=$($PYTHON -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"{m['images_per_second'] or 0:,.0f}\")" "$3/metrics.json")
    ROWS+=("| $1 | $status | $ips | $4 |")
}
timed() { local start=$SECONDS; "$@" > "$WORK/last.log" 2>&1; local rc=$?; ELAPSED=$((SECONDS - start)); return $rc; }

timed resnet-train $COMMON epochs=2 precision=bf16 hydra.run.dir=runs/bf16; record "train 2 epochs, bf16" $? runs/bf16 $ELAPSED
timed resnet-train $COMMON epochs=2 precision=fp16 hydra.run.dir=runs/fp16; record "train 2 epochs, fp16 + GradScaler" $? runs/fp16 $ELAPSED
timed resnet-eval checkpoint=runs/bf16; record "resnet-eval" $? "" $ELAPSED
timed resnet-eval checkpoint=runs/fp16 device=cpu; record "resnet-eval of the fp16 run on the CPU" $? "" $ELAPSED
timed resnet-predict checkpoint=runs/bf16 "inputs=[photos/test]"; record "resnet-predict (24 PNG/JPEG files)" $? "" $ELAPSED
timed $PYTHON - <<'EOF'
import torch  # a plain torch.load, as a laptop without a GPU would do it: every tensor must be on the CPU
ckpt = torch.load("runs/fp16/checkpoints/last.pt", weights_only=True)
def devices(obj):
    if isinstance(obj, torch.Tensor):
        yield obj.device.type
    elif isinstance(obj, (dict, list, tuple)):
        for v in (obj.values() if isinstance(obj, dict) else obj):
            yield from devices(v)
found = set(devices(ckpt))
assert found == {"cpu"}, found
EOF
record "checkpoint tensors all on the CPU" $? "" $ELAPSED

# SIGTERM in the middle of epoch 2, then resume: the run must finish with all epochs
resnet-train $COMMON epochs=3 checkpoint.every_n_steps=5 hydra.run.dir=runs/stopped > stopped.log 2>&1 &
pid=$!
for _ in $(seq 600); do
    $PYTHON -c "import torch,sys; s=torch.load('runs/stopped/checkpoints/last.pt', weights_only=True)['state']; sys.exit(0 if s['epoch'] >= 1 else 1)" 2>/dev/null && break
    sleep 0.5
done
kill -TERM $pid; wait $pid; stop_rc=$?
timed resnet-train resume=runs/stopped; rc=$?
[ $stop_rc -eq 143 ] || rc=$stop_rc
$PYTHON -c "import json,sys; sys.exit(0 if json.load(open('runs/stopped/metrics.json'))['epochs'] == 3 else 1)" || rc=1
record "SIGTERM (exit 143) + resume" $rc runs/stopped $ELAPSED

# Adam trained on the CPU, resumed on the GPU, where it switches to the fused kernel (its `step` moves along)
timed resnet-train $COMMON model=resnet20 optim=adam epochs=1 device=cpu hydra.run.dir=runs/adam; rc=$?
[ $rc -eq 0 ] && { timed resnet-train resume=runs/adam epochs=2 device=auto; rc=$?; }
record "Adam: 1 epoch on the CPU, resumed on the GPU (fused)" $rc runs/adam $ELAPSED

timed torchrun --standalone --nproc_per_node=1 -m resnet_train $COMMON epochs=1 hydra.run.dir=runs/torchrun
record "torchrun, 1 process" $? runs/torchrun $ELAPSED
timed resnet-train $COMMON epochs=2 compile=true hydra.run.dir=runs/compiled; record "compile=true" $? runs/compiled $ELAPSED
timed resnet-train $COMMON epochs=1 deterministic=true seed=3 hydra.run.dir=runs/det1; rc1=$?
timed resnet-train $COMMON epochs=1 deterministic=true seed=3 hydra.run.dir=runs/det2; rc2=$?
same=$($PYTHON - <<'EOF'
import torch
a, b = (torch.load(f"runs/det{i}/checkpoints/last.pt", weights_only=True)["model"] for i in (1, 2))
print(int(all(torch.equal(a[k], b[k]) for k in a)))
EOF
)
rc=$((rc1 + rc2)); [ "$same" = "1" ] || rc=1
record "deterministic=true twice: equal weights" $rc runs/det1 $ELAPSED

timed $PYTHON "$HERE/sync_check.py"; rc=$?; cp "$WORK/last.log" "$WORK/sync.log"
record "no host sync in a training step (6 augment options x bf16/fp16, scripts/sync_check.py)" $rc "" $ELAPSED

echo
echo "| step | result | train img/s | seconds |"
echo "|---|---|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo; cat "$WORK/sync.log"
[ $failed -eq 0 ] || { echo; echo "gpu_smoke: FAILED (the last command's output):"; tail -20 "$WORK/last.log"; }
exit $failed
