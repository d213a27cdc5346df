"""Train the shipped VolRAFT weights (``tomoml_nb/weights/volraft_synthetic.pt``).

Training data (all synthetic displacements, deterministic given ``--seed``):

* textures: the real X-ray and neutron CT crops of a concrete cylinder (``spam_concrete_xray``,
  ``spam_concrete_neutron``), bone-implant phantoms (seeds 0, 1, 2) and procedural two-phase /
  grainy textures made on the fly. The real *snow* volume is NOT used: it is held out for the
  notebook and the benchmark;
* displacement fields: a pool of every family of ``phantoms.displacement_field`` (uniform, star,
  power, spherical, random_smooth, shear_band, mixed), max amplitudes log-uniform in [0.3, 10]
  voxels, with random axis permutations / flips and an amplitude jitter capped at |grad u| <= 0.7;
* relative noise log-uniform in [0.001, 0.1] on both volumes;
* a curriculum: the max amplitude ramps from 3 to 10 voxels over the first quarter of the steps.

Validation (chooses the saved weights): a fixed set of pairs from held-out textures (bone-implant
seed 50, procedural textures from another seed) and fields from another seed.

The loop is ``tomoml_nb.train.fit`` with a wall-clock budget (data generation included); the
best-so-far weights by validation EPE are written to ``--out`` whenever they improve, and a
``<out>.json`` summary at the end.

Examples::

    python scripts/train_volraft.py --device cpu --budget-s 60 --out /tmp/volraft.pt      # pipeline check
    python scripts/train_volraft.py --device cpu --budget-s 1500                          # CPU weights
    PYTHONPATH=. python3 scripts/train_volraft.py --device cuda --budget-s 420 --out $OUT/volraft_synthetic.pt \\
        --data-dir .gpu_data                                                              # GPU weights
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tomoml_nb import dvc, phantoms  # noqa: E402
from tomoml_nb.train import fit, resolve_device, seed_everything  # noqa: E402

TRAIN_PHANTOM_SEEDS = (0, 1, 2)
VAL_PHANTOM_SEED = 50
REAL_FILES = {"spam_concrete_xray": "concrete_x-ray-bin16.tif", "spam_concrete_neutron": "concrete_neutron-bin16.tif"}


def _clipped_adamw():
    import torch

    class ClippedAdamW(torch.optim.AdamW):
        """AdamW that clips the global gradient norm to 1 first (as RAFT; tames GRU spikes)."""

        def __init__(self, params, lr):
            params = list(params)
            super().__init__(params, lr=lr, weight_decay=1e-5)
            self._params = params

        def step(self, closure=None):
            torch.nn.utils.clip_grad_norm_(self._params, 1.0)
            return super().step(closure)

    return ClippedAdamW


def log(t0, msg):
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def load_textures(data_dir, t0):
    """Real training textures (concrete; never snow) and bone-implant phantoms."""
    vols = []
    for name, fname in REAL_FILES.items():
        try:
            if data_dir is not None:
                import tifffile

                p = Path(data_dir) / fname
                if not p.is_file():
                    log(t0, f"texture {name}: {p} missing, skipped")
                    continue
                v = tifffile.imread(p)
            else:
                from tomoml_nb import data

                v = data.load(name)
            vols.append(np.asarray(v, np.float32))
            log(t0, f"texture {name}: {v.shape}")
        except Exception as exc:  # a missing optional texture must not stop training
            log(t0, f"texture {name}: not available ({type(exc).__name__}: {exc}), skipped")
    for s in TRAIN_PHANTOM_SEEDS:
        vols.append(phantoms.bone_implant((96, 96, 96), seed=s, noise=0.0).image.astype(np.float32))
    log(t0, f"{len(vols)} textures ready")
    return vols


def choose_and_save_iters(net, val_batches, out, dev, t0):
    """Store the number of refinement iterations with the lowest validation EPE in the weights."""
    best, epe = dvc.choose_iters(net, val_batches, device=dev)
    log(t0, "validation EPE by inference iterations: " + ", ".join(f"{k}: {v:.4f}" for k, v in epe.items())
        + f" -> inference_iters {best}")
    meta = {**getattr(net, "tomoml_meta", {}), "inference_iters": best,
            "val_epe_by_iters": {str(k): round(v, 4) for k, v in epe.items()}}
    dvc.save_model(net, out, history=getattr(net, "tomoml_history", {}), overwrite=True, **meta)
    return {str(k): v for k, v in epe.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget-s", type=float, default=1500.0, help="wall-clock budget incl. data generation")
    ap.add_argument("--out", type=Path, default=ROOT / "tomoml_nb" / "weights" / "volraft_synthetic.pt")
    ap.add_argument("--data-dir", default=None, help="folder with concrete_*.tif (default: tomoml_nb.data)")
    ap.add_argument("--patch", type=int, default=None, help="training cube (default 48 on GPU, 32 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 8 on GPU, 2 on CPU)")
    ap.add_argument("--iters", type=int, default=8, help="GRU iterations in training")
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--n-fields", type=int, default=None, help="field pool size (default 1200 GPU, 96 CPU)")
    ap.add_argument("--workers", type=int, default=None, help="processes for the field pool")
    ap.add_argument("--val-every", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curriculum", type=float, default=0.25,
                    help="fraction of the steps over which the max amplitude ramps from 3 to 10 voxels")
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (fine-tuning)")
    ap.add_argument("--n-val", type=int, default=None, help="validation batches of 4 pairs (default 8 GPU / 3 CPU)")
    ap.add_argument("--choose-iters-only", action="store_true",
                    help="no training: choose the inference iterations of --init on the validation pairs and "
                         "write the weights with that choice to --out")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    import torch

    ClippedAdamW = _clipped_adamw()
    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    patch = args.patch or (48 if gpu else 32)
    batch = args.batch or (8 if gpu else 2)
    n_fields = args.n_fields or (1200 if gpu else 96)
    workers = args.workers or (min(12, os.cpu_count() or 1) if gpu else 1)
    val_every = args.val_every or (100 if gpu else 20)
    seed_everything(args.seed)
    log(t0, f"device {dev}, patch {patch}, batch {batch}, iters {args.iters}, budget {args.budget_s:.0f} s")

    textures = load_textures(args.data_dir, t0)
    train_pairs = dvc.SyntheticPairs(textures, patch=patch, margin=12, n_fields=n_fields, amplitude=(0.3, 10.0),
                                     noise=(0.001, 0.1), procedural=0.3, seed=args.seed, device=dev,
                                     pool_workers=workers)
    log(t0, f"training field pool: {n_fields} fields of {train_pairs.size}^3")
    val_tex = [phantoms.bone_implant((96, 96, 96), seed=VAL_PHANTOM_SEED, noise=0.0).image.astype(np.float32)]
    val_sampler = dvc.SyntheticPairs(val_tex, patch=patch, margin=12, n_fields=48, amplitude=(0.3, 10.0),
                                     noise=(0.001, 0.1), procedural=0.4, seed=args.seed + 5000, device=dev)
    vrng = np.random.default_rng(args.seed + 7000)
    n_val = args.n_val or (8 if gpu else 3)
    val_batches = [val_sampler.sample(4, vrng) for _ in range(n_val)]
    log(t0, f"validation: {n_val * 4} held-out pairs")

    if args.choose_iters_only:
        if args.init is None:
            raise SystemExit("--choose-iters-only needs --init WEIGHTS")
        choose_and_save_iters(dvc.load_model(args.init, device=dev), val_batches, args.out, dev, t0)
        return

    model = dvc.make_model()
    if args.init is not None:
        model = dvc.load_model(args.init)
    model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    log(t0, f"VolRAFT {n_params} parameters ({n_params * 4 / 1e6:.2f} MB float32)")

    state = {"step": 0}

    ramp = {"steps": 1}

    def batches(step, rng):
        state["step"] = step + 1
        frac = min(1.0, step / max(1.0, args.curriculum * ramp["steps"]))
        train_pairs.amplitude = (0.3, 3.0 + 7.0 * frac)  # easy fields first, then up to 10 voxels
        return train_pairs.sample(batch, rng)

    def loss_fn(net, b):
        return dvc.sequence_loss(net(b[0], b[1], iters=args.iters), b[2], gamma=0.8)

    # estimate the step time to size the cosine schedule to the budget
    rng = np.random.default_rng(args.seed + 1)
    probe = model
    probe.train()
    opt_probe = torch.optim.SGD(probe.parameters(), lr=0.0)
    ts = []
    for _ in range(3):
        b = batches(0, rng)
        if gpu:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss = loss_fn(probe, b)
        opt_probe.zero_grad()
        loss.backward()
        if gpu:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t1)
    opt_probe.zero_grad(set_to_none=True)
    step_s = float(np.median(ts[1:]))
    val_s_est = step_s * n_val * 0.8
    remaining = args.budget_s - (time.perf_counter() - t0) - 8.0  # reserve for the last save and summary
    steps = max(1, int(remaining / (step_s * (1 + 0.8 * n_val / val_every) + 1e-9) * 0.92))
    ramp["steps"] = steps
    log(t0, f"step {step_s:.3f} s -> planning {steps} steps (validation ~{val_s_est:.1f} s)")

    best = {"val_epe": float("inf"), "step": 0}
    history_val = []

    def validate(net):
        epe = dvc.evaluate(net, val_batches, iters=12, device=dev)
        history_val.append((state["step"], epe))
        improved = epe < best["val_epe"]
        if improved:
            best.update(val_epe=epe, step=state["step"])
            dvc.save_model(net, args.out, history={"val_epe": epe, "step": state["step"]}, overwrite=True,
                           script="scripts/train_volraft.py", args=vars(args) | {"out": str(args.out)})
        log(t0, f"step {state['step']:5d}  val EPE {epe:.4f} voxels{'  (best, saved)' if improved else ''}")
        return epe

    if args.init is not None:  # continuing: the starting weights are the ones to beat
        epe0 = dvc.evaluate(model, val_batches, iters=12, device=dev)
        best.update(val_epe=epe0, step=0)
        dvc.save_model(model, args.out, history={"val_epe": epe0, "step": 0}, overwrite=True,
                       script="scripts/train_volraft.py", args=vars(args) | {"out": str(args.out)})
        log(t0, f"initial weights {args.init}: val EPE {epe0:.4f} voxels")
        model.train()
    time_limit = args.budget_s - (time.perf_counter() - t0) - 8.0
    hist = fit(model, batches, loss_fn, steps=steps, lr=args.lr, optimizer=ClippedAdamW(model.parameters(), args.lr),
               validate=validate,
               val_every=val_every, device=dev, seed=args.seed, progress=False, time_limit=max(time_limit, 1.0))
    done = hist["steps"]
    if best["val_epe"] == float("inf"):
        dvc.save_model(model, args.out, script="scripts/train_volraft.py", overwrite=True)
    iters_epe = choose_and_save_iters(dvc.load_model(args.out, device=dev), val_batches, args.out, dev, t0)
    elapsed = time.perf_counter() - t0
    size_mb = args.out.stat().st_size / 1e6
    summary = {"steps": done, "seconds": elapsed, "train_seconds": hist["seconds"],
               "best_val_epe": best["val_epe"], "best_step": best["step"], "val_history": history_val,
               "final_loss_mean_last20": float(np.mean(hist["loss"][-20:])) if hist["loss"] else None,
               "weights_mb": size_mb, "device": str(dev),
               "gpu": torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine(),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "patch": patch, "batch": batch, "n_fields": n_fields, "val_epe_by_iters": iters_epe}
    Path(str(args.out) + ".json").write_text(json.dumps(summary, indent=1))
    log(t0, f"done: {done} steps, best val EPE {best['val_epe']:.4f} at step {best['step']}, "
            f"{size_mb:.2f} MB -> {args.out}")


if __name__ == "__main__":
    main()
