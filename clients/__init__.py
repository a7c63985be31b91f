"""Clients for MALoRA Serve: the `malora` command line, the SDK and the load generator."""
