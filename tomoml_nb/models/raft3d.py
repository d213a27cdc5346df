"""VolRAFT: a small volumetric RAFT network for digital volume correlation.

RAFT (recurrent all-pairs field transforms) extended to 3D, as in the VolRAFT
work on SR-µCT: a shared feature encoder and a context encoder bring both volumes to
``1/downsample`` resolution, an all-pairs 3D correlation volume is pooled into a
pyramid over its last three axes, and a convolutional GRU refines the coarse flow for
a few iterations from local ``(2r+1)^3`` correlation look-ups. Features are compared by
cosine similarity, and each look-up also passes the soft-argmax (expected offset) of its
window (softmax of 2.5 x the scaled correlation), a direct motion cue meant to speed up
early training. The coarse flow is brought back to full resolution by learned convex
upsampling.

Two pitfalls of the published code are handled explicitly here:

* ``grid_sample`` takes coordinates ordered ``(x, y, z)`` where ``x`` indexes the
  *last* tensor axis; internally every flow is ``(z, y, x)`` and is reversed only
  when a sampling grid is built (:func:`sample_grid`).
* a flow measured in coarse voxels must be multiplied by the upsampling factor when
  brought to full resolution (:meth:`VolRAFT.upsample`).

Displacements follow the package convention: channels ``(z, y, x)`` in voxels,
``moving(x + u(x)) ≈ fixed(x)``. Networks only, no I/O (see ``tomoml_nb.dvc``).

Examples
--------
>>> import torch
>>> net = VolRAFT(downsample=4)
>>> f = torch.randn(1, 1, 16, 16, 16)
>>> net(f, f, iters=2)[-1].shape
torch.Size([1, 3, 16, 16, 16])
"""
from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["VolRAFT", "sample_grid", "coords_grid", "window_lookup"]


def coords_grid(batch, shape, device=None, dtype=torch.float32):
    """Voxel coordinates ``(B, 3, D, H, W)`` in ``(z, y, x)`` channel order.

    Examples
    --------
    >>> coords_grid(1, (2, 3, 4))[0, :, 1, 2, 3].tolist()
    [1.0, 2.0, 3.0]
    """
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid[None].expand(batch, -1, -1, -1, -1)


def sample_grid(volume, points, mode="bilinear", padding_mode="zeros"):
    """Sample ``volume (N, C, D, H, W)`` at voxel coordinates ``points (N, ..., 3)`` ordered ``(z, y, x)``.

    The coordinates are normalised with ``align_corners=True`` and reversed to the
    ``(x, y, z)`` order that :func:`torch.nn.functional.grid_sample` expects.
    ``points`` must have shape ``(N, d, h, w, 3)``; the result is ``(N, C, d, h, w)``.

    Examples
    --------
    >>> v = torch.arange(24.).reshape(1, 1, 2, 3, 4)
    >>> p = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 1, 1, 3)
    >>> float(sample_grid(v, p))   # v[0, 0, 1, 2, 3]
    23.0
    """
    sizes = volume.shape[-3:]
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in sizes], device=points.device, dtype=points.dtype)
    norm = points * scale - 1.0
    return F.grid_sample(volume, norm.flip(-1), mode=mode, padding_mode=padding_mode, align_corners=True)


