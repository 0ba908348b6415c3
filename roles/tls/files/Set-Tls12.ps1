<#
.SYNOPSIS
    Enables TLS 1.2 (SCHANNEL client and server) and .NET strong cryptography.

.DESCRIPTION
    Sets, only where they differ:
      SCHANNEL\Protocols\TLS 1.2\{Client,Server}: Enabled=1, DisabledByDefault=0
      .NET Framework v4.0.30319 and v2.0.50727, 64-bit and 32-bit (Wow6432Node) keys:
        SchUseStrongCrypto=1, SystemDefaultTlsVersions=1
    and, with -DisableLegacyProtocols, SSL 2.0, SSL 3.0, TLS 1.0 and TLS 1.1 off
    (Enabled=0, DisabledByDefault=1). A restart makes SCHANNEL changes effective.

.PARAMETER DisableLegacyProtocols
    Turn the protocols older than TLS 1.2 off (default: true).

.OUTPUTS
    Sets $Ansible.Changed when run by ansible.windows.win_powershell; otherwise writes an
    object with `changed` and `values` (the registry values it set) to the pipeline.
#>
[CmdletBinding()]
param(
    [bool]$DisableLegacyProtocols = $true
)
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'

$schannel = 'HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols'
$wanted = New-Object System.Collections.ArrayList
foreach ($side in 'Client', 'Server') {
    [void]$wanted.Add(@{ Path = "$schannel\TLS 1.2\$side"; Name = 'Enabled'; Value = 1 })
    [void]$wanted.Add(@{ Path = "$schannel\TLS 1.2\$side"; Name = 'DisabledByDefault'; Value = 0 })
    if ($DisableLegacyProtocols) {
        foreach ($protocol in 'SSL 2.0', 'SSL 3.0', 'TLS 1.0', 'TLS 1.1') {
            [void]$wanted.Add(@{ Path = "$schannel\$protocol\$side"; Name = 'Enabled'; Value = 0 })
            [void]$wanted.Add(@{ Path = "$schannel\$protocol\$side"; Name = 'DisabledByDefault'; Value = 1 })
        }
    }
}
foreach ($root in 'HKLM:\SOFTWARE\Microsoft\.NETFramework', 'HKLM:\SOFTWARE\Wow6432Node\Microsoft\.NETFramework') {
    foreach ($version in 'v4.0.30319', 'v2.0.50727') {
        [void]$wanted.Add(@{ Path = "$root\$version"; Name = 'SchUseStrongCrypto'; Value = 1 })
        [void]$wanted.Add(@{ Path = "$root\$version"; Name = 'SystemDefaultTlsVersions'; Value = 1 })
    }
}

$set = @()
foreach ($item in $wanted) {
    if (-not (Test-Path $item.Path)) { New-Item -Path $item.Path -Force | Out-Null }
    $current = (Get-ItemProperty -Path $item.Path -Name $item.Name -ErrorAction SilentlyContinue)
    if ($null -eq $current -or $current.($item.Name) -ne $item.Value) {
        New-ItemProperty -Path $item.Path -Name $item.Name -Value $item.Value -PropertyType DWord -Force | Out-Null
        $set += "$($item.Path)\$($item.Name)=$($item.Value)"
    }
}

$ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
if ($ansibleVar) {
    $ansibleVar.Value.Changed = ($set.Count -gt 0)
    $ansibleVar.Value.Result = @{ values = $set }
} else {
    [pscustomobject]@{ changed = ($set.Count -gt 0); values = $set }
}
