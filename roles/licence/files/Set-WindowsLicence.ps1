<#
.SYNOPSIS
    Reports the Windows licence (status, days left) and activates a product key when given.

.DESCRIPTION
    Reads the Windows SoftwareLicensingProduct that holds a key. When WINDOWS_PRODUCT_KEY is
    set and the installed key does not end with the same five characters, the key is
    installed through the SoftwareLicensingService CIM class (never a command line) and
    activation is attempted. An evaluation edition must first be converted to a retail or
    volume edition (DISM /Set-Edition) before a non-evaluation key is accepted.

    Secret: WINDOWS_PRODUCT_KEY (environment), optional.

.OUTPUTS
    Sets $Ansible.Changed when run by ansible.windows.win_powershell; otherwise writes an
    object with `changed`, `status`, `days_left`, `edition` and `evaluation`.
#>
[CmdletBinding()]
param()
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'

$windowsApplicationId = '55c92734-d682-4d71-983e-d6ec3f16059f'
$statusNames = @{ 0 = 'unlicensed'; 1 = 'licensed'; 2 = 'out-of-box grace'; 3 = 'out-of-tolerance grace'; 4 = 'non-genuine grace'; 5 = 'notification'; 6 = 'extended grace' }

function Get-WindowsLicence {
    Get-CimInstance SoftwareLicensingProduct -Filter "ApplicationID='$windowsApplicationId' AND PartialProductKey IS NOT NULL" |
        Select-Object -First 1
}

$changed = $false
$key = [Environment]::GetEnvironmentVariable('WINDOWS_PRODUCT_KEY')
$product = Get-WindowsLicence
if ($key) {
    if ($key -notmatch '^[A-Z0-9]{5}(-[A-Z0-9]{5}){4}$') { throw 'the product key must be five groups of five letters or digits separated by hyphens' }
    if (-not $product -or $product.PartialProductKey -ne $key.Substring($key.Length - 5) -or $product.LicenseStatus -ne 1) {
        $service = Get-CimInstance SoftwareLicensingService
        if (-not $product -or $product.PartialProductKey -ne $key.Substring($key.Length - 5)) {
            Invoke-CimMethod -InputObject $service -MethodName InstallProductKey -Arguments @{ ProductKey = $key } | Out-Null
            Invoke-CimMethod -InputObject $service -MethodName RefreshLicenseStatus | Out-Null
        }
        $product = Get-WindowsLicence
        Invoke-CimMethod -InputObject $product -MethodName Activate | Out-Null
        $product = Get-WindowsLicence
        $changed = $true
    }
}

$result = @{ status = 'no key installed'; days_left = 0; edition = ''; evaluation = $false }
if ($product) {
    $result.status = $statusNames[[int]$product.LicenseStatus]
    $result.days_left = [math]::Floor($product.GracePeriodRemaining / 1440)
    $result.edition = $product.Name
    $result.evaluation = $product.Description -match 'TIMEBASED_EVAL'
    if ($product.LicenseStatus -eq 1 -and -not $result.evaluation) { $result.days_left = -1 }
}
$ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
if ($ansibleVar) {
    $ansibleVar.Value.Changed = $changed
    $ansibleVar.Value.Result = $result
} else {
    [pscustomobject](@{ changed = $changed } + $result)
}
