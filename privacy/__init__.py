"""Privacy for Tandem, in three parts kept apart:

    security/   who may talk and who can read the wire: TLS certificates (certs.py), bearer tokens (tokens.py),
                signing and encryption of bundles and adapters (seal.py)
    audit/      what an honest-but-curious cloud can reconstruct from what it receives: inversion attacks on the
                hidden state (inversion.py)
    defences/   what the edge can do about it before anything leaves the device: clipping and noise (noise.py)
"""
