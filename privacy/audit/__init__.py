"""Attack audits: what the cloud side can read back from the tensors it receives."""
