"""A procedural colour fundus photograph: a second fundus source where only one real photo
installs offline (scikit-image's retina.jpg; its microaneurysms.png is the test source).

Each call draws a new eye from `rng`: the circular field of a 45-degree fundus camera, an
orange-red retina with choroidal mottling and vignetting, the optic disc with its cup on the
nasal side (right of the image for a right eye), the darker macula with a foveal reflex about
2.5 disc diameters temporal to the disc, and vessel trees leaving the disc: two arcades that
bend around the macula, nasal branches, each branching into thinner vessels, veins darker and
wider than arteries. About half the eyes have diabetic retinopathy, the commonest reason a
fundus is photographed: microaneurysms, blot haemorrhages and hard exudates scattered over the
posterior pole. Anatomy proportions follow ordinary fundus photographs; nothing here is fitted
to the test source.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Point = tuple[float, float]


def simulate_fundus(rng: random.Random, side: int = 768) -> Image.Image:
    """One simulated colour fundus photograph, `side` x `side` pixels, RGB."""
    right_eye = rng.random() < 0.5
    centre = side / 2
    radius = side * rng.uniform(0.44, 0.48)
    nasal = 1 if right_eye else -1
    disc = (centre + nasal * side * rng.uniform(0.14, 0.2), centre + side * rng.uniform(-0.04, 0.04))
    disc_radius = side * rng.uniform(0.045, 0.06)
    macula = (disc[0] - nasal * 5 * disc_radius, disc[1] + side * rng.uniform(0.0, 0.03))

    to_centre = distance_from(side, (centre, centre))
    retina = retina_background(rng, side, to_centre / radius)
    retina = darken_macula(retina, macula, disc_radius, rng)
    retina = paint_disc(retina, disc, disc_radius, rng)
    retina = apply_vessels(retina, vessel_map(rng, side, disc, disc_radius, macula, nasal))
    if rng.random() < 0.5:
        retina = paint_retinopathy(retina, rng, macula, disc_radius)
    field = to_centre <= radius
    image = np.where(field[..., None], retina, 0.0)
    return Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8))


def distance_from(side: int, point: Point) -> np.ndarray:
    """Each pixel's distance to `point`."""
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    return np.hypot(xs - point[0], ys - point[1])


def smooth_noise(rng: random.Random, side: int, blur: float) -> np.ndarray:
    """Gaussian-blurred white noise scaled to [-1, 1]: choroidal mottling."""
    noise = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (side, side), dtype=np.uint8)
    blurred = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    spread = max(float(blurred.max() - blurred.min()), 1.0)
    return (blurred - blurred.min()) / spread * 2 - 1


def retina_background(rng: random.Random, side: int, eccentricity: np.ndarray) -> np.ndarray:
    """The orange-red fundus, pigmented per eye, mottled, darker towards the field's edge
    (`eccentricity`: each pixel's distance from the centre over the field's radius)."""
    base = np.array([rng.uniform(0.72, 0.92), rng.uniform(0.3, 0.45), rng.uniform(0.1, 0.22)], np.float32)
    mottle = 1 + 0.08 * smooth_noise(rng, side, side / 60)[..., None]
    vignette = 1 - 0.45 * np.clip(eccentricity, 0, 1)[..., None] ** 2
    return base * mottle * vignette


def darken_macula(retina: np.ndarray, macula: Point, disc_radius: float, rng: random.Random) -> np.ndarray:
    """The macula's darker, browner pigment and the small bright foveal reflex at its centre."""
    side = retina.shape[0]
    d = distance_from(side, macula)
    shade = 1 - rng.uniform(0.25, 0.4) * np.exp(-((d / (1.6 * disc_radius)) ** 2))
    reflex = 0.25 * np.exp(-((d / (0.12 * disc_radius)) ** 2))
    return retina * shade[..., None] + reflex[..., None]


def paint_disc(retina: np.ndarray, disc: Point, disc_radius: float, rng: random.Random) -> np.ndarray:
    """A yellow-pink optic disc with a soft rim and a paler cup (cup-to-disc ratio 0.2-0.6)."""
    side = retina.shape[0]
    d = distance_from(side, disc)
    rim = np.clip((disc_radius - d) / (0.15 * disc_radius) + 0.5, 0, 1)[..., None]
    disc_colour = np.array([0.95, rng.uniform(0.65, 0.78), rng.uniform(0.4, 0.52)], np.float32)
    cup = rng.uniform(0.2, 0.6) * disc_radius
    pallor = 0.15 * np.clip((cup - d) / (0.3 * cup) + 0.5, 0, 1)[..., None]
    return retina * (1 - rim) + rim * (disc_colour + pallor)


