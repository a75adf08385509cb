"""Image-folder datasets: BUSI-style class folders and a CSV + images layout (HAM10000's metadata file).

Images are zero-padded to a square and then resized, as MIRST-DM does, so lesion shapes are not distorted.
Neither source has official splits: train/val/test are a stratified 7:1:2 split drawn from ``seed``
(use ``robust_ops.data.cross_validation`` for k-fold protocols); a CSV with a ``lesion_id`` column (HAM10000) is
split by lesion, every image of a lesion on one side (``load_csv``'s ``split_by``).
"""

import csv
import filecmp
import functools
import hashlib
import mimetypes
import numbers
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from .._options import check_int, counted, listing
from .._warn import warn
from .core import (NARROW_16_BIT_SPAN, DataError, DatasetInfo, check_images_fit, check_sklearn_seed,
                   splits_from_arrays)

# .jfif and .jpe are JPEGs (Pillow reads them as its JPEG format, .jfif as browsers save one): refused as other image
# files, "convert it", until later on 2026-12-07
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".tif", ".tiff")
# Image files this loader does not read: refused, so a class folder is never silently smaller than it looks.
OTHER_IMAGE_SUFFIXES = (".gif", ".webp", ".jp2", ".j2k", ".heic", ".pgm", ".ppm", ".pnm", ".dcm", ".dicom", ".nii",
                        ".nrrd", ".mha", ".jif", ".jpx", ".jpf", ".avif", ".heif", ".jxl", ".apng",
                        ".dib", ".tga", ".ico", ".psd", ".svg", ".qoi", ".pbm", ".pfm", ".exr", ".hdr", ".img",
                        ".ima", ".mhd", ".nhdr", ".mnc", ".nii.gz", ".svs", ".ndpi", ".czi",
                        # more that Pillow opens, skipped without a word until later on 2026-12-07: a camera's
                        # multi-picture JPEG, JPEG 2000 codestreams, astronomy's and older raster formats
                        ".mpo", ".j2c", ".jpc", ".pcx", ".dcx", ".sgi", ".rgb", ".bw", ".fits", ".fit", ".ras", ".xbm",
                        ".xpm", ".icns", ".cur", ".dds", ".avifs", ".pcd")
BUSI_ORDER = ("benign", "malignant", "normal")
# Folder names of a split made beforehand (Kaggle's ISIC sets: Train/<class>/, Test/<class>/): read as classes, their
# class folders were "a subfolder holding images", whose advice (move them up) made one class of each split.
SPLIT_FOLDERS = ("train", "training", "val", "valid", "validation", "dev", "test", "testing")
# Classes treated as "positive" (their recall is the sensitivity) when present.
POSITIVE_NAMES = ("malignant", "mel", "melanoma", "cancer", "positive")
# Binary sets without one of those: the class that is not one of these is positive (e.g. "abnormal" vs "normal",
# which label 1 alone would get wrong when the negative class sorts second, as "disease" / "healthy" does). The
# benign dermoscopy classes too (HAM10000's nv and bkl, ISIC's nevus): label 1 made nevus/ the positive class of a
# folder of bcc/ and nevus/, and nv that of `--classes bcc,nv`. A brain-MRI set's notumor (one word, no negation
# to read in it: glioma/ beside notumor/ took notumor).
NEGATIVE_NAMES = ("benign", "normal", "healthy", "negative", "control", "nv", "nevus", "nevi", "naevus", "naevi",
                  "bkl", "notumor")
# Binary sets whose names are a finding and its negation (COVID / non-COVID, tumor / no_tumor): the finding is
# positive, which label 1 alone gets wrong whenever the negation sorts second ("COVID" < "non-COVID").
NEGATION_WORDS = ("non", "no", "not", "without")
NEGATIONS = tuple(prefix + sep for prefix in NEGATION_WORDS for sep in ("-", "_", " ", ""))
# What Pillow raises on a damaged image file: OSError mostly, SyntaxError for a broken PNG chunk, ValueError for a bad
# BMP palette or TIFF tag.
DAMAGED_IMAGE_ERRORS = (OSError, SyntaxError, ValueError)
# Folders a system writes beside the data: macOS's zip metadata (its ._NAME AppleDouble files hold no image).
SYSTEM_FOLDERS = ("__MACOSX",)


def is_hidden(path, root=None):
    """Whether a file or folder (or, below ``root``, any folder on the way to it) is hidden -- its name starts with
    "." (.DS_Store, macOS's ._NAME.png AppleDouble files, .ipynb_checkpoints/) -- or a system folder: never data."""
    parts = Path(path).relative_to(root).parts if root is not None else (Path(path).name,)
    return any(part.startswith(".") or part in SYSTEM_FOLDERS for part in parts)


def is_mask(path):
    """Whether an image file is a segmentation mask beside its image, BUSI's ``benign (4)_mask.png`` and
    ``benign (4)_mask_1.png`` (any case): the name ends in ``_mask``, a number after it allowed. ``_mask`` elsewhere
    in a name is an image's (``ISIC_0024306_masked.jpg``, a lesion with its background masked out), which was skipped
    without a word until 2026-12-07."""
    return re.search(r"_mask(?:[_-]?[0-9]+)?$", Path(path).stem, re.IGNORECASE) is not None


def pad_to_square_and_resize(img, size):
    """Zero-pad a PIL image to a centred square, then resize to size x size (bilinear)."""
    from PIL import Image

    w, h = img.size
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), 0)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas.resize((size, size), Image.BILINEAR)


def _check_bit_depth(bit_depth, where):
    """``bit_depth`` (None, or 8..16) as an int: how many bits of a 16-bit image file hold the intensity."""
    if bit_depth is None:
        return None
    error = functools.partial(DataError, arg="bit_depth")
    bit_depth = check_int(where, "bit_depth", bit_depth, minimum=8, error=error)
    if bit_depth > 16:
        raise error(f"{where}: expected bit_depth to be an integer from 8 to 16 (the bits of a 16-bit image that hold "
                    f"the intensity, 12 for most CT and X-ray PNGs), got {bit_depth}")
    return bit_depth


def _colour_16_bit(img):
    """Whether a colour (or grey + alpha) image file holds 16 bits a channel: Pillow reads only the top 8 of each."""
    if img.mode.startswith("I") or img.mode == "F" or not getattr(img, "tile", None):
        return False
    raw = img.tile[0][3]  # the decoder's raw mode, "RGB;16B" for a 48-bit PNG
    raw = raw[0] if isinstance(raw, tuple) and raw else raw
    return isinstance(raw, str) and ";16" in raw


