import pytest

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
