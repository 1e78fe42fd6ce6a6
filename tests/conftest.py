import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: tiny networks run fastest so, and in-process builds then match the
    single-threaded subprocesses that the determinism tests compare them with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub directory, and no network: downloads fail as they do offline."""
    import urllib.error

    from cmt.lpips import cached_lpips

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cached_lpips.cache_clear()
    yield tmp_path
    cached_lpips.cache_clear()
