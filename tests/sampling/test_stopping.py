"""Stop rules: end tokens, lengths, stop strings."""

from __future__ import annotations

from nextok.params import SamplingParams
from nextok.sampling.stopping import check_stop, find_stop_string


def test_end_token_stops_and_length_limits():
    p = SamplingParams(max_new_tokens=5)
    assert check_stop(p, 2, 1, 10, frozenset({2}), 100) == "stop"
    assert check_stop(p, 3, 1, 10, frozenset({2}), 100) is None
    assert check_stop(p, 3, 5, 10, frozenset({2}), 100) == "length"
    assert check_stop(p, 3, 2, 100, frozenset({2}), 100) == "length"  # context full


def test_stop_string_found_only_near_the_new_text():
    assert find_stop_string("hello world", 5, ["wor"]) == 6
    assert find_stop_string("hello world", 1, ["hello"]) is None  # ended before the new character
    assert find_stop_string("hello", 0, ["hello"]) is None


def test_stop_string_spanning_several_deltas():
    text = ""
    cut = None
    for delta in ["ab", "c", "de", "f"]:
        text += delta
        cut = find_stop_string(text, len(delta), ["cde"])
        if cut is not None:
            break
    assert cut == 2 and text[:cut] == "ab"


def test_overlapping_stop_strings_cut_at_the_earliest():
    assert find_stop_string("xxabcde", 5, ["cd", "bcd"]) == 3
    assert find_stop_string("abc", 3, ["abc", "b"]) == 0


def test_stop_string_at_the_very_start():
    assert find_stop_string("Stop here", 9, ["Stop"]) == 0