@dataclass(frozen=True)
class VesselGrowth:
    """What every vessel of one eye shares: segment length and the avascular zone around the
    fovea that vessels stop at."""

    rng: random.Random
    step: float
    fovea: Point
    avascular: float


def grow_vessel(
    growth: VesselGrowth, start: Point, heading: float, width: float, steps: int, bend: float
) -> list[tuple[list[Point], float]]:
    """One vessel as a wandering polyline of up to `steps` segments that turns by `bend` per
    step, with side branches (thinner, half as long) growing from it; returns (polyline, width)
    pairs."""
    rng, step = growth.rng, growth.step
    points, (x, y) = [start], start
    branches: list[tuple[list[Point], float]] = []
    for i in range(steps):
        heading += bend + rng.gauss(0, 0.08)
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        if math.dist((x, y), growth.fovea) < growth.avascular:
            break
        points.append((x, y))
        if width > 1.6 and i > 2 and rng.random() < 0.04:
            side_heading = heading + rng.choice((-1, 1)) * rng.uniform(0.5, 1.1)
            branches += grow_vessel(growth, (x, y), side_heading, width * 0.65, steps // 2, bend * 0.3)
    return [(points, width), *branches]


def vessel_map(
    rng: random.Random, side: int, disc: Point, disc_radius: float, macula: Point, nasal: int
) -> np.ndarray:
    """Vessel darkness per pixel in [0, 1]: arcades and nasal vessels, each an artery-vein pair."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    temporal = math.pi if nasal == 1 else 0.0  # heading from the disc towards the macula
    growth = VesselGrowth(rng, step=side / 150, fovea=macula, avascular=1.8 * disc_radius)
    arc_radius = math.dist(disc, macula) * rng.uniform(1.1, 1.4)  # arcades circle the macula
    reach = round(2.0 * arc_radius / growth.step)  # about 115 degrees of arc
    trees = []
    for up in (-1, 1):
        arcade_heading = temporal - nasal * up * 1.2
        arcade_bend = nasal * up * growth.step / arc_radius  # curls back around the macula
        nasal_heading = (temporal + math.pi) + nasal * up * 0.6
        for vein in (False, True):
            width = side * (0.011 if vein else 0.008) * rng.uniform(0.9, 1.1)
            offset = rng.uniform(-0.2, 0.2)
            trees.append((grow_vessel(growth, disc, arcade_heading + offset, width, reach, arcade_bend), vein))
            trees.append((grow_vessel(growth, disc, nasal_heading + offset, width * 0.8, reach // 2, 0.0), vein))
    for tree, vein in trees:
        darkness = 140 if vein else 90  # of 255
        for points, width in tree:
            draw.line(points, fill=darkness, width=max(1, round(width)), joint="curve")
    blurred = canvas.filter(ImageFilter.GaussianBlur(max(0.6, side / 900)))
    return np.asarray(blurred, dtype=np.float32) / 255


def apply_vessels(retina: np.ndarray, vessels: np.ndarray) -> np.ndarray:
    """Blood columns absorb green and blue more than red: vessels look dark red."""
    absorb = np.array([0.55, 0.9, 0.85], np.float32)
    return retina * (1 - vessels[..., None] * absorb)


# kind -> (count range per eye, radius as a fraction of the side, colour)
RETINOPATHY_LESIONS = {
    "microaneurysm": ((5, 30), 0.002, (90, 20, 15)),
    "haemorrhage": ((0, 6), 0.008, (90, 20, 15)),
    "exudate": ((0, 12), 0.004, (235, 215, 120)),
}


def paint_retinopathy(retina: np.ndarray, rng: random.Random, macula: Point, disc_radius: float) -> np.ndarray:
    """Diabetic retinopathy's signs around the macula: dark red microaneurysms (tiny dots) and
    blot haemorrhages (larger, soft), and yellow hard exudates."""
    side = retina.shape[0]
    image = Image.fromarray(np.clip(retina * 255, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    lesions = list(RETINOPATHY_LESIONS.values())
    counts = [rng.randint(*count_range) for count_range, _, _ in lesions]  # drawn before any position
    for (_, radius, colour), count in zip(lesions, counts, strict=True):
        for _ in range(count):
            angle, distance = rng.uniform(0, 2 * math.pi), rng.uniform(1.2, 6.0) * disc_radius
            x, y = macula[0] + distance * math.cos(angle), macula[1] + distance * math.sin(angle)
            size = radius * side * rng.uniform(0.7, 1.4)
            draw.ellipse((x - size, y - size, x + size, y + size), fill=colour)
    softened = image.filter(ImageFilter.GaussianBlur(max(0.5, side / 1500)))
    return np.asarray(softened, dtype=np.float32) / 255
