"""Train the shipped 2D U-Net for the bone-implant phantom: tomoml_nb/weights/unet_bone_implant.pt.

    python scripts/train_unet.py                 # the shipped weights (deterministic; see the model card for time)
    python scripts/train_unet.py --steps 50 --out /tmp/unet.pt --quick   # a smoke run

Training data: six ``tomoml_nb.phantoms.bone_implant`` volumes (seeds 1-6, degradation
0.3-0.9, noise 0.015-0.03, metal screws, 96^3 and 128^3). Crops of 64 x 64 pixels are cut
from slices along z, y and x, so the network predicts along any axis. Validation during
training: a separate phantom (seed 500); after training the per-axis fusion weights are
fitted on it (``segment.fit_fusion_weights``, best mean IoU) and stored with the network.
Then the script evaluates on held-out phantoms (seeds 9001-9003 with their own degradation
seeds, never used above) and writes the model card ``unet_bone_implant.md`` next to the
weights. ``--from-weights FILE`` skips training and redoes only these post-training steps
on a network this script saved before. Checkpoints allow resuming an
interrupted run (``--resume``); the result is the same as an uninterrupted run only up to
the order of floating-point reductions.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tomoml_nb import metrics, phantoms, segment  # noqa: E402

TRAIN = [  # (shape, seed, degradation, noise)
    ((96, 96, 96), 1, 0.3, 0.02),
    ((96, 96, 96), 2, 0.5, 0.015),
    ((96, 96, 96), 3, 0.7, 0.025),
    ((96, 96, 96), 4, 0.9, 0.02),
    ((128, 128, 128), 5, 0.45, 0.03),
    ((128, 128, 128), 6, 0.8, 0.02),
]
VALIDATION = ((96, 96, 96), 500, 0.6, 0.02)
HELD_OUT = [  # (shape, seed, degradation, degradation_seed): different anatomy AND corrosion morphology
    ((128, 128, 128), 9001, 0.4, 71),
    ((128, 128, 128), 9002, 0.6, 72),
    ((128, 128, 128), 9003, 0.8, 73),
]
ARCH = dict(channels=(16, 32, 64, 128), num_res_units=1)
TRAINING = dict(patch_size=64, batch_size=8, lr=2e-3, weight_decay=1e-4, class_weights="auto", dice_weight=1.0,
                class_focus=0.5, augment=True, axes=("z", "y", "x"), val_every=250)


def make(shape, seed, degradation, noise=0.02, degradation_seed=None):
    return phantoms.bone_implant(shape, seed=seed, degradation=degradation, noise=noise,
                                 degradation_seed=degradation_seed)


def fit_fusion(net, val):
    per = {a: segment.predict_axis(val.image, net, a, progress=False) for a in "zyx"}
    return segment.fit_fusion_weights(per, val.labels)


def evaluate(net, progress=False):
    rows = []
    for shape, seed, deg, dseed in HELD_OUT:
        ph = make(shape, seed, deg, degradation_seed=dseed)
        per = {a: segment.predict_axis(ph.image, net, a, progress=progress) for a in "zyx"}
        res = {f"{a} only": metrics.iou_per_class(per[a].argmax(0), ph.labels, 5) for a in "zyx"}
        res["z+y+x, equal weights"] = metrics.iou_per_class(segment.fuse(per)[0], ph.labels, 5)
        res["z+y+x, fitted weights"] = metrics.iou_per_class(
            segment.fuse(per, weights=net.tomoml_config["fusion_weights"])[0], ph.labels, 5)
        rows.append((f"seed {seed}, degradation {deg}", res))
    return rows


def model_card(net, rows, seconds, steps, out, note=""):
    hist = net.tomoml_history
    val = hist.get("val") or []
    names = phantoms.BONE_CLASSES
    head = "| held-out phantom (128³) | prediction | " + " | ".join(names) + " | mean |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for name, res in rows:
        for kind, iou in res.items():
            lines.append(f"| {name} | {kind} | " + " | ".join(f"{v:.3f}" for v in iou) + f" | {np.nanmean(iou):.3f} |")
    kinds = list(rows[0][1])
    avg = {k: np.mean([res[k] for _, res in rows], 0) for k in kinds}
    summary = "\n".join(f"| {k} | " + " | ".join(f"{v:.3f}" for v in avg[k]) + f" | {np.nanmean(avg[k]):.3f} |"
                         for k in kinds)
    fw = net.tomoml_config.get("fusion_weights")
    n_params = sum(p.numel() for p in net.parameters())
    size_kb = out.stat().st_size / 1024
    train_list = "\n".join(f"  - shape {s}, seed {sd}, degradation {d}, noise {n}" for s, sd, d, n in TRAIN)
    held = "\n".join(f"  - shape {s}, seed {sd}, degradation {d}, degradation_seed {ds}" for s, sd, d, ds in HELD_OUT)
    return f"""# Model card: `unet_bone_implant.pt`

2D U-Net that segments slices of bone-implant SR-µCT volumes into five classes:
0 background, 1 soft tissue, 2 bone, 3 implant (metal screw), 4 degradation layer.
Load it with `tomoml_nb.segment.load_pretrained()` or `segment.predict(volume, "pretrained")`.

## Architecture
MONAI `UNet` (2D), channels {ARCH['channels']}, strides 2, {ARCH['num_res_units']} residual unit per level,
batch normalisation, PReLU; {n_params:,} parameters; file {size_kb:.0f} KB (float32 state dict + config).
Input: one grey slice normalised by the volume's 0.5-99.5 percentiles; output: 5 logits per pixel.
Any slice size works (padded to a multiple of 8 internally).

