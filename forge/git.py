"""The server's one use of git: which commit a branch's head is (`git ls-remote`), for a
schedule's tick and a run-now on a branch. Credentials go through ciproject.git's askpass,
never on the command line."""

import subprocess

from ciproject import git
from forge.errors import BranchNotFound, ForgeUnreachable

LS_REMOTE_TIMEOUT_SECONDS = 30


def head_of(url: str, branch: str, credentials: dict | None) -> str:
    """The sha of `branch`'s head in the repository at `url`."""
    ref = f"refs/heads/{branch}"
    try:
        done = git.run(
            ["ls-remote", "--", url, ref], url, credentials, timeout=LS_REMOTE_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise ForgeUnreachable(
            f"git ls-remote {url} did not answer within {LS_REMOTE_TIMEOUT_SECONDS} s"
        ) from None
    if done.returncode != 0:
        raise ForgeUnreachable(f"git ls-remote {url}: {git.message(done, credentials)}")
    for line in done.stdout.splitlines():
        sha, _, name = line.partition("\t")
        if name == ref:
            return sha
    raise BranchNotFound(f"no branch {branch!r} in {url}", branch=branch)
