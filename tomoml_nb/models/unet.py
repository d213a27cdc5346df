"""2D U-Net for semantic segmentation of tomographic slices (a thin factory around MONAI).

The network is MONAI's :class:`monai.networks.nets.UNet` (residual units, strided
convolutions down, transposed convolutions up) with batch normalisation: grey values
carry most of the class information in a CT slice, so the first layers must not
normalise them away per image (instance normalisation would).

Examples
--------
>>> import torch
>>> net = build_unet(n_classes=3, channels=(8, 16, 32))
>>> net(torch.zeros(2, 1, 32, 32)).shape
torch.Size([2, 3, 32, 32])
>>> size_multiple(net.tomoml_config)
4
"""
from __future__ import annotations

import numbers

__all__ = ["DEFAULT_CONFIG", "build_unet", "size_multiple"]

#: Architecture used for the shipped bone-implant weights.
DEFAULT_CONFIG = {"in_channels": 1, "channels": (16, 32, 64, 128), "num_res_units": 1, "dropout": 0.0,
                  "norm": "batch"}


def build_unet(n_classes, channels=(16, 32, 64, 128), *, in_channels=1, num_res_units=1, dropout=0.0,
               norm="batch"):
    """Build a 2D U-Net that maps ``(B, in_channels, H, W)`` to ``(B, n_classes, H, W)`` logits.

    Parameters
    ----------
    n_classes : int >= 2
        Number of output classes.
    channels : sequence of int
        Feature channels per level (its length minus one is the number of 2x
        down-samplings, so ``H`` and ``W`` must be multiples of ``2**(len(channels)-1)``).
    in_channels : int
        Input channels (1 for a grey slice).
    num_res_units : int
        Residual units per level (MONAI ``UNet``).
    dropout : float
        Dropout probability.
    norm : {"batch", "instance"}
        Normalisation layer.

    Returns
    -------
    torch.nn.Module
        A MONAI ``UNet`` whose ``tomoml_config`` attribute holds the arguments that
        rebuild it (saved with the weights).

    Examples
    --------
    >>> net = build_unet(5)
    >>> sum(p.numel() for p in net.parameters()) < 500_000
    True
    """
    from monai.networks.nets import UNet

    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 2:
        raise ValueError(f"n_classes: expected an integer >= 2, got {n_classes!r}")
    channels = tuple(int(c) for c in channels)
    if len(channels) < 2 or any(c < 1 for c in channels):
        raise ValueError(f"channels: expected at least two positive sizes, got {channels!r}")
    if norm not in ("batch", "instance"):
        raise ValueError(f"norm: unknown value {norm!r}; choose 'batch' or 'instance'")
    if not 0 <= float(dropout) < 1:
        raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")
    net = UNet(spatial_dims=2, in_channels=int(in_channels), out_channels=int(n_classes), channels=channels,
               strides=(2,) * (len(channels) - 1), num_res_units=int(num_res_units), norm=norm,
               dropout=float(dropout))
    net.tomoml_config = {"n_classes": int(n_classes), "channels": channels, "in_channels": int(in_channels),
                         "num_res_units": int(num_res_units), "dropout": float(dropout), "norm": norm}
    return net


def size_multiple(config) -> int:
    """Spatial sizes a network built from ``config`` accepts must be multiples of this.

    Examples
    --------
    >>> size_multiple({"channels": (16, 32, 64, 128)})
    8
    """
    return 2 ** (len(tuple(config["channels"])) - 1)
