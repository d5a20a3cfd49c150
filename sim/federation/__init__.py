"""The federated simulation (`tandem federate`): Flower's simulation engine running the ServerApp and ClientApps
through one shared cloud backbone; apart from the cost model in the rest of `sim/`.

    driver.py    partitions, the simulation run
    failures.py  why a simulation failed (one line: cause and fix), and leaving one that will not stop
    report.py    per-round and per-device tables, the strategies' comparison, the plot
    cli.py       `tandem federate`
"""
