"""Semantic segmentation and active learning on held-out bone-implant phantoms.

    python benchmarks/segmentation.py           # full run (see the results file for its duration)
    python benchmarks/segmentation.py --quick   # small volumes, one active-learning repeat

Measures, side by side in one run:

1. per-class IoU on held-out phantoms (anatomy seeds and corrosion-morphology seeds never
   used for training) for multi-Otsu thresholds, a random-forest pixel classifier on 3D
   filter features, and the shipped 2D U-Net along z, y, x and fused (mean, geometric,
   majority); training and inference seconds;
2. the time of a three-axis U-Net prediction of a 256^3 volume on this machine;
3. active learning: mean IoU on a held-out phantom against the number of annotated slices,
   uncertainty (entropy) sampling vs random sampling, from scratch, with a ground-truth oracle.

Writes ``benchmarks/results/segmentation.md`` and prints it.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tomoml_nb import active, metrics, phantoms, segment  # noqa: E402

NAMES = list(phantoms.BONE_CLASSES)
# held-out phantoms: seeds used neither by scripts/train_unet.py (1-6, 500, 9001-9003) nor by the notebooks
HELD_OUT = [((128, 128, 128), 7001, 0.4, 81), ((128, 128, 128), 7002, 0.6, 82), ((128, 128, 128), 7003, 0.8, 83)]
TRAIN_CLASSICAL = ((96, 96, 96), 1, 0.3)   # the classical methods learn from U-Net training phantom 1
SPEED_SHAPE = (256, 256, 256)
# active learning: settings (network size, steps per round, axis balancing) were chosen on a development pair
# of phantoms (seeds 7101/7102); the benchmark runs on a fresh pair
AL = dict(pool=((96, 96, 96), 7111, 0.6), eval=((96, 96, 96), 7112, 0.6, 93), rounds=12, repeats=3,
          steps_per_round=150, stride=4, target=0.9)


def phantom(shape, seed, degradation, degradation_seed=None):
    return phantoms.bone_implant(shape, seed=seed, degradation=degradation, degradation_seed=degradation_seed)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def fmt_row(name, iou, extra=()):
    return "| " + " | ".join([name] + [f"{v:.3f}" for v in iou] + [f"**{np.nanmean(iou):.3f}**"]
                             + [str(e) for e in extra]) + " |"


def accuracy(held_out, quick):
    """Per-class IoU of every method on every held-out phantom."""
    shape, s, d = TRAIN_CLASSICAL
    if quick:
        shape = (48, 48, 48)
    train = phantom(shape, s, d)
    order = segment.intensity_order(train.image, train.labels)
    rf, rf_train_s = timed(segment.train_pixel_classifier, train.image, train.labels, 5,
                           n_samples=40000 if not quick else 5000, n_estimators=50 if not quick else 10, seed=0)
    net = segment.load_pretrained()
    unet_train_s = float(getattr(net, "tomoml_meta", {}).get("seconds", float("nan")))
    fw = net.tomoml_config.get("fusion_weights")
    fusions = {"U-Net fused (mean)": ("mean", fw), "U-Net fused (mean, equal weights)": ("mean", None),
               "U-Net fused (geometric)": ("geometric", fw), "U-Net fused (majority)": ("majority", fw)}
    methods = ["multi-Otsu", "random forest", "U-Net z", "U-Net y", "U-Net x", *fusions]
    iou = {m: [] for m in methods}
    secs = {m: [] for m in methods}
    for shp, seed, deg, dseed in held_out:
        ph = phantom(shp, seed, deg, dseed)
        (lab, _), t = timed(segment.threshold_segment, ph.image, 5, class_order=order)
        iou["multi-Otsu"].append(metrics.iou_per_class(lab, ph.labels, 5)); secs["multi-Otsu"].append(t)
        (lab, _), t = timed(segment.predict_pixel_classifier, ph.image, rf, progress=False)
        iou["random forest"].append(metrics.iou_per_class(lab, ph.labels, 5)); secs["random forest"].append(t)
        per = {}
        for a in "zyx":
            per[a], t = timed(segment.predict_axis, ph.image, net, a, progress=False)
            iou[f"U-Net {a}"].append(metrics.iou_per_class(per[a].argmax(0), ph.labels, 5))
            secs[f"U-Net {a}"].append(t)
        t_axes = sum(secs[f"U-Net {a}"][-1] for a in "zyx")
        for name, (rule, weights) in fusions.items():
            (lab, _), t = timed(segment.fuse, per, rule, weights)
            iou[name].append(metrics.iou_per_class(lab, ph.labels, 5))
            secs[name].append(t_axes + t)
    train_s = {"multi-Otsu": 0.0, "random forest": rf_train_s}
    train_s.update({m: unet_train_s for m in methods if m.startswith("U-Net")})
    return methods, iou, secs, train_s, fw


def speed(quick):
    net = segment.load_pretrained()
    ph = phantom(SPEED_SHAPE, 7201, 0.6, 92)
    times = []
    for _ in range(1 if quick else 2):
        (lab, _), t = timed(segment.predict, ph.image, net, ("z", "y", "x"), progress=False)
        times.append(t)
    return float(np.median(times)), len(times), float(np.nanmean(metrics.iou_per_class(lab, ph.labels, 5)))


def active_learning(quick):
    (pshape, pseed, pdeg) = AL["pool"]
    (eshape, eseed, edeg, edseed) = AL["eval"]
    rounds, repeats, steps = AL["rounds"], AL["repeats"], AL["steps_per_round"]
    if quick:
        pshape = eshape = (48, 48, 48)
        rounds, repeats, steps = 4, 1, 20
    pool = phantom(pshape, pseed, pdeg)
    ev = phantom(eshape, eseed, edeg, edseed)
    # how informative is a random pool slice? share of pool slices showing each class
    shows = []
    for a in range(3):
        for i in range(AL["stride"] // 2, pool.labels.shape[a], AL["stride"]):
            sl = np.take(pool.labels, i, axis=a)
            shows.append(np.bincount(sl.ravel(), minlength=5) > 0)
    share = np.mean(shows, 0)
    results = {"_share": share}
    for strategy in ("entropy", "random"):
        results[strategy] = []
        results[strategy + "_deg"] = []
        for r in range(repeats):
            res = active.run_active_learning(pool.image, pool.labels, strategy=strategy, n_rounds=rounds,
                                             eval_image=ev.image, eval_labels=ev.labels, seed=r,
                                             steps_per_round=steps, stride=AL["stride"], progress=False)
            res.pop("learner")
            results[strategy].append(res)
            results[strategy + "_deg"].append([v[4] for v in res["iou_per_class"]])
            print(f"  {strategy} seed {r}: " + " ".join(f"{v:.3f}" for v in res["mean_iou"]), flush=True)
    return results, dict(pool=pshape, eval=eshape, rounds=rounds, repeats=repeats, steps=steps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-active", action="store_true", help="skip the active-learning part")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    held_out = HELD_OUT if not args.quick else [((64, 64, 64), 7001, 0.6, 81)]
    print("accuracy on held-out phantoms ...", flush=True)
    methods, iou, secs, train_s, fw = accuracy(held_out, args.quick)
    print("256^3 speed ...", flush=True)
    t256, n256, iou256 = speed(args.quick)
    al = None
    if not args.skip_active:
        print("active learning ...", flush=True)
        al, al_cfg = active_learning(args.quick)

    import torch

    L = ["## Semantic segmentation (issue 5)", ""]
    L += [f"Run: `python benchmarks/segmentation.py{' --quick' if args.quick else ''}` on "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared), "
          f"GPU: {'yes' if torch.cuda.is_available() else 'none'}, torch {torch.__version__}; "
          f"total {(time.perf_counter() - t_all) / 60:.1f} min.", ""]
    L += ["**Held-out data.** " + "; ".join(f"`bone_implant({s[0]}³, seed={sd}, degradation={d}, "
                                            f"degradation_seed={ds})`" for s, sd, d, ds in held_out)
          + ". None of these anatomy or corrosion seeds was used to train the shipped U-Net (seeds 1–6, "
            "validation 500) or the classical methods (phantom seed 1). Thresholds' class order and the "
            "random forest (3D features σ 0.7–4, 50 trees, 40 000 class-balanced voxels) are fitted on "
            "training phantom 1; the U-Net is `tomoml_nb/weights/unet_bone_implant.pt`. \"Fused\" rows use the "
            f"per-axis weights stored with the network ({fw}), fitted on the training run's validation phantom "
            "(seed 500) — never on these volumes; the equal-weight row is plain soft voting.", ""]
    L += ["### Per-class IoU (mean over the held-out phantoms)", "",
          "| method | " + " | ".join(NAMES) + " | mean IoU | train s | inference s / volume (median) |",
          "|" + "---|" * (len(NAMES) + 4)]
    for m in methods:
        tr = train_s[m]
        tr_txt = "0" if tr == 0 else ("n/a" if not np.isfinite(tr) else f"{tr:.0f}")
        if m.startswith("U-Net") and np.isfinite(tr):
            tr_txt += " (shipped run)"
        L.append(fmt_row(m, np.mean(iou[m], 0), (tr_txt, f"{np.median(secs[m]):.1f}")))
    L += ["", "Degradation-layer IoU per held-out phantom:", "",
          "| phantom | multi-Otsu | random forest | U-Net z | U-Net y | U-Net x | U-Net fused (mean, equal weights) "
          "| U-Net fused (mean) |", "|---|---|---|---|---|---|---|---|"]
    for k, (s, sd, d, ds) in enumerate(held_out):
        L.append(f"| seed {sd}, degradation {d} | " + " | ".join(
            f"{iou[m][k][4]:.3f}" for m in ("multi-Otsu", "random forest", "U-Net z", "U-Net y", "U-Net x",
                                            "U-Net fused (mean, equal weights)", "U-Net fused (mean)")) + " |")
    L.append("")

    # ---- targets
    fused_mean = float(np.mean([np.nanmean(v) for v in iou["U-Net fused (mean)"]]))
    deg_fused = float(np.mean([v[4] for v in iou["U-Net fused (mean)"]]))
    deg_equal = float(np.mean([v[4] for v in iou["U-Net fused (mean, equal weights)"]]))
    deg_single = {a: float(np.mean([v[4] for v in iou[f"U-Net {a}"]])) for a in "zyx"}
    best_single = max(deg_single.values())
    wins = sum(iou["U-Net fused (mean)"][k][4] > max(iou[f"U-Net {a}"][k][4] for a in "zyx")
               for k in range(len(held_out)))
    L += ["### Targets", ""]
    L.append(f"- Mean IoU ≥ 0.9 on held-out phantoms (U-Net, three axes fused): **{fused_mean:.3f}** — "
             f"**{'MET' if fused_mean >= 0.9 else 'NOT MET'}**.")
    L.append(f"- Multi-axis fusion beats single axis on the degradation layer: fused {deg_fused:.3f} vs best "
             f"single axis {best_single:.3f} (z {deg_single['z']:.3f}, y {deg_single['y']:.3f}, "
             f"x {deg_single['x']:.3f}); fused beats every single axis on {wins} of {len(held_out)} phantoms — "
             f"**{'MET' if deg_fused > best_single else 'NOT MET'}** with the validation-fitted weights. With equal "
             f"weights (plain soft voting) the degradation IoU is {deg_equal:.3f}, "
             + ("also above the best single axis." if deg_equal > best_single else
                "not above the best single axis: the y and x views of the layer are weaker than z and dilute it "
                "(equal-weight fusion still gains on the other classes)."))
    L.append(f"- 256³ volume, three-axis prediction on CPU in under a minute: **{t256:.1f} s** (median of {n256}; "
             f"mean IoU on that phantom {iou256:.3f}) — **{'MET' if t256 < 60 else 'NOT MET'}**.")
    if al is not None:
        target = AL["target"]
        share = al.pop("_share")
        deg_curves = {s: np.mean(al.pop(s + "_deg"), 0) for s in ("entropy", "random")}
        mean_curve = {s: np.mean([r["mean_iou"] for r in runs], 0) for s, runs in al.items()}
        x = np.asarray(al["random"][0]["n_annotated"])
        rand_final = float(mean_curve["random"][-1])
        reach = np.flatnonzero(mean_curve["entropy"] >= rand_final)
        n_unc = int(x[reach[0]]) if reach.size else None
        n_rand = int(x[-1])
        to_target = {s: (int(x[np.flatnonzero(c >= target)[0]]) if (c >= target).any() else None)
                     for s, c in mean_curve.items()}
        per_seed = {s: [active.annotations_to_reach(r, target) for r in runs] for s, runs in al.items()}
        ok = n_unc is not None and n_unc <= n_rand / 2
        L.append(f"- Uncertainty sampling reaches the random-sampling final IoU ({rand_final:.3f} after "
                 f"{n_rand} slices) with ≤ half of the annotations: entropy sampling reaches it after "
                 f"**{n_unc if n_unc is not None else f'more than {n_rand}'}** slices — "
                 f"**{'MET' if ok else 'NOT MET'}**.")
        L += ["", "### Active learning", "",
              f"Pool: `bone_implant({al_cfg['pool'][0]}³, seed={AL['pool'][1]})`; IoU measured on held-out "
              f"`bone_implant({al_cfg['eval'][0]}³, seed={AL['eval'][1]}, degradation_seed={AL['eval'][3]})` with "
              f"three-axis fused prediction. From scratch (U-Net channels (16, 32, 64, 128)), one slice per round "
              f"from the pool (every {AL['stride']}th slice along z, y, x; each query from the axis with the fewest "
              f"annotations, for both strategies), {al_cfg['steps']} warm-start steps per round "
              f"({2 * al_cfg['steps']} in round 1), oracle = ground truth; mean over {al_cfg['repeats']} seeds "
              f"(the first slice is random and shared by both strategies for a given seed). These settings were "
              f"chosen on another pair of phantoms (seeds 7101/7102), not on these.", "",
              "| annotated slices | " + " | ".join(str(int(v)) for v in x) + " |",
              "|" + "---|" * (len(x) + 1)]
        for s, c in mean_curve.items():
            L.append(f"| {s} | " + " | ".join(f"{v:.3f}" for v in c) + " |")
        L += ["", "Annotated slices needed to reach mean IoU "
              f"{target}: " + "; ".join(
                  f"{s}: {to_target[s] if to_target[s] is not None else f'not reached in {n_rand}'}"
                  f" (per seed {per_seed[s]})" for s in mean_curve) + "."]
        L += ["", "Degradation-layer IoU (mean over seeds):", "",
              "| annotated slices | " + " | ".join(str(int(v)) for v in x) + " |", "|" + "---|" * (len(x) + 1)]
        for s, c in deg_curves.items():
            L.append(f"| {s} | " + " | ".join(f"{v:.3f}" for v in c) + " |")
        half = max(1, n_rand // 2)
        why = "**Why the ≤ half target is out of reach on this phantom.** " if not ok else "**Context.** "
        L += ["", why + "Share of the pool's candidate slices "
              "that show each class: " + ", ".join(f"{n} {100 * v:.0f} %" for n, v in zip(NAMES, share)) + ". "
              "The screw runs along z through most of the sample (its tip is drawn at 72–90 % of the depth) and "
              f"grows with the volume, so {100 * share[4]:.0f} % of the pool's slices already show the degradation "
              "layer (and nearly all show the three common classes); random sampling is at "
              f"{mean_curve['random'][half - 1]:.3f} after {half} slices, within "
              f"{mean_curve['random'][-1] - mean_curve['random'][half - 1]:.3f} of its final value, and both curves "
              "flatten near what the same network reaches with full volumes (the shipped U-Net: "
              f"{fused_mean:.3f} on other held-out phantoms). Halving the annotations needs a pool where random "
              "slices are mostly uninformative (a small implant in a large field of view), which "
              "`phantoms.bone_implant` cannot generate (its screw scales with the volume)."]
    text = "\n".join(L) + "\n"
    out = HERE / "results" / "segmentation.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
