"""`tandem cloud serve`: load the backbone once, serve sessions until SIGINT/SIGTERM, then drain and stop."""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, fields
from typing import Literal

from cloud.quantize import check_mode, quantize_blocks
from cloud.rpc import BackboneService, make_server
from cloud.sessions import CloudConfig
from model.load import DTYPES, load_model

log = logging.getLogger("tandem.cloud")


@dataclass
class ServeConfig:
    model: str = "smollm2"  # backbone spec: smollm2, tiny-llama, tiny-gpt2 or a Hugging Face model folder
    host: str = "127.0.0.1"  # address to listen on
    port: int = 50051  # port to listen on (0: any free port)
    tokens: str | None = None  # JSON {"client": "token"} from `tandem tokens`; omit with --tls-dir and client certs
    tls_dir: str | None = None  # folder with the CA and server certificate from `tandem certs` (TLS)
    require_client_cert: bool = False  # mutual TLS: edges must present a client certificate
    dtype: str = "float32"  # dtype of the backbone's weights
    device: str = "cpu"  # torch device of the backbone
    quantize: Literal["none", "int8", "int4"] = "none"  # the served blocks' linears in 8 or 4 bits
    ttl: float = 600.0  # seconds an idle session lives
    max_sessions: int = 64  # sessions open at once, all clients together
    max_sessions_per_client: int = 16  # sessions one client may hold
    max_tokens_per_step: int = 16384  # tokens one step may send at sequence length 512 (longer ones cost more)
    step_timeout: float = 120.0  # seconds the cloud waits for any one edge message inside a step
    begin_timeout: float = 10.0  # seconds a new Step stream may take to send its first message
    max_streams_per_client: int = 8  # open Step streams of one client
    max_steps_per_client: int = 2  # steps of one client computing at once (more wait their turn)
    max_steps_per_second: float = 50.0  # step starts per second of one client
    compute_threads: int = 32  # threads that run steps' compute
    max_message_mb: int = 256  # largest gRPC message
    batching: Literal["auto", "on", "off"] = "auto"  # many edges' split/carried steps as one batch; auto: on a GPU
    batch_window: float = 0.005  # seconds a batch waits for more steps (and for its gradients) when the cloud is idle
    batch_max_tokens: int = 65536  # padded tokens of one batch
    capture_dir: str | None = None  # audits only: record every message the cloud receives and sends in this folder


class Cloud:
    """A running backbone service (embedded in a process: the demo, the tests, `tandem cloud serve`). With
    `cfg.quantize`, a `model` passed in is quantized in place too; `memory` is cloud/quantize.py's MemoryReport."""

    def __init__(self, cfg: ServeConfig, *, model=None, tokens: dict[str, str] | None = None):
        from privacy.security.tokens import load_tokens
        check_mode(cfg.quantize)
        if tokens is None and cfg.tokens:
            tokens = load_tokens(cfg.tokens)
        if tokens is None and not (cfg.tls_dir and cfg.require_client_cert):
            raise ValueError("the cloud needs client credentials: --tokens FILE (see `tandem tokens`) or "
                             "--tls-dir with --require-client-cert")
        if model is None:
            model = load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device, with_tokenizer=False).model
        limits = CloudConfig(**{f.name: getattr(cfg, f.name) for f in fields(CloudConfig) if hasattr(cfg, f.name)},
                             ttl_seconds=cfg.ttl)
        self.service = BackboneService(model, tokens, limits,
                                       allow_cert_identity=bool(cfg.tls_dir and cfg.require_client_cert))
        # after the service has taken the fingerprint (the embedding: untouched) and the step cost of the model as
        # loaded, before it serves
        self.memory = quantize_blocks(self.service.model, cfg.quantize)
        self.service.description += f"; {self.memory.line()}"
        creds = None
        if cfg.tls_dir:
            from privacy.security.certs import load_server_credentials
            creds = load_server_credentials(cfg.tls_dir, cfg.require_client_cert)
        self.server, self.port = make_server(self.service, f"{cfg.host}:{cfg.port}", credentials=creds,
                                             max_message_mb=cfg.max_message_mb)
        self.address = f"{cfg.host}:{self.port}"
        self.server.start()
        log.info("cloud backbone %s serving on %s (%s): %s", cfg.model, self.address, "TLS" if creds else "plaintext",
                 self.memory.line())

    def stop(self, grace: float = 5.0):
        """Graceful: report NOT_SERVING, refuse new RPCs, let running steps finish for `grace` seconds."""
        self.server.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.service.stop()


def serve(cfg: ServeConfig) -> None:
    cloud = Cloud(cfg)
    print(f"tandem cloud: serving {cfg.model} on {cloud.address}; {cloud.memory.line()}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("tandem cloud: shutting down", flush=True)
    cloud.stop()
