"""Train the shipped EmbedSeg fibre network: tomoml_nb/weights/embedseg_fibres.pt (+ model card).

    python scripts/train_embedseg.py --device cpu --budget-s 900            # the CPU fallback weights
    PYTHONPATH=. python3 scripts/train_embedseg.py --device cuda --budget-s 420 --out $OUT/embedseg_fibres.pt
    python scripts/train_embedseg.py --device cpu --budget-s 60 --out /tmp/e.pt --quick   # a smoke run

Training data: ``tomoml_nb.phantoms.fibres`` volumes (seeds 1001...; fibre density, radius,
noise, blur, hollow fraction, curvature and orientation spread drawn per volume from
``--seed``), generated once at the start (in parallel processes when cores allow). Patches
of ``--patch`` voxels centred on fibres, flips/transposes and grey-value jitter. Loss: the
EmbedSeg loss (``tomoml_nb.instance.embedseg_loss``). Validation: AP@0.5 of tiled inference on
a separate phantom (seed 900, never trained on); the best network so far is kept and saved
before ``--budget-s`` (wall clock, including data generation) runs out. At the end the
clustering thresholds are chosen on that validation phantom. The held-out evaluation
(seeds 7001+) is done by ``benchmarks/instance.py``, not here.

Writes ``--out`` (weights, < 5 MB) and ``<out>.json`` (steps, seconds, validation history, args).
``python scripts/train_embedseg.py --card-only WEIGHTS [BENCHMARK_MD]`` writes the model card
``WEIGHTS.md`` from the file's training history and the benchmark's results.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()

VAL_SEED = 900
VAL_SHAPE = (48, 96, 96)
VAL_FIBRES = 62


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def phantom_params(i, base_seed):
    """Generator parameters of training volume ``i`` (drawn, deterministic)."""
    rng = np.random.default_rng([base_seed, i])
    shape = (48, 128, 128) if i % 3 else (64, 128, 128)
    area = shape[1] * shape[2] / (128 * 128)
    return dict(shape=shape, n_fibres=int(rng.integers(60, 180) * area), seed=1001 + i,
                radius=(float(rng.uniform(1.6, 2.4)), float(rng.uniform(3.0, 4.2))),
                noise=float(rng.uniform(0.02, 0.09)), blur=float(rng.uniform(0.4, 1.1)),
                hollow=float(rng.uniform(0.0, 0.4)), curvature=float(rng.uniform(0.005, 0.02)),
                orientation_spread=float(rng.choice([0.5, 1.0, 2.0, 100.0])))


def make_phantom(params):
    from tomoml_nb import phantoms

    p = dict(params)
    ph = phantoms.fibres(p.pop("shape"), **p)
    return ph.image.astype(np.float32), ph.labels


def validation_phantom():
    from tomoml_nb import phantoms

    return phantoms.fibres(VAL_SHAPE, n_fibres=VAL_FIBRES, seed=VAL_SEED, noise=0.05)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget-s", type=float, default=900.0, help="wall-clock budget incl. data generation")
    ap.add_argument("--out", default=str(ROOT / "tomoml_nb" / "weights" / "embedseg_fibres.pt"))
    ap.add_argument("--data-dir", default=None, help="accepted for a uniform GPU command line; not used "
                    "(training data are synthetic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=None, help="training volumes (default 40 GPU / 8 CPU)")
    ap.add_argument("--steps", type=int, default=None, help="max steps (default: until the budget ends)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 8 GPU / 2 CPU)")
    ap.add_argument("--patch", type=int, nargs=3, default=None,
                    help="training patch = inference window (default 32 64 64 GPU / 32 48 48 CPU)")
    ap.add_argument("--base", type=int, default=None, help="U-Net width (default 12 GPU / 8 CPU)")
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--init", default=None, help="continue from these weights (architecture and window taken "
                    "from the file)")
    ap.add_argument("--val-every", type=int, default=None, help="steps between validations")
    ap.add_argument("--no-anneal", dest="anneal", action="store_false",
                    help="constant learning rate (default: cosine decay over the wall-clock budget)")
    ap.add_argument("--quick", action="store_true", help="tiny data for a smoke run")
    args = ap.parse_args(argv)

    import torch

    from tomoml_nb import instance, metrics
    from tomoml_nb.models.embedseg import build_embedseg
    from tomoml_nb.train import fit, limit_cpu_threads, resolve_device, seed_everything

    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.set_num_threads(min(4, os.cpu_count() or 1))     # CPU clustering; three jobs share the cores
    n_train = args.n_train or (40 if gpu else 8)
    batch = args.batch or (8 if gpu else 2)
    base = args.base or (12 if gpu else 8)
    if args.quick:
        n_train = min(n_train, 2)
    val_every = args.val_every or (200 if gpu else 100)
    args.patch = list(args.patch or ((32, 64, 64) if gpu else (32, 48, 48)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"device {dev}, budget {args.budget_s:.0f} s, {n_train} training volumes, batch {batch}, "
        f"patch {args.patch}, base {base}, levels {args.levels}")

    # ---- data: generate the pool once --------------------------------------------------------
    params = [phantom_params(i, args.seed) for i in range(n_train)]
    if args.quick:
        for p in params:
            p["shape"] = (32, 64, 64)
            p["n_fibres"] = 30
    workers = min(len(params), max(1, (os.cpu_count() or 1) - 2), 12)
    if workers > 1 and gpu:
        with ProcessPoolExecutor(workers) as ex:
            pool = list(ex.map(make_phantom, params))
    else:
        pool = [make_phantom(p) for p in params]
    val = validation_phantom()
    log(f"generated {len(pool)} training phantoms + validation phantom (seed {VAL_SEED})")

    vols = [instance.normalize(v) for v, _ in pool]
    labs = [lab.astype(np.int64) for _, lab in pool]
    seed_everything(args.seed)
    if args.init:
        net = instance.load_model(args.init)
        args.patch = list(net.tomoml_window)
        base, args.levels = net.tomoml_config["base"], net.tomoml_config["levels"]
        log(f"continuing from {args.init} (window {args.patch}, base {base}, levels {args.levels})")
    else:
        net = build_embedseg({"base": base, "levels": args.levels})
    net.tomoml_window = tuple(args.patch)
    net.tomoml_voxel_size = (1.0, 1.0, 1.0)
    net.tomoml_cluster = dict(instance.CLUSTER_DEFAULTS)
    sampler = instance.PatchSampler(vols, labs, args.patch, batch, augment=True)
    cfg = net.tomoml_config
    amp = gpu and torch.cuda.is_bf16_supported()

    # batches are cut on CPU threads a few steps ahead; each step's random numbers come from
    # (seed, step), so the result does not depend on thread timing
    from concurrent.futures import ThreadPoolExecutor

    prefetch = ThreadPoolExecutor(max_workers=4 if gpu else 1)
    ahead = {}

    def make_batch(step):
        xs, ys = sampler.sample(np.random.default_rng([args.seed, step]))
        return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys))

    def batches(step, rng):
        for s_ in range(step, step + (8 if gpu else 1)):
            if s_ not in ahead:
                ahead[s_] = prefetch.submit(make_batch, s_)
        return ahead.pop(step).result()

    last_parts = {}

    def loss_fn(model, b):
        x, y = b
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
            raw = model(x)
        loss, parts = instance.embedseg_loss(raw.float(), y, cfg)
        last_parts.update(parts)
        return loss

    best = {"ap": -1.0, "step": 0, "state": None}
    last_val_s = [10.0]
    history_val = []
    reserve = 40.0 if gpu else 15.0                   # final validation, threshold choice, saving

    def validate(model, force=False):
        # validations cost seconds of clustering on the CPU: at most one per `gap` of wall clock
        gap = max(45.0, 3.0 * last_val_s[0]) if gpu else 0.0
        if not force and history_val and time.perf_counter() - T0 - history_val[-1]["elapsed_s"] < gap:
            return history_val[-1]["ap50"]
        t = time.perf_counter()
        lab = instance.segment_instances(val.image, model, device=dev, progress=False)
        m = metrics.match_instances(lab, val.labels, 0.5)
        history_val.append({"elapsed_s": round(time.perf_counter() - T0, 1), "ap50": m["ap"],
                            "n_pred": m["tp"] + m["fp"], "n_truth": m["tp"] + m["fn"]})
        if m["ap"] > best["ap"]:
            best.update(ap=m["ap"], state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                        step=len(history_val) * val_every)
            instance.save_model(_with_state(model, best["state"]), out,
                                history={"val_ap50": best["ap"], "partial": True}, meta={"args": vars(args)},
                                overwrite=True)
        last_val_s[0] = time.perf_counter() - t
        log(f"validation AP@0.5 {m['ap']:.3f} (TP {m['tp']}, FP {m['fp']}, FN {m['fn']}) in "
            f"{last_val_s[0]:.1f} s; best {best['ap']:.3f}; lr {opt.param_groups[0]['lr']:.2e}; loss parts "
            + ", ".join(f"{k} {v:.3f}" for k, v in last_parts.items()))
        return m["ap"]

    def _with_state(model, state):
        clone = build_embedseg(cfg)
        clone.load_state_dict(state)
        for a in ("tomoml_window", "tomoml_voxel_size", "tomoml_cluster"):
            setattr(clone, a, getattr(model, a))
        return clone

    # one-step timing to size the run within the budget
    remaining = args.budget_s - (time.perf_counter() - T0) - reserve
    steps = args.steps or 1_000_000
    log(f"training for up to {steps if args.steps else 'budget-limited'} steps, {remaining:.0f} s left")

    train_limit = max(remaining - (8.0 if gpu else 20.0), 5.0)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    t_train = [None]

    def batches_logged(step, rng):
        # learning rate: cosine decay over the wall-clock budget (the step count is not known ahead)
        if t_train[0] is None:
            t_train[0] = time.perf_counter()
        if not args.steps and args.anneal:
            frac = min((time.perf_counter() - t_train[0]) / train_limit, 1.0)
            for g in opt.param_groups:
                g["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1.0 + np.cos(np.pi * frac)))
        if step % 50 == 0:
            log(f"step {step}  loss parts " + ", ".join(f"{k} {v:.3f}" for k, v in last_parts.items()))
        return batches(step, rng)

    with limit_cpu_threads(dev):
        net.to(dev)
        hist = fit(net, batches_logged, loss_fn, steps=steps if args.steps else 100_000, lr=args.lr,
                   optimizer=opt, scheduler="cosine" if args.steps else None, validate=validate,
                   val_every=val_every, device=dev, seed=args.seed, progress=False, desc="EmbedSeg",
                   time_limit=train_limit)
    prefetch.shutdown(wait=False, cancel_futures=True)
    log(f"stopped after {hist['steps']} steps ({hist['seconds']:.0f} s of training)")
    if not history_val or time.perf_counter() - T0 - history_val[-1]["elapsed_s"] > 20:
        net.eval()
        with torch.no_grad():
            validate(net, force=True)
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    net.eval()

    # ---- clustering thresholds on the validation phantom (cheap re-runs) -------------------------
    tuned = dict(net.tomoml_cluster)
    best_c = (best["ap"], tuned)
    for st in (0.6, 0.4, 0.7, 0.3):
        if time.perf_counter() - T0 + 2.5 * last_val_s[0] > args.budget_s - 5:
            break
        lab = instance.segment_instances(val.image, net, device=dev, progress=False, seed_threshold=st)
        a = metrics.match_instances(lab, val.labels, 0.5)["ap"]
        log(f"seed_threshold {st}: validation AP@0.5 {a:.3f}")
        if a > best_c[0]:
            best_c = (a, {**tuned, "seed_threshold": st})
    tuned = best_c[1]
    best["ap"] = max(best["ap"], best_c[0])
    net.tomoml_cluster = tuned
    seconds = time.perf_counter() - T0
    history = {"val": history_val, "val_ap50_best": best["ap"], "steps": hist["steps"], "seconds": seconds,
               "loss_first": float(np.mean(hist["loss"][:20])) if hist["loss"] else None,
               "loss_last": float(np.mean(hist["loss"][-20:])) if hist["loss"] else None,
               "device": str(dev), "patch": list(args.patch), "batch": batch}
    meta = {"script": "scripts/train_embedseg.py", "args": vars(args),
            "train_phantoms": params, "validation": {"seed": VAL_SEED, "shape": VAL_SHAPE, "n_fibres": VAL_FIBRES,
                                                     "noise": 0.05},
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if gpu else None}
    instance.save_model(net, out, history=history, meta=meta, overwrite=True)
    size_mb = out.stat().st_size / 1e6
    summary = {"out": str(out), "size_mb": round(size_mb, 3), "steps": hist["steps"], "seconds": round(seconds, 1),
               "val_ap50_best": best["ap"], "cluster": tuned, "val": history_val, "args": vars(args),
               "device": str(dev)}
    Path(str(out) + ".json").write_text(json.dumps(summary, indent=1, default=str))
    log(f"wrote {out} ({size_mb:.2f} MB), best validation AP@0.5 {best['ap']:.3f}, total {seconds:.0f} s")
    return summary


def write_card(weights, bench=None):
    """Write the model card ``<weights>.md`` from the file's history/meta (+ the benchmark's table)."""
    import platform

    import torch

    from tomoml_nb import instance

    net = instance.load_model(weights)
    h, m = net.tomoml_history, net.tomoml_meta
    cfg = net.tomoml_config
    n_params = sum(p.numel() for p in net.parameters())
    size_kb = Path(weights).stat().st_size / 1024
    args = m.get("args", {})
    gpu = m.get("gpu")
    where = (f"one {gpu} GPU in {h.get('seconds', 0):.0f} s (wall clock, data generation included)"
             if gpu else f"the CPU ({platform.processor() or platform.machine()}, 2 cores shared with other "
                         f"jobs) in {h.get('seconds', 0) / 60:.0f} min")
    val = h.get("val", [])
    val_txt = ", ".join(f"{v['elapsed_s']:.0f} s: {v['ap50']:.3f}" for v in val) or "not run"
    phs = m.get("train_phantoms", [])
    ph_txt = "\n".join(f"  - seed {p['seed']}, shape {tuple(p['shape'])}, n_fibres {p['n_fibres']}, radius "
                        f"({p['radius'][0]:.2f}, {p['radius'][1]:.2f}), noise {p['noise']:.3f}, blur {p['blur']:.2f}, "
                        f"hollow {p['hollow']:.2f}, curvature {p['curvature']:.4f}, orientation_spread "
                        f"{p['orientation_spread']}" for p in phs)
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    bench_txt = ""
    if bench is not None and Path(bench).is_file():
        bench_txt = Path(bench).read_text()
    cmd = (f"PYTHONPATH=. python3 scripts/train_embedseg.py --device {args.get('device')} --budget-s "
           f"{args.get('budget_s'):.0f}" + (" --out <file>" if args.get("out") else ""))
    text = f"""# Model card: `embedseg_fibres.pt`

