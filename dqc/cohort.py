"""A deterministic synthetic multi-center PD/HC cohort built from the MNI152 T1 template.

Why synthetic: the method needs many centers with different scanners, sizes and PD/HC ratios,
and real data cannot ship with the code. Each subject is the nilearn MNI152 (2009a) template,
downsampled, with a smooth random deformation, an age effect (grey-matter darkening and
ventricle enlargement) and a sex effect (head size). PD subjects lose intensity and shrink
slightly in the deep grey matter (putamen, caudate, substantia nigra), so the group
difference lives there. Each center then applies its own scanner signature (contrast, scale,
offset, bias field, blur, noise) and has its own size and PD ratio, so center effects are a
strong nuisance that is tied to the label only through each center's PD ratio.

    python -m dqc.cohort --out DIR      # DIR/images/*.nii.gz, DIR/{train,val,test}.csv
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from dqc.cli import Parser, run_main
from dqc.data import image_to_array, read_image
from dqc.errors import DQCError
from dqc.io import write_csv, write_image, write_json
from dqc.progress import progress

#: The centered crop (x, y, z) in 1 mm voxels, before downsampling.
CROP = (160, 192, 160)
SPLITS = ("train", "val", "test")
COLUMNS = ["Subject", "Study", "Path", "Group_bin", "Sex", "Age"]

#: Deep grey matter affected in PD: (name, center (x, y, z) in MNI RAS mm, semi-axes in mm).
DEEP_GM_ROIS: tuple[tuple[str, tuple[float, float, float], tuple[float, float, float]], ...] = (
    ("putamen_L", (-25.0, 2.0, 1.0), (6.0, 14.0, 8.0)),
    ("putamen_R", (25.0, 2.0, 1.0), (6.0, 14.0, 8.0)),
    ("caudate_L", (-13.0, 13.0, 9.0), (5.0, 9.0, 9.0)),
    ("caudate_R", (13.0, 13.0, 9.0), (5.0, 9.0, 9.0)),
    ("substantia_nigra_L", (-11.0, -19.0, -10.0), (4.0, 7.0, 3.0)),
    ("substantia_nigra_R", (11.0, -19.0, -10.0), (4.0, 7.0, 3.0)),
)
#: Center of the lateral ventricles (MNI RAS mm): the age effect enlarges around it.
VENTRICLES_MM = (0.0, -8.0, 16.0)

AGE_RANGE = (50.0, 85.0)
DEFORM_MM = 3.0          # std of the smooth random displacement per axis
PD_SHRINK = 0.3          # ROI contraction = PD_SHRINK * effect * severity
AGE_GM_LOSS = 0.10       # GM intensity loss at the oldest age
AGE_VENTRICLE = 0.15     # radial expansion around the ventricles at the oldest age
HEADROOM = 0.8           # template white matter ~180 of 255, so bright scanners rarely clip


@dataclass(frozen=True)
class Template:
    """The downsampled template and what every subject reuses (built once per cohort)."""

    t1: np.ndarray          # float32 (x, y, z), 0..255
    gm: np.ndarray          # grey-matter probability, 0..1
    reference: sitk.Image   # the output geometry (size, spacing, origin, direction)
    roi: np.ndarray         # deep-GM weight 0..1
    roi_centers: np.ndarray  # (n_roi, 3) continuous voxel indices of the ROI centers
    roi_ids: np.ndarray     # int (x, y, z): which ROI dominates each voxel (-1: none)
    brain_center: np.ndarray  # continuous voxel index
    ventricles: np.ndarray  # continuous voxel index
    voxel_mm: float         # output voxel size (isotropic)


@dataclass(frozen=True)
class Center:
    """One scanner's signature, and its share of the cohort."""

    name: str
    weight: float
    pd_rate: float
    scale: float
    offset: float
    gamma: float
    bias: float
    noise: float
    blur_mm: float
    bias_seed: int  # the center's bias-field pattern, shared by its images


