"""Tests of the loopback Hub server through the real huggingface_hub and diffusers clients."""

import json
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from huggingface_hub import (
    HfApi,
    hf_hub_download,
    list_repo_files,
    model_info,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from hub_server import git_blob_oid


REPO_ID = "test-user/tiny-repo"


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for relative_path, content in files.items():
        path = root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


FILES = {
    "model_index.json": b'{"_class_name": "DDPMPipeline"}',
    "unet/config.json": b'{"sample_size": 8}',
    "unet/diffusion_pytorch_model.safetensors": bytes(range(256)) * 40,
    "scheduler/scheduler_config.json": b'{"num_train_timesteps": 10}',
}


@pytest.fixture
def seeded_repo(hub_server, tmp_path):
    folder = _write_folder(tmp_path / "seed", FILES)
    commit_oid = hub_server.seed_repo(REPO_ID, folder)
    return commit_oid


def test_client_points_at_server(hub_server):
    assert huggingface_hub.constants.ENDPOINT == hub_server.url
    assert huggingface_hub.hf_api.api.endpoint == hub_server.url
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert huggingface_hub.constants.HF_HUB_DISABLE_XET is True
    assert Path(huggingface_hub.constants.HF_HUB_CACHE).is_relative_to(Path(huggingface_hub.constants.HF_HOME))


def test_model_info_siblings_and_sha(hub_server, seeded_repo):
    info = model_info(REPO_ID)

    assert info.id == REPO_ID
    assert info.sha == seeded_repo
    assert sorted(sibling.rfilename for sibling in info.siblings) == sorted([".gitattributes", *FILES])


def test_model_info_blob_metadata(hub_server, seeded_repo):
    info = model_info(REPO_ID, files_metadata=True)
    siblings = {sibling.rfilename: sibling for sibling in info.siblings}

    weights = FILES["unet/diffusion_pytorch_model.safetensors"]
    assert siblings["unet/diffusion_pytorch_model.safetensors"].size == len(weights)
    assert siblings["unet/diffusion_pytorch_model.safetensors"].blob_id == git_blob_oid(weights)


def test_model_info_at_older_revision(hub_server, seeded_repo):
    newer_oid = hub_server.seed_repo(REPO_ID, files={"extra.txt": b"added later"})

    assert model_info(REPO_ID).sha == newer_oid
    assert "extra.txt" in {sibling.rfilename for sibling in model_info(REPO_ID).siblings}
    old_info = model_info(REPO_ID, revision=seeded_repo)
    assert old_info.sha == seeded_repo
    assert "extra.txt" not in {sibling.rfilename for sibling in old_info.siblings}


def test_list_repo_files_recursive(hub_server, seeded_repo):
    assert sorted(list_repo_files(REPO_ID)) == sorted([".gitattributes", *FILES])


def test_list_repo_tree_folders_and_paths(hub_server, seeded_repo):
    api = HfApi()

    root = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(REPO_ID)}
    assert root == {
        "scheduler": "RepoFolder",
        "unet": "RepoFolder",
        ".gitattributes": "RepoFile",
        "model_index.json": "RepoFile",
    }

    unet_entries = list(api.list_repo_tree(REPO_ID, path_in_repo="unet"))
    assert sorted(entry.path for entry in unet_entries) == [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]

    paths_info = api.get_paths_info(REPO_ID, ["unet", "model_index.json", "missing.txt"])
    assert sorted((entry.path, type(entry).__name__) for entry in paths_info) == [
        ("model_index.json", "RepoFile"),
        ("unet", "RepoFolder"),
    ]


def test_list_repo_tree_missing_folder(hub_server, seeded_repo):
    with pytest.raises(EntryNotFoundError):
        list(HfApi().list_repo_tree(REPO_ID, path_in_repo="no-such-folder"))


def test_hf_hub_download_content_and_headers(hub_server, seeded_repo):
    path = hf_hub_download(REPO_ID, "unet/diffusion_pytorch_model.safetensors")

    assert Path(path).read_bytes() == FILES["unet/diffusion_pytorch_model.safetensors"]
    assert Path(path).is_relative_to(Path(huggingface_hub.constants.HF_HUB_CACHE))
    assert seeded_repo in Path(path).parts

    head_requests = hub_server.find_requests("HEAD", "/resolve/main/unet/diffusion_pytorch_model.safetensors")
    get_requests = hub_server.find_requests("GET", "/unet/diffusion_pytorch_model.safetensors")
    assert len(head_requests) == 1
    assert len(get_requests) == 1
    assert get_requests[0].authorization == f"Bearer {hub_server.token}"


def test_hf_hub_download_cached_second_time(hub_server, seeded_repo):
    first_path = hf_hub_download(REPO_ID, "model_index.json")
    hub_server.clear_requests()

    second_path = hf_hub_download(REPO_ID, "model_index.json")

    assert second_path == first_path
    assert hub_server.find_requests("GET") == []
    assert len(hub_server.find_requests("HEAD")) == 1


def test_hf_hub_download_errors(hub_server, seeded_repo):
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "missing.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO_ID, "model_index.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/no-such-repo", "model_index.json")


def test_resolve_range_request(hub_server, seeded_repo):
    url = f"{hub_server.url}/{REPO_ID}/resolve/main/unet/diffusion_pytorch_model.safetensors"
    weights = FILES["unet/diffusion_pytorch_model.safetensors"]

    response = get_session().get(url, headers={"Range": "bytes=100-"})

    assert response.status_code == 206
    assert response.content == weights[100:]
    assert response.headers["Content-Range"] == f"bytes 100-{len(weights) - 1}/{len(weights)}"


