"""The Python in README.md and docs/ is the code's: the self-contained examples run as written (in a fresh interpreter,
as a user would paste them), the fragments over a user's own model and data run on small stand-ins for them, and the
signature blocks list exactly the code's arguments."""

import inspect
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


def test_table_rows_have_their_headers_cell_count():
    """A `|` splits a table cell even inside backticks or a formula unless written `\\|`: defenses/index.md's LLR row
    (`μ·|δᵀ∇ₓℓ|`) rendered its formula's tail as the paper defaults and dropped `λ = 3, μ = 4`, and
    drop_max_pool2d.md's `avx2|scalar` cut its backend row short. Every row has as many cells as its header."""
    wrong = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        lines = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), page.read_text(),
                       flags=re.S | re.M).splitlines()
        for i, line in enumerate(lines[:-1]):
            if not (line.startswith("|") and re.fullmatch(r"\|[-:| ]+\|", lines[i + 1])):
                continue  # not a table's header
            cells = len(re.findall(r"(?<!\\)\|", line))
            for j in range(i + 2, len(lines)):
                if not lines[j].startswith("|"):
                    break
                if len(re.findall(r"(?<!\\)\|", lines[j])) != cells:
                    wrong.append(f"{page.relative_to(REPO)}:{j + 1}: {lines[j][:100]}")
    assert not wrong, "\n".join(wrong)


# The fragments over a user's own model and data run on small stand-ins for them, so a renamed function or argument
# cannot drift into the docs unnoticed. Each entry: (page, block index) -> substitutions applied to the block (fewer
# epochs, the synthetic set for BreastMNIST) and code appended to check what the block computed.
STAND_INS = """
import torch
from torch import nn
from torch.utils.data import DataLoader
import robust_ops
from robust_ops.data import load_dataset
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(4 * 14 * 14, 2)).eval()
x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 0, 1])
_synthetic = load_dataset("synthetic")
train_set, val_set = _synthetic.train, _synthetic.val
margins = torch.full((4,), 0.5)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
path = "checkpoint.pt"
steps = 3
grad_output, invstd, weight = torch.randn(4, 1, 28, 28), torch.rand(1) + 0.5, torch.randn(1)
adv, grad, alpha, eps = torch.rand(4, 1, 28, 28), torch.randn(4, 1, 28, 28), 2 / 255, 8 / 255
adv_before = adv.clone()
"""

# docs/ima.md's segmentation block: tiny binary and 3-class nets, their own segmentations of x as the targets.
SEGMENTATION_STAND_INS = """
class _TinySegNet(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, classes, 3, padding=1))

    def forward(self, x):
        return self.body(x) * 10

seg_model, mc_model = _TinySegNet(1).eval(), _TinySegNet(3).eval()
with torch.no_grad():
    masks, labels = (seg_model(x) > 0).squeeze(1).long(), mc_model(x).argmax(1)
margins = torch.full((4,), 3.0)
seg_train_set = torch.utils.data.TensorDataset(x, masks)
optimizer = torch.optim.SGD(seg_model.parameters(), lr=0.01)
"""

FRAGMENTS = {
    ("docs/attacks.md", 0): ({}, "assert robust.shape == (4,) and atk is not None"),
    ("docs/attacks.md", 2): ({}, """
del robust_ops.attacks.ATTACKS["mifgsm"]  # the registration would otherwise outlive this test
assert float((x_adv - x).abs().max()) <= 5 / 255 + 1e-6 and not torch.equal(x_adv, x)
"""),
    ("docs/defenses/index.md", 0): ({"epochs=2": "epochs=1", "epochs=3": "epochs=2"}, """
assert [h["epoch"] for h in result.history] == [1, 2]
assert torch.load("runs/noisy-at/checkpoint.pt")["config"]["defense_options"]["sigma"] == 0.02
"""),
    # the loop's gradient is MIRST-DM's whole eq. 2 (reuse=False puts every term in out.loss); without extra_grads
    # it is the clean loss's alone
    ("docs/defenses/index.md", 1): ({"range(2)": "range(1)", "batch_size=8": "batch_size=64"}, """
assert type(model[2]).__name__ == "DropMax2d" and set(out.metrics) >= {"loss", "loss_clean", "loss_adv"}
xb, yb = next(iter(DataLoader(train_set, batch_size=8)))


def _grads(d, extra=True):
    optimizer.zero_grad()
    o = d(model, xb, yb)
    o.loss.backward()
    for p, g in zip(params, (o.extra_grads or ()) if extra else ()):
        if g is not None:
            p.grad = g.clone() if p.grad is None else p.grad + g
    return torch.cat([p.grad.flatten() for p in params])


loop, plain = _grads(defense), _grads(defenses.build("mirst-dm", reuse=False))
assert torch.allclose(loop, plain, rtol=1e-4, atol=1e-6), (loop - plain).abs().max()
assert not torch.allclose(_grads(defense, extra=False), plain, rtol=1e-2, atol=1e-4)
"""),
    ("docs/getting-started.md", 0): ({'"breastmnist"': '"synthetic"', '"resnet18"': '"small_cnn"',
                                      "epochs=30": "epochs=1", '"1/255,2/255,5/255"': '"2/255"'},
                                     "assert len(rows) > 0 and (Path(tmp) / 'runs/mirst-dm/eval').exists()"),
    ("docs/getting-started.md", 1): ({"import torch\n": "import torch\nfrom robust_ops import defenses, train\n"
                                                       "data = _synthetic\n", '"mirst-dm"': '"standard"',
                                      "epochs=30": "epochs=1"},
                                     "assert torch.bincount(y[idx]).tolist() == [top, top] == [245, 245]\n"
                                     "assert len(balanced) == 2 * top and len(result.history) == 1"),
    ("docs/ima.md", 0): ({}, "assert x_adv.shape == (4, 1, 28, 28) and crossed.shape == (4,)\n"
                             "assert torch.load(path)['defense']['margins'].shape == (len(train_set),)"),
    ("docs/ima.md", 1): ({"import torch\n": "import torch\n" + SEGMENTATION_STAND_INS}, """
assert x_adv.shape == x.shape and bool(crossed.any())  # the multi-class loss moved samples across Dice 0.6
with torch.no_grad():
    assert bool(dice_criterion()(mc_model(x_adv), labels)[crossed].all())  # landed on the correct side
assert defense.margins.shape == (4,) and noise_dice.shape == (4,)
assert bool(((0 <= noise_dice) & (noise_dice <= 1)).all())
"""),
    ("docs/memory-pool.md", 0): ({}, ""),
    ("docs/profile-attacks.md", 0): ({"model = ...": "", "x, y = ...": "", "min_run_time=2": "min_run_time=0.1"}, ""),
    ("docs/training.md", 0): ({"epochs=100": "epochs=1"},
                              "assert len(result.history) == 1 and Path(result.checkpoint).exists()"),
    # the stand-in model's head is its last layer, "4"; dpaat's attacks cost seconds an epoch
    ("docs/training.md", 1): ({"epochs=60": "epochs=3", "warmup_epochs=10": 'warmup_epochs=1, warmup_params="4"',
                               "early_stopping=5": "early_stopping=1", '"dpaat"': '"standard"'},
                              "assert result.early_stopping['patience'] == 1 and len(result.history) >= 2"),
    ("docs/ops/boundary_search_step.md", 1): ({}, """
def halves(z):  # class 1 where the mean pixel is >= 0.5
    m = z.flatten(1).mean(1)
    return torch.stack([0.5 - m, m - 0.5], 1)
lo, hi = boundary_search(halves, torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4), torch.tensor([0, 0]))
assert (halves(lo).argmax(1) == 0).all() and (halves(hi).argmax(1) == 1).all()  # lo correct, hi wrong
assert ((hi - lo).abs().max() <= 2 ** -10), (hi - lo).abs().max()
"""),
    ("docs/ops/drop_max_pool2d.md", 0): (
        {}, "assert repr(model.maxpool).startswith('DropMax2d(kernel_size=3, stride=2, padding=1')\n"
            "assert out.shape == y.shape"),
    ("docs/ops/max_pool2d.md", 0): ({}, "assert torch.equal(out, y) and torch.equal(g, grad_output * invstd * weight)"),
    ("docs/ops/pgd_step.md", 1): ({}, """
kernel = robust_ops.pgd_step_(adv_before.clone(), x, grad, torch.full((4,), alpha), torch.full((4,), eps))
assert torch.equal(kernel, adv)  # the kernel rounds as torchattacks' step does
"""),
    ("docs/dropmax-any-cnn.md", 1): ({}, "assert features(torch.randn(8, 1, 28, 28)).shape == (8, 64, 7, 7)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("page, index", sorted(FRAGMENTS))
def test_doc_fragment_runs_on_stand_ins(page, index, tmp_path, monkeypatch):
    substitutions, check = FRAGMENTS[page, index]
    block = python_blocks(page)[index]
    for old, new in substitutions.items():
        assert old in block, f"{page} block {index} no longer contains {old!r}: update FRAGMENTS"
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(STAND_INS + block + "\n" + check, f"{page}[{index}]", "exec"), {"Path": Path, "tmp": str(tmp_path)})


def test_own_attack_example_is_torchattacks_mifgsm():
    """docs/attacks.md's MI-FGSM on the shared step op gives torchattacks 3.5.1's MIFGSM bitwise, as it says."""
    torchattacks = pytest.importorskip("torchattacks")
    import torch

    from robust_ops import attacks

    namespace = {}
    block = python_blocks("docs/attacks.md")[2].split('attacks.ATTACKS["mifgsm"]')[0]  # define, do not register
    exec(compile(block, "docs/attacks.md[2]", "exec"), namespace)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 13 * 13, 2)).eval()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 2, (16,))
    ours = namespace["MIFGSM"](model, eps=8 / 255, alpha=2 / 255, steps=5)(x, y)
    theirs = torchattacks.MIFGSM(model, eps=8 / 255, alpha=2 / 255, steps=5, decay=1.0)(x, y)
    assert torch.equal(ours, theirs) and not torch.equal(ours, x)
    assert "mifgsm" not in attacks.ATTACKS


