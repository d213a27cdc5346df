"""CycleGAN networks for virtual histology (no I/O, no data handling).

* :class:`ResnetGenerator` -- the image-to-image generator of CycleGAN: a 7x7
  stem, strided down-sampling, residual blocks at the lowest resolution, and
  resize-convolution up-sampling (nearest-neighbour up-sampling followed by a
  3x3 convolution, which avoids the checkerboard artefacts of transposed
  convolutions); ``tanh`` output in [-1, 1].
* :class:`UNetGenerator` -- a small U-Net (the pix2pix generator): skip
  connections carry full-resolution detail, so near pixel-wise mappings are
  learnt in few steps (the default here).
* :class:`PatchDiscriminator` -- a PatchGAN: a small fully convolutional
  network whose output is a map of real/fake scores, one per overlapping patch
  (receptive field 22 pixels for ``n_layers=2``, 46 for 3), i.e. it judges local
  texture and colour, not global layout.
* :class:`CycleGAN` -- the four networks of the two translation directions in one
  module (``g_ab``: CT -> histology, ``g_ba``: histology -> CT, ``d_a``, ``d_b``);
  calling it runs ``g_ab``.

Both domains use the same number of channels (a grey CT slice is repeated to 3
channels when the histology is RGB), so the identity loss of CycleGAN is defined.

Examples
--------
>>> import torch
>>> net = CycleGAN(channels=3, base=8, n_blocks=2)
>>> net(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 3, 32, 32])
>>> net.d_b(torch.zeros(2, 3, 32, 32)).shape[1]
1
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["ResnetGenerator", "UNetGenerator", "PatchDiscriminator", "CycleGAN", "GENERATORS", "size_multiple"]

#: Generator architectures of :class:`CycleGAN`.
GENERATORS = ("unet", "resnet")

_NORMS = ("instance", "batch", "none")


def _norm(kind, channels):
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


class _ResBlock(nn.Module):
    def __init__(self, c, norm):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), _norm(norm, c), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), _norm(norm, c))

    def forward(self, x):
        return x + self.body(x)


def _check_generator(in_channels, out_channels, base, n_down, n_blocks, norm):
    """Validate the arguments both generators share; errors name the parameter."""
    if norm not in _NORMS:
        raise ValueError(f"norm: unknown value {norm!r}; choose one of {_NORMS}")
    return (_check_int(in_channels, "in_channels", 1), _check_int(out_channels, "out_channels", 1),
            _check_int(base, "base", 1), _check_int(n_down, "n_down", 0), _check_int(n_blocks, "n_blocks", 0))


class ResnetGenerator(nn.Module):
    """CycleGAN ResNet generator ``(B, in_channels, H, W) -> (B, out_channels, H, W)`` in [-1, 1].

    Parameters
    ----------
    in_channels, out_channels : int
        Image channels.
    base : int
        Channels of the first layer (doubled at each down-sampling).
    n_down : int
        Number of 2x down-samplings (``H`` and ``W`` must be multiples of ``2**n_down``).
    n_blocks : int
        Residual blocks at the lowest resolution.
    norm : {"instance", "batch", "none"}
        Normalisation layers.

    Examples
    --------
    >>> g = ResnetGenerator(1, 3, base=8, n_blocks=1)
    >>> g(torch.zeros(1, 1, 16, 16)).shape
    torch.Size([1, 3, 16, 16])
    """

    def __init__(self, in_channels=1, out_channels=3, base=16, n_down=2, n_blocks=4, norm="instance"):
        super().__init__()
        in_channels, out_channels, base, n_down, n_blocks = _check_generator(
            in_channels, out_channels, base, n_down, n_blocks, norm)
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, base, 7), _norm(norm, base), nn.ReLU(inplace=True)]
        c = base
        for _ in range(n_down):
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), _norm(norm, 2 * c), nn.ReLU(inplace=True)]
            c *= 2
        layers += [_ResBlock(c, norm) for _ in range(n_blocks)]
        for _ in range(n_down):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1), nn.Conv2d(c, c // 2, 3),
                       _norm(norm, c // 2), nn.ReLU(inplace=True)]
            c //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.n_down = n_down

    def forward(self, x):
        return self.net(x)


def _conv(cin, cout, norm, stride=1):
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode="reflect"), _norm(norm, cout),
            nn.ReLU(inplace=True)]


class UNetGenerator(nn.Module):
    """Small U-Net generator ``(B, in_channels, H, W) -> (B, out_channels, H, W)`` in [-1, 1].

    Two 3x3 convolutions per level, stride-2 convolutions down, residual blocks at
    the bottom, nearest-neighbour up-sampling + 3x3 convolution up, and skip
    connections that concatenate the encoder features of the same resolution --
    so full-resolution detail does not have to pass through the bottleneck (the
    pix2pix generator design; it learns a near pixel-wise mapping such as
    CT -> stain in far fewer steps than the ResNet generator).

    Parameters
    ----------
    in_channels, out_channels : int
        Image channels.
    base : int
        Channels at full resolution (doubled per level).
    n_down : int
        Down-samplings (``H``, ``W`` multiples of ``2**n_down``).
    n_blocks : int
        Residual blocks at the bottom.
    norm : {"instance", "batch", "none"}
        Normalisation layers.

    Examples
    --------
    >>> g = UNetGenerator(1, 3, base=8, n_blocks=1)
    >>> g(torch.zeros(1, 1, 16, 16)).shape
    torch.Size([1, 3, 16, 16])
    """

    def __init__(self, in_channels=1, out_channels=3, base=16, n_down=2, n_blocks=2, norm="instance"):
        super().__init__()
        in_channels, out_channels, base, n_down, n_blocks = _check_generator(
            in_channels, out_channels, base, n_down, n_blocks, norm)
        chans = [base * 2 ** k for k in range(n_down + 1)]
        self.enc = nn.ModuleList([nn.Sequential(*_conv(in_channels, chans[0], norm), *_conv(chans[0], chans[0], norm))])
        for k in range(1, n_down + 1):
            self.enc.append(nn.Sequential(*_conv(chans[k - 1], chans[k], norm, stride=2),
                                          *_conv(chans[k], chans[k], norm)))
        self.bottom = nn.Sequential(*[_ResBlock(chans[-1], norm) for _ in range(n_blocks)])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for k in range(n_down, 0, -1):
            self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), *_conv(chans[k], chans[k - 1], norm)))
            self.dec.append(nn.Sequential(*_conv(2 * chans[k - 1], chans[k - 1], norm)))
        self.head = nn.Sequential(nn.Conv2d(chans[0], out_channels, 1), nn.Tanh())
        self.n_down = n_down

    def forward(self, x):
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: a map of real/fake scores (no sigmoid; least-squares GAN).

    Parameters
    ----------
    in_channels : int
        Image channels.
    base : int
        Channels of the first layer.
    n_layers : int
        Strided layers (receptive field 22 pixels for 2, 46 for 3).
    norm : {"instance", "batch", "none"}
        Normalisation (never on the first layer).

    Examples
    --------
    >>> d = PatchDiscriminator(3, base=8)
    >>> d(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 1, 14, 14])
    """

    def __init__(self, in_channels=3, base=32, n_layers=2, norm="instance"):
        super().__init__()
        in_channels = _check_int(in_channels, "in_channels", 1)
        base = _check_int(base, "base", 1)
        n_layers = _check_int(n_layers, "n_layers", 1)
        if norm not in _NORMS:
            raise ValueError(f"norm: unknown value {norm!r}; choose one of {_NORMS}")
        layers = [nn.Conv2d(in_channels, base, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        c = base
        for _ in range(1, n_layers):
            layers += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), _norm(norm, 2 * c), nn.LeakyReLU(0.2, inplace=True)]
            c *= 2
        layers += [nn.Conv2d(c, 2 * c, 4, stride=1, padding=1), _norm(norm, 2 * c), nn.LeakyReLU(0.2, inplace=True),
                   nn.Conv2d(2 * c, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class CycleGAN(nn.Module):
    """The four networks of a CycleGAN; ``forward`` translates domain A (CT) to B (histology).

    Parameters
    ----------
    channels : int
        Channels of both domains (3 for RGB histology, 1 for grey).
    base, n_down, n_blocks : int
        Generator size (see :class:`UNetGenerator`, :class:`ResnetGenerator`).
    d_base, d_layers : int
        Discriminator size (see :class:`PatchDiscriminator`).
    norm : {"instance", "batch", "none"}
        Normalisation of the generators. ``"none"`` (default): instance
        normalisation makes the colour of a crop depend on its content, which
        shows as colour casts when whole slices are translated.
    discriminators : bool
        Build the discriminators (not needed to run a trained model).
    generator : {"unet", "resnet"}
        Generator architecture.
    d_norm : {"instance", "batch", "none"}
        Normalisation of the discriminators.

    Examples
    --------
    >>> net = CycleGAN(channels=1, base=8, n_blocks=1, discriminators=False)
    >>> net.g_ba(torch.zeros(1, 1, 16, 16)).shape
    torch.Size([1, 1, 16, 16])
    """

    def __init__(self, channels=3, base=16, n_down=2, n_blocks=2, d_base=32, d_layers=2, norm="none",
                 discriminators=True, generator="unet", d_norm="instance"):
        super().__init__()
        if generator not in GENERATORS:
            raise ValueError(f"generator: unknown value {generator!r}; choose one of {GENERATORS}")
        gen = UNetGenerator if generator == "unet" else ResnetGenerator
        self.g_ab = gen(channels, channels, base, n_down, n_blocks, norm)
        self.g_ba = gen(channels, channels, base, n_down, n_blocks, norm)
        if discriminators:
            self.d_a = PatchDiscriminator(channels, d_base, d_layers, d_norm)
            self.d_b = PatchDiscriminator(channels, d_base, d_layers, d_norm)
        else:
            self.d_a = self.d_b = None
        self.n_down = int(n_down)

    def generator_parameters(self):
        return list(self.g_ab.parameters()) + list(self.g_ba.parameters())

    def discriminator_parameters(self):
        if self.d_a is None:
            return []
        return list(self.d_a.parameters()) + list(self.d_b.parameters())

    def forward(self, x):
        return self.g_ab(x)


def size_multiple(config) -> int:
    """Image sizes a generator built from ``config`` accepts must be multiples of this.

    Examples
    --------
    >>> size_multiple({"n_down": 2})
    4
    """
    return 2 ** int(config.get("n_down", 2))
