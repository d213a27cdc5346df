"""Networks for the STEGO-style unsupervised segmentation (torch only, no I/O).

* :class:`Backbone` -- a small fully convolutional encoder for greyscale slices that
  returns dense features at 1/2 resolution; dilated blocks at 1/4 resolution give it
  a receptive field of about 90 pixels, enough to "see" that a voxel lies next to an
  implant.
* :class:`DinoHead` -- the per-pixel projection + prototype layer used only during the
  DINO-style self-distillation of the backbone.
* :class:`SegmentationHead` -- the STEGO head: a linear plus a small non-linear 1x1
  branch mapping backbone features to a low-dimensional code whose correlations are
  trained to follow the backbone's.
* :class:`StegoNet` -- backbone + head, the network that is saved and shipped.

Examples
--------
>>> import torch
>>> net = StegoNet()
>>> f, c = net(torch.zeros(2, 1, 64, 64))
>>> tuple(f.shape), tuple(c.shape)
((2, 67, 32, 32), (2, 24, 32, 32))
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Backbone", "DinoHead", "SegmentationHead", "StegoNet"]


def _norm(ch):
    # batch norm (running statistics at inference) keeps absolute grey levels, which carry
    # meaning in CT; per-image group/instance norm would remove them
    return nn.BatchNorm2d(ch)


def _smooth(x, sigma):
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


class _Res(nn.Module):
    def __init__(self, ch, dilation=1):
        super().__init__()
        # replicate padding: zero padding would let the features encode the distance to the image
        # border, which k-means then happily clusters on
        self.c1 = nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation, padding_mode="replicate")
        self.n1 = _norm(ch)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1, padding_mode="replicate")
        self.n2 = _norm(ch)

    def forward(self, x):
        y = F.gelu(self.n1(self.c1(x)))
        return F.gelu(x + self.n2(self.c2(y)))


class Backbone(nn.Module):
    """Small CNN: (B, 1, H, W) → dense features (B, feat_dim, H/2, W/2).

    Parameters
    ----------
    width : int
        Channels at full resolution; 2x at 1/2, 4x at 1/4.
    feat_dim : int
        Output feature channels.
    dilations : tuple of int
        Dilations of the residual blocks at 1/4 resolution (context).
    """

    def __init__(self, width=16, feat_dim=64, dilations=(1, 2, 4, 8), grey_sigmas=(0.7, 1.5, 3.0), grey_weight=3.0):
        super().__init__()
        self.grey_sigmas = tuple(float(s) for s in grey_sigmas)
        self.grey_weight = float(grey_weight)
        w1, w2, w4 = width, 2 * width, 4 * width
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, padding=1, padding_mode="replicate"), _norm(w1), nn.GELU(),
                                  _Res(w1))
        self.down2 = nn.Sequential(nn.Conv2d(w1, w2, 3, stride=2, padding=1, padding_mode="replicate"), _norm(w2), nn.GELU(), _Res(w2))
        self.down4 = nn.Sequential(nn.Conv2d(w2, w4, 3, stride=2, padding=1, padding_mode="replicate"), _norm(w4), nn.GELU(),
                                   *[_Res(w4, d) for d in dilations])
        self.fuse = nn.Sequential(nn.Conv2d(w2 + w4 + 1, feat_dim, 1), _norm(feat_dim), nn.GELU(),
                                  nn.Conv2d(feat_dim, feat_dim, 3, padding=1, padding_mode="replicate"))
        self.feat_dim = feat_dim + len(self.grey_sigmas)

    def forward(self, x):
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"x: height and width must be multiples of 4, got {tuple(x.shape[-2:])}")
        h2 = self.down2(self.stem(x))
        h4 = self.down4(h2)
        up = F.interpolate(h4, size=h2.shape[-2:], mode="bilinear", align_corners=False)
        grey = F.avg_pool2d(x, 2)           # the grey level itself, at feature resolution
        learned = self.fuse(torch.cat([h2, up, grey], 1))
        if not self.grey_sigmas:
            return learned
        # appearance channels: the grey level smoothed at a few scales (fixed, not learned), so that
        # the features hold what a voxel's attenuation is next to what its context looks like
        app = [_smooth(x, s) for s in self.grey_sigmas]
        app = F.avg_pool2d(torch.cat(app, 1), 2)
        return torch.cat([learned, self.grey_weight * (app - 0.35) / 0.3], 1)


class DinoHead(nn.Module):
    """Per-pixel DINO projection: MLP (1x1 convs) → L2-normalised bottleneck → prototypes."""

    def __init__(self, feat_dim=64, hidden=128, bottleneck=32, n_prototypes=128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(feat_dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, hidden, 1), nn.GELU(),
                                 nn.Conv2d(hidden, bottleneck, 1))
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, bottleneck) / bottleneck ** 0.5)

    def forward(self, f):
        # cosine similarity to unit-norm prototypes (DINO's "normalised last layer"): logits in [-1, 1]
        z = F.normalize(self.mlp(f), dim=1)
        w = F.normalize(self.prototypes, dim=1)
        return torch.einsum("bchw,kc->bkhw", z, w)


class SegmentationHead(nn.Module):
    """STEGO head: linear 1x1 branch + non-linear 1x1 branch, summed (code dimension ``dim``)."""

    def __init__(self, feat_dim=64, dim=24):
        super().__init__()
        self.linear = nn.Conv2d(feat_dim, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(feat_dim, feat_dim, 1), nn.ReLU(), nn.Conv2d(feat_dim, dim, 1))

    def forward(self, f):
        return self.linear(f) + self.nonlinear(f)


class StegoNet(nn.Module):
    """Backbone + STEGO segmentation head; ``forward`` returns ``(features, code)``."""

    def __init__(self, width=16, feat_dim=64, dilations=(1, 2, 4, 8), code_dim=24, grey_sigmas=(0.7, 1.5, 3.0),
                 grey_weight=3.0):
        super().__init__()
        self.backbone = Backbone(width, feat_dim, tuple(dilations), tuple(grey_sigmas), grey_weight)
        self.head = SegmentationHead(self.backbone.feat_dim, code_dim)
        self.config = dict(width=width, feat_dim=feat_dim, dilations=list(dilations), code_dim=code_dim,
                           grey_sigmas=list(grey_sigmas), grey_weight=float(grey_weight))

    def forward(self, x):
        f = self.backbone(x)
        return f, self.head(f)
