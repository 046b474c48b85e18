#!/usr/bin/env bash
# The warp study (docs/research/robust-steps.md), end to end:
#   1. studies/warp_fit.py for every family x solver x order, JOBS at a time, each into its own
#      OUTDIR/fits/FAMILY-SOLVER-oORDER.jsonl; a rerun skips the folds already there;
#   2. studies/warp_defaults.py: today's default steps where they are not one of the baselines (the
#      optimized table of `edm`) on the same held-out noises, into OUTDIR/defaults.jsonl;
#   3. studies/warp_judge.py on the three trained UNets, never fitted on, at once: digits-unet and
#      digits-cond-unet (guided) with the `linear` fits, patches-unet with the `scaled_linear` fits
#      (each UNet trained first when missing), into OUTDIR/judge.jsonl;
#   4. studies/warp_report.py on all of it into OUTDIR/report.md.
# Settings (environment): FAMILIES (the seven of studies/robust_fit.py's FAMILIES), SOLVERS
# ("unipc dpmpp"), ORDERS ("3 2"), JOBS (2: one per core; each fit runs on one thread), OUTDIR
# (build/warp), PYTHON (.venv/bin/python), FIT_ARGS and JUDGE_ARGS (more options for warp_fit.py and
# warp_judge.py, e.g. a quick run: FIT_ARGS="--train 4 --validation 4 --holdout 4 --maxiter 2").
# Run from the repository root:
#   bash studies/warp.sh                                    (make study-warp)
#   FAMILIES="edm flow-shift3" ORDERS=3 bash studies/warp.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
FAMILIES=${FAMILIES:-"scaled_linear linear edm flow-shift3 ddpm-cosine score-sde-vp flow-shift1"}
SOLVERS=${SOLVERS:-"unipc dpmpp"}
ORDERS=${ORDERS:-"3 2"}
JOBS=${JOBS:-2}
OUTDIR=${OUTDIR:-build/warp}
FIT_ARGS=${FIT_ARGS:-}
JUDGE_ARGS=${JUDGE_ARGS:-}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

mkdir -p "$OUTDIR/fits"
start=$(date +%s)
export PY OUTDIR FIT_ARGS
for o in $ORDERS; do for f in $FAMILIES; do for s in $SOLVERS; do echo "$f $s $o"; done; done; done |
  xargs -P "$JOBS" -L 1 sh -c \
    '"$PY" -m studies.warp_fit --family "$1" --solver "$2" --order "$3" --out "$OUTDIR/fits/$1-$2-o$3.jsonl" $FIT_ARGS' fit
echo "fits: $(( $(date +%s) - start )) s" >&2
touch "$OUTDIR/defaults.jsonl"
"$PY" -m studies.warp_defaults "$OUTDIR"/fits/*.jsonl --out "$OUTDIR/defaults.jsonl"

start=$(date +%s)
rm -f "$OUTDIR"/judge-*.jsonl "$OUTDIR/judge.jsonl"
judged=()
for pair in "linear digits-unet" "linear digits-cond-unet" "scaled_linear patches-unet"; do
  set -- $pair
  fits=("$OUTDIR"/fits/"$1"-*.jsonl)
  [ -e "${fits[0]}" ] || continue
  "$PY" -m studies.warp_judge --proxy "$2" --family "$1" "${fits[@]}" --out "$OUTDIR/judge-$2.jsonl" $JUDGE_ARGS &
  judged+=("$!")
done
for pid in "${judged[@]}"; do wait "$pid"; done
cat "$OUTDIR"/judge-*.jsonl > "$OUTDIR/judge.jsonl" 2>/dev/null || : > "$OUTDIR/judge.jsonl"
echo "judge: $(( $(date +%s) - start )) s" >&2

"$PY" -m studies.warp_report "$OUTDIR"/fits/*.jsonl --judge "$OUTDIR/judge.jsonl" \
  --defaults "$OUTDIR/defaults.jsonl" > "$OUTDIR/report.md"
echo "wrote $OUTDIR/report.md" >&2
