# Copyright 2025 The diffusers-cunet developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Loopback HTTP server that implements the part of the Hugging Face Hub API the test suite needs.

Tests start a [`HubServer`] on 127.0.0.1 and call [`configure_hub_client`], so the real `huggingface_hub` and
`diffusers` client code (model info, tree listing, `hf_hub_download`, `snapshot_download`, `create_repo`,
`upload_folder`, `push_to_hub`, `DiffusionPipeline.from_pretrained`) talks to it instead of huggingface.co.

The routes, headers and JSON shapes follow what huggingface_hub 2.4.0 sends and parses (`hf_api.py`,
`file_download.py`, `_commit_api.py`, `utils/_http.py`). Repositories live in memory. Every file is stored as a
regular git blob: the preupload route always returns `"uploadMode": "regular"` and the resolve route never sends
Xet headers, so uploads travel base64-encoded inside the commit request and downloads are plain HTTP GETs.
"""

import base64
import hashlib
import json
import logging
import re
import sys
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


logger = logging.getLogger(__name__)

DEFAULT_TOKEN = "hf_loopback_test_token"
DEFAULT_USERNAME = "test-user"
DEFAULT_BRANCH = "main"

# The URL path prefix of each repo type, as `huggingface_hub.constants.REPO_TYPES_URL_PREFIXES` writes it.
_URL_PREFIX_BY_REPO_TYPE = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_TYPE_BY_API_SEGMENT = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO_TYPE_BY_URL_SEGMENT = {"datasets": "dataset", "spaces": "space"}

# The Hub creates every repo with a `.gitattributes` file in its first commit.
_INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n" b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
)

_RANGE_PATTERN = re.compile(r"^bytes=(\d*)-(\d*)$")


def git_blob_oid(content: bytes) -> str:
    """Return the git blob SHA-1 of `content`, which the Hub reports as the `oid` and `ETag` of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _utc_timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request received by the server.

    Attributes:
        method (`str`): HTTP method, such as `"GET"` or `"HEAD"`.
        path (`str`): URL path as sent, still percent-encoded, without the query string.
        query (`dict[str, list[str]]`): Parsed query string.
        headers (`dict[str, str]`): Request headers with lower-case names.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    @property
    def authorization(self) -> str | None:
        """The `Authorization` header, for example `"Bearer hf_..."`, or `None` when the client sent none."""
        return self.headers.get("authorization")


@dataclass
class HubCommit:
    """A commit of a repo held by the server: its full file snapshot, not a diff."""

    oid: str
    parent_oid: str | None
    title: str
    description: str
    files: dict[str, bytes]
    created_at: datetime


