"""MedMNIST ``.npz`` files: official-name MD5 checks, lookup in ``$ROBUST_OPS_DATA`` / ``~/.medmnist``, and loading
with ``np.load(allow_pickle=False)`` so a shared file can never run code."""

import hashlib
import inspect
import numbers
import os
import re
import zipfile
from pathlib import Path

import numpy as np
from torch.utils.data import TensorDataset

from .._options import listing
from .core import (DataError, DatasetInfo, DatasetSplits, check_not_binary_uint8, images_to_tensor, labels_to_tensor,
                   missing_classes_record)

# MD5 checksums of the official MedMNIST v2 28x28 files, as published in MedMNIST's own dataset table (INFO, the
# "MD5" field); the larger MedMNIST+ files are in PLUS_MD5.
OFFICIAL_MD5 = {
    "pathmnist.npz": "a8b06965200029087d5bd730944a56c1",
    "chestmnist.npz": "02c8a6516a18b556561a56cbdd36c4a8",
    "dermamnist.npz": "0744692d530f8e62ec473284d019b0c7",
    "octmnist.npz": "c68d92d5b585d8d81f7112f81e2d0842",
    "pneumoniamnist.npz": "28209eda62fecd6e6a2d98b1501bb15f",
    "retinamnist.npz": "bd4c0672f1bba3e3a89f0e4e876791e4",
    "breastmnist.npz": "750601b1f35ba3300ea97c75c52ff8f6",
    "bloodmnist.npz": "7053d0359d879ad8a5505303e11de1dc",
    "tissuemnist.npz": "ebe78ee8b05294063de985d821c1c34b",
    "organamnist.npz": "866b832ed4eeba67bfb9edee1d5544e6",
    "organcmnist.npz": "0afa5834fb105f7705a7d93372119a21",
    "organsmnist.npz": "e5c39f1af030238290b9557d9503af9d",
}
# MedMNIST v3 (MedMNIST+) re-released the 28x28 Organ{A,C,S}MNIST files with a few samples fewer; the checksums
# in MedMNIST's current table are these. Both releases are official, so either checksum is accepted.
REVISED_MD5 = {
    "organamnist.npz": "68e3f8846a6bd62f0c9bf841c0d9eacc",
    "organcmnist.npz": "b9ceb9546e10131b32923c5bbeaea2b1",
    "organsmnist.npz": "9ab87b696fb54e2a387ebe992d6ed5f1",
}
# MD5 checksums of MedMNIST v3's (MedMNIST+) 64x64, 128x128 and 224x224 files of the 2D sets (INFO's "MD5_64",
# "MD5_128", "MD5_224"): one release each. Without them a damaged or altered breastmnist_224.npz loaded as BreastMNIST.
PLUS_MD5 = {
    "pathmnist_64.npz": "55aa9c1e0525abe5a6b9d8343a507616",
    "pathmnist_128.npz": "ac42d08fb904d92c244187169d1fd1d9",
    "pathmnist_224.npz": "2c51a510bcdc9cf8ddb2af93af1eadec",
    "chestmnist_64.npz": "9de6cd0b934ebb5b7426cfba5efbae16",
    "chestmnist_128.npz": "db107e5590b27930b62dbaf558aebee3",
    "chestmnist_224.npz": "45bd33e6f06c3e8cdb481c74a89152aa",
    "dermamnist_64.npz": "b70a2f5635c6199aeaa28c31d7202e1f",
    "dermamnist_128.npz": "2defd784463fa5243564e855ed717de1",
    "dermamnist_224.npz": "8974907d8e169bef5f5b96bc506ae45d",
    "octmnist_64.npz": "e229e9440236b774d9f0dfef9d07bdaf",
    "octmnist_128.npz": "0a97e76651ace45c5d943ee3f65b63ae",
    "octmnist_224.npz": "abc493b6d529d5de7569faaef2773ba3",
    "pneumoniamnist_64.npz": "8f4eceb4ccffa70c672198ea285246c6",
    "pneumoniamnist_128.npz": "05b46931834c231683c68f40c47b2971",
    "pneumoniamnist_224.npz": "d6a3c71de1b945ea11211b03746c1fe1",
    "retinamnist_64.npz": "afda852cc34dcda56f86ad2b2457dbcc",
    "retinamnist_128.npz": "e48e916a24454daf90583d4e6efb1a18",
    "retinamnist_224.npz": "eae7e3b6f3fcbda4ae613ebdcbe35348",
    "breastmnist_64.npz": "742edef2a1fd1524b2efff4bd7ba9364",
    "breastmnist_128.npz": "363e4b3f8d712e9b5de15470a2aaadf1",
    "breastmnist_224.npz": "b56378a6eefa9fed602bb16d192d4c8b",
    "bloodmnist_64.npz": "2b94928a2ae4916078ca51e05b6b800b",
    "bloodmnist_128.npz": "adace1e0ed228fccda1f39692059dd4c",
    "bloodmnist_224.npz": "b718ff6835fcbdb22ba9eacccd7b2601",
    "tissuemnist_64.npz": "123ece2eba09d0aa5d698fda57103344",
    "tissuemnist_128.npz": "61b955355d7425a89687b06cca3ce0c2",
    "tissuemnist_224.npz": "b077128c4a949f0a4eb01517f9037b9c",
    "organamnist_64.npz": "2dcccc29b88e6da5a01161ef20cda288",
    "organamnist_128.npz": "eeae80d0a227a8d099027e1b3cfd3b60",
    "organamnist_224.npz": "50747347e05c87dd3aaf92c49f9f3170",
    "organcmnist_64.npz": "3ce34a8724ea6f548e6db4744d03b6a9",
    "organcmnist_128.npz": "773c1f009daa3fe5d9a2a201b2a7ed94",
    "organcmnist_224.npz": "050f5e875dc056f6768abf94ec9995d1",
    "organsmnist_64.npz": "53a6d115339d874c25e309a994ff46d3",
    "organsmnist_128.npz": "ded0c5fa01a95dc4978b956f613e9b8e",
    "organsmnist_224.npz": "b354719e553fbbb2513d5533f52a4cb1",
}

