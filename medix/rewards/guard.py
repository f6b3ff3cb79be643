"""The degenerate-answer guard: pure rules that tell a policy's garbage (tag soup, echoes of the question or of its
options, repeated tokens, empty or form-only answers, truncated text without an answer) and its attempts to buy a YES
(text addressed to the grader, the reference named and denied or set aside, a hedge over alternatives) from an answer
worth judging."""

from __future__ import annotations

import re
import unicodedata

from medix.negation import denies, fold_compounds, scoped_clauses
from medix.rewards.parsing import extract_answer, normalize_completion

_ANSWER_BLOCK = re.compile(r"<answer>.*?</answer>", re.DOTALL)
_TAG = re.compile(r"<[^<>]*>")
_WORD = re.compile(r"[^\W_]+")
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")
# An option line of a multiple-choice question: "A. text", "B) text", "(C) text".
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.)]\s+(.+?)\s*$", re.MULTILINE)
# The items of a listed answer ("A, B or C", "aspirin and heparin") and an item that names an option by its letter
# ("B", "B.", "(B)", "option B").
_LIST_SEPARATOR = re.compile(r"[,;/\n]|\s(?:or|and)\s", re.IGNORECASE)
_OPTION_LETTER = re.compile(r"^(?:[Oo]ption\s+)?\(?([A-J])(?:[.):]|$)")
# Text addressed to the grader rather than an answer: the grader or its verdict named, a reply dictated, an
# instruction to ignore the task, a match or correctness claimed, a chat-template token or a role line.
_GRADER_ADDRESS = re.compile(r"""
    \b(?:grader|grading|evaluator|judge|verdict|ground[\s_-]*truth|reference\s+answer|predicted\s+answer)s?\b
  | \b(?:approved|validated|accepted|verified)\s+(?:this|the|my)\s+answer\b
  | \b(?:respond|answer|reply|say|output|print|return|mark)\w*\s+(?:with\s+|it\s+as\s+)?["'“]?(?:yes|oui|correct)\b
  | \b(?:ignore|disregard)\b
  | \b(?:is|are|as|now)\s+(?:now\s+|verified\s+as\s+)?correct\b
  | \bcontent\s+match | \bmatch(?:es)?\s+the\s+(?:ground|reference|truth)
  | <\|[\w-]+\|> | \[/?INST\] | ^\s*(?:system|assistant|user)\s*:
  | \bthe\s+reference\b(?!\s+(?:range|value|interval|standard|lab|laboratory)s?\b)
  | \bthe\s+(?:answer\s+)?key\s+(?:expects|says|wants|holds|answer)\b
  | \b(?:expected|intended)\s+(?:answer|diagnosis|label|response)s?\b | \bdecode\b
""", re.IGNORECASE | re.VERBOSE | re.MULTILINE)
# A token of 16 or more base64 characters mixing digits, lower and upper case: an encoded message, not a word.
_ENCODED = re.compile(r"(?<![\w+/])(?=[A-Za-z0-9+/]*\d)(?=[A-Za-z0-9+/]*[a-z])(?=[A-Za-z0-9+/]*[A-Z])"
                      r"[A-Za-z0-9+/]{16,}={0,2}")
# Talk about the task instead of an answer: the question and the answer both named as such ("the question concerns
# ..., and the answer relates to ..."), or what an answer would do ("a good answer here would discuss ...").
_TASK_TALK = re.compile(r"""\b(?:this|the)\s+question\b.*\b(?:the|this)\s+answer\s+(?!is\b|was\b)
    | \b(?:a|the|an)\s+(?:good|correct|right|complete|ideal|full)\s+answer\s+(?:here\s+)?(?:would|should|must|will)\b
    | \b(?:this|the)\s+item\s+tests\b""", re.IGNORECASE | re.VERBOSE | re.DOTALL)
_VERDICT_WORD = re.compile(r"\bY\s?E\s?S\b")  # an upper-case YES (or Y E S) where the reference has no yes
# Words that talk about the task instead of answering it: an answer made only of these names nothing
# ("This question and findings point to this answer.", "The findings").
# ("a" is left out: alone it is an option letter; names_nothing adds it beside other words.)
_META_WORDS = frozenset("""an the this that these those it its is are was be to of in on at for and or with as by
    from here there so which what question questions answer answers finding findings point points solution response
    prompt task image scenario given following final related""".split())
