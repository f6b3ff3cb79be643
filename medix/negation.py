"""Negation scopes in clinical text, NegEx in miniature (pure string functions, no model).

A cue (`no`, `not`, `without`, ...) negates up to five words after it, a trailing cue (`ruled out`, `excluded`,
`absent`, `not seen`, a `no` that ends a clause, ...) up to three words before it, and no scope crosses a clause break
(`.`, `,`, `;`, `but`, `however`, ...). `negation_consistent` asks whether a prediction keeps a reference's polarity
(the rule judge); `denies` whether it names the reference only to deny it (the reward's degenerate guard).
"""

from __future__ import annotations

import re
import string

ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = str.maketrans({ch: " " for ch in string.punctuation})

# Words that negate the words after them ("no evidence of pneumonia", "not pneumonia", "without pneumonia").
NEGATION_CUES = frozenset({"no", "not", "without", "absence", "absent", "negative", "never", "neither", "nor", "non",
                           "deny", "denies", "denied", "excluding", "lacks", "lacking", "nothing"})
# Words that negate the words before them ("pneumonia is ruled out", "pneumonia was excluded", "... is absent").
TRAILING_CUES = frozenset({"excluded", "absent", "unlikely", "rejected", "dismissed", "discarded", "refuted",
                           "disproved", "disproven"})
# "<x> is not seen": a `not` negates the words before it only with one of these after it ("x and not y" denies y).
NOT_FOLLOWERS = frozenset({"present", "seen", "identified", "visualized", "visualised", "visible", "detected",
                           "found", "evident", "observed", "noted", "demonstrated", "appreciated", "shown"})
# Cues that do not negate: "not only x", "no change in x", "no doubt x".
PSEUDO_NEGATIONS = {"not": frozenset({"only", "just", "necessarily"}), "no": frozenset({"change", "doubt"})}
# A trailing cue right after one of these keeps x possible: "x cannot be excluded", "x not ruled out".
DOUBLE_NEGATION = frozenset({"not", "cannot", "never"})
CUE_WORDS = NEGATION_CUES | TRAILING_CUES | {"ruled", "out"}
SCOPE_AFTER_CUE, SCOPE_BEFORE_CUE = 5, 3
_CLAUSE_BREAK = re.compile(r"[.;,!?\n()\[\]]+|\b(?:but|however|although|though|whereas|except)\b")
# Compounds that are one word, not a negation: "non-caseating", "Gram-negative", "antigen-negative".
_COMPOUND = re.compile(r"\b(non)[-\s](?=\w)|(?<=\w)-(negative|positive)\b", re.IGNORECASE)
_CONTRACTIONS = ((re.compile(r"\bcan['’]t\b"), "cannot"), (re.compile(r"\bwon['’]t\b"), "will not"),
                 (re.compile(r"n['’]t\b"), " not"))
# Phrases read as a cue: "free of x", "y rather than x", "y instead of x", "argues against x" negate x; "x cannot be
# seen" reads "x not seen" (and "x cannot be excluded" stays "x not excluded", which keeps x possible).
_CUE_PHRASES = ((re.compile(r"\b(?:free\s+of|rather\s+than|instead\s+of|(?:argues|argue|speaks|speak|points|point)"
                            r"\s+against)\b"), "no"),
                (re.compile(r"\bcan\s*not\s+be\b"), "not"))


def fold_compounds(text: str) -> str:
    """`non-caseating` → `noncaseating`, `Gram-negative` → `Gramnegative`: a compound is one word, not a cue."""
    return _COMPOUND.sub(lambda m: m.group(1) or m.group(2), text)


def _expand(text: str) -> str:
    text = text.lower()
    for pattern, replacement in _CONTRACTIONS + _CUE_PHRASES:
        text = pattern.sub(replacement, text)
    return text


def _word_list(text: str) -> list[str]:
    return [w for w in re.split(r"\s+", text.translate(_PUNCTUATION)) if w and w not in ARTICLES]


