"""A local model hub for tests: just enough of the Hugging Face Hub and ModelScope HTTP APIs for their
download clients (no hub is reachable here), serving model directories from disk.

Hugging Face (what `huggingface_hub.snapshot_download` calls, read from its source):
    GET  /api/models/{org}/{name}[/revision/{rev}]     model info: `sha` (the commit) and `siblings`
    GET  /api/models/{org}/{name}/tree/{rev}           file listing (`recursive`), one page
    HEAD/GET /{org}/{name}/resolve/{rev}/{path}        a file, with X-Repo-Commit, X-Linked-Etag (the blob id),
                                                       X-Linked-Size and Content-Length
    errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) as the hub does.
ModelScope:
    GET  /api/v1/models/{org}/{name}/repo/files?Revision=R&Recursive=True
    GET  /api/v1/models/{org}/{name}/repo?Revision=R&FilePath=P

Runs on its own loop in a thread, so sync tests and the clients' own threads can both use it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.harness.ports import free_port

REVISION = "main"
MS_REVISION = "master"


@dataclass(frozen=True)
class RepoFile:
    path: str
    local: Path
    size: int
    blob_id: str
    sha256: str


def list_files(root: Path) -> list[RepoFile]:
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id, as the hub's oid
        out.append(RepoFile(path=p.relative_to(root).as_posix(), local=p, size=len(data), blob_id=blob,
                            sha256=hashlib.sha256(data).hexdigest()))
    return out


@dataclass
class HubMirror:
    repos: Mapping[str, Path]
    """repo id (`org/name`) -> the model directory it serves."""
    token: str | None = None
    """When set, every request must carry `Authorization: Bearer <token>`."""
    bytes_per_s: int = 0
    """Throttle of file bodies (0: full speed), so a test can watch a download in progress."""
    fail_next: int = 0
    """Answer this many next requests with 503, as a hub having a bad minute."""
    requests: list[tuple[str, str]] = field(default_factory=list)
    whole_gets: list[str] = field(default_factory=list)
    """Paths of GETs without a Range header: whole files, as downloads fetch them (a profile's header peek
    reads ranges)."""
    port: int = 0
    _files: dict[str, list[RepoFile]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def commit(self, repo: str) -> str:
        h = hashlib.sha1(repo.encode())
        for f in self._repo_files(repo):
            h.update(f"{f.path}:{f.blob_id}".encode())
        return h.hexdigest()

    def file_requests(self, repo: str) -> int:
        """GETs of file bodies of `repo`, both APIs."""
        return sum(1 for m, p in self.requests if m == "GET" and (p.startswith(f"/{repo}/resolve/")
                                                                   or p.startswith(f"/api/v1/models/{repo}/repo?")))

    def weight_downloads(self, repo: str) -> int:
        """Whole-file GETs of `repo`'s weights (*.safetensors, *.bin): what a download of the model costs."""
        return sum(1 for p in self.whole_gets if p.startswith(f"/{repo}/resolve/")
                   and p.endswith((".safetensors", ".bin")))

    def _repo_files(self, repo: str) -> list[RepoFile]:
        if repo not in self._files:
            self._files[repo] = list_files(self.repos[repo])
        return self._files[repo]

    # --- HTTP ---------------------------------------------------------------------------------------
    @web.middleware
    async def _gate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        if request.method == "GET" and "Range" not in request.headers:
            self.whole_gets.append(request.path)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="mirror is having a bad minute")
        if self.token is not None:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {self.token}":
                headers = ({"X-Error-Message": "Invalid credentials in Authorization header"} if auth
                           else {"X-Error-Code": "RepoNotFound"})
                return web.Response(status=401, headers=headers, text="unauthorized")
        resp: web.StreamResponse = await handler(request)
        return resp

    def _repo(self, request: web.Request) -> str:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text=f"repo {repo} not found")
        return repo

    def _check_revision(self, repo: str, rev: str) -> None:
        if rev not in (REVISION, MS_REVISION, self.commit(repo)):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"}, text=f"revision {rev} not found")

    async def model_info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._check_revision(repo, request.match_info.get("rev", REVISION))
        siblings = [{"rfilename": f.path, "size": f.size, "blobId": f.blob_id} for f in self._repo_files(repo)]
        return web.json_response({"id": repo, "modelId": repo, "sha": self.commit(repo), "private": False,
                                  "siblings": siblings})

    async def tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        self._check_revision(repo, request.match_info["rev"])
        dirs = sorted({str(Path(f.path).parent) for f in self._repo_files(repo)} - {"."})
        entries: list[dict[str, Any]] = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in dirs]
        entries += [{"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
                    for f in self._repo_files(repo)]
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        self._check_revision(repo, request.match_info["rev"])
        f = self._file(repo, request.match_info["path"])
        headers = {"X-Repo-Commit": self.commit(repo), "X-Linked-Etag": f'"{f.blob_id}"',
                   "X-Linked-Size": str(f.size), "Accept-Ranges": "bytes"}
        return await self._send(request, f, headers)

    async def ms_files(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        rev = request.query.get("Revision", MS_REVISION)
        self._check_revision(repo, rev)
        files = [{"Name": Path(f.path).name, "Path": f.path, "Type": "blob", "Size": f.size, "Sha256": f.sha256,
                  "Revision": rev} for f in self._repo_files(repo)]
        return web.json_response({"Code": 200, "Success": True, "Data": {"Files": files}})

    async def ms_file(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        self._check_revision(repo, request.query.get("Revision", MS_REVISION))
        return await self._send(request, self._file(repo, request.query.get("FilePath", "")), {})

    def _file(self, repo: str, path: str) -> RepoFile:
        for f in self._repo_files(repo):
            if f.path == path:
                return f
        raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"}, text=f"{path} not found")

    async def _send(self, request: web.Request, f: RepoFile, headers: dict[str, str]) -> web.StreamResponse:
        if not self.bytes_per_s or request.method == "HEAD" or "Range" in request.headers:
            return web.FileResponse(f.local, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = f.size
        await resp.prepare(request)
        data = f.local.read_bytes()
        step = max(1, self.bytes_per_s // 10)
        for i in range(0, len(data), step):
            await resp.write(data[i:i + step])
            await asyncio.sleep(0.1)
        await resp.write_eof()
        return resp

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        repo = "/{org}/{name}"
        app.add_routes([
            web.get(f"/api/models{repo}", self.model_info),
            web.get(f"/api/models{repo}/revision/{{rev}}", self.model_info),
            web.get(f"/api/models{repo}/tree/{{rev}}", self.tree),
            web.route("HEAD", f"{repo}/resolve/{{rev}}/{{path:.+}}", self.resolve),
            web.get(f"{repo}/resolve/{{rev}}/{{path:.+}}", self.resolve, allow_head=False),
            web.get(f"/api/v1/models{repo}/repo/files", self.ms_files),
            web.get(f"/api/v1/models{repo}/repo", self.ms_file),
        ])
        return app


@contextmanager
def running_mirror(repos: Mapping[str, Path], **kwargs: Any) -> Iterator[HubMirror]:
    """A HubMirror serving `repos` on a free loopback port for the block."""
    mirror = HubMirror(repos=repos, port=free_port(), **kwargs)
    started = threading.Event()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(mirror.app(), access_log=None)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", mirror.port).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, name="hub-mirror", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("hub mirror did not start")
    try:
        yield mirror
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def tiny_repos(models: Path) -> dict[str, Path]:
    """The tiny test models (scripts/make_tiny_models.py) as hub repos: tiny/llama, tiny/bert-embed, ..."""
    return {f"tiny/{d.name.removeprefix('tiny-')}": d for d in sorted(models.iterdir()) if d.is_dir()}
