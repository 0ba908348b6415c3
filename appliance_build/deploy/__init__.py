"""Deploy the appliance OVA into vCenter with pyvmomi (`invoke deploy`).

options     flags + inventory -> validated DeployOptions (pure)
ovfenv      OVF property values and the OVF environment document (pure)
connection  vCenter address, credentials, TLS, login
placement   datacenter, cluster/host, pool, datastore, folder, network by name
lease       HttpNfcLease: wait ready, stream the disks, progress, manifest, abort
deployer    the whole deploy, in order, leaving nothing behind on failure
"""