def test_torchattacks_table_lists_every_class_and_its_same_point_claims_hold():
    """docs/attacks.md's porting table names every class torchattacks exports once, and what it says gives the same
    points does: FFGSM is a one-step PGD from the same start, TPGD run_pgd with a near-x start and the KL loss,
    EOTPGD PGD on a deterministic model."""
    torchattacks = pytest.importorskip("torchattacks")
    import torch
    import torch.nn.functional as F

    from robust_ops import attacks
    from robust_ops.attacks.core import run_pgd

    section = (REPO / "docs/attacks.md").read_text().split("## Porting torchattacks / AutoAttack code")[1]
    rows = re.findall(r"^\| (`[^|]*`) \|", section.split("\n\n")[2], flags=re.M)
    listed = [name for row in rows for name in re.findall(r"`(\w+)`", row)]
    assert sorted(listed) == sorted(torchattacks.__all__)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 10 * 10, 3)).eval()
    x, y = torch.rand(8, 1, 12, 12), torch.randint(0, 3, (8,))
    torch.manual_seed(1)
    theirs = torchattacks.FFGSM(model, eps=8 / 255, alpha=10 / 255)(x, y)
    torch.manual_seed(1)
    torch.randn_like(x)  # their start draws a Gaussian first, then overwrites it with the uniform start
    assert torch.equal(attacks.PGD(model, eps=8 / 255, alpha=10 / 255, steps=1)(x, y), theirs)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
    torch.manual_seed(2)
    theirs = torchattacks.TPGD(model, eps=8 / 255, alpha=2 / 255, steps=5)(x)
    torch.manual_seed(2)
    ours = run_pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=5, start_noise=0.001,
                   loss=lambda out, y: F.kl_div(F.log_softmax(out, 1), p, reduction="sum")).x_adv
    assert torch.equal(ours, theirs) and not torch.equal(ours, x)
    torch.manual_seed(3)
    theirs = torchattacks.EOTPGD(model, eps=8 / 255, alpha=2 / 255, steps=5, eot_iter=2)(x, y)
    torch.manual_seed(3)
    assert torch.equal(attacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=5)(x, y), theirs)


def test_torchattacks_autoattack_runs_its_classes_ten_steps_in_every_version():
    """docs/attacks.md: torchattacks' AutoAttack builds APGD, APGD-T and FAB with its classes' 10 steps in every
    version, standard too (the docs said so of plus and rand only), where ours takes AutoAttack's 100, and
    steps=10 gives that budget."""
    torchattacks = pytest.importorskip("torchattacks")
    import torch

    from robust_ops import attacks

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    for version in ("standard", "plus", "rand"):
        theirs = torchattacks.AutoAttack(model, version=version)._autoattack.attacks
        assert {a.steps for a in theirs if hasattr(a, "steps")} == {10}, version
        assert {a.steps for a in attacks.AutoAttack(model, version=version).attacks if hasattr(a, "steps")} == {100}
        assert {a.steps for a in attacks.AutoAttack(model, version=version, steps=10).attacks
                if hasattr(a, "steps")} == {10}
    text = re.sub(r"\s+", " ", (REPO / "docs/attacks.md").read_text())
    assert "builds the attacks of every version (`standard` too) with its classes' default 10 steps" in text
    assert ("torchattacks' `AutoAttack` runs APGD-CE, APGD-T and FAB-T at its classes' 10 steps, in every "
            "version") in text


def test_every_doc_python_block_is_run_or_checked():
    """A new docs block is either in FRAGMENTS, run whole by the tests above, or a signature checked below."""
    covered = set(FRAGMENTS) | {("docs/dropmax-any-cnn.md", 0)} | set(SIGNATURES)
    blocks = {(str(p.relative_to(REPO)), i) for p in sorted((REPO / "docs").rglob("*.md"))
              for i, _ in enumerate(python_blocks(p.relative_to(REPO)))}
    assert blocks - covered == set(), "docs python blocks neither run nor checked: add them to FRAGMENTS or SIGNATURES"
    assert covered - blocks == set(), "FRAGMENTS / SIGNATURES name blocks that no longer exist"


def _documented_arguments(block, call):
    """The parenthesised argument list written after `call` in a docs block, whitespace-normalised, "..." quotes."""
    start = block.index(call + "(") + len(call)
    depth = 0
    for end in range(start, len(block)):
        depth += {"(": 1, ")": -1}.get(block[end], 0)
        if depth == 0:
            return re.sub(r"\s+", " ", block[start:end + 1]).replace("( ", "(")
    raise AssertionError(f"unbalanced parentheses after {call}")


def _python_signature(fn):
    return str(inspect.signature(fn)).replace("'", '"')


def _op_arguments(op):
    return "(" + ", ".join(a.name for a in op.default._schema.arguments) + ")"


def _check_defense_sketch(block):
    import dataclasses

    from robust_ops import defenses

    sketch, output = block.split("@dataclass")
    fields = [f.name for f in dataclasses.fields(defenses.DefenseOutput)]
    assert re.findall(r"^    (\w+):", output, flags=re.M) == fields
    for name, default in re.findall(r"^    (\w+): \w+ = (\w+)", sketch, flags=re.M):
        assert repr(getattr(defenses.Defense, name)) == default, name
    assert "name" in re.findall(r"^    (\w+):", sketch, flags=re.M) and isinstance(defenses.Defense.name, str)
    for method in re.findall(r"^    def (\w+)", sketch, flags=re.M):
        assert callable(getattr(defenses.Defense, method)), method
    assert _documented_arguments(sketch, "def __call__") == _python_signature(defenses.Defense.__call__)


def _signatures():
    import torch

    import robust_ops
    from robust_ops.attacks import run_pgd

    ops = torch.ops.robust_ops
    return {
        ("docs/attacks.md", 1): [("run_pgd", _python_signature(run_pgd))],
        ("docs/ops/pgd_step.md", 0): [("robust_ops.pgd_step_", _python_signature(robust_ops.pgd_step_)),
                                       ("torch.ops.robust_ops.pgd_step_", _op_arguments(ops.pgd_step_))],
        ("docs/ops/boundary_search_step.md", 0): [
            ("robust_ops.boundary_search_step_", _python_signature(robust_ops.boundary_search_step_)),
            ("torch.ops.robust_ops.boundary_search_step_", _op_arguments(ops.boundary_search_step_)),
            # documented as "same schema"; the Triton op registers only where Triton kernels can run
            ("torch.ops.robust_ops.boundary_search_step_triton", _op_arguments(ops.boundary_search_step_))],
        ("docs/design.md", 0): _check_defense_sketch,
    }


SIGNATURES = [("docs/attacks.md", 1), ("docs/ops/pgd_step.md", 0), ("docs/ops/boundary_search_step.md", 0),
              ("docs/design.md", 0)]


@pytest.mark.parametrize("page, index", SIGNATURES)
def test_documented_signatures_are_the_code(page, index):
    """The signature blocks list exactly the arguments, order and defaults the code has."""
    block = python_blocks(page)[index]
    expected = _signatures()[page, index]
    if callable(expected):
        expected(block)
        return
    for call, arguments in expected:
        assert _documented_arguments(block, call) == arguments, f"{page}: {call}"


# Full signatures written in the prose (not abbreviated with "..."): page, the function's name as written.
PROSE_SIGNATURES = [("docs/training.md", "fit"), ("docs/design.md", "fit"), ("docs/design.md", "load_dataset"),
                    ("docs/design.md", "build_model"), ("docs/reproduce/README.md", "run_protocol")]


@pytest.mark.parametrize("page, name", PROSE_SIGNATURES)
def test_prose_signatures_are_the_code(page, name):
    """design.md's load_dataset had lost bit_depth=, and reproduce/README.md's run_protocol the batch_size= and lr=
    it took with reproduce's --batch-size and --lr: a prose signature lists exactly the code's arguments."""
    from robust_ops.data import load_dataset
    from robust_ops.models import build_model
    from robust_ops.reproduce import run_protocol
    from robust_ops.train import fit

    functions = {"fit": fit, "load_dataset": load_dataset, "build_model": build_model, "run_protocol": run_protocol}
    function = functions[name]
    text = (REPO / page).read_text()
    assert _documented_arguments(text, f"`{name}") == _python_signature(function), f"{page}: {name}"


