#!/usr/bin/env bash
# refine on the class-conditional digits UNet with and without classifier-free guidance
# (docs/research/evaluation-guided.md): for each guidance scale, `dmsteps refine` from the paper's optimized
# table for `linear` betas over the classes 0-9, then `dmsteps evaluate` of the refined table against
# the four hand-made grids on the held-out noises; then studies/guided_report.py prints the tables.
# Writes OUTDIR/linear-opt.json, OUTDIR/guided-g{G}-refined.json, OUTDIR/guided-g{G}-eval.json, their
# logs and OUTDIR/report.md (kept as docs/research/evaluation/guided-g{G}-*.json).
# Trains build/digits-cond-model first when it is missing (`make digits-cond-model`).
# Settings (environment): SCALES ("1 3"), NFE (5..8), MAXITER (20), PATIENCE (30), TRAIN (32),
# VALIDATION (32), HOLDOUT (128), OUTDIR (build/guided), PYTHON (.venv/bin/python), MODEL. The defaults
# are the run the document reports, cut down from refine's defaults (64/64/256 noises, 60
# iterations) and from NFE 5..10 to fit a shared 2-core CPU. Its second run, 60 iterations where
# the first stopped at 20:
#   MAXITER=60 SCALES=1 OUTDIR=build/guided-m60 bash studies/guided.sh
#   MAXITER=60 SCALES=3 NFE=6,7 OUTDIR=build/guided-m60-g3 bash studies/guided.sh
# Run from the repository root:
#   bash studies/guided.sh                      (make study-guided)
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-build/digits-cond-model}
OUTDIR=${OUTDIR:-build/guided}
SCALES=${SCALES:-"1 3"}
NFE=${NFE:-5..8}
MAXITER=${MAXITER:-20}
PATIENCE=${PATIENCE:-30}
TRAIN=${TRAIN:-32}
VALIDATION=${VALIDATION:-32}
HOLDOUT=${HOLDOUT:-128}
LABELS=0..9

test -d "$MODEL/unet" || "$PY" -m studies.train_digits --out "$MODEL" --class-conditional
mkdir -p "$OUTDIR"
"$PY" -m dmsteps_cli optimize --schedule linear --nfe "$NFE" --solver unipc --objective reference -q \
  -o "$OUTDIR/linear-opt.json"
for g in $SCALES; do
  start=$(date +%s)
  "$PY" -m dmsteps_cli refine -c "$MODEL" -t "$OUTDIR/linear-opt.json" --nfe "$NFE" \
    --class-labels $LABELS --guidance-scale "$g" --maxiter "$MAXITER" --patience "$PATIENCE" \
    --train "$TRAIN" --validation "$VALIDATION" --holdout "$HOLDOUT" \
    -o "$OUTDIR/guided-g$g-refined.json" 2> "$OUTDIR/guided-g$g-refine.log"
  mid=$(date +%s)
  "$PY" -m dmsteps_cli evaluate -c "$MODEL" -t "$OUTDIR/guided-g$g-refined.json" --nfe "$NFE" \
    --class-labels $LABELS --guidance-scale "$g" --samples "$HOLDOUT" \
    -o "$OUTDIR/guided-g$g-eval.json" 2> "$OUTDIR/guided-g$g-eval.log"
  end=$(date +%s)
  echo "guidance $g: refine $((mid - start)) s, evaluate $((end - mid)) s" | tee -a "$OUTDIR/times.txt"
done
"$PY" -m studies.guided_report "$OUTDIR" | tee "$OUTDIR/report.md"
