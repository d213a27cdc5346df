"""Shipped and user-trained network weights: one file format for every method.

A weights file is a ``torch.save`` dictionary::

    {"format": "<module>.<network>/<version>",   # e.g. "tomoml_nb.segment.unet/1"
     "config": {...},        # everything needed to rebuild the network (plain Python values)
     "state_dict": {...},    # tensors on the CPU
     "history": {...},       # short training summary (validation metrics, steps, seconds)
     "meta": {...}}          # free-form provenance (script, seeds, data)

Method modules (``segment``, ``histology``, ``denoise``, ``dvc``, ``instance``,
``unsupervised``) keep their own ``save_model`` / ``load_model`` wrappers, which
build their network from ``config``; the file handling, the format check and
the lookup of the files shipped inside the package live here, once.

Everything is offline: shipped files are read from the installed package.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["WEIGHTS_DIR", "save_state", "load_state", "restore", "shipped_path", "shipped"]

#: Folder of the weights shipped with the package (``tomoml_nb/weights``).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def save_state(path, *, format, config, state_dict, history=None, meta=None, overwrite=False):
    """Write a weights file atomically (a ``.partial`` file renamed at the end).

    Parameters
    ----------
    path : str or Path
        Destination ``.pt`` file; parent folders are created.
    format : str
        Format tag checked again by :func:`load_state`.
    config : dict
        Plain values that rebuild the network.
    state_dict : dict
        The network's ``state_dict()``; tensors are detached and moved to the CPU.
    history, meta : dict, optional
        Short training summary and provenance.
    overwrite : bool
        Replace an existing file at ``path``. By default an existing file is never
        overwritten (it may be the user's own file or weights they want to keep).

    Returns
    -------
    Path

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    IsADirectoryError
        ``path`` is a folder.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> net = torch.nn.Linear(2, 1)
    >>> p = save_state(os.path.join(tempfile.mkdtemp(), "lin.pt"), format="demo.linear/1",
    ...                config={"n": 2}, state_dict=net.state_dict())
    >>> load_state(p, format="demo.linear/1")["config"]
    {'n': 2}
    """
    import torch

    if not isinstance(format, str) or "/" not in format:
        raise ValueError(f"format: expected a tag like 'module.network/1', got {format!r}")
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict, got {type(config).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path: {path} is a folder; give a file name such as {path / 'model.pt'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"path: {path} already exists and is not overwritten; choose another path or "
                              "pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": format, "config": dict(config),
             "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
             "history": dict(history or {}), "meta": dict(meta or {})}
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_state(path, *, format):
    """Read a weights file written by :func:`save_state` and check its format tag.

    Parameters
    ----------
    path : str or Path
    format : str or tuple of str
        Accepted format tag(s).

    Returns
    -------
    dict
        With keys ``format``, ``config``, ``state_dict``, ``history``, ``meta``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is not a readable torch file, or holds another kind of network.

    Examples
    --------
    >>> load_state("missing.pt", format="demo.linear/1")
    Traceback (most recent call last):
    ...
    FileNotFoundError: path: missing.pt does not exist
    """
    import torch

    formats = (format,) if isinstance(format, str) else tuple(format)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated / corrupted / not a torch file
        raise ValueError(f"path: {path} cannot be read as a torch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") not in formats:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"path: {path} holds {got!r}, expected a file of format {' or '.join(map(repr, formats))}")
    state.setdefault("history", {})
    state.setdefault("meta", {})
    return state


def restore(net, state, device="cpu"):
    """Load ``state`` (from :func:`load_state`) into the network ``net`` built from its config.

    Floating-point tensors stored in reduced precision are cast back to float32; the
    network gets ``tomoml_config``, ``tomoml_history`` and ``tomoml_meta`` attributes and
    is moved to ``device`` in eval mode.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> p = save_state(os.path.join(tempfile.mkdtemp(), "lin.pt"), format="demo.linear/1",
    ...                config={"n": 2}, state_dict=torch.nn.Linear(2, 1).state_dict())
    >>> restore(torch.nn.Linear(2, 1), load_state(p, format="demo.linear/1")).tomoml_config
    {'n': 2}
    """
    from .train import resolve_device

    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["state_dict"].items()})
    net.tomoml_config = dict(state["config"])
    net.tomoml_history = state.get("history", {})
    net.tomoml_meta = state.get("meta", {})
    return net.to(resolve_device(device)).eval()


def shipped_path(filename, script=None) -> Path:
    """Path of a weights file shipped in ``tomoml_nb/weights``; a clear error if it is missing.

    Parameters
    ----------
    filename : str
        File name inside the package's weights folder, e.g. ``"unet_bone_implant.pt"``.
    script : str, optional
        The ``scripts/train_*.py`` that recreates it (named in the error).

    Examples
    --------
    >>> shipped_path("unet_bone_implant.pt").name
    'unet_bone_implant.pt'
    """
    path = WEIGHTS_DIR / filename
    if not path.is_file():
        hint = f"; recreate them with `python {script}`" if script else ""
        raise FileNotFoundError(f"name: shipped weights {filename} are missing from {WEIGHTS_DIR}{hint}")
    return path


def shipped():
    """Names of the weights files shipped with the package, with their model cards.

    Examples
    --------
    >>> "unet_bone_implant.pt" in shipped()
    True
    """
    return {p.name: (p.with_suffix(".md") if p.with_suffix(".md").is_file() else None)
            for p in sorted(WEIGHTS_DIR.glob("*.pt"))}