def test_documented_cli_flags_exist():
    """Every `robust-ops COMMAND --flag` written in README.md or docs/ names a command and flags its parser has."""
    from robust_ops import cli

    _, parsers = cli.build_parser()
    unknown = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for line in page.read_text().splitlines():
            # outside code a | ends a table cell; inside `...` it is the command's own (`--data a|b [--quick]`)
            commands = re.findall(r"robust-ops ([a-z]+)([^`|#]*)", re.sub(r"`[^`]*`", "", line))
            commands += [c for span in re.findall(r"`([^`]*)`", line)
                         for c in re.findall(r"robust-ops ([a-z]+)([^#]*)", span)]
            for command, rest in commands:
                if command not in parsers:
                    unknown.append(f"{page.relative_to(REPO)}: robust-ops {command}")
                    continue
                known = {s for action in parsers[command]._actions for s in action.option_strings}
                unknown += [f"{page.relative_to(REPO)}: robust-ops {command} {flag}"
                            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest) if flag not in known]
    assert not unknown, "\n".join(unknown)


def _quoted_cli_commands():
    """(page, command, argument text) of each `robust-ops COMMAND ...` in README.md and docs/: a code block's line or a
    code span, up to a comment; synopses (`[--quick]`, `A|B`), elisions (`...`), shell syntax and the CLI's own
    messages (`robust-ops bench: NAME exited ...`) are left out."""
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        text = page.read_text()
        lines = [line for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
                 for line in block.splitlines()]
        lines += re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
        for line in lines:
            for command, rest in re.findall(r"(?:^|[\s/])robust-ops ([a-z]+)\b([^#]*)", line):
                if not re.search(r"[\[|$<>]|\.\.\.|^:", rest):
                    yield page.relative_to(REPO), command, rest


def test_documented_cli_commands_parse_as_written():
    """Each whole command quoted in the docs parses, and its values pass the checks made before any work: attack specs
    and radii, defense, model and method names, benchmark topics (test_documented_cli_flags_exist checks only that
    the flags exist: `--attacks pgd:norm=l2:steps=20:alpha=eps/4:random_start=false` could have gone stale)."""
    import shlex

    from robust_ops import cli, defenses
    from robust_ops.models import MODELS
    from robust_ops.reproduce import PROTOCOLS, pick_methods

    _, parsers = cli.build_parser()
    checked, wrong = 0, []
    for page, command, rest in _quoted_cli_commands():
        argv = shlex.split(rest)
        if argv and getattr(parsers[command]._option_string_actions.get(argv[-1]), "nargs", 0) is None:
            continue  # a flag named in the prose (`robust-ops train --defense`), its value in the words around it
        # the prose names a command or an option of it (`robust-ops eval --prepacked-conv`) without its RUN_DIR / NAME
        positional = {"eval": ["RUN_DIR"], "reproduce": [next(iter(PROTOCOLS))]}.get(command, [])
        if positional and (not argv or argv[0].startswith("-")):
            argv = positional + argv
        try:
            args = parsers[command].parse_args(argv)
            if command in ("eval", "demo"):
                cli.parse_eval_options(args)
            for name in [getattr(args, "defense", None), *(getattr(args, "methods", None) or "").split(",")]:
                if command in ("train", "demo") and name and "." not in name:  # your own class: a made-up path
                    assert cli.defense_key(name) in defenses.NAMES, f"unknown defense {name!r}"
            assert getattr(args, "model", None) in (None, *MODELS), f"unknown model {args.model!r}"
            if command == "reproduce" and args.methods:
                pick_methods(PROTOCOLS[args.name], args.methods.split(","))
            if command == "bench" and args.only:
                assert set(args.only.split(",")) <= set(cli.find_benchmarks()), f"unknown topic in {args.only!r}"
            checked += 1
        except (cli.CLIError, AssertionError) as err:
            wrong.append(f"{page}: robust-ops {command}{rest}: {err}")
    assert checked >= 45 and not wrong, "\n".join(wrong)


def test_documented_benchmark_flags_exist():
    """Every `python benchmarks/bench_X.py --flag` written in README.md, docs/ or a benchmark's own docstring names a
    script and flags it defines (read from its add_argument calls: the parsers are built inside main)."""
    import ast

    scripts = {p.stem: p for p in (REPO / "benchmarks").glob("bench_*.py")}
    flags = {name: set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", p.read_text())) | {"--help"}
             for name, p in scripts.items()}
    texts = [(p, p.read_text()) for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]]
    texts += [(p, ast.get_docstring(ast.parse(p.read_text())) or "") for p in scripts.values()]
    unknown = []
    for page, text in texts:
        for line in text.splitlines():
            for script, rest in re.findall(r"benchmarks/(bench_\w+)\.py([^`|#]*)", line):
                if script not in scripts:
                    unknown.append(f"{page.relative_to(REPO)}: benchmarks/{script}.py (no such script)")
                    continue
                unknown += [f"{page.relative_to(REPO)}: {script}.py {flag}"
                            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest) if flag not in flags[script]]
    assert not unknown, "\n".join(unknown)


def test_benchmarks_table_lists_every_script_its_csvs_and_all_its_options():
    """docs/benchmarks.md's table of the scripts names each benchmarks/bench_*.py once, the CSVs its write_rows calls
    can write and exactly the options its parser takes (a flag or CSV added, renamed or dropped cannot drift past
    it; the options were read from --help only, most CSV names nowhere)."""
    scripts = {p.name: p.read_text() for p in (REPO / "benchmarks").glob("bench_*.py")}
    page = (REPO / "docs/benchmarks.md").read_text()
    section = page.split('<a id="scripts"></a>', 1)[1].split("\n## ", 2)[1]
    rows = re.findall(r"^\| `(bench_\w+\.py)` \|(.*)\|(.*)\|(.*)\|$", section, flags=re.M)
    assert sorted(name for name, *_ in rows) == sorted(scripts)
    for name, csvs, _, options in rows:
        source = scripts[name]
        flags = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))
        assert set(re.findall(r"`(--[\w-]+)`", options)) == flags, name
        written = set()
        for first_argument in re.findall(r"write_rows\((.*?),\s*(?:\[|\w*rows)", source):
            for csv_name in re.findall(r"\"([^\"]+)\"", first_argument):
                written |= {csv_name.replace("{device.type}", device) for device in ("cpu", "cuda")}
        assert written and set(re.findall(r"`(\w+)\.csv`", csvs)) == written, name


def test_cli_tables_list_every_option_of_their_command():
    """Each command's table in docs/cli.md names only options its parser has, and every one it has (a new flag, or a
    renamed one, cannot drift past the table); every name of an option, the opposites of on/off flags included
    (`--no-quick`, `--progress`), appears on the page."""
    from robust_ops import cli

    _, parsers = cli.build_parser()
    page = (REPO / "docs/cli.md").read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", page, flags=re.S | re.M))
    problems = []
    for command, parser in parsers.items():
        assert command in sections, f"docs/cli.md has no section ## {command}"
        cells = re.findall(r"^\| (`[^|]*`) \|", sections[command], flags=re.M)  # each row's option column
        listed = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(cells)))
        known = {s for action in parser._actions for s in action.option_strings}
        problems += [f"{command}: the table lists {flag}, which {command} does not take" for flag in listed - known]
        for action in parser._actions:
            if not action.option_strings or action.option_strings[0] in ("-h", "--help"):
                continue
            if action.option_strings[0] not in listed:
                problems.append(f"{command}: {action.option_strings[0]} is not in its table")
            problems += [f"{command}: {name} is not on the page" for name in action.option_strings
                         if not re.search(rf"`{re.escape(name)}[` ]", page)]
    assert not problems, "\n".join(problems)


def _public_callables():
    import importlib

    names = {}
    for module in ("robust_ops", "robust_ops.attacks", "robust_ops.defenses", "robust_ops.train", "robust_ops.ima",
                   "robust_ops.data", "robust_ops.evaluate", "robust_ops.report", "robust_ops.models",
                   "robust_ops.memory", "robust_ops.metrics", "robust_ops.native_layers", "robust_ops.prepacked_conv",
                   "robust_ops.reference"):
        mod = importlib.import_module(module)
        for name in dir(mod):
            obj = getattr(mod, name)
            if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", "").startswith("robust_ops"):
                names.setdefault(name, []).append(obj)
    return names


def test_documented_keyword_arguments_exist():
    """Inline calls in the prose, `fit(channels_last=True)`, name keywords the function takes (one of the functions
    of that name, for names defined twice: robust_ops.drop_max_pool2d and its reference)."""
    api = _public_callables()
    checked, unknown = 0, []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for span in re.findall(r"`([^`\n]+)`", prose):
            for owner, name, args in re.findall(r"(?:^|[^\w.])((?:\w+\.)*)(\w+)\(([^()]*)\)", span):
                keywords = re.findall(r"(?<![\w.])(\w+)=(?!=)", args)
                if name not in api or not keywords or owner.split(".")[0] in ("F", "torch", "nn"):
                    continue
                signatures = [inspect.signature(fn).parameters for fn in api[name]]
                checked += 1
                takes_any = [any(p.kind == p.VAR_KEYWORD for p in params.values()) for params in signatures]
                if not any(any_ or all(k in params for k in keywords) for any_, params in zip(takes_any, signatures)):
                    unknown.append(f"{page.relative_to(REPO)}: `{span}`")
    assert checked >= 30 and not unknown, "\n".join(unknown)


def _split_arguments(text):
    """Top-level comma-separated parts of "(a=1, b=(2, 3), **c)"."""
    parts, depth, current = [], 0, ""
    for ch in text[1:-1]:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [p for p in parts + [current.strip()] if p]


