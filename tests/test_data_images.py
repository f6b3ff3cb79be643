"""Image loading: CMYK/greyscale/16-bit/palette/alpha to RGB, resizing into pixel bounds, DICOM windowing."""

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medix.data.images import fit_size, image_problem, load_image, read_dicom, to_uint8
from medix.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
BENCHMARKS = (REPO / ".." / "shared" / "benchmarks").resolve()
WIDE = dict(min_pixels=1, max_pixels=10**9)  # no resizing


@pytest.fixture(scope="session")
def pathvqa_images() -> Path:
    folder = BENCHMARKS / "pathvqa" / "images"
    if not folder.is_dir():
        pytest.skip(f"shared PathVQA images not found at {folder}")
    return folder


def test_cmyk_jpeg_becomes_rgb_with_the_same_colours(pathvqa_images):
    path = pathvqa_images / "pathvqa_test_00424.jpg"
    with Image.open(path) as original:
        assert original.mode == "CMYK"
        expected = np.asarray(original.convert("RGB"), dtype=np.int16)
    image = load_image(path, **WIDE)
    assert image.mode == "RGB" and image.size == (242, 241)
    assert np.array_equal(np.asarray(image, dtype=np.int16), expected)
    assert np.asarray(image).mean() > 60  # a gross pathology photo, not an inverted near-black frame


def test_greyscale_jpeg_becomes_rgb_with_equal_channels(pathvqa_images):
    path = pathvqa_images / "pathvqa_test_00660.jpg"
    with Image.open(path) as original:
        assert original.mode == "L"
        grey = np.asarray(original)
    pixels = np.asarray(load_image(path, **WIDE))
    assert pixels.shape == grey.shape + (3,)
    assert all(np.array_equal(pixels[..., c], grey) for c in range(3))


def test_sixteen_bit_png_is_windowed_to_8_bit():
    with Image.open(ASSETS / "mr_small_16bit.png") as original:
        assert original.mode == "I;16"
        raw = np.asarray(original).astype(np.float64)
    pixels = np.asarray(load_image(ASSETS / "mr_small_16bit.png", **WIDE))
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
    assert pixels.min() == 0 and pixels.max() == 255
    brightest, darkest = np.unravel_index(raw.argmax(), raw.shape), np.unravel_index(raw.argmin(), raw.shape)
    assert pixels[brightest][0] == 255 and pixels[darkest][0] == 0


def test_palette_and_alpha_images_become_rgb(tmp_path):
    with Image.open(ASSETS / "ct_small_axial.png") as ct:
        ct.convert("RGB").quantize(16).save(tmp_path / "palette.png")
        rgba = ct.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))
    rgba.save(tmp_path / "transparent.png")
    palette = load_image(tmp_path / "palette.png", **WIDE)
    assert palette.mode == "RGB" and palette.size == (128, 128)
    transparent = load_image(tmp_path / "transparent.png", **WIDE)
    assert transparent.mode == "RGB" and np.asarray(transparent).max() == 0  # fully transparent -> black


@pytest.mark.parametrize(("size", "bounds"), [
    ((128, 128), (262_144, 4_194_304)),       # small CT slice scaled up to the paper's minimum
    ((4000, 3000), (262_144, 4_194_304)),     # large photo scaled down to the paper's maximum
    ((1000, 7), (50_000, 60_000)),            # extreme aspect ratio
    ((600, 600), (262_144, 4_194_304)),       # already inside: unchanged
])
def test_fit_size_keeps_pixels_in_bounds_and_aspect(size, bounds):
    width, height = fit_size(*size, *bounds)
    assert bounds[0] <= width * height <= bounds[1]
    assert math.isclose(width / height, size[0] / size[1], rel_tol=0.05 if min(size) > 10 else 0.2)
    if bounds[0] <= size[0] * size[1] <= bounds[1]:
        assert (width, height) == size


def test_load_image_resizes_a_real_radiograph_into_bounds():
    folder = BENCHMARKS / "vqa_rad" / "images"
    if not folder.is_dir():
        pytest.skip(f"shared VQA-RAD images not found at {folder}")
    path = sorted(folder.glob("*.jpg"))[0]
    with Image.open(path) as original:
        aspect = original.width / original.height
    small = load_image(path, min_pixels=16_384, max_pixels=65_536)
    assert 16_384 <= small.width * small.height <= 65_536 and abs(small.width / small.height - aspect) < 0.02
    big = load_image(ASSETS / "ct_small_axial.png", min_pixels=262_144, max_pixels=4_194_304)
    assert big.size == (512, 512) and big.mode == "RGB"


def test_pixel_bounds_are_checked():
    with pytest.raises(ConfigError, match="dataset.min_pixels=10 and dataset.max_pixels=5"):
        load_image(ASSETS / "ct_small_axial.png", min_pixels=10, max_pixels=5)


def test_ct_dicom_is_rescaled_and_windowed_to_8_bit():
    path = get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    image = load_image(path, min_pixels=1, max_pixels=10**9)
    assert image.mode == "RGB" and image.size == (128, 128)
    pixels = np.asarray(image)[..., 0].astype(int)
    assert np.corrcoef(pixels.ravel(), hounsfield.ravel())[0, 1] > 0.95  # monotone map of HU
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.array_equal(np.asarray(read_dicom(path)), np.asarray(Image.open(ASSETS / "ct_small_axial.png")))


def test_mr_dicom_uses_its_own_window():
    path = get_testdata_file("MR_small.dcm")
    dataset = pydicom.dcmread(path)
    center, width = float(dataset.WindowCenter), float(dataset.WindowWidth)
    grey = np.asarray(read_dicom(path))
    expected = to_uint8(dataset.pixel_array, center - width / 2, center + width / 2)
    assert np.array_equal(grey, expected)
    assert grey.dtype == np.uint8 and grey.shape == (64, 64)


def test_monochrome1_dicom_is_inverted(tmp_path):
    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    normal = np.asarray(read_dicom(get_testdata_file("MR_small.dcm"))).astype(int)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.save_as(tmp_path / "inverted.dcm")
    assert np.array_equal(np.asarray(read_dicom(tmp_path / "inverted.dcm")).astype(int), 255 - normal)


def test_dicom_without_suffix_is_detected_by_its_magic(tmp_path):
    copy = tmp_path / "scan_without_suffix"
    copy.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    assert load_image(copy, min_pixels=1, max_pixels=10**9).size == (128, 128)
    assert image_problem(copy) is None


def test_image_problem_reports_missing_and_unreadable_files(tmp_path):
    assert image_problem(ASSETS / "ct_small_axial.png") is None
    assert "does not exist" in image_problem(tmp_path / "nope.png")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 200)
    assert "not a readable image" in image_problem(tmp_path / "bad.dcm")