# --- template ----------------------------------------------------------------------------

def template_dir() -> Path:
    """The folder of nilearn's bundled MNI152 files, found without importing nilearn (slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise DQCError("nilearn is not installed; it ships the MNI152 template the cohort uses")
    return Path(spec.origin).parent / "datasets" / "data"


def _template_file(kind: str) -> Path:
    path = template_dir() / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise DQCError(f"{path}: MNI152 template file not found in the nilearn package")
    return path


def _crop_box(size: tuple[int, ...], factor: int) -> tuple[list[int], list[int]]:
    """Start and extent of the centered crop to CROP, trimmed to a multiple of `factor`."""
    extent = [(c // factor) * factor for c in CROP]
    start = [(s - e) // 2 for s, e in zip(size, extent)]
    return start, extent


def _block_mean(array: np.ndarray, start: list[int], extent: list[int], factor: int) -> np.ndarray:
    """Crop (zero-padding where the crop leaves the volume) and average factor^3 blocks."""
    box = np.zeros(extent, np.float64)
    src = tuple(slice(max(s, 0), min(s + e, n)) for s, e, n in zip(start, extent, array.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    box[dst] = array[src]
    nx, ny, nz = (e // factor for e in extent)
    return box.reshape(nx, factor, ny, factor, nz, factor).mean(axis=(1, 3, 5))


def _reference(image: sitk.Image, start: list[int], shape: tuple[int, ...],
               factor: int) -> sitk.Image:
    """Output geometry: spacing * factor, origin at the center of the first block."""
    reference = sitk.Image([int(s) for s in shape], sitk.sitkUInt8)
    reference.SetSpacing([s * factor for s in image.GetSpacing()])
    reference.SetDirection(image.GetDirection())
    first = [st + (factor - 1) / 2 for st in start]
    reference.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(first))
    return reference


def _mni_to_index(reference: sitk.Image, ras_mm: tuple[float, float, float]) -> np.ndarray:
    """MNI RAS mm -> continuous voxel index (ITK physical space is LPS)."""
    lps = (-float(ras_mm[0]), -float(ras_mm[1]), float(ras_mm[2]))
    return np.array(reference.TransformPhysicalPointToContinuousIndex(lps))


def voxel_mni(reference: sitk.Image) -> np.ndarray:
    """MNI RAS mm of every voxel center, shape (3, x, y, z), from origin/spacing/direction."""
    size = reference.GetSize()
    index = np.indices(size, dtype=np.float64).reshape(3, -1)
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    spacing = np.array(reference.GetSpacing())[:, None]
    lps = np.array(reference.GetOrigin())[:, None] + direction @ (spacing * index)
    return (lps * np.array([-1.0, -1.0, 1.0])[:, None]).reshape(3, *size)


def deep_gm_weight(reference: sitk.Image, sharpness: float = 0.15) -> np.ndarray:
    """Soft 0..1 weight of the deep-GM ROIs on `reference`'s voxel grid (x, y, z).

    1 inside the ellipsoids, falling smoothly to 0 over about `sharpness` of their radius,
    so the disease effect has no hard edges at any resolution.
    """
    return _roi_weights(reference, sharpness).max(axis=0)


def _roi_weights(reference: sitk.Image, sharpness: float = 0.15) -> np.ndarray:
    mm = voxel_mni(reference)
    weights = []
    for _, center, axes in DEEP_GM_ROIS:
        r = np.sqrt(sum(((mm[k] - center[k]) / axes[k]) ** 2 for k in range(3)))
        weights.append(1.0 / (1.0 + np.exp((r - 1.0) / sharpness)))
    return np.stack(weights).astype(np.float32)


def load_template(downsample: int) -> Template:
    """Read the MNI152 T1 and GM map, crop centered to 160x192x160 and block-average."""
    t1_image = read_image(_template_file("t1"))
    gm_image = read_image(_template_file("gm"))
    start, extent = _crop_box(t1_image.GetSize(), downsample)
    t1 = _block_mean(image_to_array(t1_image).astype(np.float64), start, extent, downsample)
    gm = _block_mean(image_to_array(gm_image) / 255.0, start, extent, downsample)
    reference = _reference(t1_image, start, t1.shape, downsample)
    weights = _roi_weights(reference)
    brain = np.argwhere(t1 > 0)
    return Template(
        t1=t1.astype(np.float32), gm=gm.astype(np.float32), reference=reference,
        roi=weights.max(axis=0),
        roi_centers=np.stack([_mni_to_index(reference, c) for _, c, _ in DEEP_GM_ROIS]),
        roi_ids=np.where(weights.max(axis=0) > 1e-3, weights.argmax(axis=0), -1),
        brain_center=brain.mean(axis=0) if len(brain) else (np.array(t1.shape) - 1) / 2,
        ventricles=_mni_to_index(reference, VENTRICLES_MM),
        voxel_mm=float(reference.GetSpacing()[0]),
    )


# --- centers and the allocation of images ---------------------------------------------

def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], grid: int = 4) -> np.ndarray:
    """A low-frequency random field with unit std: random weights on the first `grid` cosines
    per axis (a separable product, far faster than spline-upsampling a coarse noise grid)."""
    weights = rng.standard_normal((grid, grid, grid))
    weights[0, 0, 0] = 0.0
    bases = [np.cos(np.pi * np.outer(np.arange(grid), np.arange(n) + 0.5) / n) for n in shape]
    field = np.einsum("ijk,ia,jb,kc->abc", weights, *bases, optimize=True)
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def make_centers(n_centers: int, pd_fraction: float, seed: int) -> list[Center]:
    """Draw each center's size weight (log-normal: a few big, many small), PD rate and scanner."""
    rng = np.random.default_rng([seed, 1])
    weights = rng.lognormal(0.0, 1.1, n_centers)
    concentration = 6.0  # spread of the centers' PD rates around pd_fraction
    rates = np.clip(rng.beta(concentration * pd_fraction, concentration * (1 - pd_fraction),
                             n_centers), 0.1, 0.9)
    return [Center(name=f"C{c + 1:02d}", weight=float(weights[c]), pd_rate=float(rates[c]),
                   scale=float(rng.lognormal(0.0, 0.15)), offset=float(rng.normal(0.0, 8.0)),
                   gamma=float(rng.uniform(0.8, 1.25)), bias=float(rng.uniform(0.05, 0.25)),
                   noise=float(rng.uniform(2.0, 10.0)), blur_mm=float(rng.uniform(0.0, 4.0)),
                   bias_seed=int(rng.integers(2**31)))
            for c in range(n_centers)]


