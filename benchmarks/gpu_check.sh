#!/usr/bin/env bash
# GPU check (issue 17 §5): one script for a machine with one or more GPUs and no network, about 5 minutes.
#
# Builds a random-weight model of Qwen2.5-1.5B's shape (28 layers, d_model 1536, 12 query / 2 KV heads, d_mlp 8960,
# vocabulary 151,936; benchmarks/paper_scale.py's checkpoint builder, written once under the cache directory) and
# runs on it, each step under its own time limit:
#   1. env          GPUs, torch / transformers / vLLM versions                  (benchmarks/gpu_check.py env)
#   2. paper_scale  each analysis's heavy stage at T = 1024, memory above the weights (paper_scale.py --device cuda)
#   3. capture      interp capture vs a plain HF forward                         (benchmarks/capture_vs_hf.py)
#   4. generation   tokens/s: interp plain and head-ablated vs HF generate       (benchmarks/generation.py)
#   5. oom          a real out-of-memory error (GPU memory capped below one batch): backoff, same numbers
#   6. device_map   --device-map balanced over all GPUs (one GPU: {"": 0}) vs the model on cuda:0
#   7. vllm         a local `vllm serve` of the same checkpoint, tokens/s (only if `vllm` is importable)
#   8. 7B           Qwen2.5-7B's shape, forward and systematic_outliers at T = 1024, if GPU memory (>= 40 GiB),
#                   disk (>= 45 GiB free) and the time so far (< 150 s) allow; GPU_CHECK_7B=0/1 forces it
# then prints one table (benchmarks/gpu_check.py table). JSON per step, the logs and the table go to $OUT if set,
# else benchmarks/results/gpu_check_<time>/.
#
#   bash benchmarks/gpu_check.sh                 # the check (GPU machine)
#   bash benchmarks/gpu_check.sh --dry-run       # the same steps on the CPU with a tiny shape (about a minute)
#   bash benchmarks/gpu_check.sh --check-flags   # only: every piece accepts the options this script passes
#
# No GPU was lent while this was written: the --dry-run and --check-flags paths have run (CPU), the GPU path not.
set -uo pipefail

MODE=gpu
case "${1:-}" in
    --dry-run) MODE=dry ;;
    --check-flags) MODE=flags ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --check-flags]" >&2; exit 2 ;;
esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $MODE == dry ]]; then
    DIR="${OUT:-$(mktemp -d)}/gpu_check_dry"
    DEVICE=cpu; DTYPE=float32
    SHAPE=(--layers 2 --d-model 64 --heads 4 --kv-heads 2 --d-mlp 128 --vocab 1000)
    LABEL=tiny; LENGTH=64; CAP_BATCH=4; GEN=(--batch 4 --prompt 32 --new 8 --reps 1); ANALYSES=(forward systematic_outliers)
    EXTRA=(--in-process)
else
    DIR="${OUT:-$REPO/benchmarks/results}/gpu_check_$(date -u +%Y%m%d-%H%M%S)"
    DEVICE=cuda; DTYPE=bfloat16
    SHAPE=(--layers 28 --d-model 1536 --heads 12 --kv-heads 2 --d-mlp 8960 --vocab 151936)
    LABEL=1.5b; LENGTH=1024; CAP_BATCH=16; GEN=(--batch 16 --prompt 512 --new 128 --reps 2)
    ANALYSES=(forward systematic_outliers gated_attention refusal_cliff skill_unlearning instability talking_heads)
    EXTRA=()
fi
SHAPE_7B=(--layers 28 --d-model 3584 --heads 28 --kv-heads 4 --d-mlp 18944 --vocab 152064)
CACHE="${GPU_CHECK_CACHE:-${INTERP_CACHE:-$HOME/.cache/interp}/models/paper_scale}"
mkdir -p "$DIR"
START=$SECONDS
FAILED=0