def window_lookup(volume, centre, radius):
    """Trilinear samples of ``volume (N, D, H, W)`` on the integer-offset window around ``centre (N, 3)``.

    Returns ``(N, 2r+1, 2r+1, 2r+1)``: entry ``[n, a, b, c]`` is ``volume[n]`` at
    ``centre[n] + (a - r, b - r, c - r)`` (``(z, y, x)`` voxel coordinates), zero outside the
    volume -- the same values as :func:`sample_grid` (``align_corners=True``, zero padding)
    at those points, including its rule that an axis of size 1 is read at index 0 whatever
    the coordinate. All offsets share the fractional part of the centre, so the window is
    one gather of ``(2r+2)^3`` voxels followed by three separable linear interpolations:
    2-3x faster on the CPU than ``grid_sample`` on ``(2r+1)^3`` points, and
    differentiable with respect to ``volume``.

    Examples
    --------
    >>> v = torch.arange(64.).reshape(1, 4, 4, 4)
    >>> w = window_lookup(v, torch.tensor([[1.0, 1.0, 1.5]]), 1)
    >>> float(w[0, 1, 1, 1]), float(w[0, 1, 1, 2])        # v[1, 1, 1.5], v[1, 1, 2.5]
    (21.5, 22.5)
    """
    n = volume.shape[0]
    sizes = volume.shape[1:]
    r = int(radius)
    base = torch.floor(centre)
    frac = centre - base
    span = torch.arange(-r, r + 2, device=centre.device)
    idx, ok = [], []
    for ax, size in enumerate(sizes):
        if size == 1:  # grid_sample (align_corners=True) maps every coordinate of a size-1 axis to 0
            idx.append(torch.zeros(n, 2 * r + 2, dtype=torch.long, device=centre.device))
            ok.append(torch.ones(n, 2 * r + 2, dtype=torch.bool, device=centre.device))
            frac = frac.clone()
            frac[:, ax] = 0
            continue
        i = base[:, ax].clamp(-r - 2, size + r).long()[:, None] + span
        ok.append((i >= 0) & (i < size))
        idx.append(i.clamp(0, size - 1))
    _, H, W = sizes
    flat = (idx[0][:, :, None, None] * (H * W) + idx[1][:, None, :, None] * W + idx[2][:, None, None, :])
    m = 2 * r + 2
    vals = volume.reshape(n, -1).gather(1, flat.reshape(n, -1)).reshape(n, m, m, m)
    # linear interpolation along z, y, x; voxels outside the volume get weight 0
    for ax in range(3):
        t = frac[:, ax].to(vals.dtype)[:, None]
        valid = ok[ax].to(vals.dtype)
        w0, w1 = (1 - t) * valid[:, :-1], t * valid[:, 1:]
        shape = [n] + [1] * 3
        shape[ax + 1] = m - 1
        lo = vals.narrow(ax + 1, 0, m - 1)
        hi = vals.narrow(ax + 1, 1, m - 1)
        vals = lo * w0.view(shape) + hi * w1.view(shape)
    return vals