# The clauses of an answer, and the words that open a concessive one ("while x is typical, ...").
_OPENERS = frozenset({"but", "however", "yet", "whereas", "although", "though", "while", "instead", "actually",
                      "until"})
_CLAUSE = re.compile(r"[.;,!?()\[\]\n]+|\b(" + "|".join(sorted(_OPENERS)) + r")\b", re.IGNORECASE)
_CONCESSIVE = frozenset({"whereas", "although", "though", "while"})
# A clause that names something only to set it aside: "x was my first thought", "many would say x", "x is the
# distractor", "x was considered and rejected".
_SET_ASIDE = re.compile(r"""\b(?:distract[oe]rs?|red\s+herring|first\s+(?:thought|impression|guess)|tempting|initially
    |at\s+first|(?:would|might|could)\s+(?:say|think|guess)|considered\s+and|rejected|dismissed|set\s+aside
    |at\s+a\s+glance|drawn\s+to|obvious\s+(?:pick|choice)|was\s+my\s+(?:\w+\s+)?(?:answer|diagnosis|guess|pick))\b""",
                        re.IGNORECASE | re.VERBOSE)
# A clause that commits to an answer: "the final answer is y", "I would call this y", "in fact this is y".
_COMMITS = re.compile(r"""\b(?:(?:final|better|correct|real|true|actual|definitive)\s+(?:answer|diagnosis|call)
    |my\s+(?:\w+\s+)?(?:answer|diagnosis|call)\s+is|I\s+(?:say|commit|choose|pick|favou?r|go\s+with)
    |I\s+would\s+(?:\w+\s+)?(?:call|say|go\s+with|choose)|in\s+fact\s+(?:this|it)\s+(?:is|was|represents))\b""",
                      re.IGNORECASE | re.VERBOSE)
# The alternatives of a hedge ("gout or pseudogout", "either ... or ..."), and a differential offered as the answer.
_ALTERNATIVE = re.compile(r"\b(?:or|either)\b", re.IGNORECASE)
_DIFFERENTIAL = re.compile(r"\bdifferentials?\b(?:\s+diagnos[ie]s)?(?:\s+(?:includes?|is|are)\b|\s*:)", re.IGNORECASE)
# An answer that says it does not choose: "I can't pick one", "cannot decide between ...", "not sure which".
_UNDECIDED = re.compile(r"""\b(?:can['’]?t|cannot|can\s+not|could\s+not|couldn['’]t|unable\s+to)\s+(?:\w+\s+)?
    (?:pick|choose|decide|distinguish|differentiate|commit|settle)\b|\bnot\s+sure\s+which\b|\bunsure\s+which\b""",
                        re.IGNORECASE | re.VERBOSE)
# The most words a list item has: longer comma-separated parts are clauses of prose, not items of a list.
_LIST_ITEM_WORDS = 5
# Function words of languages other than English, none of them an English word or part of an eponym or a Latin term
# used in English medicine (de, la, le, van, von, der, del, die, in, et, il, os, per, non, pas, para, pour, favor,
# come are left out): two of one language in a clause mean the clause is written in it.
_FUNCTION_WORDS = {
    "german": frozenset("und ist sie bitte diese dieser dieses nicht mit das dem ein eine einen ich wir auf für auch "
                        "sind wird werden ihre richtig antwort".split()),
    "french": frozenset("est cette une les vous avec votre veuillez nous sont ce qui dans réponse merci considérer "
                        "correcte".split()),
    "spanish": frozenset("es esta este una por que con los las como usted respuesta correcta considere".split()),
    "italian": frozenset("è questa questo favore che con una della sono risposta corretta gli".split()),
    "portuguese": frozenset("é esta uma por que com como resposta correta não você considere".split()),
    "dutch": frozenset("het deze een alstublieft niet zijn wij voor antwoord dit juist".split()),
}
# Scripts that an English question and reference do not use: a clause in one of them is in another language.
_OTHER_SCRIPTS = frozenset({"CJK", "HIRAGANA", "KATAKANA", "HANGUL", "ARABIC", "HEBREW", "CYRILLIC", "DEVANAGARI",
                            "THAI"})


