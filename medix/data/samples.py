"""One training prompt (`Sample`), row validation into samples, and the seeded train/val split."""

import random
from dataclasses import dataclass, field
from pathlib import Path

from medix.data.images import image_problem
from medix.data.tags import split_solution
from medix.errors import ConfigError, DataError


@dataclass
class Sample:
    """A question with its '<TAG> answer' ground truth; `tag`/`answer` are the two halves of `solution`.

    Not frozen: training batches are lists of Samples, and Lightning's precision plugins (bf16-true, 16-true, 64-true)
    rebuild every dataclass in a batch field by field with setattr, which a frozen dataclass refuses."""

    id: str
    problem: str
    solution: str
    tag: str
    answer: str
    images: list[str] = field(default_factory=list)
    source: str = ""


@dataclass
class LoadReport:
    """What a load gave: the usable samples and, with on_bad_row=skip, each skipped row as (row id, reason)."""

    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _text_field(row: dict, name: str) -> str:
    value = row.get(name)
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        state = "missing" if value is None else "empty" if isinstance(value, str) else f"not text ({value!r})"
        raise ValueError(f"field '{name}' is {state}; expected a non-empty string")
    return value.strip()


def _image_paths(value, base_dir: Path | None) -> list[str]:
    """The row's `image` as a list of absolute paths: None/''/[] -> [], a path, or a list of paths (relative to base_dir)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(item, str) and item.strip() for item in items):
        raise ValueError(f"field 'image' is {value!r}; expected a path or a list of paths")
    paths = []
    for item in items:
        path = Path(item.strip()).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        problem = image_problem(path)
        if problem:
            raise ValueError(f"field 'image': {problem}")
        paths.append(str(path.resolve()))
    return paths


def row_to_sample(row: dict, base_dir: Path | None, default_source: str) -> Sample:
    """Validate one raw row (id, problem, solution, optional image, optional source); ValueError names the field."""
    if not isinstance(row, dict):
        raise ValueError(f"row is {type(row).__name__}, expected a JSON object with id, problem, solution")
    sample_id = _text_field(row, "id")
    problem = _text_field(row, "problem")
    solution = _text_field(row, "solution")
    try:
        tag, answer = split_solution(solution)
    except ValueError as error:
        raise ValueError(f"field 'solution': {error}") from None
    images = _image_paths(row.get("image", row.get("images")), base_dir)
    source = row.get("source")
    source = source.strip() if isinstance(source, str) and source.strip() else default_source
    return Sample(sample_id, problem, solution, tag, answer, images, source)


def validate_rows(rows, *, where: str, base_dir: Path | None, default_source: str, on_bad_row: str) -> LoadReport:
    """(row number, row dict or ValueError for an unparsable row) pairs -> LoadReport.

    A bad row raises DataError ('<where> row N (id=X): field ...') or, with on_bad_row='skip', is recorded in `skipped`.
    """
    if on_bad_row not in ("error", "skip"):
        raise ConfigError(f"dataset.on_bad_row={on_bad_row!r}; expected 'error' or 'skip'")
    samples, skipped, first_row_of = [], [], {}
    for number, row in rows:
        raw_id = row.get("id") if isinstance(row, dict) else None
        label = f"{where} row {number}" + (f" (id={raw_id})" if raw_id not in (None, "") else "")
        try:
            if isinstance(row, ValueError):
                raise row
            sample = row_to_sample(row, base_dir, default_source)
            if sample.id in first_row_of:
                raise ValueError(f"field 'id' duplicates row {first_row_of[sample.id]}; ids must be unique")
        except ValueError as error:
            if on_bad_row == "error":
                raise DataError(f"{label}: {error} (set dataset.on_bad_row=skip to skip such rows)") from None
            skipped.append((str(raw_id) if raw_id not in (None, "") else f"row {number}", str(error)))
            continue
        first_row_of[sample.id] = number
        samples.append(sample)
    if not samples:
        detail = f"; all {len(skipped)} rows were skipped, first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"{where} has no usable rows{detail}; expected JSON objects with id, problem, solution")
    return LoadReport(samples, skipped)


def split_samples(samples: list[Sample], val_size: int | float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded shuffle, then the first `val_size` samples (an int count, or a float fraction) go to validation."""
    is_count = isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 0
    is_fraction = isinstance(val_size, float) and 0.0 <= val_size < 1.0
    if not (is_count or is_fraction):
        raise ConfigError(f"dataset.val_size={val_size!r}; expected a count >= 0 (int) or a fraction in [0, 1) (float)")
    count = round(len(samples) * val_size) if is_fraction else val_size
    if count >= len(samples):
        raise ConfigError(
            f"dataset.val_size={val_size!r} leaves no training samples out of {len(samples)}; use a smaller count or fraction")
    order = list(samples)
    random.Random(seed).shuffle(order)
    return order[count:], order[:count]