class _Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes the oneDNN path on the CPU.

    PyTorch's heuristic sends small volumes (the coarse 1/4-resolution maps of this
    network) to a generic "slow_conv3d" kernel, measured 5-7x slower than oneDNN on
    the same input; the weights and results are the same.
    """

    def forward(self, x):
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.padding_mode == "zeros"
                and torch.backends.mkldnn.is_available() and x.dim() == 5):
            return torch.mkldnn_convolution(x.contiguous(), self.weight, self.bias, self.padding, self.stride,
                                            self.dilation, self.groups)
        return super().forward(x)


def _norm(kind, ch):
    if kind == "instance":
        return nn.InstanceNorm3d(ch, affine=False)
    if kind == "group":
        return nn.GroupNorm(max(1, ch // 8), ch)
    return nn.Identity()


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, norm="instance"):
        super().__init__()
        self.conv1 = _Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = _Conv3d(cout, cout, 3, padding=1)
        self.n1, self.n2 = _norm(norm, cout), _norm(norm, cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(_Conv3d(cin, cout, 1, stride=stride), _norm(norm, cout))

    def forward(self, x):
        y = F.relu(self.n1(self.conv1(x)))
        y = self.n2(self.conv2(y))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class _Encoder(nn.Module):
    """Strided 3D CNN to ``1/downsample`` resolution (downsample in 2, 4, 8)."""

    def __init__(self, out_dim, base=16, downsample=4, norm="instance"):
        super().__init__()
        layers = [_Conv3d(1, base, 5, stride=2, padding=2), _norm(norm, base), nn.ReLU(inplace=True),
                  _ResBlock(base, base, 1, norm)]
        ch, f = base, 2
        while f < downsample:
            layers.append(_ResBlock(ch, ch + base, 2, norm))
            ch, f = ch + base, f * 2
        layers.append(_ResBlock(ch, ch, 1, norm))
        layers.append(_Conv3d(ch, out_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _ConvGRU(nn.Module):
    def __init__(self, hidden, inp):
        super().__init__()
        self.convz = _Conv3d(hidden + inp, hidden, 3, padding=1)
        self.convr = _Conv3d(hidden + inp, hidden, 3, padding=1)
        self.convq = _Conv3d(hidden + inp, hidden, 3, padding=1)

    def forward(self, h, x):
        hx = torch.cat([h, x], 1)
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], 1)))
        return (1 - z) * h + z * q


class _UpdateBlock(nn.Module):
    def __init__(self, corr_ch, hidden, context, factor, motion=32):
        super().__init__()
        self.convc1 = _Conv3d(corr_ch, 48, 1)
        self.convc2 = _Conv3d(48, motion, 3, padding=1)
        self.convf1 = _Conv3d(3, 24, 5, padding=2)
        self.convf2 = _Conv3d(24, 16, 3, padding=1)
        self.conv = _Conv3d(motion + 16, motion - 3, 3, padding=1)
        self.gru = _ConvGRU(hidden, context + motion)
        self.flow_head = nn.Sequential(_Conv3d(hidden, 32, 3, padding=1), nn.ReLU(inplace=True),
                                       _Conv3d(32, 3, 3, padding=1))
        self.mask_head = nn.Sequential(_Conv3d(hidden, 32, 3, padding=1), nn.ReLU(inplace=True),
                                       _Conv3d(32, 27 * factor**3, 1))

    def forward(self, net, inp, corr, flow, need_mask=True):
        c = F.relu(self.convc2(F.relu(self.convc1(corr))))
        f = F.relu(self.convf2(F.relu(self.convf1(flow))))
        motion = torch.cat([F.relu(self.conv(torch.cat([c, f], 1))), flow], 1)
        net = self.gru(net, torch.cat([inp, motion], 1))
        mask = 0.25 * self.mask_head(net) if need_mask else None  # only needed where a flow is upsampled
        return net, mask, self.flow_head(net)


class _CorrPyramid:
    """All-pairs correlation of two feature maps, pooled over the moving volume's axes."""

    def __init__(self, f1, f2, levels, radius):
        b, c, d, h, w = f1.shape
        # cosine similarity (unit feature vectors), scaled: a bounded, well-conditioned matching signal
        f1 = 4.0 * F.normalize(f1.reshape(b, c, -1).float(), dim=1)
        f2 = F.normalize(f2.float(), dim=1)
        # level l = the correlation averaged over 2^l-blocks of the moving volume; the correlation is
        # linear in f2, so it is computed from block-averaged features (no pooling of the big volume)
        self.pyramid = []
        for lvl in range(levels):
            if lvl:
                if min(f2.shape[-3:]) < 2:
                    break
                f2 = F.avg_pool3d(f2, 2, stride=2)
            corr = torch.einsum("bcn,bcm->bnm", f1, f2.reshape(b, c, -1))
            self.pyramid.append(corr.reshape(b * d * h * w, *f2.shape[-3:]))  # (N, d_l, h_l, w_l)
        r = radius
        offs = torch.tensor(list(itertools.product(range(-r, r + 1), repeat=3)), dtype=torch.float32,
                            device=f1.device)
        self.offsets = offs  # (K, 3) in (dz, dy, dx)
        self.levels, self.radius = levels, radius
        self.shape = (b, d, h, w)

    @property
    def channels(self):
        return self.levels * (self.offsets.shape[0] + 3)

    def __call__(self, coords, cue_scale=2.5):
        b, d, h, w = self.shape
        k = self.offsets.shape[0]
        centre = coords.permute(0, 2, 3, 4, 1).reshape(b * d * h * w, 3)
        out = []
        for lvl in range(self.levels):
            if lvl < len(self.pyramid):
                s = window_lookup(self.pyramid[lvl], centre / 2**lvl, self.radius).reshape(b, d, h, w, k)
                # soft-argmax of the window: the expected offset (level-0 coarse voxels), a direct motion cue
                cue = torch.softmax(cue_scale * s, -1) @ (self.offsets * 2**lvl)
                out.append(torch.cat([s, cue], -1))
            else:  # a patch too small for this level: no information
                out.append(coords.new_zeros(b, d, h, w, k + 3))
        return torch.cat(out, -1).permute(0, 4, 1, 2, 3).contiguous()