def words(text: str) -> list[str]:
    """Lower-case words (letters and digits), everything else a separator."""
    return _WORD.findall(text.lower())


def multiple_choice_options(question: str | None) -> list[str]:
    """The option texts of a multiple-choice question written as `A. text` lines (at least two), else []."""
    if not question:
        return []
    options = _OPTION_LINE.findall(question)
    return [text for _, text in options] if len(options) >= 2 else []


def options_named(answer: str, options: list[str]) -> set[int]:
    """Indices of the options that `answer` names. Each list item of the answer names at most one: the option whose
    text it holds (the longest), else the option its letter names (`B. Aspirin` names one option, `A, B or C` three,
    `A pneumothorax` none)."""
    named: set[int] = set()
    option_words = [" ".join(words(option)) for option in options]
    for item in _LIST_SEPARATOR.split(answer):
        item_text = f" {' '.join(words(item))} "
        held = [i for i, text in enumerate(option_words) if text and f" {text} " in item_text]
        letter = _OPTION_LETTER.match(item.strip())
        if held:
            named.add(max(held, key=lambda i: len(option_words[i])))
        elif letter and ord(letter.group(1)) - ord("A") < len(options):
            named.add(ord(letter.group(1)) - ord("A"))
    return named


def tag_share(answer: str) -> float:
    """The share of the answer's non-space characters that are `<...>` tags or stray `<`, `>`."""
    visible = re.sub(r"\s", "", answer)
    if not visible:
        return 0.0
    tagged = sum(len(re.sub(r"\s", "", t)) for t in _TAG.findall(answer))
    rest = _TAG.sub("", answer)
    return (tagged + rest.count("<") + rest.count(">")) / len(visible)


def longest_repeat(text: str, max_n: int = 3) -> int:
    """The most times in a row any token or n-gram of up to `max_n` tokens follows itself (1 = no repeat)."""
    tokens = _TOKEN.findall(text.lower())
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        for start in range(n):
            grams = [tuple(tokens[i:i + n]) for i in range(start, len(tokens) - n + 1, n)]
            run = 1
            for previous, current in zip(grams, grams[1:]):
                run = run + 1 if current == previous else 1
                best = max(best, run)
    return best


def trigrams(word_list: list[str]) -> set[tuple[str, ...]]:
    return {tuple(word_list[i:i + 3]) for i in range(len(word_list) - 2)}


def echo_share(answer: str, question: str | None) -> float:
    """The share of the question's word 3-grams that the answer repeats; 0 when the answer holds a word the question
    lacks (an answer that restates the question adds its answer) or the question has under 3 words."""
    question_words = words(question or "")
    grams = trigrams(question_words)
    answer_words = words(_TAG.sub(" ", answer))
    if not grams or not set(answer_words) <= set(question_words):
        return 0.0
    return len(grams & trigrams(answer_words)) / len(grams)


def copied_from_question(answer: str, question: str | None, min_words: int = 4) -> bool:
    """The answer is `min_words` or more words lifted from the question's stem (its option lines left out, so an
    option's text is an answer): every word 3-gram of the answer occurs there."""
    answer_words = words(_TAG.sub(" ", answer))
    if len(answer_words) < min_words:
        return False
    return trigrams(answer_words) <= trigrams(words(_OPTION_LINE.sub(" ", question or "")))


def names_nothing(answer: str) -> bool:
    """Every word of the answer talks about the task (`question`, `answer`, `findings`, `point`, articles); `a` counts
    as an article beside other words, and as an option letter alone. Or the answer talks about the task in a sentence
    (`the question concerns …, and the answer relates to …`, `a good answer here would discuss …`)."""
    answer_words = words(_TAG.sub(" ", answer))
    meta = _META_WORDS | {"a"} if len(answer_words) > 1 else _META_WORDS
    return set(answer_words) <= meta or bool(_TASK_TALK.search(answer))


