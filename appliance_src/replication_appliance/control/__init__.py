"""The configuration server: control channel on 443 (agents, process servers, operators)."""
