"""The 16 modality tags and split_solution on the paper's '<TAG> answer' ground truth."""

import pytest

from medix.data.tags import BRACKETED_TAGS, MODALITY_TAGS, canonical_tag, split_solution


def test_sixteen_tags_in_contract_order():
    assert len(MODALITY_TAGS) == 16 == len(set(MODALITY_TAGS))
    assert MODALITY_TAGS[0] == "X_RAY" and MODALITY_TAGS[3] == "CT_SCAN" and MODALITY_TAGS[-1] == "SPECT"
    assert BRACKETED_TAGS[8] == "<MRI_SCAN>"


@pytest.mark.parametrize(("solution", "expected"), [
    ("<X_RAY> Pneumothorax", ("<X_RAY>", "Pneumothorax")),
    ("<ct_scan>  Epidural hematoma. ", ("<CT_SCAN>", "Epidural hematoma")),
    ("  <MICROSCOPY>...Reed-Sternberg cells...", ("<MICROSCOPY>", "Reed-Sternberg cells")),
    ("<OTHER> yes", ("<OTHER>", "yes")),
    ("<SPECT> 3.5 cm", ("<SPECT>", "3.5 cm")),
    ("<MRI_SCAN> a > b", ("<MRI_SCAN>", "a > b")),
])
def test_split_solution(solution, expected):
    assert split_solution(solution) == expected


@pytest.mark.parametrize(("solution", "says"), [
    ("Pneumothorax", "has no modality tag"),
    ("<XRAY> Pneumothorax", "unknown tag '<XRAY>'"),
    ("X_RAY> Pneumothorax", "has no modality tag"),
    ("<X_RAY", "has no modality tag"),
])
def test_split_solution_rejects_missing_or_unknown_tag(solution, says):
    with pytest.raises(ValueError) as caught:
        split_solution(solution)
    assert says in str(caught.value)
    assert "expected a '<TAG> ' prefix, one of <X_RAY>, <MICROSCOPY>," in str(caught.value)
    assert "<SPECT>" in str(caught.value)


def test_split_solution_rejects_tag_without_answer():
    with pytest.raises(ValueError, match=r"no answer after it; expected '<CT_SCAN> <answer>'"):
        split_solution("<CT_SCAN> . ")


def test_canonical_tag():
    assert canonical_tag("<fundus_photography>") == "<FUNDUS_PHOTOGRAPHY>"
    assert canonical_tag("PET_SCAN") == "<PET_SCAN>"
    assert canonical_tag("<PET>") is None
