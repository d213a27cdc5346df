"""Train the shipped unsupervised segmenters: tomoml_nb/weights/stego_bone_implant.pt (and stego_spam.pt).

    python scripts/train_stego.py --device cpu --budget-s 600 --backbone-steps 160 --threads 1   # shipped weights (166 s)
    PYTHONPATH=. python3 scripts/train_stego.py --device cuda --budget-s 420 --out $OUT/stego_bone_implant.pt
    python scripts/train_stego.py --domain spam --budget-s 300 --out tomoml_nb/weights/stego_spam.pt

No labels are used for training. ``--domain bone_implant``: unlabelled
``phantoms.bone_implant`` volumes (anatomy seeds 11-16, degradation 0.3-0.9, noise
0.015-0.03); ``--domain spam``: the real snow and concrete X-ray scans of the shared data
(the "other domain" of the notebook). Phases, all inside ``--budget-s`` (wall clock,
including data generation):

1. backbone: dense DINO self-distillation with Sinkhorn-Knopp centring of the teacher
   (``--centering``, default ``sinkhorn``) and a denoising/inpainting term
   (``unsupervised.train_backbone``), up to ``--backbone-steps`` or ~60 % of the budget;
2. STEGO head (``unsupervised.train_head``) and the cluster probe (``fit_probe``): by default
   (``--probe features``) Euclidean k-means of the backbone features, which scored higher on
   the validation phantom than cosine k-means of the head codes (``--probe codes``).

Model selection (bone_implant only): every ``--val-every`` backbone steps the backbone
features of a separate validation phantom (seed 510, degradation seed 95) are clustered by
k-means and scored by Hungarian mean IoU (``feature_kmeans_score``; with ``--val-pipeline N``
a short head + probe fitted on the training volumes is scored instead); its labels are used
for that choice only. The best backbone is kept (the useful state of the features is reached
early and can fade with longer training), the final head and probe are fitted on it, and the
segmenter with the best validation score is written to ``--out`` with a ``<out>.json``
summary. Deterministic for a given ``--seed`` and device.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tomoml_nb import metrics, phantoms, unsupervised  # noqa: E402

TRAIN = [  # (seed, degradation, noise)
    (11, 0.3, 0.02), (12, 0.5, 0.015), (13, 0.7, 0.025), (14, 0.9, 0.02), (15, 0.45, 0.03), (16, 0.8, 0.02),
]
VALIDATION = (510, 0.6, 0.02, 95)  # seed, degradation, noise, degradation_seed


def log(t0, msg):
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def load_spam(data_dir):
    import tifffile

    vols = []
    for name, fname in (("spam_snow", "snow.tif"), ("spam_concrete_xray", "concrete_x-ray-bin16.tif")):
        if data_dir is not None:
            hits = sorted(Path(data_dir).rglob(fname))
            if not hits:
                raise FileNotFoundError(f"--data-dir: {fname} not found under {data_dir}")
            vols.append(np.asarray(tifffile.imread(hits[0]), np.float32))
        else:
            from tomoml_nb import data

            vols.append(np.asarray(data.load(name), np.float32))
    return vols


def feature_kmeans_score(net, val, device, n_clusters, seed, n_seeds=2):
    """Clusterability of the backbone features: k-means (Euclidean, on centred features at 1/2
    resolution, every 2nd z slice of the validation phantom, 4 restarts) scored by Hungarian mean
    IoU, averaged over ``n_seeds`` k-means seeds (a single k-means run with few restarts can land in
    a lucky local optimum that isolates a small class; the best-inertia solution is what counts)."""
    import torch
    from sklearn.cluster import KMeans

    v = unsupervised.normalize(val.image)[::2]
    H, W = v.shape[1:]
    net.eval()
    with torch.no_grad():
        f = net.backbone(torch.from_numpy(np.ascontiguousarray(v[:, None])).to(device))
    x = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).float().cpu().numpy()
    x = x - x.mean(0)
    g = val.labels[::2, ::2, ::2][:, : f.shape[2], : f.shape[3]].ravel()
    ious = []
    for s in range(seed, seed + n_seeds):
        rng = np.random.default_rng(s)
        idx = rng.choice(len(x), min(20000, len(x)), replace=False)
        p = KMeans(n_clusters, n_init=4, random_state=s).fit(x[idx]).predict(x)
        ious.append(metrics.hungarian_iou_per_class(p, g, 5, n_clusters))
    iou = np.nanmean(ious, axis=0)
    return float(np.nanmean(iou)), iou


def validation_score(seg, val, device):
    lab = unsupervised.predict(seg, val.image, crf=False, device=device, progress=False)
    iou = metrics.hungarian_iou_per_class(lab, val.labels, 5, seg.n_clusters)
    return float(np.nanmean(iou)), iou


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget-s", type=float, default=900.0, help="wall-clock budget incl. data generation")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--domain", choices=("bone_implant", "spam"), default="bone_implant")
    ap.add_argument("--data-dir", default=None, help="folder with snow.tif / concrete_x-ray-bin16.tif (spam)")
    ap.add_argument("--size", type=int, default=None, help="phantom edge (default 128 on GPU, 96 on CPU)")
    ap.add_argument("--crop", type=int, default=None, help="global crop (default 96 on GPU, 64 on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 on GPU, 8 on CPU")
    ap.add_argument("--backbone-fraction", type=float, default=0.6)
    ap.add_argument("--backbone-steps", type=int, default=100000,
                    help="stop the backbone phase after this many steps (or at its share of the budget)")
    ap.add_argument("--val-every", type=int, default=None, help="default 100 on GPU, 20 on CPU")
    ap.add_argument("--head-steps", type=int, default=None, help="default 1500 on GPU, 300 on CPU")
    ap.add_argument("--n-clusters", type=int, default=5)
    ap.add_argument("--val-pipeline", type=int, default=0,
                    help="if > 0: select the backbone by the whole pipeline with a head of this many steps")
    ap.add_argument("--centering", choices=("mean", "sinkhorn"), default="sinkhorn",
                    help="teacher centring of the DINO loss (unsupervised.train_backbone)")
    ap.add_argument("--probe", choices=("features", "codes"), default="features",
                    help="cluster probe of the shipped segmenter: backbone features (Euclidean) or head codes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import torch

    from tomoml_nb.train import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    size = args.size or (128 if gpu else 96)
    crop = args.crop or (96 if gpu else 64)
    bs = args.batch_size or (32 if gpu else 8)
    val_every = args.val_every or (100 if gpu else 20)
    head_steps = args.head_steps or (1500 if gpu else 300)
    out = args.out or ROOT / "tomoml_nb" / "weights" / f"stego_{args.domain}.pt"
    budget = float(args.budget_s)

    # ---- data (generated once) --------------------------------------------------------------
    if args.domain == "bone_implant":
        train = [phantoms.bone_implant((size,) * 3, seed=s, degradation=d, noise=n).image for s, d, n in TRAIN]
        vs, vd, vn, vds = VALIDATION
        val = phantoms.bone_implant((min(size, 96),) * 3, seed=vs, degradation=vd, noise=vn, degradation_seed=vds)
    else:
        train = load_spam(args.data_dir)
        val = None
    log(t0, f"data: {len(train)} volumes {train[0].shape}, device {dev}, crop {crop}, batch {bs}")

    best = {"score": -1.0}
    history = {"val": []}

    def validate(net):
        if val is None:
            return float("nan")
        fscore, fiou = feature_kmeans_score(net, val, dev, args.n_clusters, args.seed)
        entry = {"elapsed_s": time.perf_counter() - t0, "feature_kmeans_miou": fscore, "feature_iou": fiou.tolist()}
        log(t0, f"validation: k-means on backbone features, Hungarian mIoU {fscore:.3f} "
                f"per class {np.round(fiou, 3).tolist()}")
        score = fscore
        if args.val_pipeline:
            # the whole pipeline with a short head: what the backbone is for
            seg = quick_segmenter(net, args.val_pipeline)
            score, iou = validation_score(seg, val, dev)
            entry.update(miou=score, iou=iou.tolist())
            log(t0, f"validation: short head + probe, Hungarian mIoU {score:.3f} per class {np.round(iou, 3).tolist()}")
            if score > best.get("seg_score", -1):
                best.update(seg_score=score, seg=seg)
        history["val"].append(entry)
        if score > best["score"]:
            best.update(score=score)
            best["backbone"] = copy.deepcopy(net.backbone.state_dict())
        return score

    def quick_segmenter(net, steps):
        with torch.enable_grad():          # validation runs under no_grad
            return _quick_segmenter(net, steps)

    def _quick_segmenter(net, steps):
        net2, h = unsupervised.train_head(copy.deepcopy(net), train, steps=steps, crop=crop, batch_size=bs,
                                          pool_size=256 if not gpu else 512, device=dev, seed=args.seed,
                                          progress=False)
        cen, temp = unsupervised.fit_probe(net2, train, args.n_clusters, device=dev, seed=args.seed, space=args.probe,
                                           return_temperature=True)
        return unsupervised.Segmenter(net2.to("cpu").eval(), cen, 5, temp, history={"head": {"steps": h["steps"]}},
                                      space=args.probe)

    # ---- 1. backbone ----------------------------------------------------------------------
    bb_time = args.backbone_fraction * budget - (time.perf_counter() - t0)
    net, h = unsupervised.train_backbone(train, steps=args.backbone_steps, crop=crop, batch_size=bs, device=dev, seed=args.seed,
                                         progress=False, time_limit=max(5.0, bb_time), validate=validate,
                                         val_every=val_every, centering=args.centering)
    log(t0, f"backbone: {h['steps']} steps in {h['seconds']:.0f} s, final loss {h['loss'][-1]:.3f}")
    history["backbone"] = {"steps": h["steps"], "seconds": h["seconds"], "loss_first": h["loss"][0],
                           "loss_last": h["loss"][-1]}
    if "backbone" in best:
        net.backbone.load_state_dict(best["backbone"])
        log(t0, f"using the best backbone (validation mIoU {best['score']:.3f})")

    # ---- 2. head + probe ----------------------------------------------------------------------
    remaining = budget - (time.perf_counter() - t0) - 20
    net, hh = unsupervised.train_head(net, train, steps=head_steps, crop=crop, batch_size=bs,
                                      pool_size=256 if not gpu else 512, device=dev, seed=args.seed,
                                      progress=False, time_limit=max(5.0, 0.8 * remaining))
    cen, temp = unsupervised.fit_probe(net, train, args.n_clusters, device=dev, seed=args.seed, space=args.probe,
                                       return_temperature=True)
    seg = unsupervised.Segmenter(net.to("cpu").eval(), cen, 5, temp, space=args.probe)
    log(t0, f"head: {hh['steps']} steps in {hh['seconds']:.0f} s")
    final_score = float("nan")
    if val is not None:
        final_score, iou = validation_score(seg, val, dev)
        history["final_validation"] = {"elapsed_s": time.perf_counter() - t0, "miou": final_score,
                                       "iou": iou.tolist()}
        log(t0, f"final validation (whole pipeline, no CRF): Hungarian mIoU {final_score:.3f} "
                f"per class {np.round(iou, 3).tolist()}")
        if best.get("seg") is not None and best["seg_score"] > final_score:
            seg, hh = best["seg"], {"steps": best["seg"].history["head"]["steps"], "seconds": float("nan"),
                                    "loss_weights": hh["loss_weights"]}
            final_score = best["seg_score"]
            log(t0, f"keeping the validation-phase segmenter (mIoU {final_score:.3f})")
    seconds = time.perf_counter() - t0
    seg.history = {"backbone": history["backbone"],
                   "head": {"steps": hh["steps"], "seconds": hh["seconds"], "loss_weights": hh["loss_weights"]},
                   "validation": history["val"], "final_validation": history.get("final_validation"),
                   "seconds": seconds, "best_feature_kmeans_miou": best["score"]}
    meta = dict(script="scripts/train_stego.py", args={k: str(v) for k, v in vars(args).items()},
                domain=args.domain, train=TRAIN if args.domain == "bone_implant" else ["snow.tif", "concrete_x-ray-bin16.tif"],
                validation=VALIDATION if args.domain == "bone_implant" else None, size=size, crop=crop,
                batch_size=bs, device=str(dev), torch=torch.__version__, machine=platform.machine(),
                gpu=torch.cuda.get_device_name(0) if gpu else None)
    path = unsupervised.save_model(seg, out, overwrite=True, **meta)
    summary = dict(out=str(path), seconds=seconds, backbone_steps=history["backbone"]["steps"],
                   head_steps=hh["steps"], validation=history["val"], final_validation_miou=final_score,
                   best_feature_kmeans_miou=best["score"], args=meta["args"],
                   size_bytes=path.stat().st_size)
    Path(str(path) + ".json").write_text(json.dumps(summary, indent=1, default=float))
    log(t0, f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {path}.json")


if __name__ == "__main__":
    main()
