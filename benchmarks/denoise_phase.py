"""Benchmark: denoising (MSD supervised, Noise2Inverse, classical filters) and single-distance
phase retrieval (Paganin vs physics-informed), on held-out synthetic data with ground truth.

Denoising: bone-implant phantoms ``(16, 128, 128)`` with seeds 10 and 11 (never used for
training: the shipped weights saw seeds 100-105, validation 200), scanned with
``denoise.simulate_low_dose`` (360 angles) at several fluxes. Every classical filter's
strength is tuned by PSNR on a separate validation phantom (seed 300) at the same flux
(every 4th slice; BM4D, which filters contiguous slices jointly, on all 16). BM4D and the
2.5D networks (``msd_deep25d_bone_implant``: the 100-layer network that also reads the slice
above and below; ``msd_deep25d2_bone_implant``: two slices on each side) use the neighbouring
slices; the other methods work slice by slice.
MSD supervised = shipped ``msd_bone_implant`` weights, no test-time training.
Noise2Inverse (K=2) = shipped ``msd_n2i_bone_implant`` weights (trained self-supervised
on the training scans, no ground truth) fine-tuned on the test scan's own projections
(again no ground truth). PSNR / SSIM inside the reconstruction circle, against the phantom.

Phase: projected mixed-material phantom (water / hydroxyapatite / titanium / TiO2,
``phase.mixed_material_phantom``), 20 keV, 1 um pixels, 5 cm, 1e4 photons/pixel, seed 21
(test); Paganin's delta/beta is tuned by phase RMSE on seed 20 (validation).

Usage: ``python benchmarks/denoise_phase.py [--quick]``; writes
``benchmarks/results/denoise_phase.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from tomoml_nb import denoise as dn
from tomoml_nb import phase as P
from tomoml_nb.phantoms import bone_implant

OUT = Path(__file__).resolve().parent / "results" / "denoise_phase.md"
DEEP = "MSD supervised, 100 layers (shipped, GPU-trained)"
DEEP_TTA = "MSD supervised, 100 layers + 8-orientation self-ensemble (tta=True)"
# the 2.5D networks (each benchmarked when its weights are shipped): name -> neighbours on each side
NETS_25D = {"msd_deep25d_bone_implant": "+-1 slice", "msd_deep25d2_bone_implant": "+-2 slices"}


def name_25d(which, tta=False):
    return f"MSD supervised, 100 layers, 2.5D ({NETS_25D[which]})" + (" + self-ensemble (tta=True)" if tta else "")


def scan(seed, flux, shape=(16, 128, 128)):
    vol = bone_implant(shape, seed=seed, noise=0.0, rings=0.0).image
    return dn.simulate_low_dose(vol, n_angles=360, flux=flux, seed=seed + 1000)


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def bench_denoise(fluxes, seeds, n2i_steps, lines):
    methods = dn.classical_methods()
    sup = dn.load_pretrained("msd_bone_implant")
    deep = dn.load_pretrained("msd_deep_bone_implant")
    nets25 = {}
    for which in NETS_25D:
        try:
            nets25[which] = dn.load_pretrained(which)
        except ValueError:
            print(f"{which}: not shipped, skipped", flush=True)
    n2i0 = dn.load_pretrained("msd_n2i_bone_implant")
    rows, gaps, gains, deep_gains = [], [], [], []
    for flux in fluxes:
        val = scan(300, flux)
        tuned = {m: dn.tune_classical(val["reconstruction"][sl], val["truth"][sl], m, mask=val["mask"])
                 for m in methods for sl in [slice(None) if m == "bm4d" else slice(None, None, 4)]}
        for seed in seeds:
            te = scan(seed, flux)
            m, truth, rec = te["mask"], te["truth"], te["reconstruction"]
            res = {"FBP (no denoising)": (dn.evaluate(rec, truth, mask=m), 0.0)}
            for meth in methods:
                out, s = timed(dn.classical_filter, rec, meth, tuned[meth]["strength"])
                res[f"{meth} ({tuned[meth]['strength']})"] = (dn.evaluate(out, truth, mask=m), s)
            out, s = timed(sup, rec, progress=False)
            res["MSD supervised (shipped)"] = (dn.evaluate(out, truth, mask=m), s)
            out, s = timed(deep, rec, progress=False)
            res[DEEP] = (dn.evaluate(out, truth, mask=m), s)
            out, s = timed(deep, rec, progress=False, tta=True)
            res[DEEP_TTA] = (dn.evaluate(out, truth, mask=m), s)
            for which, net25 in nets25.items():
                for tta in (False, True):
                    out, s = timed(net25, rec, progress=False, tta=tta)
                    res[name_25d(which, tta)] = (dn.evaluate(out, truth, mask=m), s)
            subs = dn.split_reconstructions(te["projections"], te["angles"], 2)
            pred, s = timed(lambda: np.mean([n2i0(subs[1 - j], progress=False) for j in range(2)], 0))
            res["Noise2Inverse K=2 (shipped, no fine-tune)"] = (dn.evaluate(pred, truth, mask=m), s)
            import copy
            start = dn.Denoiser(copy.deepcopy(n2i0.net), n2i0.offset, n2i0.scale)
            out, s = timed(dn.noise2inverse, te["projections"], te["angles"], 2, model=start, steps=n2i_steps,
                           lr=5e-4, progress=False)
            res[f"Noise2Inverse K=2 (fine-tuned {n2i_steps} steps on this scan)"] = (dn.evaluate(out, truth, mask=m), s)
            best_cl = max((v[0]["psnr"], k) for k, v in res.items() if k.split(" ")[0] in methods)
            best_2d = max((v[0]["psnr"], k) for k, v in res.items() if k.split(" ")[0] in methods
                          and not k.startswith("bm4d"))
            p_sup = res["MSD supervised (shipped)"][0]["psnr"]
            p_n2i = res[f"Noise2Inverse K=2 (fine-tuned {n2i_steps} steps on this scan)"][0]["psnr"]
            gains.append(p_sup - best_cl[0])
            deep_gains.append((
                {name: res[name][0]["psnr"] - best_cl[0]
                 for name in (DEEP, DEEP_TTA, *(name_25d(w, t) for w in nets25 for t in (False, True)))},
                {name: res[name][0]["psnr"] - best_2d[0] for name in (DEEP, DEEP_TTA)}))   # vs per-slice filters
            gaps.append(p_sup - p_n2i)
            rows.append((flux, seed, res, best_cl))
            print(f"flux {flux} seed {seed}: " + ", ".join(f"{k}: {v[0]['psnr']:.2f}" for k, v in res.items()),
                  flush=True)
    lines += ["## Denoising (bone-implant phantom, held-out seeds)", "",
              "PSNR (dB) / SSIM inside the reconstruction circle vs the phantom; seconds for 16 slices of 128 x 128 "
              "(classical strength in brackets, tuned on the validation phantom).", ""]
    for flux, seed, res, best in rows:
        lines += [f"### flux {flux:g} counts/pixel, test phantom seed {seed}", "",
                  f"Best classical: {best[1]} ({best[0]:.2f} dB).", "",
                  "| method | PSNR | SSIM | seconds |", "|---|---|---|---|"]
        lines += [f"| {k} | {v[0]['psnr']:.2f} | {v[0]['ssim']:.3f} | {v[1]:.1f} |" for k, v in res.items()]
        lines += [""]
    return gains, gaps, deep_gains


def bench_phase(n_iter, lines, size):
    E, Z, PX = 20.0, 0.05, 1e-6
    sims = {}
    for seed in (20, 21):
        ph = P.mixed_material_phantom((size, size, size), E, PX, seed=seed)
        sims[seed] = P.simulate_phase_contrast(ph["delta"], ph["beta"], E, Z, PX, flux=1e4, seed=seed)
    rmse = lambda a, s: float(np.sqrt(np.mean((a - s["phase"]) ** 2)))
    grid = [30, 50, 75, 100, 130, 175, 230, 300, 500, 1000, 2250]
    val = [rmse(P.retrieve(sims[20]["intensity"], E, Z, PX, "paganin", delta_beta=g), sims[20]) for g in grid]
    best = grid[int(np.argmin(val))]
    te = sims[21]
    rows = []
    for name, db in (("Paganin, water delta/beta (2247)", 2247.0), ("Paganin, hydroxyapatite (174)", 174.0),
                     ("Paganin, titanium (65)", 65.0), (f"Paganin, tuned on validation ({best})", float(best))):
        out, s = timed(P.retrieve, te["intensity"], E, Z, PX, "paganin", delta_beta=db)
        rows.append((name, rmse(out, te), s))
    for ovs in (1, 2):
        out, s = timed(P.retrieve, te["intensity"], E, Z, PX, "physics", delta_beta=float(best), n_iter=n_iter,
                       oversample=ovs, progress=False)
        grid_note = "forward model on the detector grid" if ovs == 1 else f"forward model on a {ovs}x grid, default"
        rows.append((f"physics-informed MSD generator ({n_iter} it, start {best}; {grid_note})", rmse(out, te), s))
    lines += ["## Phase retrieval (mixed-material projection, 20 keV, 1 um, 5 cm, 1e4 photons)", "",
              f"Test phantom seed 21, {size} x {size}; phase range {te['phase'].min():.1f}..0 rad; "
              f"Fresnel number {te['fresnel_number']:.2f}. Simulated on a 4x finer grid (the default of "
              "`simulate_phase_contrast`), so no retrieval has the exact simulation model.", "",
              "| method | phase RMSE (rad) | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {r:.3f} | {s:.1f} |" for n, r, s in rows]
    lines += [""]
    return rows[3][1], rows[5][1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one flux, one phantom, fewer iterations")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    lines = ["# Denoising and phase retrieval", "",
             "Measured by `python benchmarks/denoise_phase.py" + (" --quick" if args.quick else "") + "` on "
             "a shared 2-core CPU (timings include contention from other processes).", ""]
    fluxes, seeds = ((1000.0,), (10,)) if args.quick else ((500.0, 2000.0), (10, 11))
    gains, gaps, deep_gains = bench_denoise(fluxes, seeds, 60 if args.quick else 150, lines)
    pag, phys = bench_phase(30 if args.quick else 100, lines, 64 if args.quick else 128)
    ok = lambda c: "MET" if c else "NOT MET"
    fmt = lambda xs: ", ".join(f"{x:+.2f}" for x in xs)
    per = {name: [d[0][name] for d in deep_gains] for name in deep_gains[0][0]}
    per_2d = {name: [d[1][name] for d in deep_gains] for name in deep_gains[0][1]}
    best_rows = [min(gains)] + [min(v) for v in per.values()]
    lines += ["## Targets", "",
              "- MSD (supervised) >= 2 dB PSNR over the best classical filter (every case), the best classical "
              "being the best of all filters incl. BM4D, which uses the neighbouring slices: 30-layer CPU-trained "
              f"network, median gain {float(np.median(gains)):+.2f} dB (per case {fmt(gains)}); "
              + "; ".join(f"{k}: median {float(np.median(v)):+.2f} dB (per case {fmt(v)})" for k, v in per.items())
              + f" -> **{ok(max(best_rows) >= 2)}**. Against the best *per-slice* filter only (as in earlier "
              "runs, before BM4D was measured): "
              + "; ".join(f"{k}: median {float(np.median(v)):+.2f} dB (per case {fmt(v)})"
                          for k, v in per_2d.items()) + ".",
              f"- Noise2Inverse within 1 dB of supervised -- the supervised network of the same size (30 layers; the "
              f"100-layer network is deeper and trained longer, not a like-for-like reference): median gap "
              f"{float(np.median(gaps)):.2f} dB (per case {', '.join(f'{x:.2f}' for x in gaps)}) -> "
              f"**{ok(max(gaps) <= 1)}**",
              f"- Physics-informed phase RMSE <= 0.5 x Paganin's (best tuned delta/beta): {phys:.3f} vs "
              f"{pag:.3f} rad (ratio {phys / pag:.2f}) -> **{ok(phys <= 0.5 * pag)}**", "",
              f"Total run time {time.perf_counter() - t0:.0f} s.", ""]
    text = "\n".join(lines)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
