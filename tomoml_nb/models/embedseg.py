"""A small 3D U-Net with EmbedSeg-style heads (offsets, clustering bandwidth, seed map, foreground).

Hand-written (plain ``torch.nn``) so that it runs wherever torch does, without MONAI.
Batch normalisation (running statistics at inference) keeps the output of a voxel
independent of how the volume is cut into tiles, which tile-and-stitch relies on.

Output channels (in this order):

* 3 offsets ``(z, y, x)`` in physical units, ``max_offset * tanh(.)``;
* ``n_sigma`` (1 or 3) clustering bandwidths, ``sigma_scale * exp(clamp(.))``;
* 1 seed map (sigmoid): how close a voxel's embedding lies to its instance centre;
* 1 foreground logit.

Examples
--------
>>> import torch
>>> net = EmbedSegUNet(base=4, levels=2)
>>> out = net(torch.zeros(1, 1, 16, 16, 16))
>>> out.shape
torch.Size([1, 8, 16, 16, 16])
>>> size_multiple(net.tomoml_config)
2
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["EmbedSegUNet", "build_embedseg", "size_multiple", "split_outputs", "DEFAULT_CONFIG"]

#: Architecture of the shipped fibre weights (see ``tomoml_nb/weights/embedseg_fibres.md``).
DEFAULT_CONFIG = {"in_channels": 1, "base": 16, "levels": 4, "n_sigma": 3, "max_offset": 32.0,
                  "sigma_scale": 3.0}


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.LeakyReLU(0.1, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.LeakyReLU(0.1, inplace=True))


class EmbedSegUNet(nn.Module):
    """3D U-Net: ``(B, in_channels, Z, Y, X)`` -> ``(B, 3 + n_sigma + 2, Z, Y, X)`` raw EmbedSeg outputs.

    Parameters
    ----------
    in_channels : int
        Input channels (1 for a grey volume).
    base : int
        Feature channels at full resolution; doubled at every level.
    levels : int >= 2
        Resolution levels (``levels - 1`` max-pool down-samplings by 2).
    n_sigma : {1, 3}
        One isotropic bandwidth, or one per axis (anisotropic objects / voxels).
    max_offset : float
        Largest offset (physical units) the tanh head can produce.
    sigma_scale : float
        Bandwidth at a raw output of 0 (physical units).
    """

    def __init__(self, in_channels=1, base=16, levels=3, n_sigma=3, max_offset=12.0, sigma_scale=3.0):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("base", base), ("levels", levels)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if levels < 2:
            raise ValueError(f"levels: expected >= 2, got {levels!r}")
        if n_sigma not in (1, 3):
            raise ValueError(f"n_sigma: expected 1 or 3, got {n_sigma!r}")
        if not max_offset > 0 or not sigma_scale > 0:
            raise ValueError(f"max_offset: max_offset and sigma_scale must be > 0, got {max_offset}, {sigma_scale}")
        ch = [int(base) * 2 ** i for i in range(int(levels))]
        self.enc = nn.ModuleList([_block(int(in_channels) if i == 0 else ch[i - 1], ch[i]) for i in range(levels)])
        self.up = nn.ModuleList([nn.ConvTranspose3d(ch[i + 1], ch[i], 2, stride=2) for i in range(levels - 1)])
        self.dec = nn.ModuleList([_block(2 * ch[i], ch[i]) for i in range(levels - 1)])
        self.n_sigma = int(n_sigma)
        self.head = nn.Conv3d(ch[0], 3 + self.n_sigma + 2, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.max_offset = float(max_offset)
        self.sigma_scale = float(sigma_scale)
        self.tomoml_config = {"in_channels": int(in_channels), "base": int(base), "levels": int(levels),
                              "n_sigma": int(n_sigma), "max_offset": float(max_offset),
                              "sigma_scale": float(sigma_scale)}

    def forward(self, x):
        skips = []
        for i, blk in enumerate(self.enc):
            x = blk(x)
            if i < len(self.enc) - 1:
                skips.append(x)
                x = nn.functional.max_pool3d(x, 2)
        for i in reversed(range(len(self.dec))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)


def split_outputs(raw, n_sigma, max_offset, sigma_scale):
    """Turn raw network outputs into ``(offsets, sigma, seed, fg_logit)`` tensors.

    Examples
    --------
    >>> import torch
    >>> off, sig, seed, fg = split_outputs(torch.zeros(1, 8, 2, 2, 2), 3, 10.0, 2.0)
    >>> off.shape, float(sig[0, 0, 0, 0, 0]), float(seed[0, 0, 0, 0, 0])
    (torch.Size([1, 3, 2, 2, 2]), 2.0, 0.5)
    """
    off = max_offset * torch.tanh(raw[:, :3])
    sig = sigma_scale * torch.exp(raw[:, 3:3 + n_sigma].clamp(-4.0, 4.0))
    seed = torch.sigmoid(raw[:, 3 + n_sigma:4 + n_sigma])
    fg = raw[:, 4 + n_sigma:5 + n_sigma]
    return off, sig, seed, fg


def build_embedseg(config=None):
    """Build an :class:`EmbedSegUNet` from a config dict (defaults: :data:`DEFAULT_CONFIG`).

    Examples
    --------
    >>> net = build_embedseg({"base": 4, "levels": 2})
    >>> net.tomoml_config["n_sigma"]
    3
    """
    cfg = dict(DEFAULT_CONFIG)
    if config:
        unknown = set(config) - set(DEFAULT_CONFIG)
        if unknown:
            raise ValueError(f"config: unknown key(s) {sorted(unknown)}; allowed {sorted(DEFAULT_CONFIG)}")
        cfg.update(config)
    return EmbedSegUNet(**cfg)


def size_multiple(config) -> int:
    """Spatial sizes must be multiples of this (``2 ** (levels - 1)``).

    Examples
    --------
    >>> size_multiple({"levels": 3})
    4
    """
    return 2 ** (int(config["levels"]) - 1)
