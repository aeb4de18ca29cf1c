"""Synthetic T2-weighted axial MRI slices of gliomas and meningiomas, and a landing-zone writer.

Everything is drawn analytically in a head-centred frame (x to the patient's left-right, y from
front to back, units where the field of view spans -1..1) so one code path serves any output
size. Only numpy and PIL are needed: smooth random fields come from FFT-filtered white noise.

The classes differ in the morphology a radiologist would use rather than in any global
statistic: gliomas sit inside the parenchyma with blurred margins and finger-like oedema,
meningiomas sit on the dura with sharp margins and a CSF cleft. Size, side, lobe, oedema and
brightness are drawn from overlapping distributions.

Two variations (``VARIATIONS``): ``default``, the data set the tests and benchmarks are calibrated
on, and ``hard``, which varies more between slices the way scans from several sites do: rotations
up to +-20 degrees, left-right and front-back flips, a scanner contrast gamma of 0.7 to 1.4,
stronger Rician noise and coil bias, tumour sizes, intensities and positions that overlap more
between the classes, and files written as gray or RGB JPEG, gray, RGBA or palette PNG.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

CLASSES = ("glioma", "meningioma")
SPLITS = ("train", "test")

# Folder names for the "class folder" convention; files in them are just numbered.
_CLASS_FOLDERS = {"glioma": "Glioma T2", "meningioma": "Meningioma T2"}
_JPEG_QUALITY = 90
_PALETTE_LEVELS = 64


@dataclass(frozen=True)
class Variation:
    """How much slices vary: pose, acquisition, lesion overlap and file encodings.

    Ranges are (low, high) of uniform draws. The ``default`` values are the original generator's
    and are drawn in the original order, so the default data set stays byte-identical; draws that
    only the hard mode needs (flips, gamma) come after all others and only when enabled.
    """

    name: str
    max_rotation: float  # degrees either way
    flips: bool  # left-right and front-back, each with probability 1/2
    gamma: tuple[float, float] | None  # scanner contrast: signal ** gamma (None: linear)
    noise: tuple[float, float]  # Rician sigma, as a share of full scale
    bias: float  # std of the coil-bias polynomial's coefficients
    lesion_radius: tuple[float, float]  # log-uniform, both classes
    glioma_intensity: tuple[float, float]
    meningioma_intensity: tuple[float, float]
    glioma_gap: tuple[float, float]  # brain kept between a glioma's core and the cortex
    meningioma_embed: tuple[float, float]  # sphere centre depth in radii: higher, smaller base
    encodings: tuple[str, ...]  # cycled by index; see ENCODINGS


# File encodings: suffix and how the gray slice is stored.
ENCODINGS = {
    "png": ".png",  # 8-bit gray
    "jpeg": ".jpeg",  # 8-bit gray, quality 90
    "jpg": ".jpg",  # the same, other spelling
    "jpeg-rgb": ".jpg",  # three channels, chroma subsampled: the channels differ slightly
    "png-rgba": ".png",  # RGB plus alpha, the background transparent
    "png-palette": ".png",  # mode P with a 64-level gray palette (posterised)
}

VARIATIONS = {
    "default": Variation(
        name="default",
        max_rotation=10.0,
        flips=False,
        gamma=None,
        noise=(0.015, 0.04),
        bias=0.08,
        lesion_radius=(0.075, 0.21),
        glioma_intensity=(0.62, 0.85),
        meningioma_intensity=(0.46, 0.72),
        glioma_gap=(0.05, 0.1),
        meningioma_embed=(0.3, 0.7),
        encodings=("png", "jpg", "png", "jpeg"),  # half PNG, and both JPEG spellings
    ),
    "hard": Variation(
        name="hard",
        max_rotation=20.0,
        flips=True,
        gamma=(0.7, 1.4),
        noise=(0.02, 0.08),
        bias=0.22,
        lesion_radius=(0.06, 0.24),
        glioma_intensity=(0.5, 0.85),
        meningioma_intensity=(0.46, 0.82),
        glioma_gap=(0.02, 0.1),
        meningioma_embed=(0.3, 0.9),
        encodings=("png", "jpg", "png-rgba", "jpeg-rgb", "png-palette", "jpeg"),
    ),
}
DEFAULT = VARIATIONS["default"]

# Elliptic radius of the inner skull table (the skin is at 1): the intracranial boundary.
_INNER_TABLE = 0.87


# --------------------------------------------------------------------------- small helpers


def _soft(x: np.ndarray, width: float) -> np.ndarray:
    """Smooth step from 0 (x << 0) to 1 (x >> 0); width is in the units of x."""
    return 0.5 * (1.0 + np.tanh(x / width))


@lru_cache(maxsize=64)
def _spectral_filter(size: int, scale: float, band: float) -> np.ndarray:
    """Gaussian low-pass of correlation length ``scale`` (normalised units) in rfft2 layout; with
    band > 0, minus ``band`` times a 3x wider one, i.e. a band-pass. Zero mean (no DC)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f2 = fx**2 + fy**2
    sigma_px = scale * size / 2.0
    gain = np.exp(-2.0 * np.pi**2 * sigma_px**2 * f2)
    if band:
        gain -= band * np.exp(-2.0 * np.pi**2 * (3 * sigma_px) ** 2 * f2)
    gain[0, 0] = 0.0
    gain = gain.astype(np.float32)  # single precision halves the FFT's cost; plenty for texture
    gain.flags.writeable = False
    return gain


def _smooth_fields(
    rng: np.random.Generator, size: int, filters: Iterable[tuple[float, float]]
) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random fields, one per (scale, band) filter.

    The noise is drawn straight in the frequency domain, which saves a forward FFT, and uniform:
    each output pixel sums many frequencies, so it is Gaussian anyway and uniforms are cheaper.
    """
    gains = np.stack([_spectral_filter(size, scale, band) for scale, band in filters])
    noise = rng.random((2, *gains.shape), dtype=np.float32) - np.float32(0.5)
    spectrum = (noise[0] + 1j * noise[1]).astype(np.complex64) * gains
    fields = np.fft.irfft2(spectrum, s=(size, size))
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-12
    return fields


def _harmonics(
    rng: np.random.Generator, ks: Iterable[int], amp: float, decay: float = 1.0
) -> np.ndarray:
    """Coefficients of a random periodic function: cosines with amplitude amp / k**decay."""
    ks = list(ks)
    coefficients = np.zeros(max(ks) + 1, dtype=complex)
    for k in ks:
        coefficients[k] = rng.normal(0.0, amp / k**decay) * np.exp(1j * rng.uniform(0, 2 * np.pi))
    return coefficients


def _periodic(coefficients: np.ndarray, z: np.ndarray | complex) -> np.ndarray:
    """Evaluate Re(sum c_k z**k) at unit complex numbers z = exp(i angle), by Horner's rule
    (much cheaper than one cosine per harmonic over the whole image)."""
    total = np.zeros_like(z) + complex(coefficients[-1])
    for c in coefficients[-2::-1].tolist():  # Python scalars keep single-precision arrays single
        total = total * z + c
    return total.real


def _unit(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from the origin and exp(i angle) of each point, without trigonometry."""
    r = np.sqrt(dx * dx + dy * dy)  # np.hypot is several times slower
    return r, (dx + 1j * dy) / np.maximum(r, 1e-9)


def _blend(base: np.ndarray, value: np.ndarray | float, alpha: np.ndarray) -> np.ndarray:
    return base * (1.0 - alpha) + value * alpha


# --------------------------------------------------------------------------- head geometry


@dataclass(frozen=True)
class _Head:
    """Per-subject head ellipse and the pose that maps it into the image."""

    a: float  # left-right semi-axis
    b: float  # front-back semi-axis
    angle: float
    shift: tuple[float, float]
    outline: np.ndarray  # harmonic coefficients of the outline's radius factor (c0 = 1)

    def polar(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Elliptic radius (1 = skin) and exp(i elliptic angle) of head-frame points."""
        r, z = _unit(x / self.a, y / self.b)
        return r / _periodic(self.outline, z), z

    def surface_point(self, phi: float, rho: float) -> np.ndarray:
        """Head-frame point at elliptic angle phi and elliptic radius rho."""
        scale = rho * float(_periodic(self.outline, np.exp(1j * phi)))
        return np.array([self.a * np.cos(phi) * scale, self.b * np.sin(phi) * scale])

    def inward_normal(self, point: np.ndarray) -> np.ndarray:
        normal = -np.array([point[0] / self.a**2, point[1] / self.b**2])
        return normal / np.linalg.norm(normal)


def _random_head(rng: np.random.Generator, variation: Variation) -> _Head:
    outline = _harmonics(rng, (2, 3, 4), 0.012, decay=0.0)
    outline[0] = 1.0
    outline[1] = -1j * rng.uniform(0.0, 0.04)  # + egg * sin(angle): the occiput is wider
    return _Head(
        a=rng.uniform(0.66, 0.76),
        b=rng.uniform(0.80, 0.88),
        angle=np.deg2rad(rng.uniform(-variation.max_rotation, variation.max_rotation)),
        shift=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)),
        outline=outline,
    )


def _head_frame(head: _Head, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Head-frame coordinates of every pixel centre (undoing the head's rotation and shift)."""
    # Single precision throughout: ample for 8-bit output, and half the memory traffic.
    t = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    yi, xi = np.meshgrid(t, t, indexing="ij")
    xs, ys = xi - head.shift[0], yi - head.shift[1]
    cos, sin = float(np.cos(head.angle)), float(np.sin(head.angle))
    return cos * xs + sin * ys, -sin * xs + cos * ys


def _scalp_and_skull(rng: np.random.Generator, rho: np.ndarray, csf: float) -> np.ndarray:
    """Intensity of everything outside the brain: CSF, inner table, marrow, outer table, fat, skin."""
    j = rng.uniform(0.9, 1.15)  # skull and scalp thickness vary between subjects
    edges = np.array([0.0, 0.020, 0.045, 0.063, 0.100, 0.130]) * j + _INNER_TABLE
    edges[-1] = 1.0
    values = [csf, 0.06, rng.uniform(0.25, 0.5), 0.06, rng.uniform(0.5, 0.85), 0.42, 0.0]
    eps = 0.003
    xs = [0.0]
    ys = [values[0]]
    for edge, before, after in zip(edges, values[:-1], values[1:], strict=True):
        xs += [edge - eps, edge + eps]
        ys += [before, after]
    return np.interp(rho, xs, ys).astype(np.float32)


# --------------------------------------------------------------------------- mass effect


@dataclass(frozen=True)
class _Push:
    """A lesion that pushes the surrounding brain outward from its centre."""

    centre: tuple[float, float]
    radius: float
    strength: float  # fraction of the radius by which the nearest tissue is displaced
    reach: float  # decay length of the displacement


def _warp(x: np.ndarray, y: np.ndarray, push: _Push) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel's brain content came from before the lesion pushed it (monotone, no folds)."""
    cx, cy = push.centre
    dx, dy = x - cx, y - cy
    r = np.sqrt(dx * dx + dy * dy) + 1e-9
    outside = push.radius * push.strength * np.exp(-np.maximum(r - push.radius, 0) / push.reach)
    source = np.where(r < push.radius, r * (1 - push.strength), r - outside)
    factor = source / r
    return cx + dx * factor, cy + dy * factor


# --------------------------------------------------------------------------- brain anatomy


@dataclass(frozen=True)
class _Tissue:
    """Per-subject T2 intensities (before bias and gain): CSF > grey matter > white matter."""

    wm: float
    gm: float
    csf: float


def _ventricles(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, atrophy: float, margin: float
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Lateral ventricles, the same shape grown by ``margin`` (for periventricular caps), and their
    front-back span. Two crescents bowing away from the midline, wider at the frontal horns."""
    sep = rng.uniform(0.025, 0.05) * atrophy
    half_len = rng.uniform(0.15, 0.25) * atrophy**0.5
    width = rng.uniform(0.022, 0.042) * atrophy
    y0 = rng.uniform(-0.1, 0.0)
    bow = rng.uniform(0.8, 2.0)
    vy = y - y0
    widening = 1.0 + 0.7 * np.clip(-vy / half_len, 0, 1)
    inside = np.zeros_like(x)
    grown = np.zeros_like(x)
    for side in (-1.0, 1.0):
        vx = side * x - sep - bow * vy**2
        for extra, out in ((0.0, inside), (margin, grown)):
            wx = width * widening + extra
            q = np.sqrt((vx / wx) ** 2 + (vy / (half_len + extra)) ** 2)
            np.maximum(out, _soft((1 - q) * wx, 0.004 + extra / 3), out=out)
    return inside, grown, (y0 - half_len, y0 + half_len)


def _deep_grey(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Thalami and basal ganglia: soft grey ovals either side of the ventricles."""
    q = np.sqrt(((np.abs(x) - 0.15) / 0.06) ** 2 + ((y - 0.03) / 0.11) ** 2)
    return 0.6 * _soft(1 - q, 0.15)


def _brain(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    head: _Head,
    tissue: _Tissue,
    sulcal: np.ndarray,
    texture: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parenchyma intensity, brain mask and grey-matter weight at (possibly warped) head coords.

    sulcal: band-pass random field whose zero lines become sulci; texture: a smooth field.
    """
    rho, z = head.polar(x, y)
    atrophy = rng.uniform(0.8, 1.35)
    rim = rng.uniform(0.012, 0.026) * atrophy
    surface = _INNER_TABLE - rim * (1 + 0.4 * _periodic(_harmonics(rng, range(3, 9), 1.0), z))
    depth = surface - rho
    mask = _soft(depth, 0.004)

    sulcal_depth = rng.uniform(0.07, 0.11) * atrophy
    sulcus = np.exp(-((sulcal / 0.16) ** 2)) * _soft(sulcal_depth - depth, 0.01)
    ribbon = _soft(rng.uniform(0.03, 0.045) - depth, 0.006)
    around_sulci = np.exp(-((sulcal / 0.55) ** 2)) * _soft(sulcal_depth + 0.03 - depth, 0.01)
    grey = np.maximum(np.maximum(ribbon, around_sulci), _deep_grey(x, y))

    image = (tissue.wm + (tissue.gm - tissue.wm) * grey) * (1 + 0.05 * texture)
    image = _blend(image, tissue.csf, 0.85 * sulcus)

    caps = rng.uniform(0.3, 0.8) if rng.random() < 0.5 else 0.0
    ventricles, grown, (front, back) = _ventricles(rng, x, y, atrophy, rng.uniform(0.02, 0.05))
    # Periventricular T2 caps in either class, so bright white-matter area is no class cue.
    image = _blend(image, rng.uniform(0.6, 0.72), caps * grown)
    image = _blend(image, tissue.csf, ventricles)
    beyond_ventricles = np.maximum(_soft(front - 0.04 - y, 0.01), _soft(y - back - 0.04, 0.01))
    fissure = _soft(0.007 - np.abs(x), 0.002) * beyond_ventricles
    image = _blend(image, tissue.csf, 0.85 * fissure)
    return image, mask, grey


# --------------------------------------------------------------------------- lesions


def _lesion_size(rng: np.random.Generator, variation: Variation) -> float:
    """Mean lesion radius; the same log-uniform law for both classes so size alone cannot decide."""
    low, high = variation.lesion_radius
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


@dataclass(frozen=True)
class _Lesion:
    """A rendered lesion: what to composite on top of the brain."""

    intensity: np.ndarray | float
    alpha: np.ndarray  # lesion core opacity
    halo: np.ndarray  # oedema or cleft opacity
    halo_intensity: np.ndarray | float
    push: _Push


def _glioma_centre(
    rng: np.random.Generator, head: _Head, outline: np.ndarray
) -> tuple[float, float]:
    """A centre anywhere in the hemispheres that keeps a layer of brain between core and skull.

    outline: (n, 2) offsets of the core's boundary from its centre, already padded by the gap.
    """
    phi = rng.uniform(0, 2 * np.pi)
    direction = head.surface_point(phi, 1.0)
    steps = np.linspace(0.0, 1.0, 41)[:, None, None]
    points = steps * direction + outline  # (steps, n, 2): the outline moved out along the ray
    rho, _ = head.polar(points[..., 0], points[..., 1])
    fits = (rho < _INNER_TABLE - 0.06).all(axis=1)  # brain surface is at most 0.06 inside
    t_max = steps[fits.nonzero()[0].max(), 0, 0] if fits.any() else 0.0
    # sqrt: uniform over the area the centre may occupy, not crowded at the middle
    return tuple((np.sqrt(rng.uniform(0.0, 1.0)) * t_max * direction).tolist())


def _glioma(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    head: _Head,
    tissue: _Tissue,
    fields: np.ndarray,
    variation: Variation,
) -> _Lesion:
    """Intra-axial, irregular, infiltrative, heterogeneous, with finger-like vasogenic oedema.

    fields: [boundary roughness, core texture, oedema texture] random fields.
    """
    radius = _lesion_size(rng, variation)
    shape = _harmonics(rng, range(1, 11), 0.16, decay=0.8)
    angles = np.exp(1j * np.linspace(0, 2 * np.pi, 64, endpoint=False))
    # Pad for the ragged edge and blur below, plus a layer of cortex the core must not reach.
    reach = radius * 1.2 * np.maximum(1 + _periodic(shape, angles), 0.3) + rng.uniform(
        *variation.glioma_gap
    )
    cx, cy = _glioma_centre(rng, head, np.stack([reach * angles.real, reach * angles.imag], -1))
    r, z = _unit(x - cx, y - cy)
    boundary = radius * np.maximum(1 + _periodic(shape, z), 0.3)
    # Ragged, fractal-ish edge: perturb the radial coordinate with a fine random field.
    s = r / boundary + 0.1 * fields[0]
    alpha = _soft((1 - s) * radius, rng.uniform(0.016, 0.03))

    core = rng.uniform(*variation.glioma_intensity) * (1 + 0.14 * fields[1])
    if rng.random() < 0.55:  # necrotic, fluid-bright centre inside a thick darker wall
        necrosis = _soft((rng.uniform(0.35, 0.6) - s) * radius, 0.008)
        core = _blend(core * rng.uniform(0.7, 0.85), rng.uniform(0.85, 0.95), necrosis)

    # Oedema reaches out in a few broad lobes; sparing the cortex (in render) makes them fingers.
    lobes = np.tanh(_periodic(_harmonics(rng, range(2, 8), 1.2, decay=0.5), z))
    extent = radius * rng.uniform(0.25, 1.25) * (0.55 + 0.45 * lobes)
    oedema = _soft(boundary + extent - r + 0.03 * fields[2], 0.02)
    push = _Push((cx, cy), radius * 0.8, rng.uniform(0.25, 0.5), radius * 1.2 + 0.03)
    return _Lesion(core, alpha, oedema * rng.uniform(0.55, 0.9), rng.uniform(0.6, 0.76), push)


def _meningioma(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    head: _Head,
    tissue: _Tissue,
    fields: np.ndarray,
    variation: Variation,
) -> _Lesion:
    """Extra-axial dural-based mass: broad base on the inner table, sharp lobulated edge, CSF cleft."""
    # Slightly larger spheres so the visible, skull-clipped part matches a glioma core's area.
    radius = 1.12 * _lesion_size(rng, variation)
    phi0 = rng.uniform(0, 2 * np.pi)
    base = head.surface_point(phi0, _INNER_TABLE)
    embed = rng.uniform(
        *variation.meningioma_embed
    )  # < 1: the sphere's cap is cut off by the skull -> broad base
    cx, cy = (base + head.inward_normal(base) * embed * radius).tolist()
    r, z = _unit(x - cx, y - cy)
    boundary = radius * (1 + _periodic(_harmonics(rng, range(2, 6), 0.1, decay=0.7), z))

    rho, z_head = head.polar(x, y)
    intracranial = _soft(_INNER_TABLE - rho, 0.003)
    alpha = _soft(boundary - r, 0.003) * intracranial
    if rng.random() < 0.5:
        off = np.abs(np.angle(z_head * np.exp(-1j * phi0)))
        tail = _dural_tail(rng, rho, off, radius * np.sqrt(1 - embed**2) / np.linalg.norm(base))
        alpha = np.maximum(alpha, tail * intracranial)

    intensity = rng.uniform(*variation.meningioma_intensity) * (1 + 0.04 * fields[1])
    cleft_width = rng.uniform(0.018, 0.03)
    cleft = np.clip(_soft(boundary + cleft_width - r, 0.003) - alpha, 0, 1) * intracranial
    cleft_value = tissue.csf if rng.random() < 0.75 else 0.12  # CSF or a dark vascular rim
    halo, halo_value = cleft, cleft_value
    if rng.random() < 0.5:  # many meningiomas have mild oedema beyond the cleft
        mild = _soft(boundary + radius * rng.uniform(0.2, 0.7) - r + 0.02 * fields[2], 0.025)
        halo_value = _blend(np.full_like(r, rng.uniform(0.55, 0.68)), cleft_value, cleft)
        halo = np.maximum(cleft, 0.6 * mild * intracranial)
    push = _Push((cx, cy), radius, rng.uniform(0.6, 0.85), radius * 0.8 + 0.03)
    return _Lesion(intensity, alpha, halo, halo_value, push)


def _dural_tail(
    rng: np.random.Generator, rho: np.ndarray, off: np.ndarray, half_base: float
) -> np.ndarray:
    """Thin dural thickening tapering along the inner table; off is the angle from the base."""
    length = rng.uniform(0.08, 0.2)
    taper = np.clip(1 - (off - half_base) / length, 0, 1) * (off < half_base + length)
    return _soft(0.022 * taper - (_INNER_TABLE - rho), 0.003) * (rho < _INNER_TABLE + 0.005)


# --------------------------------------------------------------------------- whole slice


@dataclass(frozen=True)
class Phantom:
    """A rendered slice with the ground truth a test or a figure may want."""

    image: np.ndarray  # (size, size) uint8
    lesion: np.ndarray  # (size, size) float lesion-core opacity in 0..1
    intracranial: np.ndarray  # (size, size) bool, inside the inner skull table
    label: str


def render_phantom(
    rng: np.random.Generator, label: str, size: int = 256, variation: Variation = DEFAULT
) -> Phantom:
    """Render one slice of the given class, with its lesion and intracranial masks."""
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    head = _random_head(rng, variation)
    x, y = _head_frame(head, size)
    wm = rng.uniform(0.32, 0.4)
    tissue = _Tissue(wm=wm, gm=wm + rng.uniform(0.12, 0.24), csf=rng.uniform(0.8, 0.97))
    # Sulcal band-pass, brain texture, lesion roughness, lesion texture, oedema texture.
    f = _smooth_fields(rng, size, ((0.018, 0.5), (0.03, 0), (0.012, 0), (0.025, 0), (0.04, 0)))

    draw = _glioma if label == "glioma" else _meningioma
    lesion = draw(rng, x, y, head, tissue, f[2:5], variation)
    rho, _ = head.polar(x, y)
    intracranial = _soft(_INNER_TABLE - rho, 0.003)
    image = _scalp_and_skull(rng, rho, tissue.csf)
    xw, yw = _warp(x, y, lesion.push)
    brain, brain_mask, grey = _brain(rng, xw, yw, head, tissue, f[0], f[1])
    brain_mask = brain_mask * intracranial
    image = _blend(image, brain, brain_mask)

    halo = lesion.halo
    if label == "glioma":  # vasogenic oedema spreads along white matter and spares the cortex
        halo = halo * brain_mask * (0.2 + 0.8 * (1 - grey))
    image = _blend(image, lesion.halo_intensity, halo)
    image = _blend(image, lesion.intensity, lesion.alpha)
    pixels = _acquire(rng, image, x, y, variation)
    planes = [pixels, lesion.alpha, intracranial > 0.5]
    if variation.flips:  # the same flip for the image and its masks
        for axis in (1, 0):  # left-right, then front-back
            if rng.random() < 0.5:
                planes = [np.flip(plane, axis) for plane in planes]
    return Phantom(*(np.ascontiguousarray(plane) for plane in planes), label)


def _acquire(
    rng: np.random.Generator,
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    variation: Variation = DEFAULT,
) -> np.ndarray:
    """Smooth coil bias, scanner gain and Rician noise (magnitude of complex Gaussian) -> 8 bit.
    With ``variation.gamma``, the scanner's contrast curve: signal ** gamma before the noise."""
    c = rng.normal(0, variation.bias, 5).tolist()
    bias = np.exp(c[0] * x + c[1] * y + c[2] * x * x + c[3] * y * y + c[4] * x * y)
    signal = image * bias * rng.uniform(0.78, 1.0)
    sigma = rng.uniform(*variation.noise)
    noise = rng.standard_normal((2, *image.shape), dtype=np.float32) * sigma
    if variation.gamma is not None:
        signal = np.power(np.maximum(signal, 0.0), rng.uniform(*variation.gamma))
    magnitude = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)
    return np.clip(magnitude * 255.0 + 0.5, 0, 255).astype(np.uint8)


def generate_slice(
    rng: np.random.Generator, label: str, size: int = 256, variation: Variation = DEFAULT
) -> np.ndarray:
    """One synthetic T2 axial slice of class ``label`` as a (size, size) uint8 array."""
    return render_phantom(rng, label, size, variation).image


# --------------------------------------------------------------------------- landing zone


@dataclass(frozen=True)
class PlannedImage:
    """One file ``write_dataset`` will write; ``image_rng`` gives the stream that renders it."""

    split: str
    label: str
    index: int  # position within (split, label)
    path: str  # relative to the dataset root, e.g. ``train/Glioma T2/0001.png``
    encoding: str = "png"  # a key of ENCODINGS

    @property
    def key(self) -> str:
        """The path relative to its split folder, which is what labels are resolved from."""
        return self.path.split("/", 1)[1]

    @property
    def is_jpeg(self) -> bool:
        return self.path.lower().endswith((".jpg", ".jpeg"))


@dataclass(frozen=True)
class DatasetSummary:
    """What ``write_dataset`` wrote: the tree's root, files per split and class, and the total."""

    root: Path
    counts: dict[str, dict[str, int]]  # {"train": {"glioma": 260, ...}, "test": {...}}
    files: int


def split_counts(n: int, test_fraction: float) -> tuple[int, int]:
    """(train, test) for one class: the test share is floored, as in the seed data set."""
    if n < 0:
        raise ValueError(f"image count must be >= 0, got {n}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    test = int(n * test_fraction)
    return n - test, test


def _relative_path(split: str, label: str, index: int, suffix: str) -> str:
    """Both landing-zone label conventions within each class: two in three files are numbered
    inside a class folder, the rest are named after their class directly in the split folder."""
    number = index + 1
    if (index // 2) % 3 == 2:
        return f"{split}/{label} ({number}){suffix}"
    return f"{split}/{_CLASS_FOLDERS[label]}/{number:04d}{suffix}"


def plan_dataset(
    n_glioma: int = 346,
    n_meningioma: int = 329,
    test_fraction: float = 0.25,
    variation: Variation = DEFAULT,
) -> list[PlannedImage]:
    """The files ``write_dataset`` writes for these counts, without rendering anything."""
    planned: list[PlannedImage] = []
    cycle = variation.encodings
    for label, n in zip(CLASSES, (n_glioma, n_meningioma), strict=True):
        for split, count in zip(SPLITS, split_counts(n, test_fraction), strict=True):
            for i in range(count):
                encoding = cycle[i % len(cycle)]
                path = _relative_path(split, label, i, ENCODINGS[encoding])
                planned.append(PlannedImage(split, label, i, path, encoding))
    return planned


def image_rng(seed: int, item: PlannedImage, variation: Variation = DEFAULT) -> np.random.Generator:
    """The image's own stream, keyed by (seed, split, class, index) so order does not matter;
    another variation than the default gets streams of its own."""
    key = (SPLITS.index(item.split), CLASSES.index(item.label), item.index)
    if variation.name != DEFAULT.name:
        key += (list(VARIATIONS).index(variation.name),)
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


def encode_image(pixels: np.ndarray, jpeg: bool) -> bytes:
    """Grayscale PNG or JPEG (quality 90) bytes; deterministic for the same pixels."""
    return encode_slice(pixels, "jpeg" if jpeg else "png")


def encode_slice(pixels: np.ndarray, encoding: str) -> bytes:
    """The (H, W) uint8 slice as file bytes in ``encoding`` (a key of ENCODINGS); deterministic.

    RGBA: the background (the darkest grey levels) is fully transparent, the rest opaque, as
    some viewers export; decoding composites it on black. Palette: 64 grey levels, posterised.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    gray = np.ascontiguousarray(pixels, dtype=np.uint8)
    buffer = io.BytesIO()
    if encoding == "png-rgba":
        alpha = np.where(gray < 8, 0, 255).astype(np.uint8)
        Image.fromarray(np.stack([gray, gray, gray, alpha], -1), "RGBA").save(buffer, "PNG")
    elif encoding == "png-palette":
        step = 256 // _PALETTE_LEVELS
        image = Image.fromarray(gray // step, "P")
        levels = (np.arange(_PALETTE_LEVELS) * step + step // 2).astype(np.uint8)
        image.putpalette(np.repeat(levels, 3).tolist())
        image.save(buffer, "PNG")
    elif encoding == "jpeg-rgb":
        rgb = Image.fromarray(np.stack([gray] * 3, -1), "RGB")
        rgb.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    elif encoding in ("jpeg", "jpg"):
        Image.fromarray(gray).save(buffer, "JPEG", quality=_JPEG_QUALITY)
    else:
        Image.fromarray(gray).save(buffer, "PNG")
    return buffer.getvalue()


def write_dataset(
    out: str | Path,
    seed: int = 0,
    n_glioma: int = 346,
    n_meningioma: int = 329,
    test_fraction: float = 0.25,
    size: int = 256,
    progress: bool = True,
    variation: str | Variation = "default",
) -> DatasetSummary:
    """Render and write a landing-zone tree ``out/{train,test}/...`` of labelled slices.

    ``variation`` names one of VARIATIONS (``default`` or ``hard``). The same seed and variation
    give byte-identical files. Nothing but the images is written.
    """
    variation = variation_named(variation) if isinstance(variation, str) else variation
    root = Path(out)
    planned = plan_dataset(n_glioma, n_meningioma, test_fraction, variation)
    counts = {split: dict.fromkeys(CLASSES, 0) for split in SPLITS}
    for item in tqdm(planned, desc="phantoms", unit="img", disable=not progress):
        pixels = generate_slice(image_rng(seed, item, variation), item.label, size, variation)
        target = root / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_slice(pixels, item.encoding))
        counts[item.split][item.label] += 1
    return DatasetSummary(root, counts, len(planned))


def variation_named(name: str) -> Variation:
    """The Variation called ``name``; a ValueError lists the known ones."""
    try:
        return VARIATIONS[name]
    except KeyError:
        raise ValueError(
            f"phantom variation must be one of {sorted(VARIATIONS)}, got {name!r}"
        ) from None
