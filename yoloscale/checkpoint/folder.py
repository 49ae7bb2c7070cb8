"""A checkpoint folder that is safe at every instant and checked when read.

Writing (`write`), in this order, each step durable (fsync) before the next:
  1. everything goes into `checkpoints/.tmp-NAME/` (a leftover of a killed save is removed first);
  2. `MANIFEST.json`: size and XXH3-128 hash of every file (damage, not tampering, is what it detects: a fast
     non-cryptographic digest, ~10x BLAKE2b's speed; manifests of BLAKE2b still verify), then the `COMPLETE` marker;
  3. the switch is a rename: `.tmp-NAME` -> `NAME`. If `NAME` exists (the same step saved twice), it is first
     renamed aside to `.old-NAME`, and removed only after the switch: no folder is ever edited in place;
  4. only then are older checkpoints removed (the newest `keep`, and those marked KEEP, stay).
A folder counts as a checkpoint once it has its marker, whatever its name (`.tmp-`/`.old-` included: a kill between
the renames of step 3 leaves the complete copy there), and it is resumed from only if its manifest verifies.
`YOLOSCALE_FAULT=<point>[@N]` makes the process die at that point of the protocol (tests/unit/test_survival.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import xxhash

from yoloscale.errors import UserError, warn

MARKER, MANIFEST, KEEP = "COMPLETE", "MANIFEST.json", "KEEP"
_NAME = re.compile(r"^(?:\.tmp-|\.old-)?(step-\d{8}(?:-end)?)$")
FAULT_POINTS = ("written", "manifest", "complete", "aside", "switched", "rotated")


_reached: dict[str, int] = {}


def fault(point: str) -> None:
    """Die here if the environment asks for it (`YOLOSCALE_FAULT=point` or `point@N`: the N-th time this point is
    reached), a kill at an exact instant of the protocol, for the tests."""
    want = os.environ.get("YOLOSCALE_FAULT", "")
    if not want:
        return
    name, _, nth = want.partition("@")
    if name == point:
        _reached[point] = _reached.get(point, 0) + 1
        if _reached[point] == int(nth or 1):
            os._exit(137)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MARKER, MANIFEST, KEEP))


DIGEST = "xxh3_128"  # what new manifests record
_DIGESTS = {"xxh3_128": xxhash.xxh3_128, "blake2b": lambda: hashlib.blake2b(digest_size=16)}


def _digest(path: Path, kind: str = DIGEST) -> str:
    h = _DIGESTS[kind]()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def seal(folder: Path) -> None:
    """Fsync every file, write the manifest, then the marker (rank 0, after every rank has written)."""
    manifest = {}
    for p in _files(folder):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        manifest[str(p.relative_to(folder))] = {"size": p.stat().st_size, DIGEST: _digest(p)}
    _write_durably(folder / MANIFEST, json.dumps(manifest, indent=1))
    fault("manifest")
    _write_durably(folder / MARKER, "")
    for d in sorted({p.parent for p in _files(folder)} | {folder}, key=lambda d: -len(d.parts)):
        fsync_dir(d)
    fault("complete")


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def switch(tmp: Path, final: Path) -> None:
    """Rename the sealed `tmp` into place; an existing `final` goes aside first and is removed after."""
    root = final.parent
    aside = root / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        fsync_dir(root)
        fault("aside")
    os.replace(tmp, final)
    fsync_dir(root)
    fault("switched")
    shutil.rmtree(aside, ignore_errors=True)


def step_name(folder: Path) -> str | None:
    """`step-NNNNNNNN[-end]` for a checkpoint folder of any prefix, else None."""
    m = _NAME.match(folder.name)
    return m.group(1) if m else None


def complete(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first; of the same step, the renamed-into-place copy last."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_name(p) and (p / MARKER).is_file()]
    rank = {".old-": 0, ".tmp-": 1}
    return sorted(found, key=lambda p: (step_name(p), rank.get(p.name[:5], 2)))


def repair(root: Path) -> None:
    """A step whose save was killed between the renames has a complete copy under `.tmp-`/`.old-` only: rename the
    best copy into place."""
    for p in reversed(complete(root)):
        final = root / step_name(p)
        if p != final and not final.exists():
            os.replace(p, final)
            fsync_dir(root)


def rotate(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints (never those marked KEEP) and the leftovers of killed
    saves. Only what this writer made is removed: folders with its names (`step-N[-end]`, `.tmp-`/`.old-` ones), and
    of those only the files their manifest names (a leftover without a manifest: wholly). Anything else in
    checkpoints/ (a copy the user made, notes) stays, with a one-line note the first time it is seen."""
    repair(root)
    done = complete(root)
    newest = {step_name(p) for p in done[-keep:]}
    for p in sorted(root.iterdir()):
        name = step_name(p)
        if name is None or not p.is_dir():
            _note_foreign(p)
            continue
        if (p / KEEP).exists() or (p.name == name and name in newest):
            continue
        if p.name == name and not (p / MANIFEST).is_file():
            _note_foreign(p)  # a step-named folder our writer did not seal: not ours to delete
            continue
        _remove_checkpoint(p)
    fault("rotated")


