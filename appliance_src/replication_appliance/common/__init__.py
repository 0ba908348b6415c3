"""Foundations shared by every appliance component: TLS identity, secrets at rest, data dir."""
