"""The cloud: one frozen backbone serving many edge sessions, in layers (as Petals keeps RPC apart from compute).

    sessions.py     who owns which session, its cut and wire settings, TTL and limits (`CloudError` carries the status)
    stream.py       the cloud's half of a Step stream: ordered receive with timeout, send, byte counts, the LoRA exchange
    compute.py      the cloud segment forward/backward with explicit edge-branch site modules; no RPC
    step_runner.py  one step start to end: decode, forward, answer, backward
    rpc.py          the gRPC servicer (authentication, OpenSession / CloseSession / Step) and the server
    serve.py        `tandem cloud serve`: load the backbone, serve until a signal, drain
    federation/     the Flower ServerApp and its aggregation strategies
"""
