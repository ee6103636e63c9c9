"""Harmful images: generators that corrupt one MRI volume, and the scenario builder.

The paper's experiments insert harmful data into the travelling model's training centers and
check that quality control detects them. Each generator is `fn(image, rng) -> image`: pure,
same size, spacing, origin, direction and pixel type as the input (an 8-bit volume stays
8-bit), so a corrupted file drops into a training CSV in place of the clean one. `label`
leaves the image alone; the scenario flips the row's `Group_bin` instead (see `LABEL_TYPES`).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from dqc.data import array_to_image, check_images, image_to_array, load_table, read_image
from dqc.errors import DQCError
from dqc.io import write_csv, write_image
from dqc.progress import progress

Generator = Callable[[sitk.Image, np.random.Generator], sitk.Image]


# --- pixel-type helpers ----------------------------------------------------------------------

def _dtype(image: sitk.Image) -> np.dtype:
    return sitk.GetArrayViewFromImage(image).dtype


def _is_uint8(image: sitk.Image) -> bool:
    return image.GetPixelID() == sitk.sitkUInt8


def _values(image: sitk.Image) -> np.ndarray:
    """The voxels as float64 in (x, y, z) order, for arithmetic that must not wrap around."""
    return image_to_array(image).astype(np.float64)


def _value_range(image: sitk.Image) -> tuple[float, float]:
    """Intensity range to clip to: 0..255 for 8-bit data (the paper's), else the image's own."""
    if _is_uint8(image):
        return 0.0, 255.0
    arr = sitk.GetArrayViewFromImage(image)
    return float(arr.min()), float(arr.max())


def _like(values: np.ndarray, image: sitk.Image) -> sitk.Image:
    """Back to the input's pixel type (integers rounded and clipped to the type's range)."""
    dtype = _dtype(image)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return array_to_image(values.astype(dtype), like=image)


# --- generators ------------------------------------------------------------------------------

def inverted(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Inverted contrast (max - value): dark CSF becomes bright, as with a wrong LUT/export."""
    if _is_uint8(image):
        maximum = 255.0
    else:
        maximum = float(sitk.GetArrayViewFromImage(image).max())
    out = sitk.InvertIntensity(image, maximum=maximum)
    out.CopyInformation(image)
    return sitk.Cast(out, image.GetPixelID())


