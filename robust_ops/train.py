"""The trainer: ``fit(model, defense, train_data, ...)`` runs any defense epoch by epoch with validation, metrics files,
an atomic checkpoint every epoch, exact resume (at the same thread count), optional AMP / channels_last and
multi-process data parallel (DDP).

Semantics (docs/training.md):

* Batches: every epoch draws a permutation of the training set from ``(seed, epoch)`` and cuts it into *global* batches
  of ``batch_size``. In a single process a global batch is one step; under DDP each of the ``W`` processes takes a
  contiguous share of it (sizes differ by at most one), and the local loss is scaled by ``W * n_local / n_global`` so
  the averaged gradient is the gradient of the global batch mean -- a DDP run follows the single-process run with the
  same ``batch_size`` (up to floating-point summation order). torch's DistributedSampler is not used: it pads the
  epoch by repeating samples, which would double-count them (and their IMA margins).
* One step: ``out = defense(model, x, y[, ids])``; a non-finite ``out.loss`` stops the run with an error naming the
  epoch and step (the last good checkpoint stays on disk, the weights are not updated); ``out.loss.backward()``;
  ``out.extra_grads`` (MIRST's reused attack gradients) are added to ``.grad`` (all-reduced and averaged under DDP);
  optional gradient clipping; ``optimizer.step()``. The scheduler steps once per epoch.
* Checkpoint ``out_dir/checkpoint.pt`` after every epoch, written to a temporary file in the same folder and renamed
  with ``os.replace`` (a crash never leaves a half-written checkpoint). It holds tensors and plain values only, so
  ``torch.load(path, weights_only=True)`` reads it: model, optimizer, scheduler, the RNG states (torch, CUDA, numpy,
  python), the sampler state, ``defense.state_dict()``, the epoch and the history.
* ``resume=True`` continues from ``out_dir/checkpoint.pt`` (fresh start if there is none; ``resume="path"`` requires
  that file). On CPU with ``torch.use_deterministic_algorithms(True)`` a run interrupted after epoch k and resumed
  ends with bitwise the same weights as an uninterrupted run, at the same thread count (torch's CPU kernels may sum
  in another order with another one).
"""

import contextlib
import contextvars
import csv
import datetime
import errno
import functools
import hashlib
import itertools
import json
import math
import numbers
import os
import pickle
import random
import re
import struct
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ._files import FolderInUse, exclusive_folder, out_dir_problem, replace_atomically
from ._options import (MAX_SEED, check_device, check_flags, check_int, check_real, check_seed, check_usable_device,
                       class_labels, counted, listing, python_number, refuse_unused)
from ._warn import warn_outside
from .native_layers import library_speedups
from .nn import DropMax2d
from .prepacked_conv import prepacked_conv_resolved
from .attacks.context import (HALF_DTYPES, NonFiniteInputError, NonFiniteOutputError, check_gradients_possible,
                              check_output, classification_loss, forward_naming_input_mismatch,
                              is_one_sample_batch_norm, is_single_logit, labels_range, labels_read_once,
                              looks_like_probabilities, num_classes_of, predict_from_output, use_model_mode)
from .defenses._common import metrics_read_by_fit
from .defenses.base import StateSettingError, _as_tuples, _plain

__all__ = [
    "fit", "FitResult", "load_checkpoint", "load_weights", "stopped_by_another_process", "NonFiniteLossError",
    "OneSampleBatchError", "UnreadableCheckpointError", "LostBestEpochError", "CollectiveTimeoutError",
    "ResumeMismatchError"
]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_MODEL_NAME = "best_model.pt"  # restore_best: the best epoch's weights, a file load_weights and eval read
HISTORY_NAME = "metrics.json"  # the per-epoch history, rewritten with each checkpoint
METRICS_CSV_NAME = "metrics.csv"  # the same as a table
RUN_FILES = (CHECKPOINT_NAME, BEST_MODEL_NAME, HISTORY_NAME, METRICS_CSV_NAME)  # what a fresh run replaces
CHECKPOINT_FORMAT = 1
DEFAULT_LR = 1e-4  # MIRST-DM's Adam learning rate
# a non-finite loss on finite inputs (where a defense's attack started, the model's outputs were finite too: its first
# forward refuses others) is the run's own arithmetic
FINITE_INPUTS_HINT = ("the batch's inputs are finite: check the learning rate for diverged weights, the defense's "
                      "options, and the model and loss for a log or division of 0")