_noted: set[Path] = set()


def _note_foreign(path: Path) -> None:
    if path not in _noted:
        _noted.add(path)

        warn(f"'{path}' is not a checkpoint this run wrote: left in place (old checkpoints are rotated around it)")


def _remove_checkpoint(folder: Path) -> None:
    """A sealed checkpoint: the files its manifest names, its marker and manifest, then the folders left empty;
    anything else in it stays (with a note). A leftover of a killed save (no manifest yet): removed whole."""
    try:
        listed = list(json.loads((folder / MANIFEST).read_text()))
    except (OSError, ValueError):
        shutil.rmtree(folder, ignore_errors=True)
        return
    for rel in [*listed, KEEP, MARKER, MANIFEST]:
        path = (folder / rel).resolve()
        if path.is_relative_to(folder.resolve()) and path.is_file():
            path.unlink()
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda d: -len(d.parts)) + [folder]:
        with contextlib.suppress(OSError):
            d.rmdir()  # only if empty
    if folder.exists():
        _note_foreign(folder)


def verify(folder: Path) -> str | None:
    """None if the folder's files match its manifest, else what is wrong (one line)."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"its manifest is unreadable ({type(e).__name__})"
    for rel, want in manifest.items():
        p = folder / rel
        if not p.is_file():
            return f"'{rel}' is missing"
        if p.stat().st_size != want["size"]:
            return f"'{rel}' has {p.stat().st_size} bytes, the manifest says {want['size']}"
        kind = next((k for k in _DIGESTS if k in want), None)
        if kind is None:
            return f"its manifest names no hash for '{rel}'"
        if _digest(p, kind) != want[kind]:
            return f"'{rel}' does not match its hash (damaged)"
    extra = [str(p.relative_to(folder)) for p in _files(folder) if str(p.relative_to(folder)) not in manifest]
    return f"'{extra[0]}' is not in its manifest" if extra else None


def io_error(
    e: BaseException, path: Path, needed: int, what: str = "a checkpoint", previous: Path | None = None
) -> UserError | None:
    """A one-line UserError for a full disk, a read-only file system or a permission problem; None otherwise.
    `previous`: the last complete checkpoint, if there is one (a resume starts from it)."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code == errno.ENOSPC or "No space left" in text or "unexpected pos" in text:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
        after = (
            f" The last complete checkpoint, '{previous.name}', is intact (resume=auto)."
            if previous is not None
            else ""
        )
        return UserError(
            f"no space left on the device writing '{path}': {what} needs about {needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free. The half-written file was removed.{after}"
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write '{path}': {os.strerror(code)}. Choose a writable project=.")
    return None


def size_of(folder: Path | None) -> int:
    return sum(p.stat().st_size for p in _files(folder)) if folder is not None and folder.is_dir() else 0