def apportion(total: int, weights: np.ndarray, caps: np.ndarray | None = None) -> np.ndarray:
    """Split `total` into integers proportional to `weights`, none above its cap.

    Greedy: each unit goes to the cell furthest below its ideal share (ties: lowest index),
    which is the largest-remainder method when no cap binds. Deterministic.
    """
    weights = np.asarray(weights, np.float64)
    caps = np.full(len(weights), total) if caps is None else np.asarray(caps)
    ideal = total * weights / weights.sum() if weights.sum() > 0 else np.zeros(len(weights))
    counts = np.zeros(len(weights), int)
    for _ in range(total):
        gap = np.where(counts < caps, ideal - counts, -np.inf)
        counts[int(np.argmax(gap))] += 1
    return counts


def allocate(centers: list[Center], sizes: dict[str, int], pd_fraction: float) -> np.ndarray:
    """Counts [split, center, label] (label 0 = HC, 1 = PD).

    Every split has the same center proportions and per-center PD ratios (stratified by center
    and label) with exact split totals and class totals; each center gets >= 2 training images.
    """
    weights = np.array([c.weight for c in centers])
    rates = np.array([c.pd_rate for c in centers])
    counts = np.zeros((len(SPLITS), len(centers), 2), int)
    for s, split in enumerate(SPLITS):
        base = 2 if split == "train" else 0
        per_center = base + apportion(sizes[split] - base * len(centers), weights)
        n_pd = round(sizes[split] * pd_fraction)
        pd = apportion(n_pd, per_center * rates, caps=per_center)
        counts[s, :, 1] = pd
        counts[s, :, 0] = per_center - pd
    return counts


