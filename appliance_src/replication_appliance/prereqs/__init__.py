"""`appliance prereqs`: the machine it runs on against the seed's requirement rows."""