def test_attack_table_names_dpaats_ifgsm_norm_as_the_paper_and_protocol_run_it():
    """DPAAT's text gives IFGSM the L-inf distance ("l_inf-norm distance computation in IFGSM") and reproduce
    dpaat-bus runs 10-/20-IFGSM in L-inf; docs/attacks.md's ifgsm row said "DPAAT: IFGSM, L2 eps 0.3", and
    ifgsm's docstring still said that norm="l2" is "the L2 iterative gradient method DPAAT evaluates with"."""
    from robust_ops.attacks import ifgsm
    from robust_ops.reproduce import DPAAT_LINF, PROTOCOLS, _specs

    (row,) = [line for line in (REPO / "docs/attacks.md").read_text().splitlines() if "| `ifgsm` |" in line]
    assert "DPAAT" in row and "L2" not in row and "L∞" in row and "1/255" in row
    doc = " ".join(ifgsm.__doc__.split())
    assert "DPAAT evaluates with" not in doc and "DPAAT's 10-/20-IFGSM are Linf" in doc and "1/255" in doc
    plans = [plan for plan in PROTOCOLS["dpaat-bus"].evals if any(s.name == "ifgsm" for s in plan.attacks)]
    assert plans and all(plan.eps == [DPAAT_LINF] for plan in plans)
    assert all(s.norm == "linf" for plan in plans for s in _specs(plan, quick=False) if s.name == "ifgsm")


@pytest.mark.parametrize("page", sorted(p.name for p in (REPO / "docs/defenses").glob("*.md") if p.name != "index.md"))
def test_defense_page_defaults_are_the_code(page):
    """Each docs/defenses page opens with the constructor and its defaults (attack settings included, written as
    formulas like step_size=2.5*eps/steps); a defense built with no arguments has exactly those values."""
    import math

    from robust_ops import defenses

    text = (REPO / "docs/defenses" / page).read_text()
    name = re.search(r"`robust_ops\.defenses\.(\w+)\(", text).group(1)
    arguments = _documented_arguments(text, f"robust_ops.defenses.{name}")
    defense = getattr(defenses, name)()
    parameters = inspect.signature(getattr(defenses, name)).parameters
    written = {}
    for part in _split_arguments(arguments):
        if part.startswith("**"):
            assert any(p.kind == p.VAR_KEYWORD for p in parameters.values()), f"{name} takes no {part}"
        else:
            key, _, value = part.partition("=")
            written[key] = value.replace("ln 2", "math.log(2)")
    documented = {}
    while len(documented) < len(written):  # formulas may name settings written after them (AMAT's eps/2)
        progress = len(documented)
        for key, value in written.items():
            try:
                documented.setdefault(key, eval(value, {"math": math}, dict(documented)))
            except NameError:
                pass
        assert len(documented) > progress, f"{name}: cannot evaluate {set(written) - set(documented)}"
    for key, value in documented.items():
        actual = getattr(defense, key)
        if isinstance(actual, float):
            assert actual == pytest.approx(value, rel=1e-12), f"{name}.{key}"
        else:
            assert actual == value, f"{name}.{key}"


# A baseline page cites the publication the comparing paper's reference list gives for it (pattern 1) and says where
# the original's objective differs from what the defense runs by default (pattern 2); whitespace-normalized text.
BASELINE_FIDELITY = {
    # MIRST-DM's [2] is Drucker & LeCun's IJCNN-91 paper (Ross & Doshi-Velez were named as it); both originals
    # penalize the squared norm, "l2sq", where the default follows MIRST-DM's "L_p norm of gradients"
    "gr.md": (r"Double backpropagation increasing generalization performance\*, IJCNN 1991 "
              r"\(MIRST-DM's reference \[2\]",
              r"both originals penalize the \*squared\* L2 norm .* which is `norm=\"l2sq\"`"),
    # DPAAT's [14] for SAT is Goodfellow et al., whose alpha weighs the clean loss (DPAAT's eq. 4, the adversarial one)
    "sat.md": (r"Explaining and Harnessing Adversarial Examples\*, ICLR 2015 \(DPAAT's \[14\]\)",
               r"weight on the \*clean\* loss.* Its α is 1 − `alpha` here"),
    # DPAAT's [17] for AMAT is Ma & Liang's arXiv paper; its rule as DPAAT prints it is IMA's, but from the fixed eps
    "amat.md": (r"reference \[17\] is AMAT: L\. Ma and L\. Liang, .*arXiv:2206\.01736",
                r"keeps no per-sample state between batches or epochs.* IMA's Algorithm 1"),
    # MIRST-DM's [5], Carmon et al., trains RST's robust term with TRADES's KL (beta 6), not eq. 1's cross-entropy
    "rst.md": (r"Carmon et al\.'s robust self-training \(MIRST-DM's reference \[5\]\) trains its robust term as "
               r"TRADES does",
               r"\[`trades`\]\(trades\.md\) with `beta=6`, not this defense"),
}


@pytest.mark.parametrize("page", sorted(BASELINE_FIDELITY))
def test_baseline_pages_cite_the_comparing_papers_reference_and_the_originals_objective(page):
    text = " ".join((REPO / "docs/defenses" / page).read_text().split())
    for pattern in BASELINE_FIDELITY[page]:
        assert re.search(pattern, text), f"{page}: {pattern}"


# MIRST-DM's Section 4.1 sentences giving the baselines' weights, as the pages quote them, with the defaults they set
MIRST_DM_WEIGHTS = {
    "trades.md": ("The weight of adversarial loss in GR, TRADES, and RST is set to 1 by experiments", "trades",
                  {"beta": 1.0}),
    "llr.md": ("the weight of the locally linearity measure and gradient magnitude term is set to 3 and 4", "llr",
               {"lam": 3.0, "mu": 4.0}),
}


@pytest.mark.parametrize("page", sorted(MIRST_DM_WEIGHTS))
def test_baseline_pages_quote_mirst_dms_weights_as_printed(page):
    """trades.md quoted MIRST-DM's "the weight of adversarial loss in GR, TRADES and RST is set to 1", a sentence the
    paper does not print (it has "TRADES, and RST" and ends "by experiments")."""
    from robust_ops import defenses

    sentence, name, weights = MIRST_DM_WEIGHTS[page]
    text = " ".join((REPO / "docs/defenses" / page).read_text().split())
    assert f'"{sentence}' in text
    defense = defenses.build(name)
    assert {k: getattr(defense, k) for k in weights} == weights


def test_references_list_every_baseline_defense_with_its_page():
    """docs/references.md listed the four papers, the attacks' and the datasets' references, but none of the baselines
    the papers compare against: each registered defense other than the four papers' own and standard training has an
    entry there linking its page."""
    from robust_ops.defenses import NAMES

    own = {"standard", "mirst", "mirst-dm", "ima", "dpaat", "arfl"}
    text = (REPO / "docs/references.md").read_text()
    assert "\n## The baseline defenses\n" in text
    section = text.split("\n## The baseline defenses\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^- \*\*[\w-]+\*\* \(\[\w+\.md\]\(defenses/([\w-]+)\.md\)\)", section, flags=re.M))
    assert listed == set(NAMES) - own

def test_mirst_bus_page_states_the_folds_training_validation_and_test_sizes(breastmnist, monkeypatch):
    """The page's run said "624 training images" per fold: that is the fold's training part, of which the protocol's
    cross-validation holds 10% out for validation (its notes say so), so 561 images were trained on. The sizes the page
    states are those of the protocol's folds of BreastMNIST."""
    from robust_ops.reproduce import CV_SEED, PROTOCOLS, kfold_splits, load_pool

    monkeypatch.setenv("ROBUST_OPS_DATA", str(breastmnist.parent))
    p = PROTOCOLS["mirst-bus"]
    folds = kfold_splits(p.data, load_pool(p.data, None, 0, None), p.repeats, CV_SEED)
    text = " ".join((REPO / "docs/reproduce/mirst-bus.md").read_text().split())
    for fold in folds[:3]:  # the page's run: folds 0, 1 and 2
        train, val, test = len(fold.train), len(fold.val), len(fold.test)
        malignant = int((fold.test.tensors[1] == fold.info.positive_class).sum())
        assert (f"per fold {train} training images and {val} validation images from the fold's {train + val}, "
                f"{test} test images, {malignant} of them malignant") in text