def _to_8bit(img, path, stats=None, bit_depth=None):
    """16-bit and 32-bit grayscale images as 8-bit: Pillow's convert("L") clamps every value above 255 to white.
    ``bit_depth`` None: 16-bit intensities on the full 16-bit scale (65535 -> 255); 8..16: on that many bits'
    scale (12: 4095 -> 255), a value above it an error."""
    from PIL import Image

    if _colour_16_bit(img):  # already 8-bit: the top 8 bits, the full 16-bit scale (65535 -> 255)
        if bit_depth not in (None, 16):
            raise DataError(f"{path}: a 16-bit colour (or grey + alpha) image; Pillow reads only the top 8 bits "
                            f"of each channel, so bit_depth={bit_depth} cannot scale it -- save it as 16-bit grayscale "
                            "or 8-bit colour", arg="bit_depth")
        if stats is not None:  # the top 8 bits bound the 16-bit values: the dark and black set checks still apply
            top = np.asarray(img.convert("RGB"))
            stats["max16"] = max(stats.get("max16", 0.0), float(top.max()) * 256 + 255 if top.size else 0.0)
            stats["colour16"] = True  # their fix is no bit_depth=
        return img
    if not img.mode.startswith("I") and img.mode != "F":
        return img
    arr = np.asarray(img)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode == "F" and not np.array_equal(arr, np.round(arr)):  # convert("L") truncates: [0, 1] data -> black
        raise DataError(f"{path}: F (32-bit float) image with fractional values in [{lo:g}, {hi:g}]; expected 8- or "
                        "16-bit intensities (values in [0, 1] would come out black) -- save it as an 8- or 16-bit "
                        "image")
    # Integer images (I;16, and I: 32-bit TIFFs, 16-bit PNGs in older Pillow) always take the 16-bit scale: taking a
    # dark one's values <= 255 as 8-bit would read it on another scale than the rest of its set (200 -> 200, 1000 -> 4)
    if lo >= 0 and hi <= 255 and img.mode == "F":  # whole 8-bit values in a float file: nothing to scale
        return img
    if stats is not None:  # the loader refuses a set whose 16-bit images would all come out black
        stats["max16"] = max(stats.get("max16", 0.0), hi)
        stats["min16"] = min(stats.get("min16", lo), lo)  # and warns of one in a narrow band far from 0
        # the band above a zero padding (a rotation's or resampling's fill), whose 0 hid it: one more pass (~8% of
        # a PNG's decoding) over an image holding a 0 and values past the band's span (else none is far from 0)
        low = float(arr[arr > 0].min()) if lo == 0 and hi > NARROW_16_BIT_SPAN else lo
        stats["low16"] = min(stats.get("low16", low), low)
    if lo < 0 or hi > 65535 or img.mode == "F":
        from ..attacks.context import pixel_scale

        # a signed CT slice (Hounsfield units, air -1000) was told to save as 16-bit, where its negatives would wrap
        if pixel_scale(lo, hi, 0.0, 1.0)[0] == "hounsfield":
            raise DataError(f"{path}: {img.mode} image with values in [{lo:g}, {hi:g}]; CT Hounsfield units? expected "
                            "8- or 16-bit intensities, which are never negative -- save them shifted as 16-bit, "
                            "np.clip(hu + 1024, 0, 4095).astype(np.uint16), read with bit_depth=12 (--bit-depth 12), "
                            "or windowed onto 0-255 as 8-bit")
        fix = "save it as an 8- or 16-bit image"
        if lo >= 0 and hi > 65535:  # 17 bits and more (a 32-bit TIFF's): "save it as 16-bit" said not how to scale
            bits = int(hi).bit_length()
            fix = (f"save it as 16-bit, its {bits}-bit values shifted down, (image >> {bits - 16}).astype(np.uint16), "
                   f"or scaled, np.round(image / {(1 << bits) - 1} * 65535).astype(np.uint16), every image of the set "
                   "on one scale (the bit depth of its largest value)")
        raise DataError(f"{path}: {img.mode} image with values in [{lo:g}, {hi:g}]; expected 8- or 16-bit "
                        f"intensities -- {fix}")
    top = 65535 if bit_depth is None else (1 << bit_depth) - 1
    if hi > top:
        over = int(np.count_nonzero(arr > top))
        # a few values above (a CT slice's metal implant): a deeper bit depth would scale every image of the set
        # down (13 bits: 4095 -> 127), where clipping those few pixels keeps the rest on its own scale
        few = "" if over * 100 > arr.size else (
            f" in {counted(over, 'pixel')} of its {arr.size}: a few bright outliers (metal in a CT slice)? clip "
            f"them, np.clip(image, 0, {top}), in every image of the set (a deeper bit depth would darken the rest); "
            "else")
        raise DataError(f"{path}: holds the value {hi:g}, above the {bit_depth}-bit maximum {top} "
                        f"(bit_depth={bit_depth}){few or ';'} give the bit depth the images were saved with",
                        arg="bit_depth")
    return Image.fromarray(np.round(arr.astype(np.float64) / (top / 255.0)).astype(np.uint8))  # top -> 255, mode L


def _check_padded_size(img, path):
    """pad_to_square_and_resize fills a side x side canvas first: a long strip, or a damaged header claiming one
    (18 x 9,000,000), would need terabytes and be killed for memory. Refused above Pillow's own limit for an image
    opened at that size."""
    from PIL import Image

    side, limit = max(img.size), Image.MAX_IMAGE_PIXELS
    if limit and side * side > 2 * limit:
        raise DataError(f"{path}: a {img.size[0]}x{img.size[1]} image, zero-padded to a {side}x{side} square, is "
                        f"above Pillow's size limit ({2 * limit} pixels); crop or downscale it")


def _check_opaque(img, path):
    """Converting to L or RGB drops the alpha channel: a transparent pixel would be read as whatever colour the file
    stores under it (black in one file, white in another). An alpha channel that is opaque everywhere is fine."""
    if img.mode.startswith("I") or img.mode == "F":  # no alpha channel; a 16-bit PNG's tRNS key is not used
        return
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in img.info:
        return
    alpha = img.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] < 255:
        raise DataError(f"{path}: has transparent pixels, which would be read as the colour stored under them; "
                        "save it without transparency (flattened onto black, as the padding is)")


def _check_one_frame(img, path):
    """A multi-page TIFF (a 3-D stack, a series) or an animated PNG: only the first frame would be read. Other
    formats are left alone: a phone's JPEG may carry a preview or depth map as a second frame."""
    frames = getattr(img, "n_frames", 1) if img.format in ("TIFF", "PNG") else 1
    if frames > 1:
        raise DataError(f"{path}: holds {frames} frames (pages); only the first would be read -- save each frame as "
                        "an image of its own")


def read_image(path, size, mode, stats=None, bit_depth=None):
    """One image file as a uint8 (size, size, C) array. mode: "L", "RGB", or None: "RGB" when the image has colour,
    else "L" (:func:`read_images` makes a set's channel counts agree)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            _check_padded_size(img, path)
            if stats is not None:
                stats["side"] = max(img.size)
            _check_one_frame(img, path)
            _check_opaque(img, path)
            img = _to_8bit(img, path, stats, bit_depth)  # first: it reads the undecoded file's tile
            if mode is None:  # decided on the image decoded here: one decode per file
                mode = "RGB" if _has_colour(img) else "L"
            img = img.convert(mode)
            img = pad_to_square_and_resize(img, size)
    except DataError:  # a ValueError as well: _to_8bit's own message names what to fix
        raise
    except DAMAGED_IMAGE_ERRORS as err:
        if os.path.islink(path) and not os.path.exists(path):  # said as '[Errno 2] No such file or directory'
            raise DataError(_broken_link(path)) from None
        if os.path.isfile(path) and os.path.getsize(path) == 0:  # said as "cannot identify image file 'PATH'"
            raise DataError(f"{path}: an empty file (0 bytes), no image (an interrupted download or copy?); copy it "
                            "again or remove it") from None
        raise DataError(f"{path}: not a readable image ({err})") from None
    except Image.DecompressionBombError as err:  # Pillow's guard against huge images: not an OSError
        raise DataError(f"{path}: too large to read ({err}); downscale it") from None
    arr = np.asarray(img, dtype=np.uint8)
    return arr if arr.ndim == 3 else arr[:, :, None]


def _broken_link(path):
    """The error for a symbolic link whose target is gone (a class folder or image on a drive not mounted)."""
    return (f"{path}: a link to {os.readlink(path)}, which does not exist (a drive not mounted, or the target moved?); "
            "restore its target or remove the link")


@functools.lru_cache(maxsize=None)
def _file_types():
    """Python's own table of file types by suffix (not the system's, which differs between machines)."""
    return mimetypes.MimeTypes()


def _names_a_file(name):
    """Whether ``name`` ends in a file type's suffix (an image's, notes.txt, labels.csv): a broken link so named is no
    class folder, where one named bcc.v2 (a dot in a class's name, no file type's suffix) may be."""
    return (name.lower().endswith(IMAGE_SUFFIXES + OTHER_IMAGE_SUFFIXES)
            or _file_types().guess_type(name) != (None, None))


def _has_colour(img):
    """Whether an open image's channels differ anywhere (grayscale saved as RGB, as BUSI's images are, does not
    count)."""
    if img.mode in ("1", "L", "LA", "F") or img.mode.startswith("I"):
        return False
    rgb = np.asarray(img.convert("RGB"))
    return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def read_images(paths, size, mode, bit_depth=None):
    """:func:`read_image` of each path, in ``torch.get_num_threads()`` threads (Pillow decodes and resizes outside
    the GIL). Returns (arrays in the order of ``paths``, stats for :func:`_check_16_bit`); an error is the first
    failing file's in that order. mode None: every image "L" unless one has colour, then every one "RGB" (a grey
    image's channel repeated: what converting it to RGB gives)."""
    from concurrent.futures import ThreadPoolExecutor

    def read(path):
        own = {}  # one per image: the threads would race on a shared dict's maximum
        return read_image(path, size, mode, own, bit_depth), own

    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(paths)))) as pool:
        futures = [pool.submit(read, p) for p in paths]
        try:
            done = [f.result() for f in futures]
        except BaseException:  # the error is known: the images queued behind it need not be read
            for f in futures:
                f.cancel()
            raise
    arrays = [arr for arr, _ in done]
    stats = {}
    for _, own in done:
        if "max16" in own:
            stats["max16"] = max(stats.get("max16", 0.0), own["max16"])
        for key in ("min16", "low16"):
            if key in own:
                stats[key] = min(stats.get(key, own[key]), own[key])
        if own.get("colour16"):
            stats["colour16"] = True
        stats["max_side"] = max(stats.get("max_side", 0), own.get("side", 0))
    if mode is None and any(arr.shape[2] == 3 for arr in arrays):
        arrays = [arr if arr.shape[2] == 3 else np.repeat(arr, 3, axis=2) for arr in arrays]
    return arrays, stats


