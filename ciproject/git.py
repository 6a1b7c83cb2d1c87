"""Running git with a credential that never reaches a command line, a config file or a log:
git asks our askpass script, which answers from the git process's own environment, and only
git's two questions about the URL's own host (a redirect or a submodule elsewhere gets
nothing). The script holds nothing. The agent's checkout (agents.process.checkout) and the
server's `git ls-remote` (forge.git) both run git this way."""

import contextlib
import os
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

# The transports a clone URL may use: a token reaches git through the askpass over these.
# ssh (a deploy key) is not one yet: the server refuses such a URL, the agent too.
SCHEMES = ("https", "http", "git")
# What of the process's environment git gets: a proxy and a CA bundle of the host, no more.
PASSED_ON = (
    "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
    "all_proxy", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR", "GIT_SSL_CAINFO",
    "GIT_SSL_CAPATH",
)  # fmt: skip
ASKPASS = """#!/bin/sh
# ciproject's GIT_ASKPASS. It holds no secret: the answer comes from git's environment, and
# only to git's own two questions about the clone URL's host (a redirect or a submodule
# elsewhere gets nothing).
[ -n "$CIPROJECT_GIT_HOST" ] || exit 1
case "$1" in
"Username for '$CIPROJECT_GIT_SCHEME://$CIPROJECT_GIT_HOST': ")
    printf '%s\\n' "$CIPROJECT_GIT_USERNAME" ;;
"Password for '$CIPROJECT_GIT_SCHEME://$CIPROJECT_GIT_USERNAME@$CIPROJECT_GIT_HOST': ")
    printf '%s\\n' "$CIPROJECT_GIT_PASSWORD" ;;
*) exit 1 ;;
esac
"""


def install_askpass(folder: Path) -> Path:
    """The script in `folder` (a folder of the process's user alone), written whole."""
    askpass = folder / ".askpass"
    with contextlib.suppress(FileNotFoundError):
        if askpass.read_text() == ASKPASS:
            return askpass
    fd, part = tempfile.mkstemp(prefix=".askpass-", dir=folder)  # renamed whole into place
    with os.fdopen(fd, "w") as out:
        out.write(ASKPASS)
    os.chmod(part, 0o700)
    os.replace(part, askpass)
    return askpass


def environment(home: Path, url: str, username: str = "", password: str = "") -> dict[str, str]:
    """What git runs with: nothing of the host's git configuration (a private `home`, which
    holds the askpass script), no prompt on a terminal, and the credential (if any) for the
    askpass script alone, for `url`'s host."""
    env = {name: os.environ[name] for name in PASSED_ON if name in os.environ}
    env |= {
        "PATH": os.environ.get("PATH") or os.defpath,
        "HOME": str(home),  # no ~/.netrc or ~/.ssh of the process's user
        "LC_ALL": "C",  # git's messages, a job's reason, in one language
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": str(install_askpass(home)),
        "GIT_PROTOCOL_FROM_USER": "0",
    }
    if username:
        parts = urlsplit(url)
        env |= {
            "CIPROJECT_GIT_SCHEME": parts.scheme,
            "CIPROJECT_GIT_HOST": parts.netloc,
            "CIPROJECT_GIT_USERNAME": username,
            "CIPROJECT_GIT_PASSWORD": password,
        }
    return env


@cache
def _server_home() -> Path:
    return Path(tempfile.mkdtemp(prefix="ciproject-git-"))  # 0700, this process's


def run(args: list[str], url: str, credentials: dict | None, timeout: float):
    """`git ARGS` on `url` (the server's own use), its output as text."""
    credentials = credentials or {}
    return subprocess.run(
        ["git", *args],
        env=environment(
            _server_home(), url, credentials.get("username", ""), credentials.get("password", "")
        ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )


def message(done: subprocess.CompletedProcess, credentials: dict | None) -> str:
    """git's own words for why it failed, trimmed, the password masked should it echo it."""
    text = (done.stderr or done.stdout or f"exit code {done.returncode}").strip()
    password = (credentials or {}).get("password")
    if password:
        text = text.replace(password, "***")
    return text[-1000:]