# step NAME LIMIT_S COMMAND...: run it with a time limit, log to $DIR/NAME.log; --check-flags: check its options
step() {
    local name=$1 limit=$2; shift 2
    if [[ $MODE == flags ]]; then
        local help_cmd=() arg missing=()
        for arg in "$@"; do [[ $arg == --* ]] && break; help_cmd+=("$arg"); done
        local help; help="$("${help_cmd[@]}" --help 2>&1)" || { echo "FAIL $name: ${help_cmd[*]} --help"; FAILED=1; return; }
        for arg in "$@"; do
            [[ $arg == --* ]] && ! grep -q -- "${arg%%=*}" <<< "$help" && missing+=("$arg")
        done
        if ((${#missing[@]})); then echo "FAIL $name: not accepted: ${missing[*]}"; FAILED=1; else echo "ok   $name"; fi
        return
    fi
    echo "[$((SECONDS - START)) s] $name ..." >&2
    timeout --kill-after=10 "$limit" "$@" > "$DIR/$name.log" 2>&1
    local rc=$?
    if ((rc != 0)); then
        echo "  $name: exit $rc (see $DIR/$name.log)" >&2
        printf '{"piece": "%s", "status": "FAIL", "why": "exit %s, see %s.log"}\n' "$name" "$rc" "$name" \
            > "$DIR/${name}_failed.json"
        FAILED=1
    fi
}

ckpt_dir() {  # where paper_scale.py puts the checkpoint of a shape (its shape_key)
    "$PY" - "$@" <<'EOF'
import sys
sys.argv[0] = "paper_scale"
sys.path.insert(0, "benchmarks")
import argparse, paper_scale
p = argparse.ArgumentParser()
for o in ("--layers", "--d-model", "--heads", "--kv-heads", "--d-mlp", "--vocab"):
    p.add_argument(o, type=int)
print(paper_scale.shape_key(paper_scale.shape_of(p.parse_args(sys.argv[1:]))))
EOF
}

step env 60 "$PY" benchmarks/gpu_check.py env --out "$DIR/env.json"
step paper_scale 170 "$PY" benchmarks/paper_scale.py --device "$DEVICE" --dtype "$DTYPE" "${SHAPE[@]}" \
    --lengths "$LENGTH" --analyses "${ANALYSES[@]}" --no-write --timeout-s 60 --cache-dir "$CACHE" \
    --out "$DIR/paper_scale_$LABEL.json" "${EXTRA[@]}"
if [[ $MODE == flags ]]; then CKPT="$CACHE/shape"; else CKPT="$CACHE/$(ckpt_dir "${SHAPE[@]}")"; fi
step capture 60 "$PY" benchmarks/capture_vs_hf.py --model "$CKPT" --device "$DEVICE" --dtype "$DTYPE" \
    --batch "$CAP_BATCH" --seq "$LENGTH" --reps 3
[[ $MODE != flags ]] && "$PY" benchmarks/gpu_check.py capture-log "$DIR/capture.log" --out "$DIR/capture_vs_hf.json"
step generation 75 "$PY" benchmarks/generation.py --model "$CKPT" --device "$DEVICE" --dtype "$DTYPE" "${GEN[@]}" \
    --json "$DIR/generation_$LABEL.json"
step oom 60 "$PY" benchmarks/gpu_check.py oom --checkpoint "$CKPT" --device "$DEVICE" --dtype "$DTYPE" \
    --length "$LENGTH" --seqs $((CAP_BATCH * 2)) --out "$DIR/oom.json"
step device_map 60 "$PY" benchmarks/gpu_check.py device-map --checkpoint "$CKPT" --dtype "$DTYPE" \
    --length "$LENGTH" --out "$DIR/device_map.json"
step vllm 150 "$PY" benchmarks/gpu_check.py vllm --checkpoint "$CKPT" --length 512 --new 128 --requests 16 \
    --out "$DIR/vllm.json"

want_7b="${GPU_CHECK_7B:-auto}"
if [[ $want_7b == auto && $MODE == gpu ]]; then
    want_7b=0
    gib=$("$PY" -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))" 2>/dev/null)
    free=$(df -Pk "$CACHE" | awk 'NR == 2 {print int($4 / 1048576)}')
    ((${gib:-0} >= 40 && ${free:-0} >= 45 && SECONDS - START < 150)) && want_7b=1
    echo "7B: GPU ${gib:-?} GiB, disk ${free:-?} GiB free, $((SECONDS - START)) s so far -> $want_7b" >&2
fi
if [[ $want_7b == 1 || $MODE == flags ]]; then
    step paper_scale_7b 150 "$PY" benchmarks/paper_scale.py --device "$DEVICE" --dtype "$DTYPE" "${SHAPE_7B[@]}" \
        --lengths "$LENGTH" --analyses forward systematic_outliers --no-write --timeout-s 60 --cache-dir "$CACHE" \
        --out "$DIR/paper_scale_7b.json"
fi

if [[ $MODE == flags ]]; then
    step table 30 "$PY" benchmarks/gpu_check.py table "$DIR"
    exit $FAILED
fi
"$PY" benchmarks/gpu_check.py table "$DIR" | tee "$DIR/table.txt"
echo "total $((SECONDS - START)) s; JSON, logs and table.txt in $DIR"
exit $FAILED
