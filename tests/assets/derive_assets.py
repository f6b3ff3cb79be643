"""Rebuilds the small test images here from pydicom's bundled CT/MR test files: `PYTHONPATH=. python tests/assets/derive_assets.py`."""

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from medix.data.images import read_dicom

HERE = Path(__file__).parent

if __name__ == "__main__":
    read_dicom(get_testdata_file("CT_small.dcm")).save(HERE / "ct_small_axial.png")  # 8-bit greyscale, 128x128
    raw = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.uint16)
    Image.fromarray(raw).save(HERE / "mr_small_16bit.png")  # raw 16-bit greyscale, 64x64
