"""The one place files are downloaded: EDM2 checkpoints, LPIPS trunks, the Inception detector.

Everything goes under one cache directory, `cache_dir()`: the environment variable `CMT_CACHE`,
default `~/.cache/cmt`, with one folder per kind of file (`edm2/`, `lpips/`, `fid/`). `fetch`
returns the cached file, or downloads it there (with a progress bar, to a temporary name that is
renamed when complete, so an interrupted download never looks finished). Offline, it raises
`DownloadError` naming the file and the exact path to put it at, so a copy made by hand is used
from then on.

torch hub: LPIPS's trunks are torchvision's ImageNet files, which torchvision (and earlier versions
of cmt) keep in torch hub's `checkpoints/` folder (`torch.hub.get_dir()`, i.e. `$TORCH_HOME/hub`).
A copy already there is read in place (`also_look_in`); new downloads go to the cmt cache only.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import tqdm

from cmt.outputs import atomic_path

CACHE_ENV = "CMT_CACHE"
DEFAULT_CACHE = "~/.cache/cmt"
_CHUNK = 1 << 20


class DownloadError(FileNotFoundError):
    """A file that is neither at hand nor downloadable; the message says where to put it."""


def cache_dir() -> Path:
    """The cache directory: `$CMT_CACHE`, default `~/.cache/cmt` (read at every call)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def is_url(text) -> bool:
    return urllib.parse.urlparse(str(text)).scheme in ("http", "https")


def url_filename(url: str) -> str:
    """The last path component of `url` (`.../edm2-img64-s-1073741-0.075.pkl` -> that name)."""
    return Path(urllib.parse.urlparse(url).path).name


def fetch(url_or_path, *, subdir: str, filename: str | None = None, sha256: str | None = None,
          also_look_in=()) -> Path:
    """The local path of a file given by path or http(s) URL, downloading a URL once into the cache.

    A local path is returned as is (`DownloadError` if it is not a file). A URL maps to
    `cache_dir() / subdir / filename` (default: the URL's file name); an existing file there, or
    in one of the folders `also_look_in`, is returned without any network access. Otherwise the
    file is downloaded there. `sha256`: the expected hex digest of a download, or its first
    characters (torch hub file names carry the first 8); a mismatch discards the download.
    """
    if not is_url(url_or_path):
        path = Path(url_or_path).expanduser()
        if not path.is_file():
            raise DownloadError(f"no such file {path}")
        return path
    url = str(url_or_path)
    name = filename or url_filename(url)
    target = cache_dir() / subdir / name
    for candidate in (target, *(Path(folder) / name for folder in also_look_in)):
        if candidate.is_file():
            return candidate
    try:
        _download(url, target, sha256)
    except (urllib.error.URLError, OSError, ValueError) as error:
        elsewhere = "".join(f" (or in {Path(folder)}/)" for folder in also_look_in)
        raise DownloadError(f"could not download {url} ({error}). Offline? Download {name} by hand and put it "
                            f"at {target}{elsewhere}") from error
    return target


def _download(url: str, target: Path, sha256: str | None) -> None:
    digest = hashlib.sha256()
    with atomic_path(target) as partial:   # beside the target: the final rename is atomic
        with open(partial, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm.tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and not digest.hexdigest().startswith(sha256.lower()):
            raise ValueError(f"downloaded file has sha256 {digest.hexdigest()}, expected {sha256}...")