def test_arfl_page_fine_tunes_the_vgg16_layers_the_paper_names(tmp_path):
    """The ARFL page gave the two-moons setting and the mammography defaults only: not the paper's VGG16 fine-tuning of
    "the fully connected layers and the last convolutional layer" nor its test budget eps2 = 1e-4. The fit call it
    gives trains exactly the classifier and the last convolution of the library's vgg16, the layer ARFL reads its
    features from, and the eval command it gives parses."""
    import torch
    from torch.utils.data import TensorDataset

    from robust_ops import defenses, train
    from robust_ops.evaluate import parse_attacks
    from robust_ops.models import build_model

    text = " ".join((REPO / "docs/defenses/arfl.md").read_text().split())
    call = re.search(r"`fit\(model, \"arfl\", train_set, val_set, epochs=100, warmup_epochs=100, "
                     r"warmup_params=(\[[^\]]*\])\)`", text)
    assert call, "the page's fit call for the mammography fine-tuning"
    names = json.loads(call.group(1))
    command = re.search(r"`robust-ops eval RUN --attacks (\S+) --eps 1e-4`", text)
    assert command and "ε2\" = 1e-4" in text
    assert [s.name for s in parse_attacks(command.group(1))] == ["pgd"]
    torch.manual_seed(0)
    model = build_model("vgg16", num_classes=2, in_channels=1, image_size=28)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert names == ["classifier", convs[-1]]
    assert defenses.build("arfl").feature_module(model)[0] is dict(model.named_modules())[convs[-1]]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = TensorDataset(torch.rand(8, 1, 28, 28), torch.tensor([0, 1] * 4))
    train.fit(model, "arfl", data, epochs=1, batch_size=8, warmup_epochs=1, warmup_params=names, progress=False,
              out_dir=tmp_path)
    moved = {k.rsplit(".", 1)[0] for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert moved == {"classifier.0", "classifier.3", convs[-1]}


def test_documented_radius_figures_are_the_ones_written():
    """getting-started's file table listed accuracy, F1 and sensitivity curves only; multi-class tasks get mAP."""
    from robust_ops.data import DatasetInfo
    from robust_ops.report import figure_metrics

    row = next(line for line in (REPO / "docs/getting-started.md").read_text().splitlines()
               if line.startswith("| `accuracy_vs_eps.png`"))
    files, _, rest = row[2:].partition(" | ")
    binary, _, multi = files.partition("(multi-class:")
    assert re.findall(r"`(\w+)_vs_eps.png`", binary) == list(figure_metrics(DatasetInfo("b", 2, 1, 8, ("a", "b"))))
    three = figure_metrics(DatasetInfo("m", 3, 1, 8, ("a", "b", "c")))
    assert set(re.findall(r"`(\w+)_vs_eps.png`", multi)) == set(three) - set(figure_metrics(
        DatasetInfo("b", 2, 1, 8, ("a", "b"))))


def test_cli_table_defaults_are_the_parsers():
    """The default column of docs/cli.md's tables (`10, 32, 1e-3` for three options, `off` for a switch) is each
    parser's default; defaults resolved at run time (None: from run.json, the data, the protocol) are prose."""
    from robust_ops import cli

    _, parsers = cli.build_parser()
    page = (REPO / "docs/cli.md").read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", page, flags=re.S | re.M))
    checked, wrong = 0, []
    for command, parser in parsers.items():
        by_flag = {s: action for action in parser._actions for s in action.option_strings}
        for cell, default in re.findall(r"^\| (`[^|]*`) \| ([^|]*) \|", sections[command], flags=re.M):
            actions = list(dict.fromkeys(by_flag[f] for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", cell)))
            parts = [p.strip().strip("`") for p in default.split(", ")]
            if len(parts) != len(actions):  # one phrase for several options: "as train", "from run.json"
                continue
            for action, part in zip(actions, parts):
                value = action.default
                if value is None or isinstance(value, list):
                    continue
                checked += 1
                if isinstance(value, bool):
                    ok = part == ("on" if value else "off")
                elif isinstance(value, (int, float)):
                    ok = re.fullmatch(r"[\d.e+-]+", part) is not None and float(part) == value
                else:
                    ok = part == value
                if not ok:
                    wrong.append(f"{command} {action.option_strings[0]}: the table says {part!r}, the parser {value!r}")
    assert checked >= 30 and not wrong, "\n".join(wrong)


@pytest.mark.parametrize("argv", [["eval", "RUN_DIR", "--attacks", "fgsm", "--attacks", "pgd"],
                                  ["train", "--config", "a.yaml", "--config", "b.yaml"]])
def test_cli_page_quotes_the_refusal_of_a_repeated_option(argv, tmp_path, monkeypatch, capsys):
    """docs/cli.md said a second `--attacks pgd` (or `--config`) would replace the first, when both are refused: the
    error it quotes for each is the one the command line prints (refused while parsing, so no file is read)."""
    from robust_ops import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    message = line.split(": error: ", 1)[1].removesuffix(f" (see robust-ops {argv[0]} --help)")
    assert f"`{message}`" in re.sub(r"\s+", " ", (REPO / "docs/cli.md").read_text()), message


def test_cli_page_lists_the_exit_statuses_the_command_line_returns(tmp_path, monkeypatch, capsys):
    """bench's status 1 (a benchmark script failed) was on no page; docs/cli.md's **Exit status.** list names each
    status a command ends with, and each of them ends one."""
    import os
    import signal

    from robust_ops import cli

    page = (REPO / "docs/cli.md").read_text()
    listed = {int(n) for n in re.findall(r"`(\d+)`", re.search(r"\* \*\*Exit status\.\*\*(.*?)\n\* ", page, re.S)[1])}
    (tmp_path / "bench_ok.py").write_text("")
    (tmp_path / "bench_fails.py").write_text("raise SystemExit(3)\n")
    bench = ["bench", "--bench-dir", str(tmp_path)]

    def raising(error):
        def func(_args):
            if error is signal.SIGTERM:
                os.kill(os.getpid(), signal.SIGTERM)  # main's handler raises KeyboardInterrupt
            raise error
        return func

    returned = {cli.main(bench + ["--list"]), cli.main(bench), cli.main(bench + ["--only", "nope"])}
    for error in (KeyboardInterrupt, BrokenPipeError, signal.SIGTERM):
        monkeypatch.setattr(cli, "cmd_bench", raising(error))
        returned.add(cli.main(bench))
    capsys.readouterr()
    assert listed == returned == {0, 1, 2, 130, 141, 143}


def test_checkpoint_table_lists_the_checkpoints_keys(tmp_path):
    """training.md's table of checkpoint.pt's contents names exactly the keys fit writes, those of `config` and of
    `sampler` included (a tiny one-epoch run)."""
    import torch
    from torch import nn

    from robust_ops.train import fit, load_checkpoint

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    state = load_checkpoint(fit(model, "standard", data, epochs=1, out_dir=tmp_path, progress=False).checkpoint)
    text = (REPO / "docs/training.md").read_text()
    table = text[text.index("| key | content |"):]
    table = table[:table.index("\n\n")]
    rows = dict(re.findall(r"^\| ([^|]*) \| (.*) \|$", table, flags=re.M)[1:])  # after the header
    assert {k for cell in rows for k in re.findall(r"`(\w+)`", cell)} == set(state)

    def documented_fields(content):  # the top-level names of "{a, b (its note, with, commas), c and d, ...}"
        inner = content[content.index("{") + 1:content.rindex("}")]
        while "(" in inner:
            inner = re.sub(r"\([^()]*\)", "", inner)
        return {part.strip().split()[0] for item in inner.split(",") for part in item.split(" and ")}

    config_row = next(content for cell, content in rows.items() if "`config`" in cell)
    assert documented_fields(config_row) == set(state["config"])
    assert documented_fields(rows["`sampler`"]) == set(state["sampler"])
    assert documented_fields(rows["`arithmetic`"]) == set(state["arithmetic"]) | {"gpu"}  # gpu: CUDA runs only


@pytest.mark.parametrize("page, start, end", [
    ("docs/training.md", "| `defense` | `defense.state_dict()` (", "stateless defenses)"),
    ("docs/defenses/index.md", "`defense.load_state_dict(...)` (", "for the others)")])
def test_the_defenses_with_a_state_are_the_ones_named(page, start, end):
    """defenses/index.md's own training loop said a defense's state_dict() was IMA's margins, DPAAT's running
    statistics and `{}` for the others, when FAT's holds its current tau (a scheduler's): a loop that saved only the
    named states lost it. Each page names exactly the built-in defenses whose state is not {}."""
    import torch
    from torch import nn

    from robust_ops import defenses

    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1])
    stateful = set()
    for name in defenses.NAMES:  # after one batch, as a loop would save them (IMA's table is made at its first)
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2))
        defense = defenses.build(name)
        if hasattr(defense, "prepare_model"):
            defense.prepare_model(model)
        if defense.needs_ids:
            defense.setup(4)
        defense(model.train(), x, y, *([torch.arange(4)] if defense.needs_ids else []))
        if defense.state_dict():
            stateful.add(name)
    text = " ".join((REPO / page).read_text().split())
    listed = text[text.index(start) + len(start):]
    listed = listed[:listed.index(end)]
    named = {word.lower() for word in re.findall(r"\b[A-Z][A-Z-]+\b", listed)}
    assert named == stateful, (page, listed)


def test_history_keys_are_the_documented_ones():
    """training.md's `result.history` comment left out `epoch` and promised train_acc for every defense; AT (and
    FAT) return no clean logits, so their epochs have none."""
    import torch
    from torch import nn

    from robust_ops.train import fit

    block = python_blocks("docs/training.md")[0]
    comment = block[block.index("result.history"):block.index("# a defense metric")]
    documented = set(re.findall(r"(?<![\w<])(epoch|lr|time_s|(?:train|val)_(?!data\b)[a-z]+)(?![\w>])", comment))
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]))
    keys = {}
    for name in ("standard", "at"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        keys[name] = set(fit(model, name, data, data, epochs=1, progress=False).history[0])
    assert keys["standard"] == documented
    assert keys["at"] - {"train_loss_adv"} == documented - {"train_acc"} and "not AT's" in comment


@pytest.mark.parametrize("classes", [2, 7])
def test_results_json_row_fields_are_the_written_ones(tmp_path, classes):
    """getting-started.md's `results.json` row `{method, attack, ...}` lists exactly the fields write_results writes,
    in that order, for a binary set and a multi-class one (whose rows had precision before specificity); so does
    evaluate's docstring for the rows it returns (it lacked `confusion`)."""
    import torch
    from torch import nn

    from robust_ops.data import DatasetInfo, load_dataset
    from robust_ops.evaluate import evaluate, write_results

    info = load_dataset("synthetic").info if classes == 2 else DatasetInfo("d", 7, 1, 28, tuple("abcdefg"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, classes)).eval()
    test = torch.utils.data.TensorDataset(torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 0, 1]))
    write_results(tmp_path, evaluate(model, test, info, attacks="fgsm", eps="1/255", method="M"), info)
    (row,) = [line for line in (REPO / "docs/getting-started.md").read_text().splitlines()
              if line.startswith("| `results.json` |")]
    documented = re.search(r"every row `\{([^}]*)\}`", row).group(1).replace(" ", "").split(",")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert all(list(r) == documented for r in rows), (list(rows[0]), documented)
    returned = re.search(r"list of rows ``\{([^}]*)\}``", evaluate.__doc__).group(1)
    assert re.sub(r"\s+", "", returned).split(",") == documented


