"""One small training loop for every network in tomoml_nb.

Device choice, seeding, tqdm progress, validation, checkpoints and resume live here so
the method modules only define a model, a batch sampler and a loss.

Examples
--------
>>> import torch
>>> from tomoml_nb.train import fit, seed_everything
>>> seed_everything(0)
>>> model = torch.nn.Linear(2, 1)
>>> x = torch.randn(64, 2); y = x.sum(1, keepdim=True)
>>> def batches(step, rng):
...     i = torch.from_numpy(rng.integers(0, 64, 16))
...     return x[i], y[i]
>>> hist = fit(model, batches, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
...            steps=200, lr=0.05, progress=False)
>>> hist["loss"][-1] < hist["loss"][0]
True
"""
from __future__ import annotations

import glob
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["resolve_device", "seed_everything", "fit", "save_checkpoint", "load_checkpoint", "check_checkpoint_path",
           "limit_cpu_threads"]


def resolve_device(device="auto"):
    """``"auto"`` → CUDA when available, else CPU; any torch device string otherwise.

    Examples
    --------
    >>> str(resolve_device("cpu"))
    'cpu'
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:0')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no GPU is available; use device='auto' or 'cpu'")
    return dev


def _free_cpus() -> int:
    """Cores not busy with other processes right now (Linux run queue), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            running = int(fh.read().split()[3].split("/")[0])
        own = 0  # our own runnable threads (this one, spinning OpenMP workers) are not "others"
        for stat in glob.glob(f"/proc/{os.getpid()}/task/*/stat"):
            try:
                with open(stat, encoding="ascii", errors="replace") as fh:
                    own += fh.read().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                pass
    except (OSError, ValueError, IndexError):
        return n
    return max(1, n - max(running - own, 0))


@contextmanager
def limit_cpu_threads(device=None):
    """Run torch CPU work with no more intra-op threads than there are idle cores.

    Projectors and small networks issue thousands of small operations; when the cores are
    shared with other processes (a busy beamline workstation, a workshop laptop running
    several kernels), OpenMP threads waiting for each other make them 5-20x slower than one
    thread (measured on a shared 2-core machine), so the thread count steps down for the
    duration of the block and is restored afterwards. A no-op for GPU devices.

    Examples
    --------
    >>> import torch
    >>> with limit_cpu_threads():
    ...     _ = torch.ones(4).sum()
    """
    import torch

    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    new = min(old, _free_cpus())
    if new != old:
        torch.set_num_threads(new)
    try:
        yield
    finally:
        if new != old:
            torch.set_num_threads(old)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for reproducible training."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


#: Tag stored in every checkpoint written by :func:`save_checkpoint`.
CHECKPOINT_FORMAT = "tomoml_nb.train.checkpoint/1"


def save_checkpoint(path, model, optimizer=None, step: int = 0, history: dict | None = None, *,
                    overwrite: bool = False, **extra) -> Path:
    """Save model (and optimizer) state atomically: a crash never leaves a half-written file.

    An existing file at ``path`` is refused (``FileExistsError``) unless ``overwrite=True``
    (:func:`fit` checks the path once before training, then overwrites its own checkpoint).
    """
    import torch

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"checkpoint: {path} already exists and is not overwritten; choose another path "
                              "or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "step": step, "history": history or {},
             **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path, model=None, optimizer=None, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model``/``optimizer``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is not a readable training checkpoint, or it holds another network
        (another architecture or size) than ``model``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint: {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not _is_checkpoint(state):
        what = f"format {state.get('format')!r}" if isinstance(state, dict) and "format" in state \
            else type(state).__name__
        raise ValueError(f"checkpoint: {path} is not a training checkpoint written by tomoml_nb (it holds {what})")
    if model is not None:
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, KeyError, TypeError) as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            first = next((ln for ln in lines if not ln.endswith(":")), lines[0] if lines else type(exc).__name__)
            raise ValueError(f"checkpoint: {path} was saved from a different network than this one (another "
                             f"architecture or size: {first[:200]}); resume only with the same settings, or "
                             "choose another path") from exc
    if optimizer is not None and "optimizer" in state:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"checkpoint: {path} holds an optimizer state that does not match this network "
                             f"({exc}); resume only with the same settings, or choose another path") from exc
    return state