def normalized_words(text: str) -> frozenset[str]:
    """Lowercased words of `text` with punctuation and the articles a/an/the removed (`isn't` reads `is not`)."""
    return frozenset(_word_list(_expand(text)))


def scoped_clauses(text: str) -> list[list[tuple[str, bool]]]:
    """The normalised words of each clause of `text`, each with True when a negation cue's scope covers it."""
    clauses = []
    for part in _CLAUSE_BREAK.split(_expand(text)):
        words = _word_list(part or "")
        negated = [False] * len(words)
        for i, word in enumerate(words):
            after = words[i + 1] if i + 1 < len(words) else ""
            if word in NEGATION_CUES and after not in PSEUDO_NEGATIONS.get(word, ()):
                for j in range(i + 1, min(len(words), i + 1 + SCOPE_AFTER_CUE)):
                    negated[j] = True
            trailing = word in TRAILING_CUES or (word == "ruled" and after == "out") or (
                word == "not" and after in NOT_FOLLOWERS) or (word == "no" and i == len(words) - 1 and i > 0)
            if trailing and not DOUBLE_NEGATION & set(words[max(0, i - 2):i]):
                for j in range(max(0, i - SCOPE_BEFORE_CUE), i):
                    negated[j] = True
        if words:
            clauses.append(list(zip(words, negated)))
    return clauses


def _content(clause: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    return [(w, neg) for w, neg in clause if w not in CUE_WORDS]


def _find(sequence: list[str], words: list[str]) -> list[int]:
    n = len(sequence)
    return [i for i in range(len(words) - n + 1) if words[i:i + n] == sequence]


def negation_consistent(prediction: str, reference: str) -> bool:
    """True unless the prediction denies what the reference states (or states what the reference denies).

    Every content word of the reference (its words other than the negation cues) must occur in the prediction at least
    once with the reference's polarity, and no reference clause may occur in the prediction with the other polarity
    (`pneumonia, but not pneumonia` is a contradiction, not a match). A reference made only of cues (`no`) passes.
    """
    ref_clauses = [c for c in (_content(c) for c in scoped_clauses(reference)) if c]
    if not ref_clauses:
        return True
    pred_clauses = [_content(c) for c in scoped_clauses(prediction)]
    seen: dict[str, set[bool]] = {}
    for clause in pred_clauses:
        for word, negated in clause:
            seen.setdefault(word, set()).add(negated)
    if any(negated not in seen.get(word, ()) for clause in ref_clauses for word, negated in clause):
        return False
    for ref in ref_clauses:
        phrase = [w for w, _ in ref]
        for pred in pred_clauses:
            for start in _find(phrase, [w for w, _ in pred]):
                if any(p != r for (_, p), (_, r) in zip(pred[start:start + len(ref)], ref)):
                    return False
    return True


def denies(prediction: str, reference: str, min_letters: int = 4) -> bool:
    """True when the prediction names a word of the reference (of `min_letters` or more) only with the other
    polarity: `no evidence of pneumothorax`, `pneumothorax is ruled out` against `pneumothorax`; `fracture` against
    `no fracture` when the prediction negates nothing (a negative reference answered in other words, `all deep veins
    compressible; DVT excluded` for `no deep vein thrombosis`, denies nothing). A paraphrase that shares no such word
    (`high blood pressure` for `hypertension`) denies nothing, and a compound is one word (`non-caseating`,
    `Gram-negative`, `antigen-negative` negate nothing)."""
    prediction, reference = fold_compounds(prediction), fold_compounds(reference)
    polarity: dict[str, set[bool]] = {}
    for clause in scoped_clauses(prediction):
        for word, negated in _content(clause):
            polarity.setdefault(word, set()).add(negated)
    negates_something = any(True in seen for seen in polarity.values())
    return any(word in polarity and negated not in polarity[word] and not (negated and negates_something)
               for clause in scoped_clauses(reference) for word, negated in _content(clause)
               if len(word) >= min_letters)
