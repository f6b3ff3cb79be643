"""The 16 MediX-R1 modality tags and parsing of the paper's "<TAG> answer" ground-truth format."""

MODALITY_TAGS = (
    "X_RAY", "MICROSCOPY", "CLINICAL_PHOTOGRAPHY", "CT_SCAN", "GRAPHICS", "ANGIOGRAPHY", "PET_SCAN", "ULTRASOUND",
    "MRI_SCAN", "FUNDUS_PHOTOGRAPHY", "OCT_SCAN", "ENDOSCOPY", "MAMMOGRAPHY", "FLUOROSCOPY", "OTHER", "SPECT",
)
BRACKETED_TAGS = tuple(f"<{name}>" for name in MODALITY_TAGS)
_BY_UPPER = {tag.upper(): tag for tag in BRACKETED_TAGS}


def tag_list_text() -> str:
    """All 16 tags as '<X_RAY>, <MICROSCOPY>, ...' for prompts and error messages."""
    return ", ".join(BRACKETED_TAGS)


def canonical_tag(text: str) -> str | None:
    """'<x_ray>' or 'X_RAY' -> '<X_RAY>'; None when it is not one of the 16 tags."""
    name = text.strip().strip("<>").strip().upper()
    return _BY_UPPER.get(f"<{name}>")


def split_solution(solution: str) -> tuple[str, str]:
    """'<X_RAY> Pneumothorax.' -> ('<X_RAY>', 'Pneumothorax'). The tag is returned in canonical upper case."""
    expected = f"expected a '<TAG> ' prefix, one of {tag_list_text()}"
    text = solution.lstrip()
    end = text.find(">")
    if not text.startswith("<") or end < 0:
        raise ValueError(f"solution {solution!r} has no modality tag; {expected}")
    tag = canonical_tag(text[: end + 1])
    if tag is None:
        raise ValueError(f"solution {solution!r} starts with unknown tag {text[: end + 1]!r}; {expected}")
    answer = text[end + 1 :].strip().strip(".").strip()
    if not answer:
        raise ValueError(f"solution {solution!r} has a tag but no answer after it; expected '{tag} <answer>'")
    return tag, answer
