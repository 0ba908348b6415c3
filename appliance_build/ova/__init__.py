"""OVF descriptor, OVA reading/writing and verification."""