@dataclass
class FitResult:
    """history: one dict of floats per epoch (also in out_dir/metrics.csv and metrics.json); checkpoint: the path of
    the last checkpoint (None without out_dir); model: the trained model (unwrapped from DDP); early_stopping: None
    without ``early_stopping``, else its state (the checkpoint's entry): monitor, patience, best, best_epoch,
    bad_epochs, and stopped_epoch and reason once the patience ran out (None while it has not); weights_epoch: the
    epoch whose weights ``model`` holds (weights after that many epochs): with ``restore_best``, the state's
    best_epoch, else (or before any epoch set a best: a warm-up only) the last epoch trained; 0 when none was."""

    history: list = field(default_factory=list)
    checkpoint: str = None
    model: nn.Module = None
    early_stopping: dict = None
    weights_epoch: int = 0


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the epoch and step and the last good checkpoint."""


# ---------------------------------------------------------------------------------------------------------------------
# Batches


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields ``(indices, global_size)`` per global batch of an epoch: this process's share of the batch (a list of
    dataset indices) and the global batch's size (fit scales the local loss by the share's part of it).

    The permutation depends on ``(seed, epoch)`` only, so it is the same in every process and after a resume.
    ``rank``/``world_size`` split each global batch into contiguous shares (``torch.tensor_split``); under DDP a final
    global batch with fewer samples than processes is dropped (every process must take part in every step).
    """

    def __init__(self, num_samples, batch_size, seed=0, rank=0, world_size=1, shuffle=True):
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = check_seed("GlobalBatchSampler", seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def global_batches(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(_torch_seed(self.seed * 1_000_003 + self.epoch))
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        batches = list(torch.split(order, self.batch_size))
        if self.world_size > 1 and batches and len(batches[-1]) < self.world_size:
            batches.pop()
        return batches

    def __iter__(self):
        for batch in self.global_batches():
            share = torch.tensor_split(batch, self.world_size)[self.rank]
            yield share.tolist(), len(batch)

    def __len__(self):
        return len(self.global_batches())

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "batch_size": self.batch_size, "shuffle": self.shuffle}


def unbatchable_items_message(name, err):
    """fit's and evaluate's one line for items that do not stack into one batch (PIL images, inputs of two shapes):
    torch's text names what it found, not the fix."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (f"{name}: could not stack the dataset's items into one batch ({first[:200]}); make each x a tensor of "
            "one shape (torchvision.transforms.ToTensor() for PIL images)")


def stack_field(name, items, field):
    """Field ``field`` (0: x, 1: y) of ``items`` as one batch tensor, each value through torch.as_tensor: how
    evaluate stacks a dataset, and how fit stacks the fields default_collate leaves as Python sequences (an x given
    as nested lists, a label as [label]). Class names as labels, and values that do not stack, are a TypeError
    naming ``name`` and the fix."""
    values = [item[field] for item in items]
    if field == 1 and any(isinstance(v, str) for v in values):  # "got tuple" (fit), "make each x a tensor" (evaluate)
        raise TypeError(f"{name}: expected integer class labels, got class names as labels "
                        f"({', '.join(map(repr, values[:3]))}{', ...' * (len(values) > 3)}); map each name to its "
                        "index, 0 to K-1 (the order of DatasetInfo.class_names)")
    try:
        return torch.stack([torch.as_tensor(v) for v in values])
    except (TypeError, RuntimeError, ValueError) as err:
        raise TypeError(unbatchable_items_message(name, err)) from None


def _collate(name, dataset, indices):
    items = [dataset[i] for i in indices]
    for item in items:  # dict items, other field counts: named as the dataset yields them, not as collated
        check_item_fields(name, item)
    try:
        batch = torch.utils.data.default_collate(items)
    except (TypeError, RuntimeError) as err:
        raise TypeError(unbatchable_items_message(name, err)) from None
    # default_collate transposes a Python sequence (x as nested lists: "'list' object has no attribute 'to'")
    return [field if torch.is_tensor(field) or j == 2 else stack_field(name, items, j) for j, field in enumerate(batch)]


def check_item_fields(name, batch):
    """The item layout fit and evaluate take: (x, y) or (x, y, ids), checked on a collated batch or on one item;
    dict items and other field counts are a ValueError naming ``name`` and the fix."""
    if isinstance(batch, dict) or (isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], dict)):
        keys = sorted(batch if isinstance(batch, dict) else batch[0])
        raise ValueError(f"{name}: expected the dataset to yield (x, y) or (x, y, ids) tuples, got dict items "
                         f"(keys {keys}); make its items (image, label) tuples (IndexedDataset then adds the index)")
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        # "got Tensor of length ?" for items of x alone; fit named its collated batch ("list of length 4": 4 paths)
        if isinstance(batch, (tuple, list)):
            got = f"{type(batch).__name__}s of {len(batch)} field{'s' * (len(batch) != 1)}"
        else:
            shape = getattr(batch, "shape", None)
            got = f"{type(batch).__name__} items{'' if shape is None else f' of shape {list(shape)}'}, not tuples"
        raise ValueError(f"{name}: expected the dataset to yield (x, y) or (x, y, ids) tuples, got {got}; make its "
                         "items (image, label) (IndexedDataset then adds the index)")


def _split_batch(name, batch, needs_ids, indices=None):
    """(x, y, ids) of a collated batch; ``indices``: the positions in the dataset the batch was read from, which the
    ids of a ``needs_ids`` defense must equal (its per-sample table is sized to the dataset and keyed by them)."""
    check_item_fields(name, batch)
    x, y = batch[0], batch[1]
    ids = batch[2] if len(batch) == 3 else None
    if needs_ids and ids is not None and indices is not None:
        got = ids.tolist() if torch.is_tensor(ids) else ids
        if got != list(indices):
            # A third field that is not the index (a patient id, a Subset of an IndexedDataset over a larger set)
            # would key the margins of other samples without a word.
            raise ValueError(f"{name}: expected the third field of each item to be its index in train_data (the key "
                             f"of the defense's per-sample table), got {got[:4]} for items {list(indices)[:4]} (first "
                             f"4); wrap train_data itself (the outermost dataset) in robust_ops.data.IndexedDataset")
    if needs_ids and ids is None:
        raise ValueError(f"{name}: this defense needs dataset sample ids; wrap the dataset in "
                         "robust_ops.data.IndexedDataset so it yields (x, y, ids)")
    if not torch.is_tensor(y):
        raise TypeError(f"{name}: expected integer class labels, got {type(y).__name__}")
    n = x.shape[0] if torch.is_tensor(x) and x.dim() else None
    return x, class_labels(name, y, n), ids


# ---------------------------------------------------------------------------------------------------------------------
# RNG and checkpoint state (tensors and plain values only)


def _rng_state(device):
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.random.get_rng_state(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "internal": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _torch_seed(value):
    """``value`` as torch's seeds take it: torch reads a seed modulo 2**64 but refuses one past [-2**63, 2**64)
    ("Overflow when unpacking long long"), which a large seed times the epoch stride reached."""
    return value % 2**64


def _rank_seed(seed, rank):
    """Rank 0 seeds with ``seed`` (the stream of a one-process run); every other process gets its own stream, so
    dropout masks and random starts are not repeated across processes."""
    return seed + 1_000_003 * rank


def _seed_rank_streams(seed, rank):
    """Seeds torch's, numpy's and python's global RNGs with process ``rank``'s fresh stream."""
    rank_seed = _rank_seed(seed, rank)
    torch.manual_seed(_torch_seed(rank_seed))
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)


def _set_rng_state(state, device):
    # RNG states must be CPU ByteTensors, whatever map_location the checkpoint was loaded with
    torch.random.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.device(device))


def _arithmetic(device, world):
    """What decides the order torch's kernels sum in, beside the code: a resume with other values continues the run
    correctly but not bitwise as an uninterrupted one (another reduction order, another process's RNG streams)."""
    arithmetic = {"device": device.type, "world_size": world}
    if device.type == "cpu":
        arithmetic.update(threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    elif device.type == "cuda":  # another GPU model picks other kernels (cuDNN / cuBLAS heuristics per architecture)
        arithmetic.update(gpu=torch.cuda.get_device_name(device))
    return arithmetic


def _warn_at_callers_line(message):
    """``warnings.warn(message)`` attributed to the first frame outside this module: fit's caller. A fixed stacklevel
    pointed into fit's own decorators once fit gained one more (filters by module, and the default once-per-line
    rule, then saw robust_ops/train.py). Once per line under the default filter, also where a resume's
    load_checkpoint (its catch_warnings) made Python forget it (robust_ops._warn)."""
    warn_outside(message, __file__)


def _warn_on_other_arithmetic(name, path, recorded, now):
    """Says, once, that a resume is not bitwise exact; checkpoints written before this record say nothing."""
    if not recorded:
        return
    # keys a checkpoint lacks were not recorded yet when it was written (the GPU model): unknown, not "changed"
    changed = [f"{key} {recorded[key]!r} -> {value!r}" for key, value in now.items()
               if key in recorded and recorded[key] != value]
    if changed:
        # another number of processes also changes the random draws (a process the checkpoint holds no stream for
        # starts its own) and, with training-mode batch norm, the samples normalized together
        more = (", and with another number of processes by more (other random streams, other batch shares)"
                if recorded.get("world_size", now.get("world_size")) != now.get("world_size") else "")
        # the changes in parentheses: "with another threads 1 -> 2" did not read as English
        _warn_at_callers_line(f"{name}: resuming {path} on changed arithmetic ({', '.join(changed)}): training "
                              f"continues correctly, but its weights may differ in the last bits from an uninterrupted "
                              f"run's{more} (bitwise-exact resume needs the same device, processes, threads and CPU; "
                              "e.g. set OMP_NUM_THREADS as before)")


def _python_scalars(value):
    """``value`` with each numpy scalar inside (dicts, lists, tuples) as the Python number it holds; containers
    without one are returned as they are (a state dict keeps its ``_metadata``). An lr or weight decay from a
    np.logspace sweep sits in the optimizer's param groups (np.float64 options too), and torch.load(weights_only=True)
    -- fit's resume, load_weights, robust-ops eval -- refuses numpy scalars: such a checkpoint could not be read."""
    if python_number(value) is not value:
        return python_number(value)
    if isinstance(value, dict):
        items = {k: _python_scalars(v) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else type(value)(items)
    if type(value) in (list, tuple):
        items = [_python_scalars(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    return value


def save_checkpoint(path, state):
    """torch.save to a temporary file in the same folder, fsync, then os.replace: the checkpoint is either the old one
    or the new one, never a partial file. Numpy scalars are saved as Python numbers (``_python_scalars``)."""
    state = _python_scalars(state)
    return replace_atomically(path, lambda f: torch.save(state, f), binary=True, fsync=True)


def epochs_done(out_dir):
    """Epochs of training out_dir's checkpoint holds (what fit resumes from), else its history records (metrics.json,
    rewritten after each checkpoint); 0 without either. The checkpoint first: with metrics.json deleted, a resume
    check reading the history alone would pass a run trained for more epochs."""
    try:
        state = load_checkpoint(Path(out_dir) / CHECKPOINT_NAME)
        if isinstance(state, dict) and isinstance(state.get("epoch"), int):
            return state["epoch"]
    except (OSError, ValueError):
        pass  # no (readable) checkpoint: fit starts afresh or names the file itself
    return _epochs_in_history_file(out_dir)


def _epochs_in_history_file(out_dir):
    """Rows of out_dir's metrics.json; 0 without a readable one."""
    try:
        return len(json.loads((Path(out_dir) / HISTORY_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return 0


class UnreadableCheckpointError(ValueError):
    """A checkpoint file whose content cannot be read (cut short, damaged, empty, not a torch.save file): the message
    names the file and why; a command resuming from it adds what to do (there is no reading it)."""


def _torch_read_error(err):
    """torch's reader error in one short line: its miniz text runs on ("... failed finding central directory. This
    is an internal miniz error. If you are seeing this error, there is a high ...") past any useful length."""
    first = str(err).splitlines()[0] if str(err) else f"{type(err).__name__}: the file ends early"
    return first.split(". This is an internal miniz error")[0][:160]


def load_checkpoint(path, map_location="cpu"):
    """The dict of the checkpoint fit wrote at ``path`` (a str, path-like or open binary file), its tensors loaded
    to ``map_location`` (torch.load's: a device or device string such as "cuda:0", a dict, a callable or None;
    default "cpu"). Loaded with weights_only=True: tensors and plain values only. A file torch.load cannot
    read so (empty, cut short, not a torch.save file, or holding objects that need pickle) or that is corrupted
    (bytes that do not match its recorded CRC-32s, which torch.load does not check) is a ValueError naming it:
    torch's own errors are a bare EOFError for an empty file, or advice to load a JSON file with weights_only=False.
    A missing or unreadable file keeps its OSError.

    Raises:
        UnreadableCheckpointError (that ValueError): the file cannot be read as a checkpoint.
    """
    _check_load_args("load_checkpoint", path, map_location)
    corrupted = _corrupted_zip_entry(path)
    if corrupted is not None:
        raise UnreadableCheckpointError(f"{path}: not a readable checkpoint (corrupted: {corrupted[:160]})")
    try:
        with warnings.catch_warnings():
            # torch's "Detected pickle protocol 3 in the checkpoint ... please file an issue" for a file it reads (or
            # one refused below, naming the protocol): a warning line above the command's own result or error
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        found = next((line.strip() for line in lines if "Unsupported global" in line), None)
        protocol = _unreadable_pickle_protocol(path) if found is None else None
        if protocol is not None:  # it said "not a torch.save file: Unsupported operand 149" of torch.save's own file
            number, in_zip = protocol
            what = (f"written by torch.save with pickle_protocol={number}, which torch.load(weights_only=True) cannot "
                    "read" if in_zip else f"a pickle of protocol {number}, which torch.load(weights_only=True) cannot "
                    f"read: not a torch.save file, or one saved with pickle_protocol={number}")
            raise UnreadableCheckpointError(f"{path}: not a readable checkpoint ({what}; save it again with "
                                            "torch.save's default pickle_protocol)") from None
        if found is None:  # not a pickle at all (a JSON file): torch's text suggests weights_only=False regardless
            after = [line.strip() for line in lines[1 + next((i for i, line in enumerate(lines)
                                                               if "WeightsUnpickler error" in line), len(lines)):]]
            detail = next((line for line in after if line), "unreadable content")
            raise UnreadableCheckpointError(f"{path}: not a readable checkpoint (not a torch.save file: "
                                            f"{detail[:120]})") from None
        raise ValueError(f"{path}: refusing to load: it holds objects that need pickle to run code (weights_only=True "
                         f"allows tensors and plain values only; {found[:120]})") from None
    except (struct.error, IndexError, KeyError, UnicodeDecodeError) as err:
        # a short non-zip file read as torch's legacy format: its unpickler's "unpack requires a buffer of 4 bytes",
        # "pop from empty list", a bare KeyError or a codec error named neither the file nor the problem
        kind = "struct.error" if isinstance(err, struct.error) else type(err).__name__
        raise UnreadableCheckpointError(f"{path}: not a readable checkpoint (not a torch.save file: {kind}: "
                                        f"{str(err)[:120]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise  # no file to read, not a file of the wrong content
        raise UnreadableCheckpointError(f"{path}: not a readable checkpoint ({_torch_read_error(err)})") from None


def _unreadable_pickle_protocol(path):
    """``(protocol, in_zip)`` when the pickle of the file at ``path`` (a torch.save zip's data.pkl, else the file
    itself) has a protocol of 4 or more, whose framing torch's weights_only unpickler does not read; else None."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if name is None:
                return None
            with archive.open(name) as f:
                head, in_zip = f.read(2), True
    except zipfile.BadZipFile:
        try:
            with open(path, "rb") as f:
                head, in_zip = f.read(2), False
        except OSError:
            return None
    except Exception:  # noqa: BLE001 -- a zip that cannot be read: torch.load's own error says so
        return None
    return (head[1], in_zip) if len(head) == 2 and head[0] == pickle.PROTO[0] and head[1] >= 4 else None


def _corrupted_zip_entry(path):
    """Why the torch.save zip file at ``path`` is corrupted (zipfile's "Bad CRC-32 for file 'archive/data/3'": bytes
    changed on disk or in a copy), else None; torch.load does not check the CRC-32s and loaded such a file with
    silently other weights. Entries recorded without one (CRC 0: torch.save with compute_crc32 off) are not checked;
    an open file, a file that is no zip, or one zipfile cannot parse are left to torch.load's own errors."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    try:
        archive = zipfile.ZipFile(path)
    except Exception:  # noqa: BLE001 -- no zip (torch's legacy format, another file, cut short): torch.load says
        return None
    with archive:
        try:
            for entry in archive.infolist():
                if entry.CRC:
                    with archive.open(entry) as f:
                        while f.read(1 << 24):  # zipfile compares the CRC-32 once the entry is read to its end
                            pass
        except Exception as err:  # noqa: BLE001 -- a bad CRC, header or compression method: a damaged file
            return f"{type(err).__name__}: {err}"
    return None


def _check_load_args(name, path, map_location):
    """A path (or an open binary file) and a map_location torch.load takes. Else torch's errors: "'NoneType' object
    has no attribute 'seek'" for path=None, "'bool' object is not callable" for map_location=True, and a bad device
    string blamed on the file ("not a readable checkpoint (don't know how to restore data location ...)")."""
    if not (isinstance(path, (str, os.PathLike)) or hasattr(path, "read")):
        raise TypeError(f"{name}: expected path to be a file path (str or Path), got {path!r}")
    if isinstance(map_location, (str, torch.device)):
        check_device(name, map_location, "map_location")
    elif not (map_location is None or isinstance(map_location, dict) or callable(map_location)):
        raise TypeError(f"{name}: expected map_location to be a device, a dict, a callable or None, got "
                        f"{map_location!r}")


# The entries of a fit checkpoint that fit's resume reads unconditionally, with their types (the others, added to the
# format later, are read with .get); load_weights reads "model" only.
_RESUME_ENTRIES = {"epoch": int, "config": dict, "model": dict, "optimizer": dict, "defense": dict, "rng": dict,
                   "history": list}


def _fit_checkpoint(name, path, map_location, entries=tuple(_RESUME_ENTRIES)):
    """load_checkpoint for ``name`` (fit's resume, load_weights): errors name it, and a file holding something else
    than a dict of fit's format, a newer format, or lacking one of ``entries`` (of their type) is refused."""
    _check_load_args(name, path, map_location)
    try:
        state = load_checkpoint(path, map_location)
    except ValueError as err:  # UnreadableCheckpointError stays one: a command resuming from it says what to do
        raise type(err)(f"{name}: {err}") from None
    version = state.get("format") if isinstance(state, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > CHECKPOINT_FORMAT:
        # it is one: "not a robust_ops fit checkpoint ...; a bare state dict loads with ..." pointed elsewhere
        raise ValueError(f"{name}: {path} was written by a newer robust_ops (checkpoint format {version}; this "
                         f"version reads format {CHECKPOINT_FORMAT}): upgrade robust_ops to read it")
    if not isinstance(state, dict) or version != CHECKPOINT_FORMAT:
        got = f"format {version!r}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(f"{name}: {path} is not a robust_ops fit checkpoint ({got}, expected format "
                         f"{CHECKPOINT_FORMAT}); a bare state dict loads with model.load_state_dict")
    for key in entries:  # else a KeyError (or int('x')) traceback naming no file, after the settings' checks
        kind, value = _RESUME_ENTRIES[key], state.get(key)
        if key not in state:
            why = f"it lacks {key!r}"
        elif not isinstance(value, kind) or isinstance(value, bool):
            why = f"its {key!r} is a {type(value).__name__}, expected a{'n' if kind is int else ''} {kind.__name__}"
        else:
            continue
        if state.get("weights") == "best":  # restore_best's best_model.pt: weights only, not a run to continue
            raise ValueError(f"{name}: {path} holds the weights of a run's best epoch only ({BEST_MODEL_NAME}), not "
                             f"a checkpoint to resume; resume from the run's {CHECKPOINT_NAME}")
        raise ValueError(f"{name}: {path} is not a whole robust_ops fit checkpoint: {why} (damaged or edited)")
    return _without_wrapper_prefix(state)


_COMPILED_PREFIX = "_orig_mod."  # what a torch.compile'd model's wrapper puts before its module's names
_DATA_PARALLEL_PREFIX = "module."  # nn.DataParallel's


def _without_wrapper_prefix(state, prefix=_COMPILED_PREFIX):
    """A checkpoint fit wrote for a torch.compile'd model before 2026-12-06 (for an nn.DataParallel before
    2026-12-07: ``prefix`` "module.") named every weight, drop-max layer and warm-up parameter with the wrapper's
    prefix: read with the model's own names, as fit writes them now (weights_module)."""
    weights = state.get("model")
    if not (isinstance(weights, dict) and weights and all(str(k).startswith(prefix) for k in weights)):
        return state

    def strip(names):
        return [n[len(prefix):] if isinstance(n, str) and n.startswith(prefix) else n for n in names]

    state = dict(state)
    for key in ("model", "best_model"):
        if isinstance(state.get(key), dict):
            state[key] = dict(zip(strip(state[key]), state[key].values()))
    config = state.get("config")
    if isinstance(config, dict):
        state["config"] = config = dict(config)
        for key in ("drop_max_layers", "warmup_params"):
            if isinstance(config.get(key), list):
                config[key] = strip(config[key])
    return state


def drop_max_layers(model):
    """The names of ``model``'s DropMax2d layers, as a checkpoint records them: its state dict cannot show them
    (pooling has no parameters), so the weights load into the plain nn.MaxPool2d architecture as well."""
    return [name for name, module in weights_module(model).named_modules() if isinstance(module, DropMax2d)]


def weights_module(model):
    """The module whose weights and layer names a checkpoint holds: a torch.compile'd model's own module, an
    nn.DataParallel's ``module``. The wrappers' state dicts and module names carry an "_orig_mod." ("module.")
    prefix, so their checkpoints did not load into the plain architecture (nor resume without the wrapper, or with
    it from a plain run)."""
    *_, inner = _wrapped_modules(model)
    return inner


def _wrapped_modules(model):
    """``model``, then each module it wraps in turn (a compiled DataParallel, a DataParallel of a compiled model ...):
    an nn.DataParallel's ``module``, a torch.compile'd model's own module."""
    for _ in range(8):
        yield model
        inner = model.module if isinstance(model, nn.DataParallel) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return
        model = inner
    yield model


def _in_data_parallel(model):
    """Whether ``model`` is an nn.DataParallel or a torch.compile'd one: its checkpoints fit wrote before 2026-12-07
    prefix every name with "module." (read without it)."""
    return any(isinstance(m, nn.DataParallel) for m in _wrapped_modules(model))


def load_weights(model, path, map_location="cpu"):
    """Load the weights of fit's checkpoint at ``path`` into ``model``, rebuilt with the architecture it was trained
    with (MIRST-DM: ``robust_ops.replace_maxpool(model, "first")`` first), and return ``model``. A model whose
    DropMax2d layers are not the recorded ones is refused: it would load and silently compute other outputs.
    Checkpoints written before the layers were recorded load unchecked. Weights of another architecture (missing,
    unexpected or other-shaped ones) are a one-line ValueError naming the file. ``map_location``: where the
    checkpoint's tensors are loaded before they are copied into ``model``'s (torch.load's argument; default "cpu").

    Raises:
        UnreadableCheckpointError (a ValueError): the file cannot be read as a checkpoint (as :func:`load_checkpoint`).
    """
    state = _fit_checkpoint("load_weights", path, map_location, entries=("model",))
    if _in_data_parallel(model):
        state = _without_wrapper_prefix(state, _DATA_PARALLEL_PREFIX)
    mismatch = drop_max_mismatch(model, state)
    if mismatch is not None:
        raise ValueError(f"load_weights: {path} {mismatch}; rebuild the trained architecture "
                         "(robust_ops.replace_maxpool(model, 'first') for MIRST-DM), else the weights load but its "
                         "outputs differ")
    try:
        weights_module(model).load_state_dict(state["model"])
    except RuntimeError as err:  # torch's multi-line "Error(s) in loading state_dict for X" named no file
        raise ValueError(f"load_weights: {path}: its weights do not fit this model ({state_dict_mismatch(err)}); "
                         "rebuild the architecture the run trained (its model, channels, classes and image size)"
                         ) from None
    return model


def state_dict_mismatch(err):
    """The first mismatch a ``load_state_dict`` RuntimeError names (its first line is only "Error(s) in loading
    state_dict for X:"), cut to 160 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__
    return detail if len(detail) <= 160 else detail[:157] + "..."


def drop_max_mismatch(model, state):
    """How ``model``'s DropMax2d layers differ from those fit's checkpoint ``state`` records, or None (also for
    checkpoints written before they were recorded, and for bare state dicts)."""
    config = state.get("config")
    trained_with = config.get("drop_max_layers") if isinstance(config, dict) else None
    has = drop_max_layers(model)
    if trained_with is None or has == trained_with:
        return None
    return f"was trained with DropMax2d layers {trained_with}, the model has {has}"


# ---------------------------------------------------------------------------------------------------------------------
# Distributed


# torch's collectives compute their deadline in int64 nanoseconds, which a timeout past about 292 years overflows:
# measured with gloo (torch 2.14), 1e10 s failed at once ("timed out after 10000000000000ms" while connecting), 1e9 ran
MAX_DIST_TIMEOUT = 10**9


def check_dist_timeout(value, name="fit", arg="dist_timeout"):
    """``value`` (seconds: a finite number > 0, at most MAX_DIST_TIMEOUT; None: torch's default) as the timedelta
    init_process_group takes; a ValueError naming ``name`` (and ``arg``, when not None) otherwise."""
    if value is None:
        return None
    number = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not (number and 0 < value <= MAX_DIST_TIMEOUT):
        what = f"{arg} to be " if arg else ""
        raise ValueError(f"{name}: expected {what}a number of seconds > 0 and <= {MAX_DIST_TIMEOUT:.0e} (longer ones "
                         f"overflow torch's collective deadlines){' or None' if arg else ''}, got {value!r}")
    return datetime.timedelta(seconds=float(value))


_GROUPS_MADE = itertools.count()  # process groups _distributed_context initialized in this process


def _distributed_context(device, timeout=None, timeout_arg=None):
    """(rank, world_size). Uses an initialized process group, or initializes one from torchrun's environment
    (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA, with ``timeout`` (a timedelta; None: torch's default). A group
    initialized before cannot take ``timeout``: refused, naming ``timeout_arg`` (what the caller passed)."""
    if dist.is_available() and dist.is_initialized():
        if timeout is not None:
            raise ValueError(f"fit: dist_timeout={timeout_arg!r} cannot apply to the process group initialized "
                             "before fit (its timeout was set there); pass timeout=datetime.timedelta(seconds="
                             f"{timeout.total_seconds():g}) to your init_process_group (or call "
                             "torch.distributed.set_timeout) and leave dist_timeout None")
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and "RANK" not in os.environ:  # each process would train alone, unsaid
        raise ValueError(f"fit: WORLD_SIZE={world} is set but RANK is not, so this process cannot join the other "
                         f"{world - 1}: launch with torchrun (it sets both), set RANK (and MASTER_ADDR, MASTER_PORT) "
                         "for each process, initialize a process group before fit, or unset WORLD_SIZE")
    if world > 1 and dist.is_available():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        try:
            # torchrun's store outlives each group fit makes, and torch names every new default group as the last
            # one: a second fit in a process (demo, reproduce) read the first group's stale gloo addresses and hung
            # or failed to connect. Each group fit makes keeps its keys under its own prefix (the same count on
            # every process: each calls fit as often)
            wait = timeout if timeout is not None else dist.distributed_c10d._get_default_timeout(backend)
            store, rank, world = next(dist.rendezvous("env://", timeout=wait))
            store.set_timeout(wait)
            store = dist.PrefixStore(f"robust_ops.fit.{next(_GROUPS_MADE)}", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        except RuntimeError as err:  # torch's DistStoreError / DistNetworkError: a process did not come
            if _port_in_use(err):  # rank 0 hosts the store: torch's DistNetworkError, a RuntimeError (a traceback)
                raise OSError(errno.EADDRINUSE, f"fit: MASTER_PORT={os.environ.get('MASTER_PORT')} is in use on this "
                              "machine (address already in use), so process 0 cannot host the process group's store "
                              "there; pass every process another, free MASTER_PORT") from err
            if not _collective_timed_out(err):
                raise
            raise CollectiveTimeoutError("fit", int(os.environ["RANK"]), None if timeout is None else
                                         timeout.total_seconds(), "default" if timeout is None else "dist_timeout",
                                         "the start (init_process_group)") from err
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _group_timeout_s(device):
    """The default process group's timeout in seconds, as its backend on ``device`` holds it; None where torch does
    not show it (a private attribute in torch 2.14)."""
    try:
        return dist.group.WORLD._get_backend(torch.device(device)).options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 -- the error then names "the process group's timeout" without its value
        return None


# What a collective that waited past the group's timeout raises: gloo's "Timed out waiting 3000ms for recv operation
# to complete", and init_process_group's rendezvous "Timed out after 4 seconds waiting for clients. 1/2 clients
# joined." / "The client socket has timed out after 3000ms while trying to connect" (measured, torch 2.14); NCCL's
# watchdog and blocking wait (their texts in torch 2.14's binary, untested)
_COLLECTIVE_TIMEOUT = re.compile(r"Timed out waiting \d+ms|Timed out after \d+ seconds waiting for clients|timed out "
                                 r"after \d+ms while trying to connect|collective operation timeout|timed out in "
                                 r"blocking wait")


_PORT_IN_USE = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)


def _port_in_use(error):
    """Whether ``error`` is the rendezvous's failure to listen on MASTER_PORT (torch 2.14's libuv store: "The server
    socket has failed to listen on any local network address. port: 29500, ..., name: EADDRINUSE, ..."; its other
    store: "... failed to bind to [::]:29500 (errno: 98 - Address already in use)")."""
    return isinstance(error, RuntimeError) and _PORT_IN_USE.search(str(error)) is not None


def _collective_timed_out(error):
    return isinstance(error, RuntimeError) and _COLLECTIVE_TIMEOUT.search(str(error)) is not None


class CollectiveTimeoutError(RuntimeError):
    """Under DDP, this process waited in one of fit's collectives (or a defense's) longer than the process group's
    timeout: another process hung or died there, or took longer than the timeout between two collectives. The
    message names this process, the timeout and where; :meth:`reworded` names a caller's own timeout option
    (``robust-ops train --dist-timeout``). fit raises it; its arguments: ``name`` (the caller, "fit"), ``rank`` (this
    process's), ``timeout_s`` (the timeout in seconds, None if unknown), ``source`` (where the timeout came from:
    "dist_timeout", "default" for torch's or "caller" for a group the caller made) and ``where`` ("epoch 1, step 2")."""

    def __init__(self, name, rank, timeout_s, source, where):
        # source: "dist_timeout" (fit made the group with it), "default" (fit made it with torch's), "caller"
        self.facts = (name, rank, timeout_s, source, where)
        super().__init__(self.reworded())

    def __reduce__(self):  # with the instance's __dict__, as a plain exception's: its __notes__ and attributes
        return type(self), self.facts, self.__dict__

    def waited(self, option="dist_timeout"):
        """"process 0 timed out after 3 s (dist_timeout) waiting for the other processes at epoch 1, step 2"."""
        _, rank, timeout_s, source, where = self.facts
        why = {"dist_timeout": option, "default": f"torch's default; {option} sets it"}.get(
            source, "the process group's timeout")
        after = f" after {timeout_s:g} s" if timeout_s is not None else ""
        return f"process {rank} timed out{after} ({why}) waiting for the other processes at {where}"

    def reworded(self, option="dist_timeout"):
        """The error's message with ``option`` (default "dist_timeout", fit's argument; the command line's
        "--dist-timeout") as the setting to raise, unless the caller made the process group."""
        name, source = self.facts[0], self.facts[3]
        setting = "the timeout given to init_process_group" if source == "caller" else option
        return (f"{name}: {self.waited(option)}: another process hung or died before reaching it (its own error or "
                f"torchrun's summary names it); if a process may take longer than that between two steps (process "
                f"0 writing a checkpoint, a slow batch), raise {setting}")


def _all_reduce_mean_(tensors, world):
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _sync_defense_state(defense, start_state, world):
    """After an epoch under DDP each process has updated the defense state for its own samples. The merged state
    takes, per tensor element, the value of the one process that changed it (per-sample tables such as IMA margins),
    else the mean over processes (shared statistics such as DPAAT's running means; integer and other non-float
    values: rank 0's). A defense may override this with
    ``merge_distributed_state(states, start_state) -> state``."""
    state = defense.state_dict()
    if world == 1 or not state:
        return
    gathered = [None] * world
    dist.all_gather_object(gathered, state)
    merge = getattr(defense, "merge_distributed_state", None)
    if merge is not None:
        defense.load_state_dict(merge(gathered, start_state))
        return

    def combine(values, start):
        first = values[0]
        if torch.is_tensor(first):
            stack = torch.stack([v.to(first.device) for v in values])
            # float16/bfloat16 averaged in float32, float64 in float64 (float() rounded it to float32)
            mean = stack.to(torch.promote_types(stack.dtype, torch.float32)).mean(0).to(first.dtype) \
                if stack.is_floating_point() else first
            if start is not None and torch.is_tensor(start) and start.shape == first.shape:
                start = start.to(first.device).unsqueeze(0)
                changed = stack != start
                if stack.is_floating_point():  # a NaN left as it was (a "not seen yet" fill) is unchanged
                    changed &= ~(stack.isnan() & start.isnan())
                count = changed.sum(0)
                # where, not a product with the 0/1 mask: 0 * inf is NaN (an inf fill, as a running minimum starts)
                pick = torch.where(changed, stack, torch.zeros_like(stack)).sum(0).to(first.dtype)
                return torch.where(count == 1, pick, torch.where(count == 0, start[0], mean))
            return mean
        if isinstance(first, dict):
            start = start if isinstance(start, dict) else {}
            return {k: combine([v[k] for v in values], start.get(k)) for k in first}
        if isinstance(first, float):
            return sum(values) / len(values)
        return first

    defense.load_state_dict(combine(gathered, start_state))


# ---------------------------------------------------------------------------------------------------------------------
# Checks


def _make_optimizer(name, optimizer, model, params, lr):
    if optimizer is None:
        return torch.optim.Adam(params, lr=lr)
    built = not isinstance(optimizer, torch.optim.Optimizer) and callable(optimizer)
    if built:  # the callable's result gets the checks a given optimizer gets
        optimizer = optimizer(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        what = "the optimizer callable to return a torch.optim.Optimizer" if built else (
            "optimizer to be None, a torch.optim.Optimizer or a callable(params) -> optimizer")
        raise TypeError(f"{name}: expected {what}, got {type(optimizer).__name__}")
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
        fix = "the params it is given" if built else "model.parameters() of the model passed to fit"
        raise ValueError(f"{name}: the optimizer holds tensors that are not the model's parameters (it would "
                         f"step them, not the model); build it over {fix}")
    return optimizer


def _class_path(obj):
    """``module.Class`` of ``obj`` (None for None): what a checkpoint records of the optimizer and scheduler."""
    return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"


# Scheduler state that counts progress rather than setting the schedule (CosineAnnealingWarmRestarts' T_cur / T_i,
# ReduceLROnPlateau's best and counters): a scheduler object reused after it stepped (a notebook) still resumes.
_SCHEDULER_PROGRESS = ("last_epoch", "T_cur", "T_i", "best", "num_bad_epochs", "cooldown_counter")


def _settings(state, skip=()):
    """The plain-valued settings of an optimizer's ``defaults`` or a scheduler's ``state_dict()`` (public keys not in
    ``skip``; a dict of plain values, MultiStepLR's milestones Counter, as sorted pairs), as a checkpoint records them:
    the checkpoint's optimizer and scheduler states replace those of the ones built for a resume."""
    settings = {}
    for key, value in state.items():
        if isinstance(value, dict) and all(_plain(k) and _plain(v) for k, v in value.items()):
            value = tuple(sorted(value.items()))
        if not key.startswith("_") and key not in skip and _plain(value):
            settings[key] = _as_tuples(value)
    return settings


def _changed_keys(saved, now):
    """The keys, sorted, at which two recorded settings dicts differ ("unset" where one lacks a key)."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k, "unset") != now.get(k, "unset"))


def _settings_change(saved, now):
    """Two recorded settings dicts ("unset" where one lacks a key) shown at the keys whose values differ, as
    ``("k=saved, ...", "k=now, ...")``; None when none differ."""
    changed = _changed_keys(saved, now)
    if not changed:
        return None
    return tuple(", ".join(f"{k}={settings.get(k, 'unset')!r}" for k in changed) for settings in (saved, now))


def _group_settings(optimizer):
    """Each parameter group's plain-valued settings but its lr, as a checkpoint records them: per-group settings
    given to the optimizer (no weight decay on biases) differ from its defaults, and the checkpoint's replace them on
    resume. Not lr: schedulers move it (ReduceLROnPlateau without keeping the first value), so an optimizer object
    reused after an interruption would be refused."""
    return [_settings(g, skip=("params", "lr", "initial_lr")) for g in optimizer.param_groups]


def _unscheduled_group_settings(settings, group):
    """A group's recorded ``settings`` without what a momentum-cycling scheduler moves every epoch, as the lr: the
    momentum (Adam's first beta) that OneCycleLR and CyclicLR with cycle_momentum -- which leave ``base_momentum`` and
    ``max_momentum``, still compared, in the ``group`` -- set, so an optimizer object reused after an interruption
    resumes. Recorded whole: checkpoints keep the momentum the run started with."""
    if "base_momentum" not in group:
        return settings
    settings = {k: v for k, v in settings.items() if k != "momentum"}
    if isinstance(settings.get("betas"), tuple):
        settings["betas"] = settings["betas"][1:]
    return settings


def tensors_sha256(tensors):
    """sha256 of ``tensors``' dtypes, shapes and bytes (on any device, any layout)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Rows of each field a training-set fingerprint reads: evenly spaced, a fixed cost whatever the set's size
_FINGERPRINT_ROWS = 64


def train_data_fingerprint(dataset):
    """sha256 of a TensorDataset's labels and of ``_FINGERPRINT_ROWS`` evenly spaced rows of each of its tensors (all
    rows of a smaller set), also under an IndexedDataset: a resume on data replaced in place (another .npz with as
    many samples) trained on, silently. None for other datasets: their items need not be stored rows (a random
    transform would give another fingerprint at every call)."""
    from .data import IndexedDataset

    inner = dataset.dataset if isinstance(dataset, IndexedDataset) else dataset
    if getattr(type(inner), "__getitem__", None) is not torch.utils.data.TensorDataset.__getitem__:
        return None
    n = len(inner)
    rows = torch.linspace(0, n - 1, min(n, _FINGERPRINT_ROWS)).round().long().unique()
    labels = inner.tensors[1:2]  # whole: a label column is small, and a relabelled set must not pass
    # values, not storage: the same set in float64 for a float64 model (or int32 labels) is the same data. A complex
    # tensor stays complex: long() of it warns that it drops the imaginary part, before fit's refusal of its dtype
    return tensors_sha256(t.double() if t.is_floating_point() else t.cdouble() if t.is_complex() else t.long()
                          for t in (*labels, *(t[rows.to(t.device)] for t in inner.tensors)))


def _scheduler_parts(scheduler):
    """The settings a SequentialLR or ChainedScheduler keeps under private keys of its state_dict(), which
    ``_settings`` skips: SequentialLR's milestones and each scheduler's class and settings, flattened
    ({"milestones": (2,), "schedulers[1]": "...CosineAnnealingLR", "schedulers[1].T_max": 20, ...}); None for other
    schedulers. The checkpoint's states replace them all on resume."""
    parts = getattr(scheduler, "_schedulers", None)
    if not isinstance(parts, (list, tuple)) or not all(hasattr(part, "state_dict") for part in parts):
        return None
    settings = {}
    if getattr(scheduler, "_milestones", None) is not None:
        settings["milestones"] = _as_tuples(list(scheduler._milestones))
    for i, part in enumerate(parts):
        settings[f"schedulers[{i}]"] = _class_path(part)
        own = {**_settings(part.state_dict(), _SCHEDULER_PROGRESS), **(_scheduler_parts(part) or {})}
        settings.update({f"schedulers[{i}].{key}": value for key, value in own.items()})
    return settings


def _make_scheduler(name, scheduler, optimizer):
    if scheduler is None:
        return None
    # a scheduler class has a step attribute too, but is a callable(optimizer) -> scheduler (as SGD is for optimizer=)
    built = callable(scheduler) and (isinstance(scheduler, type) or not hasattr(scheduler, "step"))
    if built:  # the callable's result gets the checks a given scheduler gets (None would silently schedule nothing)
        scheduler = scheduler(optimizer)
    if not hasattr(scheduler, "step"):
        what = "the scheduler callable to return a scheduler" if built else (
            "scheduler to be None, a scheduler or a callable(optimizer) -> scheduler")
        raise TypeError(f"{name}: expected {what}, got {type(scheduler).__name__}")
    if getattr(scheduler, "optimizer", optimizer) is not optimizer:
        fix = ("build it over the optimizer the callable is given" if built else "pass the optimizer it schedules as "
               "optimizer=, or scheduler as a callable(optimizer)")
        raise ValueError(f"{name}: the scheduler was built over another optimizer than the one being trained; {fix}")
    return scheduler


def _check_map_style(name, arg, data, batch_args="batch_size=, val_batch_size="):
    """fit (and evaluate) batch a dataset themselves (data[i] by position, len()): a DataLoader passed instead failed
    with "'DataLoader' object is not subscriptable" -- as val_data only after the first epoch's training.
    ``batch_args``: the caller's arguments that set the batch sizes."""
    if isinstance(data, torch.utils.data.DataLoader):
        fix = f"pass its dataset (loader.dataset): {name} draws the batches itself ({batch_args})"
    else:
        fix = "wrap the samples in a map-style dataset (TensorDataset, or a class with __len__ and __getitem__)"
    if (isinstance(data, (torch.utils.data.DataLoader, torch.utils.data.IterableDataset))
            or not hasattr(data, "__len__") or not hasattr(data, "__getitem__")):
        raise TypeError(f"{name}: expected {arg} to be a map-style dataset (len() and data[i] -> (x, y)), got "
                        f"{type(data).__name__}; {fix}")


def refuse_fields_as_dataset(name, data, arg=None):
    """fit's and evaluate's rule for a split's tensors passed as they are, (x, y) or (x, y, ids), instead of a dataset
    of (x, y) items: a tuple or list of 2 or 3 tensors or arrays of one length, the first at least 2-D and the second at
    most 2-D (a list of (x, y) samples is a dataset still). Read as a dataset of two items, x and y, they were
    "got Tensor of length ?" (evaluate) or "could not stack the dataset's items ... make each x a tensor" (fit).
    ``arg``: the argument named in the error (train_data, val_data), None for a caller's only dataset."""
    fields = list(data) if isinstance(data, (tuple, list)) and len(data) in (2, 3) else []
    if all(isinstance(f, (torch.Tensor, np.ndarray)) and f.ndim for f in fields) and len(fields) > 1 \
            and fields[0].ndim >= 2 and fields[1].ndim <= 2 and len({f.shape[0] for f in fields}) == 1:
        names = ("x", "y", "ids")[:len(fields)]
        tensors = all(torch.is_tensor(f) for f in fields)
        args = ", ".join(names if tensors else (f"torch.as_tensor({n})" for n in names))
        raise TypeError(f"{name}: expected {arg + ' to be ' if arg else ''}a dataset of ({', '.join(names)}) items, "
                        f"got a {type(data).__name__} of {len(fields)} {'tensors' if tensors else 'arrays'} "
                        f"({', '.join(str(list(f.shape)) for f in fields)}), one per field; pass "
                        f"torch.utils.data.TensorDataset({args})")


def _checked_output(name, defense, out):
    """``out`` if it is a DefenseOutput with a one-element loss; else a one-line error naming the defense and the fix,
    not torch's "grad can be implicitly created only for scalar outputs" or an AttributeError."""
    who = _defense_named(name, defense)
    if not hasattr(out, "loss"):
        raise TypeError(f"{who} returned {type(out).__name__}; return robust_ops.defenses.DefenseOutput(loss=...)")
    if not torch.is_tensor(out.loss) or out.loss.numel() != 1:
        got = f"shape {tuple(out.loss.shape)}" if torch.is_tensor(out.loss) else type(out.loss).__name__
        raise ValueError(f"{who} returned a loss of {got}; expected a scalar tensor (average per-sample losses)")
    return out


def _check_logits(name, defense, logits, n, num_classes, single_logit):
    """A DefenseOutput's ``logits`` must be None or the batch's clean logits, shaped as the model's outputs (n rows;
    [n] / [n, 1] for a single-logit model, [n, K] else): train_acc compares them with the labels, which broadcast a
    [2n, K] (clean and adversarial concatenated) against a batch of 1 and read a [n] of probabilities as single
    logits, silently; other shapes failed with torch's size error after the step."""
    if logits is None:
        return
    if torch.is_tensor(logits) and logits.dim() and logits.shape[0] == n and is_single_logit(logits) == single_logit \
            and num_classes_of(logits) == num_classes:
        return
    got = f"shape {tuple(logits.shape)}" if torch.is_tensor(logits) else f"a {type(logits).__name__}"
    expected = f"[{n}] or [{n}, 1]" if single_logit else f"[{n}, {num_classes}]"
    raise ValueError(f"{_defense_named(name, defense)} returned logits of {got}; expected None or the clean logits of "
                     f"the batch's {n} sample{'s' * (n != 1)}, shaped as the model's output ({expected})")


def _defense_named(name, defense):
    return f"{name}: the {getattr(defense, 'name', type(defense).__name__)} defense"


def _clean_metrics(name, defense, metrics, device):
    """The defense's metrics as floats; anything else is refused rather than left out of the history unseen. Returns
    ``(metrics, unread)``: one-element real tensors on ``device``'s type are not read here but left in ``unread`` as
    float64 [1] (exact for every float and for the integers float() rounds alike; their metrics' entries None until
    then), for fit's one read of the step: each float() was a host read (a GPU sync) of its own."""
    clean, unread = {}, {}
    for key, value in (metrics or {}).items():
        if key == "acc":  # the history's train_acc is fit's accuracy of the returned logits: it would replace this one
            raise ValueError(f"{_defense_named(name, defense)}'s metric 'acc' has the name of fit's own train_acc "
                             "(the accuracy of the logits it returns); give it another name, e.g. 'adv_acc'")
        one_number = (isinstance(value, numbers.Real) or (torch.is_tensor(value) and value.numel() == 1))
        if not one_number:
            raise ValueError(f"{_defense_named(name, defense)}'s metric {key!r} is {type(value).__name__} "
                             f"{value!r:.60}; metrics must be numbers (floats for the history and metrics.csv)")
        if (torch.is_tensor(value) and value.device.type == device.type and value.layout == torch.strided
                and not (value.is_complex() or value.is_quantized)):  # float() of a complex one raises
            clean[key], unread[key] = None, value.detach().reshape(1).to(torch.float64)
        else:
            clean[key] = float(value.detach() if torch.is_tensor(value) else value)
    return clean, unread


def _metric_weights(name, defense, counts, metrics, n):
    """How much each metric's batch value weighs in the epoch's mean: its ``metric_counts`` entry (the samples it
    averages over), else the batch's ``n`` samples. Counts of metrics not reported, or not whole numbers in [0, n],
    are refused: they would weigh other values silently."""
    weights = dict.fromkeys(metrics, n)
    for key, count in (counts or {}).items():
        who = f"{_defense_named(name, defense)}'s metric_counts[{key!r}]"
        if key not in metrics:
            raise ValueError(f"{who}: counts a metric the batch did not report (its metrics: {sorted(metrics)})")
        if torch.is_tensor(count) and count.numel() == 1 and not count.is_floating_point():
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 0 <= count <= n:
            raise ValueError(f"{who} is {count!r:.60}; expected a whole number of the batch's samples, 0 to {n}")
        weights[key] = int(count)
    return weights


def _non_finite_items(split, x, item_ids):
    """"the inputs of <split> items [3, 7] hold NaN or Inf" for a batch ``x`` read from those dataset items (the first
    four named), None when every input is finite or x is no floating-point tensor."""
    if not (torch.is_tensor(x) and x.is_floating_point() and x.numel()):
        return None
    rows = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero().flatten().tolist()
    if not rows:
        return None
    return (f"the inputs of {split} items {[int(item_ids[r]) for r in rows[:4]]}{' ...' * (len(rows) > 4)} hold NaN "
            "or Inf")


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_clean(model, data, batch_size=64, device="cpu", channels_last=False):
    """Clean accuracy and mean classification loss of ``model`` on a dataset yielding (x, y[, ids]). Every module's
    train/eval mode is restored afterwards."""
    name = "fit (validation)"
    total, sums = 0, None  # sums: [summed loss, correct count] on the device, read back once after the last batch
    # per-module restore: model.train(was_training) would also flip submodules the caller froze in eval mode
    with use_model_mode(model, "eval"):
        for start in range(0, len(data), batch_size):
            batch = _collate(name, data, range(start, min(start + batch_size, len(data))))
            x, y, _ = _split_batch(name, batch, False)
            bad_inputs = _non_finite_items("val_data", x, range(start, min(start + batch_size, len(data))))
            if bad_inputs:  # else val_loss nan and a val_acc on argmax(NaN), silently
                raise ValueError(f"{name}: {bad_inputs}; check the data")
            x, y = x.to(device), y.to(device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out = check_output(name, forward_naming_input_mismatch(name, "val_data", model, x), x.shape[0])
            k = num_classes_of(out)
            low, high = labels_range(y) or (0, 0)  # one host read (a GPU sync), before the loss that needs them
            if low < 0 or high >= k:  # BCE would take label 2 as a target silently
                raise ValueError(f"{name}: expected labels in [0, {k}) for a model with {k} output classes, got "
                                 f"values in [{low}, {high}]")
            # half precision upcast by classification_loss (their sums overflow), float64 kept as the training loss is.
            # Summed in float64 from 0.0 in batch order, as Python's float sum of each batch's float() was (the same
            # bits), without two host reads per batch.
            batch_sums = torch.stack([classification_loss(out, y, reduction="sum").to(torch.float64),
                                      (predict_from_output(out) == y).sum().to(torch.float64)])
            sums = (batch_sums.new_zeros(2) if sums is None else sums) + batch_sums
            total += y.numel()
    loss_sum, correct = sums.tolist() if sums is not None else (0.0, 0)
    return {"val_loss": loss_sum / max(total, 1), "val_acc": int(correct) / max(total, 1)}


# ---------------------------------------------------------------------------------------------------------------------
# fit


def _closes_the_process_group_it_initialized(fit_function):
    """A process group fit initialized from torchrun's environment is destroyed when fit returns or raises, its
    setup's errors included (a refused resume, amp on CPU, processes that disagree): left open, a later fit in the
    process took it for the caller's and never closed it. A group the caller initialized stays."""

    @functools.wraps(fit_function)
    def fit_closing_its_group(*args, **kwargs):
        had_group = dist.is_available() and dist.is_initialized()
        try:
            return fit_function(*args, **kwargs)
        finally:
            if not had_group and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    return fit_closing_its_group


class _ChangesBeforeTraining:
    """What a fit call changed in the caller's model and defense before its first training step: the layers a
    defense's ``prepare_model`` swapped (MIRST-DM's drop-max), the state its ``setup`` sized (IMA's num_samples),
    each module's train/eval mode (the epoch's model.train() set a layer the caller froze in eval mode to training, and
    a Ctrl-C in the first step's attack left it so) and the buffers the first step's forwards updated (batch norm's
    running statistics, under an attack run in training mode: MIRST-DM's). Put back when the call raises before that
    step -- an argument or data error, a Ctrl-C -- else the same objects given to the corrected call were refused as
    "holds state from an earlier run", or a later fit under another defense silently trained the drop-max model. After
    the first step the model is the run's, and stays."""

    def __init__(self):
        self.model, self.defense, self.trained = None, None, False

    def record(self, model, defense):
        self.children = [(parent, dict(parent._modules)) for parent in model.modules()]
        self.modes = [(module, module.training) for module in model.modules()]
        self.buffers = []
        self.model, self.defense = model, defense
        # a defense holding state here is resumed (fit reset it for the checkpoint's) or refused: left as it is
        self.defense_was_fresh = not getattr(defense, "holds_state", lambda: False)()

    def record_buffers(self, model):
        """The buffers as training begins: on the training device, and a resumed run's the checkpoint's (put back
        beside its weights, which stay)."""
        self.buffers = [(module, key, value.detach().clone()) for module in model.modules()
                        for key, value in module._buffers.items()
                        if value is not None and not nn.parameter.is_lazy(value)]

    def put_back(self):
        if self.trained or self.model is None:
            return
        for parent, children in self.children:
            if parent._modules != children:  # compared by identity: modules define no __eq__
                parent._modules.clear()
                parent._modules.update(children)
        for module, training in self.modes:
            module.training = training
        with torch.no_grad():
            for module, key, saved in self.buffers:
                now = module._buffers.get(key)
                if now is not None and now.shape == saved.shape:
                    now.copy_(saved)
        if self.defense_was_fresh:
            getattr(self.defense, "reset_state", lambda: None)()


# the fit call running in this context (nested calls each have their own)
_FIT_CHANGES = contextvars.ContextVar("robust_ops_fit_changes")


def _puts_back_its_changes_when_it_stops_before_training(fit_function):
    @functools.wraps(fit_function)
    def fit_putting_back(*args, **kwargs):
        changes = _ChangesBeforeTraining()
        token = _FIT_CHANGES.set(changes)
        try:
            return fit_function(*args, **kwargs)
        except BaseException:
            changes.put_back()
            raise
        finally:
            _FIT_CHANGES.reset(token)

    return fit_putting_back


def _trains_with_gradients(fit_function):
    """fit runs with gradients enabled: under a caller's torch.no_grad() block (a script wrapped in one) its first
    step stopped blaming the defense, "the standard defense returned a loss that does not depend on the model's
    parameters"; validation keeps its own no_grad, and the caller's block holds again after fit. Here, not torch's
    own enable_grad decorator: a frame of this module, which _warn_at_callers_line skips to the caller's line."""

    @functools.wraps(fit_function)
    def fit_with_gradients(*args, **kwargs):
        with torch.enable_grad():
            return fit_function(*args, **kwargs)

    return fit_with_gradients


@_closes_the_process_group_it_initialized
@_puts_back_its_changes_when_it_stops_before_training
@_trains_with_gradients
def fit(
    model,
    defense,
    train_data,
    val_data=None,
    *,
    epochs,
    batch_size=8,
    lr=None,
    optimizer=None,
    scheduler=None,
    out_dir=None,
    resume=False,
    seed=0,
    device="cpu",
    amp=False,
    channels_last=False,
    prepacked_conv=None,
    progress=True,
    max_grad_norm=None,
    val_batch_size=None,
    early_stopping=None,
    restore_best=False,
    warmup_epochs=0,
    warmup_params=None,
    dist_timeout=None,
):
    """Train ``model`` with ``defense`` for ``epochs`` epochs.

    Args:
        model (nn.Module): outputs ``[N, K]`` logits or ``[N]`` single logits; float32 or float64 trainable
            parameters (float16 / bfloat16 ones are refused: ``amp`` computes in float16). A ``torch.compile``'d
            model trains compiled; its checkpoints hold the model's own names (no ``_orig_mod.`` prefix), as do
            an ``nn.DataParallel``'s (no ``module.``). Lazy
            layers (``nn.LazyLinear``, ...) are created by one eval-mode forward on train_data's first items (one
            the forward does not use is refused: it can be neither trained nor saved).
        defense (robust_ops.defenses.Defense or str): a defense object, or a name or dotted import path
            (package.module.Class) for ``defenses.build``.
        train_data, val_data (Dataset): yield ``(x, y)`` or ``(x, y, ids)`` (``robust_ops.data.IndexedDataset``,
            required by defenses with ``needs_ids`` such as IMA); ``y`` one integer class label per sample, batches
            of shape [N] or [N, 1] (one-hot, float or bool labels are refused; the rule of
            ``robust_ops.evaluate.evaluate`` too).
        epochs (int): total number of epochs (a resumed run continues up to this number).
        batch_size (int): global batch size (split across processes under DDP). Default 8 (MIRST-DM's setting).
        lr (float): learning rate of the default Adam optimizer, a finite number >= 0; None: 1e-4 (MIRST-DM's
            setting). With ``optimizer`` given, any lr is an error (it would be ignored).
        optimizer: None (Adam(lr)), an optimizer over ``model``'s parameters, or a callable ``params -> optimizer``.
        scheduler: None, an LR scheduler, or a callable ``optimizer -> scheduler``; stepped once per epoch
            (``ReduceLROnPlateau`` gets the validation loss, rank 0's under DDP; the training loss without
            ``val_data``).
        out_dir (str or Path): folder for ``checkpoint.pt``, ``metrics.csv`` and ``metrics.json``
            (None: nothing is written). Under DDP given to every process (process 0 writes), not to process 0 alone.
        resume (bool or str): True continues from ``out_dir/checkpoint.pt`` when it exists; a path continues from
            that file (which must exist).
        seed (int): seeds torch, numpy and python RNGs at a fresh start, and the epoch permutations: 0 to 2**32 - 1
            (numpy's seeds; others repeated one of these).
        device (str or torch.device): where to train. Under DDP on CUDA, each process uses ``cuda:LOCAL_RANK``.
        amp (bool): float16 autocast + GradScaler (CUDA only).
        channels_last (bool): model and 4-D inputs in channels_last memory format.
        prepacked_conv (bool, optional): True runs the attacks inside training (IMA's GenAdv, PGD of AT, ...) on
            convolutions packed once per attack (robust_ops.prepacked_conv: CPU, faster, last-bit differences);
            False does not; None follows ``$ROBUST_OPS_PREPACKED_CONV`` (off by default). The checkpoint records
            what ran. Training steps are unaffected.
        progress (bool): tqdm progress bar (rank 0 only).
        max_grad_norm (float, optional): clip the total gradient norm (after extra_grads are added).
        val_batch_size (int, optional): batch size for validation; None: 64. Given without ``val_data`` (nothing
            to validate) it is an error, not ignored.
        early_stopping (int, optional): patience: stop once ``val_loss`` (the quantity a ``ReduceLROnPlateau``
            steps on with ``val_data``) has not improved for this many epochs after its best; needs ``val_data``.
            Epochs of the warm-up do not count. The checkpoint holds the last epoch's weights; so does the model
            returned, unless ``restore_best``.
        restore_best (bool): with ``early_stopping``, the model returned holds the weights of the epoch with the
            best ``val_loss`` (the state's best_epoch; ``FitResult.weights_epoch``), whether the run stopped early
            or ran all ``epochs``; with ``out_dir`` they are also kept in the checkpoint (its ``best_model``, for
            a resume) and written to ``out_dir/best_model.pt`` (``load_weights`` and ``robust-ops eval`` read it).
            A resume may switch it off, and on only where the checkpoint's weights are its best epoch's (or no
            epoch set a best yet).
        warmup_epochs (int): the first epochs train the classifier head alone (the other parameters keep their
            weights and optimizer state); part of ``epochs`` (10 and 60: 10 of the head, 50 of all layers).
        warmup_params (str or sequence of str, optional): the module name(s) of the head the warm-up trains (e.g.
            ``"fc"``); None: the model's ``fc``, ``classifier`` or ``head`` submodule.
        dist_timeout (float, optional): under DDP, the seconds a process waits in a collective for the others
            before it gives up with a CollectiveTimeoutError naming itself and where (another process hung or
            died); passed to the ``init_process_group`` fit makes from torchrun's environment. None: torch's
            default (30 min for gloo, 10 min for NCCL). A group initialized before fit has its own timeout: a
            dist_timeout is then refused (pass ``timeout=`` to your ``init_process_group``). No effect in one
            process; not recorded in the checkpoint (it changes no result), so a resume may change it.

    Returns:
        FitResult(history, checkpoint, model, early_stopping, weights_epoch).

    Raises:
        NonFiniteLossError (a FloatingPointError): the loss, the gradients or the weights became NaN or Inf, or the
            defense's attack refused the batch (NaN / Inf inputs, naming the items; model outputs without class
            probabilities); the message names where (the epoch, and the step where there is one) and the last
            good checkpoint.
        OneSampleBatchError (a ValueError): a one-sample batch met the model's training-mode batch norm.
        UnreadableCheckpointError (a ValueError): the checkpoint to resume cannot be read (damaged, not a
            torch.save file).
        LostBestEpochError (a ValueError): ``restore_best`` resumes a checkpoint trained without it whose best epoch
            is not its last.
        ResumeMismatchError (a ValueError): the checkpoint to resume was trained with another setting (``key``,
            ``saved``, ``now``) or holds more than ``epochs`` epochs; the defense's ``load_state_dict`` refusing
            its state for another option's value (IMA's delta or eps_train given) is one of key "defense_options".
        InputDtypeError (a TypeError), InputShapeError (a ValueError): the data's dtype or channel count is not the
            model's (robust_ops.attacks).
        CollectiveTimeoutError (a RuntimeError): under DDP, a collective waited past the group's timeout.
        RuntimeError: fit was called under ``torch.inference_mode()`` (it trains with gradients enabled under a
            caller's ``torch.no_grad()``).
    """
    name = "fit"
    check_gradients_possible(name, "cannot train", "fit")  # enable_grad cannot lift inference_mode: refused first
    # the process group first (it needs these two alone): a check below that fails on one process only (one given
    # other arguments) is held until the processes compare their settings, where every process names it
    timeout = check_dist_timeout(dist_timeout)
    device = check_usable_device(name, device)
    callers_group = dist.is_available() and dist.is_initialized()
    # a group initialized here is destroyed by the decorator
    rank, world = _distributed_context(device, timeout, dist_timeout)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    # a collective that waits past the group's timeout is named (CollectiveTimeoutError) from fit's first one on
    group_timeout_s = timeout.total_seconds() if timeout is not None else _group_timeout_s(device) if world > 1 \
        else None
    failures = _OneProcessFailures(name, rank, world, device, group_timeout_s, "caller" if callers_group
                                   else "default" if timeout is None else "dist_timeout")
    agreed = {}  # what the processes compare: unset where a check failed here
    with _HeldError(world) as held:
        from . import defenses as _defenses

        _defenses.refuse_a_class(name, defense)
        if isinstance(defense, str):
            defense = _defenses.build(defense)
        if not callable(defense) or not hasattr(defense, "state_dict"):
            raise TypeError(f"{name}: expected defense to be a robust_ops.defenses.Defense or a defense name, got "
                            f"{type(defense).__name__}")
        if not isinstance(model, nn.Module):  # else "'str' object has no attribute 'to'", or a later one
            raise TypeError(f"{name}: expected model to be an nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # wrapped again, the attacks (run on model.module) went through a DDP forward, a collective the processes
            # took different numbers of (IMA's early exit: a hang until the group's timeout), and the checkpoint's keys
            # read "module.*", which the trained architecture does not load
            raise TypeError(f"{name}: expected the model itself, got a DistributedDataParallel; pass its module "
                            "(model.module): under DDP fit wraps the model itself")
        epochs = check_int(name, "epochs", epochs)
        batch_size = check_int(name, "batch_size", batch_size)
        given_val_batch_size = val_batch_size  # None: unset, so the default is not refused without val_data
        val_batch_size = check_int(name, "val_batch_size", 64 if val_batch_size is None else val_batch_size)
        if val_data is None:
            refuse_unused(name, {"val_batch_size": given_val_batch_size}, "val_data=None (nothing is validated)",
                          "pass val_data")
        seed = check_seed(name, seed)
        max_grad_norm = check_real(name, "max_grad_norm", max_grad_norm, minimum=0, allow_min=False, optional=True)
        # a string would pass as True: channels_last="no" trained channels_last, amp="no" was "amp=True needs CUDA"
        check_flags(name, {"amp": amp, "channels_last": channels_last, "progress": progress,
                           "prepacked_conv": prepacked_conv, "restore_best": restore_best},
                    optional=("prepacked_conv",))
        early_stopping, warmup_epochs = _check_schedule_options(name, early_stopping, warmup_epochs, warmup_params,
                                                                val_data, restore_best)
        refuse_fields_as_dataset(name, train_data, "train_data")
        _check_map_style(name, "train_data", train_data)
        if val_data is not None:
            refuse_fields_as_dataset(name, val_data, "val_data")
            _check_map_style(name, "val_data", val_data)
        agreed = {"seed": seed, "len(train_data)": len(train_data), "batch_size": batch_size, "epochs": epochs,
                  "len(val_data)": None if val_data is None else len(val_data), "amp": bool(amp),
                  "restore_best": restore_best,
                  # given or not, not the path: nodes may mount one shared folder under other paths
                  "out_dir": None if out_dir is None else "a folder"}
    if world > 1:  # before any check that would then raise on some processes only
        # every process validates on the whole val_data: shards of it would give each process (and rank 0's metrics
        # files, and a ReduceLROnPlateau) its own validation numbers
        # amp here: its check below would raise on some processes only; the other settings once built (config)
        with failures:
            _check_processes_agree(name, agreed, rank, world, "pass every process the same ones, and the whole "
                                   "train_data and val_data (not shards): fit cuts one permutation of train_data into "
                                   "global batches and gives each process its share, and seeds each process's own "
                                   "random streams itself", fixes={
                                       # flags, not data: the generic fix named shards, which is not what is wrong
                                       "amp": "pass every process the same amp (True needs a CUDA device on each): "
                                       "with it on some processes only, their gradients come from float16 autocast "
                                       "and the others' from float32, and DDP averages them together",
                                       "restore_best": "pass every process the same restore_best: it decides which "
                                       "weights fit hands back, the best epoch's or the last epoch's, so processes "
                                       "given other values would end holding different models",
                                       # "only rank 0 saves": the others skipped the gather of every process's random
                                       # streams for the checkpoint, and all waited for the group's timeout
                                       "out_dir": "pass every process the same out_dir (a folder they all reach): "
                                       "process 0 alone writes in it, but every process takes part in each "
                                       "checkpoint (its random streams are saved in it) and reads it on resume"},
                                   error=held.error)
    agreed = {}
    with _HeldError(world) as held:
        # after the comparison: one process's empty shard (of val_data) is refused on every process, naming the lengths
        if len(train_data) == 0:
            raise ValueError(f"{name}: train_data is empty (0 samples); nothing to train on")
        if val_data is not None and len(val_data) == 0:
            raise ValueError(f"{name}: val_data is empty (0 samples); pass None to skip validation")
        if amp and device.type != "cuda":
            raise ValueError(f"{name}: amp=True needs a CUDA device (float16 autocast + GradScaler), got "
                             f"device={device}")
        if world > 1 and batch_size < world:
            raise ValueError(f"{name}: expected batch_size >= the number of processes ({world}), got {batch_size}")

        if out_dir is not None and not (isinstance(out_dir, (str, os.PathLike)) and os.fspath(out_dir)):
            # pathlib's bare "expected str, bytes or os.PathLike object"; "" was the current folder, as resume="" is
            # refused
            raise TypeError(f"{name}: expected out_dir to be a folder path (str or Path) or None, got {out_dir!r}")
        ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
        if out_dir is not None:  # else the first checkpoint write fails, after a whole epoch of training
            existing = next((p for p in (Path(out_dir), *Path(out_dir).parents) if p.exists()), None)
            if existing is not None and not existing.is_dir():
                raise NotADirectoryError(f"{name}: out_dir={os.fspath(out_dir)!r} cannot be a folder: {existing} is a "
                                         "file; pass a folder path (created when missing)")
        state = None
        resume_path, resume_error = _resume_path(name, resume, out_dir, ckpt_path)
        # continues out_dir's own run; else (a fresh start, or another folder's checkpoint) it replaces out_dir's run
        resumed_here = (resume_path is not None and ckpt_path is not None
                        and resume_path.resolve() == ckpt_path.resolve())
        if resume_path is not None and resume_error is None:
            try:
                state = _fit_checkpoint(name, resume_path, device)  # _set_rng_state takes the RNG states back to CPU
                if _in_data_parallel(model):
                    state = _without_wrapper_prefix(state, _DATA_PARALLEL_PREFIX)
            except ValueError as err:
                resume_error = err

        changes = _FIT_CHANGES.get()
        changes.record(model, defense)
        # A defense reused from an earlier fit (a notebook cell run again) holds that run's state (IMA's margins and the
        # table size fit gave it): a fresh run from it would silently differ from one with a new defense, and resetting
        # it would silently drop state a caller loaded on purpose -- so it is refused, unless a checkpoint replaces it.
        if resume_path is not None:
            getattr(defense, "reset_state", lambda: None)()
        elif getattr(defense, "holds_state", lambda: False)():
            if resume is True:  # told to resume that run, whose call stopped before writing one (Ctrl-C in epoch 1)
                raise ValueError(f"{_defense_named(name, defense)} holds state from an earlier run, and resume=True "
                                 f"found no checkpoint to replace it ({ckpt_path} does not exist: that run stopped "
                                 "before its first epoch ended, or wrote its checkpoints to another out_dir); pass "
                                 "that out_dir to resume it, or start again with a newly built defense (or call its "
                                 "reset_state() first) and model (its weights are that run's, part-trained)")
            raise ValueError(f"{_defense_named(name, defense)} holds state from an earlier run "
                             "(e.g. a fit before); pass a newly built defense, call its reset_state() first, or resume "
                             "that run from its checkpoint")
        setup = getattr(defense, "setup", None)
        if setup is not None and getattr(defense, "num_samples", None) is None:  # IMA: margin table size
            setup(len(train_data))
        elif setup is not None and defense.num_samples != len(train_data):
            # ids are positions in train_data: a larger table would keep (and average into its metrics) margins of
            # samples that do not exist, a smaller one fail mid-epoch
            raise ValueError(f"{_defense_named(name, defense)} was sized for num_samples="
                             f"{defense.num_samples}, but train_data has {len(train_data)} samples; pass "
                             f"num_samples=len(train_data) or leave it unset")
        prepare = getattr(defense, "prepare_model", None)
        if prepare is not None:  # MIRST-DM: drop-max pooling in place of the first max-pooling layer
            model = prepare(model)
        model = model.to(device)
        _initialize_lazy_modules(name, model, train_data, device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        # what the checkpoints hold: the same parameters, without "_orig_mod." or DataParallel's "module."
        weights_model = weights_module(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            if next(model.parameters(), None) is None:
                raise ValueError(f"{name}: the model has no parameters, so there is nothing to train; pass a model "
                                 "with weights (an nn.Module holding layers such as nn.Linear or nn.Conv2d)")
            raise ValueError(f"{name}: the model has no trainable parameters (each has requires_grad=False); unfreeze "
                             "the ones to train with requires_grad_(True)")
        check_trainable_precision(name, params)
        head = warmup_head(name, weights_model, params, warmup_params) if warmup_epochs else None
        # trained in the warm-up's epochs by everything but the head: their .grad is dropped before the step, so the
        # optimizer skips them (weights and state, Adam's step count included, unchanged)
        head_ids = {id(p) for _, p in head or ()}
        frozen = [p for p in params if id(p) not in head_ids] if head else []
        own_optimizer = optimizer is None
        if not own_optimizer and lr is not None:  # None, not the default value: lr=1e-4 given beside it is ignored too
            raise ValueError(f"{name}: lr={lr!r} sets the default Adam's learning rate only, and optimizer= was given; "
                             "set the learning rate in that optimizer instead")
        # Adam itself takes inf (NaN weights, then a NonFiniteLossError blaming the loss) and True (as 1.0)
        lr = DEFAULT_LR if lr is None else check_real(name, "lr", lr, minimum=0)
        optimizer = _make_optimizer(name, optimizer, model, params, lr)
        scheduler = _make_scheduler(name, scheduler, optimizer)
        _check_scheduler_fits(name, scheduler, epochs, val_data is not None, resume_path is not None)
        scaler = torch.amp.GradScaler("cuda") if amp else None

        sampler = GlobalBatchSampler(len(train_data), batch_size, seed=seed, rank=rank, world_size=world)
        if len(sampler) == 0:  # every global batch would be dropped: epochs without a single step
            raise ValueError(f"{name}: train_data has {len(train_data)} sample(s), fewer than the {world} processes; "
                             "every process needs at least one sample per step")
        # recorded as it runs, so a resume under another $ROBUST_OPS_PREPACKED_CONV is refused
        prepacked_conv = prepacked_conv_resolved(prepacked_conv)
        history, start_epoch = [], 0
        best_weights = None  # restore_best: the best epoch's state dict (on CPU), once an epoch set a best
        stopper = None if early_stopping is None else {
            "monitor": "val_loss", "patience": early_stopping, "best": None, "best_epoch": None, "bad_epochs": 0,
            "stopped_epoch": None, "reason": None}
        config = {"batch_size": batch_size, "seed": seed, "world_size": world, "defense": getattr(defense, "name", "?"),
                  # a subclass keeps its parent's name (class MyAT(AT): "at"), a Defense subclass without one "defense"
                  "defense_class": _class_path(defense),
                  "lr": lr if own_optimizer else None, "channels_last": bool(channels_last),
                  "prepacked_conv": bool(prepacked_conv), "drop_max_layers": drop_max_layers(model),
                  "max_grad_norm": max_grad_norm, "optimizer": _class_path(optimizer),
                  "scheduler": _class_path(scheduler),
                  "num_samples": len(train_data), "train_data_sha256": train_data_fingerprint(train_data),
                  "val_samples": None if val_data is None else len(val_data),
                  "amp": bool(amp), "optimizer_settings": _settings(optimizer.defaults),
                  "optimizer_groups": _group_settings(optimizer),
                  # the trainable parameters' precision (several dtypes: all of them, in order)
                  "param_dtype": ",".join(sorted({str(p.dtype) for p in params})),
                  "scheduler_settings": None if scheduler is None else _settings(scheduler.state_dict(),
                                                                                 _SCHEDULER_PROGRESS),
                  "scheduler_parts": _scheduler_parts(scheduler),
                  # what ReduceLROnPlateau steps on: its best, read from the checkpoint, is a value of that loss
                  "plateau_metric": None if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
                  else "val_loss" if val_data is not None else "train_loss",
                  # epochs and patience shape the run; the head's parameter names what the warm-up trains
                  "early_stopping": early_stopping, "warmup_epochs": warmup_epochs,
                  "warmup_params": [n for n, _ in head] if head else None}
        # before load_state_dict, which may take settings from the checkpoint
        defense_options = defense.options() if hasattr(defense, "options") else {}
        if world > 1:
            started = ("none (from scratch)" if resume_path is None else f"none ({resume_error})" if state is None
                       else f"after epoch {int(state['epoch'])}")
            # the fingerprint in words: equal shards of the data, one per process, differ there alone
            agreed = {"the checkpoint they resume": started,
                      **{_AGREED_NAMES.get(k, k): v for k, v in config.items() if k != "world_size"},
                      **{f"defense option {k}": v for k, v in defense_options.items()}}
    if world > 1:
        # every process reads the checkpoint itself: a node-local out_dir holds one on process 0's node only, and a
        # missing or unreadable file on one node only must stop every process here, not leave the others waiting.
        # The settings too: each process steps its own copy of the weights (DDP averages only the gradients), so
        # another lr, clipping, optimizer, defense option... on one process would train it otherwise, silently.
        with failures:
            _check_processes_agree(name, agreed, rank, world,
                                   "pass every process the same settings: each process updates its own copy of the "
                                   "weights with them (DDP averages only the gradients)", fixes={
                                       "the checkpoint they resume": "resume from a checkpoint every process reads: "
                                       "an out_dir on storage all nodes share",
                                       "the SHA-256 of train_data": "pass every process the whole train_data, the "
                                       "same samples in the same order (not a shard of its own): fit cuts one "
                                       "permutation of it into global batches and gives each process its share",
                                       "early_stopping": "pass every process the same early_stopping: a process "
                                       "that stopped after another epoch than the others would leave them waiting "
                                       "in the next epoch's collectives"},
                                   error=held.error)
    dropped = len(train_data) - sum(len(b) for b in sampler.global_batches())
    if dropped and rank == 0:  # every step needs a share on every process: said, not left to be found in the counts
        _warn_at_callers_line(f"{name}: {len(train_data)} samples in global batches of {batch_size} leave a last "
                              f"batch of {counted(dropped, 'sample')}, fewer than the {world} processes, which is "
                              f"dropped: each epoch trains on {len(train_data) - dropped} of the {len(train_data)} "
                              "samples (the left-out ones change with each epoch's permutation); a batch size that "
                              f"divides {len(train_data)}, or leaves at least {world}, trains on every sample")
    if resume_error is not None:
        raise resume_error
    if state is not None:
        _check_resume_fits(name, resume_path, state, config, defense_options, optimizer, len(train_data), epochs)
        if config["val_samples"] is None:  # epochs resumed without validation keep the run's record for later resumes
            config["val_samples"] = state["config"].get("val_samples")
        if restore_best:  # refused before the model, RNG and arithmetic warning are touched (robust-ops train's check)
            best_weights = _resumed_best_weights(name, resume_path, state)
        _load_resumed_state(name, resume_path, state, weights_model, optimizer, scheduler, scaler, defense)
        _continue_rng_streams(state, rank, seed, device)
        if rank == 0:
            _warn_on_other_arithmetic(name, resume_path, state.get("arithmetic"), _arithmetic(device, world))
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        if early_stopping is not None and isinstance(state.get("early_stopping"), dict):
            stopper = dict(state["early_stopping"])
    else:
        _seed_rank_streams(seed, rank)

    train_model = model
    write_error = _out_dir_write_error(name, out_dir, existing) if rank == 0 and out_dir is not None else None
    _raise_on_every_process(write_error, world, device, f"{name}: process 0 cannot write in out_dir={out_dir!r}",
                            failures)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        with failures:  # its constructor broadcasts the weights
            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    run = _Run(name, defense, train_data, batch_size, model, train_model, weights_model, params, frozen, optimizer,
               scaler, bool(amp), device, channels_last, bool(getattr(defense, "needs_ids", False)), rank, world,
               failures, max_grad_norm, warmup_epochs, changes, out_dir, ckpt_path, scheduler, sampler,
               {**config, "defense_options": defense_options},
               # out_dir's checkpoint.pt is this run's only once this run has written it (resume=True resumes that
               # file): at a fresh start it is an earlier run's, which a NonFiniteLossError must not name as this
               # run's last good state
               last_ckpt=str(resume_path) if resume_path is not None else None)

    # Training steps on CPU reuse freed activation memory instead of page-faulting it in again (robust_ops.memory),
    # and run max pooling on the native kernel (robust_ops.native_layers; same results bitwise).
    speedups = library_speedups(model, device, prepacked_conv=prepacked_conv)
    finite_at_start = _finite_tensor_names(weights_model)  # (a resume's: loaded above)
    speedups.__enter__()
    bar = None
    # a run its early stopping ended is finished: resumed (even with more epochs) it trains no further
    end_epoch = start_epoch if stopper is not None and stopper["stopped_epoch"] is not None else epochs
    out_dir_hold = contextlib.ExitStack()
    try:
        # One writer per out_dir, as robust-ops train's RUN_DIR (its hold is this one's, re-entrant): two processes
        # fitting into it (a requeued job beside the one still running) each rewrote the checkpoint and metrics
        # under the other, and both returned as if the folder held their run.
        in_use = None
        if rank == 0 and out_dir is not None:
            try:
                out_dir_hold.enter_context(exclusive_folder(out_dir))
            except FolderInUse as err:
                in_use = OSError(errno.EBUSY, f"{name}: out_dir={os.fspath(out_dir)!r}: {err}; wait for it to end "
                                 "or pass another out_dir")
        _raise_on_every_process(in_use, world, device, f"{name}: process 0 found out_dir={out_dir!r} in use by "
                                "another process", failures)
        if val_data is not None and start_epoch < end_epoch:
            # Validation's checks on its first batch (item layout, dtype, labels, inputs the model takes) before any
            # training: else a val_data the model cannot score failed after the first epoch, whose training was lost
            # (validation runs before the checkpoint). Eval mode, no gradients, no random draws: results unchanged.
            failures.where = "the check of val_data before training"
            with failures:
                evaluate_clean(model, torch.utils.data.Subset(val_data, range(min(val_batch_size, len(val_data)))),
                               val_batch_size, device, channels_last)
        if rank == 0 and out_dir is not None and not resumed_here:
            # a run that does not continue out_dir's own replaces it: its files go now, not with this run's first
            # checkpoint -- stopped before that, resume=True continued the old run as if it were this one (as
            # robust-ops train's fresh runs do); so does its best_model.pt, which would sit beside another run's.
            # After the val_data check: a call refused there trains nothing, and keeps the old run.
            for old in RUN_FILES:
                Path(out_dir, old).unlink(missing_ok=True)
        run.changes.record_buffers(model)
        for epoch in range(start_epoch, end_epoch):
            sampler.set_epoch(epoch)
            # a copy: a state_dict may return the live tensors, which the epoch then changes in place
            defense_start = _snapshot(defense.state_dict()) if world > 1 else None
            model.train()
            t0 = time.perf_counter()
            totals = _EpochTotals()
            steps = len(sampler)
            bar = None
            if progress and rank == 0:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
            for step, (indices, global_n) in enumerate(sampler):
                totals.add(*_train_one_batch(run, epoch, step, indices, global_n))
                if bar is not None:
                    bar.update(1)
                    if totals.seen.get("loss"):  # the epoch's mean so far (its train_loss at the last step)
                        bar.set_postfix(loss=f"{totals.sums['loss'] / totals.seen['loss']:.4f}")
            if bar is not None:
                bar.close()

            _end_epoch(run, epoch, totals, defense_start, finite_at_start)
            row = _epoch_row(run, epoch, totals, val_data, val_batch_size, t0)
            history.append(row)
            plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            monitored = _monitored_loss(run, epoch, row, plateau or (stopper is not None and epoch >= warmup_epochs))
            if stopper is not None and epoch >= warmup_epochs:
                _early_stopping_step(stopper, monitored, epoch)
            new_best = restore_best and stopper["best_epoch"] == epoch + 1
            if new_best:  # a copy off the device, as a checkpoint holds it: the next epoch changes the live tensors
                best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights_model.state_dict().items()}

            if scheduler is not None:
                if plateau:
                    scheduler.step(monitored)
                else:
                    scheduler.step()

            _save_epoch(run, epoch, history, stopper, best_weights,
                        write_best=best_weights is not None and (new_best or epoch == start_epoch))
            if stopper is not None and stopper["stopped_epoch"] is not None:
                break
        # these write in out_dir too: before its hold is released
        if rank == 0 and out_dir is not None and resume_path is not None and start_epoch == end_epoch:
            _write_a_finished_run(run, history, stopper, best_weights, resume_path, resumed_here)
    finally:
        if bar is not None:  # an interrupted epoch's bar, kept open by a notebook's traceback, would push the next down
            bar.close()
        speedups.__exit__(None, None, None)
        out_dir_hold.close()
    weights_epoch = len(history)
    if best_weights is not None:  # equal on every process: rank 0's val_loss picked the epoch, DDP kept them equal
        weights_model.load_state_dict(best_weights)
        weights_epoch = stopper["best_epoch"]
    return FitResult(history=history, checkpoint=str(ckpt_path) if ckpt_path is not None and ckpt_path.is_file()
                     else None, model=model, early_stopping=stopper, weights_epoch=weights_epoch)


@dataclass
class _Run:
    """What fit's epochs share, set up once before the first: the training step's pieces, the checkpoint's, and the
    run's state that changes as it goes (the model's class count, known from the first batch; the last checkpoint
    written, which a NonFiniteLossError names)."""

    name: str
    defense: object
    train_data: object
    batch_size: int
    model: nn.Module
    train_model: nn.Module  # the model, or its DDP wrapper
    weights_model: nn.Module  # what the checkpoints hold
    params: list
    frozen: list  # the warm-up's: every trainable parameter but the head's
    optimizer: object
    scaler: object
    amp: bool
    device: torch.device
    channels_last: bool
    needs_ids: bool
    rank: int
    world: int
    failures: object
    max_grad_norm: object
    warmup_epochs: int
    changes: object
    out_dir: object  # None: nothing is written
    ckpt_path: Path
    scheduler: object
    sampler: GlobalBatchSampler
    recorded_config: dict  # the checkpoints' and best_model.pt's
    num_classes: int = None
    single_logit: bool = None
    last_ckpt: str = None


def _train_one_batch(run, epoch, step, indices, global_n):
    """One training step on the items ``indices`` of train_data (this process's share of a global batch of
    ``global_n``): the defense's loss, the checks of what it returned, backward and the optimizer's step. Returns
    ``(metrics, weights, n, correct)`` for _EpochTotals.add."""
    at = f"epoch {epoch + 1}, step {step + 1}"
    with labels_read_once():  # the defense's and its attacks' label checks take the range fit's check read
        x, y, ids = _batch_on_device(run, indices, at)
        run.optimizer.zero_grad(set_to_none=True)
        with run.failures:
            out = _defense_output(run, x, y, ids, indices, global_n, at)
            loss, metrics, weights, own_bad, bad_loss, bad_extra, batch_correct = _read_step(run, out, y)
    where = _last_good_checkpoint(run.last_ckpt)
    if bad_loss or bad_extra:
        raise _non_finite_loss_error(run.name, run.defense, loss, own_bad, bad_loss, x, indices, at, where)
    scale = run.world * len(indices) / global_n if run.world > 1 else 1.0
    with run.failures:
        _update_weights(run, loss, out.extra_grads, scale, epoch < run.warmup_epochs, at, where)
    return metrics, weights, y.numel(), batch_correct[0] if out.logits is not None else None


def _batch_on_device(run, indices, at):
    """``(x, y, ids)`` of train_data's items ``indices``, on the device, their labels checked (at the first batch, the
    model's class count found); a failure on any process raises on every one."""
    name, error = run.name, None
    x = y = ids = None
    try:
        batch = _collate(name, run.train_data, indices)
        x, y, ids = _split_batch(name, batch, run.needs_ids, indices)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device)
        if run.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if run.num_classes is None:
            run.num_classes, run.single_logit = _infer_num_classes(run.model, x)
            _check_declared_classes(name, run.train_data, run.num_classes)
            run.defense.check_labels(y, run.num_classes)
        low, high = labels_range(y) or (0, 0)  # one host read (a GPU sync) for both ends
        if low < 0 or high >= run.num_classes:
            raise ValueError(f"{name}: expected labels in [0, {run.num_classes}) for a model with {run.num_classes} "
                             f"output classes, got values in [{low}, {high}] ({at})")
    except Exception as e:  # noqa: BLE001 -- re-raised below, after the other processes know
        error = e
    run.failures.where = at
    # a bad sample sits in one process's share
    _raise_on_every_process(error, run.world, run.device, f"{name}: another process failed to read or check its share "
                            f"of the batch at {at}", run.failures)
    return x, y, ids


def _defense_output(run, x, y, ids, indices, global_n, at):
    """The defense's DefenseOutput for the batch; its attack's refusals of NaN / Inf inputs or model outputs, and a
    one-sample batch met by batch norm, named as fit's errors at ``at``."""
    name, defense = run.name, run.defense
    with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=run.amp):
        try:
            with metrics_read_by_fit(defense):  # a built-in defense's metrics, read by _read_step with the rest
                return defense(run.train_model, x, y, ids) if run.needs_ids else defense(run.train_model, x, y)
        except NonFiniteInputError:
            # the defense's attack refused NaN/Inf inputs ("run_pgd: x contains NaN or Inf", found at its own input
            # check's sync), naming neither the data, nor the epoch and step
            bad_inputs = _non_finite_items("train_data", x, indices) or "the batch's inputs hold NaN or Inf"
            raise NonFiniteLossError(f"{name}: the {getattr(defense, 'name', 'defense')} defense's attack refused its "
                                     f"inputs ({bad_inputs}: check the data) at {at}; stopped before updating the "
                                     f"weights{_last_good_checkpoint(run.last_ckpt)}") from None
        except NonFiniteOutputError as err:
            # found at the attack's first forward, on its label check's sync: the loss check would name the epoch
            # and step, but not the model's outputs as the cause
            raise NonFiniteLossError(f"{name}: the {getattr(defense, 'name', 'defense')} defense's attack met model "
                                     f"outputs that are NaN or Inf ({err.count} of {err.inputs} samples) at {at}; "
                                     "check the model (a log or division of 0 in its forward) and the learning rate "
                                     "(diverged weights); stopped before updating the weights"
                                     f"{_last_good_checkpoint(run.last_ckpt)}") from None
        except ValueError as err:
            if x.shape[0] == 1 and is_one_sample_batch_norm(err):
                raise OneSampleBatchError(name, len(run.train_data), run.batch_size, global_n, run.world,
                                          at) from None
            raise


def _read_step(run, out, y):
    """The checks of the defense's output, refused before the weights change, and the step's one host read: whether
    the loss and the extra gradients are finite (on any process, under DDP), the batch's count of correct clean
    predictions, the defense's tensor metrics and its loss where they lack it. Returns ``(loss, metrics, weights,
    own_bad, bad_loss, bad_extra, correct)``, ``correct`` a list holding the count where the defense returned clean
    logits."""
    name, defense, device = run.name, run.defense, run.device
    loss = _checked_output(name, defense, out).loss
    _check_logits(name, defense, out.logits, y.numel(), run.num_classes, run.single_logit)
    # refused before the weights change; tensors read below with the flags
    metrics, unread = _clean_metrics(name, defense, out.metrics, device)
    weights = _metric_weights(name, defense, getattr(out, "metric_counts", None), metrics, y.numel())
    if "loss" not in metrics and not loss.is_complex():  # the history's train_loss, read with the rest (its float()
        # after the update was a host read of its own); a complex loss fails in backward below, as it did
        metrics["loss"], unread["loss"] = None, loss.detach().reshape(1).to(torch.float64)
    # MIRST's adversarial terms arrive as extra_grads, outside out.loss (and GradScaler's check)
    own_bad = torch.stack([(~torch.isfinite(loss.detach()).all()).to(device),
                           _any_non_finite(out.extra_grads).to(device)])
    bad = own_bad
    if run.world > 1:  # every process stops together (a lone raise would leave the others waiting)
        bad = own_bad.to(dtype=torch.float32)  # a copy: own_bad still says which process it was
        dist.all_reduce(bad)
    # the batch's count of correct clean predictions (train_acc) rides on the flags' read: one host read (a GPU sync)
    # for both; float64 holds any count exactly
    read = [bad.to(torch.float64)]
    if out.logits is not None:
        read.append((predict_from_output(out.logits.detach()) == y).sum().to(torch.float64)[None])
    # and so do the defense's tensor metrics (a custom defense's, and a built-in one's: metrics_read_by_fit)
    read.extend(t.to(bad.device) for t in unread.values())
    bad_loss, bad_extra, *batch_correct = torch.cat(read).tolist()
    metrics.update(zip(unread, batch_correct[len(batch_correct) - len(unread):]))
    return loss, metrics, weights, own_bad, bad_loss > 0, bad_extra > 0, batch_correct


def _update_weights(run, loss, extra_grads, scale, warmup, at, where):
    """Backward of the (finite) ``loss`` times ``scale``, the defense's ``extra_grads`` added, the gradient checks
    and clipping, and the optimizer's step; in the ``warmup`` the head's parameters alone change."""
    name, params = run.name, run.params
    scaled = loss * scale if scale != 1.0 else loss
    if not loss.requires_grad:  # else torch's "element 0 of tensors does not require grad"
        raise ValueError(f"{_defense_named(name, run.defense)} returned a loss that does not depend on the model's "
                         "parameters (computed under torch.no_grad() or detached?)")
    if run.scaler is not None:
        run.scaler.scale(scaled).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        scaled.backward()
    if run.world > 1:
        _check_every_parameter_got_a_gradient(name, run.weights_model, at)
    if extra_grads is not None:
        _add_extra_grads(name, params, extra_grads, scale, run.world)
    if warmup:  # the head alone trains: the optimizer skips a parameter without .grad
        for p in run.frozen:
            p.grad = None
    # a finite loss can still have NaN gradients (sqrt's derivative at 0): the step made the weights NaN unseen. The
    # same on every process (DDP averaged them); GradScaler skips such steps itself.
    if run.scaler is None and bool(_any_non_finite([p.grad for p in params])):
        raise NonFiniteLossError(f"{name}: the {getattr(run.defense, 'name', 'defense')} gradients are non-finite (the "
                                 f"loss is finite) at {at}; stopped before updating the weights{where}")
    if run.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, run.max_grad_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.changes.trained = True


def _end_epoch(run, epoch, totals, defense_start, finite_at_start):
    """The end of 0-based ``epoch``'s steps: under DDP, rank 0's buffers, the metric sums and the defense's state
    made every process's; then the weights checked finite."""
    run.failures.where = f"the end of epoch {epoch + 1}"
    with run.failures:  # a process that failed at its last step leaves the others waiting here
        if run.world > 1:
            _broadcast_buffers(run.model)
            totals.sum_over_processes(run.world, run.device)
            _sync_defense_state(run.defense, defense_start, run.world)
    # Every step's loss and gradients were finite, but the last step's update (or a forward's batch-norm statistics)
    # can still overflow: validation then scored NaN logits and the checkpoint, later named as the last good one, held
    # NaN weights. The same on every process (equal weights, rank 0's buffers).
    _check_finite_weights(run.name, run.weights_model, finite_at_start, epoch, _last_good_checkpoint(run.last_ckpt))


def _epoch_row(run, epoch, totals, val_data, val_batch_size, t0):
    """0-based ``epoch``'s history row: the training metrics, the validation's (with ``val_data``), the learning
    rate and the seconds since ``t0``."""
    row = totals.row(epoch)
    if val_data is not None:
        run.failures.where = f"the validation after epoch {epoch + 1}"
        with run.failures:  # out of memory on one GPU: the others wait in the next collective
            row.update(evaluate_clean(run.model, val_data, val_batch_size, run.device, run.channels_last))
    row["lr"] = float(run.optimizer.param_groups[0]["lr"])
    row["time_s"] = time.perf_counter() - t0
    return row


def _monitored_loss(run, epoch, row, exchanged):
    """What a ReduceLROnPlateau and early stopping step on: ``row``'s val_loss, else its train_loss; under DDP, where
    ``exchanged`` (one of them steps on it), rank 0's val_loss on every process."""
    monitored = row.get("val_loss", row.get("train_loss"))
    if run.world > 1 and "val_loss" in row and exchanged:
        run.failures.where = f"the validation-loss exchange after epoch {epoch + 1}"
        with run.failures:
            monitored = _rank0_value(monitored, run.device)
    return monitored


def _save_epoch(run, epoch, history, stopper, best_weights, write_best):
    """After 0-based ``epoch``, with out_dir: the checkpoint (under DDP holding every process's RNG streams, gathered
    here), the metrics files and, with ``write_best``, best_model.pt, written by process 0; a failure to write them
    raises on every process. Also the barrier before the next epoch, with out_dir or without."""
    name, world, device, failures, out_dir = run.name, run.world, run.device, run.failures, run.out_dir
    # where the others wait while process 0 writes (a slow disk: a timeout names it)
    failures.where = f"the checkpoint after epoch {epoch + 1}" if out_dir is not None else \
        f"the end of epoch {epoch + 1}"
    rank_states, save_error = None, None
    if world > 1 and out_dir is not None:  # every process's RNG streams, so each resumes its own
        rank_states = [None] * world
        with failures:
            dist.all_gather_object(rank_states, _rng_state(device))
    if run.rank == 0 and out_dir is not None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch + 1,
            "config": run.recorded_config,
            "model": run.weights_model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "defense": run.defense.state_dict(),
            "rng": _rng_state(device),
            "rng_ranks": rank_states,
            "sampler": run.sampler.state_dict(),
            "history": history,
            "arithmetic": _arithmetic(device, world),
            "early_stopping": stopper,
            # restore_best's, where a resume finds them (the model entry stays the last epoch's)
            "best_model": best_weights,
        }
        try:
            if write_best:
                # before the checkpoint, and again by a resumed call's first epoch: a kill between the two writes then
                # leaves no best_model.pt behind the checkpoint's best_model
                _save_best_model(out_dir, stopper, run.recorded_config, best_weights)
            save_checkpoint(run.ckpt_path, state)
            _write_metrics(Path(out_dir), history)
        except Exception as e:  # noqa: BLE001 -- re-raised below, after the other processes know
            save_error = e
    # also the barrier before the next epoch
    _raise_on_every_process(save_error, world, device, f"{name}: process 0 failed to write the checkpoint or metrics "
                            f"to {out_dir} after epoch {epoch + 1}", failures)
    if out_dir is not None:  # on every process: a later NonFiniteLossError names the last good checkpoint
        run.last_ckpt = str(run.ckpt_path)


def _write_a_finished_run(run, history, stopper, best_weights, resume_path, resumed_here):
    """Process 0's files for a resume that had no epoch left to run (the run was finished), which the epochs would
    have written: the checkpoint of a run resumed into another out_dir, the metrics files, and best_model.pt."""
    out_dir, ckpt_path = run.out_dir, run.ckpt_path
    if not resumed_here:
        # another folder's finished run: out_dir's old run was removed before the epochs, and no epoch runs to write
        # this one there, which left out_dir empty (FitResult.checkpoint None); its checkpoint as it is
        replace_atomically(ckpt_path, lambda f: f.write(resume_path.read_bytes()), binary=True, fsync=True)
    if not resumed_here or _epochs_in_history_file(out_dir) != len(history):
        # here: a run killed between its last checkpoint and the metrics files written after it: no epoch is left to
        # rewrite them, so they would stay an epoch behind the checkpoint (and epochs_done with them)
        _write_metrics(Path(out_dir), history)
    if best_weights is not None:
        # no epoch ran to write it: a finished run resumed with restore_best switched on (its best epoch its last),
        # or resumed into another out_dir
        _save_best_model(out_dir, stopper, run.recorded_config, best_weights)


def _resume_path(name, resume, out_dir, ckpt_path):
    """fit's ``resume`` argument read: ``(path, error)``, the checkpoint to resume (None: a fresh start) and, for a
    path with no file there, the FileNotFoundError fit raises once the processes have compared their settings (so
    every process names it). resume=True without out_dir's checkpoint is a fresh start, and says so where
    out_dir's metrics.json records trained epochs (the checkpoint was lost)."""
    resume_path, resume_error = None, None
    if isinstance(resume, (str, os.PathLike)):
        if not os.fspath(resume):
            raise ValueError(f"{name}: resume='' names no checkpoint; pass a checkpoint path, True "
                             f"(out_dir/{CHECKPOINT_NAME} when it exists) or False")
        resume_path = Path(resume)
        if not resume_path.is_file():
            resume_error = FileNotFoundError(f"{name}: resume={str(resume)!r}: no checkpoint file there")
    elif resume is True:
        if ckpt_path is None:
            raise ValueError(f"{name}: resume=True needs out_dir (the checkpoint is out_dir/{CHECKPOINT_NAME})")
        resume_path = ckpt_path if ckpt_path.is_file() else None
        trained = _epochs_in_history_file(out_dir) if resume_path is None else 0
        if trained:  # a fresh run removes metrics.json too: here the checkpoint was lost, so epochs are retrained
            _warn_at_callers_line(f"{name}: resume=True found no {ckpt_path}, but {Path(out_dir) / HISTORY_NAME} "
                                  f"records {counted(trained, 'epoch')} trained: the checkpoint was deleted or "
                                  "moved, so training starts afresh from epoch 1 (put it back to continue that "
                                  "run)")
    elif resume is not False and resume is not None:
        raise TypeError(f"{name}: expected resume to be a bool or a checkpoint path, got {resume!r}")
    return resume_path, resume_error


def _check_scheduler_fits(name, scheduler, epochs, validated, resumed):
    """fit's checks of a scheduler it steps once per epoch on a loss (val_loss where ``validated``): a
    ReduceLROnPlateau that is not mode='min', a OneCycleLR with fewer steps left than ``epochs`` (at a fresh start,
    one an earlier fit stepped counts its steps taken; a resume replaces them with the checkpoint's)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and scheduler.mode != "min":
        # stepped on a loss, mode="max" (Keras' monitor="val_accuracy" habit) cut the lr at each improvement
        raise ValueError(f"{name}: the ReduceLROnPlateau has mode={scheduler.mode!r}, but fit steps it on "
                         f"{'val_loss' if validated else 'train_loss'} (a loss: lower is better), so it "
                         "would cut the lr whenever the loss improves; build it with mode='min'")
    cycle = getattr(scheduler, "total_steps", None) if isinstance(
        scheduler, torch.optim.lr_scheduler.OneCycleLR) else None
    if cycle is not None and cycle < epochs:  # else torch's "Tried to step 3 times" after that epoch's training
        raise ValueError(f"{name}: the OneCycleLR has total_steps={cycle}, fewer than epochs={epochs}: fit steps "
                         f"the scheduler once per epoch, and OneCycleLR fails when stepped past its total_steps "
                         f"(at the end of epoch {cycle + 1}, losing its training); build it with "
                         "total_steps=epochs (or epochs=epochs, steps_per_epoch=1)")
    # a fresh run continues a scheduler reused from an earlier fit (continued training) from where it stopped; a
    # resume replaces its progress with the checkpoint's
    stepped = scheduler.last_epoch if cycle is not None and not resumed else 0
    if stepped and cycle - stepped < epochs:
        raise ValueError(f"{name}: the OneCycleLR has already stepped {stepped} of its total_steps={cycle} (an "
                         f"earlier fit stepped it), leaving {cycle - stepped}, fewer than epochs={epochs}: fit "
                         f"steps the scheduler once per epoch, and OneCycleLR fails when stepped past its "
                         f"total_steps (at the end of epoch {cycle - stepped + 1}, losing its training); build a "
                         "new one for this call, with total_steps=epochs")


# the other way on from a checkpoint whose run this call does not continue (its settings differ)
_TRAIN_AFRESH = "train afresh with resume=False (another out_dir keeps this run's files)"
# settings a fit argument sets, given back as the run had them: "pass defense='trades'"
_PASSED_SETTINGS = ("batch_size", "seed", "defense", "lr", "channels_last", "prepacked_conv", "max_grad_norm", "amp",
                    "early_stopping", "warmup_epochs")
# the others, in words
_RECORDED_SETTINGS = {"defense_class": "a defense of that class", "optimizer": "an optimizer of that class",
                      "scheduler": "a scheduler of that class",
                      "drop_max_layers": "a model with those DropMax2d layers", "num_samples": "the run's train_data",
                      "param_dtype": "a model of that dtype", "warmup_params": "the run's warm-up head (warmup_params)"}


def _resume_setting_fix(key, saved):
    """How a call resumes a checkpoint trained with ``key`` = ``saved``: "pass defense='trades'", or in words where no
    fit argument takes the recorded value as it is (a class path, a dtype, a default optimizer's lr of None)."""
    if key in _PASSED_SETTINGS and (saved is not None or key in ("early_stopping", "max_grad_norm")):
        if not (key == "defense" and saved in ("?", "defense")):  # a Defense subclass without a name of its own
            return f"pass {key}={saved!r}"
    if key == "scheduler" and saved is None:
        return "pass no scheduler"
    what = _RECORDED_SETTINGS.get(key, f"the run's {key}")
    return f"pass {what}"


def _check_resume_fits(name, resume_path, state, config, defense_options, optimizer, num_samples, epochs):
    """fit's checks that the checkpoint ``state`` (read from ``resume_path``) continues the run this call would
    train (``config``, as recorded in the checkpoints), with no setting of the call silently ignored or replaced;
    ``num_samples``: len(train_data)."""
    # lr: the optimizer's state (lr included) comes from the checkpoint, so another lr would be ignored;
    # layouts: other convolution kernels, and drop-max layers: another architecture, so a switched run would
    # silently differ from an uninterrupted one; so would other gradient clipping, and a scheduler left out,
    # added (a fresh schedule) or of another class (the checkpoint's state read by another rule); an optimizer of
    # another class fails on the loaded state with a bare KeyError; a training set of another size gets other
    # epoch permutations (drawn over its length); amp switched would compute in another precision, with a fresh
    # GradScaler, and so would a model of another dtype (load_state_dict and the optimizer cast the state to it);
    # a ReduceLROnPlateau given val_data or not would compare the other loss with its best.
    # A defense of another class under the same name (a subclass of AT keeps 'at') computes another loss.
    # Checkpoints written before these were recorded pass.
    # A validation set of another size (val_data added or left out: plateau_metric's rule) would put another set's
    # metrics in the same history and give ReduceLROnPlateau's best another loss; its content is not compared.
    saved_val = state["config"].get("val_samples")
    if saved_val is not None and config["val_samples"] is not None and saved_val != config["val_samples"]:
        raise ResumeMismatchError(name, resume_path, "val_samples", saved_val, config["val_samples"],
                                  f"{name}: cannot resume {resume_path}: it was validated on val_samples={saved_val}, "
                                  f"this call has val_samples={config['val_samples']}; pass the run's val_data")
    saved_seed = state["config"].get("seed")
    if isinstance(saved_seed, int) and not 0 <= saved_seed <= MAX_SEED:
        # written before 2026-12-07, when fit took any integer: no seed fit takes now continues its streams (python's
        # random reads the whole integer, torch and numpy its low bits), and the run repeated another seed's
        # (a ValueError, not a ResumeMismatchError: no seed this call could pass continues it)
        raise ValueError(f"{name}: cannot resume {resume_path}: it was trained with seed={saved_seed}, outside the "
                         f"seeds fit takes (0 to {MAX_SEED}: it repeated another seed's random streams); "
                         f"{_TRAIN_AFRESH} and a seed in that range")
    # the optimizer before lr: a run on the caller's SGD resumed without it read "trained with lr=None, this call
    # has lr=0.0001" (the default Adam's), naming an lr nobody passed
    for key in ("batch_size", "seed", "defense", "defense_class", "optimizer", "lr", "channels_last",
                "prepacked_conv",
                "drop_max_layers", "max_grad_norm", "scheduler", "num_samples", "amp", "param_dtype",
                "plateau_metric", "early_stopping", "warmup_epochs", "warmup_params"):
        saved = state["config"].get(key, None if key in ("batch_size", "seed", "defense") else config[key])
        if saved != config[key]:
            hint = ("; ReduceLROnPlateau steps on val_loss with val_data, else on train_loss: give val_data or "
                    "leave it out as that run did" if key == "plateau_metric" else
                    f"; {_resume_setting_fix(key, saved)} to continue that run, or {_TRAIN_AFRESH}")
            raise ResumeMismatchError(name, resume_path, key, saved, config[key],
                                      f"{name}: cannot resume {resume_path}: it was trained with {key}={saved!r}, "
                                      f"this call has {key}={config[key]!r}{hint}")
    # A training set of the same size but other content (an .npz replaced in place, another seed's synthetic
    # set). None on either side: a checkpoint written before it was recorded, or a dataset it cannot read.
    saved_data = state["config"].get("train_data_sha256")
    if None not in (saved_data, config["train_data_sha256"]) and saved_data != config["train_data_sha256"]:
        raise ValueError(f"{name}: cannot resume {resume_path}: train_data is not the data it was trained on (as "
                         f"many samples, {num_samples}, but other labels or images); pass the run's train_data "
                         "(the same file as then: `--data` of robust-ops train)")
    # The checkpoint's optimizer and scheduler states replace the settings of those built here (a caller's
    # optimizer with another lr or momentum, a cosine schedule with another T_max would be ignored silently).
    # Checkpoints written before the settings were recorded pass.
    for key, what in (("optimizer_settings", "an optimizer"), ("scheduler_settings", "a scheduler"),
                      ("scheduler_parts", "a scheduler")):
        saved, now = state["config"].get(key), config[key]
        change = None if saved is None or now is None else _settings_change(saved, now)
        if change:
            raise ValueError(f"{name}: cannot resume {resume_path}: it was trained with {what} of {change[0]}, "
                             f"this call's has {change[1]} (the checkpoint's would replace them silently)")
    saved_groups, now_groups = state["config"].get("optimizer_groups"), config["optimizer_groups"]
    if saved_groups is not None and len(saved_groups) == len(now_groups):  # other counts: load_state_dict says so
        for i, (saved, now, group) in enumerate(zip(saved_groups, now_groups, optimizer.param_groups)):
            change = _settings_change(_unscheduled_group_settings(saved, group),
                                      _unscheduled_group_settings(now, group))
            if change:
                raise ValueError(f"{name}: cannot resume {resume_path}: it was trained with an optimizer whose "
                                 f"parameter group {i} had {change[0]}, this call's has {change[1]} (the "
                                 "checkpoint's would replace them silently)")
    # Checkpoints written before the defense's options were recorded pass.
    saved_options = state["config"].get("defense_options", defense_options)
    change = _settings_change(saved_options, defense_options)
    if change:
        changed = _changed_keys(saved_options, defense_options)
        raise ResumeMismatchError(name, resume_path, "defense_options",
                                  *({k: options[k] for k in changed if k in options}
                                    for options in (saved_options, defense_options)),
                                  f"{name}: cannot resume {resume_path}: it was trained with the {config['defense']} "
                                  f"defense's {change[0]}, this call's defense has {change[1]}; build the defense "
                                  f"with that run's options to continue it, or {_TRAIN_AFRESH}")
    if int(state["epoch"]) > epochs:
        raise ResumeMismatchError(name, resume_path, "epochs", int(state["epoch"]), epochs,
                                  f"{name}: cannot resume {resume_path}: it holds {int(state['epoch'])} epochs of "
                                  f"training, more than epochs={epochs}; pass epochs={int(state['epoch'])} or more "
                                  "(the run's total, not the epochs to add)")


def _load_resumed_state(name, resume_path, state, weights_model, optimizer, scheduler, scaler, defense):
    """The checkpoint ``state``'s weights, optimizer, scheduler, GradScaler and defense states loaded into this call's
    objects; a state that does not fit is a ValueError naming ``resume_path``."""
    try:
        weights_model.load_state_dict(state["model"])
    except RuntimeError as err:  # another architecture (a RUN_DIR without run.json resumed with another --model)
        raise ValueError(f"{name}: cannot resume {resume_path}: its weights do not fit this model "
                         f"({state_dict_mismatch(err)}); resume it with the model the run trained (its architecture, "
                         "classes, channels and image size)") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # torch's text names neither the checkpoint nor the fix
        raise ValueError(f"{name}: cannot resume {resume_path}: its optimizer state does not fit this call's "
                         f"optimizer ({err}); train the same parameters (requires_grad) in the same parameter "
                         "groups as that run did") from None
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    try:
        defense.load_state_dict(state["defense"])
    except ValueError as err:  # IMA's other eps_train: its own text names neither fit nor the checkpoint
        message = f"{name}: cannot resume {resume_path}: {err}"
        if isinstance(err, StateSettingError):  # another option's value: a caller words it as the options' refusal
            raise ResumeMismatchError(name, resume_path, "defense_options", {err.option: err.saved},
                                      {err.option: err.now}, message) from None
        raise ValueError(message) from None


def _continue_rng_streams(state, rank, seed, device):
    """This process's random streams (torch's, numpy's, python's, CUDA's) continued from the checkpoint ``state``, or
    seeded afresh where it holds none for this process."""
    rank_states = state.get("rng_ranks") or []
    # Each process continues its own streams. A checkpoint from fewer processes (one: rng_ranks None) has none for
    # this rank: rank 0 continues the checkpoint's, the others seed their own as at a fresh start -- rank 0's
    # for every process repeated its dropout masks and random starts on each one's share for the rest of the run.
    if rank < len(rank_states):
        _set_rng_state(rank_states[rank], device)
    elif rank == 0:
        _set_rng_state(state["rng"], device)
    else:
        _seed_rank_streams(seed, rank)


def _broadcast_buffers(model):
    """Rank 0's buffers (BatchNorm statistics) on every process, at the end of an epoch under DDP."""
    # DDP broadcasts rank 0's buffers only at its next forward: until then each process holds its own, which
    # validation, the next epoch's first attack (on the unwrapped module), the returned model and a resume (rank 0's
    # checkpoint) would otherwise disagree on.
    for b in model.buffers():
        flat = b if b.is_contiguous() else b.contiguous()
        dist.broadcast(flat, src=0)
        if flat is not b:
            b.copy_(flat)


class _EpochTotals:
    """An epoch's training metrics as its steps add them up: each metric's weighted sum and weight, in the order the
    batches first reported them, and the correct clean predictions with the samples they were counted over."""

    def __init__(self):
        self.sums, self.correct, self.scored = {}, 0, 0  # scored: samples of the batches that returned clean logits
        self.seen = {}  # samples in the batches that reported each metric (IMA has adv_acc only when it attacked)
        self.reported = []  # the metrics' order: a batch without adv_acc (IMA) may come first, see _merge_key_order

    def add(self, metrics, weights, n, correct):
        """One batch of ``n`` samples: its ``metrics`` (each weighted by ``weights.get(k, n)`` samples) and its count
        of ``correct`` clean predictions (None: the batch returned no clean logits)."""
        _merge_key_order(self.reported, list(metrics))
        for k, v in metrics.items():
            w = weights.get(k, n)
            if w:  # a mean over no sample (0 * nan would make the epoch's value nan)
                self.sums[k] = self.sums.get(k, 0.0) + v * w
                self.seen[k] = self.seen.get(k, 0) + w
        if correct is not None:
            self.correct += int(correct)
            self.scored += n  # not every sample: a defense may return logits for some batches only

    def sum_over_processes(self, world, device):
        """Under DDP, the sums of every process (each process's own before)."""
        # Processes may report different metrics (IMA's adv_acc only where it attacked something): sum over the union
        # of their keys, or the vectors would differ in length or be summed misaligned. Merged as one process merges
        # its batches' keys: the history's columns then come in its order.
        key_sets = [None] * world
        dist.all_gather_object(key_sets, [k for k in self.reported if k in self.sums])
        keys = []
        for key_set in key_sets:
            _merge_key_order(keys, key_set)
        totals = torch.tensor([float(self.correct), float(self.scored)]
                              + [self.sums.get(k, 0.0) for k in keys] + [self.seen.get(k, 0) for k in keys],
                              dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        self.reported, self.correct, self.scored = keys, int(totals[0]), int(totals[1])
        self.sums = {k: float(v) for k, v in zip(keys, totals[2:2 + len(keys)].tolist())}
        self.seen = {k: int(v) for k, v in zip(keys, totals[2 + len(keys):].tolist())}

    def row(self, epoch):
        """The history row of 0-based ``epoch`` so far: its number and the training metrics' means."""
        row = {"epoch": epoch + 1}
        row.update({f"train_{k}": self.sums[k] / max(self.seen[k], 1) for k in self.reported if k in self.sums})
        if self.scored:
            row["train_acc"] = self.correct / self.scored
        return row


def _non_finite_loss_error(name, defense, loss, own_bad, bad_loss, x, indices, at, where):
    """The NonFiniteLossError of a step whose loss (``bad_loss``), else extra gradients, are non-finite on some
    process; ``own_bad``: this process's two flags (loss, extra gradients), so the message says whether it is this
    process's, and names the batch's items whose inputs hold NaN or Inf; ``at``: the epoch and step; ``where``: the
    last good checkpoint."""
    own_loss, own_extra = own_bad.tolist()
    if bad_loss:
        value = float(loss.detach()) if loss.numel() == 1 else math.nan
        what = f"loss is {value}" if own_loss else "loss is non-finite on another process"
        bad_inputs = _non_finite_items("train_data", x, indices) if own_loss else None
        if bad_inputs:  # else it reads as a diverged run (lr, ...)
            what += f" ({bad_inputs}: check the data)"
        elif own_loss:  # what to check, as the other non-finite messages (design.md, Non-finite values)
            what += f" ({FINITE_INPUTS_HINT})"
    else:
        what = "extra gradients (its adversarial terms, returned as extra_grads) are non-finite" + (
            "" if own_extra else " on another process")
    return NonFiniteLossError(f"{name}: the {getattr(defense, 'name', 'defense')} {what} at {at}; stopped before "
                              f"updating the weights{where}")


def _out_dir_write_error(name, out_dir, existing):
    """The error that process 0 cannot write its files in ``out_dir`` (None where it can): by the CLI's --out rule
    (_files.out_dir_problem), ``existing``, out_dir or the folder it will be made in (None: nothing to check yet), is
    not writable or out_dir is a link to a folder that does not exist (its mkdir failed with a bare 'File exists'), or
    a folder sits where fit writes a file. Checked before training: else the first checkpoint fails, after a whole
    epoch of training."""
    if existing is None:
        return None
    problem = out_dir_problem(out_dir, staged=False)
    if problem is not None:
        way_on = "; pass a folder this process can write" if problem.startswith("cannot write") else ""
        return OSError(getattr(problem, "errno", None) or errno.ENOENT,
                       f"{name}: out_dir={os.fspath(out_dir)!r}: {problem}{way_on}")
    folder = next((Path(out_dir) / f for f in (CHECKPOINT_NAME, HISTORY_NAME, METRICS_CSV_NAME)
                   if (Path(out_dir) / f).is_dir()), None)
    if folder is not None:  # its replace fails too, naming the temporary file
        return IsADirectoryError(errno.EISDIR, f"{name}: {folder} is a folder, where fit writes a file; move it away "
                                 "or pass another out_dir")
    return None


def _save_best_model(out_dir, stopper, config, best_weights):
    """Write restore_best's ``out_dir/best_model.pt`` (atomically): the best epoch's weights, which load_weights and
    robust-ops eval read as they read a checkpoint (and fit refuses to resume)."""
    save_checkpoint(Path(out_dir) / BEST_MODEL_NAME, {
        "format": CHECKPOINT_FORMAT, "weights": "best", "epoch": stopper["best_epoch"], "val_loss": stopper["best"],
        "config": config, "model": best_weights})


def _resumed_best_weights(name, path, state):
    """restore_best's best weights from the checkpoint ``state`` being resumed (on CPU), None before any epoch set a
    best. One written without restore_best holds them only where its best epoch is its last one (its model); else
    the resume is refused (:func:`lost_best_epoch`)."""
    if state.get("best_model") is not None:
        return {k: v.to("cpu") for k, v in state["best_model"].items()}
    lost = lost_best_epoch(state)
    if lost is not None:
        raise LostBestEpochError(name, path, *lost)
    if (state.get("early_stopping") or {}).get("best_epoch") is None:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in state["model"].items()}


def lost_best_epoch(state):
    """(last epoch, best epoch) of a fit checkpoint ``state`` that holds no best weights (written without
    restore_best) and whose best epoch is not its last: a resume with restore_best could not hand that epoch's
    weights back. None where it could (best weights held, no best epoch yet, or the best epoch's are its model)."""
    stop = state.get("early_stopping")
    best_epoch = stop.get("best_epoch") if isinstance(stop, dict) else None
    if state.get("best_model") is not None or best_epoch is None or best_epoch == int(state["epoch"]):
        return None
    return int(state["epoch"]), best_epoch


# The submodules taken for the classifier head when warmup_params is None: torchvision's ResNet (fc), VGG and
# DenseNet and robust_ops' small_cnn (classifier), timm-style models (head)
HEAD_NAMES = ("fc", "classifier", "head")


def _check_schedule_options(name, early_stopping, warmup_epochs, warmup_params, val_data, restore_best=False):
    """(early_stopping, warmup_epochs) checked: a patience >= 1 that has a validation set to monitor, a warm-up of
    >= 0 epochs, no ``warmup_params`` without a warm-up and no ``restore_best`` without early stopping (each would
    be ignored)."""
    if restore_best and early_stopping is None:  # the best epoch is early stopping's state
        raise ValueError(f"{name}: restore_best=True hands back the weights of the epoch with the best val_loss, "
                         "which early stopping tracks, and early_stopping=None; pass early_stopping=N (a patience) "
                         "or leave restore_best False")
    if early_stopping is not None:
        early_stopping = check_int(name, "early_stopping", early_stopping, 1)
        if val_data is None:
            raise ValueError(f"{name}: early_stopping={early_stopping} stops on the validation loss and needs "
                             "val_data; pass val_data or leave early_stopping None")
    # more than epochs: a run that trains the head alone, or the first part of a longer one (epochs may grow on resume)
    warmup_epochs = check_int(name, "warmup_epochs", warmup_epochs, 0)
    if warmup_params is not None and not warmup_epochs:
        raise ValueError(f"{name}: warmup_params={warmup_params!r} names what the warm-up trains, and "
                         "warmup_epochs=0; pass warmup_epochs or leave warmup_params None")
    return early_stopping, warmup_epochs


def warmup_head(name, model, params, warmup_params):
    """[(name, parameter)] of the trainable parameters the warm-up trains: those of the modules ``warmup_params``
    names (a module name or a sequence of them), or of the model's first ``HEAD_NAMES`` submodule. A name that is
    no module of the model, a head without trainable parameters, or one holding all of them is refused."""
    modules = dict(model.named_modules())
    if warmup_params is None:
        found = next((n for n in HEAD_NAMES if n in modules), None)
        if found is None:
            top = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"{name}: warmup_epochs trains the classifier head alone, and the model has no "
                             f"{', '.join(HEAD_NAMES)} submodule (its modules: {top}); pass warmup_params= the head's "
                             "module name(s)")
        names = [found]
    else:
        names = [warmup_params] if isinstance(warmup_params, str) else warmup_params
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"{name}: expected warmup_params to be a module name or a list of them (e.g. 'fc'), got "
                            f"{warmup_params!r}")
        unknown = [n for n in names if n not in modules or not n]
        if unknown:
            top = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"{name}: warmup_params names no module of the model: {', '.join(map(repr, unknown))} "
                             f"(its modules: {top}; nested ones as 'classifier.3')")
    trainable = {id(p) for p in params}
    head, seen = [], set()
    for module_name in names:
        for n, p in modules[module_name].named_parameters(prefix=module_name):
            if id(p) in trainable and id(p) not in seen:
                seen.add(id(p))
                head.append((n, p))
    if not head:
        raise ValueError(f"{name}: the warm-up's head {', '.join(names)} has no trainable parameters; name the "
                         "module(s) to train alone with warmup_params")
    if len(head) == len(params):
        raise ValueError(f"{name}: the warm-up's head {', '.join(names)} holds every trainable parameter, so the "
                         "warm-up would train the whole model; name the classifier head alone with warmup_params")
    return head


def _rank0_value(value, device):
    """Process 0's ``value`` (a float) on every process. Each process validates itself, and the same weights may
    score differently in the last bits on another node's CPU (or on another validation share), so what early
    stopping and ``ReduceLROnPlateau`` decide on is rank 0's val_loss: every process then stops after the same epoch
    and keeps the same learning rate (DDP averages gradients, not weights: other rates would part them silently)."""
    shared = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(shared, src=0)
    return float(shared.item())


def _early_stopping_step(stopper, value, epoch):
    """Updates ``stopper`` (fit's early-stopping state) with epoch ``epoch``'s (0-based) monitored value (under DDP
    rank 0's, ``_rank0_value``): a strictly lower one is the new best, else one more bad epoch; ``patience`` of them
    in a row stop the run."""
    if stopper["best"] is None or value < stopper["best"]:
        stopper.update(best=value, best_epoch=epoch + 1, bad_epochs=0)
        return
    stopper["bad_epochs"] += 1
    if stopper["bad_epochs"] >= stopper["patience"]:
        stopper["stopped_epoch"] = epoch + 1
        stopper["reason"] = (f"{stopper['monitor']} did not improve for {counted(stopper['patience'], 'epoch')} "
                             f"after its best, {stopper['best']:.6g} at epoch {stopper['best_epoch']}")


# the checkpoint's config keys that fit's comparison of the processes' settings names otherwise
_AGREED_NAMES = {"train_data_sha256": "the SHA-256 of train_data"}


def _check_processes_agree(name, values, rank, world, fix, fixes=None, error=None):
    """Refuse, on every process, settings that differ between the processes (one all_gather_object): processes
    given other seeds cut other permutations into the global batches (samples seen twice or never, silently);
    other lengths or batch sizes take other numbers of steps (a hang in a collective); processes resuming different
    checkpoints train out of step. ``values``: {what: this process's value}; ``fix``: what to do instead, unless
    ``fixes`` ({what: fix}) names another for that setting. ``error``: what this process's own checks raised before
    (a _HeldError's): it raises it here, and the others a RuntimeError naming it (the first failing process's)."""
    gathered = [None] * world
    dist.all_gather_object(gathered, {"error": None if error is None else _one_line(error), "values": values})
    if error is not None:
        raise error
    failed = next(((r, g["error"]) for r, g in enumerate(gathered) if g["error"] is not None), None)
    if failed is not None:
        raise _stopped_here_too(f"{name}: process {failed[0]} failed at the start: {failed[1]}")
    gathered = [g["values"] for g in gathered]
    keys = list(dict.fromkeys(key for g in gathered for key in g))  # a defense option one process lacks: "unset"
    for key in keys:
        seen = [g.get(key, "unset") for g in gathered]
        if len(set(map(repr, seen))) > 1:
            each = ", ".join(f"process {r}: {v}" for r, v in enumerate(seen))
            raise ValueError(f"{name}: the processes differ in {key} ({each}; this is process {rank}); "
                             f"{(fixes or {}).get(key, fix)}")


class _HeldError:
    """Under DDP, holds an exception raised inside the ``with`` block (fit's checks of its arguments: one process
    given other ones fails there alone) for the processes' next comparison of their settings
    (``_check_processes_agree(..., error=held.error)``), where every process stops naming it; raised alone, it left
    the others waiting in that comparison until its process exited or the group's timeout. Lets it through in one
    process, and a KeyboardInterrupt or SystemExit always. The block's later statements are skipped: the code after
    it may use only what the comparison needs, set beforehand."""

    def __init__(self, world):
        self.world, self.error = world, None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if self.world == 1 or not isinstance(error, Exception):
            return False
        self.error = error
        return True


def _one_line(error):
    """'Type: message' on one line: how one process's error is named on the others."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def _stopped_here_too(what):
    """The RuntimeError of a process that another process's failure (``what``, named there) stops: its text ends
    '; stopped here too', and :func:`stopped_by_another_process` tells a caller that it is a one-line report, not a
    bug of this process (robust-ops train printed it as a traceback under torchrun)."""
    error = RuntimeError(f"{what}; stopped here too")
    error.stopped_by_another_process = True
    return error


def stopped_by_another_process(error):
    """Whether ``error`` is fit's report that another process failed (or gave up waiting), which stopped this one."""
    return isinstance(error, RuntimeError) and getattr(error, "stopped_by_another_process", False) is True


def _raise_on_every_process(error, world, device, elsewhere, failures):
    """Raise ``error`` (None: nothing failed here) so that every process stops together: under DDP a lone raise
    leaves the others waiting in their next collective. The processes without an error raise ``elsewhere``.
    ``failures`` (an _OneProcessFailures) guards the exchange against a process that failed before reaching it."""
    if world > 1:
        failed = torch.tensor([float(error is not None)], device=device)
        with failures:
            dist.all_reduce(failed)
        if error is None and failed.item() > 0:
            raise _stopped_here_too(f"{elsewhere} (its error names the problem)")
    if error is not None:
        raise error


class _OneProcessFailures:
    """Under DDP, an error raised on one process only (inside a defense, an attack, backward: code that cannot agree
    on it with a flag exchange first, because the others are then inside another collective) is recorded in the
    process group's store, keyed by this fit call; a process whose collective then fails finds the record and raises
    one line naming the failing process and its error. The failing process raises its own error unchanged.

    A collective that waited past the group's timeout with no such record (a process hung, or died without a
    record: killed) is a CollectiveTimeoutError naming this process, the timeout and where; it is noted in the store,
    and a process whose collective fails later (the slow one) raises one line naming the process that gave up.

    Use as ``with failures:`` around code that runs collectives or may fail on one process; set ``where`` (the epoch
    and step) as the run goes. A collective fails when the failing process exits, destroys the group, or at the
    group's timeout: measured with gloo (torch 2.14), ``ProcessGroup.abort()``/``shutdown()`` do not release the
    others, ``destroy_process_group()`` does unless something still holds the group (a kept exception's traceback
    holds the DDP wrapper). No cost per step beyond the ``with``: the store is read and written only after an
    exception. ``timeout_s``, ``timeout_source``: the group's timeout and who set it (CollectiveTimeoutError's)."""

    def __init__(self, name, rank, world, device, timeout_s=None, timeout_source="caller"):
        self.name, self.rank, self.world = name, rank, world
        self.timeout_s, self.timeout_source = timeout_s, timeout_source
        self.where = "the start"
        self.store = self.key = None
        if world > 1:
            self.store = dist.group.WORLD.get_group_store()
            # one key per fit call, the same on every process: an earlier fit's record must not name this one's
            call = torch.tensor([self.store.add("robust_ops.fit.calls", 1) if rank == 0 else 0], device=device)
            with self:  # fit's first collective: a process that never comes is a timeout here
                dist.broadcast(call, src=0)
            self.key = f"robust_ops.fit.{int(call.item())}.error"

    def __enter__(self):
        return self

    def _recorded(self, key):
        return self.store.get(key).decode() if self.store.check([key]) else None

    def __exit__(self, kind, error, traceback):
        if self.world == 1 or error is None or not isinstance(error, Exception):
            return False  # a KeyboardInterrupt or SystemExit is not this process failing on its own
        recorded = noted = None
        reachable = self.key is not None
        if reachable:
            try:  # the store lives in rank 0's process unless torchrun's agent holds it: rank 0 may be gone
                recorded, noted = self._recorded(self.key), self._recorded(f"{self.key}.timeout")
            except Exception:  # noqa: BLE001 -- no record to be had (nor to leave): the error stands unchanged
                reachable = False
        message = _one_line(error)
        if recorded is not None:
            # A failed collective raises a RuntimeError: any other error, or the one recorded (a defense failing on
            # every process), is this process's own.
            if isinstance(error, RuntimeError) and not recorded.endswith(f": {message}"):
                raise _stopped_here_too(f"{self.name}: {recorded}") from error
            return False
        if _collective_timed_out(error):  # no process recorded a failure: one hung (or was killed)
            timeout = CollectiveTimeoutError(self.name, self.rank, self.timeout_s, self.timeout_source, self.where)
            if reachable:
                try:  # for the late process, whose collective then fails: it reads who gave up waiting
                    self.store.compare_set(f"{self.key}.timeout", "", timeout.waited())
                except Exception:  # noqa: BLE001 -- this process's own error matters more than the note of it
                    pass
            raise timeout from error
        if noted is not None and isinstance(error, RuntimeError):  # the failed collective of a process too late
            raise _stopped_here_too(f"{self.name}: {noted}") from error
        if not reachable:
            return False
        try:  # compare_set: when two processes fail at once, the first record stays
            self.store.compare_set(self.key, "", f"process {self.rank} failed at {self.where}: {message}")
        except Exception:  # noqa: BLE001 -- this process's own error matters more than the record of it
            pass
        return False


def check_trainable_precision(name, params, how="model.float(), float32 data; amp=True on CUDA computes in float16"):
    """Refuse float16 / bfloat16 trainable parameters: torch's optimizers update weights in their own dtype, without
    float32 master copies (float16: Adam's eps 1e-8 is 0, NaN weights where a gradient is 0; both: updates below the
    weights' resolution round away). ``how``: the caller's way to train float32 weights (fit's default names its
    amp=True; a caller without amp, simclr, gives its own)."""
    half = next((p.dtype for p in params if p.dtype in HALF_DTYPES), None)
    if half is not None:
        raise ValueError(f"{name}: the model's trainable parameters are {half} (model.half() or .bfloat16()?); the "
                         "optimizer would update them in that precision (float16: Adam's eps 1e-8 is 0, NaN weights; "
                         f"updates below the weights' resolution are lost); train float32 weights ({how}) and convert "
                         "the trained model")


class ResumeMismatchError(ValueError):
    """fit refusing to resume a checkpoint trained with another setting than this call's (see ``fit``'s resume): the
    message names the checkpoint, both values and the fix in fit's argument names. ``key`` (the checkpoint config's
    name of the setting: "lr", "defense_class", ...; "epochs" for a checkpoint holding more epochs than ``epochs``),
    ``saved`` (the checkpoint's value; its epochs), ``now`` (this call's) and ``path`` (the checkpoint) let a caller
    say it in its own words (the command line's flags, as ``robust-ops train --resume`` does)."""

    def __init__(self, name, path, key, saved, now, message):
        self.facts = (name, path, key, saved, now, message)
        self.path, self.key, self.saved, self.now = path, key, saved, now
        super().__init__(message)

    def __reduce__(self):  # with the instance's __dict__, as a plain exception's: its __notes__ and attributes
        return type(self), self.facts, self.__dict__


class LostBestEpochError(ValueError):
    """fit(restore_best=True) resuming a checkpoint trained without it whose best epoch is not its last (see
    :func:`lost_best_epoch`): the best epoch's weights are gone. ``last_epoch``, ``best_epoch``: for a caller's own
    words (the command line's ``--restore-best``), which then needs no read of the checkpoint before fit's. fit
    raises it with ``name`` (the caller, "fit") and ``path`` (the checkpoint resumed)."""

    def __init__(self, name, path, last_epoch, best_epoch):
        self.facts = (name, path, last_epoch, best_epoch)
        self.last_epoch, self.best_epoch = last_epoch, best_epoch
        super().__init__(f"{name}: cannot resume {path} with restore_best=True: it was trained without it, so it holds "
                         f"the weights of its last epoch ({last_epoch}), not of its best one ({best_epoch}); resume "
                         "with restore_best=False, or train again from the start with restore_best=True")

    def __reduce__(self):  # with the instance's __dict__, as a plain exception's: its __notes__ and attributes
        return type(self), self.facts, self.__dict__


class OneSampleBatchError(ValueError):
    """A training step's batch held one sample, which the model's training-mode batch norm cannot normalize: the
    message says why and the fix (torch's own error names neither fit's batch nor a remedy, and a one-sample last
    batch fails only after the rest of the epoch has run) in fit's argument names; :meth:`reworded` in a caller's
    (the command line's ``--batch-size``). fit raises it with ``name`` (the caller, "fit"), ``num_samples`` (the
    training samples, len(train_data)), ``batch_size`` (fit's), ``global_n`` (the global batch's samples),
    ``world`` (the process count) and ``where`` (the step, "epoch 1, step 3")."""

    def __init__(self, name, num_samples, batch_size, global_n, world, where):
        self.facts = (name, num_samples, batch_size, global_n, world, where)
        super().__init__(self.reworded())

    def __reduce__(self):  # with the instance's __dict__, as a plain exception's: its __notes__ and attributes
        return type(self), self.facts, self.__dict__

    def reworded(self, batch_option="batch_size", data_name="train_data"):
        """The error's message naming the batch size ``batch_option`` (default "batch_size", fit's argument; the
        command line's "--batch-size") and the training data ``data_name`` (default "train_data")."""
        name, num_samples, batch_size, global_n, world, where = self.facts
        each = "every process's share of every batch" if world > 1 else "every batch"
        if world > 1:
            why = f"this process's share of a global batch of {global_n} over {world} processes is 1 sample"
        elif num_samples == 1:
            why = f"{data_name} has 1 sample"
        elif batch_size == 1:
            why = f"{batch_option}=1"
        else:
            why = (f"{num_samples} samples in batches of {batch_size} leave a last batch of 1 sample "
                   f"({num_samples} % {batch_size} == 1)")
        return (f"{name}: the model's training-mode batch-norm layers cannot normalize a batch of 1 sample at "
                f"{where}: {why}; pass a {batch_option} that leaves {each} at least 2 samples, or more training "
                "samples")


def _initialize_lazy_modules(name, model, train_data, device):
    """Create the parameters of ``model``'s lazy modules (nn.LazyLinear, nn.LazyBatchNorm1d, ...) with one eval-mode
    forward, without gradients, on train_data's first items (BatchNorm statistics untouched): torch makes them in the
    first forward, and fit reads the weights before that (the optimizer's parameters, the finite-weights watch, a
    resume's load), where an uninitialized one was torch's "Attempted to use an uninitialized parameter". A lazy
    layer that forward does not use stays uninitialized, which can be neither trained nor saved: refused, named."""
    if not any(nn.parameter.is_lazy(t) for t in itertools.chain(model.parameters(), model.buffers())):
        return
    x, _, _ = _split_batch(name, _collate(name, train_data, range(min(2, len(train_data)))), False)
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            forward_naming_input_mismatch(name, "train_data", model, x.to(device))
    finally:
        for module, training in modes:
            module.training = training
    left = [f"{n or 'the model'} ({type(m).__name__})" for n, m in model.named_modules()
            if any(nn.parameter.is_lazy(t) for t in itertools.chain(m.parameters(recurse=False),
                                                                     m.buffers(recurse=False)))]
    if left:
        raise ValueError(f"{name}: the model's lazy layer {', '.join(left[:4])}{' and more' * (len(left) > 4)} is "
                         "still uninitialized after a forward on train_data's first items: the model's forward does "
                         "not use it, so its weights can be neither trained nor saved; remove it from the model, or "
                         "build it with its sizes (nn.Linear, nn.BatchNorm1d, ... in place of the Lazy one)")


def _infer_num_classes(model, x):
    """(number of classes, whether the model outputs single logits) from one eval-mode forward on a couple of samples
    (BatchNorm statistics untouched)."""
    with torch.no_grad(), use_model_mode(model, "eval"):
        out = check_output("fit", forward_naming_input_mismatch("fit", "train_data", model, x[:2]), min(2, x.shape[0]))
    if looks_like_probabilities(out):  # trained on silently: cross-entropy's own softmax on top saturates the loss
        raise ValueError("fit: the model's outputs are non-negative and sum to 1 per sample, so they look like "
                         "probabilities (a final softmax); fit's losses and the defenses' attacks take logits and "
                         "apply their own softmax, which saturates on probabilities: remove the model's final softmax "
                         "(predictions and evaluate need only the logits)")
    return num_classes_of(out), is_single_logit(out)


def _declared_classes(dataset):
    """The class names ``dataset`` declares in a ``classes`` list (torchvision's ImageFolder, MNIST, CIFAR10, ...),
    looked up through ``Subset`` and ``IndexedDataset`` (``.dataset``); None where it declares none, or where a
    ``target_transform`` may map its labels onto other classes."""
    for _ in range(8):  # a Subset of a Subset ...: a few levels, never a cycle
        if getattr(dataset, "target_transform", None) is not None:
            return None
        classes = getattr(dataset, "classes", None)
        if isinstance(classes, (list, tuple)) and len(classes) >= 2:
            return classes
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return None
    return None


def _check_declared_classes(name, train_data, num_classes):
    """Refuse a model that scores more classes than ``train_data`` declares (its ``classes``): its labels passed the
    range check (< K), so a torchvision resnet18 built without num_classes trained 1000-way on a 2-class set, and
    only evaluate refused it afterwards. Fewer is not refused: a Subset of some of a folder's classes (the first
    ones, so its labels fit) trains a model of those. Checked once, at the first batch (no read of the data)."""
    classes = _declared_classes(train_data)
    if classes is not None and num_classes > len(classes):
        raise ValueError(f"{name}: the model scores {num_classes} classes (a single logit counts as 2), but train_data "
                         f"declares {len(classes)} in its classes ({listing(classes, cap=6)}); build it for this "
                         f"dataset's classes (torchvision's models: num_classes={len(classes)})")


def _snapshot(state):
    """A copy of a state dict whose tensors no longer alias the defense's."""
    if torch.is_tensor(state):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_snapshot(v) for v in state)
    return state


def _any_non_finite(tensors):
    """A 0-d bool tensor: does any of ``tensors`` (or None; None entries -- MIRST's extra gradient of a parameter
    no forward used -- skipped) hold a NaN or Inf (one device sync for all of them)."""
    tensors = [t for t in tensors or () if t is not None]
    if not tensors:
        return torch.tensor(False)
    return torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any()


def _last_good_checkpoint(last_ckpt):
    """The end of a NonFiniteLossError's message: where the last good state is."""
    return f" (last good checkpoint: {last_ckpt})" if last_ckpt else " (no checkpoint written yet)"


def _float_tensors(model, names=None):
    """(name, tensor) of ``model``'s floating-point parameters and buffers (those in ``names`` only, if given)."""
    return [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers())
            if t.is_floating_point() and (names is None or n in names)]


def _finite_tensor_names(model):
    """The names of the model's floating-point parameters and buffers that are finite now: the ones
    _check_finite_weights watches (a buffer holding -inf by design, an attention mask, is not an overflow)."""
    return {n for n, t in _float_tensors(model) if bool(torch.isfinite(t.detach()).all())}


def _check_finite_weights(name, model, watched, epoch, where):
    """A NonFiniteLossError naming the tensors of ``watched`` (names of parameters and floating-point buffers) that
    hold NaN or Inf after ``epoch`` (0-based) -- before validation and the checkpoint; one device sync when all are
    finite."""
    tensors = _float_tensors(model, watched)
    if not tensors or not bool(_any_non_finite([t for _, t in tensors])):
        return
    bad = [n for n, t in tensors if not bool(torch.isfinite(t.detach()).all())]
    shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    raise NonFiniteLossError(f"{name}: the model's weights hold NaN or Inf after epoch {epoch + 1} (in {shown}), "
                             "though every step's loss and gradients were finite: an update overflowed (the "
                             "optimizer's step -- a learning rate too large? -- or batch norm's running statistics); "
                             f"stopped before validating and saving them{where}")


def _check_every_parameter_got_a_gradient(name, model, where):
    """Under DDP a trainable parameter the loss did not use left its gradient bucket unreduced: the step applied the
    bucket's other gradients unaveraged, and the next forward raised DDP's advice to pass find_unused_parameters=True
    to a DistributedDataParallel that fit builds. Refused before the step (the same on every process)."""
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        shown = ", ".join(unused[:4]) + (f" (and {len(unused) - 4} more)" if len(unused) > 4 else "")
        raise ValueError(f"{name}: under DDP every trainable parameter must take part in the loss; {shown} got no "
                         f"gradient at {where}: freeze them (requires_grad_(False)) or leave them out of the model")


def _add_extra_grads(name, params, extra_grads, scale, world):
    order = "one per [p for p in model.parameters() if p.requires_grad], in that order"
    if len(extra_grads) != len(params):
        raise ValueError(f"{name}: the defense returned {len(extra_grads)} extra gradients for {len(params)} trainable "
                         f"parameters; expected {order}")
    for i, (p, g) in enumerate(zip(params, extra_grads)):
        if g is None:  # a parameter the adversarial terms did not reach: its .grad stays as the loss left it
            continue
        if not torch.is_tensor(g) or g.shape != p.shape:  # add_ would broadcast a [1] or [C] tensor silently
            got = f"shape {tuple(g.shape)}" if torch.is_tensor(g) else type(g).__name__
            raise ValueError(f"{name}: the defense's extra gradient {i} has {got}, its parameter shape "
                             f"{tuple(p.shape)}; expected {order}")
    if world > 1:  # one all-reduce of the same layout in every process (DDP refuses unused parameters anyway)
        extra_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, extra_grads)]
    extra = [None if g is None else g.detach() * scale if scale != 1.0 else g.detach().clone() for g in extra_grads]
    _all_reduce_mean_(extra, world)
    for p, g in zip(params, extra):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.to(p.dtype)
        else:
            p.grad.add_(g.to(p.grad.dtype))


def _merge_key_order(order, keys):
    """Adds to the list ``order`` the keys of ``keys`` it lacks, each right after the key before it in ``keys`` (first
    when it is first there), and returns ``order``. A metric some batches lack (IMA's adv_acc and crossed, of a batch
    with nothing attacked) then takes its place in the defense's order whichever batch came first; appended when first
    met, metrics.csv's columns depended on it and differed between one process and DDP, whose process 0 may have no
    such batch first."""
    for i, k in enumerate(keys):
        if k not in order:
            order.insert(order.index(keys[i - 1]) + 1 if i else 0, k)
    return order


def _write_metrics(out_dir, history):
    keys = []
    for row in history:
        _merge_key_order(keys, list(row))

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in keys})

    replace_atomically(out_dir / METRICS_CSV_NAME, write_csv, newline="")
    replace_atomically(out_dir / HISTORY_NAME, lambda f: json.dump(
        [{k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None) for k, v in row.items()}
         for row in history], f, indent=1))