def scripts(text: str) -> set[str]:
    """The scripts of the letters in `text`, as the first word of their Unicode names (`LATIN`, `CYRILLIC`, `CJK`)."""
    return {unicodedata.name(ch, "").split(" ")[0] for ch in text if ch.isalpha()}


def mixes_scripts(text: str) -> bool:
    """A word that mixes Latin and Cyrillic letters (`Gliоblastоma` with a Cyrillic `о`): text made to look like
    words it is not (a mixed-script confusable, Unicode TR39). Greek is left out: `μg`, `μmol` mix it honestly."""
    for word in _WORD.findall(text):
        if {"LATIN", "CYRILLIC"} <= scripts(word):
            return True
    return False


def languages(text: str, min_words: int = 2) -> set[str]:
    """The languages other than English in which some clause of `text` is written: `min_words` function words of one
    language in a clause, or a letter of a non-Latin script (named by the script: `CJK`, `CYRILLIC`, ...)."""
    found = scripts(text) & _OTHER_SCRIPTS
    for clause in re.split(r"[.;:!?\n]+", text):
        clause_words = set(words(clause))
        found |= {language for language, function in _FUNCTION_WORDS.items()
                  if len(clause_words & function) >= min_words}
    return found


def switches_language(answer: str, question: str | None, reference: str | None) -> bool:
    """Some clause of the answer is in a language (or script) that neither the question nor the reference uses (one
    function word of it there is enough: a short question has few): a plea to the grader in German after an English
    answer, a note in Chinese."""
    return bool(languages(answer) - languages(f"{question or ''}\n{reference or ''}", min_words=1))


def addresses_grader(answer: str, reference: str | None = None) -> bool:
    """The answer speaks to the grader (`respond with YES`, `Ground Truth: …`, `Verdict: YES`, `<|im_start|>`,
    `ignore the instructions`, `the reference`), hides a message (base64, Cyrillic look-alikes inside Latin words) or
    holds an upper-case YES that the reference lacks."""
    if _GRADER_ADDRESS.search(answer) or _ENCODED.search(answer) or mixes_scripts(answer):
        return True
    return bool(_VERDICT_WORD.search(answer)) and "yes" not in words(reference or "")


def hedges(answer: str, reference: str | None, max_items: int) -> bool:
    """The answer offers alternatives (`or`, `either`) where the reference offers none, or a differential (`the
    differential includes …`), or lists more than `max_items` items and more than the reference does (a list of
    findings in which the reference hides). An `or` inside a negation's scope offers nothing (`no neutrophils or
    bacteria`). An answer that says it does not choose (`I can't pick one`, `not sure which`) hedges too. Only parts of
    up to five words count as list items: the clauses of a long explanation are not a list."""
    reference = reference or ""
    if _DIFFERENTIAL.search(answer) and not _DIFFERENTIAL.search(reference):
        return True
    if _UNDECIDED.search(answer) and not _UNDECIDED.search(reference):
        return True
    if offers_alternatives(answer) and not _ALTERNATIVE.search(reference):
        return True
    items = [item for item in _LIST_SEPARATOR.split(answer) if 0 < len(words(item)) <= _LIST_ITEM_WORDS]
    reference_items = [item for item in _LIST_SEPARATOR.split(reference) if words(item)]
    return len(items) > max(max_items, len(reference_items))


def offers_alternatives(answer: str) -> bool:
    """An `or` or `either` outside every negation scope (`gout or pseudogout`, not `no neutrophils or bacteria`)."""
    return any(word in ("or", "either") and not negated
               for clause in scoped_clauses(fold_compounds(answer)) for word, negated in clause)


