#!/usr/bin/env bash
# Every training run behind the documented results tables, with the exact commands, one after
# another, then their metrics (and per-image evaluation files) copied into
# benchmarks/results/runs/ and the figures into docs/figures/.
#
#   bash benchmarks/results_runs.sh RUNS_DIR [DATA_DIR] [PART ...]
#
# RUNS_DIR receives the runs; DATA_DIR holds frey_faces.npz (or frey_rawface.mat) for the Frey
# run (default: download it). PARTs (default: all): mnist gradvar qiw frey aiwae. (The AEVB
# reproduction's experiments, the autoencoder against the VAE among them, are
# benchmarks/reproduce.py paper003: docs/paper003.rst.)
# One thread per process (OMP_NUM_THREADS=1), as the results state; several hours on a CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="$(mkdir -p "$1" && cd "$1" && pwd)"; shift
DATA="${1:-}"; [ $# -gt 0 ] && shift
PARTS="${*:-mnist gradvar qiw frey aiwae}"
export OMP_NUM_THREADS=1
DEST="$ROOT/benchmarks/results/runs"
FIG="$ROOT/docs/figures"
mkdir -p "$DEST" "$FIG"
cd "$RUNS"
keep() {  # keep RUN NAME: the run's metrics under benchmarks/results/runs/NAME.*
  cp "$1/metrics.json" "$DEST/$2.metrics.json"
  cp "$1/metrics.jsonl" "$DEST/$2.metrics.jsonl"
}
want() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
log() { echo "=== $(date -u +%H:%M:%S) $*"; }

if want mnist; then
  log "IWAE and VAE, k = 5, 30 epochs"
  iwae-train --model iwae --k 5 --epochs 30 --batch-size 100 --lr 1e-3 --out iwae-k5
  iwae-train --model vae --k 5 --epochs 30 --batch-size 100 --lr 1e-3 --out vae-k5
  keep iwae-k5 iwae-k5; keep vae-k5 vae-k5
  # the same 10,000 test images, the same keyed draws: per-image L_5000 of both, for a paired difference
  for run in iwae-k5 vae-k5; do
    iwae-eval "$run" --k 5000 --seed 0 --per-point "$run-paired.pt" --no-progress > "$run-paired.json"
  done
  python - <<'PY'
import json, math, torch
a, b = (torch.load(f"{r}-paired.pt", weights_only=True)["log_likelihood"] for r in ("iwae-k5", "vae-k5"))
d = a - b
out = {"iwae_minus_vae": float(d.mean()), "stderr": float(d.std() / math.sqrt(d.numel())), "n": d.numel(),
       "iwae": float(a.mean()), "vae": float(b.mean()), "iwae_better_images": int((d > 0).sum())}
print(json.dumps(out))
json.dump(out, open("iwae-vae-paired.json", "w"), indent=1)
PY
  cp iwae-vae-paired.json "$DEST/iwae-vae-paired.json"
fi
if want gradvar; then
  log "encoder-gradient variance at k = 50"
  python "$ROOT/benchmarks/gradient_variance.py" iwae-k5 --k 50 --reps 200
fi
if want qiw; then
  log "q_IW: 2-D latent IWAE"
  iwae-train --model iwae --k 5 --latent-dim 2 --epochs 10 --seed 0 --eval-k 1000 --out iwae-2d
  iwae-eval iwae-2d --report iwae-2d-report --k 1000 --limit 1000
  keep iwae-2d iwae-2d
  cp iwae-2d-report/report.md "$DEST/iwae-2d-report.md"
  cp iwae-2d-report/metrics.json "$DEST/iwae-2d-report.metrics.json"
  cp iwae-2d-report/reconstructions.png "$FIG/qiw_reconstructions.png"
  python -c "import torch, iwae_ext; from iwae_ext import plots; m = iwae_ext.load_checkpoint('iwae-2d'); \
x = iwae_ext.data.load_dataset().split('test')[1]; \
plots.posterior_contours(m, x, '$FIG/qiw_posterior.png', generator=torch.Generator().manual_seed(0))"
fi
if want frey; then
  log "Frey Face, Gaussian decoder, 2-D latent"
  if [ -n "$DATA" ]; then src=(--data-dir "$DATA"); else src=(--download); fi
  iwae-train --dataset frey "${src[@]}" --model vae --latent-dim 2 --hidden 200 \
    --epochs 500 --batch-size 100 --lr 3e-3 --eval-k 1000 --out frey
  python -m iwae_ext.plots manifold frey --out "$FIG/frey_manifold.png"
  keep frey frey
fi
if want aiwae; then
  log "IWAE against AIWAE, K = 5, 20 epochs, AIS on 500 test images"
  iwae-train --model iwae --k 5 --epochs 20 --seed 0 --out iwae-k5-20ep
  iwae-train --model aiwae --k 5 --temps 5 --leapfrog 5 --epochs 20 --seed 0 --out aiwae-k5-t5
  for run in iwae-k5-20ep aiwae-k5-t5; do
    iwae-eval "$run" --k 5000 --limit 500 --ais --ais-temps 1000 --seed 0 --per-point "$run-per-image.pt" \
      --out "$run-eval"
    keep "$run" "$run"
    rm -rf "$DEST/$run-eval"; mkdir -p "$DEST/$run-eval"
    cp "$run-eval"/*.json "$run-eval"/*.jsonl "$DEST/$run-eval/"
  done
  python "$ROOT/benchmarks/compare_evals.py" iwae-k5-20ep-eval aiwae-k5-t5-eval --names IWAE AIWAE \
    --json "$ROOT/benchmarks/results/iwae-aiwae-paired.json"
fi
log "done"
