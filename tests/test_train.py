from __future__ import annotations

import numpy as np
import pytest
import torch

from tomoml_nb import weights
from tomoml_nb.train import fit, load_checkpoint, resolve_device, save_checkpoint


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])

    def batches(step, rng):
        i = torch.from_numpy(rng.integers(0, 128, 32))
        return x[i], y[i]

    def loss_fn(model, batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    return x, y, batches, loss_fn


def test_fit_reduces_loss_and_validates():
    x, y, batches, loss_fn = _problem()
    model = torch.nn.Linear(3, 1)
    hist = fit(model, batches, loss_fn, steps=150, lr=0.05, progress=False,
               validate=lambda m: torch.nn.functional.mse_loss(m(x), y).item(), val_every=50)
    assert hist["loss"][-1] < 0.1 * hist["loss"][0]
    assert [s for s, _ in hist["val"]] == [50, 100, 150]
    assert hist["val"][-1][1] < hist["val"][0][1]


def test_fit_is_deterministic():
    _, _, batches, loss_fn = _problem()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        m = torch.nn.Linear(3, 1)
        runs.append(fit(m, batches, loss_fn, steps=20, progress=False, seed=3)["loss"])
    np.testing.assert_array_equal(runs[0], runs[1])


def test_checkpoint_and_resume(tmp_path):
    _, _, batches, loss_fn = _problem()
    ck = tmp_path / "ck.pt"
    m = torch.nn.Linear(3, 1)
    h = fit(m, batches, loss_fn, steps=30, progress=False, checkpoint=ck, checkpoint_every=10)
    assert load_checkpoint(ck)["step"] == 30 and len(h["loss"]) == 30
    m2 = torch.nn.Linear(3, 1)
    h2 = fit(m2, batches, loss_fn, steps=50, progress=False, checkpoint=ck, resume=True)
    assert h2["steps"] == 50 and len(h2["loss"]) == 50
    assert not list(tmp_path.glob("*.partial"))


def _cosine(peak, position):
    return peak * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(position, 1.0))))


def test_cosine_schedule_over_steps_and_on_resume(tmp_path):
    _, _, batches, loss_fn = _problem()
    h = fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=20, lr=0.1, progress=False)
    np.testing.assert_allclose(h["lr"], [_cosine(0.1, i / 20) for i in range(20)], rtol=1e-6)
    # the checkpoint stores the optimizer at the floor of a 10-step run; resuming it for 20 steps
    # continues from the middle of the longer schedule, not from the stored (floor) rate
    ck = tmp_path / "ck.pt"
    fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=10, lr=0.1, progress=False, checkpoint=ck)
    h2 = fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=20, lr=0.1, progress=False, checkpoint=ck,
             resume=True)
    np.testing.assert_allclose(h2["lr"][10:], [_cosine(0.1, i / 20) for i in range(10, 20)], rtol=1e-6)


def test_time_limit_anneals_the_schedule_before_it_stops():
    import time

    _, _, batches, loss_fn = _problem()

    def slow(step, rng):
        time.sleep(0.005)
        return batches(step, rng)

    h = fit(torch.nn.Linear(3, 1), slow, loss_fn, steps=100_000, lr=0.1, time_limit=0.5, progress=False)
    assert 10 < h["steps"] < 100_000
    lr = np.array(h["lr"])
    assert lr[0] == pytest.approx(0.1) and lr[-1] < 0.1 * 0.06   # ended at the floor (5 %), not near the peak
    assert np.all(np.diff(lr) <= 1e-12)