def noise(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Additive Gaussian noise, sd 25 on the 0..255 scale (scaled to the range if not 8-bit)."""
    lo, hi = _value_range(image)
    sd = 25.0 if _is_uint8(image) else 25.0 / 255.0 * (hi - lo)
    values = _values(image)
    return _like(np.clip(values + rng.normal(0.0, sd, values.shape), lo, hi), image)


def motion(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Ghosting: phase errors on every other phase-encode k-space line (periodic head motion).

    Motion between line acquisitions multiplies those lines by a phase; corrupting the lines at
    odd offsets from the k-space centre (random phase of 60-180 degrees each) leaves the centre
    line intact and puts ghost copies half a field of view away along the phase-encode axis.
    """
    values = _values(image)
    axis = int(rng.integers(values.ndim))  # phase-encode axis
    n = values.shape[axis]
    centre = n // 2
    lines = np.arange((centre + 1) % 2, n, 2)  # odd offsets from the centre line
    phase = np.zeros(n)
    phase[lines] = rng.uniform(np.pi / 3, np.pi, lines.size) * rng.choice([-1.0, 1.0], lines.size)
    shape = [1] * values.ndim
    shape[axis] = n
    k = np.fft.fftshift(np.fft.fft(values, axis=axis), axes=axis)
    k = k * np.exp(1j * phase).reshape(shape)
    out = np.abs(np.fft.ifft(np.fft.ifftshift(k, axes=axis), axis=axis))
    lo, hi = _value_range(image)
    return _like(np.clip(out, lo, hi), image)


def spike(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Herringbone: one or two large k-space samples (a spike) add stripes over the whole FOV.

    Each spike is added with its conjugate partner, so it is a real cosine in image space of
    amplitude 0.5-1x the mean intensity; the magnitude image then shows the stripes everywhere.
    """
    values = _values(image)
    k = np.fft.fftn(values)
    reference = max(abs(k.flat[0]), values.size * 0.1 * (_value_range(image)[1] or 1.0))
    for _ in range(int(rng.integers(1, 3))):
        index = []
        for n in values.shape:  # away from the centre of k-space, inside the sampled band
            low, high = max(1, n // 8), max(1, n // 3)
            index.append(int(rng.integers(low, high + 1)) * int(rng.choice([-1, 1])))
        amplitude = reference * rng.uniform(0.25, 0.5) * np.exp(1j * rng.uniform(0, 2 * np.pi))
        k[tuple(i % n for i, n in zip(index, k.shape))] += amplitude
        k[tuple(-i % n for i, n in zip(index, k.shape))] += np.conj(amplitude)
    out = np.abs(np.real(np.fft.ifftn(k)))
    lo, hi = _value_range(image)
    return _like(np.clip(out, lo, hi), image)


def bias(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Strong smooth multiplicative bias field (a bad coil, no N4): gain peaks at f or 1/f, f in 2-3.

    The log field is a random quadratic polynomial over the normalised voxel grid.
    """
    values = _values(image)
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in values.shape], indexing="ij")
    terms = list(grids)
    terms += [grids[a] * grids[b] for a in range(len(grids)) for b in range(a, len(grids))]
    log_field = sum(rng.normal() * t for t in terms)
    log_field = log_field - log_field.mean()
    peak = np.abs(log_field).max()
    if peak > 0:
        log_field = log_field / peak * np.log(rng.uniform(2.0, 3.0))
    lo, hi = _value_range(image)
    return _like(np.clip(values * np.exp(log_field), lo, hi), image)