EmbedSeg-style 3D instance segmentation of touching paper fibres in SR-µCT-like volumes.
Load with `tomoml_nb.instance.load_pretrained()`; used by `instance.segment_instances(volume)`.

## Architecture
Hand-written 3D U-Net (`tomoml_nb.models.embedseg.EmbedSegUNet`): {cfg['levels']} levels, {cfg['base']} channels
at full resolution (doubled per level), two 3×3×3 convolutions + batch norm + leaky ReLU per block, max-pool
down, transposed convolution up; heads: 3 offsets ({cfg['max_offset']:.0f}·tanh, voxels), {cfg['n_sigma']} bandwidths
({cfg['sigma_scale']:.0f}·exp), 1 seed map (sigmoid), 1 foreground logit. {n_params:,} parameters; file {size_kb:.0f} KB.
Window (training patch = inference tile): {tuple(net.tomoml_window)}. Isotropic voxels
(`voxel_size` {tuple(net.tomoml_voxel_size)}; other voxel sizes can be passed at inference).
Clustering settings stored with the weights (chosen on the validation phantom): {net.tomoml_cluster}.
Input: the volume normalised by its 0.5 / 99.5 percentiles.

## Training
Made by `scripts/train_embedseg.py` on {where}: `{cmd}`; {h.get('steps')} steps, batch {h.get('batch')},
patch {tuple(h.get('patch', net.tomoml_window))}, AdamW lr {args.get('lr')}, weight decay 1e-4, seed {args.get('seed')}.
The same command with `--device cpu` reproduces it on a CPU (many times slower; the budget then buys fewer steps).
Loss: EmbedSeg (`instance.embedseg_loss`): Lovász hinge on each instance's Gaussian around its mean embedding,
sigma smoothness (log sigma), seed regression, foreground BCE + Dice. Instances = connected pieces of each
fibre inside the patch. Augmentation: flips on every axis, y↔x transposition, grey gain ±15 %, offset ±0.1,
Gaussian noise σ ≤ 0.05. Mean loss first/last 20 steps: {fmt(h.get('loss_first'))}, {fmt(h.get('loss_last'))}.
{m.get('note', '')}

