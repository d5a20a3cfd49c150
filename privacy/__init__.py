"""Privacy and security for Tandem: what protects the edge's data on the wire and at rest, and what measures the leak.

    certs.py   a small CA, server and client certificates, and gRPC TLS / mutual-TLS credentials from them
    tokens.py  bearer tokens for the gRPC service (one per edge client), checked in constant time
    seal.py    sign (Ed25519) and encrypt (X25519 + HKDF-SHA256 + AES-256-GCM) blobs such as bundles and adapters
    noise.py   a heuristic defence: clip and noise the activations before they leave the edge
    audit.py   an inversion attack: how many tokens an honest-but-curious cloud recovers from those activations
"""
