"""Generated from protocol/tandem.proto by protocol/generate.py. Do not edit."""
