"""Tests for tomoml_nb.active (active learning) and the annotation widgets of tomoml_nb.widgets."""
from __future__ import annotations

import numpy as np
import pytest

from tomoml_nb import active, phantoms

SMALL = dict(channels=(4, 8), patch_size=16, batch_size=4, steps_per_round=3, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantom():
    return phantoms.bone_implant((24, 32, 32), seed=7)


def test_uncertainty_measures():
    p = np.array([[1.0, 0.5, 0.4], [0.0, 0.5, 0.35], [0.0, 0.0, 0.25]], np.float32)
    h = active.uncertainty(p, "entropy")
    assert h[0] == pytest.approx(0.0, abs=1e-6) and h[1] == pytest.approx(np.log(2) / np.log(3), rel=1e-5)
    assert 0 < h[2] <= 1 and h[2] > h[1]
    m = active.uncertainty(p, "margin")
    np.testing.assert_allclose(m, [0.0, 1.0, 0.95], atol=1e-6)
    with pytest.raises(ValueError, match=r"^method"):
        active.uncertainty(p, "variance")
    with pytest.raises(ValueError, match=r"^probabilities"):
        active.uncertainty(np.ones((1, 4)))


def test_oracle_reads_ground_truth(phantom):
    annotate = active.oracle(phantom.labels)
    np.testing.assert_array_equal(annotate(("y", 5)), phantom.labels[:, 5, :])
    np.testing.assert_array_equal(annotate(active.Query("z", 3)), phantom.labels[3])
    with pytest.raises(IndexError, match=r"^query"):
        annotate(("x", 99))
    with pytest.raises(ValueError, match=r"^query"):
        annotate(("w", 1))
    with pytest.raises(ValueError, match=r"^labels: expected a 3D"):
        active.oracle(np.zeros((4, 4), int))


def test_pool_and_first_query_is_shared_by_all_strategies(phantom):
    qs = {}
    for s in active.STRATEGIES:
        learner = active.ActiveLearner(phantom.image, 5, strategy=s, stride=4, seed=3, **SMALL)
        assert len(learner.pool) == 6 + 8 + 8
        qs[s] = learner.query(2)
    assert qs["entropy"] == qs["margin"] == qs["random"]  # fair start: same random first slices
    assert len({q.key for q in qs["random"]}) == 2


def test_round_teach_retrain_and_uncertainty_query(phantom):
    learner = active.ActiveLearner(phantom.image, 5, strategy="entropy", stride=4, min_distance=4,
                                   class_names=list(phantoms.BONE_CLASSES), balance_axes=False, seed=0, **SMALL)
    annotate = active.oracle(phantom.labels)
    with pytest.raises(RuntimeError, match=r"^annotations"):
        learner.retrain()
    assert learner.proposal(("z", 4)).min() == -1  # nothing trained yet
    first = learner.step(annotate, n=1)
    assert learner.n_annotated == 1 and learner.model is not None
    assert learner.rounds[0]["steps"] == 6  # first round: twice steps_per_round, from scratch
    qs = learner.query(3)
    scores = [q.score for q in qs]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    for q in qs:  # never the annotated slice nor one within min_distance of it on the same axis
        assert not (q.axis == first[0].axis and abs(q.index - first[0].index) < 4)
    # the score is the mean entropy of the model's prediction on that slice
    q = qs[0]
    expect = active.uncertainty(learner.probabilities(q), "entropy").mean()
    assert q.score == pytest.approx(float(expect), rel=1e-5)
    learner.teach(q, annotate(q))
    learner.retrain()
    assert learner.n_annotated == 2 and learner.rounds[-1]["steps"] == 3
    lab, prob = learner.predict(progress=False)
    assert lab.shape == phantom.image.shape and prob.shape == (5,) + phantom.image.shape
    assert learner.proposal(q).shape == learner.image(q).shape


def test_balanced_axes(phantom):
    annotate = active.oracle(phantom.labels)
    for strategy in ("entropy", "random"):
        learner = active.ActiveLearner(phantom.image, 5, strategy=strategy, seed=2, **SMALL)
        first = learner.step(annotate)[0]
        qs = learner.query(2)
        assert sorted(q.axis for q in qs) == sorted(a for a in "zyx" if a != first.axis)
        for q in qs:
            learner.teach(q, annotate(q))
        assert learner.query(1)[0].axis in "zyx"  # all axes have one annotation: any axis may come next
    # without balancing, uncertainty sampling is free to stay on one axis
    free = active.ActiveLearner(phantom.image, 5, strategy="entropy", balance_axes=False, seed=2, **SMALL)
    free.step(annotate)
    scored = [free.score(k) for k in free.available()]
    assert len(scored) <= free.candidates  # every candidate is scored
    assert free.query(1)[0].score == pytest.approx(max(scored))


def test_teach_validates(phantom):
    learner = active.ActiveLearner(phantom.image, 5, **SMALL)
    with pytest.raises(ValueError, match=r"^labels2d: shape"):
        learner.teach(("z", 0), np.zeros((5, 5), int))
    with pytest.raises(ValueError, match=r"^labels2d: label 7 is out of range"):
        learner.teach(("z", 0), np.full((32, 32), 7))
    with pytest.raises(ValueError, match=r"^labels2d: no pixel is labelled"):
        learner.teach(("z", 0), np.full((32, 32), -1))
    with pytest.raises(IndexError, match=r"^query"):
        learner.teach(("z", 40), np.zeros((32, 32), int))
    with pytest.raises(ValueError, match=r"^strategy"):
        active.ActiveLearner(phantom.image, 5, strategy="bald")
    with pytest.raises(ValueError, match=r"^volume: expected a 3D"):
        active.ActiveLearner(phantom.image[0], 5)
    with pytest.raises(ValueError, match=r"^n_classes"):
        active.ActiveLearner(phantom.image, 1)
    with pytest.raises(TypeError, match=r"^annotate"):
        learner.step("oracle")


def test_missing_classes_reported(phantom):
    learner = active.ActiveLearner(phantom.image, 5, **SMALL)
    assert learner.missing_classes == [0, 1, 2, 3, 4]
    sl = np.full((32, 32), -1)
    sl[:4] = 0
    sl[4:8] = 2
    learner.teach(("z", 10), sl)
    assert learner.missing_classes == [1, 3, 4]


def test_run_active_learning_and_curves(phantom):
    held_out = phantoms.bone_implant((24, 32, 32), seed=8)
    res = active.run_active_learning(phantom.image, phantom.labels, strategy="margin", n_rounds=2, per_round=2,
                                     eval_image=held_out.image, eval_labels=held_out.labels, eval_axes=("z",),
                                     seed=1, progress=False, **{k: v for k, v in SMALL.items() if k != "progress"})
    assert res["n_annotated"] == [2, 4] and len(res["mean_iou"]) == 2
    assert res["evaluated_on"] == "held-out volume" and len(res["queries"]) == 4
    assert all(0 <= v <= 1 for v in res["mean_iou"]) and len(res["iou_per_class"][0]) == 5
    assert active.annotations_to_reach(res, -1.0) == 2 and active.annotations_to_reach(res, 1.1) is None
    fig = active.plot_learning_curves({"margin": res, "random (2 seeds)": [res, res]}, target=0.9)
    assert len(fig.axes[0].lines) >= 3
    with pytest.raises(ValueError, match=r"^eval_labels"):
        active.run_active_learning(phantom.image, phantom.labels, eval_image=held_out.image)
    with pytest.raises(ValueError, match=r"^labels: shape"):
        active.run_active_learning(phantom.image, phantom.labels[:-1])
    with pytest.raises(TypeError, match=r"^results"):
        active.plot_learning_curves([])



# --------------------------------------------------------------------------- region mode
def test_region_mode_queries_windows_and_keeps_only_their_pixels(phantom):
    learner = active.ActiveLearner(phantom.image, 5, strategy="entropy", region=12, seed=0, **SMALL)
    annotate = active.oracle(phantom.labels)
    first = learner.query(2)                           # before training: random windows
    assert len(first) == 2 and len({q.key for q in first}) == 2
    for q in first:
        r0, r1, c0, c1 = q.window
        assert (r1 - r0, c1 - c0) == (12, 12) and r0 >= 0 and c0 >= 0
        h, w = learner.image(q).shape
        assert r1 <= h and c1 <= w and "rows" in str(q)
        learner.teach(q, annotate(q))                  # the oracle answers with the whole slice
        lab = learner.annotations[q.key]
        assert (lab[r0:r1, c0:c1] >= 0).all() and (lab >= 0).sum() == 144
    assert learner.n_annotated == 2 and learner.annotated_pixels == 288
    learner.retrain()
    assert learner.rounds[-1]["keys"] == [q.key for q in first]
    # a second window on an annotated slice merges with the first, and only the window's pixels count
    q = first[0]
    other = active.Query(q.axis, q.index, window=(0, 12, 0, 12) if q.window[:3:2] != (0, 0) else (12, 24, 12, 24))
    learner.teach(other, annotate(other)[other.window[0]:other.window[1], other.window[2]:other.window[3]])
    assert learner.n_annotated == 3 and (learner.annotations[q.key] >= 0).sum() > 144
    qs = learner.query(2)
    assert all(0 <= x.score <= 1 and x.window is not None for x in qs)
    for x in qs:                                       # each is the best window of its slice
        assert x.window == learner.best_window(x.key).window


def test_region_mode_picks_the_most_uncertain_window(phantom, monkeypatch):
    learner = active.ActiveLearner(phantom.image, 5, strategy="margin", region=8, seed=0, **SMALL)
    h, w = learner.image(("z", 4)).shape
    prob = np.zeros((5, h, w), np.float32)
    prob[0] = 1.0
    prob[:2, 10:18, 20:28] = 0.5                       # the only uncertain block
    learner.model = object()                           # "trained": probabilities come from the patch below
    monkeypatch.setattr(learner, "probabilities", lambda q: prob.copy())
    best = learner.best_window(("z", 4))
    assert best.window == (10, 18, 20, 28) and best.score == pytest.approx(1.0)
    learner.teach(best, np.zeros((8, 8), np.int16))    # once annotated, that block counts as certain
    assert learner.best_window(("z", 4)).score < 0.6


def test_region_mode_validates(phantom):
    with pytest.raises(ValueError, match=r"^region"):
        active.ActiveLearner(phantom.image, 5, region=2, **SMALL)
    learner = active.ActiveLearner(phantom.image, 5, region=8, **SMALL)
    with pytest.raises(ValueError, match=r"^labels2d"):
        learner.teach(active.Query("z", 4, window=(0, 8, 0, 8)), np.zeros((5, 5), np.int16))
    with pytest.raises(ValueError, match=r"^query: window"):
        learner.teach(active.Query("z", 4, window=(0, 80, 0, 8)), np.zeros((80, 8), np.int16))
    with pytest.raises(ValueError, match=r"^labels2d: no pixel"):
        learner.teach(active.Query("z", 4, window=(0, 8, 0, 8)), np.full((8, 8), -1, np.int16))
    with pytest.raises(RuntimeError, match=r"^region"):
        active.ActiveLearner(phantom.image, 5, **SMALL).best_window(("z", 4))


# --------------------------------------------------------------------------- widgets
@pytest.mark.parametrize("backend", ["sliders", "ipympl"])
def test_annotation_tool_paint_fill_undo_submit(backend):
    if backend == "ipympl":
        pytest.importorskip("ipympl")
    from tomoml_nb.widgets import annotation_tool

    img = np.zeros((30, 40), np.float32)
    img[:, 20:] = 1.0
    got = []
    tool = annotation_tool(img, 3, class_names=["a", "b", "c"], backend=backend, on_submit=got.append,
                           proposal=np.ones((30, 40), int), aside=img)
    assert tool.backend == backend and (tool.labels == -1).all()
    with pytest.raises(ValueError, match=r"^labels: nothing is labelled"):
        tool.submit()
    tool.paint(10, 10, label=2, radius=2)
    assert int((tool.labels == 2).sum()) == 9
    tool.fill(5, 30, label=1, tolerance=0.1)  # the whole bright half, not the dark one
    assert int((tool.labels == 1).sum()) == 30 * 20
    tool.erase(10, 10, radius=1)
    assert tool.labels[10, 10] == -1
    tool.undo()
    assert tool.labels[10, 10] == 2
    out = tool.submit()
    assert len(got) == 1 and np.array_equal(got[0], out) and tool.n_submitted == 1
    tool.use_proposal()
    assert (tool.labels == 1).all()
    tool.clear()
    assert (tool.labels == -1).all()
    tool.set_image(np.zeros((12, 12)))
    assert tool.labels.shape == (12, 12) and tool.proposal is None
    with pytest.raises(RuntimeError, match=r"^proposal"):
        tool.use_proposal()
    with pytest.raises(ValueError, match=r"^row"):
        tool.paint(50, 5, label=0)
    with pytest.raises(ValueError, match=r"^label"):
        tool.paint(5, 5, label=3)
    assert tool.snapshot() is not None


def test_annotation_tool_mouse_events():
    pytest.importorskip("ipympl")
    from matplotlib.backend_bases import MouseEvent

    from tomoml_nb.widgets import annotation_tool

    tool = annotation_tool(np.random.default_rng(0).random((20, 20)), 2, backend="ipympl", brush=1)
    tool.class_selector.value = 1
    canvas = tool._canvas
    canvas.draw()

    def send(name, col, row):
        x, y = tool._ax.transData.transform((col, row))
        canvas.callbacks.process(name, MouseEvent(name, canvas, x, y, button=1))

    send("button_press_event", 3, 4)
    send("motion_notify_event", 6, 4)
    send("button_release_event", 6, 4)
    send("motion_notify_event", 15, 15)  # released: no paint
    assert tool.labels[4, 3] == 1 and tool.labels[4, 6] == 1 and tool.labels[15, 15] == -1


def test_annotation_tool_bad_inputs():
    from tomoml_nb.widgets import annotation_tool

    img = np.zeros((8, 8))
    with pytest.raises(ValueError, match=r"^backend"):
        annotation_tool(img, 2, backend="qt")
    with pytest.raises(ValueError, match=r"^class_names"):
        annotation_tool(img, 2, class_names=["a"], backend="sliders")
    with pytest.raises(ValueError, match=r"^labels: labels must be in"):
        annotation_tool(img, 2, labels=np.full((8, 8), 5), backend="sliders")
    with pytest.raises(ValueError, match=r"^image: expected a 2D"):
        annotation_tool(np.zeros((2, 8, 8)), 2, backend="sliders")
    with pytest.raises(TypeError, match=r"^on_submit"):
        annotation_tool(img, 2, on_submit=3, backend="sliders")


def test_active_learning_ui_round(phantom):
    from tomoml_nb.widgets import active_learning_ui

    learner = active.ActiveLearner(phantom.image, 5, seed=0, **SMALL)
    ui = active_learning_ui(learner, backend="sliders")
    q0 = ui.query
    truth = active.oracle(phantom.labels)(q0)
    ui.tool.labels[:] = truth  # what a person would paint
    ui.tool.submit_button.click()  # teach -> retrain -> next query
    assert learner.n_annotated == 1 and ui.query != q0 and len(ui.log) == 1
    assert ui.tool.aside is not None  # the uncertainty map of the new query
    before = ui.query
    ui.skip()
    assert ui.query.key != before.key and before.key not in learner.pool
    with pytest.raises(TypeError, match=r"^learner"):
        active_learning_ui(object())


def test_query_returns_what_is_left_when_an_axis_runs_out(phantom):
    # review s5 defect 3: KeyError 'y' in _allowed_axes once an axis had no candidate left
    learner = active.ActiveLearner(phantom.image, 5, stride=4, seed=0, **SMALL)
    learner.step(active.oracle(phantom.labels))
    qs = learner.query(100)
    assert 1 <= len(qs) < 100 and len({q.key for q in qs}) == len(qs)
    region = active.ActiveLearner(phantom.image, 5, stride=4, region=8, seed=0, **SMALL)
    region.step(active.oracle(phantom.labels))
    qs = region.query(60)
    assert 1 <= len(qs) <= len(region.pool) and len({q.key for q in qs}) == len(qs)


def test_run_active_learning_stops_when_the_pool_is_exhausted(phantom):
    kw = {k: v for k, v in SMALL.items() if k not in ("progress", "steps_per_round")}
    with pytest.warns(UserWarning, match=r"^pool: every slice"):
        res = active.run_active_learning(phantom.image, phantom.labels, n_rounds=8, per_round=3, stride=8,
                                         steps_per_round=1, progress=False, **kw)
    learner = res["learner"]
    assert res["n_annotated"][-1] == len(learner.pool) == len(learner.annotations)
    assert len(res["n_annotated"]) < 8
    with pytest.raises(RuntimeError, match=r"^pool: nothing left"):
        learner.query()


def test_seed_none_draws_a_seed_and_bad_seeds_are_named(phantom):
    learner = active.ActiveLearner(phantom.image, 5, seed=None, **SMALL)
    assert isinstance(learner.seed, int) and len(learner.query(2)) == 2
    with pytest.raises(TypeError, match=r"^seed"):
        active.ActiveLearner(phantom.image, 5, seed="abc", **SMALL)
    with pytest.raises(TypeError, match=r"^seed"):
        active.ActiveLearner(phantom.image, 5, seed=1.5, **SMALL)


def test_error_oracle_scores_the_true_error_and_queries_where_the_network_is_wrong(phantom):
    lab = phantom.labels
    score = active.error_oracle(lab)
    truth = lab[:, 9, :]
    p = np.zeros((5,) + truth.shape, np.float32)
    np.put_along_axis(p, truth[None].astype(np.int64), 1.0, axis=0)          # a perfect prediction...
    assert score(p, ("y", 9)) == 0.0
    p[:, :4] = 0.0
    p[0, :4] = 1.0                                                           # ...wrong wherever rows 0-3 are not class 0
    assert score(p, ("y", 9)) == pytest.approx(float((truth[:4] != 0).sum()) / truth.size)
    with pytest.raises(ValueError, match=r"^probabilities"):
        score(p[:, :3], ("y", 9))
    with pytest.raises(ValueError, match=r"^labels"):
        active.error_oracle(lab[0])

    # as a strategy: after a round, the query is the candidate with the largest true error
    learner = active.ActiveLearner(phantom.image, 5, strategy=score, stride=4, balance_axes=False, seed=1,
                                   candidates=100, **SMALL)
    assert "error oracle" in repr(learner)
    annotate = active.oracle(lab)
    learner.step(annotate)
    q = learner.query()[0]
    errors = {k: score(learner.probabilities(k), k) for k in learner.available()}
    assert q.key == max(errors, key=errors.get) and q.score == pytest.approx(errors[q.key])
    res = active.run_active_learning(phantom.image, lab, strategy=score, n_rounds=1, seed=1, **SMALL)
    assert res["strategy"] == "error oracle"
    with pytest.raises(ValueError, match=r"^strategy: a callable"):
        active.ActiveLearner(phantom.image, 5, strategy=score, region=8, **SMALL)
