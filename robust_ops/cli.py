"""The ``robust-ops`` command line (also ``python -m robust_ops``): train, eval, bench, demo, reproduce.

Every option of train, eval, demo and reproduce can also come from a YAML or JSON file (``--config FILE``, keys are
the long option names, e.g. ``batch-size: 32``); flags on the command line win (bench takes no config file), and
every on/off flag of those four commands takes its opposite (``--quick`` / ``--no-quick``) to turn a file's off.
Errors are one line naming the flag or file at fault, exit 2.
Checkpoints load with ``torch.load(weights_only=True)`` and datasets with ``np.load(allow_pickle=False)``: a shared
file can never run code, and a file that would need to is refused.
"""

import argparse
import contextlib
import copyreg
import errno
import functools
import inspect
import json
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path

__all__ = ["main"]  # the command line itself; the rest are its helpers (reproduce and the tests reach into them)

PROG = "robust-ops"
DEMO_METHODS = ("standard", "rst", "mirst", "mirst-dm", "ima")
DEMO_LABELS = {"standard": "Baseline"}  # table labels; every other registered defense is its name upper-cased
RUN_FILE = "run.json"
DROPMAX_CHOICES = ("none", "first", "all")
CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "best_model.pt"  # --restore-best's weights of the best epoch (robust_ops.train.BEST_MODEL_NAME)


class CLIError(Exception):
    """A user error: printed as one line ``robust-ops <command>: error: <message>``, exit status 2."""


class ArgumentError(CLIError, ValueError):
    """A command's CLIError met by a Python function that takes the command's flags as arguments (a ValueError): its
    text is in the function's words, ``<func>: <arg>: <problem>`` for a ``--flag: <problem>`` (``run_protocol: lr:
    expected a finite learning rate > 0, got -1``), ``<func>: <message>`` for a message without that lead
    (``run_protocol: mirst-bus: ...``), and each flag in it named as its argument where ``arguments`` (the function's
    parameter names) holds it (``choose another out``, but ``a train --out``, another command's; until 2026-12-07 the
    body kept ``--out``, and a message without the lead was a ValueError unpacking it); ``command_words`` keeps the
    command's line (``--lr: ...``), which main prints."""

    def __init__(self, func, err, arguments=()):
        self.command_words = str(err)
        lead = re.match(r"--([a-z][a-z0-9-]*): ", self.command_words)
        arguments = {*arguments, *([lead[1].replace("-", "_")] if lead else [])}

        def named(flag):  # --paper-schedule: paper_schedule, where the function takes it
            name = flag[1].replace("-", "_")
            return name if name in arguments else flag[0]

        # another command's flag ("a train --out") stays
        flags = r"(?<![\w-])(?<!train )(?<!eval )(?<!demo )(?<!bench )--([a-z][a-z0-9-]*)"
        super().__init__(f"{func}: " + re.sub(flags, named, self.command_words))

    def __reduce__(self):
        # the default rebuilt ArgumentError(message) alone, a TypeError for the missing err (a worker process could
        # not hand it to its parent): the text is rebuilt as it is, without __init__'s rewording, and the instance's
        # __dict__ (command_words, __notes__, any attribute set on it) goes with it
        return copyreg.__newobj__, (type(self), str(self)), self.__dict__


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # no prefixes of option names: reproduce's --seeds took a mistyped --seed 3 (train's RNG seed) as 3 seeds
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # a value that starts with a minus sign is a value, not an option: argparse's own rule takes -3 and -0.5 alone,
        # so `--lr -1e-3`, `--eps -1/255` or `--lr -inf` were "expected one argument", not their own range errors
        self._negative_number_matcher = re.compile(r"^-(?:\.?\d|inf(?:inity)?$|nan$)", re.IGNORECASE)

    def error(self, message):  # one line instead of usage + message
        raise CLIError(f"{message} (see {self.prog} --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not state its default already and X says something (not
    None, False or an empty list)."""

    def _get_help_string(self, action):
        if "(default" in action.help or action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _formatter(prog):
    return _HelpFormatter(prog, max_help_position=32, width=110)


class Switch(argparse.Action):
    """An on/off flag, off by default, that also takes its opposite (``--quick`` / ``--no-quick``, ``--no-progress`` /
    ``--progress``): a config file's ``quick: true`` can then be turned off on the command line, which wins."""

    def __init__(self, option_strings, dest, default=False, help=None):
        flag = option_strings[0]
        opposite = f"--{flag[len('--no-'):]}" if flag.startswith("--no-") else f"--no-{flag[2:]}"
        super().__init__([*option_strings, opposite], dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string != self.option_strings[-1])

    def format_usage(self):
        return " | ".join(self.option_strings)  # usage: [--quick | --no-quick], as argparse.BooleanOptionalAction