# The top of a 16-bit set said to come out dark: 14-bit data (16383 -> 64 of 255), the deepest radiography stores
DARK_16_BIT_TOP = (1 << 14) - 1


def _check_16_bit(stats, where, bit_depth=None, stacklevel=1):
    """One dark 16-bit image is fine; a set whose 16-bit images all hold values <= 255 is 8-bit data saved in 16 bits,
    and scaled from 16 bits it would be black (every pixel 0 or 1 of 255). One whose values all stay <= 4095 is
    12-bit data (CT, X-ray): still usable, but 16 times darker than it should be, so it is said; so is one whose
    values stay <= 16383, 13- or 14-bit data (digital radiography's detectors), at most 64 of 255 and as many grey
    levels, which was silent until 2026-12-07. The bit depth named is the fewest bits holding the top: 10-bit data
    (1023, 64 times darker) was told bit_depth=12 until 2026-12-07, which still read it 4 times darker; a bit depth
    too small for other images is refused naming the file, where a too large one reads them dark silently. With
    ``bit_depth``
    given the scale is the caller's (values above it were refused image by image). ``stacklevel``: the loader's."""
    if bit_depth is not None:
        if "max16" not in stats:  # it changed nothing, yet run.json records it as the scale the images were read on
            warn(f"{where}: bit_depth={bit_depth} scales 16-bit image files, and none of these images is one "
                 "(8-bit files are read as they are): it changes nothing -- drop bit_depth= (--bit-depth)",
                 stacklevel=stacklevel + 2)
        return
    # a 16-bit colour image refuses every bit_depth but 16 (_to_8bit): the fixes naming one led to that refusal
    colour = ("save them as 16-bit grayscale or 8-bit colour images (Pillow reads the top 8 bits of a 16-bit colour "
              "image's channels: no bit_depth= scales them)") if stats.get("colour16") else None
    if "max16" in stats and stats["max16"] <= 255:
        raise DataError(f"{where}: every 16-bit image holds values <= {stats['max16']:g} only (8-bit values saved in "
                        "16 bits?); scaled from 16 bits they would all be black -- "
                        + (colour or "save them as 8-bit images or pass bit_depth=8"),
                        arg=None if colour else "bit_depth")
    if not colour and "min16" in stats and stats["min16"] == stats["max16"]:
        # one value: the dark or narrow band's advice (an offset subtracted) left them black, nothing in them to read
        warn(f"{where}: every 16-bit image holds the one value {stats['max16']:g} only (blank or constant images?); no "
             "bit depth or offset gives them contrast -- check how the images were exported", stacklevel=stacklevel + 2)
    elif "max16" in stats and stats["max16"] <= DARK_16_BIT_TOP:
        bits = int(stats["max16"]).bit_length()  # the fewest that hold the top: 10 for 1023, 12 for CT's 4095
        warn(f"{where}: every 16-bit image holds values <= {stats['max16']:g} only ({bits}-bit data?); scaled "
             f"from the full 16-bit range they come out dark (at most {stats['max16'] / 257:.0f} of 255) -- "
             + (colour or f"pass bit_depth={bits} (--bit-depth {bits}) to scale {(1 << bits) - 1} to 255"),
             stacklevel=stacklevel + 2)
    elif "min16" in stats and not colour and (stats["max16"] - stats["min16"] <= NARROW_16_BIT_SPAN or (
            stats["min16"] == 0 and stats["low16"] < stats["max16"] and
            stats["max16"] - stats["low16"] <= NARROW_16_BIT_SPAN)):
        # silent until 2026-12-07: 4096 levels of CT read as 16, far from dark; beside a zero padding silent until
        # 2026-12-07 (a 0/65535 mask, one value above 0, is no band)
        lo, hi = (stats["min16"] if stats["min16"] else stats["low16"]), stats["max16"]
        padded = " and 0 (a padding?)" if lo != stats["min16"] else ""
        bits, levels = max(int(hi - lo).bit_length(), 8), round(hi / 257) - round(lo / 257) + 1
        # worded as the advice above, which eval drops on a run's own data (the fix is other data)
        warn(f"{where}: every 16-bit image holds values in [{lo:g}, {hi:g}]{padded} only, an offset added to them, as "
             f"MATLAB's im2uint16 adds 32768 to signed CT Hounsfield units ({bits}-bit data?); scaled from the full "
             f"16-bit range they keep {levels} of 256 grey levels -- save them with the offset subtracted, np.clip("
             f"image.astype(np.int32) - {lo:g}, 0, {(1 << bits) - 1}).astype(np.uint16) with one offset for every "
             f"image, read with bit_depth={bits} (--bit-depth {bits})", stacklevel=stacklevel + 2)


def _composed(text):
    """``text`` in Unicode's composed form (NFC, as keyboards and most programs write "é"), so a name macOS wrote
    decomposed (NFD, "e" + U+0301, kept by its zips) matches the same name typed."""
    return unicodedata.normalize("NFC", text)


def _images_by_stem(folder):
    """The image files directly in ``folder`` by stem (composed: :func:`_composed`), sorted ({} where it is no
    folder): load_csv's ids holding a
    folder and no extension (pat1/view1) look theirs up here, the folder listed once; a glob of each row's name read
    its folder once a row, 0.34 s for 2,000 rows of 200 folders (measured on a loaded 2-core machine)."""
    stems = {}
    try:
        files = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError:  # an unreadable folder finds nothing, as a glob in it did
        files = []
    for q in files:
        if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file():
            stems.setdefault(_composed(q.stem), []).append(q)
    return stems


def _folder_in_other_form(root, rel, folders):
    """The folder ``root/rel`` where ``rel``'s folders are named in the other Unicode form (lésions/ typed composed,
    named decomposed by macOS's zip; :func:`_composed`), each folder compared composed where no folder has the name as
    written; ``root/rel`` where none matches. ``folders`` (a dict kept by the caller) holds those found, by ``rel``."""
    if rel not in folders:
        here = root
        for part in PurePosixPath(rel).parts:
            if not (here / part).is_dir():
                try:
                    same = sorted(q for q in here.iterdir() if _composed(q.name) == _composed(part) and q.is_dir())
                except OSError:
                    same = []
                if not same:
                    here = root / rel
                    break
                part = same[0].name
            here = here / part
        folders[rel] = here
    return folders[rel]


def _path_in_other_case(root, rel):
    """The file under ``root`` that the relative path ``rel`` names in other case (Images/CASE000.PNG for
    images/case000.png), as a path relative to ``root`` (without its extension where ``rel`` has none, as the lookup
    reads images/CASE000), or None: each folder and the name compared casefolded."""
    here, parts = root, PurePosixPath(rel).parts  # ./Images/a.png and Images//a.png as read: "." and "" are no names
    bare = bool(parts) and PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES
    for k, part in enumerate(parts):
        stem = bare and k == len(parts) - 1  # the name without its extension
        try:
            same = sorted(q for q in here.iterdir() if (q.stem if stem and q.suffix.lower() in IMAGE_SUFFIXES
                                                        else q.name).casefold() == part.casefold())
        except OSError:
            return None
        if not same:
            return None
        here = same[0]
    if not here.is_file():
        return None
    found = here.relative_to(root)
    return (found.with_suffix("") if bare else found).as_posix()


def _names_in_other_case(root, names):
    """The image file names under ``root`` that the ids ``names`` (holding no folder) name in other case
    (CASE000.PNG for case000.png, CASE000 for case000.png: as written, with or without the extension), by id."""
    wanted = {n.casefold(): n for n in names}
    found = {}
    if not wanted:  # ids holding a folder only: the walk read every file under root for none (0.8 s for 20,000)
        return found
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        for name in (p.name, p.stem):  # the name with its extension or without
            n = wanted.get(name.casefold())
            if n is not None and n not in found and (PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES) == \
                    (name == p.name) and p.is_file() and not is_hidden(p, root):
                found[n] = name
    return found


