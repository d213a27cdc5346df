"""Mixed-scale dense (MSD) convolutional network.

Pelt & Sethian, "A mixed-scale dense convolutional neural network for image analysis",
PNAS 115 (2018) 254-259. Every layer is a 3x3 *dilated* convolution of **all** previous
feature maps (the input included), followed by a ReLU, and produces ``width`` new maps
(``width=1`` in the paper). Dilations cycle through ``1, 2, ..., max_dilation``, so
every layer mixes fine and coarse scales without down- or up-sampling. A final 1x1
convolution maps all feature maps (input and every layer) to the output channels.

Because the input image is one of the maps that the final 1x1 layer sees, the identity
(and so a residual "input minus noise" mapping) is learned easily; no batch
normalisation is used.

Memory and speed: a 3x3 dilated convolution is computed as one 1x1 projection to the
nine tap images followed by nine shifted additions (several times faster on CPU than
PyTorch's generic dilated kernel). Inference (no gradient) never keeps more than one
concatenation alive: a 100-layer network on a 256 x 256 slice needs about 30 MB. While
training, ``checkpoint=True`` recomputes each concatenation in the backward pass, so
memory grows like ``depth`` feature maps rather than ``depth**2 / 2``.

Examples
--------
>>> import torch
>>> net = MSDNet(depth=20)
>>> net(torch.zeros(2, 1, 32, 32)).shape
torch.Size([2, 1, 32, 32])
>>> net.receptive_field()
221
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = ["MSDNet", "widen_input"]


class _ShiftSum(torch.autograd.Function):
    """``out = bias + sum_k taps[:, k-th group, shifted window k]`` with a cheap backward.

    ``taps`` is padded by ``d`` on each side and holds 9 groups of ``w`` channels, one per
    kernel tap (k = 3 ky + kx); the window of tap k starts at ``(ky d, kx d)``. Autograd's
    own slice backward would allocate and add nine zero-filled padded tensors per layer;
    here the gradient of each group is written once into one buffer.
    """

    @staticmethod
    def forward(ctx, taps, bias, d, w):
        H, W = taps.shape[-2] - 2 * d, taps.shape[-1] - 2 * d
        out = taps[:, 0:w, 0:H, 0:W] + bias.view(1, w, 1, 1)
        for k in range(1, 9):
            ky, kx = divmod(k, 3)
            out += taps[:, k * w:(k + 1) * w, ky * d:ky * d + H, kx * d:kx * d + W]
        ctx.meta = (taps.shape, d, w)
        return out

    @staticmethod
    def backward(ctx, grad):
        shape, d, w = ctx.meta
        H, W = shape[-2] - 2 * d, shape[-1] - 2 * d
        g = grad.new_zeros(shape)
        for k in range(9):
            ky, kx = divmod(k, 3)
            g[:, k * w:(k + 1) * w, ky * d:ky * d + H, kx * d:kx * d + W] = grad
        return g, grad.sum((0, 2, 3)), None, None


class _DilatedLayer(nn.Module):
    """3x3 dilated convolution of all previous maps, computed as a channel projection
    (matrix product) to 9 x width tap images followed by nine shifted sums.

    Mathematically identical to ``nn.Conv2d(c_in, width, 3, dilation=d, padding=d)``
    with the chosen border padding (padding is linear per channel, so it commutes with
    the channel projection), and several times faster on CPU, where PyTorch's dilated
    convolution falls back to a slow generic kernel.
    """

    def __init__(self, in_channels, width, dilation, padding_mode):
        super().__init__()
        self.in_channels, self.width, self.dilation = in_channels, width, dilation
        self.padding_mode = padding_mode
        self.weight = nn.Parameter(torch.empty(width, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(width))
        # He initialisation over the true fan-in (all previous maps x 3 x 3), as in the paper
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (in_channels * 9)))

    def forward(self, x):
        d, w = self.dilation, self.width
        # (width, C, 3, 3) -> (9 * width, C, 1, 1): tap k = 3 * ky + kx of every output map
        B, C, H, W = x.shape
        proj = self.weight.permute(2, 3, 0, 1).reshape(9 * w, C)
        # a batched matmul is ~20x faster than a 1x1 conv2d with few outputs on CPU
        taps = torch.matmul(proj, x.reshape(B, C, H * W)).view(B, 9 * w, H, W)
        if self.padding_mode == "zeros":
            taps = F.pad(taps, (d, d, d, d))
        else:
            taps = F.pad(taps, (d, d, d, d), mode="reflect" if self.padding_mode == "reflect" else "replicate")
        return _ShiftSum.apply(taps, self.bias, d, w)

    def extra_repr(self):
        return f"{self.in_channels} -> {self.width}, 3x3, dilation={self.dilation}, padding={self.padding_mode}"


class MSDNet(nn.Module):
    """Mixed-scale dense network for 2D images.

    Parameters
    ----------
    in_channels, out_channels : int
        Input and output channels.
    depth : int
        Number of dilated 3x3 layers (the paper uses 50-200 for denoising).
    width : int
        Feature maps added per layer (1 in the paper).
    max_dilation : int
        Dilations cycle ``1, 2, ..., max_dilation`` over the layers.
    padding_mode : {"reflect", "zeros", "replicate"}
        Border handling of the dilated convolutions. ``"reflect"`` needs images larger
        than ``max_dilation`` pixels on each side.
    checkpoint : bool
        Recompute each layer's concatenated input in the backward pass instead of storing
        it: training memory ~``depth`` maps instead of ``depth**2 / 2`` (about 1.3x slower).
        Worth it for large training patches (e.g. 100 layers, batch 8 of 256 x 256).

    Examples
    --------
    >>> net = MSDNet(depth=10, max_dilation=5)
    >>> [layer.dilation for layer in net.layers][:7]
    [1, 2, 3, 4, 5, 1, 2]
    >>> sum(p.numel() for p in net.parameters())
    517
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, depth: int = 50, width: int = 1,
                 max_dilation: int = 10, padding_mode: str = "reflect", checkpoint: bool = False):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("depth", depth),
                        ("width", width), ("max_dilation", max_dilation)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        if padding_mode not in ("reflect", "zeros", "replicate"):
            raise ValueError(f"padding_mode: unknown value {padding_mode!r}; choose 'reflect', 'zeros' or 'replicate'")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, depth=depth, width=width,
                           max_dilation=max_dilation, padding_mode=padding_mode)
        self.checkpoint = bool(checkpoint)
        self.dilations = [1 + i % max_dilation for i in range(depth)]
        self.layers = nn.ModuleList(
            _DilatedLayer(in_channels + i * width, width, d, padding_mode) for i, d in enumerate(self.dilations))
        self.final = nn.Conv2d(in_channels + depth * width, out_channels, 1)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)
        with torch.no_grad():  # start as the identity on the first input channel(s)
            for c in range(min(in_channels, out_channels)):
                self.final.weight[c, c] = 1.0

    def receptive_field(self) -> int:
        """Width in pixels of the region that influences one output pixel."""
        return 1 + 2 * sum(self.dilations)

    @staticmethod
    def _layer(layer, *maps):
        return F.relu(layer(torch.cat(maps, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"x: expected (batch, {self.config['in_channels']}, H, W), got {tuple(x.shape)}")
        if self.config["padding_mode"] == "reflect" and min(x.shape[-2:]) <= max(self.dilations):
            raise ValueError(f"x: images must be larger than max_dilation={max(self.dilations)} pixels per side "
                             f"for reflect padding, got {tuple(x.shape[-2:])}")
        maps = [x]
        use_ckpt = self.checkpoint and torch.is_grad_enabled() and self.training
        for layer in self.layers:
            if use_ckpt:
                out = _checkpoint(self._layer, layer, *maps, use_reentrant=False)
            else:
                out = self._layer(layer, *maps)
            maps.append(out)
        return self.final(torch.cat(maps, 1))


def widen_input(net: MSDNet, in_channels: int) -> MSDNet:
    """A copy of ``net`` that takes ``in_channels`` input channels and computes the same output.

    The new channels are appended after the existing ones with zero weights in every layer
    and in the final 1x1 convolution, so the widened network starts exactly where ``net``
    is and training can only add what the new inputs (e.g. neighbouring slices) bring.

    Examples
    --------
    >>> net = MSDNet(depth=5)
    >>> _ = torch.nn.init.normal_(net.final.weight)
    >>> wide = widen_input(net, 3)
    >>> x = torch.randn(2, 1, 24, 24)
    >>> bool(torch.allclose(wide(torch.cat([x, torch.randn(2, 2, 24, 24)], 1)), net(x), atol=1e-6))
    True
    """
    old = int(net.config["in_channels"])
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < old:
        raise ValueError(f"in_channels: must be an integer >= the network's {old}, got {in_channels!r}")
    cfg = dict(net.config, in_channels=in_channels)
    wide = MSDNet(**cfg, checkpoint=net.checkpoint)
    add = in_channels - old
    with torch.no_grad():
        for lo, ln in zip(net.layers, wide.layers):
            w = lo.weight
            ln.weight.copy_(torch.cat([w[:, :old], w.new_zeros(w.shape[0], add, 3, 3), w[:, old:]], 1))
            ln.bias.copy_(lo.bias)
        w = net.final.weight
        wide.final.weight.copy_(torch.cat([w[:, :old], w.new_zeros(w.shape[0], add, 1, 1), w[:, old:]], 1))
        wide.final.bias.copy_(net.final.bias)
    return wide
