"""cmt.download: one cache directory, atomic downloads, clear offline errors (no real network)."""
import hashlib
import io
import urllib.error
import urllib.request

import pytest

from cmt.download import DownloadError, cache_dir, fetch


class FakeResponse(io.BytesIO):
    def __init__(self, payload):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CMT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def serve(monkeypatch, payload):
    calls = []

    def urlopen(url, timeout=None):
        calls.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


def test_cache_dir_is_the_one_setting(cache, monkeypatch):
    assert cache_dir() == cache
    monkeypatch.delenv("CMT_CACHE")
    assert str(cache_dir()).endswith(".cache/cmt")


def test_fetch_downloads_once_into_the_cache(cache, monkeypatch):
    payload = b"weights" * 1000
    calls = serve(monkeypatch, payload)
    url = "https://example.invalid/models/net-0123.pkl"
    path = fetch(url, subdir="edm2", sha256=hashlib.sha256(payload).hexdigest()[:8])
    assert path == cache / "edm2" / "net-0123.pkl" and path.read_bytes() == payload
    assert fetch(url, subdir="edm2") == path and len(calls) == 1   # cached: no second download
    assert fetch(url, subdir="other", filename="renamed.bin").name == "renamed.bin"
    assert sorted(p.name for p in (cache / "edm2").iterdir()) == ["net-0123.pkl"]


def test_fetch_refuses_a_wrong_digest_and_leaves_nothing(cache, monkeypatch):
    serve(monkeypatch, b"tampered")
    with pytest.raises(DownloadError, match="sha256"):
        fetch("https://example.invalid/a/file-deadbeef.pth", subdir="lpips", sha256="deadbeef")
    assert not (cache / "lpips").exists() or not list((cache / "lpips").iterdir())


def test_fetch_offline_names_the_file_and_where_to_put_it(cache, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    elsewhere = tmp_path / "hub" / "checkpoints"
    with pytest.raises(DownloadError) as error:
        fetch("https://example.invalid/x/trunk-12345678.pth", subdir="lpips", also_look_in=[elsewhere])
    message = str(error.value)
    assert "trunk-12345678.pth by hand" in message and str(cache / "lpips" / "trunk-12345678.pth") in message
    assert str(elsewhere) in message
    elsewhere.mkdir(parents=True)
    (elsewhere / "trunk-12345678.pth").write_bytes(b"x")
    assert fetch("https://example.invalid/x/trunk-12345678.pth", subdir="lpips",
                 also_look_in=[elsewhere]) == elsewhere / "trunk-12345678.pth"


def test_fetch_local_paths(tmp_path):
    (tmp_path / "here.pt").write_bytes(b"x")
    assert fetch(tmp_path / "here.pt", subdir="fid") == tmp_path / "here.pt"
    with pytest.raises(DownloadError, match="no such file"):
        fetch(tmp_path / "missing.pt", subdir="fid")
