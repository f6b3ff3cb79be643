"""Where rows come from (bundled medix_mini, a local JSONL/parquet file, the MBZUAI/medix-rl-data hub set) and load_samples."""

import hashlib
import json
import logging
import re
from pathlib import Path

from medix.data.samples import LoadReport, Sample, validate_rows
from medix.errors import ConfigError, DataError, MedixError

log = logging.getLogger(__name__)
MINI_PATH = Path(__file__).with_name("medix_mini.jsonl")
IMAGE_SUFFIXES = (".jpg", ".png", ".webp", ".gif", ".bmp", ".tiff", ".mpo")


def read_jsonl(path: Path):
    """(line number, dict | ValueError) for every non-blank line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                yield number, ValueError(f"line is not valid JSON ({error.msg} at column {error.colno})")


def read_parquet(path: Path):
    """(row number from 1, dict) for every row of a parquet file."""
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def read_file_rows(path: Path):
    if not path.is_file():
        raise DataError(f"dataset.path={str(path)!r} does not exist; expected a .jsonl or .parquet file")
    if path.suffix.lower() == ".parquet":
        return read_parquet(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path)
    raise DataError(f"dataset.path={str(path)!r} has an unknown suffix {path.suffix!r}; expected .jsonl or .parquet")


def _save_hub_image(image, target_stem: Path) -> str:
    """A hub image cell (PIL image, {'bytes','path'} dict, or path string) saved once under target_stem.<ext>."""
    from io import BytesIO

    from PIL import Image

    if isinstance(image, str):
        return image
    for suffix in IMAGE_SUFFIXES:  # written by an earlier load (a stat per suffix, not a folder scan)
        if target_stem.with_suffix(suffix).is_file():
            return str(target_stem.with_suffix(suffix))
    if isinstance(image, dict) and image.get("bytes"):
        data = image["bytes"]
        with Image.open(BytesIO(data)) as opened:
            suffix = "." + (opened.format or "png").lower().replace("jpeg", "jpg")
        suffix = suffix if suffix in IMAGE_SUFFIXES else ".png"
        target = target_stem.with_suffix(suffix)
        target.write_bytes(data)
        return str(target)
    if isinstance(image, dict) and image.get("path"):
        return image["path"]
    if isinstance(image, Image.Image):
        target = target_stem.with_suffix(".png")
        image.save(target)
        return str(target)
    raise ValueError(f"field 'image': unsupported hub image cell of type {type(image).__name__}")


def file_stem_of(row_id: str) -> str:
    """A row id as a file name: unchanged when already safe, else sanitised plus a short hash (no collisions)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", row_id)
    return safe if safe == row_id else f"{safe}-{hashlib.sha1(row_id.encode()).hexdigest()[:8]}"


def read_hub_rows(hub_id: str, split: str, image_dir: Path):
    """(row number, dict) for a hub split; images are written once to image_dir/<id>_<k>.<ext> and given as paths."""
    try:
        import datasets

        table = datasets.load_dataset(hub_id, split=split)
        if "image" in table.column_names:
            table = table.cast_column("image", datasets.List(datasets.Image(decode=False)))
    except Exception as error:
        raise MedixError(
            f"could not load dataset.hub_id={hub_id!r} split={split!r} ({type(error).__name__}: {error}). "
            "Without network access, download it once elsewhere into the Hugging Face cache, or use "
            "dataset=jsonl dataset.path=<local .jsonl/.parquet> or dataset=medix_mini") from error
    image_dir.mkdir(parents=True, exist_ok=True)
    for number, row in enumerate(table, start=1):
        images = row.get("image") or []
        if not isinstance(images, list):
            images = [images]
        safe_id = file_stem_of(str(row.get("id")))
        try:
            row["image"] = [_save_hub_image(image, image_dir / f"{safe_id}_{k}") for k, image in enumerate(images)]
        except (ValueError, OSError) as error:
            yield number, ValueError(str(error))
            continue
        yield number, row


def load_report(dataset_cfg) -> LoadReport:
    """Load and validate the configured dataset (a mapping of the dataset.* keys): hub_id set -> hub; path set -> that file; name medix_mini -> bundled."""
    on_bad_row = str(dataset_cfg.get("on_bad_row", "error"))
    name = str(dataset_cfg.get("name"))
    if dataset_cfg.get("hub_id"):
        split = dataset_cfg.get("split")
        if not split:
            raise ConfigError(f"dataset.split is required with dataset.hub_id={dataset_cfg.get('hub_id')!r}; e.g. train")
        image_dir = Path(str(dataset_cfg.get("image_dir") or "images")).expanduser()
        hub_id = str(dataset_cfg.get("hub_id"))
        rows = read_hub_rows(hub_id, str(split), image_dir)
        where, base_dir = f"dataset {hub_id}[{split}]", image_dir
    else:
        path = dataset_cfg.get("path") or (MINI_PATH if name == "medix_mini" else None)
        if path is None:
            raise ConfigError(
                f"dataset.path is required for dataset={name}; pass dataset.path=/path/to/file.jsonl (or .parquet)")
        path = Path(str(path)).expanduser()
        rows, where, base_dir = read_file_rows(path), f"dataset {path.name}", path.parent
    report = validate_rows(rows, where=where, base_dir=base_dir, default_source=name, on_bad_row=on_bad_row)
    if report.skipped:
        log.warning("%s: skipped %d bad rows (first: %s: %s)", where, len(report.skipped), *report.skipped[0])
    return report


def load_samples(dataset_cfg) -> list[Sample]:
    """The validated samples of the configured dataset (use load_report to also get the skipped rows)."""
    return load_report(dataset_cfg).samples
