"""The fingerprint of the C++/CUDA sources (csrc/) a robust_ops._C is built from. setup.py bakes it into _C, loading
this file by path (importing the package would load _C); `import robust_ops` compares it with the csrc/ beside the
package in a source checkout (robust_ops/_extension.py). Standard library only, for setup.py."""

import hashlib
from pathlib import Path

# what setup.py compiles or lists as the extension's depends (their union covers csrc/: test_extension.py)
SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def source_digest(csrc):
    """sha256 (hex) of every C++/CUDA file under ``csrc``: each one's relative path, size and bytes, in path order."""
    csrc = Path(csrc)
    files = sorted((path.relative_to(csrc).as_posix(), path) for path in csrc.rglob("*")
                   if path.suffix in SUFFIXES and path.is_file())
    digest = hashlib.sha256()
    for name, path in files:
        data = path.read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