def test_keep_best_restores_the_best_validated_weights(tmp_path):
    _, _, batches, loss_fn = _problem()
    scores, snapshots = iter([3.0, 1.0, 2.0, 5.0]), []

    def validate(m):
        snapshots.append(m.weight.detach().clone())
        return next(scores)

    m = torch.nn.Linear(3, 1)
    ck = tmp_path / "ck.pt"
    h = fit(m, batches, loss_fn, steps=40, lr=0.05, progress=False, validate=validate, val_every=10,
            keep_best=True, checkpoint=ck)
    assert h["best"] == (20, 1.0)
    torch.testing.assert_close(m.weight.detach(), snapshots[1])
    state = load_checkpoint(ck)                          # the checkpoint keeps the last state, for resuming
    assert state["step"] == 40
    torch.testing.assert_close(state["model"]["weight"], snapshots[3])
    scores = iter([3.0, 1.0, 2.0, 5.0])
    m = torch.nn.Linear(3, 1)
    h = fit(m, batches, loss_fn, steps=40, lr=0.05, progress=False, validate=lambda _: next(scores), val_every=10,
            keep_best=True, higher_is_better=True)
    assert h["best"] == (40, 5.0)


def test_bad_arguments():
    _, _, batches, loss_fn = _problem()
    with pytest.raises(ValueError, match="scheduler"):
        fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=2, scheduler="step")
    with pytest.raises(ValueError, match="time_limit"):
        fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=2, time_limit=0)
    with pytest.raises(ValueError, match="steps"):
        fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=0)
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu:7")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_checkpoint("/nonexistent/ck.pt")


def test_existing_checkpoint_is_never_overwritten_without_resume(tmp_path):
    _, _, batches, loss_fn = _problem()
    mine = tmp_path / "mine.txt"
    mine.write_text("my notes")
    with pytest.raises(FileExistsError, match="^checkpoint: .*pass resume=True to continue from it, or choose"):
        fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=2, progress=False, checkpoint=mine)
    with pytest.raises(ValueError, match="^checkpoint: .*cannot be read"):       # not a checkpoint: kept
        fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=2, progress=False, checkpoint=mine, resume=True)
    assert mine.read_text() == "my notes"
    w = weights.save_state(tmp_path / "w.pt", format="demo.linear/1", config={},
                           state_dict=torch.nn.Linear(3, 1).state_dict())
    with pytest.raises(ValueError, match="^checkpoint: .*not a training checkpoint"):
        fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=2, progress=False, checkpoint=w, resume=True)
    ck = tmp_path / "ck.pt"
    fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=2, progress=False, checkpoint=ck)
    with pytest.raises(FileExistsError, match="^checkpoint"):                   # a second run, same path
        fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=2, progress=False, checkpoint=ck)
    with pytest.raises(FileExistsError, match="^checkpoint"):
        save_checkpoint(ck, torch.nn.Linear(3, 1))
    assert save_checkpoint(ck, torch.nn.Linear(3, 1), overwrite=True) == ck
    with pytest.raises(ValueError, match="^checkpoint: .*folder"):
        fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=2, progress=False, checkpoint=tmp_path)


def test_resuming_another_architecture_names_the_checkpoint(tmp_path):
    _, _, batches, loss_fn = _problem()
    ck = tmp_path / "ck.pt"
    fit(torch.nn.Linear(3, 1), batches, loss_fn, steps=2, progress=False, checkpoint=ck)
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    with pytest.raises(ValueError, match="^checkpoint: .*different network"):
        fit(other, batches, loss_fn, steps=4, progress=False, checkpoint=ck, resume=True)
    with pytest.raises(ValueError, match="^checkpoint: .*size mismatch"):
        load_checkpoint(ck, torch.nn.Linear(2, 1))


def test_save_state_refuses_an_existing_file_unless_overwrite(tmp_path):
    sd = torch.nn.Linear(2, 1).state_dict()
    mine = tmp_path / "mine.pt"
    mine.write_text("not yours")
    with pytest.raises(FileExistsError, match="^path: .*overwrite=True"):
        weights.save_state(mine, format="demo.linear/1", config={}, state_dict=sd)
    assert mine.read_text() == "not yours"
    p = weights.save_state(mine, format="demo.linear/1", config={"n": 2}, state_dict=sd, overwrite=True)
    assert weights.load_state(p, format="demo.linear/1")["config"] == {"n": 2}
    with pytest.raises(IsADirectoryError, match="^path"):
        weights.save_state(tmp_path, format="demo.linear/1", config={}, state_dict=sd, overwrite=True)
