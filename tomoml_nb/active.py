"""Active learning for segmentation: the model asks where an annotation helps most.

The loop of a guided, human-in-the-loop workflow for users who are not deep-learning
experts:

1. a **pool** of unlabelled slices (every ``stride``-th slice along each axis);
2. the current U-Net scores each candidate by its **uncertainty** (pixel entropy or
   the margin between the two most likely classes; ``"random"`` is the control);
3. the most uncertain slice is **queried** and annotated -- by a person with
   :func:`tomoml_nb.widgets.annotation_tool`, or by an :func:`oracle` that reads the
   ground truth (unattended runs, tests, benchmarks);
4. the network is **retrained** from its current weights (warm start, a few dozen steps)
   on all annotations so far, and the loop repeats.

:func:`run_active_learning` runs the loop with an oracle and records mean IoU on a
held-out volume after every round; :func:`plot_learning_curves` draws IoU against the
number of annotated slices.

Examples
--------
>>> from tomoml_nb import phantoms, active
>>> image, labels = phantoms.bone_implant((32, 32, 32), seed=0)
>>> learner = active.ActiveLearner(image, 5, strategy="entropy", steps_per_round=2, patch_size=32,
...                                batch_size=2, channels=(4, 8), progress=False)
>>> q = learner.query()[0]
>>> learner.teach(q, active.oracle(labels)(q))
>>> _ = learner.retrain()
>>> learner.n_annotated
1
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from ._validate import as_array, check_choice, check_positive, rng_from
from .segment import AXES, UNLABELLED, _check_axes, _check_label_array, normalize_intensity

__all__ = ["STRATEGIES", "Query", "uncertainty", "oracle", "error_oracle", "ActiveLearner", "run_active_learning",
           "annotations_to_reach", "plot_learning_curves"]

#: Query strategies: two uncertainty measures and the random control.
STRATEGIES = ("entropy", "margin", "random")


@dataclass(frozen=True)
class Query:
    """One slice asked for annotation: ``axis`` in {"z", "y", "x"}, ``index`` along it, and its score.

    In region mode (``ActiveLearner(region=...)``) ``window`` = ``(row0, row1, col0, col1)`` is
    the part of the slice to annotate; ``None`` means the whole slice.
    """

    axis: str
    index: int
    score: float = float("nan")
    window: tuple = None

    @property
    def key(self):
        return (self.axis, int(self.index))

    def __str__(self):
        s = "" if np.isnan(self.score) else f" (uncertainty {self.score:.3f})"
        w = "" if self.window is None else \
            f", rows {self.window[0]}-{self.window[1] - 1}, columns {self.window[2]}-{self.window[3] - 1}"
        return f"{self.axis} = {self.index}{w}{s}"


def _as_query(q):
    if isinstance(q, Query):
        return q
    try:
        axis, index = q
    except Exception as exc:
        raise TypeError(f"query: expected a Query or (axis, index), got {q!r}") from exc
    check_choice(axis, "query", AXES)
    return Query(axis, int(index))


def uncertainty(probabilities, method="entropy"):
    """Per-pixel uncertainty in [0, 1] from class probabilities ``(C, ...)``.

    Parameters
    ----------
    probabilities : array_like, shape (C, ...)
        Softmax output (sums to 1 over the first axis).
    method : {"entropy", "margin"}
        ``"entropy"``: Shannon entropy divided by ``log C``; ``"margin"``: one minus
        the gap between the two most likely classes.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.5, 1.0], [0.5, 0.0]])
    >>> uncertainty(p).round(3).tolist(), uncertainty(p, "margin").round(3).tolist()
    ([1.0, 0.0], [1.0, 0.0])
    """
    p = as_array(probabilities, "probabilities", dtype=np.float32)
    check_choice(method, "method", ("entropy", "margin"))
    if p.ndim < 2 or p.shape[0] < 2:
        raise ValueError(f"probabilities: expected shape (C >= 2, ...), got {p.shape}")
    if method == "entropy":
        h = -(p * np.log(np.clip(p, 1e-8, 1.0))).sum(0)
        return (np.clip(h / np.log(p.shape[0]), 0.0, 1.0) + 0.0).astype(np.float32)  # + 0.0: no -0.0
    top2 = np.partition(p, -2, axis=0)[-2:]
    return np.clip(1.0 - (top2[1] - top2[0]), 0.0, 1.0).astype(np.float32)


def oracle(labels):
    """An annotator that answers every query with the ground truth (for unattended runs).

    Returns a callable ``annotate(query) -> labels2d``.

    Examples
    --------
    >>> import numpy as np
    >>> annotate = oracle(np.arange(8).reshape(2, 2, 2))
    >>> annotate(("x", 1)).tolist()
    [[1, 3], [5, 7]]
    """
    lab = _check_label_array(labels, "labels")
    if lab.ndim != 3:
        raise ValueError(f"labels: expected a 3D label volume, got {lab.ndim}D")

    def annotate(query):
        q = _as_query(query)
        a = AXES.index(q.axis)
        if not 0 <= q.index < lab.shape[a]:
            raise IndexError(f"query: index {q.index} outside 0..{lab.shape[a] - 1} along {q.axis}")
        return np.take(lab, q.index, axis=a).copy()

    return annotate


def error_oracle(labels):
    """A query strategy that knows the truth: score = the current network's error on the slice.

    Uncertainty sampling estimates where the network is wrong; this strategy *knows* it (the
    share of the slice's pixels whose predicted class differs from ``labels``). It is the
    ideal version of uncertainty sampling, an upper bound for benchmarks -- not something a
    user can run on unlabelled data. Pass it as ``strategy`` to :class:`ActiveLearner` or
    :func:`run_active_learning` (slice mode only).

    Parameters
    ----------
    labels : array_like, 3D
        Ground truth of the pool volume.

    Returns
    -------
    callable ``score(probabilities, query) -> float`` (higher = asked first), named ``"error oracle"``.

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.zeros((2, 2, 2), int)
    >>> p = np.zeros((2, 2, 2)); p[1, 0, 0] = 1; p[0] = 1 - p[1]       # one of four pixels wrong
    >>> error_oracle(truth)(p, ("z", 0))
    0.25
    """
    lab = _check_label_array(labels, "labels")
    if lab.ndim != 3:
        raise ValueError(f"labels: expected a 3D label volume, got {lab.ndim}D")

    def score(probabilities, query):
        q = _as_query(query)
        truth = np.take(lab, q.index, axis=AXES.index(q.axis))
        pred = np.asarray(probabilities).argmax(0)
        if pred.shape != truth.shape:
            raise ValueError(f"probabilities: slice shape {pred.shape} differs from the labels' {truth.shape} ({q})")
        return float((pred != truth).mean())

    score.__name__ = score.__qualname__ = "error oracle"
    return score


def _strategy_name(strategy):
    return strategy if isinstance(strategy, str) else getattr(strategy, "__name__", "custom")


class ActiveLearner:
    """Pool-based active learning of a 2D U-Net on the slices of one volume.

    Parameters
    ----------
    volume : array_like, 3D
        The (unlabelled) volume to segment; its slices form the pool.
    n_classes : int >= 2
        Number of classes.
    strategy : {"entropy", "margin", "random"} or callable
        How the next slice is chosen. Before the first annotation every strategy
        picks at random (the same slice for the same ``seed``). A callable
        ``score(probabilities, query) -> float`` (probabilities ``(C, h, w)`` of the
        current network on the candidate slice; higher = asked first) plugs in another
        measure, e.g. :func:`error_oracle` in benchmarks; slice mode only.
    axes : sequence of {"z", "y", "x"}
        Slicing directions of the pool.
    stride : int
        Pool = every ``stride``-th slice along each axis.
    min_distance : int, optional
        Candidates closer than this to an annotated slice of the same axis are skipped
        (neighbouring slices are nearly redundant); default ``stride``.
    candidates : int
        Candidates scored per query (a random subset of the pool, to bound the cost).
    reduce : {"mean", "top"}
        Slice score: mean pixel uncertainty, or the mean of its 10 % most uncertain pixels.
    balance_axes : bool
        Take each query from the slicing axis with the fewest annotations (for every
        strategy, random included). The network predicts along all axes, so it needs
        examples of each view; a network that never saw a view can be confidently
        wrong on it, which uncertainty cannot reveal.
    region : int, optional
        Region mode (sparse annotation, as with ilastik's brush): each query is a
        ``region x region`` window of a slice instead of the whole slice -- the window
        with the highest mean uncertainty among the candidate slices (pixels already
        annotated count as certain), or a random window for ``"random"``. Only the
        window's pixels of an answer are kept; a slice can be queried again elsewhere.
        ``min_distance`` then defaults to 0.
    class_names : sequence of str, optional
    model : torch.nn.Module, optional
        Start from this network instead of an untrained one.
    channels, patch_size, batch_size
        Network and optimisation (see :func:`tomoml_nb.segment.train_unet`).
    lr : float, optional
        Learning rate of every round; default 2e-3 from scratch and 2e-4 when ``model``
        is given (fine-tuning with a large rate would overwrite what the model knows).
    steps_per_round : int
        Warm-start training steps after each annotation round.
    first_steps : int, optional
        Steps of the first round (from scratch); default ``2 * steps_per_round``.
    device : str
    seed : int or None
        Seed of the random choices and of the training; None draws one at random (stored
        in ``seed``, so the run can be repeated).
    progress : bool

    Attributes
    ----------
    model : torch.nn.Module or None
        The current network (None before the first training round).
    annotations : dict
        ``{(axis, index): labels2d}`` (``-1`` where not annotated).
    n_annotated : int
        Annotated slices, or windows in region mode.
    rounds : list of dict
        Per round: queries, number of annotated slices, training loss and seconds.

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.random.default_rng(0).random((16, 16, 16))
    >>> learner = ActiveLearner(vol, 2, stride=4, progress=False)
    >>> len(learner.pool)
    12
    """

    def __init__(self, volume, n_classes, *, strategy="entropy", axes=("z", "y", "x"), stride=4, min_distance=None,
                 candidates=48, reduce="mean", balance_axes=True, class_names=None, model=None,
                 channels=(16, 32, 64, 128), patch_size=64, batch_size=8, lr=None, steps_per_round=100,
                 first_steps=None, region=None, device="auto", seed=0, progress=True):
        vol = as_array(volume, "volume", ndim=3, dtype=np.float32)
        self.volume = vol
        self.normalized, self.intensity_range = normalize_intensity(vol)
        n_classes = check_positive(n_classes, "n_classes", integer=True)
        if n_classes < 2:
            raise ValueError(f"n_classes: need at least 2 classes, got {n_classes}")
        self.n_classes = n_classes
        if callable(strategy):
            if region is not None:
                raise ValueError("strategy: a callable strategy scores whole slices; region mode needs "
                                 f"one of {STRATEGIES}")
            self.strategy = strategy
        else:
            self.strategy = check_choice(strategy, "strategy", STRATEGIES)
        self.axes = _check_axes(axes)
        self.stride = check_positive(stride, "stride", integer=True)
        self.region = None if region is None else check_positive(region, "region", integer=True)
        if self.region is not None and self.region < 4:
            raise ValueError(f"region: windows need at least 4 x 4 pixels, got {region!r}")
        self._n_windows = 0
        self._axis_counts = {}
        self.min_distance = (0 if self.region else self.stride) if min_distance is None else check_positive(
            min_distance, "min_distance", integer=True, allow_zero=True)
        self.candidates = check_positive(candidates, "candidates", integer=True)
        self.reduce = check_choice(reduce, "reduce", ("mean", "top"))
        self.balance_axes = bool(balance_axes)
        if class_names is not None and len(class_names) != n_classes:
            raise ValueError(f"class_names: expected {n_classes} names, got {len(class_names)}")
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.channels = tuple(channels)
        self.patch_size = check_positive(patch_size, "patch_size", integer=True)
        self.batch_size = check_positive(batch_size, "batch_size", integer=True)
        self.lr = (2e-3 if model is None else 2e-4) if lr is None else check_positive(lr, "lr")
        self.steps_per_round = check_positive(steps_per_round, "steps_per_round", integer=True)
        self.first_steps = 2 * self.steps_per_round if first_steps is None else check_positive(
            first_steps, "first_steps", integer=True)
        self.device = device
        if seed is None:                  # a random run; the drawn seed is kept in self.seed to repeat it
            seed = int(np.random.default_rng().integers(2 ** 31))
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed: expected an integer or None, got {type(seed).__name__} {seed!r}")
        self.seed = int(seed)
        self.progress = bool(progress)
        self.rng = rng_from(self.seed)
        self.model = None
        if model is not None:
            from .segment import _resolve_model

            self.model = _resolve_model(model)
            if self.model.tomoml_config["n_classes"] != n_classes:
                raise ValueError(f"model: predicts {self.model.tomoml_config['n_classes']} classes, "
                                 f"n_classes is {n_classes}")
        self.annotations = {}
        self.rounds = []
        self.pool = []
        for axis in self.axes:
            n = vol.shape[AXES.index(axis)]
            start = min(self.stride // 2, n - 1)
            self.pool += [(axis, i) for i in range(start, n, self.stride)]
        self._taught = []                 # keys taught since the last retrain (one per window in region mode)

    # ---------------------------------------------------------------- pool and slices
    def __repr__(self):
        return (f"ActiveLearner(volume={self.volume.shape}, n_classes={self.n_classes}, "
                f"strategy={_strategy_name(self.strategy)!r}, "
                f"pool={len(self.pool)} slices, annotated={self.n_annotated})")

    @property
    def n_annotated(self):
        """Number of annotated slices (windows in region mode)."""
        return self._n_windows if self.region else len(self.annotations)

    @property
    def annotated_pixels(self):
        """Number of annotated pixels over all slices."""
        return int(sum((lab >= 0).sum() for lab in self.annotations.values()))

    @property
    def missing_classes(self):
        """Classes with no annotated pixel yet (the network cannot predict them)."""
        counts = np.zeros(self.n_classes, np.int64)
        for lab in self.annotations.values():
            v = lab[lab >= 0]
            counts += np.bincount(v.astype(np.int64).ravel(), minlength=self.n_classes)[:self.n_classes]
        return [c for c in range(self.n_classes) if counts[c] == 0]

    def _slice(self, arr, q):
        return np.take(arr, q.index, axis=AXES.index(q.axis))

    def image(self, query):
        """The grey slice of ``query`` (raw grey values)."""
        q = _as_query(query)
        self._check_index(q)
        return self._slice(self.volume, q).copy()

    def _check_index(self, q):
        n = self.volume.shape[AXES.index(q.axis)]
        if not 0 <= q.index < n:
            raise IndexError(f"query: index {q.index} outside 0..{n - 1} along {q.axis}")

    def probabilities(self, query):
        """Class probabilities ``(C, h, w)`` of the current model on the slice of ``query``."""
        from .segment import _forward_slices
        from .train import resolve_device

        q = _as_query(query)
        self._check_index(q)
        if self.model is None:
            h, w = self._slice(self.volume, q).shape
            return np.full((self.n_classes, h, w), 1.0 / self.n_classes, np.float32)
        dev = resolve_device(self.device)
        self.model.to(dev).eval()
        return _forward_slices(self.model, self._slice(self.normalized, q)[None], dev, 1)[0]

    def proposal(self, query):
        """The current model's labels for the queried slice (a starting point for the annotator).

        Before any training every pixel is ``-1`` (unlabelled).
        """
        q = _as_query(query)
        if self.model is None:
            return np.full(self._slice(self.volume, q).shape, UNLABELLED, np.int16)
        return self.probabilities(q).argmax(0).astype(np.int16)

    def available(self):
        """Pool slices that may be queried next: not annotated, not within ``min_distance`` of an
        annotated slice on the same axis (list of ``(axis, index)``)."""
        taken = {}
        for axis, idx in self.annotations:
            taken.setdefault(axis, []).append(idx)
        out = []
        for axis, idx in self.pool:
            near = taken.get(axis, [])
            if (axis, idx) in self.annotations:
                if not self.region or (self.annotations[(axis, idx)] >= 0).mean() > 0.75:
                    continue
                near = []                     # region mode: the slice itself still has room
            if self.min_distance and any(abs(idx - j) < self.min_distance for j in near):
                continue
            out.append((axis, idx))
        if not out:  # everything near an annotation: fall back to any unannotated slice
            out = [k for k in self.pool if k not in self.annotations]
        return out

    def _slice_shape(self, axis):
        return tuple(n for a, n in zip(AXES, self.volume.shape) if a != axis)

    def _window_size(self, axis):
        return tuple(min(self.region, n) for n in self._slice_shape(axis))

    def best_window(self, query):
        """Region mode: the ``region x region`` window of a slice with the highest mean
        uncertainty (annotated pixels count as certain); returns a :class:`Query` with it."""
        from scipy import ndimage as ndi

        q = _as_query(query)
        self._check_index(q)
        if not self.region:
            raise RuntimeError("region: best_window needs ActiveLearner(region=...)")
        rh, rw = self._window_size(q.axis)
        u = uncertainty(self.probabilities(q), "margin" if self.strategy == "margin" else "entropy")
        lab = self.annotations.get(q.key)
        if lab is not None:
            u[lab >= 0] = 0.0
        mean = ndi.uniform_filter(u.astype(np.float64), size=(rh, rw), mode="constant")
        h, w = u.shape
        # centres of windows that lie inside the slice (uniform_filter centres at size // 2)
        valid = mean[rh // 2:h - rh + rh // 2 + 1, rw // 2:w - rw + rw // 2 + 1]
        r0, c0 = np.unravel_index(int(np.argmax(valid)), valid.shape)
        return Query(q.axis, q.index, float(valid[r0, c0]), (int(r0), int(r0 + rh), int(c0), int(c0 + rw)))

    def _random_window(self, key):
        rh, rw = self._window_size(key[0])
        h, w = self._slice_shape(key[0])
        r0, c0 = int(self.rng.integers(0, h - rh + 1)), int(self.rng.integers(0, w - rw + 1))
        return Query(key[0], key[1], window=(r0, r0 + rh, c0, c0 + rw))

    def score(self, query):
        """Uncertainty score of a slice under the learner's strategy (NaN for "random")."""
        q = _as_query(query)
        if self.strategy == "random" or self.model is None:
            return float("nan")
        if callable(self.strategy):
            return float(self.strategy(self.probabilities(q), q))
        u = uncertainty(self.probabilities(q), self.strategy)
        if self.reduce == "top":
            flat = np.sort(u.ravel())
            return float(flat[-max(1, flat.size // 10):].mean())
        return float(u.mean())

    def _allowed_axes(self, picked, avail):
        """Axes with the fewest annotations so far (when balancing), among those with candidates."""
        have = {a for a, _ in avail}
        axes = [a for a in self.axes if a in have]
        if not self.balance_axes or not axes:
            return set(axes)
        if self.region:
            count = {a: self._axis_counts.get(a, 0) for a in axes}
        else:
            count = {a: 0 for a in axes}
            for a, _ in self.annotations:
                if a in count:
                    count[a] += 1
        for q in picked:
            if q.axis in count:           # an axis whose candidates all went out of the running is gone
                count[q.axis] += 1
        low = min(count.values())
        return {a for a, c in count.items() if c == low}

    def query(self, n=1):
        """The ``n`` slices to annotate next (most uncertain first; random for the control).

        With ``balance_axes`` every pick comes from the slicing axis with the fewest
        annotations so far, so the network sees every direction it predicts along.

        Returns
        -------
        list of Query
            At most ``n`` queries: **fewer** when fewer candidates are left (an axis that runs
            out of slices is skipped, and with ``strategy != "random"`` only ``candidates``
            slices are scored; in region mode one window per slice). Never empty.

        Raises
        ------
        RuntimeError
            Nothing is left to query: every pool slice is annotated (in region mode, more
            than 75 % of every pool slice). Check ``available()`` first to stop a loop.
        """
        n = check_positive(n, "n", integer=True)
        avail = self.available()
        if not avail:
            raise RuntimeError(f"pool: nothing left to query, every slice of the pool ({len(self.pool)} slices) is "
                               "annotated" + (" (more than 75 % of each)" if self.region else "") +
                               "; lower stride for a larger pool")
        if self.region:
            return self._query_regions(n, avail)

        def far(cand, picked):
            return all(not (cand.axis == p.axis and abs(cand.index - p.index) < self.min_distance) for p in picked)

        picked = []
        if self.strategy == "random" or self.model is None:
            order = [avail[i] for i in self.rng.permutation(len(avail))]
            while len(picked) < n:
                allowed = self._allowed_axes(picked, order)
                cand = next((Query(*k) for k in order if k[0] in allowed and far(Query(*k), picked)
                             and Query(*k) not in picked), None)
                if cand is None:
                    break
                picked.append(cand)
            return picked
        allowed0 = self._allowed_axes([], avail) if n == 1 else set(self.axes)
        pool = [k for k in avail if k[0] in allowed0]
        sub = pool
        if len(pool) > self.candidates:
            sub = [pool[i] for i in sorted(self.rng.choice(len(pool), self.candidates, replace=False))]
        scored = sorted((Query(a, i, self.score((a, i))) for a, i in sub), key=lambda q: -q.score)
        while len(picked) < n:
            allowed = self._allowed_axes(picked, [q.key for q in scored if q not in picked])
            cand = next((q for q in scored if q.axis in allowed and q not in picked and far(q, picked)), None)
            if cand is None:
                break
            picked.append(cand)
        return picked

    def _query_regions(self, n, avail):
        """Region mode of :meth:`query`: one window per slice, axes balanced as for slices."""
        picked = []
        if self.strategy == "random" or self.model is None:
            order = [avail[i] for i in self.rng.permutation(len(avail))]
            for k in order:
                if len(picked) == n:
                    break
                if k[0] in self._allowed_axes(picked, order) and all(p.key != k for p in picked):
                    picked.append(self._random_window(k))
            return picked
        sub = avail
        if len(avail) > self.candidates:
            sub = [avail[i] for i in sorted(self.rng.choice(len(avail), self.candidates, replace=False))]
        scored = sorted((self.best_window(k) for k in sub), key=lambda q: -q.score)
        while len(picked) < n:
            allowed = self._allowed_axes(picked, [q.key for q in scored if q not in picked])
            cand = next((q for q in scored if q.axis in allowed and q not in picked), None)
            if cand is None:
                break
            picked.append(cand)
        return picked

    # ---------------------------------------------------------------- learning
    def teach(self, query, labels2d):
        """Store the annotation of a queried slice (``-1`` = pixel left unlabelled).

        For a query with a ``window`` (region mode) ``labels2d`` is the whole slice or just the
        window; only the window's pixels are kept, merged with earlier windows of that slice.
        """
        q = _as_query(query)
        self._check_index(q)
        shape = self._slice(self.volume, q).shape
        lab = _check_label_array(labels2d, "labels2d", self.n_classes)
        win = getattr(q, "window", None)
        if win is not None:
            r0, r1, c0, c1 = win
            if not (0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1]):
                raise ValueError(f"query: window {win} outside the slice of shape {shape}")
            if lab.shape == shape:
                lab = lab[r0:r1, c0:c1]
            elif lab.shape != (r1 - r0, c1 - c0):
                raise ValueError(f"labels2d: shape {lab.shape} is neither the slice {shape} nor the window "
                                 f"{(r1 - r0, c1 - c0)} ({q})")
            if not (lab >= 0).any():
                raise ValueError("labels2d: no pixel of the window is labelled (all are -1)")
            full = self.annotations.get(q.key)
            full = np.full(shape, UNLABELLED, np.int16) if full is None else full.copy()
            keep = lab >= 0
            full[r0:r1, c0:c1][keep] = lab[keep]
            lab = full
        elif lab.shape != shape:
            raise ValueError(f"labels2d: shape {lab.shape} differs from the slice shape {shape} ({q})")
        if not (lab >= 0).any():
            raise ValueError("labels2d: no pixel is labelled (all are -1)")
        if self.region:
            self._axis_counts[q.axis] = self._axis_counts.get(q.axis, 0) + 1
            self._n_windows += 1
        self.annotations[q.key] = lab.astype(np.int16)
        self._taught.append(q.key)

    def retrain(self, steps=None):
        """Train on all annotations, warm-starting from the current network.

        Returns the training history (see :func:`tomoml_nb.segment.train_unet`).
        """
        from .segment import train_unet

        if not self.annotations:
            raise RuntimeError("annotations: nothing to train on yet; teach() at least one slice first")
        first = self.model is None
        steps = (self.first_steps if first else self.steps_per_round) if steps is None else \
            check_positive(steps, "steps", integer=True)
        keys = list(self.annotations)
        imgs = [self._slice(self.normalized, Query(*k)) for k in keys]
        labs = [self.annotations[k] for k in keys]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.model = train_unet(imgs, labs, self.n_classes, model=self.model, channels=self.channels,
                                    patch_size=self.patch_size, batch_size=self.batch_size, steps=steps, lr=self.lr,
                                    val_fraction=0.0, intensity_range=(0.0, 1.0), class_names=self.class_names,
                                    device=self.device, seed=self.seed + 1000 * len(self.rounds),
                                    progress=self.progress, warn_missing=False)
        hist = self.model.tomoml_history
        self.rounds.append({"n_annotated": self.n_annotated, "keys": self._taught, "steps": steps,
                            "loss": float(np.mean(hist["loss"][-10:])), "seconds": time.perf_counter() - t0})
        self._taught = []
        return hist

    def step(self, annotate, n=1, steps=None):
        """One round: query ``n`` slices, annotate them with ``annotate(query)``, retrain.

        Returns the list of queries of this round.
        """
        if not callable(annotate):
            raise TypeError(f"annotate: expected a callable query -> labels2d, got {type(annotate).__name__}")
        queries = self.query(n)
        for q in queries:
            self.teach(q, annotate(q))
        self.retrain(steps)
        return queries

    def predict(self, volume=None, axes=("z", "y", "x"), fusion="mean", progress=None):
        """Segment ``volume`` (default: the learner's own) with the current network.

        Returns ``(labels, probabilities)`` as :func:`tomoml_nb.segment.predict`.
        """
        from .segment import predict

        if self.model is None:
            raise RuntimeError("model: not trained yet; annotate a slice and retrain() first")
        progress = self.progress if progress is None else progress
        if volume is None:
            return predict(self.volume, self.model, axes, fusion, intensity_range=self.intensity_range,
                           device=self.device, progress=progress)
        return predict(volume, self.model, axes, fusion, device=self.device, progress=progress)


def run_active_learning(volume, labels, *, strategy="entropy", n_rounds=10, per_round=1, eval_image=None,
                        eval_labels=None, eval_axes=("z", "y", "x"), seed=0, progress=True, **learner_kwargs):
    """Run the active-learning loop with a ground-truth oracle and record IoU after every round.

    Parameters
    ----------
    volume, labels : array_like, 3D
        Pool volume and its ground truth (read only by the oracle, slice by slice).
    strategy : {"entropy", "margin", "random"} or callable
        See :class:`ActiveLearner` (e.g. :func:`error_oracle` for the ideal uncertainty).
    n_rounds : int
        Rounds of query -> annotate -> retrain.
    per_round : int
        Slices annotated per round (windows with ``region=...``); fewer when fewer are
        left to query (see :meth:`ActiveLearner.query`).
    eval_image, eval_labels : array_like, optional
        Held-out volume for the IoU curve (a different phantom); by default the pool
        volume itself is used (the annotated slices are then a small part of it).
    eval_axes : sequence of str
        Axes of the fused prediction used for evaluation.
    **learner_kwargs
        Passed to :class:`ActiveLearner` (``steps_per_round``, ``stride``, ``channels``...).

    Returns
    -------
    dict
        ``n_annotated``, ``annotated_pixels``, ``mean_iou``, ``iou_per_class`` (one entry per round),
        ``queries`` (``"z=40"`` strings), ``seconds``, ``strategy``, ``evaluated_on``,
        and the ``learner``. When the pool runs out before ``n_rounds`` rounds, the loop
        stops early with a ``UserWarning`` and the lists hold the rounds done.

    Examples
    --------
    >>> from tomoml_nb import phantoms
    >>> image, labels = phantoms.bone_implant((32, 32, 32), seed=0)
    >>> res = run_active_learning(image, labels, n_rounds=2, steps_per_round=2, patch_size=32,
    ...                           batch_size=2, channels=(4, 8), progress=False)
    >>> res["n_annotated"]
    [1, 2]
    """
    from .metrics import iou_per_class

    lab = _check_label_array(labels, "labels")
    vol = as_array(volume, "volume", ndim=3)
    if lab.shape != vol.shape:
        raise ValueError(f"labels: shape {lab.shape} differs from volume shape {vol.shape}")
    n_rounds = check_positive(n_rounds, "n_rounds", integer=True)
    per_round = check_positive(per_round, "per_round", integer=True)
    if (eval_image is None) != (eval_labels is None):
        raise ValueError("eval_labels: give both eval_image and eval_labels, or neither")
    if eval_image is None:
        eval_image, eval_truth, where = vol, lab, "pool volume"
    else:
        eval_image = as_array(eval_image, "eval_image", ndim=3)
        eval_truth = _check_label_array(eval_labels, "eval_labels")
        if eval_truth.shape != eval_image.shape:
            raise ValueError(f"eval_labels: shape {eval_truth.shape} differs from eval_image {eval_image.shape}")
        where = "held-out volume"
    n_classes = learner_kwargs.pop("n_classes", int(max(lab.max(), eval_truth.max())) + 1)
    learner = ActiveLearner(vol, n_classes, strategy=strategy, seed=seed, progress=False, **learner_kwargs)
    annotate = oracle(lab)
    out = {"strategy": _strategy_name(strategy), "n_annotated": [], "annotated_pixels": [], "mean_iou": [],
           "iou_per_class": [], "queries": [], "seconds": [], "evaluated_on": where}
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    for r in tqdm(range(n_rounds), desc=f"active learning ({_strategy_name(strategy)})", disable=not progress):
        if not learner.available():
            warnings.warn(f"pool: every slice of the pool is annotated after {r} of {n_rounds} rounds; stopping "
                          "early (lower stride for a larger pool)", UserWarning, stacklevel=2)
            break
        qs = learner.step(annotate, per_round)
        own = eval_image is vol
        pred, _ = learner.predict(None if own else eval_image, axes=eval_axes, progress=False)
        iou = iou_per_class(pred, eval_truth, n_classes)
        out["n_annotated"].append(learner.n_annotated)
        out["annotated_pixels"].append(learner.annotated_pixels)
        out["iou_per_class"].append(iou.tolist())
        out["mean_iou"].append(float(np.nanmean(iou)))
        out["queries"] += [f"{q.axis}={q.index}" + ("" if q.window is None else "[{}:{},{}:{}]".format(*q.window))
                           for q in qs]
        out["seconds"].append(time.perf_counter() - t0)
    out["learner"] = learner
    return out


def annotations_to_reach(result, target):
    """Fewest annotated slices at which ``result["mean_iou"]`` reaches ``target`` (None if never).

    Examples
    --------
    >>> annotations_to_reach({"n_annotated": [1, 2, 3], "mean_iou": [0.5, 0.8, 0.9]}, 0.8)
    2
    """
    for n, v in zip(result["n_annotated"], result["mean_iou"]):
        if v >= target:
            return int(n)
    return None


def plot_learning_curves(results, target=None, *, title="Active learning", ax=None):
    """IoU against the number of annotated slices, one line per strategy (or run).

    Parameters
    ----------
    results : dict of {name: result or list of results}
        Outputs of :func:`run_active_learning`; a list (repeats with different seeds)
        is drawn as its mean with a min-max band.
    target : float, optional
        Horizontal reference line (e.g. 0.9 mean IoU).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_learning_curves({"random": {"n_annotated": [1, 2], "mean_iou": [0.5, 0.7]}}, target=0.9)
    >>> fig.axes[0].get_xlabel()
    'annotated slices'
    """
    from .viz import _new_figure

    if not isinstance(results, dict) or not results:
        raise TypeError("results: expected a non-empty dict {name: result}")
    created = ax is None
    if created:
        fig = _new_figure((6.0, 4.0))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    for name, res in results.items():
        runs = res if isinstance(res, (list, tuple)) else [res]
        n = min(len(r["n_annotated"]) for r in runs)
        x = np.asarray(runs[0]["n_annotated"][:n])
        ys = np.array([r["mean_iou"][:n] for r in runs])
        line, = ax.plot(x, ys.mean(0), marker="o", ms=3, label=f"{name}" + (f" (mean of {len(runs)})"
                                                                            if len(runs) > 1 else ""))
        if len(runs) > 1:
            ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2, lw=0)
    if target is not None:
        ax.axhline(float(target), color="0.4", ls="--", lw=1, label=f"target {target:g}")
    ax.set_xlabel("annotated slices")
    ax.set_ylabel("mean IoU")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig
