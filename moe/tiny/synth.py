"""A procedural surgical-like clip set (`lora-moe data synth`, SPEC section 7).

It lets the whole pipeline run, and visibly learn, without private data. Each clip shows
tissue-like texture (smooth pink/red noise, vessels, fat patches, wet glints) under a slowly
drifting camera and changing light, with one or two instruments from the four expert classes:

- scissors: dark shaft, two long pointed gold blades that open and close;
- hook: black shaft, bright silver L-shaped electrode that sweeps sideways;
- suction: blue straight cannula with a round tip that pushes in and out;
- other: a grasper, black shaft with short wide dark jaws that pull tissue back.

The tips are drawn large and in clearly different colours (gold, bright silver, blue, dark
gunmetal), and the shafts about one latent cell wide (`INSTRUMENT_SCALE`), so that each class's
instrument looks distinct even on the coarse 8x8-pixel latent grid: the stage-2 experts are meant
to specialise on exactly that, and the tiny VAE keeps only each cell's mean. A second instrument only ever joins a
clip of a specific instrument (scissors, hook, suction) and is itself a specific one, so a grasper
("other") clip is always a grasper alone, matching the teacher's rule that `other` is the expert
of clips without a specific instrument.

Shafts pivot around a trocar point outside the frame (as in laparoscopy), so they always enter
from the border; some instruments also enter during the clip. Each class has its own port, a side
of the frame (`TROCAR_SIDES`): in a laparoscopic operation the ports stay where they were placed,
and each instrument is used through its own one (the grasper from the assistant's side, the hook
and scissors through the surgeon's ports), so where a tool enters says what it is. It also makes
the class learnable from the caption by the tiny demo models: with a random side per clip (and
thinner instruments) their samples drew only the suction cannula and a scissors patch; now each
class's samples show its instrument (see docs/benchmarks.md). The tip box of every visible
instrument in every frame is the exact bounding box of the pixels its tip parts cover.

Everything is a pure function of (seed, clip index): the same seed gives byte-identical frames
and, because the encoder runs single-threaded, byte-identical MP4 files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe.config.numbers import MAX_FRAMES, MAX_SIDE
from moe.data.manifest import (
    INSTRUMENT_CLASSES,
    MANIFEST_FILE,
    ClipRecord,
    split_by_video,
    write_manifest,
    written_dataset,
)
from moe.data.video import check_frame_rate, write_video
from moe.errors import MoeError
from moe.files.output_paths import claim_output
from moe.runtime.progress import progress as progress_bar

Point = tuple[float, float]
Vec = np.ndarray  # a 2-vector (x, y) in pixels
Color = tuple[float, float, float]

MIN_SIZE = 16
# Instrument sizes: fractions of the frame's short side, times this. 2.0 makes shafts about one
# 8x8-pixel latent cell wide (7-9 px at 64x64), so the tiny VAE's cell means (and the tiny models'
# samples) keep them; at 1.5 the hook's round trip was nearly bare tissue. 2.5 drew much the same
# samples but left stage 2 less to add (docs/benchmarks.md).
INSTRUMENT_SCALE = 2.0
SECOND_INSTRUMENT = 0.3  # share of specific-instrument clips that show a second instrument
# The border each class's trocar lies beyond (distinct, so two instruments never share a port);
# where along that border varies per clip.
TROCAR_SIDES = {"scissors": "top", "hook": "right", "suction": "bottom", "other": "left"}

CAPTION_PREFIXES = ("laparoscopic view", "endoscopic view of the abdomen", "laparoscopic surgery")
ACTIONS = {
    "scissors": ("a pair of scissors cutting tissue", "scissors dividing a tissue band"),
    "hook": ("a hook cauterizing tissue", "an electrocautery hook dissecting tissue"),
    "suction": ("a suction cannula aspirating fluid", "a suction-irrigation cannula clearing the field"),
    "other": ("a grasper holding tissue", "a grasper retracting tissue"),
}


# --------------------------------------------------------------------------------------------
# Plans: every random choice of a clip, drawn up front so rendering is a pure function.


@dataclass(frozen=True)
class InstrumentPlan:
    """One instrument's class and motion, in pixels and frames."""

    kind: str
    pivot: Point  # trocar point, outside the frame: the shaft always passes through it
    start: Point  # tip position when entering (just inside the border)
    work: Point  # centre of the tip's working area
    enter_frames: float  # frames the entry takes; 0 = in place from the first frame
    period: float  # frames per cycle of the class's motion
    phase: float
    amplitude: float  # pixels
    side: float  # +1 or -1: which way the hook's bend points


@dataclass(frozen=True)
class ClipPlan:
    """Everything needed to render one clip."""

    id: str
    index: int
    seed: int
    width: int
    height: int
    frames: int
    caption: str
    instruments: tuple[InstrumentPlan, ...]
    drift: tuple[float, float, float, float]  # camera velocity (x, y) px/frame, sway amplitude, phase
    light: tuple[float, float, float, float]  # gain period, gain phase, hotspot angle, hotspot speed

    @property
    def labels(self) -> list[str]:
        return [inst.kind for inst in self.instruments]


def _primary_classes(clips: int, rng: np.random.Generator) -> list[str]:
    """Classes in shuffled blocks of four, so each class is primary in N/4 (+-1) clips."""
    order: list[str] = []
    while len(order) < clips:
        order.extend(INSTRUMENT_CLASSES[i] for i in rng.permutation(len(INSTRUMENT_CLASSES)))
    return order[:clips]


def _pivot(side: str, rng: np.random.Generator, width: int, height: int) -> Point:
    """A trocar point beyond the given border of the frame."""
    along = rng.uniform(0.15, 0.85)
    out = rng.uniform(0.25, 0.45)
    return {
        "left": (-out * width, along * height),
        "right": ((1 + out) * width, along * height),
        "top": (along * width, -out * height),
        "bottom": (along * width, (1 + out) * height),
    }[side]


def _entry_point(pivot: Point, work: Point, width: int, height: int) -> Point:
    """The first point on the pivot->work line that is inside the frame by a small margin."""
    margin = 0.08 * min(width, height)
    lam = np.linspace(0.0, 1.0, 512)[:, None]
    points = np.asarray(pivot) + lam * (np.asarray(work) - np.asarray(pivot))
    inside = (points[:, 0] >= margin) & (points[:, 0] <= width - margin) & (points[:, 1] >= margin) & (points[:, 1] <= height - margin)
    x, y = points[int(np.argmax(inside))]
    return float(x), float(y)


def _plan_instrument(kind: str, side: str, rng: np.random.Generator, width: int, height: int, frames: int) -> InstrumentPlan:
    scale = min(width, height)
    pivot = _pivot(side, rng, width, height)
    work = (rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height)
    enters = rng.random() < 0.5 and frames >= 8
    return InstrumentPlan(
        kind=kind,
        pivot=pivot,
        start=_entry_point(pivot, work, width, height),
        work=work,
        enter_frames=float(rng.uniform(0.3, 0.5) * frames) if enters else 0.0,
        period=float(rng.uniform(7.0, 11.0) if kind != "other" else rng.uniform(12.0, 18.0)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        amplitude=float(rng.uniform(0.06, 0.1) * scale),
        side=float(rng.choice([-1.0, 1.0])),
    )


def _caption(kinds: list[str], rng: np.random.Generator) -> str:
    prefix = CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))]
    phrases = [ACTIONS[kind][rng.integers(len(ACTIONS[kind]))] for kind in kinds]
    return f"{prefix}, " + " and ".join(phrases)


def plan_clip(seed: int, index: int, primary: str, width: int, height: int, frames: int) -> ClipPlan:
    """Draw the random choices of clip `index`. A second, different specific instrument joins
    SECOND_INSTRUMENT of the clips whose primary is a specific one; graspers ("other") appear alone."""
    rng = np.random.default_rng([seed, index])
    kinds = [primary]
    if rng.random() < SECOND_INSTRUMENT and primary != "other":
        kinds.append(str(rng.choice([k for k in INSTRUMENT_CLASSES if k not in (primary, "other")])))
    scale = min(width, height)
    speed = rng.uniform(0.08, 0.2) * scale / frames  # the camera drifts 8-20% of the frame per clip
    angle = rng.uniform(0, 2 * math.pi)
    return ClipPlan(
        id=f"synth_{index:05d}",
        index=index,
        seed=seed,
        width=width,
        height=height,
        frames=frames,
        caption=_caption(kinds, rng),
        instruments=tuple(_plan_instrument(kind, TROCAR_SIDES[kind], rng, width, height, frames) for kind in kinds),
        drift=(
            float(speed * math.cos(angle)),
            float(speed * math.sin(angle)),
            float(rng.uniform(0.005, 0.015) * scale),
            float(rng.uniform(0, 2 * math.pi)),
        ),
        light=(
            float(rng.uniform(20, 40)),
            float(rng.uniform(0, 2 * math.pi)),
            float(rng.uniform(0, 2 * math.pi)),
            float(rng.uniform(0.01, 0.03)),
        ),
    )


def plan_dataset(clips: int, frames: int, size: tuple[int, int], seed: int) -> list[ClipPlan]:
    """Plans for `clips` clips of `frames` frames at `size` = (width, height)."""
    width, height = size
    if clips < 1:
        raise MoeError(f"the synthetic set needs at least one clip, got {clips}")
    if frames < 1:
        raise MoeError(f"clips need at least one frame, got {frames}")
    if frames > MAX_FRAMES:
        raise MoeError(f"clips have at most {MAX_FRAMES} frames, got {frames}")
    if not (MIN_SIZE <= width <= MAX_SIDE and MIN_SIZE <= height <= MAX_SIDE) or width % 2 or height % 2:
        raise MoeError(
            f"size must be even, at least {MIN_SIZE}x{MIN_SIZE} and at most {MAX_SIDE}x{MAX_SIDE} (H.264 needs even sizes), got {width}x{height}"
        )
    # Clip i depends only on (seed, i, size, frames): a larger set extends a smaller one.
    primaries = _primary_classes(clips, np.random.default_rng([seed, 1 << 30]))
    return [plan_clip(seed, i, primaries[i], width, height, frames) for i in range(clips)]


# --------------------------------------------------------------------------------------------
# Background: tissue texture on a canvas larger than the frame, cropped with a drifting offset.


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Value noise: a random grid with one value per `cell` pixels, smoothly interpolated."""
    cell = max(cell, 1.0)
    grid = rng.standard_normal((int(height / cell) + 3, int(width / cell) + 3)).astype(np.float32)

    def axis(n: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(n, dtype=np.float32) / cell
        i = pos.astype(np.int64)
        f = pos - i
        return i, (f * f * (3 - 2 * f))[:, None]  # smoothstep hides the grid lines

    iy, fy = axis(height)
    ix, fx = axis(width)
    rows = grid[iy] * (1 - fy) + grid[iy + 1] * fy  # [height, grid width]
    cols = rows[:, ix] * (1 - fx.T) + rows[:, ix + 1] * fx.T
    return cols / (cols.std() + 1e-6)


def _fractal_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    octaves = [_smooth_noise(rng, height, width, cell / 2**k) * 0.55**k for k in range(4)]
    total = sum(octaves)
    return total / (total.std() + 1e-6)


def _tissue(rng: np.random.Generator, height: int, width: int, scale: int) -> np.ndarray:
    """Float RGB in [0, 1]: pink/red tissue with vessels, yellowish fat and wet glints."""
    base = _fractal_noise(rng, height, width, scale / 3)
    fat = np.clip((_fractal_noise(rng, height, width, scale / 1.5) - 0.9) * 1.2, 0, 1)
    vessel_field = _fractal_noise(rng, height, width, scale / 1.5)
    vessels = np.exp(-((vessel_field / 0.1) ** 2)) * 0.7
    glints = np.clip((_smooth_noise(rng, height, width, scale / 16) - 2.2) * 2.0, 0, 1)

    t = np.clip(0.5 + 0.22 * base, 0, 1)[..., None]
    dark = np.array([0.50, 0.10, 0.11], np.float32)
    pink = np.array([0.92, 0.48, 0.46], np.float32)
    tint = rng.uniform(-0.04, 0.04, size=3).astype(np.float32)
    img = dark + (pink - dark) * t + tint
    img = img + (np.array([0.93, 0.76, 0.45], np.float32) - img) * fat[..., None] * 0.8
    img = img + (np.array([0.38, 0.03, 0.07], np.float32) - img) * vessels[..., None]
    return img + glints[..., None] * 0.6


def _camera_offset(plan: ClipPlan, t: int, margin: int) -> tuple[float, float]:
    vx, vy, sway, phase = plan.drift
    centre = margin - 0.5 * np.array([vx, vy]) * (plan.frames - 1)
    wobble = sway * math.sin(2 * math.pi * t / 24 + phase)
    x = centre[0] + vx * t + wobble
    y = centre[1] + vy * t + 0.5 * wobble
    return float(np.clip(x, 0, 2 * margin - 1e-3)), float(np.clip(y, 0, 2 * margin - 1e-3))


def _crop(canvas: np.ndarray, x: float, y: float, width: int, height: int) -> np.ndarray:
    """A width x height window at a fractional offset (bilinear), for sub-pixel camera drift."""
    x0, y0 = int(x), int(y)
    fx, fy = x - x0, y - y0
    window = canvas[y0 : y0 + height + 1, x0 : x0 + width + 1]
    top = window[:-1, :-1] * (1 - fx) + window[:-1, 1:] * fx
    bottom = window[1:, :-1] * (1 - fx) + window[1:, 1:] * fx
    return top * (1 - fy) + bottom * fy


def _lighting(plan: ClipPlan, t: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Per-pixel light: a moving hotspot, a laparoscope-like vignette and a slow global gain."""
    period, phase, angle, speed = plan.light
    w, h = plan.width, plan.height
    cx = w * (0.5 + 0.15 * math.cos(angle + speed * t))
    cy = h * (0.5 + 0.15 * math.sin(angle + speed * t))
    scale = min(w, h)
    hotspot = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * (0.55 * scale) ** 2))
    radius = ((xs - w / 2) / (0.62 * w)) ** 2 + ((ys - h / 2) / (0.62 * h)) ** 2
    vignette = 1 - 0.6 * np.clip(radius - 0.45, 0, None)
    gain = 1 + 0.08 * math.sin(2 * math.pi * t / period + phase)
    return ((0.7 + 0.45 * hotspot) * vignette * gain).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Instruments: tapered capsules (segments with a radius that may shrink towards the end). The
# shape functions get the tip, the unit shaft axis u (pivot -> tip), its normal n, the jaw opening,
# the hook's bend side and the frame's short side s; they return the shaft and the tip parts.


@dataclass(frozen=True)
class Capsule:
    a: np.ndarray
    b: np.ndarray
    r0: float  # radius at a
    r1: float  # radius at b
    color: Color
    shine: float  # strength of the specular stripe: metal 1, plastic 0.4, black shafts 0.25


@dataclass(frozen=True)
class Pose:
    shaft: list[Capsule]
    tip: list[Capsule]  # the parts whose pixels make the tip box


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _smoothstep(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3 - 2 * x)


def _motion(inst: InstrumentPlan, t: int, frames: int) -> tuple[np.ndarray, float]:
    """Tip position and jaw opening (0 closed .. 1 open) at frame t: the class's motion."""
    pivot, work = np.asarray(inst.pivot), np.asarray(inst.work)
    u = (work - pivot) / np.linalg.norm(work - pivot)
    n = np.array([-u[1], u[0]])
    cycle = 2 * math.pi * t / inst.period + inst.phase
    progress = t / max(frames - 1, 1)
    wave = math.sin(cycle)
    if inst.kind == "scissors":  # advance slowly while cutting
        offset, opening = u * inst.amplitude * 0.6 * progress, 0.5 - 0.5 * math.cos(cycle)
    elif inst.kind == "hook":  # sweep across the tissue
        offset, opening = n * inst.amplitude * wave, 0.0
    elif inst.kind == "suction":  # push and pull along the cannula
        offset = u * inst.amplitude * wave + n * 0.3 * inst.amplitude * math.sin(cycle / 2)
        opening = 0.0
    else:  # grasper: retract the tissue it holds, jaws slowly working
        offset = -u * inst.amplitude * progress + n * 0.2 * inst.amplitude * wave
        opening = 0.3 + 0.3 * math.sin(cycle)
    target = work + offset
    if inst.enter_frames > 0:
        target = np.asarray(inst.start) + (target - inst.start) * _smoothstep(t / inst.enter_frames)
    return target, opening


def _jaws(hinge: Vec, u: Vec, length: float, half_angle: float, r0: float, r1: float, color: Color, shine: float) -> list[Capsule]:
    """Two tapered blades or jaws from a hinge, opened symmetrically about the shaft axis."""
    return [Capsule(hinge, hinge + _rotate(u, sign * half_angle) * length, r0, r1, color, shine) for sign in (-1, 1)]


def _scissors(pivot: Vec, tip: Vec, u: Vec, n: Vec, opening: float, side: float, s: float) -> Pose:
    """Long pointed gold blades on a dark grey shaft."""
    hinge = tip - u * 0.17 * s
    half_angle = math.radians(3 + 24 * opening)
    blades = _jaws(hinge, u, 0.17 * s, half_angle, 0.03 * s, 0.006 * s, (0.92, 0.74, 0.30), 1.0)
    return Pose([Capsule(pivot, hinge, 0.03 * s, 0.03 * s, (0.28, 0.30, 0.34), 0.5)], blades)


def _hook(pivot: Vec, tip: Vec, u: Vec, n: Vec, opening: float, side: float, s: float) -> Pose:
    """A bright silver L-shaped electrode on a black insulated shaft."""
    base = tip - u * 0.1 * s
    silver = (0.90, 0.92, 0.95)
    electrode = [
        Capsule(base, tip, 0.02 * s, 0.02 * s, silver, 1.0),
        Capsule(tip, tip + n * side * 0.07 * s, 0.02 * s, 0.02 * s, silver, 1.0),
    ]
    return Pose([Capsule(pivot, base, 0.028 * s, 0.028 * s, (0.08, 0.08, 0.09), 0.25)], electrode)


def _suction(pivot: Vec, tip: Vec, u: Vec, n: Vec, opening: float, side: float, s: float) -> Pose:
    """A straight blue cannula with a lighter neck and a round dark-blue tip."""
    neck = tip - u * 0.07 * s
    end = [
        Capsule(neck, tip, 0.032 * s, 0.026 * s, (0.55, 0.72, 0.95), 0.4),
        Capsule(tip, tip, 0.042 * s, 0.042 * s, (0.20, 0.35, 0.75), 0.4),
    ]
    return Pose([Capsule(pivot, neck, 0.032 * s, 0.032 * s, (0.30, 0.52, 0.88), 0.4)], end)


def _grasper(pivot: Vec, tip: Vec, u: Vec, n: Vec, opening: float, side: float, s: float) -> Pose:
    """Short wide blunt dark gunmetal jaws with a round joint, on a black shaft."""
    hinge = tip - u * 0.12 * s
    half_angle = math.radians(3 + 22 * opening)
    jaws = _jaws(hinge, u, 0.12 * s, half_angle, 0.03 * s, 0.02 * s, (0.22, 0.23, 0.25), 1.0)
    jaws.append(Capsule(hinge, hinge, 0.04 * s, 0.04 * s, (0.35, 0.36, 0.38), 0.8))
    return Pose([Capsule(pivot, hinge, 0.036 * s, 0.036 * s, (0.12, 0.14, 0.12), 0.25)], jaws)


SHAPES = {"scissors": _scissors, "hook": _hook, "suction": _suction, "other": _grasper}


def _pose(inst: InstrumentPlan, t: int, frames: int, scale: int) -> Pose:
    """The capsules of an instrument at frame t; sizes are fractions of the frame's short side
    (times INSTRUMENT_SCALE)."""
    tip, opening = _motion(inst, t, frames)
    pivot = np.asarray(inst.pivot)
    u = (tip - pivot) / np.linalg.norm(tip - pivot)
    n = np.array([-u[1], u[0]])
    return SHAPES[inst.kind](pivot, tip, u, n, opening, inst.side, float(scale) * INSTRUMENT_SCALE)


def _draw(frame: np.ndarray, cap: Capsule) -> tuple[int, int, int, int] | None:
    """Composite an anti-aliased, shaded capsule into `frame` in place.

    Only the capsule's bounding box is evaluated, which keeps large frames cheap. Returns the
    pixel box [x0, y0, x1) x [y0, y1) of pixels it touched, or None when it is off-frame.
    Pixel (x, y) has its centre at (x + 0.5, y + 0.5).
    """
    height, width = frame.shape[:2]
    reach = max(cap.r0, cap.r1) + 1
    x0 = max(int(math.floor(min(cap.a[0], cap.b[0]) - reach)), 0)
    y0 = max(int(math.floor(min(cap.a[1], cap.b[1]) - reach)), 0)
    x1 = min(int(math.ceil(max(cap.a[0], cap.b[0]) + reach)), width)
    y1 = min(int(math.ceil(max(cap.a[1], cap.b[1]) + reach)), height)
    if x0 >= x1 or y0 >= y1:
        return None
    px = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cap.a[0]
    py = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cap.a[1]
    d = cap.b - cap.a
    length2 = float(d @ d)
    if length2 > 1e-9:
        along = np.clip((px * d[0] + py * d[1]) / length2, 0, 1)
    else:  # a disc
        along = np.zeros_like(px * py)
    dx, dy = px - along * d[0], py - along * d[1]
    radius = cap.r0 + (cap.r1 - cap.r0) * along
    coverage = np.clip(radius - np.sqrt(dx * dx + dy * dy) + 0.5, 0, 1)
    if not coverage.any():
        return None
    # Shade like a cylinder lit from the upper left: the signed offset across the capsule.
    axis = d / math.sqrt(length2) if length2 > 1e-9 else np.array([0.7071, -0.7071])
    across = np.clip((axis[0] * dy - axis[1] * dx) / np.maximum(radius, 0.5), -1, 1)
    shade = 0.35 + 0.65 * np.sqrt(1 - across * across)
    spec = cap.shine * 0.55 * np.exp(-(((across + 0.35) / 0.22) ** 2))
    color = np.asarray(cap.color, np.float32) * shade[..., None] + spec[..., None]
    alpha = coverage[..., None]
    region = frame[y0:y1, x0:x1]
    region *= 1 - alpha
    region += alpha * color
    ys, xs = np.nonzero(coverage)
    return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


def _union(boxes: list[tuple[int, int, int, int] | None]) -> tuple[int, int, int, int] | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    x0, y0, x1, y1 = zip(*boxes)
    return min(x0), min(y0), max(x1), max(y1)


# --------------------------------------------------------------------------------------------
# Rendering and writing.


@dataclass(frozen=True)
class RenderedClip:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    roi: list[tuple[int, int, int, int, int]]  # tip boxes [frame, x0, y0, x1, y1]


def render_clip(plan: ClipPlan, draw_instruments: bool = True) -> RenderedClip:
    """Render a clip. Without instruments it yields the identical background, for tests."""
    w, h, scale = plan.width, plan.height, min(plan.width, plan.height)
    rng = np.random.default_rng([plan.seed, plan.index, 1])
    margin = int(math.ceil(0.12 * scale)) + 2
    canvas = _tissue(rng, h + 2 * margin, w + 2 * margin, scale)
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    out = np.empty((plan.frames, h, w, 3), np.uint8)
    roi = []
    for t in range(plan.frames):
        frame = _crop(canvas, *_camera_offset(plan, t, margin), w, h).astype(np.float32)
        for inst in plan.instruments if draw_instruments else ():
            pose = _pose(inst, t, plan.frames, scale)
            for cap in pose.shaft:
                _draw(frame, cap)
            box = _union([_draw(frame, cap) for cap in pose.tip])
            if box is not None:
                roi.append((t, *box))
        frame *= _lighting(plan, t, ys, xs)[..., None]
        out[t] = np.round(np.clip(frame, 0, 1) * 255).astype(np.uint8)
    return RenderedClip(out, roi)


def synthesize_dataset(
    out_dir: str | Path,
    clips: int = 16,
    frames: int = 17,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    fps: float = 16.0,
    val_fraction: float = 0.2,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write `clips` synthetic clips to `out_dir/videos/` and return `out_dir/manifest.jsonl`.

    `size` is (width, height). The split is set in the manifest (about `val_fraction` of clips
    in val, chosen deterministically from the seed). An existing `out_dir` is refused unless
    `overwrite` and it is a clip set lora-moe wrote.
    """
    out_dir = Path(out_dir)
    plans = plan_dataset(clips, frames, size, seed)
    check_frame_rate(fps)
    with claim_output(out_dir, flag="--output_dir", overwrite=overwrite, is_ours=written_dataset, folder=True):
        records = []
        for plan in progress_bar(plans, desc="synth clips", unit="clip", disable=not progress):
            clip = render_clip(plan)
            video = Path("videos") / f"{plan.id}.mp4"
            write_video(out_dir / video, clip.frames, fps)
            records.append(
                ClipRecord(
                    id=plan.id,
                    video=video.as_posix(),
                    caption=plan.caption,
                    instruments=plan.labels,
                    roi=[list(box) for box in clip.roi],
                )
            )
        return write_manifest(out_dir / MANIFEST_FILE, split_by_video(records, val_fraction, seed))