def _resolved(path, folders):
    """``path`` in its folder's ``os.path.realpath``, read once per folder in ``folders`` (a dict kept by the caller):
    a resolve() of every row of load_csv read each of its path's components, 0.15 s for 2,000 rows on a loaded
    2-core machine. The file itself is not followed: two names linked to one blob are two files."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    return os.path.join(folders[folder], name)


# The side length folders and CSVs are read at when size= is not given (MIRST-DM's 224 x 224).
DEFAULT_SIZE = 224


def _check_upscale(stats, where, size, size_given, stacklevel=1):
    """Small images (MedMNIST's 28 x 28 exported to PNG) read at the default 224 are upscaled 8x: 64 times the pixels
    to train and attack, with nothing gained. Said once, with the size that keeps them; a size given is meant.
    ``stacklevel``: the loader's."""
    side = stats.get("max_side", 0)
    if not size_given and 0 < side and 2 * side <= size:
        warn(f"{where}: every image is at most {side} pixels a side, read at the default {size}x{size} "
             f"(upscaled {size / side:.1f}x: {(size / side) ** 2:.0f} times the pixels to train and attack); "
             f"pass size={side} (--size {side}) to read them at their own size, or size={size} to keep it",
             stacklevel=stacklevel + 2)


def _bit_depth_record(bit_depth):
    """``info.extra``'s record of a bit depth given (none when not: the dataset records of earlier runs stay as
    they were)."""
    return {} if bit_depth is None else {"bit_depth": bit_depth}


def _id_as_read(image_id):
    """A CSV's image id as its lookup reads it: "\\" as "/", "./" and doubled "/" dropped (pathlib's parts), so
    ./images/a.png, images//a.png and images\\a.png are images/a.png; a bare name stays as it is."""
    return PurePosixPath(image_id.replace("\\", "/")).as_posix()


def _samples_digest(samples):
    """A digest of the (name, class) pairs -- (name, class, group) for a grouped split -- in the order they are
    stacked: the seeded split cuts that order, so eval and resume compare it to find data that was reordered,
    renamed, relabelled or regrouped with the same class counts."""
    text = "\n".join("\t".join(map(str, sample)) for sample in samples)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _stack(arrays, labels):
    """(H, W, C) uint8 arrays -> uint8 [N, C, H, W] (splits_from_arrays makes each part float) and int64 labels;
    ``arrays`` is emptied as it is copied, so the images are not held twice."""
    h, w, c = arrays[0].shape  # every loader has one image at least
    x = np.empty((len(arrays), c, h, w), dtype=np.uint8)
    for i in range(len(arrays)):
        x[i] = arrays[i].transpose(2, 0, 1)
        arrays[i] = None
    return torch.from_numpy(x), torch.tensor(labels, dtype=torch.int64)


def _positive(class_names):
    """Binary sets: the malignant-like class (else label 1). Multi-class sets: None (macro-averaged metrics)."""
    if len(class_names) != 2:
        return None
    low = [c.lower() for c in class_names]
    for name in POSITIVE_NAMES:
        if name in low:
            return low.index(name)
    negative = [i for i, c in enumerate(low) if c in NEGATIVE_NAMES]
    if len(negative) == 1:
        return 1 - negative[0]
    # names of several words, as a dermatology folder's ("Benign Nevus" beside "Basal Cell Carcinoma" was label 1,
    # so positive), by their words, a negated name ("non-malignant lesion", "cancer-free": the positive one beside
    # "tumor") taking none
    split = [re.findall(r"[a-z0-9]+", c) for c in low]
    negated = [bool(w) and (w[0] in NEGATION_WORDS or w[-1] == "free") for w in split]
    words = [set() if n else set(w) for w, n in zip(split, negated)]
    for names, pick in ((POSITIVE_NAMES, 0), (NEGATIVE_NAMES, 1)):
        hit = [i for i in (0, 1) if words[i] & set(names)]
        if len(hit) == 1:
            return abs(pick - hit[0])
    # a negated name says there is no finding, beside one that names it ("No Finding" beside "Effusion", "no_tumor"
    # beside "glioma_tumor", "No_DR" beside "Mild", "tumor-free" beside "tumor": label 1, the negation, was positive)
    if negated.count(True) == 1:
        return negated.index(False)
    for i in (0, 1):
        if any(low[1 - i] == neg + low[i] for neg in NEGATIONS):
            return i
    return 1


def _class_list(classes, where, fold=None):
    """Validate an explicit ``classes`` argument: a sequence of distinct names (a bare string would be split into
    letters; a repeated name would give one set of samples two labels)."""
    if isinstance(classes, (str, bytes)):
        raise DataError(f"{where}: expected classes to be a sequence of names such as ('benign', 'malignant'), "
                        f"got the string {classes!r}", arg="classes")
    # a set's order is the order of string hashes, which changes from run to run: the labels would too
    if isinstance(classes, (set, frozenset)) or not isinstance(classes, Iterable):
        raise DataError(f"{where}: expected classes to be a list or tuple of names in label order such as "
                        f"('benign', 'malignant'), got {classes!r}", arg="classes")
    classes = list(classes)
    other = [c for c in classes if not isinstance(c, str)]
    if other:  # names are text: the label 0 of a CSV is '0'
        hint = f"; write {str(other[0])!r}" if isinstance(other[0], numbers.Integral) else ""
        raise DataError(f"{where}: expected classes to be names (strings), got {other[0]!r} of type "
                        f"{type(other[0]).__name__}{hint}", arg="classes")
    names = [fold(c) if fold else c for c in classes]
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise DataError(f"{where}: classes= lists {listing(dup)} more than once; expected distinct names",
                        arg="classes")
    return names


def _check_size(size, where):
    """A clear error for a size Pillow would reject mid-way ("height and width must be > 0")."""
    check_int(where, "size (pixels)", size, minimum=1, error=lambda message: DataError(message, arg="size"))


def _check_mode(mode, where, default_ok=False):
    """``mode``: "L" or "RGB". Pillow converts to any of its modes, but "1" would give pixels of 0 or 1 (of 255),
    "P" palette indices and "CMYK" inverted channels, read as intensities."""
    if mode not in ("L", "RGB") and not (default_ok and mode is None):
        default = "None (colour decides), " if default_ok else ""
        raise DataError(f"{where}: expected mode to be {default}'L' (grayscale) or 'RGB', got {mode!r}")


def _layout_hint(folder, subdirs):
    """What to do when ``folder`` holds fewer than two class folders: the images lie in it directly, or one level
    further down (a folder that holds the class folders, given one level too high)."""
    def count(d):
        return sum(1 for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p))

    loose = count(folder)
    if loose:
        return (f"; {loose} image(s) lie directly in {folder}: put each class's images in a folder named after the "
                f"class ({folder}/benign/, {folder}/malignant/, ...), or list them in a CSV (image_id, dx)")
    if len(subdirs) == 1:
        (inner,) = subdirs.values()
        below = [p.name for p in sorted(inner.iterdir()) if p.is_dir() and not is_hidden(p)]
        if len(below) >= 2:
            return (f"; {inner} holds the folders {', '.join(below)}: point the data path at {inner} if they are "
                    "the classes")
    return ""


