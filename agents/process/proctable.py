"""Linux's process table, read from /proc: who is whose child, in which process group, which
have ended (zombies), what environment a process was started with. Anything may exit while
it is read: such a process is simply not there."""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    state: str  # "Z": a zombie, ended and waiting for its parent to reap it
    start_time: str  # clock ticks since boot: with the pid, it names one process

    @property
    def alive(self) -> bool:
        return self.state != "Z"


def read(pid: int) -> Proc | None:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The name before ")" may hold spaces and parentheses: split after the last one.
    fields = data[data.rfind(b")") + 2 :].split(b" ", 20)
    if len(fields) < 20:
        return None
    return Proc(pid, int(fields[1]), int(fields[2]), fields[0].decode(), fields[19].decode())


def processes() -> list[Proc]:
    found = (read(int(name)) for name in os.listdir("/proc") if name.isdigit())
    return [proc for proc in found if proc is not None]


def descendants(ancestor: int, table: list[Proc]) -> list[Proc]:
    children: dict[int, list[Proc]] = {}
    for proc in table:
        children.setdefault(proc.ppid, []).append(proc)
    found, todo = [], [ancestor]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child.pid)
    return found


def environment(pid: int) -> set[bytes]:
    """The environment the process was started with, as b"NAME=value" entries."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return set(environ.read().split(b"\0"))
    except OSError:  # gone, or not ours to read
        return set()
