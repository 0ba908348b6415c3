"""Deploy failures, one type per kind; each message says what failed and what to do."""
from __future__ import annotations

from ..errors import BuildError


class DeployError(BuildError):
    """Base of every deploy failure."""


class DeployOptionsError(DeployError):
    """A deploy flag or inventory deploy setting has a value that is not allowed."""


class VcenterConnectionError(DeployError):
    """vCenter cannot be reached, its certificate is not trusted, or the login failed."""


class PlacementError(DeployError):
    """A datacenter, cluster, host, pool, datastore, folder or network was not found."""


class ImportSpecError(DeployError):
    """vCenter refused the OVF descriptor (CreateImportSpec errors, or warnings with --strict)."""


class DuplicateVmError(DeployError):
    """A VM of the requested name already exists and --replace was not given."""


class LeaseError(DeployError):
    """The import lease did not become ready, went to error, or could not be completed."""


class UploadError(DeployError):
    """A disk upload failed (host unreachable, connection lost, server refused, checksum)."""


class GuestIpTimeout(DeployError):
    """The VM was deployed and powered on but reported no IP address in time."""
