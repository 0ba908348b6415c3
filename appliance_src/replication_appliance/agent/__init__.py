"""The Mobility agent: registers with the configuration server, then replicates its disks to
the process server (initial replication, delta cycles with consistency markers, resync)."""
