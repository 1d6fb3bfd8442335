"""Where a socket belongs, told in user space from the two numbers its records carry
(tcpipstat/records.py, format 3): its cgroup v2 id and its network namespace's inode.

- A cgroup id is the kernfs node id of the socket's cgroup, which on 64-bit kernels is
  the inode number of that cgroup's directory in the cgroup v2 hierarchy: walking the
  hierarchy maps ids to paths (:class:`CgroupPaths`). A socket's cgroup is the one of the
  process that created it (an accepted socket inherits its listener's): the kernel sets it
  in sk_alloc() and sk_clone_lock(), and it never changes.
- The container or service a cgroup path names is parsed from its components
  (:func:`container_of`).
- A network namespace has a name when ``ip netns add NAME`` bind-mounted it on
  /run/netns/NAME: that file's inode is the namespace's (:class:`NetnsNames`).
- Where the collector runs on another host (a replaced stap or bpftrace command, as in the
  lab), the numbers are that host's: its stand-in sends that host's tables as comment
  lines (:data:`PLACE_LINE`, :func:`sent_places`), and they replace this host's, which are
  then never read. A saved run keeps those lines, and a replay reads them
  (:func:`saved_places`).

Also the checks of --cgroup and --netns, and the selection they make.
"""
from __future__ import annotations

import os
import posixpath
import re
import time
from typing import Callable, Iterable, Iterator

from .errors import UsageError

MOUNTS = "/proc/self/mounts"
DEFAULT_CGROUP2 = "/sys/fs/cgroup"       # a unified host's (a hybrid one: .../unified)
NETNS_DIR = "/run/netns"                 # where ip netns bind-mounts (/var/run: a link here)
NS_INUM_MAX = (1 << 32) - 1              # namespace inodes are unsigned ints (ns_common.inum)


def cgroup2_root(mounts: str = MOUNTS) -> str | None:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup when it is mounted there,
    else its first mount (a hybrid systemd host: /sys/fs/cgroup/unified); None if none."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            points = [w[1].replace("\\040", " ") for w in (line.split() for line in f)
                      if len(w) > 2 and w[2] == "cgroup2"]
    except OSError:
        return None
    if DEFAULT_CGROUP2 in points:
        return DEFAULT_CGROUP2
    return points[0] if points else None