def load_busi(folder, size=None, seed=0, classes=None, mode=None, bit_depth=None, rare_classes="merge", *,
              stacklevel=1):
    """BUSI layout: ``folder/<class>/*.png`` with ``*_mask.png`` (``*_mask_1.png``) segmentation masks ignored.

    size: the side length images are padded and resized to; None: 224, with a warning when every image is at most
    half of it (upscaled for nothing).

    mode: "L" (grayscale, one channel) or "RGB" (three); None: "L", or "RGB" when any image of the requested classes
    has colour (so colour is never dropped silently). Image files of other formats (.gif, .dcm,
    ...) and subfolders holding images are errors: only the images directly in each class folder would be read.

    classes: which class folders to use, in label order (default: those of benign/malignant/normal present, in that
    order, then any others alphabetically). MIRST-DM uses ``("benign", "malignant")``. Names match folders
    case-insensitively; a requested folder that is missing or holds no images is an error. Folders not requested are
    left out, as a filter, and recorded in ``info.extra``: ``excluded_labels`` (folder -> image count) and
    ``excluded_samples`` (their total); ``class_counts`` holds each class's image count.

    seed: the integer in [0, 2**32) (scikit-learn's random_state) that draws the stratified 7:1:2 train/val/test
    split (default 0).

    bit_depth: None (default) reads 16-bit images on the full 16-bit scale (65535 -> 255); 8 to 16 on that many
    bits' scale (12, CT and X-ray PNGs: 4095 -> 255), a value above it an error; recorded in ``info.extra``.

    rare_classes: how the stratified 7:1:2 split treats classes too small to stratify: "merge" (default) stratifies
    the others and places the small ones at random, as one stratum (recorded as ``info.extra["rare_classes"]``);
    "random" splits every class at random then (the rule before 2026-12-06).

    stacklevel: whose line the warnings name, 1 (default) the caller's; a wrapper passes 2 (load_dataset does), its
    own caller's.
    """
    folder = Path(folder)
    if not folder.is_dir():  # a file was "no such folder", as a missing path is
        raise DataError(f"{folder}: a file, not a folder; load_busi reads a folder of class folders (a CSV file: "
                        "load_csv)" if folder.exists() else f"{folder}: no such folder")
    size_given, size = size is not None, DEFAULT_SIZE if size is None else size
    _check_size(size, f"load_busi({folder})")
    _check_mode(mode, f"load_busi({folder})", default_ok=True)
    check_sklearn_seed(f"load_busi({folder})", seed)  # before reading every image
    bit_depth = _check_bit_depth(bit_depth, f"load_busi({folder})")
    subdirs, dead = {}, {}
    for p in sorted(folder.iterdir()):
        # a link to a class folder that is gone: its class left out without a word until 2026-12-07 (a file's, named
        # with a file type's suffix, is no class; one named bcc.v2 was taken for a file until later on 2026-12-07)
        if p.is_symlink() and not p.exists() and not is_hidden(p) and not _names_a_file(p.name):
            dead[_composed(p.name.lower())] = p  # composed: classes= typing its name in the other Unicode form
        if p.is_dir() and not is_hidden(p):
            if p.name.lower() in subdirs:  # one of them would be dropped silently
                raise DataError(f"{folder}: class folders {subdirs[p.name.lower()].name} and {p.name} differ only "
                                "in case; expected one folder per class")
            subdirs[p.name.lower()] = p
    chosen = classes is not None  # an error about the classes then names the classes= argument (--classes)
    if classes is None:
        classes = [c for c in BUSI_ORDER if c in subdirs] + sorted(c for c in subdirs if c not in BUSI_ORDER)
        if dead:  # a broken link's class would be left out; classes= leaving it out reads the rest
            raise DataError(_broken_link(next(iter(dead.values())))
                            + f", or leave it out with classes= (--classes {','.join(classes)})")
    # a name typed composed (NFC, as keyboards write "é") matches a folder whose name macOS wrote decomposed (NFD,
    # "e" + U+0301, kept by its zips), or the other way: refused until 2026-12-07 as 'class folder(s) mélanome not
    # found (found: mélanome, ...)'. The folder's own form is the class name, as without classes=
    composed = {_composed(c): c for c in subdirs}

    def fold(name):
        name = name.lower()
        return name if name in subdirs else composed.get(_composed(name), name)

    classes = _class_list(classes, f"load_busi({folder})", fold=fold)

    def class_folders(d):  # its subfolders holding images directly
        return [p.name for p in sorted(d.iterdir()) if p.is_dir() and not is_hidden(p)
                and any(q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(q) for q in p.iterdir())]

    def refuse_split(names):  # the folders of a split made beforehand among these
        split = [subdirs[c] for c in names if c in SPLIT_FOLDERS and class_folders(subdirs[c])]
        if split:
            raise DataError(f"{folder}: its folders {', '.join(d.name for d in split)} look like a train/val/test "
                            f"split, each holding class folders ({listing(class_folders(split[0]))} in "
                            f"{split[0].name}); the loader reads one folder of class folders and draws its own "
                            "stratified 7:1:2 split -- put each class's images from every split into one folder per "
                            f"class ({folder}/<class>/) and pass that folder")

    missing = [c for c in classes if c not in subdirs]
    if any(_composed(c) in dead for c in missing):  # "not found (found: ...)" of a folder the user sees
        raise DataError(_broken_link(dead[next(_composed(c) for c in missing if _composed(c) in dead)]))
    if missing:
        # `--classes melanoma,nevus` of isic/Train/melanoma/ ... said "class folder(s) melanoma, nevus not found
        # (found: test, train)"
        refuse_split(sorted(subdirs))
        found = ", ".join(sorted(subdirs))
        raise DataError(f"{folder}: class folder(s) {', '.join(missing)} not found (found: {found})",
                        arg="classes" if chosen else None)
    if len(classes) < 2:
        raise DataError(f"{folder}: expected at least two class folders (e.g. benign, malignant), got {classes}"
                        + ("" if chosen else _layout_hint(folder, subdirs)), arg="classes" if chosen else None)
    refuse_split(classes)

    def images(d):
        return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask(p)
                      and not is_hidden(p))

    def other_suffix(p):  # by the name's end, not Path.suffix: ".nii.gz" has the suffix ".gz"
        return next((s for s in OTHER_IMAGE_SUFFIXES if p.name.lower().endswith(s)), None)

    def check_unread(d):
        for p in sorted(q for q in d.iterdir() if not is_hidden(q)):
            if p.is_file() and other_suffix(p):
                raise DataError(f"{p}: {other_suffix(p)} files are not read (expected {', '.join(IMAGE_SUFFIXES)}); "
                                f"convert it or move it out of {d}")
            if p.is_dir() and any((q.suffix.lower() in IMAGE_SUFFIXES or other_suffix(q)) and not is_hidden(q, p)
                                  for q in p.rglob("*")):
                raise DataError(f"{p}: a subfolder holding images; only the images directly in {d} are read -- move "
                                "them up or out of the class folder")

    files = {}
    for c in classes:
        check_unread(subdirs[c])
        files[c] = images(subdirs[c])
        if not files[c]:  # said no more: an empty folder (a class to come, an unzip mishap) left the user no way on
            others = [o for o in classes if o != c and images(subdirs[o])]
            if len(others) < 2:
                fix = f"put its images there ({', '.join(IMAGE_SUFFIXES)} files)"
            else:
                fix = (f"leave it out with classes= (--classes {','.join(others)})"
                       + ("" if chosen else " or remove the empty folder"))
            raise DataError(f"{subdirs[c]}: no images found; {fix}", arg="classes" if chosen else None)
    paths = [p for c in classes for p in files[c]]
    check_images_fit(f"load_busi({folder})", len(paths), size, channels=3 if mode == "RGB" else 1)
    arrays, stats = read_images(paths, size, mode, bit_depth)
    labels = [label for label, c in enumerate(classes) for _ in files[c]]
    _check_16_bit(stats, folder, bit_depth, stacklevel)
    _check_upscale(stats, folder, size, size_given, stacklevel)
    excluded = {c: len(images(d)) for c, d in sorted(subdirs.items()) if c not in classes}
    x, y = _stack(arrays, labels)
    info = DatasetInfo(
        # the folder's own name where it is given as "." or "..": it was "busi" for any such folder (a pathology set's
        # reports titled busi); symbolic links not followed, so a link keeps its name
        name=Path(os.path.abspath(folder)).name or "busi", num_classes=len(classes), in_channels=x.shape[1],
        image_size=size, class_names=tuple(classes), positive_class=_positive(classes), synthetic=False,
        source=str(folder),
        extra={"excluded_samples": sum(excluded.values()), "excluded_labels": excluded,
               "class_counts": {c: len(files[c]) for c in classes},  # eval checks the data is unchanged
               "samples_digest": _samples_digest((p.name, c) for c in classes for p in files[c]),
               **_bit_depth_record(bit_depth)},
    )
    # a warning names our caller (load_dataset passes 2: its own caller)
    return splits_from_arrays(x, y, info, seed, rare_classes=rare_classes, stacklevel=stacklevel + 1)


def _label_order(labels):
    """Sort key for CSV labels: numeric when every label is an integer ("2" before "10", so label k keeps index k
    for 0..n-1), else by text."""
    if all(re.fullmatch(r"-?[0-9]+", label) for label in labels):
        return lambda label: (int(label), label)
    return str


