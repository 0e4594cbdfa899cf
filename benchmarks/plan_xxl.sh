#!/usr/bin/env bash
# T5.1.1-XXL prompt tuning in the papers' SuperGLUE setting (batch 32, 512 inputs + 100 prompt
# tokens, 8 targets, bf16 activations), compiled ahead of time by `jaxprompt plan` for TPU
# topologies (libtpu's compiler, no TPU needed), one TPU chip (v5p-2, judged against an 80 GB
# budget) and one 80 GB H100 (XLA:GPU's compiler, no GPU needed: the gpu-plan extra): as the library holds the backbone by default (float32, no remat, unrolled
# layers) and with the frozen layers rematerialised, held in bfloat16 and scanned
# (remat_bf16_scan; remat_bf16 is the same unrolled, whose TPU compile took over 40 min here);
# remat_bf16_scan_fp32act is that with float32 activations, for comparison.
#   bash benchmarks/plan_xxl.sh [VARIANT:TARGET ...]      # default: every pair below, in order
# Writes benchmarks/results/plan_xxl_<variant>_<target>.{json,txt} (a pair already written is
# skipped). Each unrolled XXL train step takes 3-5 min to compile on 2 loaded cores; STEPS
# (default train) adds the eval step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
declare -A MESHES=([v3-8]=1x8,2x4,8x1 [v4-16]=1x8,2x4,4x2 [v3-32]=2x16,4x8 [v5p-2]=1x1 [h100]=1x1
                  [a100]=1x1)
declare -A FLAGS=([base]='--param_dtype float32 --remat_policy none'
                  [remat_bf16]='--param_dtype bfloat16 --remat_policy full'
                  [remat_bf16_scan]='--param_dtype bfloat16 --remat_policy full --scan_layers True'
                  [remat_bf16_scan_fp32act]='--param_dtype bfloat16 --remat_policy full
                                             --scan_layers True --dtype float32')
PAIRS=("$@")
[ ${#PAIRS[@]} -gt 0 ] || PAIRS=(remat_bf16_scan:v3-8 remat_bf16_scan:v5p-2 base:v5p-2 base:v3-8
                                 base:v4-16 base:v3-32 remat_bf16_scan:v4-16 remat_bf16_scan:v3-32
                                 remat_bf16_scan:h100 base:h100 remat_bf16_scan_fp32act:v3-8
                                 remat_bf16_scan_fp32act:h100)
for pair in "${PAIRS[@]}"; do
  variant=${pair%%:*} target=${pair#*:}
  name=benchmarks/results/plan_xxl_${variant}_${target}
  [ -e "$name.json" ] && continue
  budget=()
  [ "$target" = v5p-2 ] && budget=(--device_memory 80GB)
  # shellcheck disable=SC2086
  TF_CPP_MIN_LOG_LEVEL=3 $PY -m jaxprompt.cli plan --model models/t5_1_1/xxl.gin \
    --target "$target" --meshes "${MESHES[$target]}" --steps "${STEPS:-train}" \
    --batch_size 32 --inputs_length 512 --prompt_length 100 --targets_length 8 \
    --dtype bfloat16 ${FLAGS[$variant]} "${budget[@]}" --out "$name.json" 2>&1 \
    | grep -v -e '^WARNING' -e '^I0000' -e '^E0000' -e 'Source Location' -e 'libtpu_init' \
      -e 'Failed to find host' -e '^===' > "$name.txt"
done
