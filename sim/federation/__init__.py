"""The federated simulation (`tandem federate`): Flower's simulation engine running the ServerApp and ClientApps
through one shared cloud backbone; apart from the cost model in the rest of `sim/`.

    driver.py  partitions, the simulation run, per-round report, tables and plot
    cli.py     `tandem federate`
"""