# A label spelled as a missing value (pandas writes NaN so after df.astype(str), a None there as "None", pd.NA as
# "<NA>"; R NA; spreadsheets #N/A; databases NULL; the rest of the strings pandas' read_csv reads as missing): said,
# for it becomes a class of its own, where an empty label is refused. In a patient column it is no patient; in a
# column the split groups by, one group (warned of)
MISSING_LABELS = ("nan", "NaN", "-nan", "-NaN", "NA", "N/A", "n/a", "#N/A", "#N/A N/A", "#NA", "<NA>", "NULL", "null",
                  "None", "1.#QNAN", "-1.#QNAN", "1.#IND", "-1.#IND")  # the last four: the MSVC runtime's NaN


# The column load_csv's split_by="auto" groups by when the CSV has it: HAM10000 holds several images per lesion.
LESION_COLUMN = "lesion_id"
# Columns naming each image's patient (ISIC 2020's patient_id), any case: a split by image beside one that repeats is
# warned of, a patient's images landing in train and test (split_by= or a column renamed lesion_id groups them)
PATIENT_COLUMNS = ("patient_id", "patientid", "patient", "subject_id", "subject")


def _one_hot_columns(reader, fields):
    """The columns of a CSV whose rows (read to the end from ``reader``) hold one-hot labels -- only 0 / 1 values
    (``0.0`` / ``1.0`` too), one 1 in each row -- when there are two or more, else []."""
    rows = list(reader)
    flags = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}
    columns = [f for f in fields if rows and all((r.get(f) or "").strip() in flags for r in rows)]
    if len(columns) < 2 or any(sum(flags[r[c].strip()] for c in columns) != 1 for r in rows):
        return []
    return columns


