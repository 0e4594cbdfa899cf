#!/bin/bash
# The prompt family compared on lab:methods (issue 23; docs/methods.md): a SPoT library of the
# 10 lab sources, target task embeddings and retrieval, the MPT source stage, then `jaxprompt
# compare` of every method on the three targets where prompt tuning falls short of model tuning,
# 3 seeds, 300 steps, and a SPoT row (prompt tuning from the top-1 retrieved source).
#   bash benchmarks/methods_lab.sh [WORK]   # ~70 min on 2 cores; a rerun reuses the library,
#                                           # the embeddings and the MPT source run
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=3
W=$(realpath -m "${1:-runs/methods_lab}"); BIN=$(dirname "$(realpath "$0")")/../.venv/bin
[ -x "$BIN/jaxprompt" ] || BIN=$(dirname "$(command -v jaxprompt)")
J=$BIN/jaxprompt; PY=$BIN/python; HERE=$(dirname "$(realpath "$0")")
mkdir -p "$W"
SRC=lab_has_red,lab_has_blue,lab_count_colours,lab_count_animals,lab_parity_colours,lab_more_colours_than_animals,lab_more_animals_than_numbers,lab_majority,lab_first_word,lab_last_word
TARGETS="count_numbers minority more_numbers_than_colours"
cd "$W"
date
[ -f $W/library/index.json ] || $J spot sources --tasks $SRC --library $W/library --backbone lab:methods \
   --steps 600 --batch_size 80 --eval_period 100 --embedding_steps 500 --max_eval_examples 100
date
[ -d $W/emb ] || $J spot embed --tasks lab_count_numbers,lab_minority,lab_more_numbers_than_colours \
   --backbone lab:methods --out $W/emb --steps 500 --batch_size 24
for t in $TARGETS; do
  $J spot rank --target $W/emb/lab_$t.safetensors --library $W/library --k 3 --json > $W/rank_$t.json
done
date
[ -f $W/mpt/prompt_best.safetensors ] || W=$W $PY - <<'PYEOF'
import os
import jaxprompt
from jaxprompt.lab import register_lab_tasks
from jaxprompt.lab.spot_study import LAB_SOURCES
from jaxprompt.methods.spot import register_tasks_mixture
register_lab_tasks()
mix = register_tasks_mixture([f'lab_{t}' for t in LAB_SOURCES])
jaxprompt.tune(mix, backbone='lab:methods', model_dir=os.path.join(os.environ['W'], 'mpt'),
               method='multitask_prompt', train_steps=600, resume=True)
PYEOF
date
for t in $TARGETS; do
  best=$($PY -c "import json; print(json.load(open('$W/rank_$t.json'))['ranking'][0]['task'])")
  echo "$t: SPoT source $best"
  $J compare --methods prompt_tuning,p_tuning,residual_prompt,multitask_prompt,attempt,prefix_tuning,model_tuning \
    --task lab_$t --backbone lab:methods --seeds 0,1,2 --steps 300 \
    --set source_library=$W/library --set mpt_source=$W/mpt/prompt_best.safetensors \
    --work $W/compare_$t --json > $W/compare_$t.json
  $J compare --methods prompt_tuning --task lab_$t --backbone lab:methods --seeds 0,1,2 --steps 300 \
    --set init_from=$W/library:$best --work $W/spot_$t --json > $W/spot_$t.json
  date
done
$PY "$HERE/methods_table.py" "$W" "$HERE/results/xprompt_lab.json" | tee "$W/methods_table.md"
