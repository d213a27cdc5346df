"""Benchmark: 3D instance segmentation of touching fibres (EmbedSeg-style network vs watershed).

    python benchmarks/instance.py            # 256^3 held-out phantom, memory 128^3 -> 512^3
    python benchmarks/instance.py --quick    # 128^3, memory 64^3 -> 128^3 (a smoke run)

Held-out data: ``phantoms.fibres`` with seed 7001 (training used seeds 1001+, validation
900), noise 0.05, density like training. The watershed baseline's parameters are tuned on
the validation phantom (seed 900), never on the test volume.

Measured on the same volume, side by side: the network on the whole volume in one pass,
tiled with several tile sizes (IoU stitching), tiled with naive stitching, and the
distance-transform watershed. Metrics: AP at IoU 0.5 / 0.75 and mean over 0.5:0.05:0.95
with AP = TP / (TP + FP + FN) (Data Science Bowl definition), VI split / merge (bits,
foreground voxels only), fibres merged (true fibres sharing their majority predicted
object), and *stitch merges*: pairs of true fibres that whole-volume inference kept in
different objects but the tiled result puts in one, although no single tile object holds
both (so the join was made by the stitching, not by the labeller inside a tile). The
stitching is also measured with two other labellers on the same tiles: the watershed
baseline, and the true labels cut into tiles (an oracle labeller: any loss of accuracy
is then the stitching's own). Time = median of ``--repeats`` runs
(wall clock, this machine). Peak memory: a fresh subprocess per volume size reads the
volume from a zarr array, segments it tile by tile into a zarr array, and reports
its peak resident memory (``VmHWM``, see ``benchmarks/_memory.py``; results made before
2026-12-08 used ``ru_maxrss``, an upper bound that includes the parent's peak).

Writes ``benchmarks/results/instance.md`` and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEST_SEED = 7001


def fibre_phantom(n, seed):
    from tomoml_nb import phantoms

    area = (n / 128) ** 2
    return phantoms.fibres((n, n, n), n_fibres=int(110 * area), seed=seed, noise=0.05)


def homes(pred, truth):
    """For every true fibre, the predicted object holding most of its voxels (0 if none)."""
    m = (truth > 0) & (pred > 0)
    if not m.any():
        return {}
    t, p = truth[m].astype(np.int64), pred[m].astype(np.int64)
    key, cnt = np.unique(t * (int(pred.max()) + 1) + p, return_counts=True)
    tt, pp = key // (int(pred.max()) + 1), key % (int(pred.max()) + 1)
    order = np.lexsort((-cnt, tt))
    first = np.r_[True, tt[order][1:] != tt[order][:-1]]
    return dict(zip(tt[order][first].tolist(), pp[order][first].tolist()))


def merged_pairs(pred, truth):
    """Pairs of true fibres whose majority predicted object is the same."""
    groups = {}
    for f, h in homes(pred, truth).items():
        groups.setdefault(h, []).append(f)
    return {(a, b) for fs in groups.values() for i, a in enumerate(sorted(fs)) for b in sorted(fs)[i + 1:]}


def pairs_joined_in_tiles(truth, layout, tile_labels, min_voxels=20):
    """Pairs of true fibres of which one single tile object holds ``min_voxels`` or more each."""
    out = set()
    for (sl, _), lab in zip(layout, tile_labels):
        tr = truth[sl]
        m = (lab > 0) & (tr > 0)
        key, cnt = np.unique(np.stack([lab[m], tr[m]]), axis=1, return_counts=True)
        held = {}
        for obj, fibre in key[:, cnt >= min_voxels].T.tolist():
            held.setdefault(obj, []).append(fibre)
        for fs in held.values():
            fs = sorted(fs)
            out |= {(a, b) for i, a in enumerate(fs) for b in fs[i + 1:]}
    return out


def _pieces_of(obj_id, tiled, layout, tile_labels):
    """How many tile objects make up the stitched object ``obj_id`` (each voxel comes from the tile whose core holds it)."""
    n = 0
    for (sl, core), lab in zip(layout, tile_labels):
        m = tiled[core] == obj_id
        if m.any():
            local = lab[tuple(slice(c.start - s.start, c.stop - s.start) for c, s in zip(core, sl))]
            n += len(np.unique(local[m]))
    return n


def stitch_merges(tiled, whole, truth, layout, tile_labels, min_voxels=20):
    """Pairs of true fibres merged in ``tiled`` by the stitching itself.

    A pair counts when the two fibres share their majority object in the stitched result, were
    kept apart by whole-volume inference, that object is made of two or more tile objects (so the
    stitching joined something), and no single tile object holds ``min_voxels`` (the labeller's
    smallest object) or more of each -- so the labeller inside every tile kept them apart and the
    join came from matching across tiles. (Earlier versions judged "kept apart in a tile" by the
    fibres' majority objects in that tile, which blamed the stitching for a tile object holding
    615 + 593 voxels of two touching fibres; and without the two-tile-objects rule a 25-voxel fibre
    at the volume border, whose majority object was 4 of its voxels inside one tile object, counted
    as a stitch merge.)
    """
    in_tiles = pairs_joined_in_tiles(truth, layout, tile_labels, min_voxels)
    home = homes(tiled, truth)
    pairs = merged_pairs(tiled, truth) - merged_pairs(whole, truth) - in_tiles
    pieces = {h: _pieces_of(h, tiled, layout, tile_labels) for h in {home[a] for a, _ in pairs}}
    return sum(1 for a, _ in pairs if pieces[home[a]] >= 2)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


MEM_CHILD = r"""
import sys, time, json
import numpy as np, zarr
sys.path[:0] = [{root!r}, {bench!r}]
from tomoml_nb import instance
from _memory import peak_mb   # VmHWM: ru_maxrss would carry the parent's peak over fork + exec
src = zarr.open({src!r}, mode="r")
dst = zarr.open({dst!r}, mode="w", shape=src.shape, chunks=(64, 64, 64), dtype="i4")
t = time.perf_counter()
instance.segment_instances(src, "pretrained", tile_shape={tile!r}, out=dst, device="cpu", progress=False)
sec = time.perf_counter() - t
lab = dst[...] if src.shape[0] <= 256 else None
print(json.dumps({{"maxrss_mb": peak_mb(), "seconds": sec,
                  "n_labels": int(lab.max()) if lab is not None else None}}))
