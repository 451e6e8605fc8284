"""ROUGE-L F1 on whitespace tokens (lower-cased), from the longest common subsequence."""

from __future__ import annotations


def lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """F1 of LCS precision (over the candidate) and recall (over the reference); 1.0 when
    both are empty, 0.0 when only one is."""
    c, r = candidate.lower().split(), reference.lower().split()
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, q = lcs / len(c), lcs / len(r)
    return 2 * p * q / (p + q)
