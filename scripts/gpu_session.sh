#!/usr/bin/env bash
# Continue the three under-trained networks side by side in ONE call on a lent GPU machine.
#
#   OUT=/path/to/outputs BUDGET=480 bash scripts/gpu_session.sh
#   OUT=/tmp/gs DEVICE=cpu BUDGET=60 bash scripts/gpu_session.sh     # a smoke run of the commands on a CPU
#
# Each job is the training script's own command, started from the shipped weights (--init) and
# stopped by its wall-clock budget (data generation included). Each saves its best-by-validation
# weights (train_msd.py with --keep-best; its cosine schedule anneals over the budget when the budget
# ends before --steps). Three jobs share the GPU: more made every job 3-5x slower when this was
# measured. Afterwards copy $OUT/<name>.pt over tomoml_nb/weights/<name>.pt ONLY if its
# validation figure (in <name>.pt.json / <name>.json and the log) beats the shipped one, re-run
# the benchmark on the CPU and update the model card.
#
# Needs on the GPU machine: python3 with torch (CUDA), numpy, scipy, scikit-image, tqdm, pyyaml,
# tifffile; the real concrete textures for VolRAFT in $DATA_DIR (concrete_*.tif; default
# .gpu_data). Jobs:
#   embedseg_fibres   scripts/train_embedseg.py  (validation AP@0.5 of tiled inference, seed 900)
#   volraft_synthetic scripts/train_volraft.py   (validation EPE; also re-chooses inference_iters)
#   msd_deep25d2      scripts/train_msd.py       (validation PSNR, seed 200: the 100-layer 2.5D network that reads
#                     two slices on each side, the best denoiser so far; cosine schedule restarted at a quarter
#                     of the original peak rate: a restart at 2e-3 undoes the trained weights first)
set -euo pipefail
OUT=${OUT:?set OUT to an output folder}
BUDGET=${BUDGET:-480}
DATA_DIR=${DATA_DIR:-.gpu_data}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
fi
export PYTHONPATH=.

"$PY" scripts/train_embedseg.py --device "$DEVICE" --budget-s "$BUDGET" \
    --init tomoml_nb/weights/embedseg_fibres.pt --out "$OUT/embedseg_fibres.pt" > "$OUT/embedseg.log" 2>&1 &
"$PY" scripts/train_volraft.py --device "$DEVICE" --budget-s "$BUDGET" --data-dir "$DATA_DIR" --curriculum 0 \
    --init tomoml_nb/weights/volraft_synthetic.pt --out "$OUT/volraft_synthetic.pt" > "$OUT/volraft.log" 2>&1 &
cp tomoml_nb/weights/msd_deep25d2_bone_implant.pt "$OUT/"      # train_msd.py --init continues from --out
"$PY" scripts/train_msd.py --which supervised --depth 100 --context 2 --steps 1500 --batch 16 --extra-train 12 \
    --lr 5e-4 --device "$DEVICE" --budget-s "$BUDGET" --init --keep-best --name msd_deep25d2_bone_implant --out "$OUT" \
    > "$OUT/msd.log" 2>&1 &

status=0
for job in $(jobs -p); do
    wait "$job" || status=1
done
tail -n 3 "$OUT"/*.log
exit $status