def test_every_reported_metric_is_defined_in_getting_started():
    """results.json's metrics had no definition in docs/ (binary mAP, the mean of both classes' AP rather than the
    positive class's, least of all): getting-started's Metrics table gives each one, binary and multi-class."""
    from robust_ops.metrics import BINARY_METRICS, MULTICLASS_METRICS

    text = (REPO / "docs/getting-started.md").read_text()
    table = text.split("**Metrics**", 1)[1].split("\n\n| key | binary task | multi-class task |\n|---|---|---|\n")[1]
    keys = [line.split(" | ")[0][3:-1] for line in table.split("\n\n")[0].splitlines()]
    assert sorted(keys) == sorted({"n", *BINARY_METRICS, *MULTICLASS_METRICS}), keys


def _signature_problems(parts, fn):
    """What a prose signature's arguments (`eps`, `norm="linf"`, `*`) get wrong about fn's parameters."""
    import math

    parameters = inspect.signature(fn).parameters
    problems = []
    for part in parts:
        key, eq, value = part.partition("=")
        if part in ("*", "...") or part.startswith("**"):
            continue
        if key not in parameters:
            problems.append(f"{key} is not a parameter of {fn.__module__}.{fn.__qualname__}")
            continue
        default = parameters[key].default
        if not eq:
            if default is not inspect.Parameter.empty:
                problems.append(f"{key} is written without its default {default!r}")
            continue
        try:
            documented = eval(value, {"math": math})
        except NameError:  # a formula of other arguments: alpha=2.5*eps/steps
            continue
        if default is inspect.Parameter.empty or documented != default:
            problems.append(f"{key}={value}, but the code's default is {default!r}")
    return problems


def test_prose_signatures_give_the_codes_defaults():
    """A signature written in the prose (a `*` among its arguments: `apgd_t(model, x, y, *, eps, norm, ...)`) names
    only the function's parameters, gives a literal default where the code has that default, and writes bare only
    the parameters without one (apgd_t's norm read as required; it defaults to "linf")."""
    api = _public_callables()
    checked, wrong = 0, []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for span in re.findall(r"`([^`\n]+)`", prose):
            for name, args in re.findall(r"(?:^|[^\w.])(?:\w+\.)*(\w+)\(([^()]*(?:\([^()]*\)[^()]*)*)\)", span):
                parts = _split_arguments(f"({args})")
                if name not in api or "*" not in parts:
                    continue
                checked += 1
                problems = [_signature_problems(parts, fn) for fn in api[name]]  # one of a name's functions fits
                if all(problems):
                    wrong.append(f"{page.relative_to(REPO)}: `{span}`: {'; '.join(problems[0])}")
    assert checked >= 10 and not wrong, "\n".join(wrong)


def test_attack_table_gives_each_class_its_codes_signature():
    """The API table of docs/attacks.md gives every attack class's signature with the code's defaults, where these
    differ from the function's: AutoAttack's read `norm, eps` as required (they default to "linf" and 8/255), and
    BIM, CW, APGD, APGDT, Square and WhiteNoise had a bare name, hiding that their eps (8/255) and seed (0 or None)
    defaults are not their functions'. The prose names which classes seed 0 by default."""
    from robust_ops import attacks
    from robust_ops._options import option_defaults

    text = (REPO / "docs/attacks.md").read_text()
    table = text.split("\n## API\n")[1].strip().split("\n\n")[0]
    problems, checked = [], 0
    for row in table.splitlines()[2:]:
        cell = row.split(" | ")[1]
        match = re.fullmatch(r"`(\w+)(\(.*\))`.*", cell)
        if not match:
            problems.append(f"no signature: {cell}")
            continue
        cls = getattr(attacks, match.group(1))
        checked += 1
        problems += _signature_problems(_split_arguments(match.group(2)), cls)
    assert checked == len(attacks.ATTACKS) - 1 and not problems, problems  # apgd-ce, apgd-dlr: one APGD row
    seeded = re.search(r"`seed=0` \(repeatable draws\) in (.*?), `seed=None` in (.*?), where", text, flags=re.S)
    for group, seed in ((1, 0), (2, None)):
        names = re.findall(r"`(\w+)`", seeded.group(group))
        assert names
        for name in names:
            assert option_defaults(getattr(attacks, name))["seed"] == seed, name  # PGDL2's passes on to PGD's


