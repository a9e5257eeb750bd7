"""BM25 over math-aware tokens: what :class:`sgsd.skills.bank.SkillBank` retrieves with.

:func:`math_tokenize` keeps math meaningful for a bag-of-words scorer (LaTeX commands,
numbers and operators are tokens; LaTeX commands also add the words they stand for, so
``\\binom`` in a problem meets "binomial" in a skill); :class:`BM25` scores token lists
with rank-bm25's Okapi scorer and an always-positive IDF.
"""

from __future__ import annotations

import math
import re

__all__ = ["BM25", "math_tokenize"]

_STOPWORDS = frozenset(
    """a an the and or of to in on at by for from with as is are was were be been being it
    its this that these those there their then than so such if when which what who whom
    whose how why where can could may might must shall should will would do does did not
    no nor but also into over under about after before between each every any all some
    one both either neither more most less least very just only own same other you your
    we our us i me my he she his her they them let find given suppose""".split()  # noqa: SIM905
)
# LaTeX commands that only format, never mean anything.
_LATEX_NOISE = frozenset(
    r"""\left \right \big \bigg \Big \Bigg \text \textbf \textit \mathrm \mathbf \mathit
    \mathcal \mathbb \operatorname \displaystyle \quad \qquad \dots \ldots \cdots \qquad
    \begin \end \hspace \vspace \limits \nolimits""".split()  # noqa: SIM905
)
# Aliases, then the words a command stands for (so LaTeX in problems meets prose in skills).
_LATEX_ALIAS = {
    r"\dfrac": r"\frac",
    r"\tfrac": r"\frac",
    r"\le": r"\leq",
    r"\ge": r"\geq",
    r"\ne": r"\neq",
    r"\leqslant": r"\leq",
    r"\geqslant": r"\geq",
    r"\bmod": r"\pmod",
    r"\mod": r"\pmod",
    r"\rfloor": r"\lfloor",
    r"\rceil": r"\lceil",
    r"\lvert": "|",
    r"\rvert": "|",
    r"\vert": "|",
    r"\mid": r"\mid",
    r"\over": r"\frac",
}
_LATEX_WORDS = {
    r"\frac": "fraction",
    r"\sqrt": "square root radical",
    r"\binom": "binomial choose",
    r"\pmod": "modulo modular remainder",
    r"\equiv": "congruent modular",
    r"\sin": "sine trigonometric",
    r"\cos": "cosine trigonometric",
    r"\tan": "tangent trigonometric",
    r"\cot": "trigonometric",
    r"\sec": "trigonometric",
    r"\csc": "trigonometric",
    r"\arcsin": "inverse trigonometric",
    r"\arccos": "inverse trigonometric",
    r"\arctan": "inverse trigonometric",
    r"\log": "logarithm",
    r"\ln": "logarithm natural",
    r"\exp": "exponential",
    r"\angle": "angle",
    r"\triangle": "triangle",
    r"\circ": "degree angle",
    r"\pi": "pi",
    r"\sum": "sum series",
    r"\prod": "product",
    r"\lfloor": "floor integer",
    r"\lceil": "ceiling integer",
    r"\gcd": "gcd greatest common divisor",
    r"\operatorname": "",
    r"\mid": "divides divisibility",
    r"\nmid": "divides divisibility",
    r"\infty": "infinity",
    r"\lim": "limit",
    r"\perp": "perpendicular",
    r"\parallel": "parallel",
    r"\overline": "segment",
    r"\overarc": "arc",
    r"\cdot": "product",
    r"\times": "product",
    r"\cup": "union set",
    r"\cap": "intersection set",
    r"\subseteq": "subset set",
    r"\emptyset": "empty set",
    r"\deg": "degree polynomial",
    r"\det": "determinant matrix",
    r"\vec": "vector",
    r"\sim": "similar",
    r"\cong": "congruent",
    r"\leq": "inequality",
    r"\geq": "inequality",
    r"\lt": "inequality",
    r"\gt": "inequality",
    r"\max": "maximum",
    r"\min": "minimum",
}
_KEEP_UPPER = frozenset({"gcd", "lcm", "mod", "am", "gm"})
_TOKEN_RE = re.compile(r"\\[A-Za-z]+|\d+(?:\.\d+)?|[A-Za-z]+|<=|>=|!=|[=<>+*/^!|%≤≥≠√π∑∏∞]")
_SYMBOL_WORDS = {
    "≤": "inequality",
    "≥": "inequality",
    "<": "inequality",
    ">": "inequality",
    "<=": "inequality",
    ">=": "inequality",
    "√": "square root",
    "π": "pi",
    "∑": "sum",
    "∏": "product",
    "!": "factorial",
    "%": "percent",
}