# --- one subject ---------------------------------------------------------------------------

def _scale_about(points: np.ndarray, center: np.ndarray, factor: float) -> np.ndarray:
    """Sampling offset that makes the image `factor` times larger about `center`."""
    return (points - center[:, None, None, None]) * (1.0 / factor - 1.0)


def _radial(points: np.ndarray, center: np.ndarray, amount: float, sigma_vox: float) -> np.ndarray:
    """Sampling offset expanding (amount > 0) the region around `center` with a Gaussian falloff."""
    delta = points - center[:, None, None, None]
    falloff = np.exp(-(delta ** 2).sum(axis=0) / (2 * sigma_vox ** 2))
    return -amount * delta * falloff


def _roi_shrink(points: np.ndarray, tpl: Template, amount: float) -> np.ndarray:
    """Sampling offset contracting each deep-GM ROI toward its own center."""
    centers = tpl.roi_centers[np.maximum(tpl.roi_ids, 0)].transpose(3, 0, 1, 2)
    return amount * tpl.roi[None] * (points - centers) * (tpl.roi_ids >= 0)[None]


def subject_anatomy(tpl: Template, rng: np.random.Generator, *, age: float, male: bool,
                    severity: float, effect: float) -> np.ndarray:
    """The subject's brain in template space before any scanner effect (float32, 0..255)."""
    age_z = (age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])
    intensity = 1.0 - AGE_GM_LOSS * age_z * tpl.gm - effect * severity * tpl.roi
    brain = tpl.t1 * np.clip(intensity, 0.0, None)
    points = np.indices(tpl.t1.shape, dtype=np.float32)
    deform_vox = DEFORM_MM / tpl.voxel_mm
    offsets = np.stack([_smooth_field(rng, tpl.t1.shape) for _ in range(3)]) * deform_vox
    size = (1.03 if male else 0.97) * rng.normal(1.0, 0.015)
    offsets += _scale_about(points, tpl.brain_center, size)
    offsets += _radial(points, tpl.ventricles, AGE_VENTRICLE * age_z, 18.0 / tpl.voxel_mm)
    if severity > 0:
        offsets += _roi_shrink(points, tpl, PD_SHRINK * effect * severity)
    return ndimage.map_coordinates(brain, points + offsets, order=1, mode="constant", cval=0.0)


def scan(anatomy: np.ndarray, center: Center, rng: np.random.Generator,
         voxel_mm: float) -> np.ndarray:
    """The center's scanner: blur, contrast curve, bias field, scale/offset, Rician noise."""
    image = ndimage.gaussian_filter(anatomy, center.blur_mm / voxel_mm / 2.355) \
        if center.blur_mm > 0 else anatomy
    image = 255.0 * (np.clip(image, 0, None) / 255.0) ** center.gamma
    center_rng = np.random.default_rng(center.bias_seed)
    bias = np.exp(center.bias * (0.6 * _smooth_field(center_rng, anatomy.shape, grid=3)
                                 + 0.4 * _smooth_field(rng, anatomy.shape, grid=3)))
    image = image * bias * (HEADROOM * center.scale * rng.normal(1.0, 0.03)) + center.offset
    real = image + rng.normal(0.0, center.noise, image.shape)
    imag = rng.normal(0.0, center.noise, image.shape)
    return np.clip(np.rint(np.hypot(real, imag)), 0, 255).astype(np.uint8)


