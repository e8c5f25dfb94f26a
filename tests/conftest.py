import pytest
import torch

from hub_server import HubServer, configure_hub_client


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """Start a loopback Hub server and point huggingface_hub and diffusers at it for one test.

    Yields the [`HubServer`], whose `seed_repo`, `read_file`, `list_files` and `find_requests` helpers prepare repos
    and inspect uploads. The Hub cache lives under `tmp_path`, so nothing is cached between tests, and the server's
    token is set as `HF_TOKEN`.
    """
    server = HubServer().start()
    try:
        configure_hub_client(monkeypatch, server, hf_home=tmp_path / "hf_home")
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def single_thread():
    """Run each test on one intra-op thread. The tensors are tiny, and on a busy 2-core machine a second
    OpenMP thread made a forward pass of a tiny model take 2 s instead of 12 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