@dataclass
class HubRepo:
    """A repo held by the server: its branches (name to commit id) and every commit by id."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: datetime
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, HubCommit] = field(default_factory=dict)


class HubAPIError(Exception):
    """An error the server returns as an HTTP response, with the `X-Error-Code` that `hf_raise_for_status` maps."""

    def __init__(self, status: HTTPStatus, message: str, error_code: str | None = None, commit_oid: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.commit_oid = commit_oid


class HubStore:
    """In-memory repositories with git-like commits, branches and blob ids. All methods are thread-safe."""

    def __init__(self):
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], HubRepo] = {}

    # Repositories

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool = False) -> None:
        """Create an empty repo whose `main` branch contains one commit with a `.gitattributes` file.

        Raises:
            `HubAPIError`: with status 409 if the repo already exists.
        """
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                raise HubAPIError(HTTPStatus.CONFLICT, f"You already created this {repo_type} repo: {repo_id}")
            created_at = datetime.now(timezone.utc)
            repo = HubRepo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=created_at)
            self._repos[key] = repo
            self._append_commit(repo, DEFAULT_BRANCH, {".gitattributes": _INITIAL_GITATTRIBUTES}, "initial commit", "")

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self._lock:
            if self._repos.pop((repo_type, repo_id), None) is None:
                raise HubAPIError(HTTPStatus.NOT_FOUND, f"Repository not found: {repo_id}", "RepoNotFound")

    def has_repo(self, repo_type: str, repo_id: str) -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def get_repo(self, repo_type: str, repo_id: str) -> HubRepo:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubAPIError(HTTPStatus.NOT_FOUND, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    # Revisions and commits

    def get_commit(self, repo: HubRepo, revision: str) -> HubCommit:
        """Resolve a branch name or a full 40-character commit id to a commit of `repo`."""
        with self._lock:
            commit_oid = repo.branches.get(revision)
            if commit_oid is None and revision in repo.commits:
                commit_oid = revision
            if commit_oid is None:
                raise HubAPIError(
                    HTTPStatus.NOT_FOUND, f"Invalid rev id: {revision} in {repo.repo_id}", "RevisionNotFound"
                )
            return repo.commits[commit_oid]

    def list_commits(self, repo: HubRepo, revision: str) -> list[HubCommit]:
        """Return the commits reachable from `revision`, newest first."""
        with self._lock:
            history = []
            commit: HubCommit | None = self.get_commit(repo, revision)
            while commit is not None:
                history.append(commit)
                commit = repo.commits.get(commit.parent_oid) if commit.parent_oid is not None else None
            return history

    def commit(
        self,
        repo: HubRepo,
        branch: str,
        *,
        title: str,
        description: str = "",
        additions: dict[str, bytes] | None = None,
        deleted_files: Iterable[str] = (),
        deleted_folders: Iterable[str] = (),
        parent_oid: str | None = None,
    ) -> HubCommit:
        """Apply additions and deletions on top of the head of `branch` and return the new commit.

        Raises:
            `HubAPIError`: 404 if the branch or a deleted path does not exist, 412 if `parent_oid` is given and is not
                the branch head.
        """
        with self._lock:
            head = self.get_commit(repo, branch)
            if branch not in repo.branches:
                raise HubAPIError(
                    HTTPStatus.BAD_REQUEST,
                    f"Cannot commit to {branch!r} because it is a commit id, not a branch. Commit to a branch such as"
                    f" {DEFAULT_BRANCH!r}.",
                )
            if parent_oid is not None and parent_oid != head.oid:
                raise HubAPIError(
                    HTTPStatus.PRECONDITION_FAILED,
                    f"A commit has happened since {parent_oid}. The head of {branch} is now {head.oid}.",
                )

            files = dict(head.files)
            # huggingface_hub searches the error for this message to add a hint about folder deletes.
            for path in deleted_files:
                if path not in files:
                    raise HubAPIError(
                        HTTPStatus.NOT_FOUND, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                    )
                del files[path]
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                matching = [path for path in files if path.startswith(prefix)]
                if not matching:
                    raise HubAPIError(
                        HTTPStatus.NOT_FOUND, f"A folder with this name doesn't exist: {folder}", "EntryNotFound"
                    )
                for path in matching:
                    del files[path]
            files.update(additions or {})
            return self._append_commit(repo, branch, files, title, description)

    def _append_commit(
        self, repo: HubRepo, branch: str, files: dict[str, bytes], title: str, description: str
    ) -> HubCommit:
        parent_oid = repo.branches.get(branch)
        # A random salt keeps commit ids unique across repos and server instances, so the client-side cache of one
        # test can never match a commit of another test.
        digest_input = json.dumps(
            {"parent": parent_oid, "title": title, "files": {p: git_blob_oid(c) for p, c in files.items()}},
            sort_keys=True,
        ).encode() + uuid.uuid4().bytes
        commit = HubCommit(
            oid=hashlib.sha1(digest_input).hexdigest(),
            parent_oid=parent_oid,
            title=title,
            description=description,
            files=files,
            created_at=datetime.now(timezone.utc),
        )
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


def _file_entry(path: str, content: bytes) -> dict[str, Any]:
    return {"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path}


def _folder_entry(path: str, files: dict[str, bytes]) -> dict[str, Any]:
    # Not a real git tree id: a SHA-1 over the folder's file ids, which changes exactly when the folder changes.
    prefix = path + "/"
    listing = "".join(f"{p}:{git_blob_oid(c)}\n" for p, c in sorted(files.items()) if p.startswith(prefix))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "path": path}


def list_tree_entries(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict[str, Any]]:
    """Return the `/tree` entries of `folder` ("" for the repo root), folders first as the Hub sorts them.

    Raises:
        `HubAPIError`: 404 `EntryNotFound` if `folder` contains no file.
    """
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    folder_paths: set[str] = set()
    file_paths: list[str] = []
    for path in files:
        if not path.startswith(prefix):
            continue
        relative_parts = path[len(prefix) :].split("/")
        if not recursive and len(relative_parts) > 1:
            folder_paths.add(prefix + relative_parts[0])
            continue
        file_paths.append(path)
        # A recursive listing also names every folder on the way to each file.
        for depth in range(1, len(relative_parts)):
            folder_paths.add(prefix + "/".join(relative_parts[:depth]))

    if prefix and not file_paths and not folder_paths:
        raise HubAPIError(HTTPStatus.NOT_FOUND, f"Entry not found: {folder}", "EntryNotFound")

    folders = [_folder_entry(path, files) for path in sorted(folder_paths)]
    return folders + [_file_entry(path, files[path]) for path in sorted(file_paths)]


def _parse_bool(values: list[str] | None) -> bool:
    return bool(values) and values[0].lower() in ("1", "true", "yes")


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the handler of a Hub API route. `self.server` is a `_LoopbackHTTPServer`."""

    server_version = "LoopbackHub/1.0"

    # HTTP plumbing

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def log_message(self, format, *args):
        # BaseHTTPRequestHandler writes to stderr by default, which would clutter pytest output.
        logger.debug("%s %s", self.address_string(), format % args)

    @property
    def hub(self) -> "HubServer":
        return self.server.hub

    def _handle(self, method: str) -> None:
        split_url = urlsplit(self.path)
        self.query = parse_qs(split_url.query)
        self.request_headers = {name.lower(): value for name, value in self.headers.items()}
        self.hub._record(RecordedRequest(method, split_url.path, self.query, self.request_headers))

        # Split before unquoting, because the client quotes a revision such as "refs/pr/1" into one segment.
        segments = [unquote(segment) for segment in split_url.path.split("/")[1:]]
        try:
            self.username = self._authenticate()
            self._route(method, segments)
        except HubAPIError as error:
            logger.info("%s %s -> %d %s", method, split_url.path, error.status, error.message)
            self._send_error(error, include_body=method != "HEAD")
        except Exception as error:
            logger.exception("Unhandled error for %s %s", method, split_url.path)
            self._send_error(
                HubAPIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"Internal test server error: {error!r}"),
                include_body=method != "HEAD",
            )

    def _route(self, method: str, segments: list[str]) -> None:
        if segments[:1] == ["api"]:
            self._route_api(method, segments[1:])
            return

        repo_type = "model"
        if segments and segments[0] in _REPO_TYPE_BY_URL_SEGMENT:
            repo_type = _REPO_TYPE_BY_URL_SEGMENT[segments[0]]
            segments = segments[1:]
        if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve":
            repo_id = f"{segments[0]}/{segments[1]}"
            self._resolve_file(repo_type, repo_id, segments[3], "/".join(segments[4:]), method == "HEAD")
            return
        self._raise_unknown_route(method)

    def _route_api(self, method: str, segments: list[str]) -> None:
        if segments == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if segments == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if segments == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if segments == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()

        if len(segments) < 3 or segments[0] not in _REPO_TYPE_BY_API_SEGMENT:
            self._raise_unknown_route(method)
        repo_type = _REPO_TYPE_BY_API_SEGMENT[segments[0]]
        repo_id = f"{segments[1]}/{segments[2]}"
        action, arguments = (segments[3], segments[4:]) if len(segments) > 3 else (None, [])

        if method == "GET" and action is None:
            return self._repo_info(repo_type, repo_id, DEFAULT_BRANCH)
        if method == "GET" and action == "revision" and len(arguments) == 1:
            return self._repo_info(repo_type, repo_id, arguments[0])
        if method == "GET" and action == "tree" and len(arguments) >= 1:
            return self._list_tree(repo_type, repo_id, arguments[0], "/".join(arguments[1:]))
        if method == "POST" and action == "paths-info" and len(arguments) == 1:
            return self._paths_info(repo_type, repo_id, arguments[0])
        if method == "POST" and action == "preupload" and len(arguments) == 1:
            return self._preupload(repo_type, repo_id, arguments[0])
        if method == "POST" and action == "commit" and len(arguments) == 1:
            return self._commit(repo_type, repo_id, arguments[0])
        self._raise_unknown_route(method)

    def _raise_unknown_route(self, method: str) -> None:
        # A warning, so that a client call this server does not implement is visible in the test log.
        logger.warning("The loopback Hub server has no route for %s %s", method, self.path)
        raise HubAPIError(HTTPStatus.NOT_FOUND, f"The loopback Hub server has no route for {method} {self.path}")

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding"):
                raise HubAPIError(HTTPStatus.LENGTH_REQUIRED, "Chunked request bodies are not supported.")
            return b""
        return self.rfile.read(int(length))

    def _read_json(self) -> Any:
        body = self._read_body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubAPIError(HTTPStatus.BAD_REQUEST, f"Invalid JSON body: {error}") from error

    def _send_json(self, payload: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, error: HubAPIError, include_body: bool) -> None:
        body = json.dumps({"error": error.message}).encode()
        self.send_response(error.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        # HTTP headers are latin-1, so keep the message header ASCII-safe and put the full text in the body.
        self.send_header("X-Error-Message", error.message.encode("ascii", "replace").decode())
        if error.error_code is not None:
            self.send_header("X-Error-Code", error.error_code)
        if error.commit_oid is not None:
            self.send_header("X-Repo-Commit", error.commit_oid)
        self.end_headers()
        if include_body:
            self.wfile.write(body)

    # Authentication and access

    def _authenticate(self) -> str | None:
        """Return the user the bearer token belongs to, `None` for an anonymous request."""
        authorization = self.request_headers.get("authorization")
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        username = self.hub.tokens.get(token) if scheme.lower() == "bearer" else None
        if username is None:
            # huggingface_hub treats exactly this message as a bad token, not as a missing repo.
            raise HubAPIError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")
        return username

    def _readable_repo(self, repo_type: str, repo_id: str) -> HubRepo:
        """Return the repo, or raise the error the Hub gives for a repo the caller cannot see."""
        store = self.hub.store
        if not store.has_repo(repo_type, repo_id):
            # The Hub returns 401 to anonymous callers and 404 to signed-in ones, with the same error code.
            status = HTTPStatus.UNAUTHORIZED if self.username is None else HTTPStatus.NOT_FOUND
            raise HubAPIError(status, f"Repository not found: {repo_id}", "RepoNotFound")
        repo = store.get_repo(repo_type, repo_id)
        if repo.private and self.username != repo_id.split("/")[0]:
            status = HTTPStatus.UNAUTHORIZED if self.username is None else HTTPStatus.NOT_FOUND
            raise HubAPIError(status, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_type: str, repo_id: str) -> HubRepo:
        repo = self._readable_repo(repo_type, repo_id)
        self._check_namespace_write(repo_id.split("/")[0])
        return repo

    def _check_namespace_write(self, namespace: str) -> None:
        if self.username is None:
            raise HubAPIError(HTTPStatus.UNAUTHORIZED, "Write access requires a token, but the request has none.")
        if namespace != self.username:
            raise HubAPIError(
                HTTPStatus.FORBIDDEN, f"User {self.username!r} has no write access to namespace {namespace!r}."
            )

    # Routes

    def _whoami(self) -> None:
        if self.username is None:
            raise HubAPIError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(self.username.encode()).hexdigest()[:24],
                "name": self.username,
                "fullname": self.username,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
            }
        )

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.hub.url}/{_URL_PREFIX_BY_REPO_TYPE[repo_type]}{repo_id}"

    def _create_repo(self) -> None:
        payload = self._read_json()
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX_BY_REPO_TYPE:
            raise HubAPIError(
                HTTPStatus.BAD_REQUEST, f"Invalid repo type {repo_type!r}. Expected model, dataset or space."
            )
        name = payload.get("name")
        if not name:
            raise HubAPIError(HTTPStatus.BAD_REQUEST, "Missing repo name in the create request.")
        if self.username is None:
            raise HubAPIError(HTTPStatus.UNAUTHORIZED, "Write access requires a token, but the request has none.")
        namespace = payload.get("organization") or self.username
        self._check_namespace_write(namespace)

        repo_id = f"{namespace}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = self._repo_url(repo_type, repo_id)
        try:
            self.hub.store.create_repo(repo_type, repo_id, private=private)
        except HubAPIError as error:
            # `create_repo(exist_ok=True)` reads the URL from the body of the 409 response.
            logger.info("create repo %s -> 409 %s", repo_id, error.message)
            self._send_json({"error": error.message, "url": url}, HTTPStatus.CONFLICT)
            return
        self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self) -> None:
        payload = self._read_json()
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or self.username
        repo_id = f"{namespace}/{payload.get('name')}"
        self._writable_repo(repo_type, repo_id)
        self.hub.store.delete_repo(repo_type, repo_id)
        self._send_json({})

    def _validate_yaml(self) -> None:
        content = self._read_json().get("content", "")
        errors = []
        if content.startswith("---"):
            front_matter = content.split("---", 2)[1] if content.count("---") >= 2 else ""
            try:
                metadata = yaml.safe_load(front_matter)
            except yaml.YAMLError as error:
                errors.append({"message": f"Invalid YAML front matter: {error}"})
            else:
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "The YAML front matter must be a mapping."})
        status = HTTPStatus.BAD_REQUEST if errors else HTTPStatus.OK
        self._send_json({"errors": errors, "warnings": []}, status)

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self.hub.store.get_commit(repo, revision)
        with_blobs = _parse_bool(self.query.get("blobs"))
        siblings = []
        for path, content in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(content), blobId=git_blob_oid(content))
            siblings.append(sibling)

        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": _utc_timestamp(commit.created_at),
            "createdAt": _utc_timestamp(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send_json(info)

    def _list_tree(self, repo_type: str, repo_id: str, revision: str, folder: str) -> None:
        # NOTE: `expand=true` is accepted but adds no `lastCommit` or security fields, and the whole listing is one
        # page, whereas the Hub pages at 1,000 entries.
        repo = self._readable_repo(repo_type, repo_id)
        commit = self.hub.store.get_commit(repo, revision)
        try:
            entries = list_tree_entries(commit.files, folder, recursive=_parse_bool(self.query.get("recursive")))
        except HubAPIError as error:
            error.commit_oid = commit.oid
            raise
        self._send_json(entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self.hub.store.get_commit(repo, revision)
        form = parse_qs(self._read_body().decode())
        entries = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                entries.append(_file_entry(path, commit.files[path]))
            elif any(existing.startswith(path + "/") for existing in commit.files):
                entries.append(_folder_entry(path, commit.files))
        self._send_json(entries)

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._writable_repo(repo_type, repo_id)
        commit = self.hub.store.get_commit(repo, revision)
        payload = self._read_json()
        files = []
        # NOTE: `gitIgnore` rules in the request are not applied: every file is reported with `shouldIgnore` false.
        for file_info in payload.get("files", []):
            path = file_info["path"]
            existing = commit.files.get(path)
            files.append(
                {
                    "path": path,
                    # "regular" makes the client send the file base64-encoded inside the commit request, so no LFS
                    # or Xet transfer endpoint is needed.
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    # The client skips a file whose git blob id equals this one, as it does against the Hub.
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        self._send_json({"files": files, "commitOid": commit.oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._writable_repo(repo_type, repo_id)
        if _parse_bool(self.query.get("create_pr")):
            raise HubAPIError(HTTPStatus.BAD_REQUEST, "The loopback Hub server does not support create_pr=True.")

        header: dict[str, Any] = {}
        additions: dict[str, bytes] = {}
        deleted_files: list[str] = []
        deleted_folders: list[str] = []
        for line_number, line in enumerate(self._read_body().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise HubAPIError(HTTPStatus.BAD_REQUEST, f"Invalid NDJSON on line {line_number}: {error}") from error
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                additions[value["path"]] = self._decode_file_content(value)
            elif key == "deletedFile":
                deleted_files.append(value["path"])
            elif key == "deletedFolder":
                deleted_folders.append(value["path"])
            elif key == "lfsFile":
                raise HubAPIError(
                    HTTPStatus.BAD_REQUEST,
                    f"LFS file {value.get('path')!r} in the commit: the loopback Hub server stores regular files only,"
                    " and its preupload route never asks for LFS.",
                )
            else:
                raise HubAPIError(HTTPStatus.BAD_REQUEST, f"Unknown commit operation {key!r} on line {line_number}.")

        if not header.get("summary"):
            raise HubAPIError(HTTPStatus.BAD_REQUEST, "The commit request has no header line with a summary.")
        commit = self.hub.store.commit(
            repo,
            revision,
            title=header["summary"],
            description=header.get("description", ""),
            additions=additions,
            deleted_files=deleted_files,
            deleted_folders=deleted_folders,
            parent_oid=header.get("parentCommit"),
        )
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{commit.oid}",
            }
        )

    @staticmethod
    def _decode_file_content(value: dict[str, Any]) -> bytes:
        encoding = value.get("encoding", "utf-8")
        if encoding == "base64":
            return base64.b64decode(value["content"])
        if encoding == "utf-8":
            return value["content"].encode()
        raise HubAPIError(HTTPStatus.BAD_REQUEST, f"Unknown file encoding {encoding!r}. Expected base64 or utf-8.")

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str, head_only: bool) -> None:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self.hub.store.get_commit(repo, revision)
        content = commit.files.get(path)
        if content is None:
            # With the commit id, the client records the missing file in its cache (`.no_exist`).
            raise HubAPIError(HTTPStatus.NOT_FOUND, f"Entry not found: {path}", "EntryNotFound", commit.oid)

        status, body, content_range = HTTPStatus.OK, content, None
        range_header = self.request_headers.get("range")
        if range_header is not None:
            start, end = self._parse_range(range_header, len(content))
            status, body = HTTPStatus.PARTIAL_CONTENT, content[start : end + 1]
            content_range = f"bytes {start}-{end}/{len(content)}"

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        # A regular file's ETag is its git blob id. The response has no X-Xet-Hash header, so the client downloads
        # with a plain GET even when hf_xet is installed.
        self.send_header("ETag", f'"{git_blob_oid(content)}"')
        self.send_header("X-Repo-Commit", commit.oid)
        if content_range is not None:
            self.send_header("Content-Range", content_range)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    @staticmethod
    def _parse_range(range_header: str, size: int) -> tuple[int, int]:
        """Return the inclusive byte range of a single-range `Range` header."""
        match = _RANGE_PATTERN.match(range_header.strip())
        if match is None or match.group(1) == match.group(2) == "":
            raise HubAPIError(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"Unsupported Range header {range_header!r}."
            )
        if match.group(1) == "":
            # "bytes=-N" requests the last N bytes.
            start, end = max(size - int(match.group(2)), 0), size - 1
        else:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        if start >= size or start > end:
            raise HubAPIError(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"Range {range_header!r} outside {size} bytes."
            )
        return start, end


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: "HubServer"):
        super().__init__(address, _HubRequestHandler)
        self.hub = hub


class HubServer:
    """A Hub-compatible HTTP server on 127.0.0.1 with in-memory repos, for tests.

    Args:
        tokens (`dict[str, str]`, *optional*):
            Valid bearer tokens and the user each one belongs to. Defaults to `{DEFAULT_TOKEN: DEFAULT_USERNAME}`.
            A user may write only to repos in its own namespace, and private repos are visible only to their owner.

    Example:

    ```py
    >>> with HubServer() as hub:
    ...     hub.seed_repo("test-user/tiny", files={"config.json": b"{}"})
    ...     print(hub.url)
    ```
    """

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USERNAME}
        self.store = HubStore()
        self._requests: list[RecordedRequest] = []
        self._requests_lock = threading.Lock()
        self._http_server: _LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        """The first token of `tokens`, which the `hub_server` fixture sets as `HF_TOKEN`."""
        return next(iter(self.tokens))

    @property
    def username(self) -> str:
        """The user `token` belongs to."""
        return self.tokens[self.token]

    @property
    def url(self) -> str:
        """The endpoint URL, `http://127.0.0.1:<port>`, to use as `HF_ENDPOINT`."""
        if self._http_server is None:
            raise RuntimeError("The Hub server is not running. Call start() first.")
        host, port = self._http_server.server_address[:2]
        return f"http://{host}:{port}"

    # Lifecycle

    def start(self) -> "HubServer":
        """Bind a free port on 127.0.0.1 and serve requests on a daemon thread."""
        if self._http_server is not None:
            raise RuntimeError(f"The Hub server is already running at {self.url}.")
        self._http_server = _LoopbackHTTPServer(("127.0.0.1", 0), self)
        self._thread = threading.Thread(
            target=self._http_server.serve_forever, name="loopback-hub-server", daemon=True
        )
        self._thread.start()
        logger.info("Loopback Hub server started at %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and release the port. Does nothing if the server is not running."""
        if self._http_server is None:
            return
        url = self.url
        self._http_server.shutdown()
        self._http_server.server_close()
        self._thread.join(timeout=10)
        self._http_server = None
        self._thread = None
        logger.info("Loopback Hub server at %s stopped", url)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Recorded requests

    def _record(self, request: RecordedRequest) -> None:
        with self._requests_lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, oldest first."""
        with self._requests_lock:
            return list(self._requests)

    def find_requests(self, method: str | None = None, path_contains: str | None = None) -> list[RecordedRequest]:
        """Return the recorded requests with this method and whose path contains `path_contains`."""
        return [
            request
            for request in self.requests
            if (method is None or request.method == method)
            and (path_contains is None or path_contains in request.path)
        ]

    def clear_requests(self) -> None:
        with self._requests_lock:
            self._requests.clear()

    # Seeding and reading back

    def seed_repo(
        self,
        repo_id: str,
        folder: str | Path | None = None,
        *,
        files: dict[str, bytes | str] | None = None,
        repo_type: str = "model",
        private: bool = False,
        commit_message: str = "Seed repo",
    ) -> str:
        """Commit files to `repo_id` on `main`, creating the repo if needed, and return the commit id.

        Seeding bypasses HTTP and tokens, so a test can prepare any namespace. The files of `folder` (recursively,
        with `/`-separated paths relative to it) and the `files` mapping are committed together; `files` wins when
        both name a path.
        """
        if folder is None and files is None:
            raise ValueError(f"Nothing to seed into {repo_id!r}: pass a folder, files, or both.")
        additions: dict[str, bytes] = {}
        if folder is not None:
            folder = Path(folder)
            if not folder.is_dir():
                raise ValueError(f"Cannot seed {repo_id!r} from {str(folder)!r}: it is not a directory.")
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    additions[path.relative_to(folder).as_posix()] = path.read_bytes()
        for path, content in (files or {}).items():
            additions[path] = content.encode() if isinstance(content, str) else content

        if not self.store.has_repo(repo_type, repo_id):
            self.store.create_repo(repo_type, repo_id, private=private)
        repo = self.store.get_repo(repo_type, repo_id)
        return self.store.commit(repo, DEFAULT_BRANCH, title=commit_message, additions=additions).oid

    def read_file(self, repo_id: str, path: str, *, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> bytes:
        """Return the content of `path` at `revision`, for example a file a test uploaded.

        Raises:
            `FileNotFoundError`: if the repo, the revision or the file does not exist.
        """
        try:
            commit = self.store.get_commit(self.store.get_repo(repo_type, repo_id), revision)
        except HubAPIError as error:
            raise FileNotFoundError(f"Cannot read {path!r} from {repo_id}@{revision}: {error.message}") from error
        if path not in commit.files:
            raise FileNotFoundError(
                f"{path!r} not found in {repo_id}@{revision}. The repo has {sorted(commit.files)}."
            )
        return commit.files[path]

    def list_files(self, repo_id: str, *, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> list[str]:
        """Return the sorted file paths of `repo_id` at `revision`."""
        return sorted(self.store.get_commit(self.store.get_repo(repo_type, repo_id), revision).files)

    def list_commits(
        self, repo_id: str, *, revision: str = DEFAULT_BRANCH, repo_type: str = "model"
    ) -> list[HubCommit]:
        """Return the commits reachable from `revision`, newest first."""
        return self.store.list_commits(self.store.get_repo(repo_type, repo_id), revision)

    def has_repo(self, repo_id: str, *, repo_type: str = "model") -> bool:
        return self.store.has_repo(repo_type, repo_id)


# Module attributes that hold a copy of a setting huggingface_hub or diffusers read from the environment at import
# time. Setting the environment variable in a test changes none of them, so `configure_hub_client` patches each one.
_ENDPOINT_ATTRIBUTES = (
    ("huggingface_hub.constants", "ENDPOINT"),
    ("diffusers.utils.constants", "HUGGINGFACE_CO_RESOLVE_ENDPOINT"),
    ("diffusers.utils.hub_utils", "HUGGINGFACE_CO_RESOLVE_ENDPOINT"),
)
_OFFLINE_ATTRIBUTES = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("diffusers.utils.hub_utils", "HF_HUB_OFFLINE"),
    ("diffusers.loaders.lora_base", "HF_HUB_OFFLINE"),
    ("diffusers.models.attention_dispatch", "HF_HUB_OFFLINE"),
)
_HUB_CACHE_ATTRIBUTES = (
    ("huggingface_hub.constants", "HF_HUB_CACHE"),
    ("huggingface_hub.constants", "HUGGINGFACE_HUB_CACHE"),
    ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE"),
)


def hub_client_environment(endpoint: str, hf_home: str | Path, token: str | None) -> dict[str, str]:
    """Return the environment variables that point a new Python process's Hub client at `endpoint`.

    A subprocess reads these at import, so unlike the current process it needs no patched module attributes. The
    caches live under `hf_home`, offline mode is off, telemetry and Xet are disabled, and `token` (if given) becomes
    `HF_TOKEN`.
    """
    hf_home = Path(hf_home)
    environment = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_MODULES_CACHE": str(hf_home / "modules"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "DO_NOT_TRACK": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    if token is not None:
        environment["HF_TOKEN"] = token
    return environment


def configure_hub_client(monkeypatch, server: HubServer, hf_home: str | Path) -> None:
    """Point the already-imported huggingface_hub and diffusers clients at `server` for the rest of one test.

    huggingface_hub 2.4 reads `HF_ENDPOINT`, `HF_HUB_OFFLINE`, the cache paths and the Xet switch into module
    constants at import, and the module-level functions (`model_info`, `create_repo`, `upload_folder`, ...) are bound
    methods of one `HfApi` created at import with the endpoint of that time. So this sets the environment variables
    for subprocesses and also patches those constants, their copies in other modules, and that `HfApi` instance.
    `monkeypatch` undoes everything after the test.

    Args:
        monkeypatch (`pytest.MonkeyPatch`): The test's monkeypatch fixture.
        server (`HubServer`): A started server; its `token` becomes `HF_TOKEN`.
        hf_home (`str` or `Path`): Folder for the Hub cache, token file and diffusers' dynamic modules.
    """
    import huggingface_hub.constants
    import huggingface_hub.hf_api
    from huggingface_hub.utils import close_session

    import diffusers.utils.dynamic_modules_utils

    hf_home = Path(hf_home)
    hf_home.mkdir(parents=True, exist_ok=True)
    endpoint = server.url

    for name in ("HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_CO_STAGING", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in hub_client_environment(endpoint, hf_home, server.token).items():
        monkeypatch.setenv(name, value)

    for module_name, attribute in _ENDPOINT_ATTRIBUTES:
        monkeypatch.setattr(f"{module_name}.{attribute}", endpoint)
    for module_name, attribute in _OFFLINE_ATTRIBUTES:
        monkeypatch.setattr(f"{module_name}.{attribute}", False)
    for module_name, attribute in _HUB_CACHE_ATTRIBUTES:
        monkeypatch.setattr(f"{module_name}.{attribute}", str(hf_home / "hub"))

    constants = huggingface_hub.constants
    url_template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url_template)
    # Redirects and auth forwarding are allowed only between these hosts.
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(hf_home / "assets"))
    monkeypatch.setattr("huggingface_hub.utils._cache_assets.HF_ASSETS_CACHE", str(hf_home / "assets"))
    monkeypatch.setattr(constants, "HF_XET_CACHE", str(hf_home / "xet"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_UPDATE_CHECK", True)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)

    # diffusers copies remote-code modules here and appends the folder to sys.path, so sys.path is restored afterwards.
    monkeypatch.setattr(diffusers.utils.dynamic_modules_utils, "HF_MODULES_CACHE", str(hf_home / "modules"))
    monkeypatch.setattr(diffusers.utils.dynamic_modules_utils, "DIFFUSERS_DISABLE_REMOTE_CODE", False)
    monkeypatch.setattr(sys, "path", list(sys.path))

    # The shared httpx client reads proxy settings when it is created, so recreate it with NO_PROXY in place.
    close_session()