def test_snapshot_download_allow_patterns(hub_server, seeded_repo):
    folder = Path(snapshot_download(REPO_ID, allow_patterns=["unet/*", "model_index.json"]))

    downloaded = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    assert downloaded == ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert (folder / "unet/config.json").read_bytes() == FILES["unet/config.json"]
    assert folder.name == seeded_repo


def test_create_repo_in_token_namespace(hub_server):
    repo_url = HfApi().create_repo("fresh-repo")

    assert repo_url.repo_id == f"{hub_server.username}/fresh-repo"
    assert repo_url.endpoint == hub_server.url
    assert hub_server.list_files("test-user/fresh-repo") == [".gitattributes"]
    assert hub_server.find_requests("POST", "/api/repos/create")[0].authorization == f"Bearer {hub_server.token}"


def test_create_repo_exists(hub_server):
    api = HfApi()
    api.create_repo("test-user/twice")

    assert api.create_repo("test-user/twice", exist_ok=True).repo_id == "test-user/twice"
    with pytest.raises(HfHubHTTPError) as error_info:
        api.create_repo("test-user/twice")
    assert error_info.value.response.status_code == 409


def test_create_repo_without_token(hub_server):
    with pytest.raises(HfHubHTTPError) as error_info:
        HfApi().create_repo("test-user/anonymous", token=False)

    assert error_info.value.response.status_code == 401
    assert not hub_server.has_repo("test-user/anonymous")


def test_create_repo_other_namespace(hub_server):
    with pytest.raises(HfHubHTTPError) as error_info:
        HfApi().create_repo("someone-else/repo")

    assert error_info.value.response.status_code == 403


def test_upload_folder_round_trip(hub_server, tmp_path):
    folder = _write_folder(tmp_path / "upload", FILES)
    HfApi().create_repo("test-user/uploaded")

    commit_info = upload_folder(repo_id="test-user/uploaded", folder_path=folder, commit_message="Add tiny files")

    assert hub_server.list_files("test-user/uploaded") == sorted([".gitattributes", *FILES])
    for relative_path, content in FILES.items():
        assert hub_server.read_file("test-user/uploaded", relative_path) == content
    assert commit_info.oid == hub_server.list_commits("test-user/uploaded")[0].oid
    assert hub_server.list_commits("test-user/uploaded")[0].title == "Add tiny files"
    for route in ("/preupload/main", "/commit/main"):
        requests = hub_server.find_requests("POST", route)
        assert len(requests) == 1
        assert requests[0].authorization == f"Bearer {hub_server.token}"


def test_upload_folder_skips_unchanged_files(hub_server, tmp_path):
    folder = _write_folder(tmp_path / "upload", FILES)
    HfApi().create_repo("test-user/unchanged")
    upload_folder(repo_id="test-user/unchanged", folder_path=folder)
    commits_before = len(hub_server.list_commits("test-user/unchanged"))

    upload_folder(repo_id="test-user/unchanged", folder_path=folder)

    # The preupload route returns each file's blob id, so the client sees no change and sends no commit.
    assert len(hub_server.list_commits("test-user/unchanged")) == commits_before
    assert len(hub_server.find_requests("POST", "/commit/main")) == 1


def test_upload_folder_delete_patterns(hub_server, tmp_path):
    hub_server.seed_repo("test-user/cleanup", files={"old/a.bin": b"a", "old/b.bin": b"b", "keep.txt": b"k"})
    folder = _write_folder(tmp_path / "upload", {"new.txt": b"n"})

    upload_folder(repo_id="test-user/cleanup", folder_path=folder, delete_patterns=["old/*"])

    assert hub_server.list_files("test-user/cleanup") == [".gitattributes", "keep.txt", "new.txt"]


def test_delete_file(hub_server, seeded_repo):
    HfApi().delete_file("model_index.json", REPO_ID)

    assert "model_index.json" not in hub_server.list_files(REPO_ID)
    with pytest.raises(EntryNotFoundError):
        HfApi().delete_file("model_index.json", REPO_ID)


def test_private_repo_needs_token(hub_server):
    hub_server.seed_repo("test-user/private", files={"a.txt": b"secret"}, private=True)

    assert model_info("test-user/private").private is True
    with pytest.raises(RepositoryNotFoundError):
        model_info("test-user/private", token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/private", "a.txt", token=False)


def test_invalid_token_rejected(hub_server, seeded_repo):
    with pytest.raises(HfHubHTTPError) as error_info:
        model_info(REPO_ID, token="hf_not_a_valid_token")

    assert error_info.value.response.status_code == 401


def test_whoami(hub_server):
    assert HfApi().whoami()["name"] == hub_server.username


def test_read_file_missing(hub_server, seeded_repo):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        hub_server.read_file(REPO_ID, "missing.txt")


def _tiny_ddpm_pipeline() -> DDPMPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))


def test_ddpm_pipeline_push_and_load(hub_server):
    pipeline = _tiny_ddpm_pipeline()

    pipeline.push_to_hub("tiny-ddpm")
    loaded = DDPMPipeline.from_pretrained(f"{hub_server.username}/tiny-ddpm")

    repo_files = hub_server.list_files("test-user/tiny-ddpm")
    assert "unet/diffusion_pytorch_model.safetensors" in repo_files
    assert "README.md" in repo_files
    model_index = json.loads(hub_server.read_file("test-user/tiny-ddpm", "model_index.json"))
    assert model_index["unet"] == ["diffusers", "UNet2DModel"]

    assert isinstance(loaded.unet, UNet2DModel)
    assert loaded.scheduler.config.num_train_timesteps == 10
    for name, tensor in pipeline.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name
    assert hub_server.find_requests("GET", "/resolve/")

    images = loaded(batch_size=1, num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (1, 8, 8, 1)