def _is_checkpoint(state) -> bool:
    """A dict written by :func:`save_checkpoint` (tagged, or from before the tag: model + step)."""
    if not isinstance(state, dict):
        return False
    if state.get("format") == CHECKPOINT_FORMAT:
        return True
    return "format" not in state and isinstance(state.get("model"), dict) and "step" in state


def check_checkpoint_path(checkpoint, resume=False):
    """Check a ``checkpoint`` path before training; return it as a Path (or None).

    Nothing a user owns is overwritten: an existing file is refused unless ``resume`` is
    True, and then it must be a readable tomoml_nb checkpoint (checked when it is loaded by
    :func:`load_checkpoint`, before any training step). A folder is refused.

    Examples
    --------
    >>> check_checkpoint_path(None) is None
    True
    """
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint: expected a file path, got {type(checkpoint).__name__}")
    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"checkpoint: {path} is a folder; give a file path such as {path / 'training.ckpt'}")
    if path.exists() and not resume:
        raise FileExistsError(f"checkpoint: {path} already exists and is not overwritten; pass resume=True to "
                              "continue from it, or choose another path")
    return path


def fit(model, batches: Callable, loss_fn: Callable, *, steps: int = 100, lr: float = 1e-3,
        weight_decay: float = 0.0, optimizer=None, scheduler: str | None = "cosine",
        validate: Callable | None = None, val_every: int = 50, checkpoint=None, checkpoint_every: int = 100,
        resume: bool = False, device="auto", seed: int = 0, progress: bool = True, desc: str = "training",
        time_limit: float | None = None, keep_best: bool = False, higher_is_better: bool = False) -> dict:
    """Train ``model`` for ``steps`` optimisation steps.

    Parameters
    ----------
    model : torch.nn.Module
    batches : callable ``(step, rng) -> batch``
        Returns one batch (tensors or tuples of tensors, on any device; moved to ``device``).
    loss_fn : callable ``(model, batch) -> scalar tensor``
    steps : int
        Number of optimisation steps.
    lr, weight_decay : float
        AdamW settings (when ``optimizer`` is None).
    scheduler : {"cosine", None}
        Learning-rate schedule: cosine from ``lr`` down to ``0.05 * lr`` over ``steps`` -- or,
        with ``time_limit``, over whichever runs out first, steps or time (the schedule's
        position is the larger of the two fractions used), so a run stopped by its time
        budget still ends annealed instead of mid-schedule.
    validate : callable ``(model) -> float``, optional
        Evaluated every ``val_every`` steps and at the end (model in eval mode, no grad);
        recorded in ``history["val"]``.
    checkpoint : path, optional
        Where to save ``{model, optimizer, step, history}`` every ``checkpoint_every`` steps
        and at the end. With ``resume=True`` training continues from it when it exists.
        An existing file is never overwritten without ``resume=True``
        (``FileExistsError``), and with it only when it is a tomoml_nb checkpoint of the
        same network (else ``ValueError`` naming ``checkpoint``); see
        :func:`check_checkpoint_path`.
    device : str
        ``"auto"`` picks CUDA when available.
    time_limit : float, optional
        Stop early after this many seconds (the history records where it stopped). With the
        cosine schedule, the remaining time also drives the schedule (see ``scheduler``), so
        the number of steps then depends on the machine's speed.
    keep_best : bool
        With ``validate``: end with the weights of the best validation value seen (checked
        every ``val_every`` steps and at the end) instead of the last ones; ``history``
        records it as ``"best": (step, value)``. A ``checkpoint`` keeps the last state (for
        ``resume``).
    higher_is_better : bool
        Direction of ``validate``'s value for ``keep_best`` (False: a loss, lower is better).

    Returns
    -------
    dict
        ``{"loss": [...], "lr": [...], "val": [(step, value), ...], "steps": n_done,
        "seconds": t}`` (``lr``: the first parameter group's rate at each step; plus ``"best"``
        with ``keep_best``).

    Examples
    --------
    A time budget anneals the schedule to its floor, even when it stops the run early:

    >>> import torch
    >>> def batches(step, rng):
    ...     x = torch.from_numpy(rng.normal(size=(8, 3)).astype("float32"))
    ...     return x, x.sum(1, keepdim=True)
    >>> def loss_fn(m, b):
    ...     return torch.nn.functional.mse_loss(m(b[0]), b[1])
    >>> h = fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=10 ** 6, lr=0.1, time_limit=0.5,
    ...         progress=False)
    >>> h["steps"] < 10 ** 6, round(h["lr"][0], 3), round(h["lr"][-1], 3)
    (True, 0.1, 0.005)
    """
    import torch
    from tqdm.auto import tqdm

    from ._validate import check_positive

    check_positive(steps, "steps", integer=True)
    check_positive(lr, "lr")
    if scheduler not in ("cosine", None):
        raise ValueError(f"scheduler: unknown {scheduler!r}; use 'cosine' or None")
    if time_limit is not None:
        check_positive(time_limit, "time_limit")
    checkpoint = check_checkpoint_path(checkpoint, resume)
    dev = resolve_device(device)
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    model.to(dev)
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    peak = [g["lr"] for g in opt.param_groups]  # before a checkpoint's optimizer state replaces them
    history = {"loss": [], "val": [], "lr": []}
    start_step = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, model, opt, map_location=dev)
        start_step = int(state.get("step", 0))
        history = state.get("history") or history
        history.setdefault("lr", [])
        rng = np.random.default_rng([seed, start_step])

    def set_lr(position):
        """Cosine from the peak rates (position 0) to 5 % of them (position >= 1)."""
        if scheduler is None:
            return
        w = 0.5 * (1.0 + math.cos(math.pi * min(max(position, 0.0), 1.0)))
        for g, top in zip(opt.param_groups, peak):
            g["lr"] = top * (0.05 + 0.95 * w)

    set_lr(start_step / steps)

    def to_dev(b):
        if isinstance(b, torch.Tensor):
            return b.to(dev, non_blocking=True)
        if isinstance(b, (list, tuple)):
            return type(b)(to_dev(x) for x in b)
        if isinstance(b, dict):
            return {k: to_dev(v) for k, v in b.items()}
        return b

    best = {}

    def run_validation(step):
        if validate is None:
            return
        model.eval()
        with torch.no_grad():
            value = float(validate(model))
        model.train()
        history["val"].append((step, value))
        if keep_best and (not best or (value > best["value"] if higher_is_better else value < best["value"])):
            best.update(step=step, value=value,
                        state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})

    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(start_step, steps), desc=desc, disable=not progress, initial=start_step, total=steps)
    step = start_step
    for step in bar:
        batch = to_dev(batches(step, rng))
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss: became {loss.item()} at step {step}; lower lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["lr"].append(float(opt.param_groups[0]["lr"]))
        done = (step + 1) / steps
        if time_limit is not None:
            done = max(done, (time.perf_counter() - t0) / time_limit)
        set_lr(done)
        history["loss"].append(float(loss.detach()))
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(history['loss'][-10:]):.4f}")
        if validate is not None and (step + 1) % val_every == 0:
            run_validation(step + 1)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoint, model, opt, step + 1, history, overwrite=True)
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            step += 1
            break
    else:
        step = steps
    bar.close()
    if validate is not None and (not history["val"] or history["val"][-1][0] != step):
        run_validation(step)
    if best:
        history["best"] = (best["step"], best["value"])
    if checkpoint is not None:   # the last state, so that a resumed run continues where this one stopped
        save_checkpoint(checkpoint, model, opt, step, history, overwrite=True)
    if best and best["step"] != step:
        model.load_state_dict(best["state"])
    model.eval()
    history["steps"] = step
    history["seconds"] = time.perf_counter() - t0
    return history
