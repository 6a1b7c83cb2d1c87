"""Where cictl finds its server and token: the environment (`CICTL_URL`, `CICTL_TOKEN`), else
a TOML file with `url` and `token` (`$CICTL_CONFIG`, else
`$XDG_CONFIG_HOME/cictl/config.toml`, by default `~/.config/cictl/config.toml`). Each of the
two is taken from the environment if set there (and not empty), else from the file."""

import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cictl.errors import NotConfigured

KEYS = ("url", "token")


@dataclass(frozen=True)
class Config:
    url: str
    token: str
    # Where each came from ("CICTL_URL", or the file's path), for `cictl config` and -v.
    sources: dict = field(default_factory=dict)
    warnings: tuple = ()


def default_path(env=os.environ) -> Path:
    if env.get("CICTL_CONFIG"):
        return Path(env["CICTL_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "cictl" / "config.toml"


def read_file(path: Path, required: bool) -> tuple[dict, list[str]]:
    """The file's `url` and `token` (those it has), and warnings about it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise NotConfigured(
                "CONFIG_NOT_FOUND", f"{path} (named by CICTL_CONFIG) does not exist"
            ) from None
        return {}, []
    except OSError as exc:
        raise NotConfigured("CONFIG_INVALID", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        # The parser's message names a line and column, never the file's text.
        raise NotConfigured("CONFIG_INVALID", f"{path} is not valid TOML: {exc}") from None
    warnings = [f"{path}: unknown key {key!r} ignored" for key in data if key not in KEYS]
    for key in KEYS:
        if key in data and not isinstance(data[key], str):
            raise NotConfigured("CONFIG_INVALID", f"{path}: {key} must be a string")
    if data.get("token") and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(f"{path} holds a token and others can read it: chmod 600 {path}")
    return {key: data[key] for key in KEYS if data.get(key)}, warnings


def load(env=os.environ) -> Config:
    """The configuration, or NotConfigured saying what is missing or wrong."""
    path = default_path(env)
    from_file, warnings = read_file(path, required=bool(env.get("CICTL_CONFIG")))
    values, sources = {}, {}
    for key in KEYS:
        name = f"CICTL_{key.upper()}"
        if env.get(name):
            values[key], sources[key] = env[name], name
        elif key in from_file:
            values[key], sources[key] = from_file[key], str(path)
    for key, what in (("url", "server URL"), ("token", "API token")):
        if key not in values:
            raise NotConfigured(
                "NOT_CONFIGURED", f"no {what}: set CICTL_{key.upper()}, or {key} in {path}"
            )
    url = values["url"].strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotConfigured(
            "CONFIG_INVALID",
            f"the server URL (from {sources['url']}) must be http:// or https:// with a host",
        )
    token = values["token"].strip()
    # Never echo it: a header with a control character would make httpx quote it in an error.
    if not token.isascii() or not token.isprintable() or " " in token:
        raise NotConfigured(
            "CONFIG_INVALID",
            f"the token (from {sources['token']}) has characters a token cannot have",
        )
    return Config(url=url, token=token, sources=sources, warnings=tuple(warnings))


def display_url(url: str) -> str:
    """The URL without a user or password in it, to show."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