# Class names (MedMNIST's INFO "label", in label order; commas in a name written "or") and the positive class
# ("sensitivity" = its recall) of every single-label 2D MedMNIST set. BreastMNIST: 0 = malignant. Without a set's
# list its labels were numbered by the largest one present: a subset lacking the last class lost it (10 classes of
# OrganAMNIST's 11), one lacking another was refused as holding a gap.
_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen")
CLASS_NAMES = {
    "breastmnist": (("malignant", "normal or benign"), 0),
    "pneumoniamnist": (("normal", "pneumonia"), 1),
    "dermamnist": (("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"), None),
    "bloodmnist": (("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil",
                    "platelet"), None),
    "pathmnist": (("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                   "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"), None),
    "octmnist": (("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"), None),
    "retinamnist": (("0", "1", "2", "3", "4"), None),  # diabetic retinopathy grades: ordinal, read as 5 classes
    "tissuemnist": (("collecting duct or connecting tubule", "distal convoluted tubule", "glomerular endothelial cells",
                     "interstitial endothelial cells", "leukocytes", "podocytes", "proximal tubule segments",
                     "thick ascending limb"), None),
    "organamnist": (_ORGANS, None),
    "organcmnist": (_ORGANS, None),
    "organsmnist": (_ORGANS, None),
}
MEDMNIST_NAMES = tuple(name[:-4] for name in OFFICIAL_MD5 if name != "chestmnist.npz")  # chest: multi-label
MULTI_LABEL_NAMES = ("chestmnist",)
VOLUME_NAMES = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d",
                "synapsemnist3d")  # MedMNIST3D: (N, D, H, W) volumes
MEDMNIST_SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
_NAME_RE = re.compile(r"^([a-z]+mnist(?:3d)?)(?:_(28|64|128|224))?$")


def is_medmnist_name(name):
    m = _NAME_RE.match(name)
    # multi-label and 3D sets: refused by load_medmnist, saying why
    return bool(m) and m.group(1) in MEDMNIST_NAMES + MULTI_LABEL_NAMES + VOLUME_NAMES


def file_md5(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_VERIFIED = {}  # file identity -> MD5: a process loading a large MedMNIST+ file again does not hash it again
_REMEMBER_FROM_BYTES = 64 << 20  # writing this much takes longer than a file time stamp's resolution (a few ms)


def _verified_md5(path):
    st = os.stat(path)
    if st.st_size < _REMEMBER_FROM_BYTES:  # small: hashing is cheap, and a same-size rewrite could share a stamp
        return file_md5(path)
    key = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_md5(path)
    return _VERIFIED[key]


def check_md5(path):
    """Verify the MD5 of a file carrying an official MedMNIST name of any size (``breastmnist.npz``,
    ``breastmnist_64.npz`` ...), in any case (load_npz takes BreastMNIST.npz's classes from its name as
    breastmnist.npz's, so it is checked as that file, as is breastmnist_28.npz); other names are not checked."""
    official = re.sub(r"_28\.npz$", ".npz", Path(path).name.lower())  # MedMNIST names no file *_28.npz
    expected = OFFICIAL_MD5.get(official) or PLUS_MD5.get(official)
    if expected is None:
        return None
    got = _verified_md5(path)
    if got not in (expected, REVISED_MD5.get(official)):
        raise DataError(
            f"{path}: MD5 {got} does not match the official {official} ({expected}); the file is corrupt or "
            "not the official release -- download it again, or rename it if it is a deliberate variant"
        )
    return got


def _file_name(name, size):
    return f"{name}.npz" if size in (None, 28) else f"{name}_{size}.npz"


def candidate_dirs(root=None):
    dirs = []
    if root is not None:
        dirs.append(Path(root).expanduser())
    env = os.environ.get("ROBUST_OPS_DATA")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(Path.home() / ".medmnist")
    return dirs


def find_medmnist(name, root=None, size=None):
    """Path of ``<name>[_<size>].npz`` in root, $ROBUST_OPS_DATA (a folder, or the file itself) or ~/.medmnist;
    None when none of them holds it."""
    fname = _file_name(name, size)
    for d in candidate_dirs(root):
        if d.is_file() and d.name == fname:
            return d
        if (d / fname).is_file():
            return d / fname
    return None


def load_medmnist(spec, root=None, size=None, download=False):
    _check_size(size, spec)
    m = _NAME_RE.match(spec)
    name = m.group(1)
    if name in MULTI_LABEL_NAMES:  # else "not a known dataset name", which sends the user looking for a typo
        raise DataError(f"{spec}: a multi-label MedMNIST set (several labels per image); only single-label sets are "
                        f"supported, e.g. {', '.join(MEDMNIST_NAMES[:3])}")
    if name in VOLUME_NAMES:  # else "not a known dataset name", as for a typo
        raise DataError(f"{spec}: a MedMNIST3D set (volumes of D x H x W voxels); only 2D images are supported, e.g. "
                        f"{', '.join(MEDMNIST_NAMES[:3])}")
    if m.group(2):
        if size not in (None, int(m.group(2))):
            raise DataError(f"{spec}: the name says size {m.group(2)} but size={size} was requested", arg="size")
        size = int(m.group(2))
    if size is not None and size not in MEDMNIST_SIZES:  # else "<name>_<size>.npz not found", a file never released
        raise DataError(f"{spec}: MedMNIST images come in sizes {', '.join(map(str, MEDMNIST_SIZES))}, got "
                        f"size={size}; pick one of those", arg="size")
    path = find_medmnist(name, root, size)
    why_not_downloaded = None
    if path is None and download:
        path = _try_download(name, root, size)
        if isinstance(path, str):
            path, why_not_downloaded = None, path
    if path is None:
        where = ", ".join(str(d) for d in candidate_dirs(root))
        how = (f"download=True: {why_not_downloaded}" if download else
               "or allow a download through the medmnist package: download=True, CLI --download")
        release = "MedMNIST v2" if size in (None, 28) else "MedMNIST+ (v3)"  # v2 has no larger sizes
        raise DataError(
            f"{spec}: {_file_name(name, size)} not found (looked in {where}); download it from {release} and put it "
            f"in one of those folders, set $ROBUST_OPS_DATA to its folder, or pass the .npz path ({how})"
        )
    return load_npz(path, size=size)


def _try_download(name, root, size):
    """Download through the ``medmnist`` package (it needs network access). Returns the file's path, or a string
    saying why there is none: the error names the cause, not "not installed, or offline" for every failure."""
    try:
        import medmnist
        from medmnist import INFO
    except ImportError:
        return "the medmnist package is not installed"
    target = Path(root).expanduser() if root else Path.home() / ".medmnist"
    cls = getattr(medmnist, INFO[name]["python_class"])
    kwargs = {"size": size} if size not in (None, 28) else {}
    params = inspect.signature(cls.__init__).parameters
    takes_size = "size" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if kwargs and not takes_size:  # MedMNIST+ came with medmnist 3
        return (f"medmnist {getattr(medmnist, '__version__', '(version unknown)')} has no size argument; MedMNIST+ "
                "files need medmnist 3 or later")
    try:
        target.mkdir(parents=True, exist_ok=True)
        cls(split="test", download=True, root=str(target), **kwargs)
    except Exception as err:  # offline, a refused folder ...: its first line, as the cause
        first = str(err).splitlines()[0] if str(err).strip() else ""
        return f"the medmnist package could not download it: {type(err).__name__}: {first}".rstrip(": ")
    path = find_medmnist(name, target, size)
    return path if path is not None else f"the medmnist package left no {_file_name(name, size)} in {target}"


def _check_size(size, where):
    """None or an int, its value checked against the images or MedMNIST's sizes: a string '28' was "images are
    28x28, but size=28 was requested"."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral)):
        raise DataError(f"{where}: expected size to be an integer (pixels), got size={size!r}", arg="size")


def load_npz(path, size=None, name=None, classes=None):
    """Load a MedMNIST-layout ``.npz`` (keys ``{train,val,test}_{images,labels}``), MD5-checked if officially named.
    ``classes``: names for the labels 0..K-1 in order, one per label, for a file that is not named after a MedMNIST
    set (those name their own); they choose the positive class as class folders' names do (``malignant`` ...):
    without them a binary file's positive class is label 1. ``path``: the file (str or path-like, ``~`` expanded).
    ``size``: None (default) or the side length in pixels the images must have (an .npz is read as stored, never
    resized: another is a DataError). ``name``: the dataset name the file is read under, a MedMNIST set's picking
    its class names (default: the file's stem in lower case, less a ``_28`` / ``_64`` / ``_128`` / ``_224`` suffix).

    Raises:
        DataError (a ValueError): the file is missing, unreadable or not in that layout, naming it.
    """
    path = Path(path).expanduser()
    _check_size(size, path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    check_md5(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # np.load would otherwise try to unpickle it
        raise DataError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            needed = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
            missing = [k for k in needed if k not in keys]
            if missing:  # said neither what the file holds (Keras's x_train, y_train ...) nor how to get there
                raise DataError(f"{path}: missing keys {', '.join(missing)} (a MedMNIST .npz has {', '.join(needed)}; "
                                f"found: {listing(sorted(keys)) or 'none'}) -- {_npz_keys_fix(keys, missing)}")
            # class_names (as some exports write beside MedMNIST's keys): read, where it was ignored and a binary
            # file's label 1 scored as positive whatever its name
            arrays = {k: _npz_member(path, npz, k) for k in needed + ["class_names"] if k in keys}
    except DataError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
    sets, shape = [], None
    for s in SPLITS:
        source = f"{path} [{s}]"
        x = images_to_tensor(arrays[f"{s}_images"], source)
        y = labels_to_tensor(arrays[f"{s}_labels"], x.shape[0], source, key=f"{s}_labels")
        if shape is not None and x.shape[1:] != shape:  # one model takes every split: said how to get there
            fix = ("save every split's images in one channel count (a grayscale split as RGB: "
                   "np.repeat(images[..., None], 3, axis=-1))" if x.shape[1] != shape[0] else
                   "save every split's images at one size (an .npz is read as stored, never resized)")
            raise DataError(f"{path}: {s}_images have shape {tuple(x.shape[1:])}, train has {tuple(shape)}; {fix}")
        shape = x.shape[1:]
        sets.append(TensorDataset(x, y))
    check_not_binary_uint8({f"{s}_images": arrays[f"{s}_images"] for s in SPLITS}, path)  # 0 and 1 of 255: black
    # an .npz is read as stored, never resized: say how to get images of one side length (every model, radius rule
    # and report takes one), or that size= cannot change it
    if shape[1] != shape[2]:
        raise DataError(f"{path}: expected square images, got {shape[1]}x{shape[2]} (height x width); an .npz is "
                        "read as stored: pad or resize them to square before saving it, or save them as image "
                        "files (class folders or a CSV), which are zero-padded to square and resized (size=)")
    if size is not None and shape[1] != size:
        raise DataError(f"{path}: images are {shape[1]}x{shape[2]}, but size={size} was requested; an .npz is read "
                        f"at its own size -- drop size= or resize the file", arg="size")
    stem = name or re.sub(r"_(28|64|128|224)$", "", path.stem).lower()
    num_classes = int(max(int(t.tensors[1].max()) if len(t) else 0 for t in sets)) + 1
    names, positive = CLASS_NAMES.get(stem, (None, None))
    if "class_names" in arrays:
        names, positive = _npz_class_names(path, stem, (names, positive), classes, arrays["class_names"], sets,
                                           num_classes)
        classes = None  # the file's: agreed with, checked
    if classes is not None:
        names, positive = _named_classes(path, stem, names, classes, sets, num_classes)
    elif names is None or len(names) < num_classes:
        _check_class_indices(path, sets, num_classes)
        names = tuple(str(i) for i in range(num_classes))
        positive = 1 if num_classes == 2 else None
    else:
        num_classes = len(names)
    info = DatasetInfo(
        name=stem, num_classes=num_classes, in_channels=int(shape[0]), image_size=int(shape[1]),
        class_names=tuple(names), positive_class=positive, synthetic=False, source=str(path),
    )
    # the file's own split, recorded as a drawn one is (splits_from_arrays): a macro average runs over the classes
    # present, so results.json says which class a part lacks
    y = np.concatenate([t.tensors[1].numpy() for t in sets])
    ends = np.cumsum([len(t) for t in sets])
    missing = missing_classes_record(y, [np.arange(e - len(t), e) for t, e in zip(sets, ends)], info.class_names)
    if missing:
        info.extra["classes_missing_from_split"] = missing
    return DatasetSplits(*sets, info)


def _npz_keys_fix(keys, missing):
    """The way to an .npz holding ``keys`` but not ``missing`` of MedMNIST's: a validation split made where only it
    lacks, the arrays saved under MedMNIST's names else (one set without a split: split it first)."""
    if set(missing) == {"val_images", "val_labels"}:
        return ("it has no validation split: save one, val_images and val_labels, split off the training arrays "
                "(MedMNIST's is about a tenth of the set)")
    return ("save the arrays under those names, np.savez(path, train_images=..., train_labels=..., val_images=..., "
            "...), split 7:1:2 first if they are one set")


def _named_classes(path, stem, official, classes, sets, num_classes):
    """(names, positive class) of an .npz whose labels ``classes`` names, one name per label in label order: a renamed
    BreastMNIST subset (label 0 = malignant) otherwise scored label 1, benign, as its positive class."""
    from .folders import _class_list, _positive

    if official is not None:
        raise DataError(f"{path}: {stem} names its own classes ({', '.join(official)}); drop classes=", arg="classes")
    names = _class_list(classes, path)
    _check_class_indices(path, sets, num_classes)
    if len(names) != num_classes:
        raise DataError(f"{path}: classes= names each label of an .npz, label 0 first: expected {num_classes} names "
                        f"(its labels run from 0 to {num_classes - 1}), got {len(names)}", arg="classes")
    return tuple(names), _positive(names)


def _npz_class_names(path, stem, official, classes, value, sets, num_classes):
    """(names, positive class) of an .npz holding a ``class_names`` array: one distinct name per label, label 0 first,
    as classes= gives them; ``official`` (a MedMNIST set's (names, positive class), or (None, None)) and classes= must
    agree with it."""
    from .folders import _class_list, _positive

    if value.ndim != 1 or value.dtype.kind not in "US":
        raise DataError(f"{path}: expected class_names to be the class names as strings, label 0 first "
                        f"(np.array(['benign', 'malignant'])), got {value.dtype} values of shape {value.shape}")
    names = [(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)).strip() for n in value.tolist()]
    if official[0] is not None:  # its own names, in MedMNIST's order (all of them, whichever labels the file holds)
        if names != list(official[0]):
            raise DataError(f"{path}: class_names ({', '.join(names)}) differ from {stem}'s own "
                            f"({', '.join(official[0])}); save the file without class_names, or rename it")
        return tuple(names), official[1]
    _check_class_indices(path, sets, num_classes)
    twice = sorted({n for n in names if names.count(n) > 1})
    problem = (f"lists {listing(map(repr, twice))} more than once" if twice else
               f"holds {len(names)} names" if len(names) != num_classes else
               "holds an empty name" if not all(names) else None)
    if problem:
        raise DataError(f"{path}: class_names {problem}; expected {num_classes} distinct names, one per label 0 to "
                        f"{num_classes - 1}, label 0 first -- fix the array or save the file without it")
    if classes is not None and _class_list(classes, path) != names:
        raise DataError(f"{path}: class_names ({', '.join(names)}) name its labels, and classes= "
                        f"({', '.join(classes)}) differs; drop classes=, or save the file without class_names",
                        arg="classes")
    return tuple(names), _positive(names)


def _npz_member(path, npz, key):
    """Array ``key`` of an open .npz. A truncated member was refused as "arrays that need pickle" and one that is no
    .npy data (np.load hands back its raw bytes) as labels "of shape ()", "multi-label sets are not supported"."""
    try:
        value = npz[key]
    except ValueError as err:
        if "allow_pickle" in str(err):  # object arrays need pickle: refuse
            raise DataError(f"{path}: refusing to load arrays that need pickle ({err})") from None
        raise DataError(f"{path}: not a readable .npz file ({key}: {err})") from None
    if not isinstance(value, np.ndarray):
        raise DataError(f"{path}: not a readable .npz file ({key} holds no .npy array: damaged, or not saved with "
                        "numpy.save)")
    return value


def _check_class_indices(path, sets, num_classes):
    """Labels without class names are class indices 0..K-1, K >= 2: a stray value (255 as "unknown", 10**7) would
    otherwise add classes no sample has -- a binary set read as 256 classes, or a model too large to build."""
    present = {int(v) for t in sets for v in t.tensors[1].unique()}
    if len(present) < 2:
        raise DataError(f"{path}: expected at least two classes, got {len(present)} (labels: "
                        f"{', '.join(map(str, sorted(present))) or 'none'})")
    if present == set(range(1, num_classes)):  # said "labels run from 0 to 7 ... (the first: 0)" of labels 1 to 7
        raise DataError(f"{path}: labels run from 1 to {num_classes - 1}, none is 0 (1-based class numbers?); "
                        "expected class indices 0 to K-1 -- subtract 1 from every label")
    if len(present) < num_classes:
        first = next(i for i in range(num_classes) if i not in present)
        empty = num_classes - len(present)
        raise DataError(f"{path}: labels run from 0 to {num_classes - 1}, but {empty} of those {num_classes} classes "
                        f"{'has' if empty == 1 else 'have'} no sample (the first: {first}); expected class indices 0 "
                        "to K-1 -- relabel them")
