"""How a federation simulation fails: FederationFailed, the one line that explains a failure (cause and fix), and
leaving a simulation that will not stop (its Ray processes killed)."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.federation.devices import DevicesTimeout, FederationStopped

if TYPE_CHECKING:
    from sim.federation.driver import FederateOptions


class FederationFailed(RuntimeError):
    """A federation that could not run; the message names the cause and the fix, in one line."""


SHUTDOWN_GRACE = 30.0  # seconds a stopped simulation gets to shut its backend down


def ray_processes() -> list[int]:
    """Ray's processes among this process's descendants (gcs_server, raylet, its agents and workers)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])  # pid (comm) state ppid ...
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any("/ray/" in a or a.startswith("ray::") or Path(a).name in ("raylet", "gcs_server") for a in argv):
            found.append(pid)
    return found


def abandon(done: threading.Event, grace: float) -> None:
    """Give a stopped simulation `grace` seconds to end. One still running then (Ray stuck in its start, say) is left
    to its daemon thread, muted so that it does not talk over the failure, and Ray's processes are killed."""
    if done.wait(grace):
        return
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    import signal
    for pid in ray_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def ray_started() -> bool:
    import ray
    return ray.is_initialized()


def _causes(ex: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while ex is not None and ex not in chain:
        chain.append(ex)
        ex = ex.__cause__ or ex.__context__
    return chain


def explain(ex: BaseException, opts: FederateOptions) -> str:
    """One line for a failed simulation: what broke, and what to change."""
    chain = _causes(ex)
    for e in chain:
        if isinstance(e, DevicesTimeout):
            return f"the simulated devices did not come up: {e}"
    text = " | ".join(str(e) for e in chain)
    if "ActorPool is empty" in text:
        return (f"the simulation backend (Ray) cannot host a single device: each one reserves --cpus-per-device "
                f"{opts.cpus_per_device:g} CPUs of the --cpus {opts.cpus:g} Ray may use; lower --cpus-per-device or "
                f"raise --cpus")
    if "timed out during startup" in text or "gcs_server_port" in text:
        part = "node" if "timed out during startup" in text else "GCS server"
        return (f"the simulation backend (Ray) did not start: its {part} timed out during startup (an overloaded "
                f"machine); retry when the machine is less busy, or with fewer --cpus")
    root = chain[-1]
    return f"the simulation failed: {type(root).__name__}: {root}"


def real_error(errors: dict[str, BaseException]) -> BaseException | None:
    """What broke a simulation: the ServerApp's error, else the simulation's, unless it only says it was stopped."""
    for key in ("server", "simulation"):
        ex = errors.get(key)
        if ex is not None and not any(isinstance(e, FederationStopped) for e in _causes(ex)):
            return ex
    return None
