"""Real git repositories and servers for tests: a repository made commit by commit (branches,
tags, a force-push) and pushed to a bare one in a served folder; `git daemon` and
`git http-backend` (behind a local HTTP server with basic auth) serving that folder; and a
server that accepts and never answers. Each server is a context manager that is ready when
entered and stopped, with what it started, when left."""

import base64
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

GIT_CORE = Path("/usr/lib/git-core")
READY_TIMEOUT = 10.0
COPY_CHUNK = 64 * 1024
# The tests' own git: no config of the host, a fixed identity.
GIT_ENV = {
    "PATH": os.environ.get("PATH") or os.defpath,
    "LC_ALL": "C",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_COMMITTER_NAME": "Test Author",
    "GIT_COMMITTER_EMAIL": "author@example.com",
    # `submodule add` of a repository by its path.
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "protocol.file.allow",
    "GIT_CONFIG_VALUE_0": "always",
}


def git(*args, cwd: Path | None = None) -> str:
    result = subprocess.run(
        ["git", *map(str, args)], cwd=cwd, env=GIT_ENV, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"git {' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(predicate, what: str, timeout: float = READY_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return result


class Repository:
    """`<served>/<name>.git`, bare (what a server serves), and a working copy beside the
    served folder to make commits in and push from."""

    def __init__(self, served: Path, name: str):
        self.name = name
        self.bare = served / f"{name}.git"
        self.work = served.parent / "work" / name
        git("init", "--quiet", "--bare", "--initial-branch=main", self.bare)
        git("init", "--quiet", "--initial-branch=main", self.work)
        self.git("remote", "add", "origin", self.bare)

    def git(self, *args) -> str:
        return git("-C", self.work, *args)

    def commit(self, files: dict[str, str | bytes | None], message: str = "change") -> str:
        """Write (None: delete) the files and commit them; the new commit's sha."""
        for name, content in files.items():
            path = self.work / name
            if content is None:
                path.unlink()
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return self.sha()

    def sha(self, rev: str = "HEAD") -> str:
        return self.git("rev-parse", f"{rev}^{{commit}}")

    def switch(self, branch: str, create: bool = False) -> None:
        self.git("switch", "--quiet", *(["-c"] if create else []), branch)

    def reset(self, rev: str) -> str:
        """Move the current branch to `rev` (the first half of rewriting its history)."""
        self.git("reset", "--quiet", "--hard", rev)
        return self.sha()

    def tag(self, name: str, message: str | None = None) -> None:
        """A tag at HEAD, annotated if it has a message."""
        self.git("tag", *(["-m", message] if message else []), name)

    def push(self, *refspecs: str, force: bool = False) -> None:
        self.git("push", "--quiet", *(["--force"] if force else []), "origin", *refspecs)

    def forget_unreachable(self) -> None:
        """The served repository drops what no ref leads to (after a force-push)."""
        git("-C", self.bare, "reflog", "expire", "--expire=now", "--all")
        git("-C", self.bare, "gc", "--quiet", "--prune=now")

    def add_submodule(self, path: str, source: "Repository", url: str) -> str:
        """`source` as a submodule at `path`, its URL in .gitmodules `url` (relative ones go
        by the superproject's origin where it is cloned); commits it."""
        self.git("submodule", "--quiet", "add", source.bare, path)
        self.git("config", "--file", ".gitmodules", f"submodule.{path}.url", url)
        return self.commit({}, f"submodule {path}")


class GitDaemon:
    """`git daemon` serving every repository under `base` on 127.0.0.1."""

    def __init__(self, base: Path):
        self.base, self.port, self.proc = base, free_port(), None

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}.git"

    def __enter__(self) -> "GitDaemon":
        self.proc = subprocess.Popen(
            [
                GIT_CORE / "git-daemon", "--export-all", f"--base-path={self.base}",
                "--listen=127.0.0.1", f"--port={self.port}", "--reuseaddr",
                "--informative-errors", self.base,
            ],
            env=GIT_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True,  # its forked children go with it
        )  # fmt: skip
        try:
            wait_for(self._listening, f"git daemon on port {self.port}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"git daemon exited with {self.proc.returncode}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def __exit__(self, *_exc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Request:
    """One request the HTTP server answered: `credentials` as sent (None: no basic auth),
    `sent` the bytes of the response's body."""

    method: str
    path: str
    query: str
    credentials: tuple[str, str] | None
    status: int
    sent: int


class GitHttp:
    """`git http-backend` serving every repository under `base`, behind a local HTTP server
    that requires basic auth as `username`/`password` and records each request."""

    def __init__(self, base: Path, username: str, password: str, host: str = "127.0.0.1"):
        self.base, self.credentials, self.host = base, (username, password), host
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _GitHandler)  # listening once made
        self._server.daemon_threads = True
        self._server.git = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/{name}.git"

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def sent(self, service: str = "git-upload-pack") -> list[int]:
        """The body sizes of the answers to `service`'s POSTs (what each fetch transferred)."""
        with self._lock:
            return [
                r.sent for r in self.requests if r.method == "POST" and r.path.endswith(service)
            ]

    def __enter__(self) -> "GitHttp":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _GitHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format, *args) -> None:
        pass  # the server's `requests` are its log

    def _serve(self) -> None:
        server: GitHttp = self.server.git
        url = urlsplit(self.path)
        credentials = self._credentials()
        record = Request(self.command, url.path, url.query, credentials, 401, 0)
        if credentials != server.credentials:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            record.status, record.sent = self._backend(server, url, credentials[0])
        server.record(record)

    def _credentials(self) -> tuple[str, str] | None:
        scheme, _, encoded = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        username, _, password = base64.b64decode(encoded).decode().partition(":")
        return username, password

    def _backend(self, server: GitHttp, url, user: str) -> tuple[int, int]:
        env = {
            **GIT_ENV,
            "GIT_PROJECT_ROOT": str(server.base),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": unquote(url.path),
            "QUERY_STRING": url.query,
            "REQUEST_METHOD": self.command,
            "REMOTE_USER": user,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
        }
        for header, variable in (
            ("Content-Length", "CONTENT_LENGTH"),
            ("Content-Encoding", "HTTP_CONTENT_ENCODING"),  # a gzipped request
            ("Git-Protocol", "HTTP_GIT_PROTOCOL"),  # protocol v2
        ):
            if header in self.headers:
                env[variable] = self.headers[header]
        with subprocess.Popen(
            [GIT_CORE / "git-http-backend"], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        ) as proc:  # fmt: skip
            feeding = threading.Thread(target=self._feed, args=(proc.stdin,), daemon=True)
            feeding.start()
            status = self._headers_from(proc.stdout)
            sent = self._copy(proc.stdout)
            feeding.join(READY_TIMEOUT)
        return status, sent

    def _feed(self, stdin) -> None:
        """The request's body to the backend as it comes (chunked or of a known length)."""
        with stdin, contextlib.suppress(BrokenPipeError):
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                    stdin.write(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after the chunk
                self.rfile.readline()  # the CRLF that ends the body
                return
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0 and (piece := self.rfile.read(min(left, COPY_CHUNK))):
                stdin.write(piece)
                left -= len(piece)

    def _headers_from(self, stdout) -> int:
        """The backend's CGI headers, as this response's status line and headers."""
        status, headers = 200, []
        while (line := stdout.readline().decode("latin-1").rstrip("\r\n")) != "":
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            else:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()  # HTTP/1.0: the body ends with the connection
        return status

    def _copy(self, stdout) -> int:
        sent = 0
        while piece := stdout.read1(COPY_CHUNK):
            self.wfile.write(piece)
            sent += len(piece)
        return sent


class Silent:
    """A TCP server on 127.0.0.1 that accepts connections and never says a word: a git:// or
    http:// URL to it hangs until the client gives up. `connections` holds what it accepted."""

    def __init__(self):
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)  # the accepting thread looks at `_closing` this often
        self.connections: list[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def url(self, name: str, scheme: str = "git") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/{name}.git"

    def _accept(self) -> None:
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                self.connections.append(self._sock.accept()[0])

    def __enter__(self) -> "Silent":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._closing.set()
        self._thread.join(5)
        for connection in [*self.connections, self._sock]:
            connection.close()