def test_design_names_the_functional_ops_that_take_a_backend():
    """design.md said `backend=` is on every functional op; max_pool2d (CPU only) takes none. The ops it names are
    exactly those of robust_ops.functional with a `backend` parameter."""
    from robust_ops import functional

    text = (REPO / "docs/design.md").read_text()
    paragraph = text[text.index("Backends: "):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    ops = set(functional.__all__)
    takes = {name for name in ops if "backend" in inspect.signature(getattr(functional, name)).parameters}
    named = set(re.findall(r"`(\w+)`", paragraph.partition(" (and ")[0])) & ops
    assert named == takes, (named, takes)
    assert all(f"`{name}` has only" in paragraph for name in ops - takes), paragraph  # the others: "takes none"


def test_design_op_table_lists_every_schema():
    """design.md's op table ("csrc/robust_ops.cpp holds every schema") names every op the extension registers, each
    with its schema (it lacked _cuda_version and _cpu_vector_isa); "as `op`" gives another row's schema."""
    import torch

    import robust_ops  # noqa: F401  (loads the ops)

    def schema(name):  # "(Tensor input, ...) -> (Tensor, Tensor)"
        return str(getattr(torch.ops.robust_ops, name).default._schema).removeprefix(f"robust_ops::{name}")

    text = (REPO / "docs/design.md").read_text()
    table = text[text.index("| op | schema | notes |"):]
    table = table[:table.index("\n\n")]
    documented = {}
    for ops, schemas in re.findall(r"^\| ([^|]*) \| ([^|]*) \|", table, flags=re.M)[1:]:  # after the header
        names = re.findall(r"`(\w+)`", ops)
        if schemas.startswith("as `"):
            schemas = [schema(re.search(r"`(\w+)`", schemas).group(1))] * len(names)
        else:
            schemas = re.findall(r"`([^`]*)`", schemas)
        assert len(schemas) == len(names), ops
        documented.update(zip(names, schemas))
    registered = {name.removeprefix("robust_ops::") for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("robust_ops::") and not name.endswith("_triton")}
    assert set(documented) == registered, (sorted(registered - set(documented)), sorted(set(documented) - registered))
    assert {name: schema(name) for name in registered} == documented


def test_models_section_names_the_single_logit_models():
    """Every built model outputs one logit per class, except those getting-started's Models section names as giving
    a single logit for two classes (the models docstring said num_classes logits for all; mlp gives one, [N])."""
    import torch

    from robust_ops.models import MODELS, build_model

    text = (REPO / "docs/getting-started.md").read_text()
    section = text[text.index("## Models"):]
    single = set(re.findall(r"`(\w+)`[^`]*single logit", section))
    for name in MODELS:
        out = build_model(name, 1, 2, 32).eval()(torch.rand(2, 1, 32, 32))
        assert tuple(out.shape) == ((2,) if name in single else (2, 2)), (name, tuple(out.shape), single)


@pytest.mark.parametrize("path, claim", [
    ("docs/training.md", "resumed ends with **bitwise identical** weights"),
    ("robust_ops/train.py", "resumed\n  ends with bitwise the same weights"),
    ("docs/getting-started.md", "with the same result as an uninterrupted run"),
    ("README.md", "bitwise-exact resume"),
    ("robust_ops/train.py", "an atomic checkpoint every epoch, exact resume"),
])
def test_exact_resume_claims_name_the_thread_count(path, claim):
    """A resume at another thread count is not bitwise (torch's CPU kernels may sum in another order: a small CNN's
    AT run resumed at 2 threads after an epoch at 1 ended 1.5e-8 off), and such a resume only warns: every promise
    of an exact resume names that condition in its sentence."""
    text = (REPO / path).read_text()
    sentence = text[text.index(claim):]
    sentence = sentence[:re.search(r"\.\s", sentence).end()]
    assert "same thread count" in sentence, f"{path}: {sentence!r}"


def test_package_docstring_lists_the_modules_imported_on_first_use():
    """help(robust_ops) names exactly the modules its __getattr__ imports on first use (it listed 6 of the 17)."""
    import robust_ops

    listed = robust_ops.__doc__.split("Modules imported on first use:")[1].split(".\n")[0]
    assert set(re.findall(r"\w+", listed)) - {"and"} == set(robust_ops._SUBMODULES)


def test_exported_functions_document_every_argument():
    """help() of the package's own functions and DropMax2d names each argument they take in its Args (max_pool2d's
    are F.max_pool2d's, by reference): boundary_search_step_ took backend= without a word of it, attacks.run_pgd
    name=, attacks.ensemble clip_min= / clip_max=, and attacks.apgd_t and evaluate had no Args at all (n_restarts,
    rho, generator; batch_size, cascade). evaluate's progress takes False too (fit's word for none), which its entry
    said nothing of."""
    import robust_ops
    from robust_ops import attacks, evaluate

    undocumented = {}
    functions = [(robust_ops, name) for name in ("drop_max_pool2d", "pgd_step_", "boundary_search_step_",
                                                 "replace_maxpool", "DropMax2d")]
    functions += [(attacks, "run_pgd"), (attacks, "apgd_t"), (attacks, "ensemble"), (evaluate, "evaluate")]
    for module, name in functions:
        fn = getattr(module, name)
        args = (fn.__doc__ or "").partition("Args:")[2].split("Returns:")[0]
        params = list(inspect.signature(fn).parameters)
        missing = [p for p in params if not re.search(rf"^ +(\w+, )*{p}\b", args, flags=re.M)]
        if missing:
            undocumented[name] = missing
    assert not undocumented
    progress = re.search(r"^ +progress:(.*?)^ +\w+:", evaluate.evaluate.__doc__, flags=re.M | re.S).group(1)
    assert "False" in progress, progress


EXPORTING_MODULES = ("robust_ops", "robust_ops.attacks", "robust_ops.ima", "robust_ops.nn", "robust_ops.functional",
                     "robust_ops.native_layers", "robust_ops.prepacked_conv", "robust_ops.reference",
                     "robust_ops.defenses", "robust_ops.train", "robust_ops.evaluate", "robust_ops.data",
                     "robust_ops.metrics", "robust_ops.report", "robust_ops.models", "robust_ops.memory",
                     "robust_ops.pretrain", "robust_ops.cli", "robust_ops.reproduce")


def test_everything_exported_in_an_all_has_a_docstring():
    """help() of native_layers_enabled_by_default and prepacked_conv_enabled_by_default, both in their module's
    __all__, said nothing: neither which variable decides nor what an unset one or a bad value gives."""
    import importlib

    missing = []
    for module in EXPORTING_MODULES:
        mod = importlib.import_module(module)
        missing += [f"{module}.{name}" for name in mod.__all__
                    if callable(getattr(mod, name)) and not inspect.getdoc(getattr(mod, name))]
    # and the public methods of exported classes (own or inherited from the library's base class): Attack's
    # forward, __call__ (Python's "Call self as a function."), set_model_mode and set_mode_default,
    # EnsembleResult.robust_accuracy, AutoAttack.run, PassCounter's four and MarginTable.state_dict said nothing
    for qualname, _, _ in exported_callables():
        module, owner, attr = qualname.rsplit(".", 2) if qualname.count(".") > 1 else ("robust_ops", "", "")
        cls = getattr(importlib.import_module(module), owner, None)
        if inspect.isclass(cls) and attr != "__init__":
            doc = inspect.getdoc(getattr(cls, attr)) or ""
            if not doc or doc.startswith("Call self as a function"):
                missing.append(qualname)
    assert not missing


def exported_callables():
    """(qualified name, function, docstring) of every callable in EXPORTING_MODULES' __all__ and, for a class, of
    its __init__, __call__ and public methods, each with its class's docstring before its own."""
    import importlib

    for module in EXPORTING_MODULES:
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not inspect.isclass(obj):
                if callable(obj):
                    yield f"{module}.{name}", obj, inspect.getdoc(obj) or ""
                continue
            for attr, fn in vars(obj).items():
                fn = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn
                if inspect.isfunction(fn) and (attr in ("__init__", "__call__") or not attr.startswith("_")):
                    own = "" if attr == "__init__" else inspect.getdoc(fn) or ""
                    yield f"{module}.{name}.{attr}", fn, (inspect.getdoc(obj) or "") + "\n" + own


def test_every_all_names_something_and_the_docs_name_only_exported_names():
    """defenses, train, evaluate, data, metrics, report, models, memory, pretrain and the package had no __all__, so
    ``from robust_ops.train import *`` took fit's helpers and imports (Path, dataclass, check_int, ...) and the
    docstring checks above covered none of their names. Each listed name exists, once; every
    ``robust_ops.<module>.<name>`` and ``from robust_ops.<module> import <name>`` in README.md and docs/ names a
    submodule or an exported name (private modules, robust_ops._*, and the ops under torch.ops are internal)."""
    import importlib

    for module in EXPORTING_MODULES:
        names = importlib.import_module(module).__all__
        assert len(set(names)) == len(names), module
        assert not [n for n in names if not hasattr(importlib.import_module(module), n)], module
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))])
    named = set(re.findall(r"(?<![\w.])robust_ops\.([a-z]\w*)\.(\w+)", text))
    for module, names in re.findall(r"\bfrom robust_ops\.([a-z]\w*) import ([\w, ]+)", text):
        named |= {(module, n.strip()) for n in names.split(",") if n.strip()}
    unexported = []
    for module, name in sorted(named):
        assert f"robust_ops.{module}" in EXPORTING_MODULES, module  # a public module without __all__
        obj = getattr(importlib.import_module(f"robust_ops.{module}"), name, None)
        if not inspect.ismodule(obj) and name not in importlib.import_module(f"robust_ops.{module}").__all__:
            unexported.append(f"robust_ops.{module}.{name}")
    assert not unexported