class GivenOnce(argparse.Action):
    """An option given at most once on the command line: of two, argparse kept the last and the first was lost
    silently. A config file's value is a default, which the command line replaces (``_given``: the flags given)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", {})
        text = ",".join(values) if isinstance(values, tuple) else str(values)
        if self.dest in given:
            parser.error(f"{option_string}: given twice {self.twice(given[self.dest], text)}")
        given[self.dest] = text
        setattr(namespace, self.dest, values)


class OneList(GivenOnce):
    """A comma-separated list option (--attacks, --eps, --methods, --classes, --only): a second ``--attacks pgd``
    replaced the first ``--attacks fgsm``, where the repeatable --defense-opt adds up."""

    @staticmethod
    def twice(first, second):
        return f"({first!r} and {second!r}); list them once, comma-separated ({first},{second})"


class OneConfig(GivenOnce):
    """``--config FILE``: a second --config replaced the first, whose options were then lost (files do not merge, as
    they do not nest)."""

    @staticmethod
    def twice(first, second):
        return f"({first} and {second}); config files do not merge -- give one"


# ----------------------------------------------------------------------------------------------- shared helpers


def path_text(text):
    """A path option's value (--out, --config, eval's RUN_DIR, --bench-dir) with ``~`` expanded, as --data's is: a
    config file's ``out: ~/runs/x`` (or ``--out=~/runs/x``, which the shell leaves as it is) made a folder named ``~``
    in the working directory."""
    return os.path.expanduser(text)


class ConfigItem(str):
    """A repeatable option's value that came from a --config file: the command line's own may override its keys."""


def parse_key_values(items, flag):
    """``["eps=5/255", "steps=10"]`` -> {"eps": 0.0196, "steps": 10}; values: numbers, fractions, booleans,
    comma-separated lists of numbers, or strings. A key given twice on the command line (or twice in the config file)
    is an error -- the first value would be lost; a command-line key overrides the config file's (ConfigItem)."""
    from .evaluate import parse_number

    out, given = {}, {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise CLIError(f"{flag}: expected key=value, got {item!r}")
        key = key.strip().replace("-", "_")
        source = "config" if isinstance(item, ConfigItem) else "command line"
        if given.get(key, (None,))[0] == source:
            raise CLIError(f"{flag}: {key} is given twice ({given[key][1]!r} and {str(item)!r}); give it once")
        given[key] = (source, str(item))
        out[key] = _value(value.strip(), parse_number)
    return out


def _value(text, parse_number):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if "," in text:
        return tuple(_value(t.strip(), parse_number) for t in text.split(",") if t.strip())
    try:
        v = parse_number(text)
        return int(v) if text.lstrip("+-").isdigit() else v
    except ValueError:
        return text


class _RepeatedKey(Exception):
    """A key a config file's mapping gives twice: YAML and JSON keep the last value, and the first was lost."""


def _unique_pairs(pairs, where=lambda key: ""):
    """dict(pairs) (json.loads' object_pairs_hook); a key given twice is a _RepeatedKey, ``where(key)`` saying where."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKey(f"{key!r} is given twice{where(key)}; give it once (its first value would be lost)")
        seen.add(key)
    return dict(pairs)


def _safe_load_unique_keys(text):
    """yaml.safe_load that refuses a mapping giving a key twice (at any depth, e.g. in defense-opt's mapping)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                lines, pairs = {}, []
                # the mapping's own scalar keys: a merge (`<<: *defaults`) may be overridden by design
                for key_node, _ in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                        key = self.construct_object(key_node)
                        lines.setdefault(key, []).append(key_node.start_mark.line + 1)
                        pairs.append((key, None))
                _unique_pairs(pairs, lambda key: f" (line {lines[key][0]})" if lines[key][0] == lines[key][1] else
                              f" (lines {lines[key][0]} and {lines[key][1]})")
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Loader)  # a SafeLoader: plain data only, as yaml.safe_load


def load_config_file(path):
    p = Path(path)
    if p.is_dir():  # it said "no such file" of a folder that is there
        raise CLIError(f"--config: {path}: is a folder; give the YAML or JSON file in it")
    if not p.is_file():
        raise CLIError(f"--config: {path}: no such file")
    try:
        text = p.read_text()
    except UnicodeDecodeError as err:  # a binary file, or one saved in another encoding
        raise CLIError(f"--config: {path}: not UTF-8 text ({err.reason} at byte {err.start}); --config takes a YAML "
                       "or JSON file, saved as UTF-8") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            data = _safe_load_unique_keys(text)
    except _RepeatedKey as err:
        raise CLIError(f"--config: {path}: {err}") from None
    except Exception as err:
        raise CLIError(f"--config: {path}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'} "
                       f"({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"--config: {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def apply_config(parser, args, argv):
    """Re-parse ``argv`` with the config file's values as defaults (the command line wins). Values are checked and
    converted as the same option's command-line text would be (type, choices); a repeatable option takes a list or
    one value, and its command-line occurrences are appended after the file's."""
    if not getattr(args, "config", None):
        return args
    data = load_config_file(args.config)
    # options only: a positional (eval's target, reproduce's name) is required on the command line, which wins, so
    # the file's value was always ignored
    dests = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    defaults, keys = {}, {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in dests:
            known = ", ".join(sorted(d.replace("_", "-") for d in dests))
            raise CLIError(f"--config: {args.config}: unknown option {key!r} (expected one of {known})")
        if dest in keys:  # batch-size and batch_size: one option, the first value lost
            raise CLIError(f"--config: {args.config}: {keys[dest]!r} and {key!r} are the same option; give it once "
                           "(its first value would be lost)")
        keys[dest] = key
        defaults[dest] = _config_value(parser, dests[dest], value, f"--config: {args.config}: option {key!r}")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def _config_value(parser, action, value, where):
    """A config file's value for ``action``, as argparse would store the same option given on the command line
    (argparse runs neither type nor choices on defaults that are not strings, so it is done here)."""
    # `epochs:`, `epochs: null` or `out: ''`: the option's default, as if left out (None failed as a value; an empty
    # string was the flag's text: `out: ''` wrote in the current folder, `epochs: ''` was an invalid int)
    if value is None or (isinstance(value, str) and not value.strip()):
        return action.default
    if action.nargs == 0:  # store_true-style flags
        if not isinstance(value, bool):
            parser.error(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):  # defense-opt: {eps: 2/255} reads as eps=2/255
            value = [f"{k}={v}" for k, v in value.items()]
        # a list default, never a string: argparse appends command-line occurrences to it
        items = [_config_item(parser, action, v, where) for v in (value if isinstance(value, list) else [value])]
        return [ConfigItem(v) if isinstance(v, str) else v for v in items]
    # comma-separated options (--attacks, --eps, --methods) also take YAML lists; another option's list is refused
    # below: joined, `out: [a, b]` trained into a folder named "a,b"
    if isinstance(value, list) and isinstance(action, OneList):
        if not value:  # "" would reach the option as if given empty on the command line, blamed on the flag
            parser.error(f"{where}: expected at least one value, got an empty list")
        value = ",".join(str(v) for v in value)
    return _config_item(parser, action, value, where)


def _config_item(parser, action, value, where):
    if isinstance(value, (dict, list)):
        parser.error(f"{where}: expected a single value, got a {'mapping' if isinstance(value, dict) else 'list'}")
    text = value if isinstance(value, str) else str(value)
    if action.type is None:
        value = text  # what the command line would give
    else:
        try:
            value = action.type(text)
        except argparse.ArgumentTypeError as err:
            parser.error(f"{where}: {err}")
        except (TypeError, ValueError):
            parser.error(f"{where}: invalid {getattr(action.type, '__name__', 'value')} value: {text!r}")
    if action.choices is not None and value not in action.choices:
        parser.error(f"{where}: invalid choice {value!r} (expected one of {', '.join(map(str, action.choices))})")
    return value


def refuse_empty_values(parser, args):
    """An option or argument given as an empty (or blank) string, on the command line or in a config file, is an
    error naming it: it was read as not given (eval's --out, --data, --model and --method fell back to the run's,
    --config was skipped, bench's --only '' ran every benchmark) or as the current folder (train's and demo's --out
    wrote there, train --out '' replacing a run it held; --data '' read it as a dataset), e.g. an unset shell
    variable in `--out "$RUN"`. A repeatable option's empty entry is its own check's error (--defense-opt), as is an
    empty --methods (reproduce's lists the protocol's methods)."""
    for action in parser._actions:
        if action.nargs == 0 or isinstance(action, argparse._AppendAction) or action.dest in ("help", "methods"):
            continue
        value = getattr(args, action.dest, None)
        if isinstance(value, str) and not value.strip():
            name = action.option_strings[0] if action.option_strings else action.metavar or action.dest
            fix = f"; to get its default, leave {name} out" if action.option_strings else ""
            raise CLIError(f"{name}: expected a value, got {value!r}{fix}")


def check_image_options(args):
    """--size and --bit-depth out of range, refused by the flag before any data is read (train, eval, demo,
    reproduce): the loaders' errors named their function and keyword (`--bit-depth: load_busi(DIR): expected bit_depth
    to be an integer >= 8, got 4`), and an .npz's told to drop a --size 0 as if 0 were another size."""
    size, bits = getattr(args, "size", None), getattr(args, "bit_depth", None)
    if size is not None and size < 1:
        raise CLIError(f"--size: expected an image side length >= 1, got {size}")
    if bits is not None and not 8 <= bits <= 16:
        raise CLIError(f"--bit-depth: expected 8 to 16 (the bits of a 16-bit image file that hold the intensity, 12 "
                       f"for most CT and X-ray PNGs), got {bits}")


def pick_device(name):
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    import re

    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not (name == "cpu" or match):
        raise CLIError(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}")
    from ._options import cuda_device_problem

    # an index past the last GPU would otherwise fail deep inside training with "invalid device ordinal"
    problem = cuda_device_problem(torch.device(name))
    if problem:
        raise CLIError(f"--device: {name} requested but {problem}")
    return name


def check_environment_switches():
    """The library's $ROBUST_OPS_* settings, read deep inside a command (a bad value was a traceback in train, an
    error blamed on --attacks in eval, or one after run.json was written): checked before any work, naming the
    variable."""
    from . import _backend, memory, native_layers, prepacked_conv

    for read in (memory.pool_enabled_by_default, memory.pool_limit_mb, native_layers.native_layers_enabled_by_default,
                 prepacked_conv.prepacked_conv_enabled_by_default, lambda: _backend.requested_backend(PROG),
                 _cpu_isa_cap):
        try:
            read()
        except ValueError as err:  # "robust_ops: expected $NAME to be one of ...": the variable and its values
            raise CLIError(str(err).split(": ", 1)[-1]) from None


def _cpu_isa_cap():
    """$ROBUST_OPS_CPU_ISA read as the CPU pooling kernels read it (their own check, at their first call: a
    RuntimeError traceback inside the first max pooling, in train after run.json was written); a ValueError."""
    import torch

    try:
        torch.ops.robust_ops._cpu_vector_isa()
    except RuntimeError as err:  # "_cpu_vector_isa: expected $ROBUST_OPS_CPU_ISA to be avx512, avx2 or scalar, ..."
        raise ValueError(str(err).splitlines()[0]) from None


# Set by main() from the command's --download flag for the duration of one command.
_allow_download = False

DOWNLOAD_HELP = ("let a MedMNIST name missing locally be downloaded through the optional medmnist package (default: "
                 "never download; the error says where to put the file)")


def _trained_split_by(run, data, same_data):
    """How the run's own CSV was split, so eval tests on its test split: the recorded grouping column, else by image
    (runs recorded without one, among them those trained before CSVs were split by lesion_id); None otherwise."""
    record = run.get("dataset")
    if not same_data or not record or not str(data).lower().endswith(".csv"):
        return None
    return record.get("split_by", "image")


def _trained_rare_classes(run, data, same_data):
    """How the run's own folder / CSV split treated classes too small to stratify (its run.json's record: "random"
    where it records none, the rule before 2026-12-06), so eval tests on its test split; None otherwise."""
    from .data.core import reads_image_files, trained_rare_classes

    if not same_data or not run.get("dataset") or not reads_image_files(str(data)):
        return None
    return trained_rare_classes(run["dataset"])


def split_by_refusal(run_dir, was, now, in_python=True):
    """Why RUN_DIR cannot resume when its CSV would now be split by another rule (resume_conflict's "split_by"), and
    what to do: its samples digest differs too, but a digest mismatch says neither. ``in_python``: and how to
    continue it in Python (one run of train or demo; reproduce's folds and subsets are no load_dataset split)."""
    def how(split_by):
        return "by image" if split_by == "image" else f"by {split_by} (every image of a {split_by} on one side)"

    recorded = " (its run.json records no dataset.split_by: runs trained before CSVs with a lesion_id column were " \
               "split by lesion, or on a CSV without one)" if was == "image" else ""
    why = (f"{Path(run_dir) / RUN_FILE} was trained on its CSV split {how(was)}{recorded}, and this command splits "
           f"it {how(now)}: the training images would differ, and the test split could hold images the run trained "
           f"on. `{PROG} eval` still tests the run on its own split")
    return f"{why}; to continue it, in Python, load_dataset(..., split_by={was!r}) and fit(..., resume=)" \
        if in_python else why


def rare_classes_refusal(run_dir, in_python=True):
    """Why RUN_DIR cannot resume when its data, split before 2026-12-06, would now be split by the rare-class rule;
    ``in_python``: and how to continue it in Python (one run of train or demo; reproduce's protocol is no one run)."""
    why = (f"{Path(run_dir) / RUN_FILE} was trained on a split drawn before 2026-12-06, when a class too small to "
           "stratify made every class's split random; this version stratifies the other classes, so the training "
           f"images would differ. `{PROG} eval` still tests the run on its own split")
    return f"{why}; to continue it, in Python, load_dataset(..., rare_classes='random') and fit(..., resume=)" \
        if in_python else why


def load_data(spec, size=None, seed=0, flag="--data", classes=None, bit_depth=None, split_by=None, channels=None,
              rare_classes=None):
    from .data import DataError, load_dataset

    try:
        return load_dataset(spec, size=size, seed=seed, classes=classes, download=_allow_download,
                            bit_depth=bit_depth, split_by=split_by, channels=channels, rare_classes=rare_classes)
    except DataError as err:
        raise _data_error(err, flag) from None


# load_dataset's keyword arguments that are command-line flags: a DataError naming one is written as the flag
DATA_FLAG_ARGS = ("size", "classes", "bit_depth", "channels")


def _wrapped_weights(net, weights):
    """How ``weights`` wrap ``net``'s state dict (``"under 'model.', beside mean, std"``), or None: a model trained
    in a wrapper (``attacks.Normalized``, a ``nn.Sequential(normalize, model)``) saved its keys under a prefix, and
    load_state_dict's "Missing key(s)" did not say so."""
    own = set(net.state_dict())
    for prefix in sorted({k.split(".", 1)[0] + "." for k in weights if "." in k}):  # sorted: the same words each run
        inner = {k[len(prefix):] for k in weights if k.startswith(prefix)}
        if inner == own:
            rest = sorted(k for k in weights if not k.startswith(prefix))
            return f"under {prefix!r}" + (f", beside {', '.join(rest)}" if rest else "")
    return None


def _data_error(err, flag):
    """A DataError as the CLI's one-line error: led by the flag of the keyword argument it names, else by ``flag``;
    the keyword arguments it mentions written as their flags (``size=64`` -> ``--size 64``, ``classes=`` ->
    ``--classes``, ``bit_depth=8`` -> ``--bit-depth 8``)."""
    import re

    # load_busi(DIR): / load_csv(FILE): name the Python function that checked its argument; the flag names the fix
    text = _flag_words(re.sub(r"^load_(?:busi|csv)\((.+?)\): ", r"\1: ", str(err)))
    return CLIError(f"{_flag(err.arg)}: {text}" if err.arg else f"{flag}: {text}")


def _flag(key):
    """The command-line flag of a keyword argument or run.json setting: ``bit_depth`` -> ``--bit-depth``."""
    return f"--{key.replace('_', '-')}"


def _flag_words(text):
    """``text`` with load_dataset's keyword arguments written as their flags; a keyword the data layer follows with
    its flag for both readers (``drop bit_depth= (--bit-depth)``, ``pass size=28 (--size 28)``) as the flag alone."""
    import re

    for arg in DATA_FLAG_ARGS:
        option = _flag(arg)
        text = re.sub(rf"\b{arg}=[^\s;,)]* \(({option}(?: [^()]*)?)\)", r"\1", text)
        text = re.sub(rf"\b{arg}=(?=[^\s;,)])", f"{option} ", text)  # size=64 -> --size 64
        text = re.sub(rf"\b{arg}=", option, text)  # size= resizes -> --size resizes
    return text


def data_spec(spec):
    """``--data`` as run.json records it: a file or folder path made absolute, so `eval` and `--resume` run from
    another working directory read the same data; a dataset name as load_dataset reads it, whatever its spelling
    (``synthetic-bus`` -> ``synthetic``, ``BreastMNIST`` -> ``breastmnist``), so `--resume` with another spelling is
    the same run."""
    from .data.core import MOONS_NAMES, SYNTHETIC_NAMES
    from .data.medmnist import is_medmnist_name

    if spec is None:
        return spec
    text = str(spec)
    low = text.lower()
    for names in (SYNTHETIC_NAMES, MOONS_NAMES):  # load_dataset reads these as names, never as paths
        if low in names:
            return names[0]
    path = Path(text).expanduser()
    if path.is_dir() or (low.endswith((".npz", ".csv")) and path.exists()):
        return os.path.abspath(path)
    return low if is_medmnist_name(low) else text  # load_dataset reads a MedMNIST name in lower case


def same_data_source(spec, other):
    """Whether two ``--data`` values name the same data: equal as run.json records them (:func:`data_spec`), or paths
    to one file or folder, through symbolic links (os.path.samefile): a run trained on a folder and resumed, or
    evaluated, through a link to it (or it through the link it was trained by) was another --data, refused by
    --resume and attacked by eval as other data (its own split, --classes, --bit-depth and checks left out)."""
    spec, other = data_spec(spec), data_spec(other)
    if spec == other:
        return True
    try:
        return None not in (spec, other) and os.path.isabs(spec) and os.path.isabs(other) and \
            os.path.samefile(spec, other)
    except OSError:  # one no longer there (moved or deleted since the run trained)
        return False


def bit_reading(bit_depth):
    """A --bit-depth as the loader reads 16-bit image files: 16 is the full 16 bits, the reading without --bit-depth
    (None), so a run trained without it takes --bit-depth 16 (eval, --resume) and one trained with it none."""
    return None if bit_depth == 16 else bit_depth


def _split_read(split):
    """A reproduce run's split record as --resume compares it: its size as given left out (the loaded image size is
    compared apart), its --bit-depth as the reading (:func:`bit_reading`)."""
    kept = {k: v for k, v in split.items() if k not in ("size", "bit_depth")}
    return {**kept, "bit_depth": bit_reading(split.get("bit_depth"))}


def keep_recorded_reading(run, old):
    """``run`` (this command's run_record, resuming the run whose run.json is ``old``) with the run's own words for
    its 16-bit reading, which --resume took as the same: --bit-depth 16 on a run recorded without it (or none on one
    recorded with 16) rewrote run.json's bit_depth (and a reproduce split record's), null -> 16 or 16 -> null."""
    run["bit_depth"] = old.get("bit_depth")
    if isinstance(run.get("split"), dict) and isinstance(old.get("split"), dict):
        split = {k: v for k, v in run["split"].items() if k != "bit_depth"}
        if old["split"].get("bit_depth") is not None:
            split["bit_depth"] = old["split"]["bit_depth"]
        run["split"] = split
    return run


def _counts(counts):
    return f"{sum(counts.values())} images ({', '.join(f'{k} {v}' for k, v in counts.items())})"


def make_model(name, info, dropmax="none", dropmax_from=None):
    """The CLI's model: build_model's, with ``dropmax`` ("none", "first", "all") max-poolings made drop-max;
    ``dropmax_from`` names where that came from in an error (eval: run.json's dropmax; None: --dropmax)."""
    from .models import MODELS, build_model

    if name not in MODELS:  # build_model's own refusal names build_model, which a CLI user never called
        raise CLIError(f"--model: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if not info.image_size and name != "mlp":  # image_size 0: feature vectors (two-moons); a CNN fails mid-training
        raise CLIError(f"--model: {name} takes images, but {info.display_name} holds feature vectors of "
                       f"{info.in_channels} values; use --model mlp")
    try:
        model = build_model(name, info.in_channels, info.num_classes, info.image_size)
    except ValueError as err:
        raise CLIError(f"--model: {err}") from None
    if dropmax != "none":
        import torch.nn as nn

        from .nn import replace_maxpool

        # replace_maxpool's own refusal spoke to code ("call robust_ops.drop_max_pool2d there"), not to the command;
        # eval's dropmax is run.json's (dropmax_from names it): eval has no --dropmax to leave out
        flag, fix = ((dropmax_from, f"the file was edited or damaged -- restore the run's own {RUN_FILE}, or train "
                      "it again") if dropmax_from else
                     ("--dropmax", "leave --dropmax out or use a model with max pooling (e.g. small_cnn or resnet18)"))
        if not any(isinstance(m, nn.MaxPool2d) for m in model.modules()):
            raise CLIError(f"{flag}: --model {name} has no max-pooling layer to replace; {fix}")
        try:
            model = replace_maxpool(model, which=dropmax)
        except ValueError as err:
            raise CLIError(f"{flag}: {err}") from None
    return model


def defense_key(name):
    """A registered defense's name as the registry spells it (``MIRST_DM`` -> ``mirst-dm``, as defenses.build reads
    it); a dotted import path, or an unknown name (refused later), as given."""
    from . import defenses
    from ._import_path import is_import_path

    key = name.lower().replace("_", "-") if isinstance(name, str) and not is_import_path(name) else name
    return key if key in defenses.NAMES else name


def clip_range_problem(name, cls, info):
    """What is wrong with a PGDDefense subclass whose __init__ takes no clip_min/clip_max (its attack settings fixed)
    on data outside [0, 1], to which train gives it the data's range; None when nothing is. Without this, the options
    added read as the user's own unknown --defense-opt, and clipping to [0, 1] would attack outside the data."""
    from ._options import accepted_options
    from .defenses._common import PGDDefense

    if tuple(info.value_range) == (0.0, 1.0) or not issubclass(cls, PGDDefense) or "clip_min" in accepted_options(cls):
        return None
    return (f"{name} takes no clip_min/clip_max, which train gives PGD-based defenses as the data's value range "
            f"{list(info.value_range)} (not [0, 1]); take them in its __init__ and pass them on to PGDDefense")


def make_defense(name, options, train_size, info):
    from . import defenses

    try:
        cls = defenses.defense_class(name)
    except ValueError as err:
        raise CLIError(f"--defense: {err}") from None
    options = dict(options)
    params = inspect.signature(cls.__init__).parameters
    if "num_samples" in params and "num_samples" not in options:
        options["num_samples"] = train_size
    elif "num_samples" in params and options["num_samples"] != train_size:  # else refused by fit after run.json
        raise CLIError(f"--defense-opt: num_samples={options['num_samples']!r}, but the training set has {train_size} "
                       "samples; leave num_samples unset (it is set to the training-set size)")
    from .defenses._common import PGDDefense

    takes_clip = "clip_min" in params or issubclass(cls, PGDDefense)
    if tuple(info.value_range) != (0.0, 1.0) and takes_clip:
        problem = clip_range_problem(name, cls, info)
        if problem:
            raise CLIError(f"--defense: {problem}")
        options.setdefault("clip_min", info.value_range[0])
        options.setdefault("clip_max", info.value_range[1])
    from ._options import option_defaults

    defaults = option_defaults(cls)
    for key, value in options.items():
        if value is None and key in defaults and defaults[key] is None:  # as attacks' `pgd:steps=none` (evaluate.py)
            raise CLIError(f"--defense-opt: {key}=none would be ignored ({name}'s default applies, and run.json would "
                           f"record none); give a value or leave {key} out")
    try:
        defense = defenses.build(name, **options)
    except (TypeError, ValueError) as err:
        raise CLIError(f"--defense-opt: {err}") from None
    if getattr(defense, "binary_only", False) and info.num_classes != 2:
        raise binary_only_error("--defense", name, info)
    return defense


def check_clip_options(options, train, name):
    """A --defense-opt clip range that leaves out training inputs (clip_min=0.5 on [0, 1] images): the attack refuses
    such inputs, and training failed at its first batch, after run.json was written."""
    given = {key: options[key] for key in ("clip_min", "clip_max") if isinstance(options.get(key), (int, float))}
    if not given or not hasattr(train, "tensors") or not len(train):
        return
    x = train.tensors[0]
    low, high = float(x.min()), float(x.max())
    cut = [f"{key}={value:g}" for key, value in given.items()
           if (key == "clip_min" and value > low) or (key == "clip_max" and value < high)]
    if cut:
        raise CLIError(f"--defense-opt: {', '.join(cut)} of {name} leaves out training inputs, which lie in "
                       f"[{low:.4g}, {high:.4g}], and the attack refuses inputs outside its clip range; widen it or "
                       "leave clip_min and clip_max out (they default to the data's value range)")


def read_checkpoint(path):
    """torch.load(weights_only=True); a file needing pickle to run code is refused with a clear message. Files of
    torch.save's pre-1.6 format load too (load_checkpoint names what is wrong with a file that is no checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{path}: no such checkpoint file")
    from .train import load_checkpoint

    try:
        return load_checkpoint(path)
    except ValueError as err:  # names the file and what is wrong with it
        raise CLIError(str(err)) from None
    except OSError as err:
        from .train import _torch_read_error

        raise CLIError(f"{path}: not a readable checkpoint ({_torch_read_error(err)})") from None


def write_json_atomic(path, data, fsync=False):
    from ._files import replace_atomically

    replace_atomically(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"), fsync=fsync)


# ----------------------------------------------------------------------------------------------- train


def add_data_model_options(p, epochs, epochs_help="training epochs"):
    """Options `train` and `demo` share: what to train on, which model, and the optimiser's settings."""
    p.add_argument("--data", default="synthetic",
                   help="synthetic (embedded generated set), breastmnist (or another MedMNIST name), moons, or a "
                        ".npz file / BUSI-style folder / .csv path")
    p.add_argument("--size", type=int, default=None, help="image side length (default: the data's own size; 28 for "
                                                          "synthetic, 224 for folders)")
    add_classes_option(p)
    add_bit_depth_option(p, "the full 16 bits")
    add_channels_option(p, DATA_CHANNELS)
    p.add_argument("--model", default="small_cnn",
                   help="resnet18, resnet50, vgg16, densenet121, small_cnn or mlp (adapted to channels and size)")
    p.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    add_optimiser_options(p, 32, 1e-3)
    p.add_argument("--seed", type=int, default=0, help="seed for data splits, initialisation and batches")
    p.add_argument("--download", action=Switch, help=DOWNLOAD_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def add_optimiser_options(p, batch_size, lr, default=""):
    """--batch-size and --lr (train's, demo's; reproduce's with ``default`` saying what None stands for)."""
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"training mini-batch size{default}")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (MIRST-DM: 1e-4 at 100 epochs){default}")


def check_optimiser_options(batch_size, lr):
    """One-line errors for --batch-size and --lr (None: not given), before any data is loaded."""
    import math

    check_count("--batch-size", batch_size)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise CLIError(f"--lr: expected a finite learning rate > 0, got {lr}")


def add_classes_option(p):
    p.add_argument("--classes", type=parse_classes, action=OneList, default=None,
                   help="comma-separated class folders / CSV labels to keep, in label order (e.g. nv,mel: mel, not "
                        "benign/normal/..., is the positive class); folders and CSV, or one name per label of an "
                        ".npz not named after a MedMNIST set (malignant,benign) (default: all)")


def add_bit_depth_option(p, default):
    p.add_argument("--bit-depth", type=int, default=None,
                   help="bits of 16-bit image files that hold the intensity, 8 to 16 (12: CT and X-ray PNGs, 4095 is "
                        f"white); folders and CSV only (default: {default})")


DATA_CHANNELS = "the data's own: folders 1 unless an image has colour, CSV 3"


def add_channels_option(p, default):
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help=f"read folder / CSV images as 1 channel (grayscale) or 3 (RGB); folders and CSV only (default: "
                        f"{default})")


def parse_classes(text):
    """``--classes nv,mel`` -> ("nv", "mel"); names as load_dataset's ``classes=`` takes them."""
    names = tuple(name.strip() for name in str(text).split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated class names such as benign,malignant, got "
                                         f"{text!r}")
    return names


def check_count(flag, value, minimum=1):
    """A count flag's value (None: not given) >= ``minimum`` and below 2**63, torch's 64-bit integers: a --batch-size
    or --eval-batch-size from 2**63 on was torch's 'Overflow when unpacking long long' (train's and demo's blamed on
    RUN_DIR, eval's a traceback)."""
    if value is not None and value < minimum:
        raise CLIError(f"{flag}: expected >= {minimum}, got {value}")
    if value is not None and value >= 2**63:
        raise CLIError(f"{flag}: expected a count below 2**63 (a 64-bit integer), got {value}")


def check_data_model_options(args):
    """One-line errors for the shared options' values, before any data is loaded."""
    from .data.core import MAX_SKLEARN_SEED

    check_count("--epochs", args.epochs)
    check_optimiser_options(args.batch_size, args.lr)
    # scikit-learn's splits (folders, CSV) take seeds up to MAX_SKLEARN_SEED: a larger one was reported as "too few
    # samples", and one from 2**64 on was torch.manual_seed's overflow traceback
    if not 0 <= args.seed <= MAX_SKLEARN_SEED:
        raise CLIError(f"--seed: expected 0 to {MAX_SKLEARN_SEED}, got {args.seed}")


def add_train_options(p):
    add_data_model_options(p, epochs=10)
    p.add_argument("--dropmax", choices=DROPMAX_CHOICES, default="none",
                   help="replace max-pooling layers with DropMax2d before training (mirst-dm does 'first' itself)")
    p.add_argument("--channels-last", action=Switch,
                   help="train the model in channels_last memory format (on CPU: IMA epochs 1.3x and PGD "
                        "1.1-1.3x faster, docs/benchmarks.md; results differ from NCHW in the last bits)")
    # None: not given, so $ROBUST_OPS_PREPACKED_CONV decides, and --no-prepacked-conv can turn it off (fit's rule)
    p.add_argument("--prepacked-conv", action=Switch, default=None,
                   help="run the attacks inside training on convolutions packed once per attack (CPU; best with "
                        "--channels-last, docs/prepacked-conv.md; results differ in the last bits on NCHW models; "
                        "default: $ROBUST_OPS_PREPACKED_CONV)")
    p.add_argument("--no-progress", action=Switch, help="no progress bars")
    add_dist_timeout_option(p)


def add_dist_timeout_option(p):
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others in a collective before it stops, "
                        "naming itself (another process hung or died); default: torch's, 30 minutes with gloo, 10 "
                        "with NCCL")


def checked_dist_timeout(seconds):
    """``--dist-timeout`` (``seconds``) as fit takes it, refused in one line before any data is loaded."""
    from .train import check_dist_timeout

    try:
        check_dist_timeout(seconds, "--dist-timeout", None)
    except ValueError as err:
        raise CLIError(str(err)) from None
    return seconds


def add_schedule_options(p):
    """train's head-only warm-up and early stopping (fit's warmup_epochs, early_stopping and restore_best)."""
    p.add_argument("--warmup-epochs", type=int, default=0,
                   help="train the model's classifier head alone for the first N of --epochs (DPAAT: 10)")
    p.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                   help="stop once the validation loss has not improved for PATIENCE epochs after the warm-up "
                        "(DPAAT: 5; default: off)")
    p.add_argument("--restore-best", action=Switch,
                   help="with --early-stopping: hand back the weights of the epoch with the lowest validation loss "
                        "(RUN_DIR/best_model.pt, which eval RUN_DIR attacks), not the last epoch's")


def check_schedule_options(warmup_epochs, early_stopping, restore_best=False):
    """One-line errors for --warmup-epochs, --early-stopping and --restore-best, before any data is loaded."""
    check_count("--warmup-epochs", warmup_epochs, 0)
    if early_stopping is not None and early_stopping < 1:
        raise CLIError(f"--early-stopping: expected a patience >= 1, got {early_stopping}")
    if restore_best and early_stopping is None:
        raise CLIError("--restore-best: it hands back the epoch with the lowest validation loss, which early stopping "
                       "tracks; pass --early-stopping PATIENCE too, or leave --restore-best out")


def cmd_train_parser(sub):
    p = sub.add_parser("train", help="train a model with a defense", formatter_class=_formatter,
                       description="Train --model on --data with --defense; checkpoints every epoch to RUN_DIR.")
    p.add_argument("--defense", default="standard",
                   help="standard, at, sat, trades, rst, gr, llr, mart, fat, amat, mirst, mirst-dm, ima, dpaat, arfl, "
                        "or your own Defense subclass as package.module.Class (imported from PYTHONPATH)")
    p.add_argument("--defense-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="defense option, repeatable (e.g. eps=5/255, steps=10, lam=10)")
    add_train_options(p)
    add_schedule_options(p)
    p.add_argument("--out", type=path_text, default="runs/train",
                   help="RUN_DIR for checkpoint.pt, run.json, metrics.csv, metrics.json")
    p.add_argument("--resume", action=Switch, help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--config", action=OneConfig, type=path_text,
                   help="YAML or JSON file of options (keys are long option names)")
    p.set_defaults(func=cmd_train)
    return p


RESUME_KEYS = ("data", "classes", "bit_depth", "channels", "model", "defense", "defense_options", "dropmax", "seed",
               "batch_size", "lr", "channels_last", "prepacked_conv", "split", "warmup_epochs", "early_stopping")


# run.json's settings each set by a flag of its name (defense_options: --defense-opt), which --resume's refusal of
# another value names as typed: train's, and demo's (which picks the defense, its options and memory format itself)
TRAIN_FLAG_SETTINGS = ("data", "size", "classes", "bit_depth", "channels", "model", "defense", "defense_options",
                       "dropmax", "seed", "batch_size", "lr", "channels_last", "prepacked_conv", "warmup_epochs",
                       "early_stopping")
DEMO_FLAG_SETTINGS = ("data", "size", "classes", "bit_depth", "channels", "model", "seed", "batch_size", "lr")
# reproduce's (the protocol sets the rest)
REPRODUCE_FLAG_SETTINGS = ("data", "size", "classes", "bit_depth", "channels", "batch_size", "lr")


def resume_setting_error(run_file, key, was, now, flags, lead="--resume"):
    """--resume's refusal of the run ``run_file`` records, trained with another ``key`` (resume_conflict's): each value
    as the command line gives it where ``flags`` (a command's FLAG_SETTINGS) hold the key (``--batch-size 32``,
    ``--classes nv,mel``; a switch or a flag left out: trained with / without ``--prepacked-conv``; the image size
    the run read, ``--size 28``), else as run.json records it (demo's ``channels_last=True``). ``lead``: what the
    message opens with (reproduce, which has no --resume, names the key's flag)."""
    if key not in flags:
        return CLIError(f"{lead}: {run_file} was trained with {key}={was!r}, this command has {key}={now!r}")
    if key == "size":  # the size the images were read at: --size, or the data's own without it
        return CLIError(f"{lead}: {run_file} was trained on {was}x{was} images (--size {was}), this command reads "
                        f"them at {now}x{now}")
    flag = _flag("defense_opt" if key == "defense_options" else key)

    def typed(value):  # the flag and its value as typed; None for a flag left out (a switch off, no option given)
        if value is None or value is False or value == {}:
            return None
        if value is True:
            return flag
        if isinstance(value, dict):
            return " ".join(f"{flag} {k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                            for k, v in value.items())
        return f"{flag} {shlex.quote(','.join(value) if isinstance(value, list) else str(value))}"

    was_words, now_words = typed(was), typed(now)
    return CLIError(f"{lead}: {run_file} was trained {f'with {was_words}' if was_words else f'without {flag}'}, "
                    f"this command has {now_words or f'no {flag}'}")


# a checkpoint (without run.json) whose training-set fingerprint is not the command's: as many images, others
OTHER_TRAINING_IMAGES = "was trained on other training images than this command's (as many, but other images or labels)"
# the way on from a RUN_DIR whose run train's (or demo's) --resume cannot continue: a fresh start replaces that run's
# files (a command without --resume), another --out keeps them
TRAIN_AFRESH = "train afresh without --resume (another --out keeps this run's files)"
# fit's recorded settings (its ResumeMismatchError's keys) and run.json's counts that no flag takes as they are, and
# the flags setting them (run.json's train_samples named none: an .npz replaced in place by one of other counts)
FIT_SETTING_FLAGS = {"num_samples": "--data, --classes", "val_samples": "--data, --classes",
                     "train_samples": "--data, --classes",
                     "defense_class": "--defense", "drop_max_layers": "--dropmax"}


def resume_refusal(path, key, was, now, flags):
    """train's (and demo's) --resume refusal of the run at ``path`` (its run.json, or a checkpoint without one: fit's
    ResumeMismatchError) trained with another ``key`` (``was``; ``now`` this command's) or, for key "epochs", more
    epochs than --epochs: in the command line's words (``flags``: the command's FLAG_SETTINGS), with the way on."""
    if key == "epochs":
        return CLIError(f"--resume: {path} holds {was} epochs of training, more than --epochs {now}; pass --epochs "
                        f"{was} or more (the run's total, not the epochs to add), or {TRAIN_AFRESH}")
    from .data.core import MAX_SKLEARN_SEED

    if key == "seed" and isinstance(was, int) and not 0 <= was <= MAX_SKLEARN_SEED:  # before fit refused such seeds
        return CLIError(f"--resume: {path} was trained with --seed {was}, outside 0 to {MAX_SKLEARN_SEED}, the range "
                        "every seed has now (torch's CPU generator reads only a seed's low 32 bits: it repeated "
                        f"another seed's random numbers), so the run cannot be continued; {TRAIN_AFRESH}")
    if key == "train_data_sha256":  # a checkpoint's fingerprint: the digests themselves tell a user nothing
        return CLIError(f"--resume: {path} {OTHER_TRAINING_IMAGES}; rerun with the run's --data, --size, --classes, "
                        f"--bit-depth and --channels to continue it, or {TRAIN_AFRESH}")
    where = f" (set by {FIT_SETTING_FLAGS[key]})" if key in FIT_SETTING_FLAGS else ""
    return CLIError(f"{resume_setting_error(path, key, was, now, flags)}{where}; rerun with the run's settings to "
                    f"continue it, or {TRAIN_AFRESH}")


def demo_label(method):
    """demo's table label of a --methods entry: Baseline, AT, DPAAT, MIRST-DM, ...; a Defense subclass given by its
    path (package.module.Class) keeps it."""
    return DEMO_LABELS.get(method) or (method if "." in method else method.upper())


def makes_first_drop_max(defense_name):
    """Whether the defense replaces the first max-pooling itself: MIRST-DM by any spelling of its name, or by the
    dotted path of it or a subclass (a name that does not resolve: False, refused where the defense is built)."""
    from . import defenses
    from .defenses.mirst import MIRSTDM

    try:
        return issubclass(defenses.defense_class(defense_name), MIRSTDM)
    except ValueError:
        return False


def trained_dropmax(run):
    """The drop-max layers of a run's model from its run.json: files written before MIRST-DM spelled otherwise was
    recorded as mirst-dm say "none" where fit's prepare_model replaced the first max-pooling (by name only: reading a
    run imports no defense module)."""
    dropmax = run.get("dropmax", "none")
    return "first" if dropmax == "none" and defense_key(run.get("defense")) == "mirst-dm" else dropmax


def check_max_pool(model, model_name, defense_name, flag):
    """A defense that replaces the first max-pooling (MIRST-DM) on a model without one fails inside training, after
    run.json is written (in demo, after the methods before it): refused first, naming ``flag``."""
    import torch.nn as nn

    if not any(isinstance(m, nn.MaxPool2d) for m in model.modules()):
        raise CLIError(f"{flag}: {defense_name} replaces the first max-pooling layer with drop-max pooling, and "
                       f"--model {model_name} has none; use a model with max pooling (e.g. small_cnn or resnet18)")


def check_train_split(splits, data, warn_unlearned=True):
    """An empty train split (an .npz holding only val/test images) is refused before anything is written: fit refuses
    it too, but after run.json, and in its own words (``train_data is empty``). ``warn_unlearned``: warn of the
    classes an .npz's own train split lacks, which the loader records without a word (eval reads the file too); a
    drawn split's rare-class warning names them already."""
    if len(splits.train) == 0:
        raise CLIError(f"--data: the train split of {data} holds no samples; nothing to train on")
    info = splits.info
    unlearned = (info.extra.get("classes_missing_from_split") or {}).get("train")
    if warn_unlearned and unlearned and str(info.source).endswith(".npz"):
        warnings.warn(f"--data: the train split of {info.source} holds no image of {', '.join(unlearned)}, so the "
                      "model never learns that class; its val / test images are scored all the same")


def json_options(options):
    """Defense options as run.json holds them (tuples as lists, as JSON reads them back)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}


def run_record(*, data, defense_name, defense_options, model_name, epochs, batch_size, lr, seed, size=None,
               dropmax="none", label=None, channels_last=False, prepacked_conv=False, info=None, split=None,
               train_samples=None, classes=None, bit_depth=None, channels=None, warmup_epochs=0, early_stopping=None,
               restore_best=False, train_data_sha256=None, val_samples=None):
    """The run.json document of one training run (before training). ``split``: how a reproduce run's data split is
    rebuilt (:func:`robust_ops.reproduce.rebuild_splits`); None for the data's own train/val/test split.
    ``train_samples``: the number of training images (demo's --train-size / --quick subset), checked on resume;
    ``val_samples`` the number of validation images (demo's --quick subset draws 16), checked so too.
    ``restore_best`` is recorded for eval (RUN_DIR then means best_model.pt), not compared on resume: it changes no
    training (fit refuses a switch it cannot make exact). ``train_data_sha256``: fit's fingerprint of the training
    set (train.train_data_fingerprint), which demo's and reproduce's check of a checkpoint without run.json compares."""
    if dropmax == "none" and makes_first_drop_max(defense_name):
        dropmax = "first"  # recorded so eval rebuilds the same architecture (fit calls prepare_model itself)
    run = {
        "format": "robust_ops.run/1", "data": str(data_spec(data)), "size": size,
        "classes": list(classes) if classes is not None else None, "bit_depth": bit_depth, "channels": channels,
        "model": model_name,
        "defense": defense_name, "defense_options": json_options(defense_options),
        "dropmax": dropmax, "channels_last": bool(channels_last), "prepacked_conv": bool(prepacked_conv),
        "epochs": epochs, "batch_size": batch_size, "warmup_epochs": warmup_epochs, "early_stopping": early_stopping,
        "restore_best": bool(restore_best),
        "lr": lr, "seed": seed, "label": label or defense_name, "dataset": info.to_dict() if info else None,
    }
    if split is not None:
        run["split"] = split
    if train_samples is not None:
        run["train_samples"] = int(train_samples)
    if val_samples is not None:
        run["val_samples"] = int(val_samples)
    if train_data_sha256 is not None:
        run["train_data_sha256"] = train_data_sha256
    return run


# The JSON types run_record writes each setting as (null: an option not given, as a key older files lack): eval and
# --resume read them as such, so a hand-edited or damaged value ended in a traceback deep inside them.
RUN_FIELD_TYPES = {"data": str, "size": int, "classes": list, "bit_depth": int, "channels": int, "model": str,
                   "defense": str, "defense_options": dict, "defense_settings": dict, "dropmax": str,
                   "channels_last": bool, "prepacked_conv": bool, "epochs": int, "batch_size": int,
                   "lr": (int, float), "seed": int, "warmup_epochs": int, "early_stopping": int, "restore_best": bool,
                   "label": str, "dataset": dict, "split": dict, "train_samples": int, "train_data_sha256": str,
                   "val_samples": int}
_JSON_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", bool: "true or false",
                    (int, float): "a number"}


def read_run_file(path):
    """A run.json as a dict; one-line errors for one that is not valid JSON (or not UTF-8) or, hand-edited, not a JSON
    object or a setting not of the type train writes (an AttributeError or TypeError traceback where it was used
    otherwise)."""
    # train writes it atomically: a file that does not parse was edited or damaged, and it says so, with the way out
    damaged = f"the file was edited or damaged -- restore the run's own {RUN_FILE}, or train it again"
    try:
        run = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CLIError(f"{path}: not valid JSON ({err}); {damaged}") from None
    if not isinstance(run, dict):
        raise CLIError(f"{path}: expected a JSON object of the run's settings, got {type(run).__name__}; {damaged}")
    for key, kind in RUN_FIELD_TYPES.items():
        value = run.get(key)
        wrong = value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool))
        if wrong or (key == "dropmax" and value not in (None, *DROPMAX_CHOICES)):  # eval blamed a --dropmax it lacks
            what = f"one of {', '.join(DROPMAX_CHOICES)}" if key == "dropmax" and not wrong else _JSON_TYPE_NAMES[kind]
            raise CLIError(f"{path}: expected {key} to be {what}, got {json.dumps(value)}; {damaged}")
    return run


def earlier_samples_digests(dataset):
    """The image-list digests a run trained before ids' "\\" were read as "/" recorded for the same CSV (``dataset``:
    the load's ``info.extra`` or run.json's ``dataset``): the ids as written with "\\", or as written where rows mix
    "/" and "\\" (refused until 2026-12-07: neither the "/" nor the all-"\\" digest was theirs), or with "\\" as
    "/" but "./" and doubled "/" kept (recorded between those two changes, both on 2026-12-07)."""
    dataset = dataset or {}
    keys = ("samples_digest_backslashed", "samples_digest_as_written", "samples_digest_slashed")
    return {dataset[k] for k in keys if dataset.get(k)}


def resume_conflict(out, run):
    """Why RUN_DIR ``out`` cannot be resumed as ``run`` (a run_record): ``(key, old value, new value)`` for a
    setting its weights depend on, ``("epochs", epochs done, run's epochs)`` when it trained for more epochs;
    None when it can (or holds no run)."""
    from .data.core import trained_rare_classes

    out = Path(out)
    if not (out / CHECKPOINT).is_file():  # stopped or failed before its first epoch: nothing to continue, a fresh start
        return None
    if not (out / RUN_FILE).is_file():  # fit compares its checkpoint's own record: checked now, before other runs
        return _checkpoint_conflict(out, run)
    old = read_run_file(out / RUN_FILE)
    old.setdefault("channels_last", False)  # runs written before the options trained NCHW, on ATen's convolutions
    old.setdefault("prepacked_conv", False)
    old.setdefault("split", run.get("split"))  # runs written before run.json recorded the split: same data, seed
    old.setdefault("classes", None)  # runs written before --classes kept every class
    old.setdefault("warmup_epochs", 0)  # runs written before the warm-up and early stopping had neither
    old.setdefault("early_stopping", None)
    if old.get("defense") is not None:  # runs written before the registry's spelling was recorded (MIRST-DM)
        old["defense"] = defense_key(old["defense"])
        old["dropmax"] = trained_dropmax(old)
    if old.get("data") is not None:  # runs written before paths were made absolute: relative to this directory
        old["data"] = str(data_spec(old["data"]))
    # run.json files written before they recorded the training and validation counts or the training set's
    # fingerprint: the checkpoint's record of them (the read epochs_done makes below): demo's --quick switch on such
    # a run was refused by fit at the run's turn, naming --data and --classes, flags not given
    saved = (_checkpoint_facts(out / CHECKPOINT) or {}).get("config")
    for key, name in (("train_samples", "num_samples"), ("val_samples", "val_samples"),
                      ("train_data_sha256", "train_data_sha256")):
        if old.get(key) is None and isinstance(saved, dict):
            old[key] = saved.get(name)
    # every setting the checkpoint's weights depend on; epochs may grow (training continues up to them)
    for key in RESUME_KEYS:
        was, now = old.get(key), run.get(key)
        if key == "split" and was and now:  # its size as given; the loaded image size is compared below
            was, now = _split_read(was), _split_read(now)
        if key == "classes" and was and now and (old.get("dataset") or {}).get("class_names") is not None \
                and old["dataset"]["class_names"] == (run.get("dataset") or {}).get("class_names"):
            was, now = ([c.lower() for c in classes] for classes in (was, now))  # folders: class names in any case
        if key == "bit_depth":  # --bit-depth 16 reads the images as no --bit-depth does: it was refused
            was, now = bit_reading(was), bit_reading(now)
        if was != now and not (key == "data" and same_data_source(was, now)):
            return key, old.get(key), run.get(key)
    # Known only once the data is loaded (reproduce's pre-check has neither) and absent from older run.json files;
    # the image size is the loaded one, so --size 28 on 28x28 data equals no --size.
    for key, value in (("size", lambda r: (r.get("dataset") or {}).get("image_size")),
                       ("class_counts", lambda r: (r.get("dataset") or {}).get("class_counts")),
                       # a CSV run recorded without split_by was split by image (before lesion_id grouped it)
                       ("split_by", lambda r: _trained_split_by(r, r.get("data"), True)),
                       ("samples_digest", lambda r: (r.get("dataset") or {}).get("samples_digest")),
                       # split before 2026-12-06 with a class too small to stratify: every class at random
                       ("rare_classes", lambda r: trained_rare_classes(r["dataset"]) if r.get("dataset") else None),
                       ("train_samples", lambda r: r.get("train_samples")),
                       # demo's --quick subset validates on 16 images, a run without it on half the test split: fit
                       # refused the switch at the run's turn, after the methods before it trained (run.json files
                       # written before 2026-12-07 lack the count, and fit still refuses it so)
                       ("val_samples", lambda r: r.get("val_samples")),
                       # as many images, others (an .npz replaced in place): fit refused them at the run's turn
                       ("train_data_sha256", lambda r: r.get("train_data_sha256"))):
        was, now = value(old), value(run)
        if key == "samples_digest" and isinstance(was, str) and was in earlier_samples_digests(run.get("dataset")):
            continue  # recorded before ids' "\\" were read as "/": as written
        if was is not None and now is not None and was != now:
            return key, was, now
    done = epochs_done(out)
    if done > run["epochs"]:
        return "epochs", done, run["epochs"]
    return None


# run.json's settings fit records in its checkpoints under the same name, as the same values
CHECKPOINT_RESUME_KEYS = ("seed", "batch_size", "lr", "channels_last", "prepacked_conv", "warmup_epochs",
                          "early_stopping")


def _checkpoint_conflict(out, run):
    """resume_conflict of RUN_DIR ``out`` holding a checkpoint without its run.json: the settings fit's checkpoint
    records (those of CHECKPOINT_RESUME_KEYS, the defense's settings or, before it is built, the options ``run``
    gives it, and its epochs), compared as fit compares them on resume; None for one it cannot read (fit names it)."""
    facts = _checkpoint_facts(out / CHECKPOINT)
    try:
        config, done = facts["config"], int(facts["epoch"])
    except (ValueError, TypeError):
        return None
    if not isinstance(config, dict):
        return None
    for key in CHECKPOINT_RESUME_KEYS:
        if key in config and config[key] != run.get(key):
            return key, config[key], run.get(key)
    # the training images counted (demo's --train-size subset; another --data of reproduce)
    if run.get("train_samples") is not None and config.get("num_samples") not in (None, run["train_samples"]):
        return "num_samples", config["num_samples"], run["train_samples"]
    if run.get("val_samples") is not None and config.get("val_samples") not in (None, run["val_samples"]):
        return "val_samples", config["val_samples"], run["val_samples"]  # demo's --quick subset, as fit compares it
    # as many images, but others (another --size, --data or --classes): fit refused them at the run's turn
    saved_data, data = config.get("train_data_sha256"), run.get("train_data_sha256")
    if None not in (saved_data, data) and saved_data != data:
        return "train_data_sha256", saved_data, data
    saved = json_options(config.get("defense_options") or {})
    # train's record holds the defense's settings as built (defaults included, norm spelled as the defense does)
    given = json_options(run.get("defense_settings") or run.get("defense_options") or {})
    changed = sorted(k for k in given if k in saved and saved[k] != given[k])
    if changed:
        return "defense_options", {k: saved[k] for k in changed}, {k: given[k] for k in changed}
    # the architecture, which the checkpoint does not name: fit refused its weights ("do not fit this model") at the
    # run's turn, naming no flag, after demo's and reproduce's runs before it had trained
    trained = _trained_model(facts["shapes"], run)
    if trained is not None:
        return "model", trained, run.get("model")
    return ("epochs", done, run["epochs"]) if done > run["epochs"] else None


_CHECKPOINTS_READ = {}  # checkpoint file -> (its _file_stamp, _checkpoint_facts of it)


def _checkpoint_facts(path):
    """What the CLI's checks read of fit's checkpoint at ``path``, a dict: its ``config``, ``epoch``, ``shapes`` (of
    its weights' tensors) and ``defense`` (its defense state's plain values: IMA's eps_train, delta, ...); None for
    one it cannot read (fit names it). Read once per version of the file (its _file_stamp): demo and reproduce read a
    RUN_DIR's checkpoint without run.json three times before fit's own read (the check of every run, the status line,
    train_run's check), 0.3 s each for resnet18's 134 MB; the tensors themselves are not kept."""
    import torch

    from . import train as trainer

    path = Path(path)
    stamp, key = _file_stamp(path), str(path.resolve())
    if stamp is None:
        return None
    if _CHECKPOINTS_READ.get(key, (None,))[0] != stamp:
        try:
            state = trainer.load_checkpoint(path)
        except (OSError, ValueError):
            state = None
        facts = None
        if isinstance(state, dict):
            weights, defense = state.get("model"), state.get("defense")
            facts = {"config": state.get("config"), "epoch": state.get("epoch"),
                     "shapes": ({k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
                                if isinstance(weights, dict) else None),
                     "defense": ({k: v for k, v in defense.items() if _plain_value(v)}
                                 if isinstance(defense, dict) else {})}
        _CHECKPOINTS_READ[key] = stamp, facts
    return _CHECKPOINTS_READ[key][1]


def _plain_value(value):
    return value is None or isinstance(value, (bool, int, float, str))


def _trained_model(shapes, run):
    """The --model whose parameters and buffers have the ``shapes`` of a checkpoint's weights (as
    :func:`_checkpoint_facts` gives them), each model built for ``run``'s data, where they are not those of the run's
    own --model; None where they are, or where no other --model has them all (left to fit's load, which names the
    first mismatch). Built on the meta device: no memory, but torchvision's constructors still run (measured:
    small_cnn 5 ms, resnet18 and vgg16 30 ms, resnet50 90 ms, densenet121 85-250 ms), so every other model only where
    the run's own does not fit the weights, and each once per command (:func:`_model_shapes`)."""
    from .models import MODELS

    info = run.get("dataset") or {}
    if not isinstance(shapes, dict) or info.get("in_channels") is None or info.get("num_classes") is None:
        return None
    data = info["in_channels"], info["num_classes"], info.get("image_size") or 0

    def fits(name):
        return shapes == _model_shapes(name, *data)

    if run.get("model") not in MODELS or fits(run["model"]):
        return None
    return next((name for name in MODELS if name != run["model"] and fits(name)), None)


@functools.lru_cache(maxsize=64)
def _model_shapes(name, in_channels, num_classes, image_size):
    """The shapes of --model ``name``'s parameters and buffers for such data (built on the meta device); None for a
    model that cannot take it (a CNN of feature vectors, image_size 0)."""
    import torch

    from .models import build_model

    if not image_size and name != "mlp":  # feature vectors: make_model refuses a CNN
        return None
    try:
        with torch.device("meta"):
            model = build_model(name, in_channels, num_classes, image_size)
    except ValueError:
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def checkpoint_epochs(run_dir):
    """Epochs of training RUN_DIR's checkpoint holds, those --resume continues; 0 without one, whatever its
    metrics.json records (fit then trains the run afresh, so demo and reproduce name it as a run to train)."""
    run_dir = Path(run_dir)
    return epochs_done(run_dir) if (run_dir / CHECKPOINT).is_file() else 0


_EPOCHS_READ = {}  # RUN_DIR -> (its checkpoint's and metrics.json's _file_stamp, train.epochs_done of them)


def epochs_done(run_dir):
    """train.epochs_done of RUN_DIR, read once per version of its checkpoint and metrics.json (their _file_stamp):
    demo and reproduce asked it three times a finished run (the check of every run, the status line, train_run's
    check), each a read of the whole checkpoint (0.3 s for resnet18's 134 MB), beside fit's own."""
    from .train import HISTORY_NAME
    from .train import epochs_done as read

    run_dir = Path(run_dir)
    stamps = (_file_stamp(run_dir / CHECKPOINT), _file_stamp(run_dir / HISTORY_NAME))
    key = str(run_dir.resolve())
    if _EPOCHS_READ.get(key, (None,))[0] != stamps or stamps == (None, None):
        epoch = (_checkpoint_facts(run_dir / CHECKPOINT) or {}).get("epoch")  # the read a check made, if one did
        _EPOCHS_READ[key] = stamps, epoch if isinstance(epoch, int) else read(run_dir)
    return _EPOCHS_READ[key][1]


def resume_record_file(out):
    """The file holding RUN_DIR ``out``'s settings, which a --resume refusal names: its run.json, or its checkpoint
    where that is gone (fit's record, which resume_conflict then compares)."""
    out = Path(out)
    return out / RUN_FILE if (out / RUN_FILE).is_file() else out / CHECKPOINT


def _peer_lost(err):
    """Under torchrun, gloo's words (``Connection reset by peer``) where ``err`` is the error of a collective whose
    other process is gone without recording an error for fit to read (killed outright: SIGKILL, the out-of-memory
    killer); None for any other error, which keeps its own words or traceback."""
    found = re.search(r"Connection (?:reset|closed) by peer", str(err)) if isinstance(err, RuntimeError) else None
    return found.group(0) if found and "gloo" in str(err) and launched_processes() > 1 else None


def is_main_process():
    """Whether this process prints and writes RUN_DIR's files: rank 0 of a torchrun launch (or of a process group
    already initialized), or the only process. The others train their share only: the same lines printed by each,
    and run.json rewritten (or the old checkpoint deleted) by each, would repeat or race."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    # fit initializes torchrun's group itself (and destroys it when done): its environment names the rank
    return launched_processes() <= 1 or int(os.environ.get("RANK", "0")) == 0


def launched_processes():
    """How many processes run this command: a process group's size, else torchrun's WORLD_SIZE, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def refuse_several_processes(command, why):
    """eval and bench have nothing to share between processes: under torchrun each process would run the whole
    command (``why``) instead of a share of it."""
    world = launched_processes()
    if world > 1:
        raise CLIError(f"runs in one process, and {world} were launched (torchrun, WORLD_SIZE={world}): each would "
                       f"{why}; run `{PROG} {command} ...` without torchrun (train, demo and reproduce are the "
                       "commands that train over several processes)")


def train_run(*, data, defense_name, defense_options, model_name, epochs, batch_size, lr, seed, device, out,
              resume=False, dropmax="none", size=None, progress=True, splits=None, label=None, channels_last=False,
              prepacked_conv=None, split=None, classes=None, bit_depth=None, channels=None, warmup_epochs=0,
              early_stopping=None, restore_best=False, dist_timeout=None, flags=TRAIN_FLAG_SETTINGS, refusal=None):
    """Train one model and write RUN_DIR/run.json + checkpoint.pt; returns (model, splits, run_config, fit's
    FitResult: its history, and its early stopping's state as the checkpoint holds it).
    ``warmup_epochs``, ``early_stopping``, ``restore_best``: fit's (the head-only warm-up's epochs, a patience on the
    validation loss, the best epoch's weights handed back).
    ``split``: run.json's record of how ``splits`` was made (reproduce), see :func:`run_record`. ``dist_timeout``
    (``--dist-timeout``) is fit's, not recorded in run.json: it changes no result, and a resume may change it.
    ``flags``: the command's FLAG_SETTINGS, which fit's refusal of a checkpoint to resume names as typed;
    ``refusal``: a callable (path, key, saved, now) -> CLIError saying that refusal in the command's own words
    (reproduce's, whose runs resume without a --resume flag); None: :func:`resume_refusal` with ``flags``."""
    from . import train as trainer
    from .data import IndexedDataset
    from .prepacked_conv import prepacked_conv_resolved

    # what will run (None: $ROBUST_OPS_PREPACKED_CONV decides, as in fit), so --resume compares that
    prepacked_conv = prepacked_conv_resolved(prepacked_conv)
    # as the registry names it: run_record's mirst-dm -> dropmax "first" (eval's architecture) and --resume compare it
    defense_name = defense_key(defense_name)
    given = splits is not None  # demo's and reproduce's: their own checks have warned of what it lacks
    splits = splits or load_data(data, size=size, seed=seed, classes=classes, bit_depth=bit_depth, channels=channels)
    info = splits.info
    check_train_split(splits, data, warn_unlearned=not given)
    run = run_record(data=data, defense_name=defense_name, defense_options=defense_options, model_name=model_name,
                     epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, size=size, dropmax=dropmax, label=label,
                     channels_last=channels_last, prepacked_conv=prepacked_conv, info=info, split=split,
                     train_samples=len(splits.train), classes=classes, bit_depth=bit_depth, channels=channels,
                     warmup_epochs=warmup_epochs, early_stopping=early_stopping, restore_best=restore_best,
                     val_samples=len(splits.val))
    dropmax = run["dropmax"]
    if early_stopping is not None and len(splits.val) == 0:  # fit refuses it too, after run.json is written
        raise CLIError(f"--early-stopping: it stops on the validation loss, and the validation split of {data} holds "
                       "no samples; leave --early-stopping out")
    import torch

    # --seed fixes the initial weights too (fit seeds only once the model exists; the process's own seed is random)
    torch.manual_seed(seed)
    # mirst-dm replaces the first max-pooling itself (prepare_model); a --dropmax all must still reach the model
    own = dropmax == "first" and makes_first_drop_max(defense_name)
    model = make_model(model_name, info, "none" if own else dropmax)
    if own:
        check_max_pool(model, model_name, defense_name, "--defense")
    if warmup_epochs:  # a model without a classifier head (mlp) is refused before anything is written
        try:
            trainer.warmup_head("fit", model, [p for p in model.parameters() if p.requires_grad], None)
        except ValueError:
            heads = " or ".join(trainer.HEAD_NAMES)
            raise CLIError(f"--warmup-epochs: --model {model_name} has no classifier head (a module named {heads}) "
                           "to train alone; use another --model or leave --warmup-epochs out") from None
    defense = make_defense(defense_name, defense_options, len(splits.train), info)
    check_clip_options(defense_options, splits.train, defense_name)
    if callable(getattr(defense, "feature_module", None)):  # ARFL's layer=NAME: it failed at the first training step,
        try:  # after run.json was written, naming no module the model has
            defense.feature_module(model)
        except ValueError as err:
            import torch.nn as nn

            from ._options import listing

            layers = listing(name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
            raise CLIError(f"--defense-opt: {err} (the convolutions and linear layers of --model {model_name}: "
                           f"{layers})") from None
    if "norm" in run["defense_options"] and isinstance(getattr(defense, "norm", None), str):
        # as the defense stores it ("Linf" -> "linf"): a resume that spells the norm otherwise is the same run
        run["defense_options"]["norm"] = defense.norm
    # every setting the defense trains with, its defaults included (what checkpoint.pt compares on resume): the
    # options given alone left `train --defense dpaat`'s run.json without its eps, norm, steps, alpha or beta
    run["defense_settings"] = json_options(defense.options())
    # the fingerprint fit records in checkpoint.pt (None where it cannot read one): eval compares the two, since a
    # checkpoint of another run on other images (another --size) with the same settings loaded into small_cnn unseen
    run["train_data_sha256"] = trainer.train_data_fingerprint(splits.train)
    out = Path(out)
    # one process at a time writes RUN_DIR: a second train, --resume or demo into it rewrote the checkpoint and
    # run.json under the first, and both ended "successfully" with one run's checkpoint beside the other's run.json
    with run_folder_lock(out) if is_main_process() else contextlib.nullcontext():
        if resume:
            conflict = resume_conflict(out, run)
            if conflict and refusal and not (out / RUN_FILE).is_file():  # the checkpoint's record: as fit's refusal
                raise refusal(out / CHECKPOINT, *conflict)
            if conflict and conflict[0] == "epochs":  # RUN_DIR, or the checkpoint where its run.json is gone
                raise resume_refusal(out if (out / RUN_FILE).is_file() else out / CHECKPOINT, *conflict, flags)
            if conflict and conflict[0] == "split_by":
                raise CLIError(f"--resume: {split_by_refusal(out, *conflict[1:])}; or train it again without --resume")
            if conflict and conflict[0] == "rare_classes":
                raise CLIError(f"--resume: {rare_classes_refusal(out)}; or train it again without --resume")
            if conflict:
                raise resume_refusal(resume_record_file(out), *conflict, flags)
            if not (out / RUN_FILE).is_file():  # the settings fit takes from the checkpoint, as the run trained them
                run["defense_options"].update(_options_from_state(run, _checkpoint_facts(out / CHECKPOINT),
                                                                  tuple(splits.train[0][0].shape)))
            else:
                keep_recorded_reading(run, read_run_file(out / RUN_FILE))
        elif is_main_process():  # a fresh run replaces RUN_DIR's old one: its checkpoint would otherwise be resumed
            for name in trainer.RUN_FILES:
                (out / name).unlink(missing_ok=True)
            # eval's default --out, and RUN_DIR itself (eval RUN_DIR --out RUN_DIR): kept (the user's), but now stale
            into_run = f" --out {shlex.quote(str(out))}"
            for where, results, again in ((out / "eval", out / "eval" / "results.json", ""),
                                          (out / "results.json", out / "results.json", into_run)):
                if results.is_file():
                    warnings.warn(f"{where} holds results of the run this one replaces; rerun "
                                  f"`{PROG} eval {shlex.quote(str(out))}{again}` once training ends to replace them")
        # a resumed checkpoint fit refuses (no run.json held its settings to compare) must keep the record it had, or
        # none: this command's would describe a run that never trained and refuse the rerun with the right settings
        ckpt = out / CHECKPOINT
        main = is_main_process()
        resumed = _file_stamp(ckpt) if resume and main else None
        previous = (out / RUN_FILE).read_bytes() if resumed and (out / RUN_FILE).is_file() else None
        if main:  # flushed to disk as the checkpoints are: after a power cut --resume needs both
            write_json_atomic(out / RUN_FILE, run, fsync=True)
        train_set = IndexedDataset(splits.train) if getattr(defense, "needs_ids", False) else splits.train
        try:
            result = trainer.fit(model, defense, train_set, splits.val if len(splits.val) else None, epochs=epochs,
                                 batch_size=batch_size, lr=lr, out_dir=out, resume=resume, seed=seed, device=device,
                                 channels_last=channels_last, prepacked_conv=prepacked_conv, progress=progress,
                                 warmup_epochs=warmup_epochs, early_stopping=early_stopping,
                                 restore_best=restore_best, dist_timeout=dist_timeout)
        except BrokenPipeError:  # the progress bar's reader left (`... 2>&1 | head`): main stops quietly, not a
            raise  # "training failed: [Errno 32] Broken pipe" line to a reader that is gone
        # FloatingPointError: NaN/Inf; OSError: a checkpoint or metrics file that could not be written (a full disk)
        # CollectiveTimeoutError: under torchrun, this process gave up waiting for a hung (or dead) one
        # stopped_by_another_process: under torchrun, another process's failure stopped this one (named there)
        except (ValueError, TypeError, OSError, FloatingPointError, RuntimeError) as err:
            lost = _peer_lost(err)
            if isinstance(err, RuntimeError) and not isinstance(err, trainer.CollectiveTimeoutError) \
                    and not trainer.stopped_by_another_process(err) and not lost:
                raise  # a bug's: its traceback shows where
            if resumed and _file_stamp(ckpt) == resumed:  # no epoch written under this command's run.json
                if previous is None:
                    (out / RUN_FILE).unlink(missing_ok=True)
                else:
                    from ._files import replace_atomically

                    replace_atomically(out / RUN_FILE, lambda f: f.write(previous), binary=True, fsync=True)
            if isinstance(err, trainer.LostBestEpochError):
                # fit's refusal in the flag's words (run.json is put back above): a check of this command's own, before
                # fit, read the whole checkpoint once more than fit does
                raise CLIError(f"--restore-best: {out} was trained without it, so its checkpoint holds the weights of "
                               f"its last epoch ({err.last_epoch}), not of its best one ({err.best_epoch}); resume "
                               "without --restore-best, or train again from the start (without --resume) with it"
                               ) from None
            kept = (f"; {ckpt} holds the last epoch saved: once fixed, continue with the same command"
                    f"{'' if resume else ' and --resume'}"
                    if (isinstance(err, (OSError, trainer.CollectiveTimeoutError))
                        or trainer.stopped_by_another_process(err) or lost) and ckpt.is_file() else "")
            if isinstance(err, trainer.UnreadableCheckpointError):  # the checkpoint --resume reads: no way through it
                kept = ("; the run cannot continue from it: put back a good copy of it, or train again from the "
                        "start (without --resume)")
            if isinstance(err, trainer.ResumeMismatchError):  # a checkpoint without run.json: fit's check said it
                facts = (err.path, err.key, err.saved, err.now)
                raise (refusal(*facts) if refusal else resume_refusal(*facts, flags)) from None
            if isinstance(err, trainer.OneSampleBatchError):  # fit's names for what this command calls otherwise
                err = err.reworded("--batch-size", "the training split")
            if isinstance(err, trainer.CollectiveTimeoutError):
                err = err.reworded("--dist-timeout")
            if lost:
                err = (f"another process of the run is gone (killed: SIGKILL, the out-of-memory killer; interrupted "
                       f"alone; or stopped by an error it printed; torchrun's summary names its rank), which stopped "
                       f"this one (gloo: {lost})")
            raise CLIError(f"{out}: training failed: {err}{kept}") from None
        return result.model if getattr(result, "model", None) is not None else model, splits, run, result


def _options_from_state(run, facts, sample_shape):
    """The options of ``run`` (a run_record) that the defense of a resumed checkpoint (its ``facts``) takes from its
    state where ``run`` leaves them out: IMA's eps_train, delta and init_margin, those the run was given (another
    value than IMA's automatic one for ``sample_shape``). A RUN_DIR whose run.json was gone, resumed with
    ``--defense-opt steps=2`` alone for a run given delta=0.1 steps=2, trained on with delta 0.1 but rewrote run.json
    as {steps: 2}: --resume with the run's true options was then refused as a change, and eval's L2 radii came from
    the automatic eps_train, not the one given."""
    state, options = (facts or {}).get("defense") or {}, run["defense_options"]
    if run["defense"] != "ima" or not {"eps_train", "delta", "init_margin"} <= set(state):
        return {}
    from .ima import paper_eps_train

    eps, delta = float(state["eps_train"]), float(state["delta"])
    norm = state.get("norm") or (run.get("defense_settings") or {}).get("norm", "l2")
    automatic = {"eps_train": paper_eps_train(sample_shape, norm), "delta": eps / 100,  # IMA's defaults
                 "init_margin": min(delta, eps)}
    return {k: float(state[k]) for k, value in automatic.items() if k not in options and float(state[k]) != value}


@contextlib.contextmanager
def run_folder_lock(out):
    """:func:`robust_ops._files.exclusive_folder` on ``out``; one held by another process is a one-line error naming
    that process."""
    from ._files import FolderInUse, exclusive_folder

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_folder(out))
        except FolderInUse as err:
            raise CLIError(f"--out: {err}; wait for it to end or choose another --out") from None
        yield


def _file_stamp(path):
    """(inode, mtime_ns, size) of a file, None without one: whether a checkpoint was replaced since."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def refuse_repeated(values, flag):
    """A list option's entries, each at most once: demo's and reproduce's --methods (each method has one run folder,
    so a second entry would only name the same run again) and bench's --only (a topic runs once, its CSV written
    once); a repeat is likely a typo for another entry."""
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise CLIError(f"{flag}: {', '.join(repeated)} given more than once")


def binary_only_error(flag, name, info):
    """A binary-only defense (ARFL) on a multi-class set; the error names the way to a binary task: on folders and
    CSVs --classes, which picks classes; an .npz's --classes only names its labels, so two classes need a file."""
    fix = ""
    if "class_counts" in info.extra and len(info.class_names) > 2:
        fix = (f"; keep two of its classes ({', '.join(info.class_names)}) with --classes, e.g. --classes "
               f"{','.join(info.class_names[:2])} (label 0 first)")
    elif len(info.class_names) > 2:
        fix = ("; --classes does not pick classes of an .npz: save the train / val / test images of two of its "
               "classes as an .npz of their own, labelled 0 and 1")
    return CLIError(f"{flag}: {name} is defined for binary tasks only; {info.name} has {info.num_classes} classes{fix}")


def describe_classes(info):
    """``benign = 0, malignant = 1 (positive)``: the label each class got and the class sensitivity is about."""
    if not info.class_names:
        return "none"
    names = [f"{name} = {i}" + (" (positive)" if i == info.positive_class else "")
             for i, name in enumerate(info.class_names)]
    rule = "" if info.positive_class is not None else "; metrics macro-averaged over classes"
    return ", ".join(names) + rule


def run_files(out):
    """The files of a training run that the folder ``out`` holds: run.json and checkpoint.pt, those present."""
    return [name for name in (RUN_FILE, CHECKPOINT) if (Path(out) / name).is_file()]


def refuse_results_folder(out):
    """train's ``out`` holding another command's results (an eval's, demo's or reproduce's results.json) and no run
    of its own (run.json, checkpoint.pt): a mistyped --out (RUN_DIR/eval for RUN_DIR), which train filled with a new
    run beside the results of another run's weights, refused before any work."""
    out = Path(out)
    if not (out / "results.json").is_file() or run_files(out):
        return
    whose = results_owner(out)
    raise CLIError(f"--out: {out} holds another command's results (results.json of an eval, demo or reproduce "
                   f"--out{whose}), not a training run; choose another --out for this run")


def results_owner(out):
    """The command whose results ``out`` holds, in refuse_results_folder's words ("; here eval's of TARGET", "; here
    demo's", "; here reproduce NAME's"); "" where its results.json records none or does not parse. Until 2026-12-07
    it was guessed from a run.json in the folder above: eval's, even for demo --out RUN/demo."""
    command, config = results_record(out)
    if command == "eval":
        target = config.get("target")
        return f"; here eval's of {target}" if isinstance(target, str) else ""
    return f"; here {command}'s" if command is not None else ""


def refuse_train_folder(out, command):
    """demo's and reproduce's ``out`` holding a training run of train's (run.json or checkpoint.pt in it: a RUN_DIR,
    given for a new folder), refused before any work: their results and runs/ went in beside it, and RUN_DIR's own
    eval (RUN_DIR/eval) then sat beside results.json of other weights. So is one holding the results of another
    command (``command``: "demo", or "reproduce NAME"; an eval's, a demo's, another protocol's), which they
    replaced."""
    word = command.split()[0]
    found = run_files(out)
    if found:
        raise CLIError(f"--out: {out} holds a training run ({' and '.join(found)}: a train --out), not {word}'s "
                       f"results; choose another --out for {word}")
    owner = results_command(out)
    if owner is not None and owner != command:
        raise CLIError(f"--out: {out} holds {owner}'s results (results.json, report.md and figures), which {command} "
                       f"would replace; choose another --out for {word}")


def results_record(out):
    """(command, config) of the results ``out`` holds, as its results.json records them: command "eval", "demo" or
    "reproduce NAME" (NAME its protocol); (None, {}) for no results.json, one unreadable or recording no command."""
    try:
        config = json.loads((Path(out) / "results.json").read_text()).get("config") or {}
        protocol, command = config.get("protocol"), config.get("command")
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not UTF-8, or not an object
        return None, {}
    if isinstance(protocol, str):
        return f"reproduce {protocol}", config
    return (command, config) if isinstance(command, str) else (None, config)


def results_command(out):
    """The command whose results ``out`` holds (:func:`results_record`), None for none."""
    return results_record(out)[0]


def refuse_others_output(out, run_dir):
    """eval's ``out`` holding what eval would write over or beside, refused before any work: the results of a demo
    or reproduce (their results.json, report.md and figures were replaced by those of one run's weights, beside
    their runs/), or a training run other than the evaluated one in ``run_dir`` (its folder then held results.json
    of other weights)."""
    out = Path(out)
    command = results_command(out)
    if command is not None and command != "eval":
        raise CLIError(f"--out: {out} holds {command}'s results (results.json, report.md and figures beside its runs), "
                       "which eval would replace; choose another --out for eval")
    found = run_files(out)
    if found and out.resolve() != Path(run_dir).resolve():
        raise CLIError(f"--out: {out} holds another training run ({' and '.join(found)}), not the one evaluated "
                       f"({run_dir}); choose another --out for eval")


def cmd_train(args):
    from ._options import counted

    check_out(args.out, staged=False)
    refuse_results_folder(args.out)
    device = pick_device(args.device)
    options = parse_key_values(args.defense_opt, "--defense-opt")
    check_data_model_options(args)
    check_schedule_options(args.warmup_epochs, args.early_stopping, args.restore_best)
    dist_timeout = checked_dist_timeout(args.dist_timeout)
    try:
        with interrupts_unwrapped():
            _, splits, run, result = train_run(
                data=args.data, defense_name=args.defense, defense_options=options, model_name=args.model,
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device,
                out=args.out, resume=args.resume, dropmax=args.dropmax, size=args.size,
                progress=not args.no_progress, channels_last=args.channels_last,
                prepacked_conv=args.prepacked_conv, classes=args.classes, bit_depth=args.bit_depth,
                channels=args.channels, warmup_epochs=args.warmup_epochs, early_stopping=args.early_stopping,
                restore_best=args.restore_best, dist_timeout=dist_timeout)
    except KeyboardInterrupt:
        ckpt = Path(args.out) / CHECKPOINT
        where = f"{ckpt} holds the last finished epoch" if ckpt.is_file() else "no epoch finished yet"
        if is_main_process():
            print(f"\n{PROG} train: interrupted; {where}; continue with the same command and --resume",
                  file=sys.stderr)
        return 130
    if not is_main_process():  # under torchrun, rank 0 alone reports the run
        return 0
    history = result.history
    last = history[-1] if history else {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float) and k != "lr")
    # run.json's name (MIRST_DM -> mirst-dm), the one eval's tables and --resume use, not the spelling typed
    print(f"trained {run['defense']} on {splits.info.display_name} for {counted(len(history), 'epoch')}: {shown}")
    if args.early_stopping is not None:  # the checkpoint's state (the run may have stopped in an earlier call), as fit
        stop = result.early_stopping or {}  # hands it back: not read from the file once more
        if stop.get("stopped_epoch"):
            print(f"early stopping: stopped after epoch {stop['stopped_epoch']}: {stop['reason']}")
        elif stop.get("best") is not None:
            print(f"early stopping: did not stop (best val_loss {stop['best']:.4g} at epoch {stop['best_epoch']})")
        if args.restore_best and (Path(args.out) / BEST_MODEL).is_file():
            print(f"restore best: the model is epoch {stop['best_epoch']}'s, in {Path(args.out) / BEST_MODEL} (eval "
                  f"of RUN_DIR attacks it; {CHECKPOINT} holds the last epoch's)")
    print(f"classes: {describe_classes(splits.info)}")
    # quoted: an --out with a space or quote printed a command that eval read as several arguments
    print(f"run: {args.out} (evaluate with: {PROG} eval {shlex.quote(str(args.out))} "
          f"{eval_threat_model(run, splits)})")
    return 0


def eval_threat_model(run, splits):
    """The attacks and radii of the eval command printed after training: eval's L-inf defaults, or for a run trained
    against L2 attacks (IMA, DPAAT, AMAT) L2 attacks at fractions of its training radius -- the L-inf defaults did
    not measure the threat model such a run was trained for."""
    settings = run.get("defense_settings") or {}
    radius = None
    if settings.get("norm") == "l2" and run.get("defense") == "ima":  # eps_train is state, not a setting
        from .ima import paper_eps_train

        given = (run.get("defense_options") or {}).get("eps_train")
        radius = float(given) if given is not None else paper_eps_train(tuple(splits.train[0][0].shape), "l2")
    elif settings.get("norm") == "l2":  # GR's norm is its gradient penalty's: no radius, eval's defaults
        radius = settings.get("eps")
    if radius is None:
        return "--attacks fgsm,pgd,cw --eps 1/255,2/255,5/255"
    # each radius exact: 3 significant digits printed 1.12 for 1.125, and 1.52, past it, for IMA's 1.5155 at 1x28x28
    radii = [f"{r:g}" if float(f"{r:g}") == r else repr(r) for r in (radius * f for f in (0.25, 0.5, 1))]
    return f"--attacks pgdl2,apgd-ce:norm=l2 --eps {','.join(radii)}"


# ----------------------------------------------------------------------------------------------- eval


# what eval says of a checkpoint without run.json that --model may not rebuild: fit's out_dir in Python holds one
_OWN_MODEL_HINT = ("--model builds the library's models only; a model of your own, trained in Python, is evaluated "
                   "in Python: robust_ops.evaluate.evaluate")


def load_run(target, *, data=None, model=None, size=None, channels_last=None, classes=None, bit_depth=None,
             channels=None):
    """(model, splits, run) from RUN_DIR (run.json + checkpoint.pt, or best_model.pt for a run that recorded
    restore_best, else the checkpoint's copy of the same weights) or a checkpoint file (run.json beside it, or
    --data/--model given). ``channels_last`` None: the memory format the run trained in; True / False: that one."""
    from .train import HISTORY_NAME, METRICS_CSV_NAME

    target = Path(target)
    if target.is_dir():
        ckpt, run_file = target / CHECKPOINT, target / RUN_FILE
    elif target.name in (RUN_FILE, HISTORY_NAME, METRICS_CSV_NAME) and target.is_file():
        # a run's record, not its weights: it was "not a readable checkpoint (not a torch.save file: ...)"
        raise CLIError(f"{target}: is a run's {target.name}, not a checkpoint; pass the run folder {target.parent} "
                       f"(or its {CHECKPOINT})")
    elif target.exists():
        ckpt, run_file = target, target.parent / RUN_FILE
    else:
        raise CLIError(f"{target}: no such run folder or checkpoint file")
    run = {}
    if run_file.is_file():
        run = read_run_file(run_file)
    if target.is_dir() and run.get("restore_best") and (target / BEST_MODEL).is_file():
        ckpt = target / BEST_MODEL  # what a --restore-best run hands back; its checkpoint.pt is the last epoch's
    explicit_data = data is not None  # the refusal below offers --data as the way to the data's own test split
    data = data or run.get("data")
    flag = "--data" if explicit_data else f"{run_file}: data"  # an error names where the path came from
    model_name = model or run.get("model")
    if data is None or model_name is None:
        lacking = [name for name, value in (("data", data), ("model", model_name)) if value is None]
        flags = " and ".join(f"--{name}" for name in lacking)
        if run:  # it said "no run.json beside the checkpoint" of one that lacks the key
            raise CLIError(f"{run_file}: records no {' and no '.join(lacking)}; pass {flags}")
        raise CLIError(f"{target}: no {RUN_FILE} beside the checkpoint; pass {flags}"
                       + (f"; {_OWN_MODEL_HINT}" if model_name is None else ""))
    chosen_best = target.is_dir() and ckpt.name == BEST_MODEL  # eval's pick, to be attacked as the best weights
    try:
        state = read_checkpoint(ckpt)
    except CLIError as err:
        if not chosen_best:
            raise
        way_out = _best_model_way_out(target)
        raise CLIError(f"{err}{f'; {way_out}' if way_out else ''}") from None
    if chosen_best and not (isinstance(state, dict) and state.get("weights") == "best"):
        # another file copied in as best_model.pt (checkpoint.pt, another run's, a bare state_dict) was attacked and
        # recorded as the run's best epoch without a word; fit writes the marker in every best_model.pt
        what = ("a fit checkpoint" if isinstance(state, dict) and "format" in state and "model" in state else
                "a bare state_dict" if isinstance(state, dict) else type(state).__name__)
        way_out = _best_model_way_out(target)
        raise CLIError(f"{ckpt}: is not a best-model file of this run ({what}, without the weights='best' record "
                       f"train writes in it); put the run's own {BEST_MODEL} back"
                       f"{f', or {way_out}' if way_out else ''}")
    if target.is_dir() and ckpt.name == CHECKPOINT and run.get("restore_best") and isinstance(state, dict) and \
            isinstance(state.get("best_model"), dict):
        # best_model.pt gone (deleted, or not copied with the run): the checkpoint holds the same best weights, which
        # the run hands back; its model, the last epoch's, would be attacked in their place without a word
        best_epoch = (state.get("early_stopping") or {}).get("best_epoch")
        state = {**state, "model": state["best_model"], "weights": "best", "epoch": best_epoch}
    conflict = checkpoint_run_conflict(state, run)
    if conflict:  # labelled and recorded as run.json's run, the results would describe weights they do not come from
        key, saved, recorded = conflict
        if key == "train_data_sha256":  # two 64-digit digests made a line of 330 characters; 12 digits tell them apart
            saved, recorded = f"{saved[:12]}...", f"{recorded[:12]}..."
        raise CLIError(f"{ckpt}: was trained with {key}={saved!r}, but {run_file} beside it records "
                       f"{key}={recorded!r}: the checkpoint comes from another run -- put it beside its own {RUN_FILE}")
    done = state.get("epoch") if isinstance(state, dict) else None
    if isinstance(state, dict) and state.get("weights") == "best" and isinstance(done, int) and run:
        # best_model.pt: the best epoch's weights, held back on purpose, not a run stopped early
        run = {**run, "weights": "best", "best_epoch": done}
    elif isinstance(done, int) and run:
        # results.json's config copies run.json, whose epochs are the ones asked for, not the ones trained
        run = {**run, "epochs_trained": done}
        stop = state.get("early_stopping")
        stopped = isinstance(stop, dict) and stop.get("stopped_epoch") is not None  # finished: --resume adds none
        if isinstance(run.get("epochs"), int) and done < run["epochs"] and not stopped:
            from ._files import folder_in_use

            busy = folder_in_use(ckpt.parent)  # train_run holds the folder of a run still training
            if busy:  # it has not stopped (and --resume would be refused)
                who = f"process {busy.pid}" if busy.pid is not None else "another process"
                why, then = f"{who} is still training it", "rerun eval once it ends"
            else:
                why, then = "training stopped early", f"`{PROG} train ... --resume` finishes it"
            warnings.warn(f"{ckpt}: holds {done} of the run's {run['epochs']} epochs ({why}); attacking it as it is "
                          f"-- {then}")
    if not explicit_data and os.path.isabs(str(data)) and not Path(data).exists():  # run.json records paths absolute
        raise CLIError(f"{run_file}: data: {data}: no such file or folder (moved or deleted since the run trained); "
                       "pass --data with its place now")
    same_source = same_data_source(data, run.get("data"))
    if same_source and size is not None and size == (run.get("dataset") or {}).get("image_size"):
        # the size the run's images were loaded at is its own data (as --resume takes it): its split and checks
        size = run.get("size")
    if same_source and run and bit_depth is not None and bit_reading(bit_depth) == bit_reading(run.get("bit_depth")):
        # the full 16 bits, as the run read its images: refused as "another scale" though the scale is the same
        bit_depth = run.get("bit_depth")
    if same_source and run and bit_depth is not None and bit_depth != run.get("bit_depth"):
        # the run's own images on another intensity scale (its 12-bit CT read on the full 16 bits: 16 times darker)
        # were attacked without a word, and results.json recorded them as the run's data
        was = "without --bit-depth (the full 16 bits)" if run.get("bit_depth") is None else \
            f"with --bit-depth {run['bit_depth']}"
        raise CLIError(f"--bit-depth: {data} is the run's own data, trained {was}; --bit-depth {bit_depth} reads "
                       "its 16-bit images on another scale than the model learned -- drop --bit-depth")
    # the run's class selection applies to its own data; another selection is another split, as other data is
    classes = classes if classes is not None else run.get("classes") if same_source else None
    bit_depth = bit_depth if bit_depth is not None else run.get("bit_depth") if same_source else None
    channels = channels if channels is not None else run.get("channels") if same_source else None
    same_data = same_source and (size is None or size == run.get("size")) and (
        classes is None or list(classes) == run.get("classes")) and bit_depth == run.get("bit_depth") and (
        channels == run.get("channels"))
    # a folder / CSV run read at the default size: rebuilt at the size it was read at (the same images), so the
    # loader's warning that the default upscales small images, advice for a new run, is not repeated for this one
    read_at = (run.get("dataset") or {}).get("image_size") if same_data and run.get("size") is None and (
        run.get("dataset") or {}).get("class_counts") is not None else None
    if run.get("split") and same_data:  # a reproduce run: its own fold / subset, not the data's train/val/test
        from .reproduce import rebuild_splits

        record = run["split"] if read_at is None or run["split"].get("size") is not None else \
            {**run["split"], "size": read_at}
        with _own_data_advice_dropped():  # same_data: its own data
            splits = rebuild_splits(data, record, split_by=_trained_split_by(run, data, same_data),
                                    rare_classes=_trained_rare_classes(run, data, same_data))
    elif same_data and not explicit_data and _looks_like_kfold_run(target if target.is_dir() else target.parent):
        raise CLIError(f"{target}: a reproduce k-fold run whose {RUN_FILE} predates the split record, so its held-out "
                       f"fold cannot be rebuilt; rerun the same `{PROG} reproduce` command (it records the split "
                       "without retraining), or pass --data to attack that data's own test split")
    else:
        # run.json files written before 2026-12-06 lack the training set's fingerprint: the checkpoint's record of it
        config = state.get("config") if isinstance(state, dict) else None
        trained_fingerprint = config.get("train_data_sha256") if isinstance(config, dict) else None

        def read(at):
            def load():
                return load_data(data, size=at, seed=run.get("seed", 0), flag=flag, classes=classes,
                                 bit_depth=bit_depth, channels=channels,
                                 split_by=_trained_split_by(run, data, same_data),
                                 rare_classes=_trained_rare_classes(run, data, same_data))

            if same_data:
                with _own_data_advice_dropped():
                    return load()
            return _other_data_read(load, run.get("train_data_sha256") or trained_fingerprint)

        try:  # `is None`, not `or`: --size 0 is an error to report, not "the run's size"
            splits = read((read_at or run.get("size")) if size is None else size)
        except CLIError as err:
            # run.json's size, not a --size given, refused by other data that has its own (an .npz, moons): it said
            # "--size: ... drop --size"; read at its own size, which the model checks below judge
            if not (size is None and not same_source and run.get("size") is not None
                    and str(err).startswith("--size:")):
                raise
            splits = read(None)
    was = (run.get("dataset") or {}).get("class_counts")
    now = splits.info.extra.get("class_counts")
    if same_data and was and now is not None and was != now:  # the seeded split would differ: train images in test
        raise CLIError(f"{flag}: {data} now holds {_counts(now)}, but the run was trained when it held "
                       f"{_counts(was)}; its split would differ and could test on training images -- restore the "
                       "data or train again")
    was = (run.get("dataset") or {}).get("samples_digest")
    now = splits.info.extra.get("samples_digest")
    # same counts, other order, names or labels (a run trained before ids' "\\" were read as "/" recorded them as
    # written: that digest too)
    if same_data and was and now is not None and was != now and not (
            isinstance(was, str) and was in earlier_samples_digests(splits.info.extra)):
        raise CLIError(f"{flag}: {data} holds other images, names or row order than when the run was trained (same "
                       "class counts); its split would differ and could test on training images -- restore the data "
                       "or train again")
    trained_on = run.get("dataset") or {}
    trained, names = trained_on.get("class_names"), splits.info.class_names
    # a run on OCTMNIST, TissueMNIST or Organ{A,C,S}MNIST trained before the loader knew their class names recorded
    # the labels numbered ("0", "1", ...): its own file's labels, now named (a --classes could reorder a CSV's)
    numbered = same_source and classes is None and list(trained or ()) == [str(i) for i in range(len(names))]
    other_names = bool(trained and names and list(trained) != list(names)) and not numbered

    def labels(classes):
        return ", ".join(f"{name} = {i}" for i, name in enumerate(classes))

    if other_names and same_source:  # other labels on the run's own images: the seeded split differs, training
        # images in test
        raise CLIError(f"--classes: {data} is the run's own data, trained on {labels(trained)}; {labels(names)} "
                       "splits it otherwise, so its test split could hold images the run trained on -- drop "
                       "--classes")
    shape = ("in_channels", "num_classes", "image_size")
    if trained_on and any(trained_on.get(k) != getattr(splits.info, k) for k in shape[:2]):
        # the weights cannot load: say why, not PyTorch's "Error(s) in loading state_dict" (its first line)
        def inputs(d):
            what = (f"{d['in_channels']}-channel images" if d["image_size"] else
                    f"feature vectors of {d['in_channels']} values")
            return f"{what} in {d['num_classes']} classes"

        from .data.core import reads_image_files

        # images read with other channels than the run's (--channels 1 at training, a CSV's RGB default now)
        was = trained_on.get("in_channels")
        fix = (f"; read them as {was}-channel images with --channels {was}" if was in (1, 3) and was !=
               splits.info.in_channels and splits.info.image_size and reads_image_files(data) else "")
        raise CLIError(f"{flag}: {data} holds {inputs(splits.info.to_dict())}, but the run was trained on "
                       f"{inputs({k: trained_on.get(k) for k in shape})} ({trained_on.get('name')}); its model "
                       f"cannot take them{fix}")
    if other_names:  # label i may be another class: metrics would be swapped
        warnings.warn(f"{flag}: {data} labels its classes {labels(names)}, but the run was trained on "
                      f"{labels(trained)}; its predictions are scored against labels that may mean other classes")
    dropmax = trained_dropmax(run)
    net = make_model(model_name, splits.info, dropmax, dropmax_from=f"{run_file}: dropmax")
    weights = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise CLIError(f"{ckpt}: expected a fit checkpoint or a state_dict, got {type(state).__name__}")
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        from .train import state_dict_mismatch

        trained = run.get("model")
        hint = f"; {RUN_FILE} says the run trained --model {trained}" if trained not in (None, model_name) else ""
        side, now = trained_on.get("image_size"), splits.info.image_size
        if not hint and side and now and side != now:  # the layers a model builds depend on the size (stem, pools)
            hint = (f"; the run was trained on {side}x{side} images and {model_name}'s layers depend on the image "
                    f"size, this data's are {now}x{now} -- evaluate on {side}x{side} images (--size {side} for a "
                    "folder, a CSV or a MedMNIST name)")
        wrapper = _wrapped_weights(net, weights)
        if not hint and wrapper:
            hint = (f"; its weights are {model_name}'s inside a wrapper ({wrapper}: trained wrapped, e.g. in "
                    "attacks.Normalized(model, mean, std), whose input scaling the command line cannot rebuild) -- "
                    "evaluate the wrapped model in Python (robust_ops.evaluate.evaluate)")
        if not hint and not run:  # a bare checkpoint, such as fit's out_dir in Python writes: maybe the user's model
            hint = f"; {_OWN_MODEL_HINT}"
        raise CLIError(f"{ckpt}: does not fit --model {model_name} on {splits.info.name} "
                       f"({state_dict_mismatch(err)}){hint}") from None
    from .train import drop_max_mismatch

    mismatch = drop_max_mismatch(net, state)
    if mismatch is not None and not run:  # a bare checkpoint (fit's out_dir in Python): the layers it records
        for which in ("first", "all"):
            try:
                rebuilt = make_model(model_name, splits.info, which)
            except CLIError:  # no max pooling to replace
                continue
            if drop_max_mismatch(rebuilt, state) is None:
                rebuilt.load_state_dict(weights)  # as net took them: pooling holds no weights
                net, dropmax, mismatch = rebuilt, which, None
                break
        else:  # layers neither --dropmax rebuilds (a model made drop-max by hand)
            raise CLIError(f"{ckpt}: {mismatch} (rebuilt as {model_name}; --model makes the first max-pooling layer "
                           "or all of them drop-max only); evaluate the model it trained in Python: "
                           "robust_ops.evaluate.evaluate")
    if mismatch is not None:  # the weights loaded, but the model would compute other outputs than the trained one
        raise CLIError(f"{ckpt}: {mismatch} (rebuilt as {model_name} with dropmax {dropmax!r}); put the run's "
                       f"{RUN_FILE}, which records its dropmax, beside the checkpoint")
    if channels_last is None:  # as the run trained
        channels_last = bool(run.get("channels_last"))
    if channels_last:
        import torch

        net = net.to(memory_format=torch.channels_last)
    return net, splits, run


_BIT_DEPTH_ADVICE = r".*\(\d+-bit data\?\); scaled from the full 16-bit range"  # the loader's "pass --bit-depth 12"
_SIZE_ADVICE = r".*: every image is at most \d+ pixels a side, read at the default"  # the loader's "pass --size 8"
# the CSV loader's "column 'dx' holds 'nan' (7 rows): missing values ... leave them out with classes= (--classes ...)"
_MISSING_LABELS_ADVICE = r".*: column .* holds .*: missing values \(as pandas writes NaN\), each read as a class"
# its "column 'lesion_id' holds 'NA' (20 rows): a missing value ..., its rows kept as one lesion_id group, ... give each
# such row its own lesion_id, or remove those rows": either draws another split, which eval refuses for the run
_MISSING_GROUPS_ADVICE = (r".*: column .* holds .*: (?:a )?missing values? \(as pandas writes NaN\), "
                          r"(?:its|each one's) rows kept as one")


@contextlib.contextmanager
def _own_data_advice_dropped():
    """A block in which the loader's advice for a new run is not shown, which eval repeated for a run on its own
    data, trained on its images and classes as read: "(12-bit data?) ... pass --bit-depth 12" (another --bit-depth
    on them is refused), the CSV's labels spelled as missing values "... leave them out with --classes mel,nv"
    (the run trained on those classes, and another --classes on its own data is refused) and its group ids spelled
    so, "... kept as one lesion_id group ... give each such row its own lesion_id" (another split, refused too), as it
    drops the loader's advice on the default size for one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BIT_DEPTH_ADVICE)
        warnings.filterwarnings("ignore", message=_MISSING_LABELS_ADVICE)
        warnings.filterwarnings("ignore", message=_MISSING_GROUPS_ADVICE)
        yield


def _other_data_read(load, trained):
    """``load()``'s splits of data other than the run's own (another path), its warnings shown once it returns (or
    fails), but for the loader's advice for a new run, to pass --bit-depth, --size or --classes (labels spelled as
    missing values, which the run trained on as classes: --classes then refused), where the training split holds
    the very images the run trained on, read as it read them (``trained``, the fingerprint run.json or, where it lacks
    one, the checkpoint records: a copy of its folder): following it read them on another scale than the model
    learned, for a run trained without --bit-depth, or at another size than it learned, for one trained at the default
    size on small images."""
    from .train import train_data_fingerprint

    splits = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            splits = load()
    finally:
        advice = f"{_BIT_DEPTH_ADVICE}|{_SIZE_ADVICE}|{_MISSING_LABELS_ADVICE}|{_MISSING_GROUPS_ADVICE}"
        advised = [w for w in caught if re.match(advice, str(w.message))]
        # the fingerprint (0.3-520 ms by image size) only where there is advice to drop
        same = bool(advised) and splits is not None and trained is not None and \
            train_data_fingerprint(splits.train) == trained
        for w in caught:
            if not (same and w in advised):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return splits


def _best_model_way_out(run_dir):
    """The way past RUN_DIR's unusable best_model.pt, for eval's refusal ("" where there is none): removing it makes
    eval attack the same best weights in checkpoint.pt (its ``best_model``, as load_run falls back to)."""
    try:
        state = read_checkpoint(run_dir / CHECKPOINT)
    except CLIError:
        return ""
    if not (isinstance(state, dict) and isinstance(state.get("best_model"), dict)):
        return ""
    return (f"remove it, and `{PROG} eval {shlex.quote(str(run_dir))}` attacks the best epoch's weights that "
            f"{CHECKPOINT} holds too")


def checkpoint_run_conflict(state, run):
    """``(key, checkpoint's value, run.json's value)`` for a training setting a fit checkpoint records otherwise than
    ``run`` (its run.json): a checkpoint copied from another run. None when they agree, or either lacks the record
    (checkpoints and run.json files written before it, a bare state_dict, your own defense class)."""
    from . import defenses

    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict) or not run:
        return None
    # channels_last, prepacked_conv and the training set's size too: a --channels-last or --prepacked-conv run's
    # checkpoint (or a demo run's, trained on its --train-size subset) beside another run's run.json was attacked as
    # that run, exit 0, when its defense, seed, batch size and lr agreed; and the training set's fingerprint, which
    # run.json records since 2026-12-06: a checkpoint trained at another --size (small_cnn takes any) passed them all
    for key, saved_as in (("defense", "defense"), ("seed", "seed"), ("batch_size", "batch_size"), ("lr", "lr"),
                          ("channels_last", "channels_last"), ("prepacked_conv", "prepacked_conv"),
                          ("train_samples", "num_samples"), ("train_data_sha256", "train_data_sha256")):
        saved, recorded = config.get(saved_as), run.get(key)
        if key == "defense" and recorded is not None:  # the registry's spelling, as fit records defense.name
            recorded = defense_key(recorded)
            if recorded not in defenses.NAMES:
                continue
        if saved is not None and recorded is not None and saved != recorded:
            return key, saved, recorded
    return None


def _looks_like_kfold_run(run_dir):
    """OUT/runs[-quick]/METHOD/foldK: where reproduce keeps its k-fold runs."""
    import re

    run_dir = Path(run_dir).resolve()
    return bool(re.fullmatch(r"fold\d+", run_dir.name)) and run_dir.parent.parent.name in ("runs", "runs-quick")


def add_eval_options(p, attacks="fgsm,pgd,cw", eps="1/255,2/255,5/255"):
    from .attacks import ATTACKS

    p.add_argument("--attacks", action=OneList, default=attacks,
                   help=f"comma-separated attacks: {', '.join(ATTACKS)}, or your own Attack subclass as "
                        "package.module.Class (imported from PYTHONPATH); options as name:key=value, e.g. "
                        "pgd:steps=50, noise:norm=l2:trials=100")
    p.add_argument("--eps", action=OneList, default=eps, help="comma-separated radii; fractions allowed (1/255)")
    p.add_argument("--eval-batch-size", type=int, default=128, help="test images attacked at a time")
    p.add_argument("--no-cascade", action=Switch,
                   help="attack every sample at every radius (default: only samples still robust)")
    p.add_argument("--ensemble", action=Switch,
                   help="AutoAttack-style: the attacks as one cascade per radius; report only the worst case")
    # None: not given, so saliency_count can tell the default from an explicit request on feature vectors
    p.add_argument("--saliency", type=int, default=None,
                   help="test images in the Grad-CAM / input-gradient figure (0: none; default: 4 on images, none on "
                        "feature vectors such as moons, where an N > 0 is an error)")


def cmd_eval_parser(sub):
    p = sub.add_parser("eval", help="evaluate a trained model under attacks", formatter_class=_formatter,
                       description="Evaluate RUN_DIR (or a checkpoint file) under --attacks at each --eps; writes "
                                   "results.json, report.md and PNG figures.")
    p.add_argument("target", metavar="RUN_DIR|CHECKPOINT", type=path_text,
                   help="a `robust-ops train` output folder, or its checkpoint.pt (or best_model.pt)")
    add_eval_options(p)
    p.add_argument("--out", type=path_text, default=None, help="output folder (default: RUN_DIR/eval)")
    p.add_argument("--data", default=None, help="dataset (default: the one in run.json)")
    p.add_argument("--download", action=Switch, help=DOWNLOAD_HELP)
    p.add_argument("--model", default=None, help="architecture (default: the one in run.json)")
    p.add_argument("--size", type=int, default=None, help="image side length (default: the one in run.json)")
    p.add_argument("--classes", type=parse_classes, action=OneList, default=None,
                   help="class folders / CSV labels to keep, or an .npz's label names, in label order (default: the "
                        "ones in run.json)")
    add_bit_depth_option(p, "the one in run.json")
    add_channels_option(p, "the one in run.json")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which held-out split to attack")
    p.add_argument("--method", default=None,
                   help="name in tables (default: the run's label in run.json: its defense for train runs, e.g. "
                        "Baseline or MIRST-DM for demo's)")
    # default None: as the run was trained (run.json); either flag, or a config file's value, overrides the run
    p.add_argument("--channels-last", action=Switch, default=None,
                   help="attack the model in channels_last memory format (default: as the run was trained; "
                        "--no-channels-last attacks a channels_last run in NCHW)")
    p.add_argument("--prepacked-conv", action=Switch, default=None,
                   help="attack on convolutions packed once per attack (faster on CPU, last-bit differences; "
                        "default: as the run was trained, else $ROBUST_OPS_PREPACKED_CONV; --no-prepacked-conv "
                        "turns it off for a run trained with it)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action=Switch, help="no progress lines (one per attack and radius)")
    p.add_argument("--config", action=OneConfig, type=path_text, help="YAML or JSON file of options")
    p.set_defaults(func=cmd_eval)
    return p


def _flag_error(err):
    """An evaluate.EvalError as the CLI's one-line error, led by the flag it names (``--attacks: ...``)."""
    if err.arg == "model":  # NaN/Inf outputs: the checkpoint is at fault, not --model
        return CLIError(str(err))
    return CLIError(f"--{err.arg}: {str(err).split(': ', 1)[-1]}")


def check_out(out, flag="--out", staged=True):
    """Before any work: ``out`` must be a folder or not exist yet (results written at the end would be lost).
    ``staged``: the command stages its results beside ``out`` (AtomicOutput), so the folder above must take files
    too; train writes in ``out`` alone (a scheduler's job folder in a parent the user cannot write is fine)."""
    if out is None:
        return
    from ._files import NOT_A_FOLDER, out_dir_problem

    problem = out_dir_problem(out, staged)
    if problem == NOT_A_FOLDER:
        raise CLIError(f"{flag}: {out} exists and is not a folder")
    if problem:
        raise CLIError(f"{flag}: {out}: {problem}")


def parse_eval_options(args):
    """(attack specs, radii) from --attacks and --eps; one-line errors for them and --eval-batch-size. Commands call
    it before loading data or training, so a typo fails at once."""
    from .evaluate import EvalError, parse_attacks, parse_eps, parse_number

    try:
        specs = parse_attacks(args.attacks)
        radii = parse_eps(args.eps)
    except EvalError as err:
        raise _flag_error(err) from None
    # parse_eps keeps each radius once: `1/255,1/255` (a typo for 1/255,2/255) gave one radius's rows, silently, where
    # a repeated attack, method or topic is refused
    given = {}
    for text in (t.strip() for t in str(args.eps).split(",")):
        value = parse_number(text)  # parse_eps took every one
        if value in given:
            raise CLIError(f"--eps: {given[value]} and {text} are the same radius; list each radius once")
        given[value] = text
    check_count("--eval-batch-size", args.eval_batch_size)
    check_count("--saliency", args.saliency, 0)
    if args.ensemble and args.no_cascade:  # the ensemble is a cascade by definition; results.json would claim not
        raise CLIError("--no-cascade: --ensemble always runs its attacks as a cascade; drop one of the two flags")
    return specs, radii


def saliency_count(args, info):
    """How many test images the saliency figure shows: ``--saliency``, else 4 on images and none on feature vectors
    (two-moons), where an explicit N > 0 is an error: the maps are drawn over images, no figure would come."""
    if not info.image_size:
        if args.saliency:
            raise CLIError(f"--saliency: {info.display_name} holds feature vectors of {info.in_channels} values, not "
                           "images; saliency maps need image inputs -- drop --saliency (or set it to 0)")
        return 0
    return 4 if args.saliency is None else args.saliency


def evaluate_models(models, splits, args, specs, radii, device, out, title, config, seed):
    """Evaluate {label: model} on the test split under ``specs`` at ``radii`` (from :func:`parse_eval_options`),
    write everything atomically, print the tables; returns rows. Each model's attacks draw from torch's RNG seeded
    with ``seed`` (the run's): the rows do not depend on what the process did before (a demo resumed after its
    training, a second eval of the same run)."""
    from . import report
    from ._options import counted
    from .evaluate import EvalError, evaluate

    split = getattr(args, "split", "test")
    if split not in ("test", "val"):  # never fall back to another split silently
        raise ValueError(f"evaluate_models: unknown split {split!r}; expected 'test' or 'val'")
    test = splits.test if split == "test" else splits.val
    if len(test) == 0:
        data = getattr(args, "data", None) or splits.info.name
        raise CLIError(f"--split: the {split} split of {data} has no samples")
    count = saliency_count(args, splits.info)  # before the attacks: an explicit --saliency on feature vectors fails
    count = min(count, len(test))  # a split smaller than --saliency is drawn whole; config records the count drawn
    rows = []
    # eval's and demo's --no-progress: no line per attack and radius (the tables and file names still print)
    progress = None if args.no_progress else (lambda s: print("  " + s, flush=True))
    for label, model in models.items():
        try:
            rows += evaluate(model, test, splits.info, attacks=specs, eps=radii, method=label,
                             batch_size=args.eval_batch_size, device=device, cascade=not args.no_cascade,
                             ensemble=args.ensemble, progress=progress, seed=seed)
        except EvalError as err:
            raise _flag_error(err) from None
    saliency = None
    if count > 0:
        import torch

        x, y = test.tensors
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(y), generator=g)[:count]
        saliency = (models, x[pick], y[pick])
    # both shape what the run wrote (random starts and Square's noise are drawn per batch; the figure's images), so a
    # results.json read later says how it was made
    config = {**config, "eval_batch_size": args.eval_batch_size, "saliency_images": count, "attack_seed": seed}
    paths = write_results_to_out(out, rows, splits.info, config=config, device=device, title=title, saliency=saliency)
    metrics = report.pivot_metrics(splits.info.num_classes == 2, terminal=True)
    # the tables' sensitivity is that of the positive class, label 0 in BreastMNIST: say which, as report.md does
    info = splits.info.to_dict()
    print(f"\n{splits.info.name}: {report.positive_class_text(info)}{report.absent_classes_text(info, args.split)}")
    for m in metrics:
        print()
        print(report.pivot_table(rows, m))
    # why a table shows "–": report.md said, the terminal left the reader guessing (a bug, or no positives?)
    note = report.undefined_note(rows, metrics, splits.info.num_classes == 2)
    if note:
        print("\n" + note.removeprefix("> ").replace("**", "").replace("`", ""))
    print(f"\nwrote {paths['results']}, {paths['report']} and {counted(len(paths['figures']), 'figure')}"
          + (" -- SYNTHETIC DATA" if splits.info.synthetic else ""))
    return rows


def write_results_to_out(out, *args, **kwargs):
    """evaluate.write_results; a file it cannot write (a full disk) is a one-line error, not a traceback from
    matplotlib's savefig: the results are staged, so nothing of them reached ``out``."""
    from .evaluate import write_results

    try:
        return write_results(out, *args, **kwargs)
    except OSError as err:
        raise CLIError(f"--out: {out}: cannot write the results ({err.strerror or err}); nothing was written "
                       "there") from None


def cmd_eval(args):
    refuse_several_processes("eval", "repeat the whole evaluation and write the same results and figures")
    specs, radii = parse_eval_options(args)
    target = Path(args.target)
    run_dir = target if target.is_dir() else target.parent
    out = Path(args.out) if args.out else run_dir / "eval"
    check_out(out)
    refuse_others_output(out, run_dir)
    device = pick_device(args.device)
    model, splits, run = load_run(args.target, data=args.data, model=args.model, size=args.size,
                                  channels_last=args.channels_last, classes=args.classes, bit_depth=args.bit_depth,
                                  channels=args.channels)
    label = args.method or run.get("label") or run.get("defense") or "model"
    config = {"command": "eval", "target": str(args.target), "attacks": args.attacks, "eps": args.eps,
              "cascade": not args.no_cascade, "ensemble": args.ensemble, "split": args.split,
              "channels_last": bool(args.channels_last if args.channels_last is not None
                                    else run.get("channels_last")), "run": run}
    from .prepacked_conv import prepacked_conv, prepacked_conv_resolved

    # not given: on if the run trained with it, else as $ROBUST_OPS_PREPACKED_CONV says (None)
    prepacked = args.prepacked_conv if args.prepacked_conv is not None else (run.get("prepacked_conv") or None)
    config["prepacked_conv"] = prepacked_conv_resolved(prepacked)
    with prepacked_conv(model, enabled=prepacked):
        evaluate_models({label: model}, splits, args, specs, radii, device, out, f"Robustness of {label} on "
                        f"{splits.info.display_name}", config, seed=run.get("seed", 0))
    return 0


# ----------------------------------------------------------------------------------------------- demo


def cmd_demo_parser(sub):
    p = sub.add_parser("demo", help="the main job: train baseline, RST, MIRST, MIRST-DM and IMA, then compare",
                       formatter_class=_formatter,
                       description="Train each method briefly on --data (default: the embedded synthetic set), "
                                   "evaluate them under no attack, FGSM, PGD and CW, print the table and write "
                                   "results.json, report.md and figures to --out.")
    p.add_argument("--methods", action=OneList, default=",".join(DEMO_METHODS),
                   help="comma-separated defenses (names or package.module.Class, as train's --defense)")
    # None: not given, so --quick can tell its own settings from conflicting ones
    add_data_model_options(p, epochs=None, epochs_help="training epochs per method (default: 8; --quick: 2)")
    p.add_argument("--train-size", type=int, default=None,
                   help="training images drawn from the train split (0: all; default: 256, --quick: 64) -- keeps "
                        "the demo to ~1 minute on 2 CPU cores (docs/cli.md)")
    add_eval_options(p, attacks="fgsm,pgd,cw", eps="1/255,2/255,5/255")
    p.add_argument("--out", type=path_text, default="runs/demo",
                   help="output folder (runs, results.json, report.md, figures)")
    p.add_argument("--quick", action=Switch, help="2 epochs on a subset: a smoke run (tests, CI)")
    p.add_argument("--resume", action=Switch, help="reuse finished runs in --out")
    p.add_argument("--no-progress", action=Switch, help="no progress bars")
    add_dist_timeout_option(p)
    p.add_argument("--config", action=OneConfig, type=path_text, help="YAML or JSON file of options")
    p.set_defaults(func=cmd_demo)
    return p


def subset_splits(splits, n_train, n_test, seed=0):
    """A random subset for quick runs (``n_test // 2`` validation images). It is not stratified: a rare class can
    miss a part, so the info it keeps records the subset's ``classes_missing_from_split``, and a warning names a class
    the subset leaves out of a part that held it (a class left out of train is never learned)."""
    import dataclasses

    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    from .data import DatasetSplits
    from .data.core import missing_classes_record

    parts, sets, offset = [], [], 0
    for ds, n, s in ((splits.train, n_train, seed), (splits.val, max(n_test // 2, 1), seed + 1),
                     (splits.test, n_test, seed + 2)):
        if len(ds) <= n:
            idx = torch.arange(len(ds))
            sets.append(ds)
        else:
            idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(s))[:n]
            sets.append(TensorDataset(*(t[idx] for t in ds.tensors)))
        parts.append(idx.numpy() + offset)
        offset += len(ds)
    info = splits.info
    y = np.concatenate([np.asarray(d.tensors[1]).reshape(-1) for d in (splits.train, splits.val, splits.test)])
    missing = missing_classes_record(y, parts, info.class_names)
    before = info.extra.get("classes_missing_from_split", {})
    new = {part: [c for c in cs if c not in before.get(part, [])] for part, cs in missing.items()}
    new = {part: cs for part, cs in new.items() if cs}
    if new:
        sizes = " / ".join(f"{len(d)} {part}" for d, part in zip(sets, ("train", "val", "test")))
        warnings.warn(f"{info.source or info.name}: the random subset ({sizes} images) leaves out "
                      + "; ".join(f"{', '.join(cs)} from {part}" for part, cs in new.items())
                      + ", which the split holds" + (" (a class left out of train is never learned)" if "train" in new
                                                     else ""), stacklevel=2)
    extra = {k: v for k, v in info.extra.items() if k != "classes_missing_from_split"}
    if missing:
        extra["classes_missing_from_split"] = missing
    return DatasetSplits(*sets, dataclasses.replace(info, extra=extra))


def _demo_resume_error(run_dir, conflict, args, epochs, quick_val=None):
    """demo's refusal of ``conflict`` (resume_conflict's) in its flags' words; ``quick_val``: the validation images
    --quick draws from this --data."""
    key, was, now = conflict
    if key == "epochs":
        return CLIError(f"--epochs: {run_dir} holds {was} epochs of training, more than the {epochs} of this command"
                        f"{' (--quick)' if args.quick else ''}; rerun with --epochs {was} or use another --out")
    if key in ("train_samples", "num_samples"):  # the subset changes with --train-size and --quick (num_samples: the
        # count a checkpoint without run.json records): another training set
        drawn = 64 if args.quick else 256 if args.train_size is None else args.train_size
        if not drawn or now < drawn:  # all of this --data's training split: it said --train-size, which drew neither
            return CLIError(f"--data: {run_dir} was trained on {was} training images, this command's --data has {now} "
                            "in its training split; rerun with the --data, --classes and --train-size / --quick it was "
                            "made with, or use another --out")
        return CLIError(f"--train-size: {run_dir} was trained on {was} training images, this command draws {now}"
                        f"{' (--quick)' if args.quick else ''}; rerun with the --train-size / --quick it was made "
                        "with, or use another --out")
    if key == "train_data_sha256":
        return CLIError(f"--resume: {run_dir} {OTHER_TRAINING_IMAGES}; rerun with the --data, --size, --classes, "
                        "--bit-depth and --channels it was made with, or use another --out")
    if key == "val_samples" and not args.quick and was != quick_val:
        # not --quick's count: --train-size 0 keeps the whole validation split, a subset draws at most half the test
        # split (the default 256 too); it said "rerun with --quick, as it was made" of runs made without it
        return CLIError(f"--train-size: {run_dir} was validated on {was} images, this command draws {now} "
                        "(--train-size 0: the whole validation split; another: at most half the test split); rerun "
                        "with the --train-size and --data it was made with, or use another --out")
    if key == "val_samples":  # --quick validates on 16 images, a run without it on half the test split: fit refused
        # the switch at the run's turn, naming --data and --classes
        now_words, way = ("(--quick)", "without --quick") if args.quick else ("(without --quick)", "with --quick")
        return CLIError(f"--quick: {run_dir} was validated on {was} images, this command draws {now} {now_words}; "
                        f"rerun {way}, as it was made, or use another --out")
    if key == "split_by":
        return CLIError(f"--resume: {split_by_refusal(run_dir, was, now)}; or rerun without --resume, or use another "
                        "--out")
    if key == "rare_classes":
        return CLIError(f"--resume: {rare_classes_refusal(run_dir)}; or rerun without --resume, or use another --out")
    # the way on, as train's refusal and demo's others end (it ended at "this command has --lr 0.002")
    where = f" (set by {FIT_SETTING_FLAGS[key]})" if key in FIT_SETTING_FLAGS else ""
    return CLIError(f"{resume_setting_error(resume_record_file(run_dir), key, was, now, DEMO_FLAG_SETTINGS)}{where}; "
                    "rerun with the run's settings to continue it, or use another --out")


def cmd_demo(args):
    device = pick_device(args.device)
    # as train's --defense reads them (MIRST_DM is mirst-dm): one run folder and label per defense
    methods = [defense_key(m.strip()) for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CLIError("--methods: expected at least one defense")
    from . import defenses
    from ._import_path import PATH_HINT, is_import_path
    from ._options import counted

    for m in methods:
        if is_import_path(m):  # your own class: imported now, so a wrong path fails before any training
            try:
                defenses.defense_class(m)
            except ValueError as err:
                raise CLIError(f"--methods: {err}") from None
        elif m not in defenses.NAMES:
            raise CLIError(f"--methods: unknown defense {m!r}; expected one of {', '.join(defenses.NAMES)}, "
                           f"{PATH_HINT}")
    refuse_repeated(methods, "--methods")
    for flag, value in (("--epochs", args.epochs), ("--train-size", args.train_size)):
        if args.quick and value is not None:  # it would be ignored silently
            raise CLIError(f"{flag}: --quick sets its own (2 epochs on 64 training images); drop one of the two "
                           "(--no-quick turns off a config file's quick: true)")
    epochs = args.epochs = 2 if args.quick else 8 if args.epochs is None else args.epochs
    train_size = 256 if args.train_size is None else args.train_size
    check_data_model_options(args)
    checked_dist_timeout(args.dist_timeout)
    check_count("--train-size", train_size, 0)
    specs, radii = parse_eval_options(args)
    check_out(args.out)
    refuse_train_folder(args.out, "demo")
    splits = load_data(args.data, size=args.size, seed=args.seed, classes=args.classes, bit_depth=args.bit_depth,
                       channels=args.channels)
    from .evaluate import EvalError, check_radii, warn_default_step_short_of_radii

    try:  # before any training: the radii's units are known once the data is
        check_radii(specs, radii, splits.info)
    except EvalError as err:
        raise _flag_error(err) from None
    # now, not after every method's training (evaluate's own warning is then a repeat, printed once)
    warn_default_step_short_of_radii(specs, radii)
    saliency_count(args, splits.info)  # before any training, as the radii
    check_train_split(splits, args.data)  # before any run folder is made
    if len(splits.test) == 0:  # evaluate_models refused it after every method trained, naming eval's --split
        raise CLIError(f"--data: the test split of {args.data} holds no samples; nothing to evaluate on")
    quick_val = min(len(splits.val), 16)  # --quick's validation images, which a --resume refusal tells from others'
    if args.quick:
        splits = subset_splits(splits, 64, 32, args.seed)
    elif train_size:
        if args.train_size and args.train_size > len(splits.train):  # given, not the default 256: it is capped
            warnings.warn(f"--train-size {args.train_size}: the train split of {splits.info.display_name} holds "
                          f"{len(splits.train)} images; training on all {len(splits.train)} (--train-size 0 says so)")
        splits = subset_splits(splits, train_size, len(splits.test), args.seed)
    for m in methods:  # before any training, and named as demo's flag (train_run would say --defense)
        if getattr(defenses.defense_class(m), "binary_only", False) and splits.info.num_classes != 2:
            raise binary_only_error("--methods", m, splits.info)
        problem = clip_range_problem(m, defenses.defense_class(m), splits.info)
        if problem:
            raise CLIError(f"--methods: {problem}")
    # before --out is made: a --model that cannot take the data (small_cnn on moons) was refused in the first
    # method's training, leaving the folder the lock had made
    model = make_model(args.model, splits.info)
    drop_max = [m for m in methods if makes_first_drop_max(m)]
    if drop_max:  # before any training, as the binary-only check (train_run checks it after the methods before it)
        check_max_pool(model, args.model, drop_max[0], "--methods")
    del model
    out = Path(args.out)
    # the whole command, not each run alone (train_run's lock): a second demo into --out retrained the first one's
    # finished runs while it trained the next, and the first one's results.json then described other weights
    with run_folder_lock(out) if is_main_process() else contextlib.nullcontext():
        if args.resume:  # every method's run is checked before any is trained, not halfway through the list
            from .prepacked_conv import prepacked_conv_resolved
            from .train import train_data_fingerprint

            fingerprint = train_data_fingerprint(splits.train)  # one training set for every method
            for m in methods:
                run_dir = out / "runs" / m
                # prepacked_conv: as train_run records it ($ROBUST_OPS_PREPACKED_CONV decides), not False
                conflict = resume_conflict(run_dir, run_record(
                    data=args.data, defense_name=m, defense_options={}, model_name=args.model, epochs=epochs,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, size=args.size, label=demo_label(m),
                    info=splits.info, train_samples=len(splits.train), classes=args.classes, bit_depth=args.bit_depth,
                    channels=args.channels, prepacked_conv=prepacked_conv_resolved(None),
                    train_data_sha256=fingerprint, val_samples=len(splits.val)))
                if conflict:
                    raise _demo_resume_error(run_dir, conflict, args, epochs, quick_val)
        # under torchrun every process trains (fit's DDP), rank 0 alone reports and evaluates, as in train
        main = is_main_process()
        say = print if main else lambda *_args, **_kwargs: None
        say(f"demo on {splits.info.display_name}: {len(splits.train)} train / {len(splits.test)} test images, "
            f"{args.model}, {counted(epochs, 'epoch')}, device {device}")
        say(f"classes: {describe_classes(splits.info)}")
        models, timings = {}, {}
        try:
            with interrupts_unwrapped():
                for m in methods:
                    label = demo_label(m)
                    # a finished run is named once train_run loaded it: fit may still refuse its checkpoint
                    trained = args.resume and checkpoint_epochs(out / "runs" / m) >= epochs
                    if not trained:
                        say(f"training {label} ...", flush=True)
                    model, _, _, result = train_run(
                        data=args.data, defense_name=m, defense_options={}, model_name=args.model, epochs=epochs,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device, out=out / "runs" / m,
                        resume=args.resume, size=args.size, progress=not args.no_progress, splits=splits, label=label,
                        classes=args.classes, bit_depth=args.bit_depth, channels=args.channels,
                        dist_timeout=args.dist_timeout, flags=DEMO_FLAG_SETTINGS)
                    if trained:
                        say(f"training {label} ...", flush=True)
                    # the run's epochs, those a resumed run trained before too: this command's wall time gave a run
                    # --resume found finished the 0.1 s of loading it
                    timings[label] = sum(row.get("time_s", 0.0) for row in result.history)
                    models[label] = model
                    last = result.history[-1] if result.history else {}
                    say(f"  {label}: {timings[label]:.0f} s, train loss {last.get('train_loss', float('nan')):.3f}")
        except KeyboardInterrupt:
            say(f"\n{PROG} demo: interrupted; finished runs are in {out / 'runs'}; rerun with --resume",
                file=sys.stderr)
            return 130
        if not main:  # the evaluation needs no other process: rank 0's alone is written
            return 0
        config = {"command": "demo", "methods": methods, "data": data_spec(args.data), "size": args.size,
                  # the data settings each run.json records, as reproduce's results.json has them
                  "classes": list(args.classes) if args.classes is not None else None, "bit_depth": args.bit_depth,
                  "channels": args.channels, "model": args.model, "epochs": epochs,
                  "train_images": len(splits.train), "test_images": len(splits.test),
                  "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "attacks": args.attacks,
                  "eps": args.eps, "cascade": not args.no_cascade, "ensemble": args.ensemble, "quick": args.quick,
                  "train_seconds": {k: round(v, 1) for k, v in timings.items()}}
        args.split = "test"
        try:
            with interrupts_unwrapped():
                evaluate_models(models, splits, args, specs, radii, device, out,
                                f"Demo: defenses compared on {splits.info.display_name}", config, seed=args.seed)
        except KeyboardInterrupt:  # main's bare "interrupted" left a rerun without --resume to train them all again
            print(f"\n{PROG} demo: interrupted while evaluating; every run is trained, in {out / 'runs'}; rerun with "
                  "--resume to evaluate them without training again", file=sys.stderr)
            return 130
        return 0


# ----------------------------------------------------------------------------------------------- bench


def cmd_bench_parser(sub):
    p = sub.add_parser("bench", help="run the op and attack benchmarks (ratios against their references)",
                       formatter_class=_formatter,
                       description="Run benchmarks/bench_*.py (quick mode unless --full) and print their tables.")
    p.add_argument("--only", action=OneList, default=None,
                   help="comma-separated topics, e.g. pgd_step,drop_max_pool2d")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="full shape sweeps (slow)")
    # the default, accepted as the scripts' own flag: "bench --quick" was argparse's "unrecognized arguments"
    mode.add_argument("--quick", action="store_true", help="each script's --quick smoke run (the default)")
    p.add_argument("--list", action="store_true", help="list the benchmarks (those --only picks) and exit")
    p.add_argument("--bench-dir", type=path_text, default=None,
                   help="folder holding bench_*.py (default: the repository's)")
    p.set_defaults(func=cmd_bench)
    return p


def find_benchmarks(bench_dir=None):
    if bench_dir:
        d = Path(bench_dir)
        if not d.is_dir():
            raise CLIError(f"--bench-dir: {bench_dir}: {'not a folder' if d.exists() else 'no such folder'}")
    else:
        d = Path(__file__).resolve().parent.parent / "benchmarks"
        if not d.is_dir():
            raise CLIError("--bench-dir: the benchmarks/ folder is not beside the installed package (benchmarks ship "
                           "with the source tree); pass its path")
    scripts = {p.stem[len("bench_"):]: p for p in sorted(d.glob("bench_*.py"))}
    if not scripts:
        raise CLIError(f"--bench-dir: {d} holds no bench_*.py scripts")
    return scripts


def cmd_bench(args):
    import subprocess

    scripts = find_benchmarks(args.bench_dir)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        if not wanted:
            raise CLIError(f"--only: expected comma-separated topics, got {args.only!r}")
        unknown = [w for w in wanted if w not in scripts]
        if unknown:
            raise CLIError(f"--only: unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(scripts)}")
        refuse_repeated(wanted, "--only")
        scripts = {w: scripts[w] for w in wanted}
    if args.list:  # what a run with the same --only would run
        if args.full or args.quick:  # it would be ignored silently: nothing runs
            flag = "--full" if args.full else "--quick"
            raise CLIError(f"{flag}: --list only lists the benchmarks and runs none; drop one of the two")
        for name, path in scripts.items():
            print(f"{name}\t{path}")
        return 0
    refuse_several_processes("bench", "time its benchmarks while the others compete for the same cores, and write "
                             "the same CSVs")
    # once here, not once per script (each would stop on it at start)
    check_out(os.environ.get("ROBUST_OPS_BENCH_DIR") or None, "$ROBUST_OPS_BENCH_DIR", staged=False)  # as the scripts
    status = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    for name, path in scripts.items():
        cmd = [sys.executable, str(path)] + ([] if args.full else ["--quick"])
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        # in the caller's folder: a relative --bench-dir, $ROBUST_OPS_BENCH_DIR or $ROBUST_OPS_DATA means what it
        # says there (the scripts find their own files from __file__)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            print(f"{PROG} bench: {name} exited with status {rc}", file=sys.stderr)
            status = 1
    return status


# ----------------------------------------------------------------------------------------------- reproduce


def cmd_reproduce_parser(sub):
    from .reproduce import PROTOCOLS

    p = sub.add_parser("reproduce", help="scripted protocols of the seed papers", formatter_class=_formatter,
                       description="Run a seed paper's protocol and write results.json and a report placing the "
                                   "paper's published numbers beside ours. Protocols: "
                                   + "; ".join(f"{k}: {v.summary}" for k, v in PROTOCOLS.items()))
    p.add_argument("name", choices=tuple(PROTOCOLS), metavar="NAME", help=", ".join(PROTOCOLS))
    p.add_argument("--quick", action=Switch, help="a smoke version (< 2 minutes on 2 CPU cores)")
    p.add_argument("--data", default=None, help="dataset (default: the protocol's; breastmnist for *-bus)")
    p.add_argument("--size", type=int, default=None,
                   help="image side length for a folder / CSV --data (default: 224) or a MedMNIST size variant")
    add_classes_option(p)
    add_bit_depth_option(p, "the full 16 bits")
    add_channels_option(p, DATA_CHANNELS)
    p.add_argument("--download", action=Switch, help=DOWNLOAD_HELP)
    p.add_argument("--out", type=path_text, default=None, help="output folder (default: runs/reproduce/NAME)")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--seeds", type=int, default=None, help="override the number of seeds / folds")
    add_optimiser_options(p, None, None, default=" (default: the protocol's)")
    p.add_argument("--methods", action=OneList, default=None,
                   help="comma-separated method labels to run, e.g. STD,IMA (default: all of the protocol's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action=Switch, help="no progress bars")
    add_dist_timeout_option(p)
    p.add_argument("--reevaluate", action=Switch,
                   help="attack every trained run again instead of reusing the evaluation kept beside its "
                        "checkpoint (it is reused only while the weights, test set and attacks are unchanged)")
    p.add_argument("--paper-schedule", action=Switch,
                   help="train with the paper's own schedule where the protocol has one (dpaat-bus: the classifier "
                        "head alone for 10 epochs first, early stopping after 5 epochs without a lower validation "
                        "loss, Adam lr 3e-4)")
    p.add_argument("--config", action=OneConfig, type=path_text, help="YAML or JSON file of options")
    p.set_defaults(func=cmd_reproduce)
    return p


def cmd_reproduce(args):
    from .reproduce import PROTOCOLS, run_protocol

    device = pick_device(args.device)
    out = Path(args.out) if args.out else Path("runs") / "reproduce" / args.name
    from .evaluate import EvalError

    try:
        with interrupts_unwrapped():
            run_protocol(PROTOCOLS[args.name], out=out, quick=args.quick, data=args.data, epochs=args.epochs,
                         seeds=args.seeds, size=args.size, bit_depth=args.bit_depth, channels=args.channels,
                         classes=args.classes, device=device, progress=not args.no_progress, reevaluate=args.reevaluate,
                         methods=args.methods.split(",") if args.methods is not None else None,
                         paper_schedule=args.paper_schedule, dist_timeout=args.dist_timeout, batch_size=args.batch_size,
                         lr=args.lr)
    except EvalError as err:
        raise CLIError(f"{args.name}: {err}") from None
    except KeyboardInterrupt:
        if is_main_process():
            # the runs resume from their checkpoints: "no results were written" alone read as all work lost
            runs = out / ("runs-quick" if args.quick else "runs")
            if any(runs.glob(f"*/*/{CHECKPOINT}")):
                said = (f"interrupted; {runs} keeps its runs' finished epochs and evaluations; rerun the same command "
                        f"to continue from them (results.json and report.md are written at the end)")
            else:
                said = "interrupted before any run finished an epoch; rerun the same command to start again"
            print(f"\n{PROG} reproduce: {said}", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------------------- main


def build_parser():
    parser = Parser(prog=PROG, formatter_class=_formatter,
                    description="Adversarially robust medical image classification: train with a defense, evaluate "
                                "under attacks, compare, benchmark, reproduce the seed papers.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"robust_ops {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    parsers = {
        "train": cmd_train_parser(sub), "eval": cmd_eval_parser(sub), "bench": cmd_bench_parser(sub),
        "demo": cmd_demo_parser(sub), "reproduce": cmd_reproduce_parser(sub),
    }
    return parser, parsers


@contextlib.contextmanager
def _sigterm_as_interrupt(state=None):
    """SIGTERM (`kill`, a batch scheduler's stop) ends a command as Ctrl-C does -- the finished epochs' checkpoint
    kept, a message saying how to continue -- instead of silently; ``state["terminated"]`` tells main to exit 143.
    ``state`` (a dict, or None for a new one) is the caller's, so a SIGTERM met before the ``with`` binds what this
    yields, as its handler is being set up, still reads as one.
    After the command's first interrupt a SIGTERM raises nothing, and under torchrun neither does the next Ctrl-C:
    torchrun forwards the signal it got to its workers, which a terminal's Ctrl-C (or a scheduler's SIGTERM to the
    job's processes) reached already, and that second KeyboardInterrupt, met in a garbage-collector callback as the
    worker stopped, printed an `Exception ignored` traceback. A further Ctrl-C raises, to force the stop."""
    state = {} if state is None else state
    state.update(terminated=False, interrupts=0)
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield state
        return
    forwarded = 1 if "TORCHELASTIC_RUN_ID" in os.environ else 0  # set by torchrun's agent in its workers

    def interrupt(signum, frame):
        state["interrupts"] += 1
        if state["interrupts"] == 1:
            state["terminated"] = True
            raise KeyboardInterrupt

    def ctrl_c(signum, frame):
        state["interrupts"] += 1
        if not 1 < state["interrupts"] <= 1 + forwarded:
            signal.default_int_handler(signum, frame)

    previous = signal.getsignal(signal.SIGTERM)
    # a caller's own Ctrl-C handler (or SIG_IGN, a background job's) stays: only Python's default one is followed
    previous_int = signal.getsignal(signal.SIGINT)
    try:  # from the first handler set: a signal before the yield also finds the caller's handlers restored
        signal.signal(signal.SIGTERM, interrupt)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, ctrl_c)
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)


@contextlib.contextmanager
def interrupts_unwrapped():
    """Re-raises a Ctrl-C or SIGTERM (a KeyboardInterrupt) that Python wrapped in a RuntimeError, so the command's
    handler says it was interrupted: Python 3.11 wraps an exception raised in a descriptor's ``__set_name__``, which
    runs as a class is created -- in the lazy imports of a command's first seconds (torchvision and torch._dynamo,
    when train builds the model) -- and an interrupt there ended in that traceback with status 1."""
    try:
        yield
    except RuntimeError as err:
        interrupt = interrupt_in(err)
        if interrupt is None:
            raise
        raise interrupt.with_traceback(interrupt.__traceback__) from None


def interrupt_in(err):
    """The KeyboardInterrupt ``err`` is, or that a RuntimeError ``err`` wraps (Python 3.11's for one raised in a
    ``__set_name__``, see :func:`interrupts_unwrapped`); None for any other error."""
    if isinstance(err, KeyboardInterrupt):
        return err
    if not isinstance(err, RuntimeError):
        return None
    return next((e for e in (err.__cause__, err.__context__) if isinstance(e, KeyboardInterrupt)), None)


def exit_on_interrupted_package_import(err):
    """Called by robust_ops/__init__.py with an error its imports raised: under ``python -m robust_ops`` (or ``-m
    robust_ops.cli``) a Ctrl-C (``err`` an interrupt, :func:`interrupt_in`) ends in main's one line and status 130,
    not a traceback -- Python imports the package (torch, the compiled ops: seconds) before __main__ runs main. Else
    it returns, and the package's import raises ``err``: sys.argv[0] is "-m" only while -m's module is being found,
    so a program that imports robust_ops (or a ``python -m`` of another package that does) keeps its interrupt."""
    if interrupt_in(err) is None or sys.argv[:1] != ["-m"]:
        return
    args = iter(getattr(sys, "orig_argv", [])[1:])  # the interpreter's own arguments (-m NAME or -mNAME)
    name = next((arg[2:] or next(args, "") for arg in args if arg.startswith("-m")), "")
    if name == "robust_ops" or name.startswith("robust_ops."):
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        raise SystemExit(130)


def _warning_printer(command):
    """warnings.showwarning for one command: ``robust-ops <command>: warning: <what>`` on stderr, each text once."""
    import re

    said = set()

    def show(message, *_args, **_kwargs):
        text = str(message)
        if re.search(r"\w=\S* \(--", text):  # the data layer's words for Python and the command line: the flag's
            text = _flag_words(text)
        line = f"{PROG} {command}: warning: {text}"
        if line not in said:
            said.add(line)
            print(line, file=sys.stderr)

    return show


def main(argv=None):
    """Run the ``robust-ops`` command line on ``argv`` (a list of strings, as after the program's name; None: the
    process's ``sys.argv[1:]``) and return its exit status: 0 when done, 2 for a refused flag, file or command (one
    line on stderr), 130 when interrupted (a Ctrl-C after the command returned keeps its status), 143 on SIGTERM, 141
    when the reader of its output left; ``--help`` and ``--version`` raise SystemExit(0), as argparse does.
    ``robust-ops`` and ``python -m robust_ops`` call it."""
    # a Ctrl-C or SIGTERM as the signal context opens finds them set: the context marks a SIGTERM in this dict
    status, sigterm = None, {"terminated": False}
    try:
        with _sigterm_as_interrupt(sigterm):
            try:
                status = _main(argv)
            except BrokenPipeError:  # here, not in _main: also one met while _main printed an error or interrupt line
                status = _reader_left()
    except KeyboardInterrupt:
        # once _main returned (the files written, the lines printed), a Ctrl-C before main returns ended in a
        # KeyboardInterrupt traceback: the command's status stands, as after main (finished)
        if status is None:
            print(f"\n{PROG}: interrupted", file=sys.stderr)
            status = 130
    return 143 if sigterm["terminated"] and status == 130 else status  # 128 + SIGTERM, as the shell reports it


def finished(status):
    """``status``, a command's exit status, returned by the entry points (``robust-ops``, ``python -m robust_ops``)
    once main is done, after which a Ctrl-C ends the process at once with that status. The interpreter's shutdown
    takes seconds (torch's exit callbacks), and a Ctrl-C in them, the command's last line printed and every file
    written, ended it with status 130 and nothing on stderr, or status 0 after a KeyboardInterrupt traceback from
    torch/library.py: a script read a finished run as failed. A caller's own Ctrl-C handler (or SIG_IGN) stays."""
    def done(signum, frame):
        for stream in (sys.stdout, sys.stderr):  # what the command printed, which os._exit does not flush
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, done)
    return status


def _reader_left():
    """The reader of stdout or stderr left (`robust-ops eval RUN_DIR | head -2`, `robust-ops train 2>&1 | head -c
    1000`): stop quietly as a shell tool does, with 128 + SIGPIPE. Both streams go to /dev/null, so the interpreter's
    own flush at exit does not fail again (which of the two broke is not known)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):  # no file descriptor (a caller's capture): nothing is flushed to a pipe
            pass
    os.close(devnull)
    return 141


def _main(argv):
    done = None  # the command's exit status, once it returned
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    prefix = f"{PROG} {command}" if command in ("train", "eval", "bench", "demo", "reproduce") else PROG
    try:
        parser, parsers = build_parser()
        args = parser.parse_args(argv)
        if args.command in parsers and getattr(args, "config", None):
            sub_argv = argv[argv.index(args.command) + 1:]
            args = apply_config(parsers[args.command], parsers[args.command].parse_args(sub_argv), sub_argv)
            args.command = command
        if args.command in parsers:
            refuse_empty_values(parsers[args.command], args)
            check_image_options(args)
        check_environment_switches()
        global _allow_download
        _allow_download = bool(getattr(args, "download", False))
        try:
            # catch_warnings restores the caller's warning display afterwards
            with warnings.catch_warnings(), interrupts_unwrapped():
                # one line like the errors, not Python's two (file:line and a source line from inside the library),
                # and each once: demo's evaluation of five methods repeated the same one five times
                warnings.showwarning = _warning_printer(args.command)
                done = args.func(args) or 0
        finally:
            _allow_download = False
        return done
    except CLIError as err:
        message = getattr(err, "command_words", str(err))
        if prefix != PROG and message.endswith(f"(see {PROG} --help)"):
            # argparse reports a subcommand's unknown options from the top-level parser: point at the command's help
            message = message[: -len(f"(see {PROG} --help)")] + f"(see {prefix} --help)"
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # a reader left: main stops quietly (not the OSError below, which names a file)
        raise
    except OSError as err:
        # A file the command could not read or write (a folder where RUN_DIR/run.json or checkpoint.pt goes, a full
        # disk, a read-only mount, a name longer than the file system takes): the path and the reason, not a
        # traceback. A rename names the file it would replace (filename2), not the temporary file it moves there.
        path = err.filename2 if err.filename2 is not None else err.filename
        if path is None or not err.strerror:
            raise  # not about a file: a traceback shows where it came from
        hint = (" (a name in a path takes at most 255 bytes on most file systems)"
                if err.errno == errno.ENAMETOOLONG else "")
        print(f"{prefix}: error: {path}: {err.strerror}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where no command says more (eval, bench): no traceback
        if done is not None:  # after the command returned, its files written: it ended "interrupted" with status 130
            return done
        print(f"\n{prefix}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m robust_ops.cli` runs this file as __main__, a second copy beside the robust_ops.cli that reproduce and
    # the others import: their CLIError was not this copy's, so their refusals ended in a traceback, not one line
    from robust_ops.cli import finished as package_finished, main as package_main

    raise SystemExit(package_finished(package_main()))
