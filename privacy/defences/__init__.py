"""Defences the edge applies to what it sends, measured against the attacks in privacy/audit/."""
