<#
.SYNOPSIS
    Makes sure the pinned Python runtime is installed under -TargetDir; prints python.exe's path.

.DESCRIPTION
    The seed's three ways, as for MySQL: detected (already installed at -TargetDir in the pinned
    version), from a local folder (the package's runtime\ folder or C:\Temp\ASRSetup), or
    downloaded from the pinned URL. Whichever way, the installer is checked against the pinned
    SHA-256 before it runs. Shared by the appliance installer and the Mobility agent installer.
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)][string]$TargetDir,
    [Parameter(Mandatory = $true)][string]$Version,
    [Parameter(Mandatory = $true)][string]$FileName,
    [Parameter(Mandatory = $true)][string]$Url,
    [Parameter(Mandatory = $true)][ValidatePattern('^[0-9a-f]{64}$')][string]$ExpectedHash,
    [string[]]$SearchDirs = @('C:\Temp\ASRSetup')
)

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'
$python = Join-Path $TargetDir 'python.exe'
if ((Test-Path -LiteralPath $python) -and ((& $python -c 'import platform; print(platform.python_version())') -eq $Version)) {
    Write-Verbose "Python $Version detected at $python"
    return $python
}
$installer = $SearchDirs | ForEach-Object { Join-Path $_ $FileName } | Where-Object { Test-Path -LiteralPath $_ } | Select-Object -First 1
if (-not $installer) {
    $installer = Join-Path $env:TEMP $FileName
    Write-Verbose "downloading Python $Version from $Url"
    [Net.ServicePointManager]::SecurityProtocol = [Net.SecurityProtocolType]::Tls12
    Invoke-WebRequest -Uri $Url -OutFile $installer -UseBasicParsing
}
$hash = (Get-FileHash -LiteralPath $installer -Algorithm SHA256).Hash.ToLowerInvariant()
if ($hash -ne $ExpectedHash) { throw "$installer has SHA-256 $hash, expected $ExpectedHash`: it is not the pinned Python $Version" }
$proc = Start-Process -FilePath $installer -Wait -PassThru -ArgumentList @(
    '/quiet', 'InstallAllUsers=1', "TargetDir=`"$TargetDir`"", 'PrependPath=0', 'Include_launcher=0', 'Include_test=0', 'Shortcuts=0')
if ($proc.ExitCode -ne 0) { throw "the Python installer $installer exited with $($proc.ExitCode)" }
return $python
