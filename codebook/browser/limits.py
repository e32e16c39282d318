"""What one browser request may ask for: the caps (``MAX_*``, a larger value answers 400 and
names the cap), the regex scan's budget and the model's wait, gathered in ``Limits``; and user
regexes checked before they run (length-capped, refused if they can backtrack exponentially: a
quantifier over a quantifier or over overlapping alternatives).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from codebook.errors import ConfigError

# Caps on what one request may ask for (a larger value answers 400 and names the cap).
MAX_TOP = 1000  # rows of a code search
MAX_CONTEXTS = 200  # contexts of one code (n), examples on a code page
MAX_BINS = 200  # usage histogram bins
MAX_QUERY_CHARS = 500  # a token query or a regex pattern, in characters
MAX_PROMPT_CHARS = 4000  # steering prompt, in characters
MAX_NEW_TOKENS = 200  # steering generation length
MAX_STEER_CODES = 32  # codes forced in one steering request
MAX_BODY_BYTES = 64 * 1024  # a request body (the steering JSON)
# Budget of one regex scan over the store; past it the scan stops and the result is partial.
REGEX_SECONDS = 10.0  # wall clock, checked before each document
REGEX_MAX_CHARS = 20_000_000  # document text matched in all
REGEX_MAX_DOC_CHARS = 200_000  # longer documents are skipped (one match call cannot be stopped)
# How long a steering request waits for the model while other requests use it.
MODEL_WAIT_SECONDS = 120.0


@dataclass(frozen=True)
class Limits:
    """The caps and budgets of one app; the defaults are the module constants."""

    max_top: int = MAX_TOP
    max_contexts: int = MAX_CONTEXTS
    max_bins: int = MAX_BINS
    max_query_chars: int = MAX_QUERY_CHARS
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_new_tokens: int = MAX_NEW_TOKENS
    max_steer_codes: int = MAX_STEER_CODES
    max_body_bytes: int = MAX_BODY_BYTES
    regex_seconds: float = REGEX_SECONDS
    regex_max_chars: int = REGEX_MAX_CHARS
    regex_max_doc_chars: int = REGEX_MAX_DOC_CHARS
    model_wait_seconds: float = MODEL_WAIT_SECONDS


def check_regex(pattern: str, max_chars: int = MAX_QUERY_CHARS) -> re.Pattern[str]:
    """``pattern`` compiled, if it is short enough and cannot backtrack exponentially."""
    from codebook.analysis.features import RegexFeature

    if len(pattern) > max_chars:
        raise ConfigError("regex", f"the pattern has {len(pattern)} characters, the cap is "
                          f"{max_chars}", "search with a shorter pattern")
    compiled = RegexFeature("query", pattern).compiled()  # "invalid regex ..." if broken
    import re._parser as sre_parse  # the parser re itself uses (Python >= 3.11)

    problem = _backtracking_risk(list(sre_parse.parse(pattern)), in_repeat=False)
    if problem:
        raise ConfigError("regex", f"{pattern!r} has {problem}, which can take exponential "
                          "time on some texts", "drop the inner quantifier, use a character "
                          "class, or make it possessive/atomic (a++, (?>...))")
    return compiled


def _backtracking_risk(items: list, in_repeat: bool) -> str | None:
    """What in a parsed pattern can backtrack exponentially: a variable quantifier or an
    ambiguous alternation inside a backtracking quantifier that repeats (star height > 1)."""
    from re import _constants as c

    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT):
            low, high, body = av
            if in_repeat and low != high:
                return "a quantifier inside a repeated group"
            found = _backtracking_risk(list(body), in_repeat or high > 1)
        elif op in (c.POSSESSIVE_REPEAT, c.ATOMIC_GROUP):  # never gives back: a fresh start
            found = _backtracking_risk(list(av[2] if op == c.POSSESSIVE_REPEAT else av), False)
        elif op == c.SUBPATTERN:
            found = _backtracking_risk(list(av[3]), in_repeat)
        elif op == c.BRANCH:
            branches = [list(b) for b in av[1]]
            if in_repeat and not _disjoint_starts(branches):
                return "alternatives that can match the same text inside a repeated group"
            found = next((r for b in branches if (r := _backtracking_risk(b, in_repeat))), None)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            found = _backtracking_risk(list(av[1]), in_repeat)
        elif op == c.GROUPREF_EXISTS:
            found = next((r for b in av[1:] if b is not None
                          and (r := _backtracking_risk(list(b), in_repeat))), None)
        else:
            found = None
        if found:
            return found
    return None


def _disjoint_starts(branches: list[list]) -> bool:
    """Whether every alternative starts with a literal character no other one starts with."""
    from re import _constants as c

    seen: set[str] = set()
    for branch in branches:
        while branch and branch[0][0] == c.SUBPATTERN:
            branch = list(branch[0][1][3])
        if not branch or branch[0][0] != c.LITERAL:
            return False
        first = chr(branch[0][1]).lower()  # case-blind: (?i) may be on
        if first in seen:
            return False
        seen.add(first)
    return True
