"""A network testbed on one Linux machine: the cloud in one network namespace, each edge in its own, joined by veth
pairs whose both ends are rate-limited with `tc ... tbf` (netem is not available on our machines).

    <prefix>-cloud  c<i> 10.231.0.(4i+1)/30  <== veth, tbf rate R both ways ==>  e0 10.231.0.(4i+2)/30  <prefix>-edge<i>

Every address lives only inside these namespaces and the veths are created directly inside them, so nothing touches
the host's own network; everything is torn down on exit, also after errors. Commands (a cloud server, edge clients,
anything) are passed in and run with `ip netns exec`. Needs root (CAP_NET_ADMIN) and iproute2; `permitted()` says
why not where it is not.

A self-test moves bytes through the link with plain TCP sockets (sim/tcptool.py) and compares the throughput with
the set rate times the TCP/IP payload share (sim.profiles.LinkProfile.efficiency).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TCPTOOL = str(Path(__file__).resolve().parent / "tcptool.py")  # run by path: starts without importing Tandem


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False  # not a pytest test class
    edges: int = 1
    rate_mbit: float = 50.0  # both directions of every edge's link
    prefix: str = "tandem"
    subnet: str = "10.231.0"  # a /24 carved into one /30 per edge (at most 64 edges)
    queue_bytes: int = 4 << 20  # tbf queue: deep enough that TCP never loses a packet to it


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def tbf_args(rate_mbit: float, queue_bytes: int) -> list[str]:
    """tbf parameters: burst of about 1 ms at the rate (at least 4 full frames) so short bursts barely exceed it."""
    rate_bps = rate_mbit * 1e6
    burst = max(4 * 1514, int(rate_bps / 8 * 1e-3))
    return ["rate", f"{rate_mbit:g}mbit", "burst", str(burst), "limit", str(queue_bytes)]


class Testbed:
    """`with Testbed(cfg) as tb:` builds the namespaces, links and rate limits, and always removes them."""
    __test__ = False  # not a pytest test class

    def __init__(self, cfg: TestbedConfig = TestbedConfig()):
        if not 1 <= cfg.edges <= 64:
            raise ValueError("the testbed holds 1 to 64 edges")
        self.cfg = cfg
        self.rate_mbit = cfg.rate_mbit
        self.cloud_ns = f"{cfg.prefix}-cloud"
        self.edge_ns = [f"{cfg.prefix}-edge{i}" for i in range(cfg.edges)]
        self._procs: list[subprocess.Popen] = []

    # ---- addresses --------------------------------------------------------------------------------------------
    def cloud_ip(self, edge: int = 0) -> str:
        """The cloud's address on edge `edge`'s link (what that edge connects to)."""
        return f"{self.cfg.subnet}.{4 * edge + 1}"

    def edge_ip(self, edge: int = 0) -> str:
        return f"{self.cfg.subnet}.{4 * edge + 2}"

    # ---- life cycle -------------------------------------------------------------------------------------------
    def namespaces(self) -> list[str]:
        return [self.cloud_ns, *self.edge_ns]

    def up(self) -> "Testbed":
        existing = set(_sh("ip", "netns", "list").stdout.split())
        for ns in self.namespaces():  # left over by a killed run with the same prefix: ours to remove
            if ns in existing:
                _sh("ip", "netns", "del", ns, check=False)
        try:
            for ns in self.namespaces():
                _sh("ip", "netns", "add", ns)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
            for i, ens in enumerate(self.edge_ns):
                c, e = f"c{i}", "e0"
                _sh("ip", "link", "add", "name", c, "netns", self.cloud_ns, "type", "veth", "peer", "name", e,
                    "netns", ens)
                _sh("ip", "-n", self.cloud_ns, "addr", "add", f"{self.cloud_ip(i)}/30", "dev", c)
                _sh("ip", "-n", ens, "addr", "add", f"{self.edge_ip(i)}/30", "dev", e)
                _sh("ip", "-n", self.cloud_ns, "link", "set", c, "up")
                _sh("ip", "-n", ens, "link", "set", e, "up")
            self.set_rate(self.cfg.rate_mbit, add=True)
        except Exception:
            self.down()
            raise
        return self

    def _ends(self):
        for i, ens in enumerate(self.edge_ns):
            yield self.cloud_ns, f"c{i}"  # cloud -> edge i (down)
            yield ens, "e0"  # edge i -> cloud (up)

    def set_rate(self, rate_mbit: float, add: bool = False) -> None:
        """Rate-limit both directions of every link to `rate_mbit` (changing it keeps servers and connections)."""
        for ns, dev in self._ends():
            _sh("tc", "-n", ns, "qdisc", "add" if add else "replace", "dev", dev, "root", "tbf",
                *tbf_args(rate_mbit, self.cfg.queue_bytes))
        self.rate_mbit = rate_mbit

    def qdiscs(self) -> str:
        return "\n".join(f"{ns} {dev}: " + _sh("tc", "-n", ns, "qdisc", "show", "dev", dev).stdout.strip()
                         for ns, dev in self._ends())

    def down(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._procs.clear()
        existing = set(_sh("ip", "netns", "list", check=False).stdout.split())
        for ns in self.namespaces():
            if ns in existing:
                _sh("ip", "netns", "del", ns, check=False)  # removes its veth ends and qdiscs too

    def __enter__(self) -> "Testbed":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # ---- running commands -------------------------------------------------------------------------------------
    def argv(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start `argv` inside namespace `ns`; it is terminated when the testbed goes down."""
        kw.setdefault("cwd", str(REPO))
        kw.setdefault("env", _env())
        p = subprocess.Popen(self.argv(ns, argv), **kw)
        self._procs.append(p)
        return p

    def run(self, ns: str, argv: list[str], timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("cwd", str(REPO))
        kw.setdefault("env", _env())
        return subprocess.run(self.argv(ns, argv), timeout=timeout, **kw)

    def wait_port(self, edge: int, port: int, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
        """Wait until the cloud accepts TCP connections on `port`, tried from inside edge `edge`'s namespace."""
        deadline = time.monotonic() + timeout
        probe = [sys.executable, TCPTOOL, "probe", self.cloud_ip(edge), str(port)]
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the cloud process exited with {proc.returncode} before listening")
            if self.run(self.edge_ns[edge], probe, timeout=10, capture_output=True).returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"nothing listens on {self.cloud_ip(edge)}:{port} after {timeout:.0f} s")

    # ---- self-test --------------------------------------------------------------------------------------------
    def measure_throughput(self, nbytes: int, direction: str = "up", edge: int = 0, port: int = 5201) -> float:
        """Goodput in bit/s of one TCP transfer of `nbytes` (up: edge -> cloud, down: cloud -> edge), timed by the
        receiver from the first chunk's arrival to the last's."""
        recv_ns, recv_ip, send_ns = ((self.cloud_ns, self.cloud_ip(edge), self.edge_ns[edge]) if direction == "up"
                                     else (self.edge_ns[edge], self.edge_ip(edge), self.cloud_ns))
        sink = self.popen(recv_ns, [sys.executable, TCPTOOL, "sink", recv_ip, str(port)])
        try:
            out = self.run(send_ns, [sys.executable, TCPTOOL, "source", recv_ip, str(port), str(nbytes)],
                           timeout=600, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"source failed: {out.stderr.strip()}")
            return float(out.stdout.split()[-1])
        finally:
            sink.wait(timeout=30)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def permitted() -> tuple[bool, str]:
    """Whether this machine lets us build the testbed; if not, why (for pytest skips and CLI errors)."""
    if sys.platform != "linux":
        return False, "network namespaces need Linux"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed: apt-get install iproute2"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root (CAP_NET_ADMIN)"
    probe = Testbed(TestbedConfig(edges=1, rate_mbit=10, prefix=f"tandem-probe{os.getpid()}"))
    try:
        probe.up()
    except RuntimeError as e:
        return False, f"cannot build a namespace/veth/tbf link here: {e}"
    finally:
        probe.down()
    return True, ""