## Training data
Synthetic volumes from `tomoml_nb.phantoms.bone_implant` (metal screw, default blur 0.7,
phase contrast 0.4, cupping 0.06, rings 0.004, bone fraction 0.25):
{train_list}

Crops of {TRAINING['patch_size']}×{TRAINING['patch_size']} pixels from slices along z, y and x (one network for
every slicing direction), batch {TRAINING['batch_size']}, half of the crops centred on a pixel of a randomly chosen
class; augmentation: rotations by 90°, flips, grey-value gain ±10 %, offset ±0.05, Gaussian noise
σ ≤ 0.03. Loss: class-weighted cross-entropy (inverse square root of class frequency) + soft Dice.
AdamW, lr {TRAINING['lr']} with cosine decay, weight decay {TRAINING['weight_decay']}, {steps} steps, seed 0.
Validation during training (mean IoU on z-slices of a separate phantom, seed {VALIDATION[1]}):
{', '.join(f'step {s}: {v:.3f}' for s, v in val) or 'not run'}.

Made by `python scripts/train_unet.py` in {seconds / 60:.0f} min on {platform.processor() or platform.machine()}
(2 shared CPU cores, no GPU; torch {__import__('torch').__version__}).{note}

## Held-out evaluation
Phantoms never seen in training or validation (other anatomy seeds, own degradation
morphology seeds, larger volume):
{held}

{chr(10).join(lines)}

Mean over the three held-out phantoms:

| prediction | {' | '.join(names)} | mean |
|{'---|' * (len(names) + 2)}
{summary}

Fusion weights stored with the network (`config["fusion_weights"]`, used by
`segment.predict(..., weights="model")`, the default): {fw}, fitted for the best mean IoU on
the validation phantom (seed {VALIDATION[1]}), not on the held-out phantoms. z-slices (across
the screw axis) show the degradation layer best; y and x slices cut it obliquely, so with
equal weights the two weaker views dilute the best one on that class.
`benchmarks/segmentation.py` compares these with multi-Otsu thresholding and a random-forest
pixel classifier on the same volumes.

## Limitations
- Trained on synthetic phantoms only. Real scans differ in texture, noise, artefacts and class
  contrast; expect to fine-tune (`segment.train_unet(..., model=net)`) or to use active
  learning (`tomoml_nb.active`) on a few annotated slices of your own data.
- Metal screws only: a polymer screw (`screw="polymer"`) is nearly as dark as soft tissue and
  is not recognised.
- The degradation layer is the weakest class (IoU well below the others): its boundary to
  bone and to fluid-filled pores is blurred and noisy even in the ground truth.
- Grey values are normalised per volume by percentiles, so a volume that is mostly one
  material (e.g. a crop of pure bone) is normalised differently from the training volumes.
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "tomoml_nb" / "weights" / "unet_bone_implant.pt")
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/tomoml_unet_bone_implant.ckpt"),
                    help="training checkpoint, written every 100 steps and deleted once the weights are saved; "
                         "a run without --resume refuses to replace one left by an interrupted run")
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="small volumes (smoke test of the script)")
    ap.add_argument("--from-weights", type=Path, default=None,
                    help="skip training: load this file (saved by this script) and redo the post-training steps")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    train = TRAIN if not args.quick else [((32, 32, 32), s, d, n) for _, s, d, n in TRAIN[:2]]
    vshape = VALIDATION[0] if not args.quick else (32, 32, 32)
    t0 = time.perf_counter()
    vols = [make(s, sd, d, n) for s, sd, d, n in train]
    val = make(vshape, *VALIDATION[1:])
    if args.from_weights is not None:
        net = segment.load_model(args.from_weights)
        seconds = float(net.tomoml_meta.get("seconds", float("nan")))
        steps = int(net.tomoml_config.get("steps", args.steps))
        net.tomoml_history.setdefault("loss", [])
    else:
        net = segment.train_unet([v.image for v in vols], [v.labels for v in vols], 5, steps=args.steps, seed=0,
                                 validation=(val.image, val.labels), class_names=list(phantoms.BONE_CLASSES),
                                 checkpoint=args.checkpoint, checkpoint_every=100, resume=args.resume,
                                 **ARCH, **{k: v for k, v in TRAINING.items()
                                            if not (args.quick and k == "patch_size")},
                                 **({"patch_size": 32} if args.quick else {}))
        seconds = time.perf_counter() - t0
        steps = args.steps
    net.tomoml_config["fusion_weights"] = fit_fusion(net, val)
    print("fusion weights (fitted on the validation phantom):", net.tomoml_config["fusion_weights"])
    out = segment.save_model(net, args.out, overwrite=True, script="scripts/train_unet.py", steps=steps,
                             seconds=round(seconds, 1))
    print(f"saved {out} ({out.stat().st_size / 1024:.0f} KB) after {seconds / 60:.1f} min")
    if args.from_weights is None:
        args.checkpoint.unlink(missing_ok=True)      # the run finished: nothing left to resume
    rows = evaluate(net) if not args.quick else []
    for name, res in rows:
        for kind, iou in res.items():
            print(f"{name}, {kind}: {np.round(iou, 3)} mean {np.nanmean(iou):.3f}")
    if not args.quick:
        note = ("" if args.from_weights is None else
                " The fusion weights, the held-out evaluation and this card were then redone with "
                "`--from-weights` on the trained network (no retraining).")
        card = model_card(net, rows, seconds, steps, out, note)
        out.with_suffix(".md").write_text(card)
        print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