class VolRAFT(nn.Module):
    """Volumetric RAFT for dense 3D displacement between two single-channel volumes.

    Parameters
    ----------
    downsample : {2, 4, 8}
        Resolution of the correlation and the recurrent update (1/downsample).
    feature_dim, hidden_dim, context_dim, base : int
        Channel widths of the feature encoder output, GRU state, context and encoder stem.
    levels, radius : int
        Correlation pyramid levels and look-up radius (window ``(2r+1)^3``).

    Inputs have shape ``(B, 1, D, H, W)`` with each spatial size a multiple of
    ``downsample``; both are expected normalised (zero mean, unit variance).
    ``forward`` returns the list of full-resolution flows, one per iteration in
    training mode (for the sequence loss), only the last one in eval mode; channels
    ``(z, y, x)`` in voxels.

    Examples
    --------
    >>> net = VolRAFT(downsample=4, levels=2, radius=1)
    >>> x = torch.randn(2, 1, 16, 16, 16)
    >>> out = net.train()(x, x, iters=3)
    >>> len(out), tuple(out[-1].shape)
    (3, (2, 3, 16, 16, 16))
    """

    def __init__(self, downsample=4, feature_dim=32, hidden_dim=32, context_dim=16, base=16, levels=3, radius=2):
        super().__init__()
        if downsample not in (2, 4, 8):
            raise ValueError(f"downsample: expected 2, 4 or 8, got {downsample!r}")
        self.config = dict(downsample=downsample, feature_dim=feature_dim, hidden_dim=hidden_dim,
                           context_dim=context_dim, base=base, levels=levels, radius=radius)
        self.factor = downsample
        self.hidden_dim, self.context_dim = hidden_dim, context_dim
        self.levels, self.radius = levels, radius
        self.fnet = _Encoder(feature_dim, base, downsample, "instance")
        self.cnet = _Encoder(hidden_dim + context_dim, base, downsample, "group")
        self.update = _UpdateBlock(levels * ((2 * radius + 1) ** 3 + 3), hidden_dim, context_dim, downsample)

    def upsample(self, flow, mask):
        """Convex upsampling of a coarse flow ``(B, 3, d, h, w)`` by ``factor`` (values scaled too)."""
        f = self.factor
        b, _, d, h, w = flow.shape
        mask = torch.softmax(mask.view(b, 1, 27, f, f, f, d, h, w), dim=2)
        padded = F.pad(f * flow, (1, 1, 1, 1, 1, 1), mode="replicate")
        up = None  # (b, 3, f, f, f, d, h, w): weighted sum over the 27 neighbours, accumulated in place
        for n, (i, j, k) in enumerate(itertools.product(range(3), repeat=3)):
            term = mask[:, :, n] * padded[:, :, i:i + d, j:j + h, k:k + w].view(b, 3, 1, 1, 1, d, h, w)
            up = term if up is None else up.add_(term)
        return up.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, 3, d * f, h * f, w * f)

    def forward(self, fixed, moving, iters=8, flow_init=None):
        f = self.factor
        if any(s % f for s in fixed.shape[-3:]):
            raise ValueError(f"fixed: spatial shape {tuple(fixed.shape[-3:])} must be a multiple of {f}")
        f1, f2 = self.fnet(torch.cat([fixed, moving], 0)).chunk(2, 0)
        corr = _CorrPyramid(f1, f2, self.levels, self.radius)
        ctx = self.cnet(fixed)
        net, inp = torch.split(ctx, [self.hidden_dim, self.context_dim], 1)
        net, inp = torch.tanh(net), F.relu(inp)
        b, _, d, h, w = f1.shape
        coords0 = coords_grid(b, (d, h, w), fixed.device, f1.dtype)
        coords1 = coords0.clone()
        if flow_init is not None:  # full-resolution flow in voxels -> coarse voxels
            coords1 = coords1 + F.avg_pool3d(flow_init, f) / f
        flows = []
        for it in range(iters):
            coords1 = coords1.detach()
            c = corr(coords1)
            flow = coords1 - coords0
            keep = self.training or it == iters - 1  # at inference only the last flow is upsampled
            net, mask, delta = self.update(net, inp, c, flow, need_mask=keep)
            coords1 = coords1 + delta
            if keep:
                flows.append(self.upsample(coords1 - coords0, mask))
        return flows