def load_csv(csv_path, size=None, seed=0, classes=None, image_dir=None, id_column="image_id", label_column="dx",
             mode="RGB", bit_depth=None, split_by="auto", rare_classes="merge", *, stacklevel=1):
    """CSV metadata + image folder (HAM10000 layout: ``image_id`` and ``dx`` columns; images named
    ``<image_id>.<ext>`` anywhere under ``image_dir``, default the CSV's folder, e.g. HAM10000_images_part_1/ and
    _part_2/, or ``<image_id>`` there when it has an image suffix; an image_id holding a folder is a path relative to
    ``image_dir``, ``pat1/view1.png`` (its extension in any case, in that folder only) or ``pat1/view1``, read as
    written: ``..`` or an absolute path may leave it).

    csv_path: the CSV file (str or path-like). size, seed: as for :func:`load_busi` (the side length images are
    padded and resized to, None: 224; the split's seed, default 0). id_column (default "image_id") and label_column
    (default "dx"): the CSV columns holding each row's image name and its label.

    classes: label names to use, in label order (default: every label in the CSV, sorted; numerically when all are
    integers, so "2" comes before "10"). Labels match exactly
    (case-sensitive). Every requested class must have at least one row, else DataError naming the labels present.
    Rows with other labels are left out -- a subset filter, like choosing class folders -- and recorded in
    ``info.extra``: ``excluded_labels`` (label -> row count) and ``excluded_samples`` (their total); their images
    need not exist. Each image_id must appear once and match exactly one image file (byte-identical copies
    count as one); an empty id or label is an error. A first line ``sep=,`` (Excel's) is skipped. bit_depth: the
    scale of 16-bit images, as for :func:`load_busi`. mode: "RGB" (default, three channels) or "L" (grayscale, one).

    split_by: "auto" (default) splits by ``lesion_id`` when the CSV has that column, else by image; "image" by image;
    another string names the column whose values group the rows. A grouped split puts every image of a group on one
    side (an image-level split let a lesion's images land in train and test, inflating test accuracy): the stratified
    7:1:2 split is drawn over the groups, each labelled by its most frequent label, and recorded as
    ``info.extra["split_by"]`` (the column). An empty group value is an error (in a row ``classes`` leaves out, not);
    one spelled as missing (``"NA"``, ``"nan"``: ``MISSING_LABELS``) is kept, its rows one group, with a warning.
    "auto" without ``lesion_id`` warns when a patient column (``PATIENT_COLUMNS``, any case) holds several images of
    one patient: the split by image can put them in train and test.
    rare_classes, stacklevel: as for :func:`load_busi`.

    Raises:
        DataError (a ValueError): the CSV or an image is missing or unreadable, or the rows cannot be split as
            asked, naming the file or the column.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():  # a folder was "no such file", as a missing path is
        raise DataError(f"{csv_path}: a folder, not a file; load_csv reads a CSV file (a folder of class folders: "
                        "load_busi)" if csv_path.is_dir() else f"{csv_path}: no such file")
    size_given, size = size is not None, DEFAULT_SIZE if size is None else size
    _check_size(size, f"load_csv({csv_path})")
    _check_mode(mode, f"load_csv({csv_path})")
    check_sklearn_seed(f"load_csv({csv_path})", seed)  # before reading every image
    bit_depth = _check_bit_depth(bit_depth, f"load_csv({csv_path})")
    if not isinstance(split_by, str) or not split_by.strip():
        raise DataError(f"load_csv({csv_path}): expected split_by to be 'auto', 'image' or a column name, got "
                        f"{split_by!r}", arg="split_by")
    rows, lines = [], []  # lines: each row's line in the file, for the errors naming a row
    # utf-8-sig: spreadsheet exports start with a byte-order mark that would otherwise hide the first column's name
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            # Excel's first line naming the separator, "sep=,": no data, where it was read as the header ("missing
            # column 'image_id' (found: sep=, )"); "sep=;" stays, refused below as a ';'-separated header is
            skipped = 1 if f.readline().strip() == "sep=," else 0
            if not skipped:
                f.seek(0)
            # before stripping: "sep=\t" (Excel's line in a tab-separated file) would lose the tab its hint names
            raw_fields = reader.fieldnames or []
            fields = [name.strip() for name in raw_fields]
            reader.fieldnames = fields
            for col in (id_column, label_column):
                if col not in fields:
                    sep = next((c for c in ";\t|" if len(fields) == 1 and c in raw_fields[0]), None)
                    hint = f"; the header looks {sep!r}-separated: save the file comma-separated" if sep else ""
                    pixels = [f for f in fields if re.fullmatch(r"(?:pixel_?)?[0-9]+", f, re.IGNORECASE)]
                    if not hint and len(pixels) >= 16:  # hmnist_28_28_RGB.csv: pixel0000 ... pixel2351, label
                        hint = (f"; its {len(pixels)} columns {pixels[0]} ... {pixels[-1]} hold pixel values (a CSV "
                                "of flattened images), and load_csv reads image files, each named in a column "
                                f"{id_column!r}: pass the metadata CSV that names them (HAM10000_metadata.csv), or "
                                "save the images and labels as an .npz in MedMNIST's layout")
                    one_hot = [] if hint or label_column in fields else _one_hot_columns(reader, fields)
                    if one_hot:  # renaming cannot help: there is no label column, and one 0/1 column read as labels
                        # would be a one-class-vs-rest task labelled '0.0' / '1.0'
                        hint = (f"; {listing(one_hot)} hold one-hot labels (a column per class, as in ISIC's "
                                f"ground-truth files), and one label column is read: write each row's class name into "
                                f"one column {label_column!r}"
                                + (f", and name the image column {id_column!r}" if id_column not in fields else ""))
                    columns = {id_column.casefold(): id_column, label_column.casefold(): label_column}
                    cased = [f"{f} to {columns[f.casefold()]}" for f in fields
                             if f.casefold() in columns and f not in (id_column, label_column)]
                    if not hint and cased:  # IMAGE_ID, DX: told to "name the image column image_id", as it was
                        hint = f"; column names are matched in case: rename {' and '.join(cased)}"
                    if not hint and (id_column, label_column) == ("image_id", "dx") and len(fields) >= 2:
                        # the command line has no flag naming the columns: renaming them is the fix there
                        hint = ("; name the image column image_id and the label column dx (the HAM10000 layout), or "
                                "read it with robust_ops.data.load_csv(..., id_column=, label_column=)")
                    raise DataError(f"{csv_path}: missing column {col!r} (found: {listing(fields)})" + hint)
            group_column = (LESION_COLUMN if LESION_COLUMN in fields else None) if split_by == "auto" else \
                None if split_by == "image" else split_by
            if group_column is not None and group_column not in fields:
                raise DataError(f"{csv_path}: split_by={split_by!r} names no column (found: {listing(fields)}); "
                                "expected 'auto', 'image' or a column name")
            patient_column = None if split_by != "auto" or group_column is not None else \
                next((f for f in fields if f.casefold() in PATIENT_COLUMNS), None)
            groups, blank, patients = {}, {}, {}
            for r in reader:
                if None in r:  # DictReader's rest of a row longer than the header: an unquoted comma in some value
                    raise DataError(f"{csv_path}: line {reader.line_num + skipped}: {len(fields) + len(r[None])} "
                                    f"values, but the header names {len(fields)} columns; quote a value that holds "
                                    "a comma (\"melanoma, in situ\") -- which column it was in cannot be told, so "
                                    f"the row's {id_column!r} and {label_column!r} could be misread")
                # stripped: "mel " would otherwise become a class of its own beside "mel"
                image_id, label = (r[id_column] or "").strip(), (r[label_column] or "").strip()
                if not image_id or not label:  # None: a short row; "" would otherwise become a class or an id
                    col = id_column if not image_id else label_column
                    raise DataError(f"{csv_path}: line {reader.line_num + skipped}: empty {col!r}; expected a value "
                                    "in every row")
                if group_column is not None:
                    groups[image_id] = (r[group_column] or "").strip()
                    if not groups[image_id]:  # refused below if kept: a row classes= leaves out needs no group
                        blank[image_id] = reader.line_num + skipped
                if patient_column is not None:  # "NA" or "nan" (as R or pandas write a missing value): no patient,
                    # where it grouped every such row into one patient and told to split by it
                    patient = (r[patient_column] or "").strip()
                    patients[image_id] = "" if patient in MISSING_LABELS else patient
                rows.append((image_id, label))
                lines.append(reader.line_num + skipped)
        except UnicodeDecodeError as err:
            with open(csv_path, "rb") as raw:
                utf16 = raw.read(2) in (b"\xff\xfe", b"\xfe\xff")  # UTF-16's byte-order mark, little or big end
            if utf16:  # was "(invalid start byte at byte 0)", which named no encoding to change
                raise DataError(f"{csv_path}: not UTF-8 text (UTF-16, as Excel's \"Unicode Text\" saves it, "
                                "tab-separated); save it as UTF-8, comma-separated (Excel's \"CSV UTF-8\")") from None
            where = f"{err.reason} at byte {err.start}"
            raise DataError(f"{csv_path}: not UTF-8 text ({where}); save it as UTF-8") from None
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    seen = Counter(image_id for image_id, _ in rows)
    dup = sorted(i for i, n in seen.items() if n > 1)
    if dup:  # the same image twice could land in both train and test
        at = {}
        for (image_id, _), line in zip(rows, lines):
            at.setdefault(image_id, []).append(str(line))
        # with their lines: a long export's duplicate rows were left to find by hand
        named = listing((f"{i} (lines {' and '.join(at[i][:2])})" for i in dup), 3)
        raise DataError(f"{csv_path}: {len(dup)} image_id(s) listed more than once, e.g. {named}; "
                        f"expected one row per image")
    counts = Counter(label for _, label in rows)
    folded = {}
    for label in sorted(counts):
        key = str(int(label)) if re.fullmatch(r"-?[0-9]+", label) else label.casefold()
        folded.setdefault(key, []).append(label)
    clash = next((v for v in folded.values() if len(v) > 1), None)
    if clash:  # "Malignant" beside "malignant", or "01" beside "1", would silently become a class of its own
        first = [str(next(line for (_, label), line in zip(rows, lines) if label == c)) for c in clash[:2]]
        raise DataError(f"{csv_path}: labels {' and '.join(map(repr, clash))} in column {label_column!r} differ only "
                        f"in case or leading zeros (first on lines {' and '.join(first)}) and would be separate "
                        "classes; write each label one way")
    if classes is None:
        names = sorted(counts, key=_label_order(counts))
        na = [n for n in names if n in MISSING_LABELS]
        if na and len(names) > len(na):  # pandas' df.astype(str) writes a missing label as 'nan'
            kept_names = ",".join(n for n in names if n not in na)
            held = listing(f"{n!r} ({counted(counts[n], 'row')})" for n in na)
            warn(f"{csv_path}: column {label_column!r} holds {held}: missing values (as pandas writes NaN), each "
                 f"read as a class of its own; fill in those rows' labels, or leave them out with classes= "
                 f"(--classes {kept_names})", stacklevel=stacklevel + 1)
    else:
        names = _class_list(classes, f"load_csv({csv_path})")
        empty = [n for n in names if n not in counts]
        if empty:
            raise DataError(f"{csv_path}: requested class(es) {listing(map(repr, empty))} have no rows in column "
                            f"{label_column!r} (labels present: {listing(sorted(counts))})", arg="classes")
    if len(names) < 2:
        raise DataError(f"{csv_path}: expected at least two classes in column {label_column!r}, got {names}",
                        arg="classes" if classes is not None else None)
    lookup = {n: i for i, n in enumerate(names)}
    excluded = {label: n for label, n in sorted(counts.items()) if label not in lookup}
    kept = [(image_id, lookup[label]) for image_id, label in rows if label in lookup]
    line = next((blank[image_id] for image_id, _ in kept if image_id in blank), None)
    if line is not None:  # a sample without a group cannot be kept on one side of its group
        raise DataError(f"{csv_path}: line {line}: empty {group_column!r}, which the split groups by; expected a value "
                        "in every row -- fill it in, or split by image: in Python split_by='image', on the command "
                        "line rename the column")
    pooled = Counter(groups[image_id] for image_id, _ in kept if groups.get(image_id) in MISSING_LABELS)
    if pooled:  # kept (refusing would leave runs trained on such a CSV unreadable at eval), but said: unlike "",
        # which is refused above, "NA" grouped every row holding it into one group, placed on one side of the split
        held = listing(f"{v!r} ({counted(n, 'row')})" for v, n in sorted(pooled.items()))
        what = "missing values (as pandas writes NaN), each one's rows" if len(pooled) > 1 else \
            "a missing value (as pandas writes NaN), its rows"
        warn(f"{csv_path}: column {group_column!r} holds {held}: {what} kept as one {group_column} group, on one "
             f"side of the split; give each such row its own {group_column}, or remove those rows from the CSV",
             stacklevel=stacklevel + 1)
    per_patient = Counter(patients[image_id] for image_id, _ in kept if patients.get(image_id))
    if any(n > 1 for n in per_patient.values()):
        warn(f"{csv_path}: split by image, though column {patient_column!r} holds several images of one patient "
             f"({sum(per_patient.values())} images of {counted(len(per_patient), 'patient')}): a patient's images can "
             f"land in train and test, inflating test scores; split by patient with load_dataset(..., "
             f"split_by={patient_column!r}), or on the command line rename the column lesion_id",
             stacklevel=stacklevel + 1)
    root = Path(image_dir) if image_dir else csv_path.parent
    index = {}
    listed = {}  # a folder's image files by stem, for the ids without extension: each folder listed once
    forms = {}  # the folders of ids naming them in the other Unicode form, each found once
    # an id naming a file by its path, relative to root (pat1/view1.png, CheXpert's layout): such ids were told to be
    # stripped to file names, which then repeated (view1 of every patient) and were refused as listed twice
    for image_id in {image_id for image_id, _ in kept if "/" in image_id or "\\" in image_id}:
        p = root / image_id.replace("\\", "/")
        rel = PurePosixPath(image_id.replace("\\", "/")).parent
        if not rel.is_absolute():  # its folders named in the other Unicode form: "listed but not found" until
            # later on 2026-12-07, where the file names alone were compared composed
            p = _folder_in_other_form(root, rel.as_posix(), forms) / p.name
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            found = [p]
        else:  # a path without its extension (pat1/view1), as a name is given, or with it in other case
            # (pat1/view1.png for pat1/view1.PNG): in its own folder only, where the name-wide lookup below read
            # a file of that name from any folder (pat3/view0.png, no pat3/, read pat1/view0.png, another class's)
            if p.parent not in listed:
                listed[p.parent] = _images_by_stem(p.parent)
            found = [q for q in listed[p.parent].get(_composed(p.stem), ()) if q.suffix.lower() == p.suffix.lower()] \
                if p.suffix.lower() in IMAGE_SUFFIXES else list(listed[p.parent].get(_composed(p.name), ()))
        if found:
            index[image_id] = found
    # the names without a folder: an id with one names its file by path, found above or not at all
    wanted = {image_id for image_id, _ in kept if image_id not in index and "/" not in image_id
              and "\\" not in image_id}
    # a name with its extension in other case (img1.jpg for img1.JPG), which the name without it matched: taken
    # where no file has the exact name
    folded = {_composed(Path(i).stem) + Path(i).suffix.lower(): i for i in wanted
              if Path(i).suffix.lower() in IMAGE_SUFFIXES}
    # each id by its composed form: an id typed "lésion 0" names the file macOS's zip wrote decomposed, which until
    # 2026-12-07 was "listed but not found", told to put the image files under the folder holding them
    composed = {_composed(i): i for i in wanted}
    other_case = {}
    for p in sorted(root.rglob("*")) if wanted else ():
        name, stem = _composed(p.name), _composed(p.stem)
        key = composed.get(name, composed.get(stem))  # a name with its extension (img1.png) or without; None: no id's
        other = None if key is not None else folded.get(stem + p.suffix.lower())
        # the names first: the file-system checks (a stat each) only for a file an id may name
        if (key is None and other is None) or p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file() \
                or is_hidden(p, root):
            continue
        if other is None:
            index.setdefault(key, []).append(p)
        else:
            other_case.setdefault(other, []).append(p)
    for image_id, ps in other_case.items():
        index.setdefault(image_id, ps)
    missing = [image_id for image_id, _ in kept if image_id not in index]
    if missing:
        hint = ""
        if any("/" in i or "\\" in i or Path(i).suffix.lower() in IMAGE_SUFFIXES for i in missing[:3]):
            # "holds" read as a claim about the user's column, which held paths; "the CSV's folder" was wrong for
            # an image_dir given
            hint = (f"; {id_column!r} holds file names, each matched anywhere under that folder (img1 or img1.png for "
                    "images/img1.png), or paths relative to it (images/img1.png or images/img1)")
        # the fix last: the count and examples alone left the user to guess whether to move files or edit the CSV
        fix = (f"put the image files (or the folders holding them) under {root}" if len(missing) == len(kept) else
               f"put their image files under {root}, or remove their rows from the CSV")
        names = _names_in_other_case(root, [i for i in missing[:3] if "/" not in i and "\\" not in i])
        cased = next(((i, q) for i in missing[:3] for q in [names.get(i) if "/" not in i and "\\" not in i else
                                                          _path_in_other_case(root, i.replace("\\", "/"))] if q),
                     None)
        if cased:  # Images\CASE000.PNG for images/case000.png, CASE000.PNG for case000.png: "put the image files
            # under" the folder holding them (a bare name's until 2026-12-07)
            hint += f"; {cased[0]} is {cased[1]} in other case"
            fix = "write the ids as the files are named: their folders and names are matched in case"
        raise DataError(f"{csv_path}: {len(missing)} image(s) listed but not found under {root}, "
                        f"e.g. {', '.join(missing[:3])}{hint} -- {fix}")
    for image_id, ps in index.items():
        # byte-identical copies (a download holding its image folders twice, HAM10000_images_part_1/ beside
        # ham10000_images_part_1/) are one image, whichever is read: refused, they were told to pass image_dir, which
        # neither the command line nor load_dataset takes. Each distinct content is kept once: two identical copies
        # beside one that differs were all kept, and the refusal named the identical two, not the one that differs
        distinct = []
        for q in ps:
            if not any(filecmp.cmp(kept_copy, q, shallow=False) for kept_copy in distinct):
                distinct.append(q)
        index[image_id] = distinct
    ambiguous = sorted(i for i, ps in index.items() if len(ps) > 1)
    if ambiguous:  # which copy would be read depended on the file-system order
        first = index[ambiguous[0]]
        paths = [q.relative_to(root).as_posix() for q in first[:2]]
        if first[0].parent == first[1].parent and Path(ambiguous[0]).suffix.lower() in IMAGE_SUFFIXES:
            # v3.png beside v3.png.jpg, whose stem it is: "write the extension" named v3.png.png, no file
            fix = f"write the file's path as the id ({paths[0]} or {paths[1]}) to choose one"
        elif first[0].parent == first[1].parent:  # view1.jpg beside view1.png: no image_dir parts them
            fix = (f"write the extension into the id ({ambiguous[0]}{first[0].suffix} or {ambiguous[0]}"
                   f"{first[1].suffix}) to choose one")
        else:  # a path relative to root names one file too (2026-12-07); image_dir, which it named first, is
            # load_csv's alone: load_dataset and the command line take no such argument
            fix = (f"write the file's path as the id ({paths[0]}) to choose one, or remove the other copies (in "
                   "Python, load_csv(..., image_dir=) reads one folder)")
        raise DataError(f"{csv_path}: {len(ambiguous)} image_id(s) match several files under {root}, e.g. "
                        f"{first[0]} and {first[1]}; {fix}")
    by_file, folders = {}, {}
    for image_id, _ in kept:  # pat1/view1.png and ./pat1/view1.png: one image in two rows, in train and test
        # the folder resolved, not the file: two names linked to one blob (git-annex's, DVC's or a hub cache's store
        # of byte-identical images) are two files of the set, refused as one when the file itself was resolved
        by_file.setdefault(_resolved(index[image_id][0], folders), []).append(image_id)
    twice = next((ids for ids in by_file.values() if len(ids) > 1), None)
    if twice:
        # quoted as written: repr doubled a Windows id's backslashes ('images\\case005.png')
        quoted = " and ".join(repr(i) if "'" in i else f"'{i}'" for i in twice[:2])
        raise DataError(f"{csv_path}: rows {quoted} name the same file; expected one row per image")
    check_images_fit(f"load_csv({csv_path})", len(kept), size, channels=3 if mode == "RGB" else 1)
    arrays, stats = read_images([index[image_id][0] for image_id, _ in kept], size, mode, bit_depth)
    _check_16_bit(stats, csv_path, bit_depth, stacklevel)
    _check_upscale(stats, csv_path, size, size_given, stacklevel)
    x, y = _stack(arrays, [label for _, label in kept])

    def digest(id_as):
        return _samples_digest((id_as(image_id), names[label], *([groups[image_id]] if group_column else []))
                               for image_id, label in kept)

    as_read = {image_id: _id_as_read(image_id) for image_id, _ in kept}
    recorded = {"samples_digest": digest(as_read.get)}
    # the digests an earlier run recorded for these same rows, each kept where it differs from those before it
    for key, id_as, wanted in (
            # before ids' "\\" were read as "/" (2026-12-07): as written, which ids holding only "\\" are
            ("samples_digest_backslashed", lambda image_id: image_id.replace("/", "\\"),
             any("/" in i or "\\" in i for i, _ in kept)),
            # as written: rows mixing "/" and "\\" (then), or ./a/b.png, a//b.png (ids normalized since)
            ("samples_digest_as_written", str, any(as_read[i] != i for i, _ in kept)),
            # from 2026-12-07 until ids were normalized: "\\" as "/", "./" and doubled "/" kept
            ("samples_digest_slashed", lambda image_id: image_id.replace("\\", "/"),
             any(as_read[i] != i.replace("\\", "/") for i, _ in kept))):
        value = digest(id_as) if wanted else None
        if value is not None and value not in recorded.values():
            recorded[key] = value
    info = DatasetInfo(
        name=csv_path.stem, num_classes=len(names), in_channels=x.shape[1], image_size=size,
        class_names=tuple(names), positive_class=_positive(names), synthetic=False, source=str(csv_path),
        extra={"excluded_samples": sum(excluded.values()), "excluded_labels": excluded,
               "class_counts": {n: counts[n] for n in names},  # eval checks the data is unchanged
               # each id as the lookup reads it: images\\a.png, ./images/a.png and images//a.png name one file
               **recorded,
               **_bit_depth_record(bit_depth),
               **({"split_by": group_column} if group_column else {})},  # image splits: records as before
    )
    if group_column is None:
        return splits_from_arrays(x, y, info, seed, rare_classes=rare_classes, stacklevel=stacklevel + 1)
    return splits_from_arrays(x, y, info, seed, groups=[groups[image_id] for image_id, _ in kept],
                              group_name=group_column, rare_classes=rare_classes, stacklevel=stacklevel + 1)
