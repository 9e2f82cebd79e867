"""A loopback fake of the Hugging Face Hub, for push → pull tests without network.

[`FakeHub`] serves, from a stdlib HTTP server on `127.0.0.1`, the part of the Hub API that `huggingface_hub`
(`create_repo`, `upload_folder`, `hf_hub_download`, `snapshot_download`, `ModelCard.load`), transformers
`from_pretrained` and timm `create_model("hf-hub:...")` use. The real clients talk to it when `HF_ENDPOINT` is set to
[`FakeHub.url`] *before* `huggingface_hub` is first imported; also set `HF_HUB_DISABLE_XET=1` (plain HTTP transfers)
and a token (`HF_TOKEN`, any value).

```python
hub = FakeHub().start()
os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_fake")
```

- Preupload answers `"regular"` for every file, so the client inlines files (base64) in the commit: no LFS or Xet
  endpoint. ETags and tree `oid`s are git blob SHA-1s, as for regular files on the Hub, so unchanged files are not
  re-uploaded. Model and dataset repositories are supported; Spaces and pull requests are not.
- `create_repo` makes no initial commit (the real Hub commits a `.gitattributes`): each upload adds one commit.
- `whoami` answers for [`FakeHub.user`] with a token of role [`FakeHub.token_role`] when the request carries a
  token, else 401. A private repository (`create_repo(private=True)`) answers requests without a token with 401
  `RepoNotFound`, as the Hub does.
- `resolve` serves ranged reads as the Hub's file storage does: `HEAD` gives the size and commit headers
  (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`, `Accept-Ranges`), `GET` with `Range: bytes=a-b`
  answers 206 with `Content-Range`, or 416 past the end. [`FakeHub.bytes_sent`] counts the file content bytes sent
  (ranged or not), for tests of how much a client read; set it to 0 to restart the count.
- Unmatched requests get a 404 JSON error, are logged as warnings and recorded in [`FakeHub.unknown_routes`], so a
  client upgrade that adds a call fails loudly. Request headers (`Authorization` included) are never kept or logged.

Run it as a server for other processes and tools (it prints its URL, then serves until SIGINT or SIGTERM):

```
python -m hf_regtools.testing.fake_hub --port 8765
```
"""

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