# --- the cohort ----------------------------------------------------------------------------

def check_args(centers: int, n_train: int, n_val: int, n_test: int, downsample: int,
               effect: float, pd_fraction: float, seed: int) -> None:
    """One-line `DQCError` for settings that cannot give a valid cohort."""
    if centers < 1:
        raise DQCError(f"--centers must be at least 1, got {centers}")
    if n_train < 2 * centers:
        raise DQCError(f"--train {n_train} is too small for {centers} centers "
                       f"(each center needs >= 2 training images: at least {2 * centers})")
    if not 0.0 < pd_fraction < 1.0:
        raise DQCError(f"--pd-fraction must be strictly between 0 and 1, got {pd_fraction}")
    for flag, n in (("--train", n_train), ("--val", n_val), ("--test", n_test)):
        n_pd = round(n * pd_fraction)
        if n_pd < 1 or n - n_pd < 1:
            raise DQCError(f"{flag} {n} with --pd-fraction {pd_fraction} leaves a class empty "
                           "(each split needs both PD and HC images)")
    if not 1 <= downsample <= min(CROP) // 8:
        raise DQCError(f"--downsample must be an integer from 1 to {min(CROP) // 8}, "
                       f"got {downsample}")
    if not 0.0 <= effect < 1.0:
        raise DQCError(f"--effect must be in [0, 1), got {effect}")
    if seed < 0:
        raise DQCError(f"--seed must be >= 0, got {seed}")


def _subjects(counts: np.ndarray, centers: list[Center], seed: int) -> pd.DataFrame:
    """One row per image: split, center, label, sex, age, severity, in a seed-shuffled order."""
    rows = [(split, c, label)
            for s, split in enumerate(SPLITS) for c in range(len(centers))
            for label in (0, 1) for _ in range(counts[s, c, label])]
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(len(rows))
    width = max(4, len(str(len(rows))))
    table = pd.DataFrame([rows[i] for i in order], columns=["split", "center", "Group_bin"])
    table.insert(0, "Subject", [f"sub-{i + 1:0{width}d}" for i in range(len(rows))])
    table["Study"] = [centers[c].name for c in table.center]
    table["Path"] = [f"images/{s}.nii.gz" for s in table.Subject]
    table["Sex"] = np.where(rng.random(len(rows)) < 0.5, "M", "F")
    age = np.clip(rng.normal(67.0, 8.0, len(rows)), *AGE_RANGE)
    table["Age"] = np.round(age, 1)
    table["severity"] = np.where(table.Group_bin == 1, rng.uniform(0.5, 1.5, len(rows)), 0.0)
    return table