class _Lookup:
    """A table read from the system (``load`` fills it) when asked for a key it does not
    hold, at most once every ``every`` seconds (a report reads it once); what earlier
    reads found is kept."""

    def __init__(self, load: Callable[[dict[int, str]], None], every: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._load, self._every, self._clock = load, every, clock
        self._found: dict[int, str] = {}
        self._read_at: float | None = None

    def _get(self, key: int) -> str | None:
        if not key:
            return None                 # (0: not recorded)
        found = self._found.get(key)
        if found is None and (self._read_at is None
                              or self._clock() - self._read_at >= self._every):
            self.read()
            found = self._found.get(key)
        return found

    def read(self) -> None:
        self._read_at = self._clock()
        self._load(self._found)


class CgroupPaths(_Lookup):
    """cgroup id -> its path in the hierarchy mounted at ``root`` ("/": the root cgroup), by
    walking the hierarchy. 64-bit kernfs ids carry a generation in their high bits, so an
    id is never reused within a boot: a cgroup removed since a walk saw it keeps its name."""

    def __init__(self, root: str | None, **kw):
        super().__init__(self._walk, **kw)
        self.root = root

    def path(self, cgid: int) -> str | None:
        """The cgroup's path; None when no walk found it (or the id is 0, unknown)."""
        return self._get(cgid)

    def exists(self, path: str) -> bool:
        """Is ``path`` ("/a/b") a cgroup now?"""
        try:
            return os.path.isfile(self.root.rstrip("/") + path.rstrip("/") + "/cgroup.procs")
        except ValueError:          # (a NUL in it)
            return False

    def _walk(self, into: dict[int, str]) -> None:
        if self.root is None:
            return
        top = self.root.rstrip("/")
        for folder, _, _ in os.walk(top or "/", onerror=lambda e: None):
            try:
                into[os.stat(folder).st_ino] = folder[len(top):] or "/"
            except OSError:
                continue        # (removed while walking)


class NetnsNames(_Lookup):
    """netns inode -> its ``ip netns`` name: the inode of /run/netns/NAME, for the entries
    that are namespace files (bind mounts of nsfs; a failed ``ip netns add`` can leave an
    empty file of its own)."""

    def __init__(self, folder: str = NETNS_DIR, own_ns: str = "/proc/self/ns/net", **kw):
        super().__init__(self._list, **kw)
        self.folder, self._own_ns = folder, own_ns

    def name(self, inode: int) -> str:
        """The namespace's name ("" when it has none, or the inode is 0, unknown)."""
        return self._get(inode) or ""

    def _list(self, into: dict[int, str]) -> None:
        try:
            nsfs = os.stat(self._own_ns).st_dev
            entries = sorted(os.listdir(self.folder))
        except OSError:
            return
        for name in entries:
            try:
                st = os.stat(os.path.join(self.folder, name))
            except OSError:
                continue
            if st.st_dev == nsfs:
                into.setdefault(st.st_ino, name)


# ---- containers and services in a cgroup path ----
# Each pattern matches one path component and names the container in it. The shapes, and
# where they come from (the runtimes' own naming, and parsers that read them):
_HEX64 = "([0-9a-f]{64})"
_CONTAINERS: tuple[tuple[str, re.Pattern], ...] = tuple((kind, re.compile(rx)) for kind, rx in (
    # docker, systemd cgroup driver: /system.slice/docker-<id>.scope; cgroupfs driver:
    # /docker/<id> (docs.docker.com, "Runtime metrics", Find the cgroup for a given
    # container; falcosecurity/libs container_engine/docker/docker_linux.cpp)
    ("docker", rf"docker-{_HEX64}\.scope"),
    # containerd under Kubernetes, systemd driver: .../cri-containerd-<id>.scope; without
    # SystemdCgroup, the systemd-style cgroupsPath taken as a name:
    # kubepods-...-pod<uid>.slice:cri-containerd:<id> (falcosecurity/libs
    # container_engine/cri.cpp, CRI_CGROUP_LAYOUT)
    ("containerd", rf"cri-containerd-{_HEX64}\.scope"),
    ("containerd", rf".*:cri-containerd:{_HEX64}"),
    # CRI-O: crio-<id>.scope (systemd), crio-<id> (cgroupfs), and its monitor's
    # crio-conmon-<id>.scope (falcosecurity/libs container_engine/cri.cpp)
    ("crio", rf"crio-(?:conmon-)?{_HEX64}(?:\.scope)?"),
    # podman: /machine.slice/libpod-<id>.scope, rootless under user@UID.service, the
    # container's own subgroup libpod-<id>.scope/container below it, libpod-conmon-<id>.scope,
    # and libpod-<id> with cgroupfs (falcosecurity/libs container_engine/docker/podman.cpp;
    # sysflow-telemetry/sf-collector src/libs/utils.cpp, ALL_RUNC_CGROUP_LAYOUTS)
    ("podman", rf"libpod-(?:conmon-)?{_HEX64}(?:\.scope)?"),
))
# cgroupfs drivers name a container by its bare id below its parent: /docker/<id> (docker),
# /kubepods/<qos>/pod<uid>/<id> (kubelet's ToCgroupfs() naming and containerd or CRI-O)
_BARE_ID = re.compile(_HEX64)
# a Kubernetes pod: pod<uid> (cgroupfs) or kubepods-<qos>-pod<uid with _ for ->.slice
# (systemd; kubernetes pkg/kubelet/cm/cgroup_manager_linux.go, ToSystemd() and
# escapeSystemdCgroupName(); pod_container_manager_linux.go, podCgroupNamePrefix)
_POD = re.compile(r"(?:kubepods(?:-[a-z]+)?-)?pod([0-9a-fA-F_-]{36})(?:\.slice)?")
_SERVICE = re.compile(r".+\.service")
HOST = "-"


def container_of(path: str | None) -> tuple[str, str]:
    """(id, kind) of the container a cgroup path is in, the deepest one when containers
    nest; else of the Kubernetes pod (kind kubepods, id pod<uid>); else the systemd service
    (kind systemd, its unit name); ``("-", "")`` for the host, ``("", "")`` for no path."""
    if path is None:
        return "", ""
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts) - 1, -1, -1):
        found = _container(parts, i)
        if found:
            return found
    for part in parts:
        m = _POD.fullmatch(part)
        if m:
            return "pod" + m.group(1).replace("_", "-"), "kubepods"
    for part in reversed(parts):
        if _SERVICE.fullmatch(part):
            return part, "systemd"
    return HOST, ""


def _container(parts: list[str], i: int) -> tuple[str, str] | None:
    part = parts[i]
    for kind, rx in _CONTAINERS:
        m = rx.fullmatch(part)
        if m:
            return m.group(1), kind
    if i and _BARE_ID.fullmatch(part):
        parent = parts[i - 1]
        if parent == "docker":
            return part, "docker"
        if _POD.fullmatch(parent):
            return part, "kubepods"
    return None


# ---- the tables of the host the collector ran on, where that is not this one ----
PLACE_LINE = "tcpipstat-place"      # a stand-in's comment: "# tcpipstat-place KIND ..."
# KIND: cgroup2 MOUNT (where that host mounts cgroup v2), cgroup ID PATH, netns INODE NAME
_PLACE_HEAD = f"# {PLACE_LINE} "


class SentCgroups(CgroupPaths):
    """The cgroups of the collector's host, as its stand-in sent them: nothing is read
    here. ``root``: where that host mounts cgroup v2 (None until it says)."""

    def __init__(self):
        super().__init__(None)

    def _walk(self, into: dict[int, str]) -> None:
        pass                        # (only what was sent)

    def exists(self, path: str) -> bool:
        return path in self._found.values()