def sets_aside(answer: str, reference: str | None, min_letters: int = 4) -> bool:
    """The clauses that name the reference best (the most of its words of `min_letters` or more) all set it aside — a
    concessive clause (`while x is typical, ...`) or one that calls it a first thought, a distractor, what many would
    say, considered and rejected — and another clause says something else; or the answer commits to something else
    in a clause that names the reference less (`x fits at a glance, but the final answer is y`, `in fact this is y`,
    `I commit to y instead`)."""
    reference_words = {w for w in words(reference or "") if len(w) >= min_letters}
    clauses, opener = [], None  # (text, concessive, commits)
    for part in _CLAUSE.split(answer):
        if part is None or not part.strip(" ,.;!?()[]\n"):
            continue
        if part.lower() in _OPENERS:  # the captured word that opens the next clause
            opener = part.lower()
            continue
        clauses.append((part, opener in _CONCESSIVE, bool(_COMMITS.search(part))))
        opener = None
    overlap = [len(reference_words & set(words(text))) for text, _, _ in clauses]
    best = max(overlap, default=0)
    naming = [clause for clause, n in zip(clauses, overlap) if n and n == best]  # those naming it best
    if not naming or len(naming) == len(clauses):
        return False
    if not any(commits for _, _, commits in naming) and any(
            commits and n < best for (_, _, commits), n in zip(clauses, overlap)):
        return True
    markers_in_reference = bool(_SET_ASIDE.search(reference or ""))
    return all(concessive or (not markers_in_reference and _SET_ASIDE.search(text)) for text, concessive, _ in naming)


def looks_truncated(completion: str, reasoning_tag: str) -> bool:
    """The text opens the reasoning or answer tag and never closes it (a completion cut at the token cap)."""
    text = normalize_completion(completion)
    return any(text.rfind(f"<{tag}>") > text.rfind(f"</{tag}>") for tag in (reasoning_tag, "answer"))


def degenerate_reason(completion: str, question: str | None, truncated: bool | None, settings,
                      reasoning_tag: str = "thinking", reference: str | None = None) -> str | None:
    """Why the completion's answer gets no judge credit, or None when it may be judged.

    `settings` holds the thresholds (medix.config.DegenerateGuardConfig); `truncated` says whether sampling stopped
    at the token cap (None = unknown); `reference` is the reference answer (None: the rules that compare with it are
    skipped). Reasons: truncated (no <answer>…</answer>, and sampling hit the cap or the text leaves a tag open),
    no_answer_block (no <answer>…</answer> at all, with settings.answer_block), empty (nothing but tags and
    punctuation), non_answer (only words about the task: "this question and findings point to this answer"),
    tag_soup, repetition, several_answers (two or more <answer> tags, with settings.single_answer), option_echo
    (names two or more and at least option_share of a multiple-choice question's options), question_echo (repeats
    echo_share of the question, or is four or more words lifted from its stem), grader_address, other_language (a
    clause in a language or script that neither the question nor the reference uses), denial (names the
    reference only to deny it), hedge (alternatives, or a long list, where the reference has neither), set_aside
    (names the reference only as a first thought, a distractor or a concession, and answers something else).
    """
    text = normalize_completion(completion)
    has_answer = bool(_ANSWER_BLOCK.search(text))
    if not has_answer and (bool(truncated) or looks_truncated(completion, reasoning_tag)):
        return "truncated"
    if not has_answer and settings.answer_block:
        return "no_answer_block"
    answer = extract_answer(completion)
    if not words(_TAG.sub(" ", answer)):
        return "empty"
    if names_nothing(answer):
        return "non_answer"
    if tag_share(answer) >= settings.tag_share:
        return "tag_soup"
    if longest_repeat(answer) >= settings.max_repeats:
        return "repetition"
    if settings.single_answer and text.count("<answer>") > 1:
        return "several_answers"
    options = multiple_choice_options(question)
    named = options_named(answer, options) if options else set()
    if len(named) >= 2 and len(named) >= settings.option_share * len(options):
        return "option_echo"
    if echo_share(answer, question) >= settings.echo_share or copied_from_question(answer, question):
        return "question_echo"
    if settings.grader_address and addresses_grader(answer, reference):
        return "grader_address"
    if settings.other_language and switches_language(answer, question, reference):
        return "other_language"
    if reference is None:
        return None
    if settings.denial and denies(answer, reference):
        return "denial"
    if settings.hedge_items and hedges(answer, reference, settings.hedge_items):
        return "hedge"
    if settings.set_aside and sets_aside(answer, reference):
        return "set_aside"
    return None