def test_the_docs_name_every_name_a_module_exports():
    """robust_ops.attacks.attack_entry, robust_ops.defenses.NAMES, robust_feature_loss and synchronization_loss
    were exported in an __all__ and named nowhere in README.md or docs/ (found by the docswalk helper); so were 38
    names of the other modules' __all__ (data.load_npz, evaluate.EvalError, ima.search_rounds, seven report
    functions, pretrain.nt_xent, reproduce.run_protocol, ...; found by the docs2 helper). EXPORTING_MODULES is
    every module of the package whose source sets __all__, so a new one is checked too."""
    import importlib

    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))])
    modules = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
               for path in (REPO / "robust_ops").rglob("*.py") if re.search(r"^__all__", path.read_text(), re.M)}
    assert modules == set(EXPORTING_MODULES)
    unnamed = [f"{module}.{name}" for module in EXPORTING_MODULES for name in importlib.import_module(module).__all__
               if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert not unnamed


def test_every_exported_signature_names_its_parameters():
    """help() of an exported function, class or public method names each parameter its signature has: ifgsm (bim)
    and cw_linf named none of model, loss, targeted, clip_min, clip_max, model_mode; fab_t and uniform_ball none of
    theirs (shape, device, dtype); FABT's docstring left out n_restarts, alpha_max, eta, beta, APGDT's loss,
    n_restarts and rho, Square's resample_unchanged, AutoAttack's model_mode and clip range; IMA's left out clip_min,
    clip_max, search_result, sync and backend (and its __call__ had no docstring), MarginTable's init_margin, norm,
    device, dtype and process_group. *args / **options are covered by the class's text (Attack's options); the
    pooling functions take F.max_pool2d's geometry by reference."""
    by_reference = {"robust_ops.max_pool2d", "robust_ops.functional.max_pool2d", "robust_ops.reference.max_pool2d",
                    "robust_ops.reference.drop_max_pool2d"}
    unnamed = {}
    for qualname, fn, doc in exported_callables():
        if qualname in by_reference:
            continue
        named = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        missing = [p for p in named if not re.search(rf"\b{p}\b", doc)]
        if missing or not doc.strip():
            unnamed[qualname] = missing or "no docstring"
    assert not unnamed


def test_attack_class_docstrings_quote_their_defaults():
    """An attack class's docstring opens with its constructor call, ``APGDT(model, eps=8/255, ...)``: every keyword
    it quotes is a parameter with that default (APGDT's, FABT's and Square's left some out)."""
    import ast

    from robust_ops import attacks

    quoted = {}
    for name in attacks.__all__:
        cls = getattr(attacks, name)
        if not (inspect.isclass(cls) and issubclass(cls, attacks.Attack)) or cls is attacks.Attack:
            continue
        calls = re.findall(rf"``({name}\([^`]*?\))(?:\(x, y\))?``", inspect.getdoc(cls))
        assert calls, name
        call = ast.parse(" ".join(calls[0].replace("*, ", "").split()), mode="eval").body
        params = inspect.signature(cls).parameters
        quoted[name] = {kw.arg: eval(ast.unparse(kw.value), {}) for kw in call.keywords}  # 8/255, None, "linf"
        wrong = {k: v for k, v in quoted[name].items() if k not in params or params[k].default != v}
        assert not wrong, (name, wrong)
    assert {"n_restarts", "alpha_max", "eta", "beta"} <= set(quoted["FABT"])
    assert {"loss", "n_restarts", "rho"} <= set(quoted["APGDT"])

def test_replace_maxpool_docstring_names_each_refusal():
    """replace_maxpool's Raises named neither the TypeError for a model that is no nn.Module nor the ValueErrors for
    a pool with state-dict hooks or with DropMax2d's own attribute set by hand (docs/dropmax-any-cnn.md names both):
    each refusal's type lists it."""
    import torch
    from torch import nn

    import robust_ops

    hooked, tagged = nn.MaxPool2d(2), nn.MaxPool2d(2)
    hooked.register_state_dict_pre_hook(lambda module, prefix, keep_vars: None)
    tagged.backend = "stem"
    raises = " ".join(robust_ops.replace_maxpool.__doc__.split("Raises:")[1].split())
    sections = dict(re.findall(r"(\w+Error): (.*?)(?= \w+Error: |$)", raises))
    for model, phrase in ((torch.zeros(1), "not an ``nn.Module``"), (nn.Sequential(hooked), "state-dict hooks"),
                          (nn.Sequential(tagged), "DropMax2d uses itself")):
        with pytest.raises((TypeError, ValueError)) as caught:
            robust_ops.replace_maxpool(model)
        assert phrase in sections[caught.type.__name__], (caught.type.__name__, phrase)


def test_prepacked_conv_docstring_quotes_the_current_measurements():
    """help(robust_ops.prepacked_conv) quoted the measurements made before the 2026-12-01 layout fix ("1.2-1.4x
    faster than ATen's on NCHW at 4-128 rows"), which docs/prepacked-conv.md keeps as superseded: on NCHW models it
    is now slower from about 16 rows. It quotes the first (current) table's forward + input gradient ratios."""
    from robust_ops import prepacked_conv

    page = (REPO / "docs/prepacked-conv.md").read_text()
    table = page[page.index("## Measured"):].split("\n## ")[0]
    doc = " ".join(prepacked_conv.__doc__.split())
    for batch in (4, 128):
        (row,) = [line for line in table.splitlines() if line.startswith(f"| {batch} |")]
        cells = row.split("|")[1:-1]
        for layout, cell in (("NCHW", cells[2]), ("channels_last", cells[4])):
            ratios = sorted(re.search(r"\(\**([\d.]+), ([\d.]+)×", cell).groups(), key=float)
            quoted = f"{ratios[0]}-{ratios[1]}x"
            assert re.search(rf"{layout}[^:;]*?{re.escape(quoted)}(?: faster)? at {batch}\b", doc), (layout, quoted)


def test_memory_examples_are_the_formulas_bytes():
    """getting-started's Memory paragraph quotes images x channels x size^2 x 4 bytes for its examples, in decimal
    units as its GB figures are: 750 RGB images at 224 were quoted as 431 MB (MiB; 452 MB)."""
    text = (REPO / "docs/getting-started.md").read_text()
    memory = " ".join(text[text.index("**Memory.**"):].split("\n\n")[0].split())
    quoted = {
        (750, 3, 224, 4): r"750 RGB images at `--size 224`: (\S+) MB",
        (10015, 3, 224, 4): r"10,015 at 224: (\S+) GB",
        (780, 1, 28, 4): r"BreastMNIST (\S+) MB",
        (107180, 3, 224, 4): r"107,180 RGB images: (\S+) GB as float32",
        (107180, 3, 224, 1): r"beside its (\S+) GB of uint8",
    }
    for (images, channels, size, itemsize), pattern in quoted.items():
        (figure,) = re.findall(pattern, memory)
        unit = 1e6 if pattern.endswith("MB") else 1e9
        decimals = len(figure.partition(".")[2])
        assert float(figure) == round(images * channels * size ** 2 * itemsize / unit, decimals), pattern


def nan_output_model(inner):
    """A model whose outputs are ``inner``'s times NaN: no class probabilities."""
    import torch

    class NaNOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * float("nan")

    return NaNOutput()

def test_attack_docstrings_name_the_input_errors_each_raises():
    """help() of run_pgd, every attack function, Attack, AutoAttack and gen_adv had no Raises: a caller could not
    learn that each refuses NaN / Inf inputs (NonFiniteInputError), outputs without class probabilities at its first
    forward (NonFiniteOutputError; gen_adv: a ValueError naming the samples) and inputs of another dtype, device or
    channel count than the model's (InputDtypeError, InputDeviceError, InputShapeError), nor import those classes
    from robust_ops.attacks. Each docstring names them after "Raise", and each is what a small case raises."""
    import torch
    from torch import nn

    from robust_ops import attacks, ima

    def conv():
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))

    torch.manual_seed(0)
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    nan_x = x.clone()
    nan_x[1, 0, 2, 2] = float("nan")
    cases = {attacks.NonFiniteInputError: (conv(), nan_x), attacks.NonFiniteOutputError: (nan_output_model(conv()), x),
             attacks.InputDtypeError: (conv(), x.double()), attacks.InputShapeError: (conv(), torch.rand(3, 2, 4, 4)),
             attacks.InputDeviceError: (conv().to("meta"), x)}
    eps = dict(eps=0.03)
    runs = {
        attacks.run_pgd: lambda m, x: attacks.run_pgd(m, x, y, eps=0.03, alpha=0.01, steps=1),
        attacks.fgsm: lambda m, x: attacks.fgsm(m, x, y, **eps),
        attacks.ifgsm: lambda m, x: attacks.ifgsm(m, x, y, steps=1, **eps),
        attacks.pgd: lambda m, x: attacks.pgd(m, x, y, steps=1, **eps),
        attacks.cw_linf: lambda m, x: attacks.cw_linf(m, x, y, steps=1, **eps),
        attacks.apgd: lambda m, x: attacks.apgd(m, x, y, steps=1, **eps),
        attacks.apgd_t: lambda m, x: attacks.apgd_t(m, x, y, steps=1, **eps),
        attacks.fab: lambda m, x: attacks.fab(m, x, y, steps=1, **eps),
        attacks.fab_t: lambda m, x: attacks.fab_t(m, x, y, steps=1, **eps),
        attacks.square: lambda m, x: attacks.square(m, x, y, n_queries=1, **eps),
        attacks.white_noise: lambda m, x: attacks.white_noise(m, x, y, trials=1, **eps),
        attacks.ensemble: lambda m, x: attacks.ensemble(m, x, y, [attacks.FGSM(m, **eps)]),
        attacks.Attack: lambda m, x: attacks.PGD(m, steps=1, **eps)(x, y),
        attacks.AutoAttack: lambda m, x: attacks.AutoAttack(m, version="custom", attacks=["fgsm"], **eps)(x, y),
        ima.gen_adv: lambda m, x: ima.gen_adv(m, x, y, 0.1, steps=1, search_steps=1),
    }
    for fn, run in runs.items():
        raises = " ".join(fn.__doc__.partition("Raise")[2].split())
        for error, (model, inputs) in cases.items():
            documented = error.__name__ in raises
            if fn is ima.gen_adv and error is attacks.NonFiniteOutputError:
                error, documented = ValueError, "ValueError: the model's output" in raises
            assert documented, (fn.__name__, error.__name__)
            with pytest.raises(error):
                run(model, inputs)


def test_fit_evaluate_and_loaders_name_the_errors_they_raise(tmp_path):
    """help() of fit, evaluate, load_checkpoint, load_weights, load_dataset, load_csv and load_npz had no Raises:
    nothing said that fit stops with NonFiniteLossError, OneSampleBatchError, UnreadableCheckpointError,
    LostBestEpochError, CollectiveTimeoutError or the attacks' input errors, that evaluate refuses with EvalError
    (its ``arg`` naming the option) or that the loaders refuse with DataError (load_checkpoint said "a ValueError").
    Each docstring names them after "Raises:", and a small case raises each one checked here."""
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from robust_ops import attacks, data, evaluate, train

    def named(fn, *errors):
        raises = " ".join(fn.__doc__.partition("Raises:")[2].split())
        assert all(error.__name__ in raises for error in errors), (fn.__name__, raises)

    def flat():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))

    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    named(train.fit, train.NonFiniteLossError, train.OneSampleBatchError, train.UnreadableCheckpointError,
          train.LostBestEpochError, train.CollectiveTimeoutError, attacks.InputDtypeError, attacks.InputShapeError)
    fit = dict(epochs=1, batch_size=2, progress=False)
    batch_norm = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    for error, model, dataset, options in (
            (train.NonFiniteLossError, nan_output_model(flat()), TensorDataset(x, y), {}),
            (train.OneSampleBatchError, batch_norm, TensorDataset(x[:3], y[:3]), {}),
            (train.UnreadableCheckpointError, flat(), TensorDataset(x, y), dict(resume=str(junk))),
            (attacks.InputDtypeError, flat(), TensorDataset(x.double(), y), {})):
        with pytest.raises(error):
            train.fit(model, "standard", dataset, **fit, **options)
    for fn in (train.load_checkpoint, lambda path: train.load_weights(flat(), path)):
        with pytest.raises(train.UnreadableCheckpointError):
            fn(junk)
    named(train.load_checkpoint, train.UnreadableCheckpointError)
    named(train.load_weights, train.UnreadableCheckpointError)

    named(evaluate.evaluate, evaluate.EvalError)
    info = data.load_dataset("synthetic").info
    for arg, model, dataset, options in (("eps", flat(), TensorDataset(x, y), dict(eps="abc")),
                                         ("data", flat(), TensorDataset(x * 3, y), {}),
                                         ("model", nan_output_model(flat()), TensorDataset(x, y), {})):
        with pytest.raises(evaluate.EvalError) as caught:
            evaluate.evaluate(model, dataset, info, attacks="fgsm", **options)
        assert caught.value.arg == arg and f'"{arg}"' in evaluate.evaluate.__doc__

    np.savez(tmp_path / "other.npz", images=np.zeros(3))
    (tmp_path / "rows.csv").write_text("image_id,dx\nimg1,nv\n")
    for fn, arg in ((data.load_dataset, tmp_path / "missing"), (data.load_npz, tmp_path / "other.npz"),
                    (data.load_csv, tmp_path / "rows.csv")):
        named(fn, data.DataError)
        with pytest.raises(data.DataError):
            fn(arg)