def blur(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Heavy Gaussian blur (sigma 2-3.5 voxels): a low-resolution/defocused acquisition."""
    sigma = rng.uniform(2.0, 3.5)
    return _like(ndimage.gaussian_filter(_values(image), sigma=sigma, mode="nearest"), image)


def orientation(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Wrong orientation: the voxel array is flipped or its axes permuted, header unchanged.

    Axes are only permuted among axes of equal length (so the size is kept); when no two axes
    are equal, or by chance half of the time, one to three axes are flipped instead.
    """
    arr = image_to_array(image)
    shape = arr.shape
    pairs = [(a, b) for a in range(3) for b in range(a + 1, 3) if shape[a] == shape[b]]
    if pairs and rng.random() < 0.5:
        if len(pairs) == 3:  # cube: any of the five non-identity permutations
            perms = [(0, 2, 1), (1, 0, 2), (2, 1, 0), (1, 2, 0), (2, 0, 1)]
            perm = perms[int(rng.integers(len(perms)))]
        else:
            a, b = pairs[int(rng.integers(len(pairs)))]
            perm = [0, 1, 2]
            perm[a], perm[b] = b, a
        out = np.transpose(arr, perm)
    else:
        mask = int(rng.integers(1, 8))  # non-empty subset of the three axes
        out = np.flip(arr, axis=tuple(a for a in range(3) if mask >> a & 1))
    return array_to_image(np.ascontiguousarray(out), like=image)


def misregistration(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Failed registration: the brain rotated 4-12 degrees per axis and shifted 4-8 voxels.

    Resampled on the same grid (linear interpolation, background = the image minimum).
    """
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    transform = sitk.Euler3DTransform()
    transform.SetCenter(image.TransformContinuousIndexToPhysicalPoint(
        [float(c) for c in (size - 1) / 2.0]))
    angles = np.deg2rad(rng.uniform(4.0, 12.0, 3)) * rng.choice([-1.0, 1.0], 3)
    transform.SetRotation(*[float(a) for a in angles])
    step = rng.normal(size=3)
    step = step / (np.linalg.norm(step) or 1.0) * rng.uniform(4.0, 8.0)  # in voxels
    transform.SetTranslation([float(t) for t in direction @ (step * spacing)])
    background = float(sitk.GetArrayViewFromImage(image).min())
    interpolated = sitk.Resample(sitk.Cast(image, sitk.sitkFloat64), image, transform,
                                 sitk.sitkLinear, background, sitk.sitkFloat64)
    return _like(image_to_array(interpolated), image)


def intensity(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Wrong intensity scaling: x0.2-0.4 or x2.5-4, clipped to the pixel type's range."""
    factor = rng.uniform(0.2, 0.4) if rng.random() < 0.5 else rng.uniform(2.5, 4.0)
    return _like(_values(image) * factor, image)


def label(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Wrong label: the image is fine; the scenario flips the row's Group_bin instead."""
    return sitk.Image(image)


#: Type name -> generator. Read-only: the registry is module-level, so it must not mutate.
HARMFUL_TYPES: Mapping[str, Generator] = MappingProxyType({
    "inverted": inverted,
    "noise": noise,
    "motion": motion,
    "spike": spike,
    "bias": bias,
    "blur": blur,
    "orientation": orientation,
    "misregistration": misregistration,
    "intensity": intensity,
    "label": label,
})

#: One line per type, for `--help`.
HARMFUL_DESCRIPTIONS: Mapping[str, str] = MappingProxyType({
    "inverted": "inverted contrast (255 - value for 8-bit images)",
    "noise": "additive Gaussian noise, sd 25 on the 0..255 scale, clipped",
    "motion": "ghosting from phase errors on every other k-space line (head motion)",
    "spike": "herringbone stripes from one or two k-space spikes",
    "bias": "strong smooth multiplicative bias field (gain up to x2-3 or /2-3)",
    "blur": "heavy Gaussian blur, sigma 2-3.5 voxels (low resolution)",
    "orientation": "voxel array flipped or axes permuted, header unchanged",
    "misregistration": "brain rotated (4-12 deg per axis) and shifted (4-8 voxels)",
    "intensity": "intensities scaled by 0.2-0.4 or 2.5-4, clipped",
    "label": "image unchanged; the row's Group_bin is flipped (scenario only)",
})

#: Types whose harm is in the CSV row (the label), not in the image.
LABEL_TYPES: frozenset[str] = frozenset({"label"})


# --- files -----------------------------------------------------------------------------------

def check_types(types: Sequence[str]) -> list[str]:
    """Validate harmful type names, raising a one-line `DQCError` naming the known ones."""
    names = [str(t).strip() for t in types if str(t).strip()]
    if not names:
        raise DQCError(f"no harmful type given (known: {', '.join(HARMFUL_TYPES)})")
    unknown = [t for t in names if t not in HARMFUL_TYPES]
    if unknown:
        raise DQCError(f"unknown harmful type(s) {', '.join(unknown)} "
                       f"(known: {', '.join(HARMFUL_TYPES)})")
    return names


def make_harmful(in_path: str | Path, out_path: str | Path, kind: str, seed: int = 0,
                 subject: object = None) -> Path:
    """Read one volume, apply harmful type `kind` with `np.random.default_rng(seed)`, write it."""
    (kind,) = check_types([kind])
    image = read_image(in_path, subject)  # the data layer's check (3D, scalar, finite)
    out = HARMFUL_TYPES[kind](image, np.random.default_rng(seed))
    return write_image(out_path, out)  # atomic: no half-written image on a crash


# --- scenarios -------------------------------------------------------------------------------

def _image_seed(seed: int, subject: str) -> int:
    """Per-image seed from the scenario seed and the (new) subject id: reproducible per file."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(subject.encode())]).generate_state(1)[0])


def _file_name(subject: str, taken: set[str]) -> str:
    """A safe, unique NIfTI file name for a subject id."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", subject).strip(".") or "image"
    name, n = f"{stem}.nii.gz", 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}.nii.gz"
    taken.add(name)
    return name


def _new_subject(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _choose_whole(all_centers: list[str], whole_centers: int, centers: list[str] | None,
                  rng: np.random.Generator) -> list[str]:
    if centers:
        names = [str(c).strip() for c in centers if str(c).strip()]
        unknown = [c for c in names if c not in all_centers]
        if unknown:
            raise DQCError(f"unknown center(s) {', '.join(unknown)} "
                           f"(centers in the CSV: {', '.join(all_centers)})")
        if len(set(names)) != len(names):
            raise DQCError(f"center(s) named twice: {', '.join(names)}")
        if whole_centers and whole_centers != len(names):
            raise DQCError(f"whole_centers={whole_centers} but {len(names)} center(s) named; "
                           "give one or the other")
        return names
    if whole_centers < 0:
        raise DQCError(f"whole_centers must be >= 0, got {whole_centers}")
    if whole_centers > len(all_centers):
        raise DQCError(f"{whole_centers} whole harmful centers requested but the CSV has only "
                       f"{len(all_centers)} centers")
    picks = rng.choice(len(all_centers), size=whole_centers, replace=False)
    return [all_centers[int(i)] for i in picks]


@dataclass(frozen=True)
class HarmfulImage:
    """One harmful file of a scenario: `kind` applied to `source`, written to `target`."""

    source: str
    target: Path
    kind: str
    subject: str
    seed: int  # the generator's seed for this image (`_image_seed`)


@dataclass(frozen=True)
class ScenarioPlan:
    """What a scenario writes: the training CSV's rows and the harmful images they point to."""

    out_csv: Path
    table: pd.DataFrame  # the CSV as written (Paths relative to its folder when inside it)
    images: tuple[HarmfulImage, ...]


def plan_scenario(train_csv: str | Path, out_dir: str | Path, *, whole_centers: int = 0,
                  centers: list[str] | None = None, single_images: int = 0,
                  types: Sequence[str] = ("inverted", "noise"), seed: int = 0,
                  verbose: bool = True) -> ScenarioPlan:
    """Check the request and choose the rows, types and files of `build_scenario`; writes
    nothing (it reads the CSV and checks its images)."""
    types = check_types(list(types))
    if single_images < 0:
        raise DQCError(f"single_images must be >= 0, got {single_images}")
    if not centers and whole_centers == 0 and single_images == 0:
        raise DQCError("nothing to do: ask for whole harmful centers (whole_centers/centers) "
                       "and/or single_images")
    train_csv = Path(train_csv)
    table = load_table(train_csv, "scenario")
    out_dir = Path(out_dir).expanduser().resolve()
    out_csv = out_dir / "train.csv"
    if out_csv.exists() and out_csv.samefile(train_csv):
        raise DQCError(f"{out_csv}: the output would overwrite the input CSV; choose another --out")
    check_images(table, desc="input images", verbose=verbose)

    rng = np.random.default_rng(seed)
    all_centers = list(dict.fromkeys(table.Study))
    whole = _choose_whole(all_centers, int(whole_centers), centers, rng)
    clean = [c for c in all_centers if c not in whole]
    if single_images > len(clean):
        raise DQCError(f"{single_images} single harmful images requested but only {len(clean)} "
                       f"center(s) are not whole-harmful (each receives one image)")
    receivers = [clean[int(i)] for i in rng.choice(len(clean), size=single_images, replace=False)]

    result = table.copy()
    if "Harmful" not in result.columns:
        result["Harmful"] = 0
    if "HarmfulType" not in result.columns:
        result["HarmfulType"] = ""
    result["HarmfulType"] = result["HarmfulType"].fillna("").astype(str)
    images = out_dir / "images"
    files: set[str] = set()
    jobs: list[HarmfulImage] = []

    def job(source: str, kind: str, subject: str) -> str:
        target = images / _file_name(subject, files)
        jobs.append(HarmfulImage(source, target, kind, subject, _image_seed(seed, subject)))
        return str(target)

    for i, center in enumerate(whole):
        kind = types[i % len(types)]
        for row in np.flatnonzero((result.Study == center).to_numpy()):
            result.at[row, "Path"] = job(result.at[row, "Path"], kind, result.at[row, "Subject"])
            result.at[row, "Harmful"] = 1
            result.at[row, "HarmfulType"] = kind
            if kind in LABEL_TYPES:
                result.at[row, "Group_bin"] = 1 - int(result.at[row, "Group_bin"])

    subjects = set(result.Subject)
    new_rows = []
    for i, center in enumerate(receivers):
        kind = types[i % len(types)]
        donors = np.flatnonzero((table.Study == center).to_numpy())
        donor = table.iloc[int(donors[int(rng.integers(len(donors)))])].copy()
        subject = _new_subject(f"{donor.Subject}_harm_{kind}", subjects)
        row = donor.to_dict()
        row.update(Subject=subject, Study=center, Path=job(donor.Path, kind, subject),
                   Harmful=1, HarmfulType=kind)
        if kind in LABEL_TYPES:
            row["Group_bin"] = 1 - int(row["Group_bin"])
        new_rows.append(row)
    if new_rows:
        result = pd.concat([result, pd.DataFrame(new_rows, columns=result.columns)],
                           ignore_index=True)
    result["Path"] = [_relative_if_inside(Path(p), out_dir) for p in result.Path]
    return ScenarioPlan(out_csv, result, tuple(jobs))


def write_scenario(plan: ScenarioPlan, verbose: bool = True) -> Path:
    """Make the plan's harmful images, then write its CSV (last, atomically); its path."""
    for image in progress(list(plan.images), desc="harmful images", disable=not verbose):
        make_harmful(image.source, image.target, image.kind, image.seed, image.subject)
    write_csv(plan.out_csv, plan.table)
    return plan.out_csv


def build_scenario(train_csv: str | Path, out_dir: str | Path, *, whole_centers: int = 0,
                   centers: list[str] | None = None, single_images: int = 0,
                   types: Sequence[str] = ("inverted", "noise"), seed: int = 0,
                   verbose: bool = True) -> Path:
    """Write a training CSV with harmful data inserted, and the harmful images it points to.

    Whole centers (`whole_centers` chosen at random, or the named `centers`): every image of
    the center is replaced by a harmful version under the same Subject id; the types cycle per
    center in order (center 1 all types[0], center 2 all types[1], ...).

    Single images: `single_images` other (clean) centers, chosen at random, each receive ONE
    new row `<subject>_harm_<type>`: a harmful copy of one of *that center's own* images (so
    scanner/site traits match and only the corruption differs), types cycling per center.

    Harmful rows get Harmful=1 and HarmfulType; label types flip Group_bin. Other rows are kept
    as they are (Harmful=0 unless the input said otherwise). Writes `out_dir/train.csv` (images
    in `out_dir/images/`, paths relative to `out_dir` when inside it) and returns its path.
    The choice is `plan_scenario`'s; the writing `write_scenario`'s.
    """
    return write_scenario(plan_scenario(
        train_csv, out_dir, whole_centers=whole_centers, centers=centers,
        single_images=single_images, types=types, seed=seed, verbose=verbose), verbose)


def _relative_if_inside(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder).as_posix()
    except ValueError:
        return str(path.resolve())


def scenario_summary(csv_path: str | Path) -> str:
    """One line describing a scenario CSV: which centers hold which harmful images."""
    table = load_table(csv_path, "scenario", check_files=False)
    if "Harmful" not in table.columns:
        table["Harmful"] = 0
    harmful = table[table.Harmful == 1]
    whole, single = [], []
    for center, rows in harmful.groupby("Study", sort=False):
        kinds = "/".join(dict.fromkeys(rows.HarmfulType.fillna("").astype(str)))
        if (table.Study == center).sum() == len(rows):
            whole.append(f"{center}={kinds}")
        else:
            single.append(f"{center}={kinds}" + (f" ({len(rows)} images)" if len(rows) > 1 else ""))
    return (f"wrote {csv_path}: {len(table)} rows, {len(harmful)} harmful; "
            f"whole centers: {', '.join(whole) or 'none'}; "
            f"single images: {', '.join(single) or 'none'}")