_REPO = r"(?P<repo_id>[^/]+(?:/[^/]+)?)"
_API = r"/api/(?P<kind>models|datasets)/" + _REPO
# (method, full-match path regex, handler); HEAD is served by the GET routes, without a body.
_ROUTES = [
    ("GET", r"/api/agent-harnesses", "_agent_harnesses"),
    ("GET", r"/api/whoami-v2", "_whoami"),
    ("POST", r"/api/repos/create", "_create_repo"),
    ("POST", r"/api/validate-yaml", "_validate_yaml"),
    ("POST", _API + r"/preupload/(?P<rev>[^/]+)", "_preupload"),
    ("POST", _API + r"/commit/(?P<rev>[^/]+)", "_commit"),
    ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", "_info"),
    ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "_tree"),
    ("GET", r"/(?:(?P<kind>datasets)/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
]
_KINDS = {None: "model", "models": "model", "datasets": "dataset"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/"}


class _HubError(Exception):
    """An error answered as `status` with JSON `{"error": message}` and an `X-Error-Code` header if `code` is set."""

    def __init__(self, status, code, message, **headers):
        super().__init__(message)
        self.status, self.headers = status, {**headers, **({"X-Error-Code": code} if code else {})}


@contextlib.contextmanager
def _as_key_error():
    try:
        yield
    except _HubError as error:
        raise KeyError(str(error)) from None


def _json(status, payload, **headers):
    return status, {"Content-Type": "application/json", **headers}, json.dumps(payload).encode()


_DISCONNECT = object()  # the answer to a fault without status: close the connection, send nothing
_CONTENT_HEADER = "X-FakeHub-File-Content"  # marks (not sent) answers whose body is file content, for `bytes_sent`


def _git_oid(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, lets the server's [`FakeHub`] answer it and writes the response (no body for HEAD)."""

    def _dispatch(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            answer = self.server.hub._handle(self.command, self.path, self.rfile.read(length),
                                             authorized=bool(self.headers.get("Authorization")),
                                             byte_range=self.headers.get("Range"))
        except Exception as error:
            logger.exception("FakeHub: error while answering %s %s", self.command, self.path)
            answer = _json(500, {"error": f"FakeHub internal error: {error!r}"})
        if answer is _DISCONNECT:
            self.close_connection = True
            return
        status, headers, body, cut_after = answer if len(answer) == 4 else (*answer, None)
        file_content = headers.pop(_CONTENT_HEADER, None)
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        sent = body if cut_after is None else body[:cut_after]
        if file_content:
            self.server.hub._count_sent(len(sent))
        self.wfile.write(sent)
        if cut_after is not None:
            self.wfile.flush()
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def log_message(self, format, *args):
        logger.debug("FakeHub: " + format, *args)


class FakeHub:
    """In-memory Hugging Face Hub served over HTTP on a loopback port, from a daemon thread.

    State is `{(repo_type, repo_id): {"commits": [sha, ...], "files": {sha: {path: bytes}}, "refs": {"main": sha}}}`,
    guarded by a lock, like every other attribute mutated by requests.

    Args:
        host (`str`, *optional*, defaults to `"127.0.0.1"`):
            Interface to bind to.
        port (`int`, *optional*, defaults to 0):
            Port to bind to; 0 picks a free one (read it back from [`FakeHub.url`]).
        user (`str`, *optional*, defaults to `"fake-user"`):
            Who `whoami` says the token belongs to: a bare repo name is pushed to this namespace.
        token_role (`str`, *optional*, defaults to `"write"`):
            Role of the token that `whoami` reports (`"write"`, `"read"` or `"fineGrained"`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, user: str = "fake-user", token_role: str = "write"):
        self.host, self.port = host, port
        self.user, self.token_role = user, token_role
        self._lock = threading.RLock()
        self._server = self._thread = self._endpoint = None
        self._repos: dict = {}
        self._faults: list = []
        self.requests: list[tuple[str, str]] = []
        self.unknown_routes: list[tuple[str, str]] = []
        self.bytes_sent = 0

    @property
    def url(self) -> str:
        """Endpoint to put in `HF_ENDPOINT`, e.g. `"http://127.0.0.1:51234"` (binds the socket if not done yet)."""
        self._bind()
        return self._endpoint

    def _bind(self) -> ThreadingHTTPServer:
        with self._lock:
            if self._server is None:
                self._server = ThreadingHTTPServer((self.host, self.port), _Handler)
                self._server.daemon_threads = True
                self._server.hub = self
                self._endpoint = f"http://{self.host}:{self._server.server_address[1]}"
            return self._server

    def start(self) -> "FakeHub":
        """Starts serving from a daemon thread and returns `self`."""
        server = self._bind()
        if self._thread is None:
            self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="FakeHub", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes the socket; the state is kept, and `start()` serves it again on a new socket."""
        with self._lock:
            server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            if thread is not None:
                server.shutdown()
            server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def add_fault(self, method: str, path_regex: str, status: int | None, *, error_code: str | None = None,
                  message: str = "injected fault", times: int | None = None, after_bytes: int | None = None,
                  skip: int = 0) -> None:
        """Makes the next matching requests fail, before any routing (the request is still recorded).

        Args:
            method (`str`):
                HTTP method, compared case-insensitively; `"*"` matches any method.
            path_regex (`str`):
                Pattern searched (`re.search`) in the URL path, as sent (percent-encoded, without query string).
            status (`int`, *optional*):
                Status code to answer, with JSON body `{"error": message}`; `None` closes the connection without an
                answer (the client sees a network error, as when a proxy or the server drops the connection).
            error_code (`str`, *optional*):
                Value of the `X-Error-Code` header (e.g. `"RepoNotFound"`, `"EntryNotFound"`, `"GatedRepo"`).
            message (`str`, *optional*, defaults to `"injected fault"`):
                Error message of the body.
            times (`int`, *optional*):
                Number of requests to fail; `None` fails every matching request until [`FakeHub.clear_faults`].
            after_bytes (`int`, *optional*):
                With `status=None`: answer the request normally but close the connection after this many body
                bytes (the headers announce the full length), as a connection dropped mid-download.
            skip (`int`, *optional*, defaults to 0):
                Number of matching requests to let through first (e.g. a client's header read before its data
                reads); they do not count in `times`.
        """
        if after_bytes is not None and status is not None:
            raise ValueError("after_bytes drops the connection mid-answer: pass status=None with it")
        with self._lock:
            self._faults.append([method.upper(), re.compile(path_regex), status, error_code, message, times,
                                 after_bytes, skip])

    def clear_faults(self) -> None:
        """Removes every fault added with [`FakeHub.add_fault`]."""
        with self._lock:
            self._faults.clear()

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """Returns a copy of the snapshot `{path: content}` of `repo_id` at a branch or commit sha.

        Raises `KeyError` for an unknown repository or revision.
        """
        with self._lock, _as_key_error():
            return dict(self._snapshot(self._repo(repo_type, repo_id), revision)[1])

    def commits(self, repo_id: str, *, repo_type: str = "model") -> list[str]:
        """Returns the commit shas of `repo_id`, oldest first; raises `KeyError` for an unknown repository."""
        with self._lock, _as_key_error():
            return list(self._repo(repo_type, repo_id)["commits"])

    def reset(self) -> None:
        """Forgets all repositories, recorded requests, unknown routes and faults, and zeroes `bytes_sent`."""
        with self._lock:
            for state in (self._repos, self._faults, self.requests, self.unknown_routes):
                state.clear()
            self.bytes_sent = 0

    def _count_sent(self, count):
        with self._lock:
            self.bytes_sent += count

    def _handle(self, method, raw_path, body, *, authorized=True, byte_range=None):
        """Answers one request with `(status, headers, body)`, or `(status, headers, body, cut_after)` to drop the
        connection after `cut_after` body bytes; `authorized`: the request carries a token; `byte_range`: its `Range`
        header."""
        split = urlsplit(raw_path)
        path, query = split.path, parse_qs(split.query)
        with self._lock:
            self.requests.append((method, path))
            cut_after = None
            for fault in self._faults:
                fault_method, pattern, status, code, message, times, after_bytes, skip = fault
                if fault_method in ("*", method) and pattern.search(path):
                    if skip > 0:
                        fault[7] -= 1
                        continue
                    if times is not None:
                        fault[5] -= 1
                        if fault[5] <= 0:
                            self._faults.remove(fault)
                    if after_bytes is not None:
                        cut_after = after_bytes
                        break
                    if status is None:
                        return _DISCONNECT
                    return _json(status, {"error": message}, **({"X-Error-Code": code} if code else {}))
            answer = self._route(method, path, query, body, authorized, byte_range)
        if answer is None:
            logger.warning("FakeHub: no route for %s %s", method, path)
            return _json(404, {"error": f"FakeHub has no route for {method} {path}"})
        return answer if cut_after is None else (*answer, cut_after)

    def _route(self, method, path, query, body, authorized, byte_range):
        """The answer of the route matching the request, or `None` (recorded as an unknown route)."""
        for route_method, pattern, handler in _ROUTES:
            match = re.fullmatch(pattern, path)
            if match and route_method == ("GET" if method == "HEAD" else method):
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                args["kind"] = _KINDS[args.get("kind")]
                args["authorized"] = authorized
                if handler == "_resolve":
                    args["byte_range"] = byte_range
                try:
                    if "repo_id" in args:
                        self._check_access(args["kind"], args["repo_id"], authorized)
                    return getattr(self, handler)(body=body, query=query, **args)
                except _HubError as error:
                    return _json(error.status, {"error": str(error)}, **error.headers)
                except (ValueError, KeyError) as error:
                    return _json(400, {"error": f"FakeHub: malformed request ({error!r})"})
        self.unknown_routes.append((method, path))
        return None

    def _repo(self, kind, repo_id):
        if (kind, repo_id) not in self._repos:
            raise _HubError(404, "RepoNotFound", f"Repository {repo_id!r} not found")
        return self._repos[kind, repo_id]

    def _check_access(self, kind, repo_id, authorized):
        if not authorized and self._repos.get((kind, repo_id), {}).get("private"):
            raise _HubError(401, "RepoNotFound", f"Repository {repo_id!r} not found (private: send a token)")

    def _snapshot(self, repo, revision):
        """Resolves `revision` (branch or full sha) to `(sha, files)`; an empty repository's `main` is `(None, {})`."""
        sha = repo["refs"].get(revision, revision if revision in repo["files"] else None)
        if sha is None and revision != "main":
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, repo["files"].get(sha, {})

    def _repo_url(self, kind, repo_id):
        return f"{self._endpoint}/{_URL_PREFIXES[kind]}{repo_id}"

    def _agent_harnesses(self, **_):
        return _json(200, {"standardEnvVars": [], "harnesses": {}})

    def _whoami(self, authorized, **_):
        if not authorized:
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        return _json(200, {"type": "user", "id": _git_oid(self.user.encode())[:24], "name": self.user,
                           "fullname": self.user, "orgs": [], "auth": {"type": "access_token", "accessToken": {
                               "displayName": "fake", "role": self.token_role}}})

    def _validate_yaml(self, **_):
        return _json(200, {"errors": [], "warnings": []})

    def _create_repo(self, body, **_):
        payload = json.loads(body)
        kind = payload.get("type") or "model"
        if kind not in _URL_PREFIXES:
            raise _HubError(400, None, f"FakeHub does not support repo type {kind!r}")
        repo_id = "/".join(filter(None, (payload.get("organization"), payload["name"])))
        url = self._repo_url(kind, repo_id)
        if (kind, repo_id) in self._repos:
            return _json(409, {"error": "You already created this repo", "url": url})
        private = payload.get("private") or payload.get("visibility") == "private"
        self._repos[kind, repo_id] = {"commits": [], "files": {}, "refs": {}, "private": bool(private)}
        return _json(200, {"url": url, "name": repo_id})

    def _preupload(self, kind, repo_id, rev, body, **_):
        current = self._snapshot(self._repo(kind, repo_id), rev)[1]
        return _json(200, {"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": _git_oid(current[f["path"]]) if f["path"] in current else None}
            for f in json.loads(body)["files"]
        ]})

    def _commit(self, kind, repo_id, rev, body, query, **_):
        repo = self._repo(kind, repo_id)
        if query.get("create_pr"):
            raise _HubError(400, None, "FakeHub does not support pull requests")
        if rev != "main" and rev not in repo["refs"]:
            raise _HubError(404, "RevisionNotFound", f"Cannot commit to {rev!r}: not a branch")
        parent, files = self._snapshot(repo, rev)
        files = dict(files)
        for line in filter(None, body.splitlines()):
            op = json.loads(line)
            key, value = op["key"], op["value"]
            if key == "header":
                if value.get("parentCommit") not in (None, parent):
                    raise _HubError(412, None, f"Parent commit {value['parentCommit']} is not the head of {rev}")
            elif key == "file":
                content = value["content"]
                binary = value.get("encoding") == "base64"
                files[value["path"]] = base64.b64decode(content) if binary else content.encode()
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            else:
                raise _HubError(400, None, f"FakeHub does not support commit operation {key!r} (regular files only)")
        sha = os.urandom(20).hex()
        repo["commits"].append(sha)
        repo["files"][sha] = files
        repo["refs"][rev] = sha
        return _json(200, {"commitUrl": f"{self._repo_url(kind, repo_id)}/commit/{sha}", "commitOid": sha,
                           "pullRequestUrl": None})

    def _info(self, kind, repo_id, rev="main", **_):
        sha, files = self._snapshot(self._repo(kind, repo_id), rev)
        return _json(200, {
            "id": repo_id, "modelId": repo_id, "sha": sha, "private": self._repos[kind, repo_id]["private"], "disabled": False, "gated": False,
            "tags": [], "downloads": 0, "likes": 0, "siblings": [{"rfilename": path} for path in sorted(files)],
        })

    def _tree(self, kind, repo_id, rev, query, path="", **_):
        sha, files = self._snapshot(self._repo(kind, repo_id), rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = {}
        for file_path, data in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            for depth in range(1, len(parts)) if recursive else [1] * (len(parts) > 1):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": _git_oid(folder.encode())})
            if recursive or len(parts) == 1:
                entries[file_path] = {"type": "file", "path": file_path, "size": len(data), "oid": _git_oid(data)}
        if prefix and not entries:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {rev}")
        return _json(200, list(entries.values()))

    def _resolve(self, kind, repo_id, rev, path, byte_range=None, **_):
        sha, files = self._snapshot(self._repo(kind, repo_id), rev)
        commit_header = {"X-Repo-Commit": sha} if sha else {}
        if path not in files:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", **commit_header)
        data = files[path]
        etag = f'"{_git_oid(data)}"'
        headers = {"Content-Type": "application/octet-stream", "ETag": etag, "X-Linked-Etag": etag,
                   "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes", _CONTENT_HEADER: "1", **commit_header}
        if byte_range is None:
            return 200, headers, data
        span = _parse_range(byte_range, len(data))
        if span is None:
            return 416, {**commit_header, "Content-Range": f"bytes */{len(data)}"}, b""
        start, end = span
        return 206, {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}, data[start:end]


def _parse_range(header, size):
    """`(start, end)` (end exclusive) of a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range, `None` if it is not
    satisfiable; other forms (several ranges) raise `ValueError` (answered 400)."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or match[1] == match[2] == "":
        raise ValueError(f"unsupported Range header {header!r}")
    if match[1] == "":
        start, end = max(size - int(match[2]), 0), size
    else:
        start, end = int(match[1]), min(int(match[2]) + 1, size) if match[2] else size
    return (start, end) if start < size and start < end else None


def main(argv=None) -> None:
    """`python -m hf_regtools.testing.fake_hub`: serve a `FakeHub`, print its URL, stop on SIGINT or SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hf_regtools.testing.fake_hub",
        description="Serve an in-memory fake of the Hugging Face Hub: print its URL, then serve until SIGINT (Ctrl-C) "
                    "or SIGTERM. Point clients at it with HF_ENDPOINT=<url> HF_HUB_DISABLE_XET=1 HF_TOKEN=<any>.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind to (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind to (default: 0, a free one)")
    parser.add_argument("--user", default="fake-user", help="the namespace `whoami` reports (default: fake-user)")
    args = parser.parse_args(argv)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    hub = FakeHub(args.host, args.port, user=args.user).start()
    print(hub.url, flush=True)
    try:
        while not stopped.wait(0.5):
            pass
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
