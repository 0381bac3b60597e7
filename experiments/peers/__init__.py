"""Peer runners: standalone scripts run inside vLLM's and transformers' own interpreters."""