Training data: synthetic `tomoml_nb.phantoms.fibres` volumes, generated by the script:
{ph_txt}

Validation during training (never trained on): `phantoms.fibres({tuple(m.get('validation', {}).get('shape', ()))},
n_fibres={m.get('validation', {}).get('n_fibres')}, seed={m.get('validation', {}).get('seed')}, noise=0.05)`, AP@0.5 of
tiled inference at wall-clock time: {val_txt}. Best: {h.get('val_ap50_best')}.

## Held-out evaluation
`benchmarks/instance.py` (phantom seed 7001, never used above) — copied from `benchmarks/results/instance.md`:

{bench_txt or '(run `python benchmarks/instance.py`)'}

## Limitations
- Trained on synthetic fibre mats only (one generator): real paper scans differ in contrast, noise,
  artefacts, fibre shapes (fines, fibrils, ribbons) and touching geometry; fine-tune with
  `instance.train(..., model=instance.load_pretrained())` on a few labelled crops.
- The network clusters around centres it can reach from inside its window: one pass over a volume
  larger than the window cuts long fibres into pieces; use the default tiling (`tile_shape=None`).
- Rounded objects (snow grains, pores, particles) are outside the training data (see notebook 06).
- Labels are int32; the clustering runs on the CPU.
"""
    out = Path(weights).with_suffix(".md")
    out.write_text(text)
    return out


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--card-only":
        print(write_card(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
    else:
        main()