def _stem(word: str) -> str:
    # Light plural folding ("primes" ~ "prime", "parities" ~ "parity"); no full stemmer,
    # which would merge distinct math words ("root"/"routing", "mean"/"meaning").
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "ous")):
        return word[:-1]
    return word


def math_tokenize(text: str) -> list[str]:
    """Tokenise text for BM25, keeping math meaningful.

    * LaTeX commands are tokens (``\\frac``, ``\\binom``); aliases are folded
      (``\\dfrac`` -> ``\\frac``, ``\\le`` -> ``\\leq``) and formatting commands
      (``\\left``, ``\\text``...) dropped; each command also emits the words it denotes
      (``\\binom`` -> ``binomial``, ``choose``).
    * Numbers are tokens (``2024``, ``3.5``); so are operators ``= < > + * / ^ ! | %``
      (``!`` also emits ``factorial``); ``-`` is dropped (hyphen/dash/minus ambiguity).
    * Words are lower-cased, English stopwords dropped, plurals folded.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    out: list[str] = []
    for tok in _TOKEN_RE.findall(text):
        if tok.startswith("\\"):
            tok = _LATEX_ALIAS.get(tok, tok)
            if tok in _LATEX_NOISE:
                continue
            out.append(tok)
            out.extend(_stem(w) for w in _LATEX_WORDS.get(tok, "").split())
        elif tok[0].isalpha():
            # Point labels (AB, ABC, DEF) name things, they do not describe them.
            if tok.isupper() and len(tok) <= 4 and tok.lower() not in _KEEP_UPPER:
                continue
            word = tok.lower()
            if word not in _STOPWORDS and len(word) > 1:
                out.append(_stem(word))
        else:
            out.append(tok)
            out.extend(_SYMBOL_WORDS.get(tok, "").split())
    return out


class BM25:
    """BM25 (rank_bm25's Okapi scorer) with Lucene's non-negative IDF.

    rank_bm25's Okapi IDF goes negative for terms in more than half of the items and its
    floor is itself negative on banks of one or two items, which would make scores (and
    the max-normalisation above) meaningless on small or online-grown banks. Lucene's
    ``log(1 + (N - df + 0.5) / (df + 0.5))`` is always positive, so scores are >= 0 and an
    item scores 0 exactly when it shares no term with the query.
    """

    def __init__(self, docs: list[list[str]]):
        from rank_bm25 import BM25Okapi

        class _LuceneIdf(BM25Okapi):
            def _calc_idf(self, nd):
                n = self.corpus_size
                self.idf = {w: math.log(1.0 + (n - df + 0.5) / (df + 0.5)) for w, df in nd.items()}

        self.n = len(docs)
        # All-empty documents would make rank_bm25's average length 0 (division by zero).
        self._bm25 = _LuceneIdf(docs) if any(docs) else None

    def scores(self, query: list[str]) -> list[float]:
        # Each distinct query term counts once: problems repeat their nouns and small
        # numbers ("walk" x6, "2" x3), which would otherwise swamp the rarer terms that
        # say what kind of problem it is.
        query = list(dict.fromkeys(query))
        if self._bm25 is None or not query:
            return [0.0] * self.n
        return [float(s) for s in self._bm25.get_scores(query)]
