"""The self-contained Python examples of README.md and docs/ run as written (in a fresh interpreter, as a user would
paste them). The other docs snippets are fragments over a user's own model and data."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def python_blocks(path):
    return re.findall(r"^```python\n(.*?)^```", (REPO / path).read_text(), flags=re.S | re.M)


def run_python(code, tmp_path):
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_readme_example_runs(tmp_path):
    (block,) = python_blocks("README.md")
    check = "\nprint(json.dumps([list(x_adv.shape), len(iterates), float((x_adv - x).abs().max())]))\n"
    shape, n_iterates, max_change = json.loads(run_python("import json\n" + block + check, tmp_path))
    assert shape == [8, 3, 224, 224] and n_iterates == 4  # emit=(2, 4, 6, 8)
    assert 0 < max_change <= 8 / 255 + 1e-6  # the attack moved x, inside its eps-ball


def test_dropmax_any_cnn_example_runs(tmp_path):
    block = python_blocks("docs/dropmax-any-cnn.md")[0]
    out = run_python(block, tmp_path)
    assert out.startswith("DropMax2d(kernel_size=3, stride=2, padding=1"), out


def _slug(heading):
    """GitHub's anchor for a heading: lower case, link targets and punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    """Every relative link in README.md and docs/ names an existing file, and every #anchor a heading of it (three
    broken anchors had drifted in unnoticed)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links inside code are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", dest.read_text(), flags=re.S | re.M),
                                      flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.relative_to(REPO)}: {target} (no heading with that anchor)")
    assert not broken, "\n".join(broken)
