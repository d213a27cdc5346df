"""Train the shipped mixed-scale dense (MSD) denoisers for bone-implant micro-CT slices.

Writes ``tomoml_nb/weights/msd_bone_implant.pt`` (supervised: low-dose FBP -> ground truth)
and ``tomoml_nb/weights/msd_n2i_bone_implant.pt`` (Noise2Inverse, K=2: trained on the same
low-dose scans *without* their ground truth), each with a JSON summary beside it used for
the model card (``tomoml_nb/weights/msd_*.md``).

Data (all synthetic, deterministic): ``phantoms.bone_implant((16, 128, 128), seed=s,
noise=0, rings=0, degradation=d)`` for training seeds 100-105 (degradation 0.2/0.5/0.8),
scanned with ``denoise.simulate_low_dose`` (360 angles over 180 degrees, peak line
integral 2) at flux 500 / 1000 / 2000 counts per pixel (two volumes each). Validation:
seed 200, flux 1000. The benchmark (benchmarks/denoise_phase.py) tests on seeds 10-11,
which no script here touches.

Usage (the shipped weights were made with the first two commands, run for each model in
parallel; see the model cards for times)::

    python scripts/train_msd.py --steps 1000        # both models from scratch
    python scripts/train_msd.py --steps 1500 --init # continue both (warm restart)
    python scripts/train_msd.py --which supervised --steps 3000
    python scripts/train_msd.py --quick             # 30 steps, writes to /tmp, for testing the script

A deeper network trained longer on a GPU (the published MSD networks have 100+ layers)::

    python scripts/train_msd.py --which supervised --depth 100 --steps 6000 --batch 16 \
        --extra-train 12 --device cuda --budget-s 400 --name msd_deep_bone_implant

A 2.5D network that also reads one slice above and one below, started from the 100-layer
single-slice weights (the new input channels start with zero weights, so training starts at
the 2D network's quality)::

    python scripts/train_msd.py --which supervised --depth 100 --context 1 \
        --widen-from msd_deep_bone_implant --steps 500 --batch 16 --lr 5e-4 --extra-train 12 \
        --name msd_deep25d_bone_implant

and the same with two slices on each side, started from that 2.5D network (its weights for the
+-1 neighbours are kept, the +-2 channels start at zero)::

    python scripts/train_msd.py --which supervised --depth 100 --context 2 \
        --widen-from msd_deep25d_bone_implant --steps 600 --batch 16 --lr 5e-4 --extra-train 12 \
        --budget-s 5000 --name msd_deep25d2_bone_implant

continued (the shipped weights: runs 2-4 of its model card, each ``--init`` from the last; run 4
weights the extra scans to the hardest dose and selects on the flux-500 validation scan)::

    python scripts/train_msd.py --which supervised --depth 100 --context 2 --init --steps 600 \
        --batch 16 --lr 2e-4 --extra-train 24 --extra-flux 500 500 1000 2000 --val-flux 500 \
        --keep-best --budget-s 6000 --name msd_deep25d2_bone_implant --out DIR
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tomoml_nb import denoise as dn
from tomoml_nb.phantoms import bone_implant

WEIGHTS = Path(__file__).resolve().parents[1] / "tomoml_nb" / "weights"
TRAIN = [(100, 0.2, 500.0), (101, 0.5, 1000.0), (102, 0.8, 2000.0),
         (103, 0.5, 500.0), (104, 0.8, 1000.0), (105, 0.2, 2000.0)]
VAL = (200, 0.5, 1000.0)
SHAPE = (16, 128, 128)


def scan(seed, degradation, flux):
    vol = bone_implant(SHAPE, seed=seed, noise=0.0, rings=0.0, degradation=degradation).image
    return dn.simulate_low_dose(vol, n_angles=360, flux=flux, seed=seed + 7)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", choices=("supervised", "n2i", "both"), default="both")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--depth", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="30 steps, output to /tmp/tomoml_msd_quick")
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    ap.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda'")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop each model's training after this many seconds (wall clock); the cosine schedule "
                         "anneals over this budget when it ends before --steps")
    ap.add_argument("--keep-best", action="store_true",
                    help="save the supervised weights of the best validation MSE (checked five times per run and "
                         "at the end) instead of the last ones")
    ap.add_argument("--batch", type=int, default=4, help="patches per step")
    ap.add_argument("--patch", type=int, default=64, help="square patch size")
    ap.add_argument("--extra-train", type=int, default=0,
                    help="this many more training scans (seeds 106..., degradation and flux cycling)")
    ap.add_argument("--extra-flux", type=float, nargs="+", default=[500.0, 1000.0, 2000.0],
                    help="fluxes the --extra-train scans cycle through (repeat a value to weight it, e.g. "
                         "500 500 1000 2000 for more low-dose scans)")
    ap.add_argument("--val-flux", type=float, default=VAL[2],
                    help="flux of the validation scan (seed 200) that --keep-best selects on")
    ap.add_argument("--name", default="msd_bone_implant",
                    help="file stem of the supervised model (msd_deep_bone_implant for the 100-layer GPU model)")
    ap.add_argument("--init", action="store_true",
                    help="continue from the weights already in --out (a warm restart of the cosine schedule)")
    ap.add_argument("--context", type=int, default=0,
                    help="neighbouring slices on each side given to the supervised network (2.5D); 0 = 2D")
    ap.add_argument("--widen-from", default=None,
                    help="start the supervised network from this model with less context (a shipped name or a "
                         ".pt file) widened to --context (denoise.with_context)")
    ap.add_argument("--lr", type=float, default=2e-3,
                    help="peak learning rate of the cosine schedule (supervised model); lower it to continue "
                         "trained weights without undoing them")
    args = ap.parse_args(argv)
    steps = 30 if args.quick else args.steps
    out_dir = Path("/tmp/tomoml_msd_quick") if args.quick else args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    fluxes = args.extra_flux
    extra = [(106 + i, (0.2, 0.5, 0.8)[i % 3], fluxes[(i // 3) % len(fluxes)]) for i in range(args.extra_train)]
    train = [scan(*p) for p in TRAIN + extra]
    val = scan(VAL[0], VAL[1], args.val_flux)
    print(f"simulated {len(train)} training scans in {time.perf_counter() - t0:.0f} s", flush=True)
    mask = val["mask"]
    base = dn.evaluate(val["reconstruction"], val["truth"], mask=mask)

    if args.which in ("supervised", "both"):
        X = [d["reconstruction"] for d in train]          # one volume per scan: neighbours stay in their scan
        Y = [d["truth"] for d in train]
        t = time.perf_counter()
        init = dn.Denoiser.load(out_dir / f"{args.name}.pt") if args.init else None
        if args.widen_from and not args.init:
            init = dn.with_context(args.widen_from, args.context)
        every = 1 if args.context else 4                    # 2.5D validation needs contiguous slices
        model = dn.train_supervised(X, Y, model=init, context=args.context, depth=args.depth, steps=steps,
                                    seed=args.seed, lr=args.lr, batch=args.batch, patch=args.patch,
                                    device=args.device, time_limit=args.budget_s, progress=False,
                                    keep_best=args.keep_best,
                                    validation=(val["reconstruction"][::every], val["truth"][::every]))
        secs = time.perf_counter() - t
        m = dn.evaluate(model(val["reconstruction"], progress=False), val["truth"], mask=mask)
        model.info.update(train_seconds=round(secs, 1), val_psnr=round(m["psnr"], 2), val_ssim=round(m["ssim"], 4))
        model.save(out_dir / f"{args.name}.pt", overwrite=True)
        summary = {"strategy": "supervised", "steps": int(model.history.get("steps", steps)), "batch": args.batch,
                   "n_train_scans": len(train), "device": str(args.device), "init": args.init, "depth": args.depth,
                   "context": args.context, "widen_from": args.widen_from, "lr": args.lr, "seconds": round(secs, 1),
                   "budget_s": args.budget_s, "keep_best": args.keep_best, "best": model.history.get("best"),
                   "extra_flux": fluxes, "val_flux": args.val_flux,
                   "val_history": model.history.get("val"),
                   "val_fbp": base, "val": m, "final_loss": float(np.mean(model.history["loss"][-50:]))}
        (out_dir / f"{args.name}.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary), flush=True)

    if args.which in ("n2i", "both"):
        # stack every training scan's projections as extra detector rows: one Noise2Inverse run,
        # no ground truth involved
        P = np.concatenate([d["projections"] for d in train], axis=1)
        t = time.perf_counter()
        init = dn.Denoiser.load(out_dir / "msd_n2i_bone_implant.pt") if args.init else None
        _, model = dn.noise2inverse(P, train[0]["angles"], 2, model=init, depth=args.depth, steps=steps,
                                    seed=args.seed, return_model=True, device=args.device)
        secs = time.perf_counter() - t
        subs = dn.split_reconstructions(val["projections"], val["angles"], 2)
        pred = np.mean([model(subs[1 - j], progress=False) for j in range(2)], axis=0)
        m = dn.evaluate(pred, val["truth"], mask=mask)
        model.info.update(train_seconds=round(secs, 1), val_psnr=round(m["psnr"], 2), val_ssim=round(m["ssim"], 4))
        model.save(out_dir / "msd_n2i_bone_implant.pt", overwrite=True)
        summary = {"strategy": "noise2inverse K=2", "steps": steps, "init": args.init, "depth": args.depth, "seconds": round(secs, 1),
                   "val_fbp": base, "val": m, "final_loss": float(np.mean(model.history["loss"][-50:]))}
        (out_dir / "msd_n2i_bone_implant.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
