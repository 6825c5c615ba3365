#!/usr/bin/env bash
# The findings grid one cell per process (a fresh process returns each cell's heap to the OS), each under the
# shared CPU lock so no two torch jobs overlap; finished cells are skipped, so the script resumes where it stopped.
#   scripts/run_grid.sh OUT [MODELS] [SEEDS] [TASKS]
# Order: seed-major, so every task has a cell before any task has three.
set -euo pipefail
OUT=${1:?usage: scripts/run_grid.sh OUT [MODELS] [SEEDS] [TASKS]}
MODELS=${2:-gemma3-270m smollm2-135m}
SEEDS=${3:-0 1 2}
TASKS=${4:-vader-words vega-cars vader-movies vader-tweets vader-nyt vader-amazon}
MECHICL=${MECHICL:-.venv/bin/mechicl}
for model in $MODELS; do
  for seed in $SEEDS; do
    for task in $TASKS; do
      echo "[grid] $(date -u +%H:%M:%S) $model $task seed $seed"
      /usr/bin/time -f "[grid] wall %e s, peak RSS %M KB" flock /tmp/mechicl-cpu.lock \
        "$MECHICL" findings --config experiments/findings.toml --models "$model" --tasks "$task" \
        --seeds "$seed" --threads 1 --out "$OUT"
    done
  done
done