def _write_image(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.CopyInformation(reference)
    write_image(path, image, compress=True)


def build_cohort(out: Path, *, centers: int = 20, n_train: int = 200, n_val: int = 120,
                 n_test: int = 100, downsample: int = 4, effect: float = 0.35,
                 pd_fraction: float = 0.5, seed: int = 0, verbose: bool = True) -> dict:
    """Write the cohort into `out`; return the CSV paths, the parameters and a summary.

    Same arguments -> identical CSVs and voxel arrays (each subject has its own seeded
    generator, so nothing depends on the order of work).
    """
    started = time.perf_counter()
    params = dict(centers=centers, n_train=n_train, n_val=n_val, n_test=n_test,
                  downsample=downsample, effect=effect, pd_fraction=pd_fraction, seed=seed)
    check_args(**params)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tpl = load_template(downsample)
    sites = make_centers(centers, pd_fraction, seed)
    counts = allocate(sites, {"train": n_train, "val": n_val, "test": n_test}, pd_fraction)
    table = _subjects(counts, sites, seed)
    for row in progress(list(table.itertuples(index=False)), desc="writing images",
                        disable=not verbose):
        rng = np.random.default_rng([seed, 3, int(row.Subject.split("-")[1])])
        anatomy = subject_anatomy(tpl, rng, age=row.Age, male=row.Sex == "M",
                                  severity=row.severity, effect=effect)
        _write_image(scan(anatomy, sites[row.center], rng, tpl.voxel_mm), tpl.reference,
                     out / row.Path)
    result = {"params": params, **_write_tables(out, table)}
    result.update(_summary(tpl, sites, table))
    write_json(out / "cohort.json", _json_ready(result, out))
    result["cohort_json"] = out / "cohort.json"
    result["seconds"] = time.perf_counter() - started
    if verbose:
        print(summary_line(result, out))
    return result


def _write_tables(out: Path, table: pd.DataFrame) -> dict[str, Path]:
    paths = {}
    for split in SPLITS:
        part = table[table.split == split].sort_values("Subject")
        paths[split] = out / f"{split}.csv"
        write_csv(paths[split], part[COLUMNS])
    return paths


def _summary(tpl: Template, sites: list[Center], table: pd.DataFrame) -> dict:
    ref = tpl.reference
    counts = {split: {"HC": int(((table.split == split) & (table.Group_bin == 0)).sum()),
                      "PD": int(((table.split == split) & (table.Group_bin == 1)).sum())}
              for split in SPLITS}
    per_center = table.groupby(["Study", "split"]).size().unstack(fill_value=0)
    return {
        "shape": list(ref.GetSize()), "spacing": list(ref.GetSpacing()),
        "origin": list(ref.GetOrigin()), "direction": list(ref.GetDirection()),
        "counts": counts,
        "centers_table": [{**vars(c), **{s: int(per_center.loc[c.name].get(s, 0))
                                         for s in SPLITS}}
                          for c in sites if c.name in per_center.index],
        "template": "nilearn MNI152 ICBM 2009a symmetric T1 (1 mm), cropped 160x192x160",
        "deep_gm_rois_mni_mm": [{"name": n, "center": c, "semi_axes": a}
                                for n, c, a in DEEP_GM_ROIS],
    }


def _json_ready(result: dict, out: Path) -> dict:
    """Paths relative to the cohort folder, so the JSON is identical wherever it is built."""
    return {k: (str(v.relative_to(out)) if isinstance(v, Path) else v) for k, v in result.items()}


def summary_line(result: dict, out: Path) -> str:
    counts = result["counts"]
    splits = ", ".join(f"{s} {c['HC'] + c['PD']} ({c['PD']} PD/{c['HC']} HC)"
                       for s, c in counts.items())
    return (f"cohort: {splits}; {result['params']['centers']} centers; "
            f"{'x'.join(map(str, result['shape']))} voxels; "
            f"{result['seconds']:.1f} s -> {out}")


# --- command line ------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m dqc.cohort", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (gets images/, train.csv, val.csv, test.csv, cohort.json)")
    p.add_argument("--centers", type=int, default=20, help="number of centers (default 20)")
    p.add_argument("--train", type=int, default=200, help="training images (default 200)")
    p.add_argument("--val", type=int, default=120,
                   help="validation images (default 120; QC needs >= 50 per class)")
    p.add_argument("--test", type=int, default=100, help="test images (default 100)")
    p.add_argument("--downsample", type=int, default=4,
                   help="integer downsampling of the 160x192x160 1 mm crop "
                        "(default 4 -> 40x48x40; 8 -> 20x24x20)")
    p.add_argument("--effect", type=float, default=0.35,
                   help="PD intensity loss in the deep grey matter at severity 1 (default 0.35)")
    p.add_argument("--pd-fraction", type=float, default=0.5,
                   help="overall fraction of PD images in each split (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    build_cohort(args.out, centers=args.centers, n_train=args.train, n_val=args.val,
                 n_test=args.test, downsample=args.downsample, effect=args.effect,
                 pd_fraction=args.pd_fraction, seed=args.seed, verbose=True)


if __name__ == "__main__":
    run_main(main)
