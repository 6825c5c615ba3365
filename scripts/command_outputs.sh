#!/usr/bin/env bash
# Run every analysis command on the cheap models (tiny/toy, organism-strong/organism), one thread each,
# into OUT-DIR. Run it on two checkouts and compare the CSVs byte for byte (refactors must not move a number):
#   scripts/command_outputs.sh /path/to/old-checkout /tmp/before
#   scripts/command_outputs.sh .                     /tmp/after
#   for f in $(cd /tmp/before && find . -name '*.csv'); do cmp -s /tmp/before/$f /tmp/after/$f || echo "DIFF $f"; done
# PYTHON defaults to this checkout's .venv. About 3 min on one core.
set -euo pipefail
SRC=$(cd "$1" && pwd); OUT=$2
PYTHON=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
M="env PYTHONPATH=$SRC $PYTHON -m mechicl.cli"
cd "$SRC"
rm -rf "$OUT"; mkdir -p "$OUT"
for spec in "tiny toy" "organism-strong organism"; do
  set -- $spec; m=$1; t=$2
  $M behavior --model $m --task $t --conditions default,random,flipped,arbitrary:a/b --k 8 --n-contexts 16 --threads 1 --out "$OUT/$m/behavior" > /dev/null
  for c in attention lens dla; do
    $M $c --model $m --task $t --n-contexts 8 --k 7 --k-min 2 --threads 1 --out "$OUT/$m/$c" > /dev/null
  done
  $M patch --model $m --task $t --kinds resid,attn_out,mlp_out,head_out,head_out_label,head_out_readout,head_v_label,head_pattern_label \
    --n-contexts 4 --k 5 --threads 1 --out "$OUT/$m/patch" > /dev/null
  $M patch --model $m --task $t --kinds head_out --last-m 2 --n-contexts 4 --k 5 --threads 1 --out "$OUT/$m/patch_lastm" > /dev/null
  $M heads --model $m --task $t --k 8 --n-screen 8 --n-eval 16 --n-control 5 --threads 1 --out "$OUT/$m/heads" > /dev/null
  $M attribute --model $m --task $t --n-contexts 4 --k 5 --steps 8 --threads 1 --out "$OUT/$m/attribute" > /dev/null
  $M circuit --model $m --task $t --k 5 --n-select 4 --n-eval 8 --threads 1 --out "$OUT/$m/circuit" > /dev/null
  $M aggregate --model $m --task $t --k 5 --n-select 4 --n-fit 8 --n-eval 8 --n-boot 50 --threads 1 --out "$OUT/$m/aggregate" > /dev/null
done
$M findings --models organism-strong --tasks organism --seeds 0 --k 8 --k-min 4 --n-screen 4 --n-confirm 4 --n-validate 8 \
  --n-candidates 4 --n-top 2 --n-control 2 --threads 1 --out "$OUT/findings" > /dev/null
$M run experiments/nh3_label_switch.toml --model organism-strong --task organism --n-contexts 8 --threads 1 --out "$OUT/run_nh3" > /dev/null
echo "wrote $(find "$OUT" -name '*.csv' | wc -l) CSVs to $OUT"