class SentNetns(NetnsNames):
    """The named namespaces of the collector's host, as its stand-in sent them."""

    def _list(self, into: dict[int, str]) -> None:
        pass                        # (only what was sent)


def _take(line: str, cgroups_: SentCgroups, netns: SentNetns) -> None:
    """One place line into the tables (a malformed one is left out)."""
    words = line[len(_PLACE_HEAD):].rstrip("\n").split(" ", 2)
    if words[0] == "cgroup2" and len(words) > 1:
        cgroups_.root = " ".join(words[1:])
    elif len(words) == 3 and words[1].isdigit() and words[1].isascii():
        table = {"cgroup": cgroups_, "netns": netns}.get(words[0])
        if table is not None:
            table._found.setdefault(int(words[1]), words[2])


def sent_places(lines: Iterable[str]) -> Iterator[str]:
    """``lines`` as they are, their place lines taken into new tables, which replace this
    host's from now on (even before a line comes: nothing of this host's is read)."""
    cg, ns = _sent_tables()

    def feed() -> Iterator[str]:
        for line in lines:
            if line.startswith(_PLACE_HEAD):
                _take(line, cg, ns)
            yield line
    return feed()


def _sent_tables() -> tuple[SentCgroups, SentNetns]:
    """New, empty tables of places another host sent, in place of this host's."""
    global _cgroups, _netns
    cg, ns = _cgroups, _netns = SentCgroups(), SentNetns()
    return cg, ns


def saved_places(path: str) -> bool:
    """A saved run whose place lines say its collector ran on another host: their tables
    replace this host's (True); else nothing changes (False, also when the file cannot be
    read: the replay says why)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            found = [line for line in f if line.startswith(_PLACE_HEAD)]
    except OSError:
        return False
    if not found:
        return False
    cg, ns = _sent_tables()
    for line in found:
        _take(line, cg, ns)
    return True


# ---- the resolvers a run uses (made when first needed) ----
_cgroups: CgroupPaths | None = None
_netns: NetnsNames | None = None


def cgroups() -> CgroupPaths:
    global _cgroups
    if _cgroups is None:
        _cgroups = CgroupPaths(cgroup2_root())
    return _cgroups


def netns_names() -> NetnsNames:
    global _netns
    if _netns is None:
        _netns = NetnsNames()
    return _netns


# ---- --cgroup and --netns ----

def check_cgroup(text: str, paths: CgroupPaths | None = None) -> str:
    """--cgroup's PATH as a cgroup path ("/a/b"): as /proc/PID/cgroup writes it, or its
    directory under the cgroup v2 mount. It must be a cgroup now; the hierarchy is read
    (so that the sockets of a cgroup removed during the run are still its)."""
    paths = paths or cgroups()
    root = paths.root
    if root is None:
        raise UsageError(f"bad --cgroup '{text}': cgroup v2 is not mounted here")
    if not text:
        raise UsageError("bad --cgroup '': expected a cgroup path such as /system.slice")
    top = root.rstrip("/")
    path = posixpath.normpath("/" + text.lstrip("/"))
    if path == top or path.startswith(top + "/"):
        path = path[len(top):] or "/"
    if not paths.exists(path):
        raise UsageError(f"bad --cgroup '{text}': no such cgroup (cgroup v2 is mounted on "
                         f"{root})")
    paths.read()
    return path


def check_netns(text: str, pid_max: int, here: bool = True) -> int:
    """--netns: a namespace inode, or a process ID (at most ``pid_max``) meaning that
    process's namespace. The two never overlap: namespace inodes are 0xEFFFFFF8 or more
    (include/linux/proc_ns.h), PIDs at most 2^22 (PID_MAX_LIMIT). ``here``: the sockets
    were this host's (else a process ID here says nothing of them)."""
    if not re.fullmatch(r"[0-9]{1,10}", text) or not 0 < int(text) <= NS_INUM_MAX:
        raise UsageError(f"bad --netns '{text}': expected a namespace inode or a process ID")
    n = int(text)
    if n > pid_max:
        return n
    if not here:
        raise UsageError(f"bad --netns '{text}': the records were collected on another host: "
                         "expected a namespace inode")
    try:
        return os.stat(f"/proc/{n}/ns/net").st_ino
    except OSError:
        raise UsageError(f"bad --netns '{text}': no process {n} (or its namespace cannot "
                         "be read)") from None


def under(path: str | None, top: str) -> bool:
    """Is cgroup ``path`` ``top`` or below it?"""
    return path is not None and (top == "/" or path == top or path.startswith(top + "/"))


def selector(cgroup: str | None, netns: int | None) -> Callable[[object], bool] | None:
    """Whether a socket's totals are kept by --cgroup and --netns (None: no such option)."""
    if cgroup is None and netns is None:
        return None
    paths = cgroups()

    def keep(st) -> bool:
        if netns is not None and st.netns != netns:
            return False
        return cgroup is None or under(paths.path(st.cgroup), cgroup)
    return keep
