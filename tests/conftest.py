"""Shared fixtures: an in-process cloud on loopback serving a tiny random Llama, and edges that talk to it."""
from __future__ import annotations

import copy

import pytest
import torch

import tasks as T
from cloud.rpc import BackboneService, make_server
from cloud.sessions import CloudConfig
from edge.trainer import EdgeConfig, build_edge
from model.load import load_model

TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef0"}


@pytest.fixture(scope="session")
def tiny():
    """The tiny random Llama (6 blocks, hidden 64) every unit test shares; copy before changing it."""
    return load_model("tiny-llama")


class CloudHandle:
    def __init__(self, model, config: CloudConfig, max_message_mb: int = 8):
        self.service = BackboneService(copy.deepcopy(model), {v: k for k, v in TOKENS.items()}, config)
        self.server, self.port = make_server(self.service, "127.0.0.1:0", max_message_mb=max_message_mb)
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def stop(self):
        self.service.stop()
        self.server.stop(0).wait()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread avoids OpenMP spin-waiting against other processes.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def task_identity():
    """Flower messages need the identity of the running task; outside a run we set one. A module opts in with
    `pytestmark = pytest.mark.usefixtures("task_identity")`."""
    from flwr.supercore.task_identity import TaskIdentity  # only the federation tests need Flower
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def cloud(tiny):
    handle = CloudHandle(tiny.model, CloudConfig(max_tokens_per_step=4096, step_timeout=5.0))
    yield handle
    handle.stop()


def make_edge(cloud, tiny, client="alice", **kw):
    cfg = EdgeConfig.of(cloud=cloud.address, token=TOKENS[client], model="tiny-llama", progress=False, **kw)
    return build_edge(cfg, loaded=copy.deepcopy(tiny))


def sst2_batches(n: int, batch_size: int = 4, seed: int = 0):
    task = T.TASKS["sst2"]
    items = T.encode(task, T.load_split("sst2", "train")[:n * batch_size], T.tiny_tokenizer())
    return list(T.batches(task, items, batch_size, 0, seed=seed))[:n]


def randomize_lora_b(lora, seed: int = 1, std: float = 0.02):
    """PEFT starts B at zero; a nonzero B makes equivalence checks see every LoRA path from step one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in lora.sites.values():
            site.lora_B.weight.normal_(0, std, generator=g)


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    """`identities(*names)`: a fresh key folder with a sealing identity (privacy.security.seal) for each name."""
    from privacy.security.seal import generate_identity

    def make(*names: str):
        d = tmp_path_factory.mktemp("keys")
        for name in names:
            generate_identity(d, name)
        return d
    return make


def train_edge_steps(em, batches, lr: float = 1e-2) -> list[float]:
    """Plain AdamW on the edge model's LoRA, one step a batch (the equivalence tests' loop); each step's loss."""
    opt = torch.optim.AdamW(em.lora.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss, _ = em.loss(b)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_peft_reproduces_edge(em, model, folder, batches, virtual: int = 0):
    """The adapter the edge saves in `folder` loads with `peft.PeftModel.from_pretrained` onto (a copy of) the full
    `model` and gives the edge's logits at each batch's answer positions within 1e-4; `virtual`: the V positions a
    prompt method's PEFT output has first. Returns the PEFT model."""
    import peft
    em.lora.save_peft(folder, "tiny-llama")
    full = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    em.eval()
    with torch.no_grad():
        for b in batches:
            _, edge_logits = em.loss(b)
            peft_logits = full(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, virtual:]
            rows = torch.arange(len(b))
            assert (edge_logits - peft_logits[rows, b.answer_pos]).abs().max().item() <= 1e-4
    return full


def grpc_dlora_edge(loaded):
    """A gRPC cloud serving a copy of `loaded`, and a DLoRA edge on another copy connected to it: (the started
    server, (edge model, tokenizer, link)). The caller stops the server; a failed connection stops it here."""
    svc = BackboneService(copy.deepcopy(loaded.model), {"real-model-token-0123456789": "a"})
    server, port = make_server(svc, "127.0.0.1:0")
    server.start()
    try:
        return server, build_edge(EdgeConfig.of(cloud=f"127.0.0.1:{port}", token="real-model-token-0123456789",
                                                cloud_lora="edge"), loaded=copy.deepcopy(loaded))
    except BaseException:
        server.stop(0)
        raise


def environ_of(pid: int) -> dict[str, str]:
    """The environment of a running process (empty once it is gone): tests find the processes they started."""
    from pathlib import Path
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
