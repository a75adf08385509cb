"""Tests that kill mutants of write_results' title / extra_markdown hints landed in session 55, which the other
tests let live (mut55b helper, session 55)."""

import re

import pytest

from robust_ops.data import DatasetInfo
from robust_ops.evaluate import EvalError, write_results

INFO = DatasetInfo("tiny", 2, 1, 12, ("benign", "malignant"), positive_class=1, synthetic=True, source="random")
ROW = dict(method="A", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)


@pytest.mark.parametrize("kwargs, want", [
    # a title of lines is no Markdown to join: told to give the heading as text
    ({"title": ["a", "b"]}, "got ['a', 'b']; give report.md's heading as text, such as title='...', or None"),
    # True is no number to give as its text
    ({"title": True}, "got True; give report.md's heading as text, such as title='...', or None"),
    ({"extra_markdown": False}, "got False; give the Markdown as text, such as extra_markdown='...', or None for none"),
    # lines of which one is no text: not told to join them
    ({"extra_markdown": ["a", 1]}, "got ['a', 1]; give the Markdown as text, such as extra_markdown='...', or None"),
    ({"extra_markdown": 7}, "got 7; give the Markdown as text, such as extra_markdown='7', or None for none"),
])
def test_write_results_hint_for_a_title_or_markdown_that_is_no_text(tmp_path, kwargs, want):
    with pytest.raises(EvalError, match=re.escape(want)):
        write_results(tmp_path / "out", [ROW], INFO, figures=False, **kwargs)

