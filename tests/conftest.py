"""Shared test set-up: headless matplotlib, an isolated data cache, the real-data mirror."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Never write into the user's cache from tests; read real data from the mirror."""
    old = os.environ.get("TOMOML_DATA_DIR")
    os.environ["TOMOML_DATA_DIR"] = str(tmp_path_factory.mktemp("tomoml_cache"))
    yield
    if old is None:
        os.environ.pop("TOMOML_DATA_DIR", None)
    else:
        os.environ["TOMOML_DATA_DIR"] = old


def _mirror() -> Path | None:
    env = os.environ.get("TOMOML_DATA_MIRROR")
    candidate = Path(env.split(os.pathsep)[0]) if env else REPO.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


MIRROR = _mirror()
needs_mirror = pytest.mark.skipif(MIRROR is None, reason="real-data mirror (../shared/data) not present")


@pytest.fixture
def mirror() -> Path:
    if MIRROR is None:
        pytest.skip("real-data mirror (../shared/data) not present")
    return MIRROR


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: tiny networks run faster on one thread, and CI cores are shared.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
