#!/usr/bin/env bash
# The ideal-denoiser evaluation of the optimized tables (--objective reference) at 4096 noises on a GPU
# (docs/research/evaluation-4096.md): writes OUTDIR/big_<preset>-<solver>.json (kept in docs/research/evaluation/gpu-4096/);
# 2 min of device time on one NVIDIA H200.
# SAMPLES, DEVICE (cuda) and OUTDIR ($OUT) may be set; run from the repository root with dmsteps importable:
#   OUTDIR=build/gpu-4096 bash studies/gpu_evaluate.sh
set -e
S=${SAMPLES:-4096}; D=${DEVICE:-cuda}; O=${OUTDIR:-$OUT}
for spec in "scaled_linear unipc" "scaled_linear dpmpp" "linear unipc" "edm unipc" "flow unipc" "squaredcos_cap_v2 unipc"; do
  set -- $spec; name=$1; solver=$2
  extra=""; [ "$name" = flow ] && extra="--shift 3"
  python3 -c "from studies.proxy_data import digits_mixture; from dmsteps_cli.mixtures import save_mixture; save_mixture(digits_mixture(0.05), '/tmp/d_$name.npz', schedule='$name')"
  python3 -m dmsteps_cli optimize --schedule $name --solver $solver $extra --objective reference --nfe 5..15 -q -o /tmp/t_$name-$solver.json
  /usr/bin/time -f "$name $solver: %e s" python3 -m dmsteps_cli evaluate -c /tmp/d_$name.npz -t /tmp/t_$name-$solver.json --samples $S --device $D -o $O/big_$name-$solver.json -q
done