"""

MAKE_CHILD = r"""
import sys, numpy as np, zarr
sys.path.insert(0, {root!r})
from tomoml_nb import phantoms
base = phantoms.fibres((128, 128, 128), n_fibres=110, seed={seed}, noise=0.05).image
n = {n}
reps = -(-n // 128)
z = zarr.open({path!r}, mode="w", shape=(n, n, n), chunks=(64, 64, 64), dtype="f4")
for i in range(reps):
    zs = slice(i * 128, min(n, (i + 1) * 128))
    block = base[: zs.stop - zs.start] if i % 2 == 0 else base[::-1][: zs.stop - zs.start]
    row = np.concatenate([block if j % 2 == 0 else block[:, ::-1] for j in range(reps)], axis=1)[:, :n]
    z[zs] = np.concatenate([row if j % 2 == 0 else row[:, :, ::-1] for j in range(reps)], axis=2)[:, :, :n]
"""


def memory_run(n, tile, tmp, seed):
    path = os.path.join(tmp, f"vol{n}.zarr")
    subprocess.run([sys.executable, "-c", MAKE_CHILD.format(root=str(ROOT), seed=seed, n=n, path=path)],
                   check=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    res = subprocess.run([sys.executable, "-c", MEM_CHILD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"),
                                                                 src=path,
                                                                 dst=os.path.join(tmp, f"lab{n}.zarr"),
                                                                 tile=tuple(tile))],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_memory(args, net, window, mem_sizes):
    """Peak RSS of tiled inference per volume size (or the cached figures with --skip-memory)."""
    mem = []
    mem_tile = tuple(2 * w for w in window)
    mem_cache = Path(args.out).with_name("instance_memory.json")
    mem_note = ""
    if not args.skip_memory:
        mem_cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for m in mem_sizes:
                print(f"memory: {m}^3", flush=True)
                r = memory_run(m, mem_tile, tmp, TEST_SEED + 1)
                mem.append((m, r))
                print(f"  {m}^3: peak RSS {r['maxrss_mb']:.0f} MB, {r['seconds']:.0f} s", flush=True)
                if mem_cache.is_file():                       # keep figures of other sizes from the same tiling
                    old = json.loads(mem_cache.read_text())
                    if tuple(old.get("tile", ())) == mem_tile and old.get("quick") == args.quick:
                        done = {k for k, _ in mem}
                        mem = sorted([(k, v) for k, v in old["runs"] if k not in done] + mem)
                mem_cache.write_text(json.dumps({"tile": mem_tile, "config": net.tomoml_config,
                                                 "quick": args.quick, "runs": mem}))
    elif mem_cache.is_file():
        cached = json.loads(mem_cache.read_text())
        if cached.get("quick") == args.quick:
            mem = [(m, r) for m, r in cached["runs"]]
            mem_tile = tuple(cached["tile"])
            mem_note = (f" Measured in an earlier run of this script with weights of config {cached['config']} "
                        f"(`--skip-memory` reuses `{mem_cache.name}`).")
    return mem, mem_tile, mem_note


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-memory", action="store_true", help="reuse the last memory figures if present")
    ap.add_argument("--memory-only", action="store_true", help="measure the peak memory only")
    ap.add_argument("--memory-sizes", type=int, nargs="+", default=None,
                    help="volume edges for the memory runs (default 128 256 512; quick: 64 128); new figures "
                         "are merged into the cached ones")
    ap.add_argument("--tile-factors", type=float, nargs="+", default=[1.0, 2.0],
                    help="tile sizes as multiples of the network window (the first is the default tiling)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "instance.md"))
    args = ap.parse_args(argv)

    from tomoml_nb import instance, metrics
    from tomoml_nb.train import limit_cpu_threads
    from torch import device as torch_device

    n = 128 if args.quick else 256
    mem_sizes = tuple(args.memory_sizes or ((64, 128) if args.quick else (128, 256, 512)))
    net = instance.load_pretrained()
    window = tuple(int(w) for w in net.tomoml_window)
    hist = getattr(net, "tomoml_history", {})
    meta = getattr(net, "tomoml_meta", {})
    print(f"weights: window {window}, config {net.tomoml_config}, trained on {meta.get('gpu') or 'CPU'}", flush=True)

    if args.memory_only:
        print(json.dumps(measure_memory(args, net, window, mem_sizes)[0]))
        return
    ph = fibre_phantom(n, TEST_SEED)
    truth = ph.labels
    val = fibre_phantom(128, 900) if not args.quick else fibre_phantom(96, 900)
    t = time.perf_counter()
    ws_kw, ws_val_ap = instance.tune_watershed(val.image, val.labels, smooths=(0.5, 1.0),
                                               hs=(0.3, 0.6, 1.0, 1.5, 2.5), min_distances=(1, 3),
                                               progress=False)
    print(f"watershed tuned on the validation phantom in {time.perf_counter() - t:.0f} s: {ws_kw} "
          f"(validation AP@0.5 {ws_val_ap:.3f})", flush=True)

    rows = []
    results = {}

    def add(name, fn, note=""):
        print(f"running: {name}", flush=True)
        with limit_cpu_threads("cpu"):
            lab, sec = timed(fn, args.repeats)
        ev = instance.evaluate(lab, truth)
        results[name] = lab
        rows.append({"method": name, "seconds": sec, "vox_per_s": truth.size / sec, **ev, "note": note})
        print(f"  {name}: AP50 {ev['ap50']:.3f} AP75 {ev['ap75']:.3f} merged {ev['merged']} "
              f"in {sec:.1f} s", flush=True)

    add("watershed (whole volume)", lambda: instance.watershed_instances(ph.image, **ws_kw))
    add("EmbedSeg, whole volume (one pass)", lambda: instance.segment_instances(
        ph.image, net, tile_shape="whole", device="cpu", progress=False, max_voxels=truth.size))
    tiles = [tuple(int(f * w) // 8 * 8 for w in window) for f in args.tile_factors]
    # the default tiling records its tile labels, so that naive stitching can be applied to the very
    # same tiles afterwards (it is the same computation as segment_instances(..., tile_shape=window))
    from tomoml_nb import tiling

    lo, hi = instance._percentile_range(ph.image)
    vs = instance._voxel_size(net.tomoml_voxel_size)
    recorded = []

    def record(block):
        lab = instance._segment_block(net, (np.asarray(block, np.float32) - lo) / (hi - lo),
                                      torch_device("cpu"), vs, dict(net.tomoml_cluster))
        recorded.append(lab)
        return lab

    tiled_runs = {}                    # method name -> (tile shape, overlap, tile labels, reference result)
    overlap_of = lambda ts: tuple(int(min(max(t // 4, 8), t // 2)) for t in ts)

    def run_tiled(ts):
        recorded.clear()
        out = tiling.label_tiles(ph.image, record, ts, overlap_of(ts), progress=False)
        tiled_runs[f"EmbedSeg, tiles {ts}, IoU stitching"] = (ts, overlap_of(ts), list(recorded),
                                                              "EmbedSeg, whole volume (one pass)")
        return out

    for ts in tiles:
        add(f"EmbedSeg, tiles {ts}, IoU stitching", lambda ts=ts: run_tiled(ts))
    ov = overlap_of(window)
    recorded_window = tiled_runs[f"EmbedSeg, tiles {window}, IoU stitching"][2]
    name = f"EmbedSeg, tiles {window}, naive stitching"
    add(name, lambda: tiling.stitch_labels(ph.image.shape, recorded_window, window, ov, stitch="naive",
                                           progress=False), note="stitching time only (same tile labels)")
    tiled_runs[name] = (window, ov, recorded_window, "EmbedSeg, whole volume (one pass)")

    # the same stitching with other labellers on the same tiles: the watershed baseline, and the true
    # labels cut into tiles (each fibre's connected pieces inside the tile) -- an oracle labeller
    def oracle(sl):
        tr, lab, n_obj = truth[sl], np.zeros(truth[sl].shape, np.int32), 0
        for f in np.unique(tr[tr > 0]):
            pieces, k = ndi.label(tr == f)
            lab[pieces > 0] = pieces[pieces > 0] + n_obj
            n_obj += k
        return lab

    layout = tiling.tile_cores(truth.shape, window, ov)
    results["true labels (whole volume)"] = truth
    for lname, make, ref in (
            ("watershed", lambda sl: instance.watershed_instances(ph.image[sl], **ws_kw), "watershed (whole volume)"),
            ("true labels cut into tiles (oracle labeller)", oracle, "true labels (whole volume)")):
        tile_labels = [make(sl) for sl, _ in layout]
        for mode in ("iou", "naive"):
            name = f"{lname}, tiles {window}, {'IoU' if mode == 'iou' else 'naive'} stitching"
            add(name, lambda tl=tile_labels, mode=mode: tiling.stitch_labels(
                ph.image.shape, tl, window, ov, stitch=mode, progress=False), note="stitching time only")
            tiled_runs[name] = (window, ov, tile_labels, ref)
    for r in rows:
        r["stitch_merges"] = None
        if r["method"] in tiled_runs:
            ts, ov_, tl, ref = tiled_runs[r["method"]]
            r["stitch_merges"] = stitch_merges(results[r["method"]], results[ref], truth,
                                               tiling.tile_cores(truth.shape, ts, ov_), tl)

    # how much the overlap matters to the stitching itself: the oracle labeller at several overlaps
    overlap_sweep = []
    for frac in (4, 8 / 3, 2):
        ov_s = tuple(int(min(max(round(t / frac), 8), t // 2)) for t in window)
        lay = tiling.tile_cores(truth.shape, window, ov_s)
        st = tiling.stitch_labels(truth.shape, [oracle(sl) for sl, _ in lay], window, ov_s, progress=False)
        ev = instance.evaluate(st, truth)
        overlap_sweep.append((ov_s, len(lay), ev["ap50"], ev["n_pred"], ev["split"], ev["merged"]))
        print(f"oracle labeller, overlap {ov_s}: AP50 {ev['ap50']:.3f}, {len(lay)} tiles", flush=True)

    mem, mem_tile, mem_note = measure_memory(args, net, window, mem_sizes)

    # ---- report -----------------------------------------------------------------------------
    by = {r["method"]: r for r in rows}
    tiled_native = by[f"EmbedSeg, tiles {window}, IoU stitching"]
    best_ml = max((r for r in rows if r["method"].startswith("EmbedSeg") and "naive" not in r["method"]),
                  key=lambda r: r["ap50"])
    whole_r = by["EmbedSeg, whole volume (one pass)"]
    lines = [f"## Instance segmentation of touching fibres ({'quick, ' if args.quick else ''}{n}³ held-out phantom)", "",
             f"Held-out `phantoms.fibres(({n}, {n}, {n}), seed={TEST_SEED}, noise=0.05)` ({int(truth.max())} fibres, "
             f"{100 * (truth > 0).mean():.1f} % foreground). Network: `embedseg_fibres.pt` "
             f"(window {window}, base {net.tomoml_config['base']}, {net.tomoml_config['levels']} levels, trained on "
             f"{meta.get('gpu') or 'CPU'}; validation AP@0.5 during training {hist.get('val_ap50_best', float('nan')):.3f}). "
             f"Watershed parameters tuned on the validation phantom (seed 900): `{ws_kw}`.",
             f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs; "
             f"times are medians of {args.repeats} run(s).", "",
             "AP = TP / (TP + FP + FN) at the IoU threshold (mAP: mean over 0.5:0.05:0.95). VI in bits over "
             "foreground voxels. *merged*: true fibres whose majority object holds another true fibre too. "
             "*stitch merges*: pairs of fibres joined in the tiled result although whole-volume inference and the "
             "labeller inside every single tile kept them apart (joins made by the stitching itself).",
             "", "| method | AP@0.5 | AP@0.75 | mAP | SEG | VI split | VI merge | objects / fibres | merged | "
             "split | stitch merges | time (s) | voxels/s |", "|" + "---|" * 13]
    for r in rows:
        sm = "—" if r["stitch_merges"] is None else str(r["stitch_merges"])
        lines.append(f"| {r['method']}{' (' + r['note'] + ')' if r['note'] else ''} | {r['ap50']:.3f} | {r['ap75']:.3f} | {r['map']:.3f} | {r['seg']:.3f} | "
                     f"{r['vi_split']:.3f} | {r['vi_merge']:.3f} | {r['n_pred']} / {r['n_truth']} | {r['merged']} | "
                     f"{r['split']} | {sm} | {r['seconds']:.1f} | {r['vox_per_s']:.3g} |")
    lines += ["", f"Stitching alone, with the true labels cut into tiles {window} (the oracle labeller) at several "
              "overlaps: a fibre that leaves a tile and comes back is two pieces in that tile, and a thin overlap "
              "may hold too little of it for the IoU match. The default overlap (a quarter of the tile, at least 8) "
              "is the first row.", "",
              "| overlap | tiles | AP@0.5 | objects / fibres | split | merged |", "|---|---|---|---|---|---|"]
    lines += [f"| {o} | {nt} | {ap:.3f} | {npred} / {int(truth.max())} | {sp} | {mg} |"
              for o, nt, ap, npred, sp, mg in overlap_sweep]
    if mem:
        lines += ["", f"Peak memory of tiled inference (tiles {mem_tile}, twice the window, to keep the 512³ run "
                  "short on this CPU; zarr in and out; a fresh process per size; the volume is a mirrored tiling of "
                  "a 128³ fibre phantom)." + mem_note, "",
                  "| volume | peak RSS (MB) | time (s) |", "|---|---|---|"]
        lines += [f"| {m}³ | {r['maxrss_mb']:.0f} | {r['seconds']:.0f} |" for m, r in mem]
    ws = by["watershed (whole volume)"]
    t1 = best_ml["ap50"] >= 0.9
    t2 = tiled_native["ap50"] >= whole_r["ap50"] - 0.01
    iou_rows = lambda who: [r for r in rows if r["method"].startswith(who) and "IoU stitching" in r["method"]]
    t3 = all(r["stitch_merges"] == 0 for r in iou_rows("EmbedSeg"))
    biggest = mem[-1] if mem else None
    t4 = biggest is not None and biggest[0] >= 512 and biggest[1]["maxrss_mb"] < 3 * 1024
    lines += ["", "### Targets", "",
              f"- AP@0.5 ≥ 0.9 on the held-out phantom: best network result {best_ml['ap50']:.3f} "
              f"({best_ml['method']}) — **{'MET' if t1 else 'NOT MET'}** (watershed {ws['ap50']:.3f}).",
              f"- Tiled within 0.01 AP of whole-volume (read as: not worse by more than 0.01): tiles {window} "
              f"{tiled_native['ap50']:.3f} vs whole {whole_r['ap50']:.3f} — **{'MET' if t2 else 'NOT MET'}**"
              + (f" (not within 0.01 either way: the tiled result is "
                 f"{tiled_native['ap50'] - whole_r['ap50']:.3f} better; in one pass the network's offsets reach only across its window, so "
                 "fibres longer than the window come out in pieces)" if tiled_native["ap50"] > whole_r["ap50"] + 0.01
                 else "") + ".",
              f"- Zero fibres merged by IoU stitching that were separate in whole-volume inference: "
              + ", ".join(f"tiles ({r['method'].split('(')[1].split(')')[0]}): {r['stitch_merges']}"
                          for r in iou_rows("EmbedSeg"))
              + f" — **{'MET' if t3 else 'NOT MET'}** (naive stitching: "
              f"{by[f'EmbedSeg, tiles {window}, naive stitching']['stitch_merges']}). The same IoU stitching of the "
              f"watershed's tile labels: {iou_rows('watershed')[0]['stitch_merges']} (naive: "
              f"{by[f'watershed, tiles {window}, naive stitching']['stitch_merges']}); of the true labels cut into "
              f"tiles: {iou_rows('true labels')[0]['stitch_merges']} merges, AP@0.5 "
              f"{iou_rows('true labels')[0]['ap50']:.3f} (naive: {by[f'true labels cut into tiles (oracle labeller), tiles {window}, naive stitching']['ap50']:.3f}).",
              f"- 512³ tiled in < 3 GB RSS: "
              + (f"{biggest[1]['maxrss_mb']:.0f} MB at {biggest[0]}³ — **{'MET' if t4 else 'NOT MET'}**"
                 if biggest and biggest[0] >= 512 else
                 f"not measured at 512³ (largest measured: {biggest[0]}³, {biggest[1]['maxrss_mb']:.0f} MB)"
                 if biggest else "not measured (--skip-memory)") + "."]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
