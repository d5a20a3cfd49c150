"""Security of the wire and of files at rest: TLS / mTLS certificates, bearer tokens, sealed bundles."""
