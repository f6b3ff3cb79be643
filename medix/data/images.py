"""Image loading for prompts: any file (JPEG/PNG/16-bit/CMYK/palette/DICOM) to an 8-bit RGB PIL image within pixel bounds."""

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from medix.errors import ConfigError

DICOM_SUFFIXES = (".dcm", ".dicom")


def is_dicom(path: str | Path) -> bool:
    """True for a .dcm/.dicom name or a file with the 'DICM' magic at byte 128."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def to_uint8(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Linear window [low, high] -> 0..255; without a window, the 0.5th..99.5th percentiles of the pixels."""
    values = values.astype(np.float64)
    if low is None or high is None:
        low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    return (np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _first_value(value) -> float:
    """WindowCenter/WindowWidth may hold several values; the first one is the default window."""
    try:
        return float(value)
    except TypeError:
        return float(value[0])


def read_dicom(path: str | Path) -> Image.Image:
    """A DICOM file to 8-bit: modality LUT (rescale to HU etc.), the file's first VOI window if any, MONOCHROME1 inverted.

    Multi-frame files give their middle frame.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    dataset = pydicom.dcmread(str(path))
    pixels = dataset.pixel_array
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or pixels.ndim == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            pixels = convert_color_space(pixels, photometric, "RGB")
        return Image.fromarray(to_uint8(pixels, 0, 255) if pixels.dtype != np.uint8 else pixels, "RGB")
    values = apply_modality_lut(pixels, dataset)
    low = high = None
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, width = _first_value(dataset.WindowCenter), _first_value(dataset.WindowWidth)
        low, high = center - width / 2.0, center + width / 2.0
    grey = to_uint8(values, low, high)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16/32-bit and float greyscale are windowed to 8-bit first; alpha is dropped on black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(to_uint8(np.asarray(image)), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (0, 0, 0))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def fit_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled keeping aspect so that min_pixels <= w*h <= max_pixels (unchanged when already inside)."""
    pixels = width * height
    if pixels > max_pixels:
        scale = math.sqrt(max_pixels / pixels)
        return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    if pixels < min_pixels:
        scale = math.sqrt(min_pixels / pixels)
        return math.ceil(width * scale), math.ceil(height * scale)
    return width, height


def load_image(path: str | Path, *, min_pixels: int, max_pixels: int) -> Image.Image:
    """Read one image file as RGB, resized (aspect kept, bicubic) into [min_pixels, max_pixels] total pixels."""
    if not 0 < min_pixels <= max_pixels:
        raise ConfigError(
            f"dataset.min_pixels={min_pixels} and dataset.max_pixels={max_pixels}: need 0 < min_pixels <= max_pixels "
            "(the paper uses 262144 and 4194304)")
    if is_dicom(path):
        image = read_dicom(path)
    else:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    image = to_rgb(image)
    size = fit_size(image.width, image.height, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def load_images(paths: list[str], dataset_cfg) -> list[Image.Image]:
    """All images of a sample, with the pixel bounds from the dataset config (dataset.min_pixels / max_pixels)."""
    return [load_image(p, min_pixels=int(dataset_cfg.min_pixels), max_pixels=int(dataset_cfg.max_pixels)) for p in paths]


def image_problem(path: str | Path) -> str | None:
    """Why an image file cannot be used (missing, unreadable), or None when it opens. Cheap: no full decode of JPEGs."""
    path = Path(path)
    if not path.is_file():
        return f"image file {str(path)!r} does not exist"
    try:
        if is_dicom(path):
            import pydicom
            dataset = pydicom.dcmread(str(path), stop_before_pixels=False)
            if "PixelData" not in dataset:
                return f"DICOM file {str(path)!r} has no pixel data"
        else:
            with Image.open(path) as image:
                image.verify()
    except Exception as error:  # any decoder failure means the file is unusable
        return f"image file {str(path)!r} is not a readable image ({type(error).__name__}: {error})"
    return None
