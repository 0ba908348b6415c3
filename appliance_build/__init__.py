"""Build tooling for the replication appliance: render, build, assemble, verify, deploy, bundle."""
