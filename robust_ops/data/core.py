"""Dataset containers shared by every loader, and the one entry point ``load_dataset``."""

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

from .._options import MAX_SEED, check_int, counted, label_dtype_fix
from .._warn import warn


class DataError(ValueError):
    """A dataset could not be found, read or validated. The message names the file or spec at fault; ``arg`` names
    the keyword argument at fault ("size", "classes") when it is one, as ``size=`` in the message, so the command
    line can name its flag instead (``--size``)."""

    def __init__(self, message, arg=None):
        super().__init__(message)
        self.arg = arg


@dataclass
class DatasetInfo:
    """What a model and the metrics need to know about a dataset.

    name: the dataset's name (a MedMNIST set's, the folder's or the CSV's stem). num_classes: K, labels 0..K-1.
    in_channels, image_size: the inputs' channels and side length in pixels (features [N, D]: D and 0).
    class_names: one name per label, label 0 first. source: where the data came from, for the reports.
    extra: more fields for results.json's ``dataset`` (a loader's ``excluded_labels``, ``class_counts``, ...).
    positive_class: the class whose recall is "sensitivity" (e.g. 0 = malignant in BreastMNIST); None for
        multi-class sets, where per-class metrics are macro-averaged.
    synthetic: True for generated data; every report and results.json says so.
    value_range: the range inputs live in (attacks clip to it); images are always (0, 1).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    class_names: tuple
    positive_class: int = None
    synthetic: bool = False
    value_range: tuple = (0.0, 1.0)
    source: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self):
        """The fields as a JSON-ready dict (tuples as lists, ``extra``'s entries merged in): results.json's
        ``dataset``."""
        return {
            "name": self.name, "num_classes": self.num_classes, "in_channels": self.in_channels,
            "image_size": self.image_size, "class_names": list(self.class_names),
            "positive_class": self.positive_class, "synthetic": self.synthetic,
            "value_range": list(self.value_range), "source": self.source, **self.extra,
        }

    @property
    def display_name(self):
        return f"{self.name} (synthetic)" if self.synthetic and "synthetic" not in self.name else self.name


@dataclass
class DatasetSplits:
    """train / val / test TensorDatasets of float inputs and int64 labels, each with ``classes`` (the class names, as
    torchvision's datasets have), plus the DatasetInfo. ``groups``: for a grouped split (a CSV split by ``lesion_id``
    or another column, ``info.extra["split_by"]``) the (train, val, test) arrays of each sample's group key, which
    :func:`~robust_ops.data.cross_validation` keeps in one fold; else None."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    info: DatasetInfo
    groups: tuple = None

    def __post_init__(self):
        # each split declares its classes as torchvision's datasets do: fit refuses a model scoring more of them. Only
        # the plain containers the loaders make: a dataset of the caller's (an ImageFolder) keeps its own classes
        if len(self.info.class_names) == self.info.num_classes:
            for split in (self.train, self.val, self.test):
                if isinstance(split, (TensorDataset, Subset)):
                    split.classes = list(self.info.class_names)

    def __iter__(self):  # allows ``train, val, test, info = load_dataset(...)``
        return iter((self.train, self.val, self.test, self.info))


def physical_memory():
    """This machine's memory in bytes, or None where the OS does not tell (the check below is then skipped)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_images_fit(where, n, size, channels=1, extra=0):
    """Refuse, before anything is read or drawn, ``n`` images of ``size`` x ``size`` that would not fit as float32
    even in all of this machine's memory (plus ``extra`` bytes of working space): a typo such as ``--size 22400``
    ended in numpy's or Pillow's MemoryError traceback, or in the kernel's kill, after minutes of reading."""
    total, need = physical_memory(), 4 * n * channels * size * size + extra
    if total and need > total:
        raise DataError(f"{where}: {counted(n, 'image')} of {size}x{size} pixels take at least "
                        f"{need / 2 ** 30:,.1f} GiB as float32, more than this machine's {total / 2 ** 30:.1f} GiB "
                        "of memory; give a smaller size=", arg="size")


def images_to_tensor(images, source):
    """uint8 (N, H, W) or (N, H, W, C) images, C 1 or 3 -> float32 [N, C, H, W] in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        if images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
            # the axes named: PyTorch's (N, C, H, W) saved as it is, whose users were left to work out the order
            raise DataError(f"{source}: images of shape {images.shape} look channels-first; expected (N, H, W) or "
                            "(N, H, W, C) -- transpose them to channels-last, images.transpose(0, 2, 3, 1)")
        if images.shape[3] not in (1, 3):  # else a 3D volume (N, D, H, W) would load as D-channel 2D images
            # RGBA and gray + alpha (as PNGs converted with their alpha channel hold them) were told only of volumes
            alpha = {4: "RGBA images? drop the alpha channel, images[..., :3], ",
                     2: "grayscale + alpha images? keep the gray channel, images[..., 0], "}.get(images.shape[3], "")
            raise DataError(f"{source}: images of shape {images.shape} have {images.shape[3]} channels; expected "
                            f"(N, H, W) or (N, H, W, C) with C 1 or 3 -- {alpha}"
                            f"{'or ' if alpha else ''}save 3 (RGB) or 1 (grayscale) channels "
                            "(3D volumes such as MedMNIST3D's (N, D, H, W) are not supported)")
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{source}: expected images of shape (N, H, W) or (N, H, W, C), got {images.shape}")
    if images.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    elif np.issubdtype(images.dtype, np.floating):
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{source}: float images contain NaN or infinite values "
                            f"({counted(int((~torch.isfinite(x)).sum()), 'pixel')})")
        if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
            lo, hi = float(x.min()), float(x.max())
            # say how to get there: 0-255 floats (numpy's astype(float)), 12- or 16-bit intensities, an overshoot of
            # resampling and mean / std normalized pixels (ImageNet's statistics) are what such files hold, and the
            # attacks' ball and clip range are in [0, 1] pixels. The rule is the attacks' and evaluate's
            # (pixel_scale): a dark 0-255 set ([0, 8]) was told to clip, a 0-255 one overshooting ([0, 262]) 12- or
            # 16-bit, a resampling's small negatives ([-0.03, 1.04]) a mean/std normalization
            from ..attacks.context import HOUNSFIELD_WINDOWS, hounsfield_shift_fix, past_bound, pixel_scale

            kind, scale = pixel_scale(lo, hi, 0.0, 1.0)
            then = f" (then np.clip(images, 0, 1) for the overshoot past {scale})" if scale and hi > scale else ""
            if kind == "8-bit":
                fix = f"divide them by 255{then} or store them as uint8"
            elif kind == "high-bit":
                fix = ("12- or 16-bit intensities? divide them by their scale's top (4095 for 12 bits, 65535 for "
                       "16) or store them as 8-bit images")
            elif kind == "dark":
                fix = ("a dark set of 0-255 pixels? divide them by 255 or store them as uint8; else scale them to "
                       "[0, 1] pixels -- clipping would wipe them out: the attacks' radii and clip range are in "
                       "[0, 1] pixels")
            elif kind == "overshoot":
                fix = ("clip an overshoot of rounding or resampling (np.clip(images, 0, 1)), or scale them to [0, 1] "
                       "pixels: the attacks' radii and clip range are in [0, 1] pixels")
            elif kind == "hounsfield":  # CT: a mean/std normalization's fix left them outside [0, 1]
                fix = ("CT Hounsfield units? window them onto [0, 1] pixels: (np.clip(images, lo, hi) - lo) / "
                       f"(hi - lo) for the window [lo, hi] they are read in ({HOUNSFIELD_WINDOWS})"
                       + hounsfield_shift_fix(lo, SHIFT)  # the attacks' and evaluate's words
                       + " -- the attacks' radii and clip range are in [0, 1] pixels")
            elif lo >= 0:  # past every bit depth's top
                fix = "scale them to [0, 1] pixels: the attacks' radii and clip range are in [0, 1] pixels"
            else:
                fix = ("store the pixels in [0, 1], not normalized by a mean and std: normalize inside the model "
                       "(robust_ops.attacks.Normalized), as the attacks' radii and clip range are in [0, 1] pixels")
            # in as many digits as show them past [0, 1] (at 4, a resampling's 1.00001 read "got [0, 1]"), as the
            # attacks' and evaluate's refusals show them
            raise DataError(f"{source}: float images must lie in [0, 1], got [{past_bound(lo, 0.0, -1)}, "
                            f"{past_bound(hi, 1.0, 1)}]; {fix}")
    else:
        fix = _integer_images_fix(images)
        raise DataError(f"{source}: expected uint8 or float images, got dtype {images.dtype}{fix}")
    return x


# The fix for signed intensities that are no normalization: shifted and scaled onto [0, 1] as one set
SHIFT = "(images.astype(np.float32) - lo) / (hi - lo)"
SHIFT_FIX = f"{SHIFT}, lo and hi the lowest and highest value of every split together"


# The widest span of a 16-bit set above 14 bits said to be in a narrow band far from 0: 13 bits (32 of 255 grey
# levels), an offset added to 12-bit data (MATLAB's im2uint16 adds 32768 to signed CT Hounsfield units: [31744, 35839])
NARROW_16_BIT_SPAN = (1 << 13) - 1


# The fix for binary images (0 and 1) in an integer dtype: as uint8 they are 0 and 1 of 255
BINARY_IMAGES_FIX = ("[0, 1] pixels? store them as floats, images.astype(np.float32) (as uint8 they would be 0 and 1 "
                     "of 255, black)")


def check_not_binary_uint8(images, source):
    """Refuses uint8 images (``images``: a dict {name: array}, each split's) whose largest value is 1: binary images,
    read as 0 and 1 of 255 (black), which loaded without a word, as did those stored so by the int64 0/1 images'
    hint until 2026-12-07. All-zero arrays pass. Each uint8 split is checked on its own, float splits do not count:
    a uint8 train split of 0 and 1 beside float val and test splits, or beside uint8 ones of 0-255, loaded black
    where they did not, without a word, until 2026-12-07."""
    tops = {name: int(a.max()) for name, a in images.items() if a.dtype == np.uint8 and a.size}
    binary = [name for name, top in tops.items() if top == 1]
    if binary and len(binary) == len(tops):
        raise DataError(f"{source}: every uint8 image holds values 0 and 1 only; {BINARY_IMAGES_FIX}")
    if binary:
        others = ", ".join(f"{name} up to {top}" for name, top in tops.items() if top != 1)
        raise DataError(f"{source}: every uint8 image of {', '.join(binary)} holds values 0 and 1 only ({others}); "
                        f"{BINARY_IMAGES_FIX}")


def _integer_images_fix(images):
    """The fix for integer images of another dtype than uint8, by their values: "convert them to uint8", all it
    said, wrapped 12-bit CT's uint16 values modulo 256 into noise that loaded without a word. Each fix keeps what the
    values hold: past 8 bits (a uint32's or int64's 17 bits as a uint16's 12) divided by their bit depth's top, signed
    bytes read back, small signed values (a mean/std normalization rounded) stored from before it, other signed ones
    shifted and scaled, where until 2026-12-07 these were told "convert them to uint8", which wraps each of them."""
    generic = ": convert them to uint8 (0-255) or to floats in [0, 1]"
    if images.dtype == np.bool_:  # a mask: told the generic fix, its astype(np.uint8) is refused as binary (black)
        return f"; {BINARY_IMAGES_FIX}"
    if np.issubdtype(images.dtype, np.complexfloating):  # MRI's complex images: the generic fix's astype(np.float32)
        # keeps the real part alone (numpy's ComplexWarning), a signed part of the signal
        return ("; complex values (MRI data)? store their magnitude as floats in [0, 1], np.abs(images).astype("
                "np.float32) / top, top the largest magnitude of every split together (k-space reconstructed into "
                "images first)")
    if not np.issubdtype(images.dtype, np.integer) or not images.size:
        return generic
    from ..attacks.context import HOUNSFIELD_WINDOWS, hounsfield_shift_fix, pixel_scale

    lo, hi = int(images.min()), int(images.max())
    got = f" with values in [{lo}, {hi}]"
    if 0 <= lo and hi <= 1:  # binary images (np.where's int64): told uint8, they loaded black (1 of 255) silently
        return f"{got}; {BINARY_IMAGES_FIX}"
    if 0 <= lo and hi <= 255:
        return f"{got}: store them as uint8 (images.astype(np.uint8)), 0-255 pixels"
    if lo == hi and not -10 <= lo < 0:  # the offset's and signed values' (x - lo) / (hi - lo) divided by zero and
        # no scale reads them (-10 to -1: a z-score's "1 level left", whose pixels from before the normalization are
        # the fix, as the z-scores' refusal says)
        return f"{got}; every image holds the one value {lo} (blank or constant images?): check how they were exported"
    if 0 <= lo and hi > (1 << 14) - 1 and hi - lo <= NARROW_16_BIT_SPAN:  # a narrow band far from 0: "/ 65535"
        # kept it in [0.48, 0.55] (CT at +32768), where an eps of 8/255 is half the data's range (as the folder
        # loader warns of such a set, too bright to be told of as dark)
        return (f"{got}; {max(hi - lo, 255).bit_length()}-bit intensities with an offset added (as MATLAB's im2uint16 "
                f"adds 32768 to signed CT Hounsfield units)? store them as floats in [0, 1], {SHIFT_FIX}")
    # a band far from 0 beside a zero padding (a rotation's fill): "/ 65535" kept it narrow; one more pass
    low = int(images[images > 0].min()) if lo == 0 and hi > (1 << 14) - 1 else lo
    if lo == 0 and hi > (1 << 14) - 1 and low < hi and hi - low <= NARROW_16_BIT_SPAN:
        return (f"{got}; {max(hi - low, 255).bit_length()}-bit intensities with an offset added (as MATLAB's "
                f"im2uint16 adds 32768 to signed CT Hounsfield units), all but a padding of 0 in [{low}, {hi}]? store "
                "them as floats in [0, 1], np.clip((images.astype(np.float32) - lo) / (hi - lo), 0, 1), lo and hi the "
                "lowest value above 0 and the highest of every split together")
    if 0 <= lo:
        bits = hi.bit_length()  # the fewest holding the top (10 for 1023), as the folder loader's warning names it
        return (f"{got}; {bits}-bit intensities? store them as floats in [0, 1], images.astype(np.float32) / "
                f"{(1 << bits) - 1} (astype(np.uint8) would wrap every value above 255)")
    if images.dtype == np.int8:  # Java's bytes, a C char, a .view(np.int8): 128-255 read as -128 to -1
        return (f"{got}; 0-255 pixels read as signed bytes? images.view(np.uint8) reads them back (astype(np.uint8) "
                "gives the same); zero-centred pixels? (images.astype(np.int16) + 128).astype(np.uint8)")
    if pixel_scale(lo, hi, 0.0, 1.0)[0] == "hounsfield":
        # no air (-1000, which a CT slice holds around the body): a crop inside it (lung -900 to -500), or 16-bit
        # data with its mean subtracted ([-600, 600]), which a window such as -160, 240 would clip (as for floats)
        return (f"{got}; CT Hounsfield units? window them onto [0, 1] pixels: (np.clip(images, lo, hi) - lo) / (hi - "
                f"lo) as float32 for the window [lo, hi] they are read in ({HOUNSFIELD_WINDOWS})"
                f"{hounsfield_shift_fix(lo, SHIFT)}")
    if max(-lo, hi) <= 10:  # z-scores rounded to integers: as uint8 their negatives would wrap
        return (f"{got}; normalized by a mean and std, then stored as integers ({counted(hi - lo + 1, 'level')} "
                "left)? store the [0, 1] pixels from before the normalization, as floats or uint8, and normalize "
                "inside the model (robust_ops.attacks.Normalized)")
    return (f"{got}; signed intensities (an offset or a mean subtracted)? store them as floats in [0, 1], {SHIFT_FIX} "
            "(astype(np.uint8) would wrap every negative)")


def labels_to_tensor(labels, n, source, key="labels"):
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:  # one-hot rows (N, K) hold one label each: their argmax(1) is it
        onehot = "; one-hot rows? store their .argmax(1)" if labels.ndim == 2 else ""
        raise DataError(f"{source}: expected {key} of shape (N,) or (N, 1), got {labels.shape}{onehot} "
                        "(multi-label sets are not supported)")
    if labels.shape[0] != n:
        raise DataError(f"{source}: {key} has {labels.shape[0]} entries but the images have {n}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: expected integer {key}, got dtype {labels.dtype}"
                        f"{label_dtype_fix(labels, '.astype(np.int64)')}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{source}: expected {key} >= 0, got {labels.min()}")
    if labels.size and labels.max() > np.iinfo(np.int64).max:  # uint64: would wrap to a negative int64 label
        raise DataError(f"{source}: expected {key} to be class indices 0 to K-1, got {labels.max()}")
    return torch.from_numpy(labels.astype(np.int64))


# scikit-learn's splits and generators take seeds 0 to 2**32 - 1 (None would draw other data on every call): the
# library's one seed range (torch's CPU generator reads a seed's low 32 bits)
MAX_SKLEARN_SEED = MAX_SEED


def check_sklearn_seed(where, seed):
    """``seed`` as an int from 0 to MAX_SKLEARN_SEED, else a DataError naming ``where`` and seed=."""
    seed = check_int(where, "seed", seed, 0, error=functools.partial(DataError, arg="seed"))
    if seed > MAX_SKLEARN_SEED:
        raise DataError(f"{where}: expected seed to be an integer from 0 to {MAX_SKLEARN_SEED} (the seeds "
                        f"scikit-learn takes), got {seed}", arg="seed")
    return seed


# How a split treats classes too small to stratify: "merge" stratifies the other classes and places the small ones at
# random (as one stratum); "random" (the rule before 2026-12-06, kept for runs split by it) splits every class at random
RARE_CLASS_RULES = ("merge", "random")


def check_rare_classes(where, rare_classes):
    if rare_classes not in RARE_CLASS_RULES:
        raise DataError(f"{where}: expected rare_classes to be 'merge' or 'random', got {rare_classes!r}",
                        arg="rare_classes")
    return rare_classes


def stratified_split(y, fractions, seed, source="dataset", class_names=None, rare_classes="merge"):
    """Split indices into len(fractions) stratified parts (fractions sum to 1), deterministic in seed (an integer
    from 0 to MAX_SKLEARN_SEED). class_names: label -> name, so the warning about a class too small to stratify names
    it and the parts (train, val, test in that order). rare_classes: see :data:`RARE_CLASS_RULES`."""
    return _stratified_parts(y, fractions, seed, source, class_names, rare_classes)[0]


def _cut(rest, share, strata, seed):
    from sklearn.model_selection import train_test_split

    return train_test_split(rest, train_size=share, stratify=strata, random_state=seed)


def _stratified_parts(y, fractions, seed, source, class_names, rare_classes, unit="sample", stacklevel=2):
    """:func:`stratified_split`'s parts, and the classes it placed at random as one stratum (rare_classes="merge").
    unit: what y's entries are, for the messages' counts ("lesion_id group" when :func:`grouped_split` calls).
    stacklevel: whose line the warning names, counted from here: 1 the caller, 2 the caller's caller."""
    # checked here: scikit-learn's refusal of a bad seed is a ValueError, read below as a class too small to stratify
    seed = check_sklearn_seed(source, seed)
    check_rare_classes(source, rare_classes)
    y = np.asarray(y)
    idx = np.arange(len(y))
    parts, rest, rest_frac, stratified, merged = [], idx, 1.0, True, set()
    too_few = DataError(f"{source}: too few {unit}s ({len(y)}) for a {'/'.join(map(str, fractions))} split; "
                        f"expected at least one {unit} per part")
    for frac in fractions[:-1]:
        share = frac / rest_frac
        if share >= 1.0:
            parts.append(rest)
            rest = rest[:0]
            break
        try:
            take, rest = _cut(rest, share, y[rest], seed)
        except ValueError:  # a class too small to stratify
            cut = None
            if rare_classes == "merge":
                # the k smallest classes as one stratum, k growing until scikit-learn can stratify: one class of 4
                # samples made every class's split random, and classes of 12 or 39 samples went missing from a part
                labels, counts = np.unique(y[rest], return_counts=True)
                order = np.argsort(counts, kind="stable")
                smallest_first = labels[order]
                for k in range(1, len(smallest_first)):
                    # a stratum of one sample cannot be stratified either: it then joins the largest class's
                    alone = counts[order[:k]].sum() < 2
                    strata = np.where(np.isin(y[rest], smallest_first[:k]), smallest_first[-1] if alone else -1,
                                      y[rest])
                    try:
                        cut = _cut(rest, share, strata, seed)
                    except ValueError:
                        continue
                    merged.update(smallest_first[:k].tolist())
                    break
            if cut is None:  # a seeded random split, checked below
                stratified = False
                try:
                    cut = _cut(rest, share, None, seed)
                except ValueError:  # a part would be empty: scikit-learn's traceback would not name the dataset
                    raise too_few from None
            take, rest = cut
        parts.append(np.sort(take))
        rest_frac -= frac
    parts.append(np.sort(rest))
    if any(len(p) == 0 for p in parts):
        raise too_few
    if not stratified or merged:  # scikit-learn refuses only splits that leave a class out of a part
        labels, counts = np.unique(y, return_counts=True)

        def named(classes):
            return [str(class_names[c] if class_names is not None else c) for c in classes]

        smallest = named(labels[counts == counts.min()])
        size = counted(int(counts.min()), unit)
        missing = missing_classes(y, parts)
        where = f"{missing} (part index: classes)"
        if class_names is not None:  # readable: "normal from test" rather than "{2: [2]}"
            parts_named = ("train", "val", "test")  # k-fold splits a fold's training part into train and val
            where = "; ".join(f"{', '.join(str(class_names[c]) for c in cs)} from {parts_named[i]}"
                              for i, cs in missing.items())
        how = ("the split is seeded random instead" if not stratified else
               f"the other classes are stratified and {', '.join(named(sorted(merged)))} placed at random")
        warn(f"{source}: a class is too small to stratify the {'/'.join(map(str, fractions))} split "
             f"(smallest: {', '.join(smallest)}, {size}); {how}"
             + (f" and leaves out {where}" if missing else ""), stacklevel=stacklevel + 1)
    return parts, sorted(merged)


def grouped_split(y, groups, fractions, seed, source="dataset", class_names=None, group_name="group",
                  rare_classes="merge"):
    """:func:`stratified_split` of the groups (e.g. HAM10000's lesions), each labelled by its most frequent label
    (ties: the lowest), every sample following its group: no group has samples in two parts. The fractions are
    those of groups; the warnings and errors count groups (``group_name``: the column they come from)."""
    return _grouped_parts(y, groups, fractions, seed, source, class_names, group_name, rare_classes)[0]


def _grouped_parts(y, groups, fractions, seed, source, class_names, group_name, rare_classes, stacklevel=2):
    keys, inverse = np.unique(np.asarray(groups), return_inverse=True)
    y = np.asarray(y)
    counts = np.zeros((len(keys), int(y.max()) + 1 if y.size else 1), dtype=np.int64)
    np.add.at(counts, (inverse, y), 1)
    parts, merged = _stratified_parts(counts.argmax(1), fractions, seed, f"{source} (split by {group_name})",
                                      class_names, rare_classes, unit=f"{group_name} group", stacklevel=stacklevel + 1)
    return [np.flatnonzero(np.isin(inverse, p)) for p in parts], merged


def record_rare_classes(extra, merged):
    """``rare_classes: "merge"`` in a DatasetInfo's extra (run.json's dataset) when the split placed small classes at
    random as one stratum, the rule that changed the split: eval rebuilds the run's split by it, and a run.json
    without the entry (no class too small, or split before 2026-12-06) by "random", which then gives its split."""
    if merged:
        extra["rare_classes"] = "merge"


def trained_rare_classes(dataset_record):
    """The rare_classes rule a run's data was split by, from its run.json's ``dataset``: see record_rare_classes."""
    return (dataset_record or {}).get("rare_classes", "random")


def missing_classes(y, parts):
    """{part index: [classes of y absent from that part]} for the parts that miss one."""
    classes = set(np.unique(y).tolist())
    missing = {i: sorted(classes - set(np.unique(y[p]).tolist())) for i, p in enumerate(parts)}
    return {i: c for i, c in missing.items() if c}


def missing_classes_record(y, parts, class_names, part_names=("train", "val", "test")):
    """``classes_missing_from_split`` as run.json and results.json record it: {part name: [names of the classes of y
    absent from that part]} for the parts that miss one."""
    return {part_names[i]: [class_names[c] for c in cs] for i, cs in missing_classes(y, parts).items()}


def splits_from_arrays(x, y, info, seed, fractions=(0.7, 0.1, 0.2), groups=None, group_name="group",
                       rare_classes="merge", stacklevel=1):
    """Stratified train/val/test (MedMNIST's 7:1:2 by default) from one pool of samples; with ``groups`` (one key per
    sample, ``group_name`` the column they come from) a :func:`grouped_split`: every group on one side. ``x``: float
    inputs, or uint8 images, which each part converts to float in [0, 1] (a float copy of the whole pool beside the
    parts held the data in memory twice over). ``rare_classes``: see :data:`RARE_CLASS_RULES`. ``stacklevel``: whose
    line a warning names, 1 the caller's (a loader passes 2: its own caller's)."""
    source = info.source or info.name
    if groups is None:
        parts, merged = _stratified_parts(y.numpy(), fractions, seed, source, info.class_names, rare_classes,
                                          stacklevel=stacklevel + 1)
    else:
        parts, merged = _grouped_parts(y.numpy(), groups, fractions, seed, source, info.class_names, group_name,
                                       rare_classes, stacklevel=stacklevel + 1)
    record_rare_classes(info.extra, merged)
    missing = missing_classes_record(y.numpy(), parts, info.class_names)
    if missing:  # recorded in results.json: a metric of an absent class is undefined there
        info.extra["classes_missing_from_split"] = missing
    sets = [TensorDataset(x[p].float().div_(255.0) if x.dtype == torch.uint8 else x[p], y[p]) for p in parts]
    return DatasetSplits(*sets, info, None if groups is None else tuple(np.asarray(groups)[p] for p in parts))


# Names load_dataset reads as generated sets, never as paths (any case).
SYNTHETIC_NAMES = ("synthetic", "synthetic-bus", "synthetic_bus")
MOONS_NAMES = ("moons", "two-moons", "two_moons", "twomoons")


def _fixed_classes_text(name):
    """`` (0 = benign, 1 = malignant)``: the classes of a named source (synthetic, moons, a MedMNIST name), which
    classes= cannot choose; "" for one whose classes are not known before loading it."""
    from . import medmnist, synthetic

    match = medmnist._NAME_RE.match(name)
    if name in SYNTHETIC_NAMES:
        names = synthetic.SYNTHETIC_CLASSES
    elif name in MOONS_NAMES:
        names = synthetic.MOONS_CLASSES
    else:  # a MedMNIST name (its size variant too); a multi-label or 3D set's classes are not listed
        names = medmnist.CLASS_NAMES.get(match.group(1), (None,))[0] if match else None
    return f" ({', '.join(f'{i} = {c}' for i, c in enumerate(names))})" if names else ""


def reads_image_files(spec):
    """Whether ``spec`` is class folders or a CSV: the sources whose image files ``channels=`` and ``bit_depth=``
    read (an .npz, MedMNIST and the generated sets fix their channels and scale)."""
    return str(spec).lower().endswith(".csv") or Path(str(spec)).expanduser().is_dir()


def _unread_file_text(text):
    """The error for a file of no kind load_dataset reads, with the rename a CSV saved under another name needs."""
    low, hint = text.lower(), ""
    if low.endswith(".csv.txt"):  # Windows hides a known extension: labels.csv saved as text looks like a .csv
        hint = f"; a CSV whose name ends in .txt (which Windows hides): rename it {Path(text).name[:-4]}"
    elif low.endswith(".tsv"):  # Excel's "Text (Tab delimited)" export
        hint = "; tab-separated: save it comma-separated, its name ending in .csv"
    return f"{text}: not a dataset this library reads (expected an .npz file, a .csv file or a folder){hint}"


def load_dataset(spec="synthetic", *, root=None, size=None, seed=0, classes=None, download=False, bit_depth=None,
                 split_by=None, channels=None, rare_classes=None):
    """Load a dataset by spec and return ``DatasetSplits(train, val, test, info)``.

    spec:
        ``"synthetic"`` -- the embedded procedural breast-ultrasound-like set (generated from ``seed``; default);
        ``"moons"`` / ``"two-moons"`` -- scikit-learn two moons as in ARFL (10,000 train, 1,000 test, noise 0.2);
        a MedMNIST name such as ``"breastmnist"`` (or ``"breastmnist_64"``) -- found via ``root``, ``$ROBUST_OPS_DATA``
        or ``~/.medmnist`` (with ``download=True``, a missing file is downloaded through the ``medmnist`` package
        when it is installed and online; never by default);
        a path to an ``.npz`` file (MedMNIST layout), a BUSI-style folder (benign/malignant/normal subfolders), or a
        ``.csv`` metadata file with an image folder beside it (HAM10000 layout: ``image_id``, ``dx`` columns).
    size: image side length (folders and synthetic data are resized to it; MedMNIST picks the file of that size).
    seed: generation seed (synthetic, moons) and the seed of stratified splits for sources without official splits.
    classes: class folder / label names to keep, in label order (folders and CSV); for an .npz file not named
        after a MedMNIST set, one name per label, label 0 first (names choose the positive class, as folders' do).
    bit_depth: how many bits of 16-bit image files hold the intensity (folders and CSV only): None (default) the full
        16 bits (65535 -> 255); 8 to 16 that many (12 for most CT and X-ray PNGs: 4095 -> 255), a value above it an
        error naming the file.
    split_by: how a CSV's rows are split (CSV only): None (default) as :func:`~robust_ops.data.folders.load_csv`'s
        "auto" -- by ``lesion_id`` when the CSV has that column, else by image; "image"; or a column to group by.
    channels: how many channels image files are read as (folders and CSV only): 1 (grayscale) or 3 (RGB); None
        (default) the loader's own: class folders 1 unless an image has colour, a CSV's images 3.
    rare_classes: how the drawn split treats classes too small to stratify (folders and CSV only): None (default) or
        "merge" stratifies the other classes and places the small ones at random, as one stratum; "random" splits
        every class at random then (the rule before 2026-12-06: the split of a run made by it).

    Raises:
        DataError (a ValueError): ``spec`` is neither a known name nor an existing file or folder, or the data it
            names cannot be loaded as asked (no images, a damaged or wrongly laid-out file, a bad option), naming it.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"load_dataset: expected spec to be a name or a path, got {type(spec).__name__}")
    if isinstance(spec, str) and not spec.strip():  # Path("") is ".": the working folder was read as a BUSI folder
        raise DataError(f"load_dataset: expected spec to be a name or a path, got {spec!r}; give a dataset name "
                        "such as synthetic or breastmnist, or a path ('.' for the working folder)")
    check_int("load_dataset", "seed", seed, 0, error=DataError)  # else numpy's "expected non-negative integer"
    if not isinstance(download, bool):  # a permission: download="no" was truthy and downloaded
        raise DataError(f"load_dataset: expected download to be True or False, got {download!r}")
    text = str(spec)
    low = text.lower()
    from . import folders, medmnist, synthetic

    path = Path(text).expanduser()
    medmnist_name = medmnist.is_medmnist_name(low)
    # a missing path without a file suffix may be a mistyped folder, which takes classes= and bit_depth=: it is
    # reported as missing below ("drop --classes" there, followed, ended in "no such file or folder")
    known = low in SYNTHETIC_NAMES or low in MOONS_NAMES or medmnist_name or low.endswith((".npz", ".csv")) \
        or path.exists()
    image_files = reads_image_files(text)
    if path.is_file() and not (low in SYNTHETIC_NAMES or low in MOONS_NAMES or medmnist_name
                               or low.endswith((".npz", ".csv"))):  # first: "drop --channels" was said of it
        raise DataError(_unread_file_text(text))
    if known and classes is not None and not image_files and not (low.endswith(".npz") and not medmnist_name):
        raise DataError(f"{text}: classes= selects class folders or CSV labels, or names an .npz file's labels; "
                        f"this source has fixed classes{_fixed_classes_text(low)} -- drop classes=", arg="classes")
    if known and split_by is not None and not low.endswith(".csv"):  # would be ignored
        raise DataError(f"{text}: split_by= chooses how a CSV's rows are split; this source is not a CSV -- drop "
                        "split_by=", arg="split_by")
    if known and bit_depth is not None and not image_files:  # would be ignored
        raise DataError(f"{text}: bit_depth= scales 16-bit image files (class folders and CSV); this source has "
                        "none -- drop bit_depth=", arg="bit_depth")
    # ints only: 3.0 or True compare equal to 3 and 1, and would pass for them
    if channels is not None and (not isinstance(channels, int) or isinstance(channels, bool) or channels not in (1, 3)):
        raise DataError(f"{text}: expected channels to be 1 (grayscale) or 3 (RGB), got {channels!r}", arg="channels")
    if known and channels is not None and not image_files:  # would be ignored
        raise DataError(f"{text}: channels= picks how image files (class folders and CSV) are read; this source's "
                        "channels are fixed -- drop channels=", arg="channels")
    if rare_classes is not None:
        check_rare_classes(text, rare_classes)
        if known and not image_files:  # would be ignored
            raise DataError(f"{text}: rare_classes= chooses how the split drawn for class folders and CSV treats "
                            "classes too small to stratify; this source has no drawn split -- drop rare_classes=",
                            arg="rare_classes")
    rare_classes = "merge" if rare_classes is None else rare_classes
    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    if known and root is not None and not medmnist_name:  # would be ignored (download= is a permission, not a request)
        raise DataError(f"{text}: root= is where MedMNIST files are looked up by name; this source is not one -- "
                        "drop root=", arg="root")
    if low in SYNTHETIC_NAMES:
        return synthetic.synthetic_splits(size=28 if size is None else size, seed=seed)
    if low in MOONS_NAMES:
        if size is not None:  # would be ignored: the points are 2-d feature vectors, not images
            raise DataError(f"{text}: size= resizes images; two-moons holds 2-d points -- drop size=", arg="size")
        return synthetic.moons_splits(seed=seed)
    if medmnist_name and text == path.name and path.is_dir():  # a bare name: neither reading is safe to guess
        raise DataError(f"{text}: names a MedMNIST set and a folder here; write ./{text} for the folder, or the .npz "
                        "file's path for the MedMNIST set")
    if low.endswith(".npz"):
        return medmnist.load_npz(path, size=size, classes=classes)
    if low.endswith(".csv"):
        return folders.load_csv(path, size=size, seed=seed, classes=classes, bit_depth=bit_depth,
                                split_by="auto" if split_by is None else split_by, mode=mode or "RGB",
                                rare_classes=rare_classes, stacklevel=2)  # a warning names our caller's line
    if path.is_dir():
        return folders.load_busi(path, size=size, seed=seed, classes=classes, bit_depth=bit_depth, mode=mode,
                                 rare_classes=rare_classes, stacklevel=2)
    if medmnist_name:
        return medmnist.load_medmnist(low, root=root, size=size, download=download)
    if path.exists():
        raise DataError(_unread_file_text(text))
    raise DataError(
        f"{text}: no such file or folder, and not a known dataset name (expected synthetic, moons, a MedMNIST name "
        f"such as breastmnist, an .npz/.csv path or a BUSI-style folder)"
    )
