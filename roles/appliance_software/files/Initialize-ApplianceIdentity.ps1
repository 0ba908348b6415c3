<#
.SYNOPSIS
    Gives an appliance made from the image its own identity at first boot, then starts it.

.DESCRIPTION
    Runs at boot (called by Set-NetworkFromOvfEnv.ps1 once the deploy-time network settings and
    hostname are in place). It acts only when the install record says
    initialise_at_first_boot (Install-ApplianceSoftware.ps1 -DeferInitialisation, an image
    build) and the data folder has no config.json yet: it runs
    `appliance init --data-dir <data_dir> --db <db_url> --hostname <computer name>
    --control-port <control_port> --data-port <data_port> --cloud <cloud>`, which creates this
    appliance's CA, certificates (with its current name and addresses), master key,
    passphrase and database schema; then it sets the service to start automatically, starts
    it and clears the flag. Otherwise it changes nothing.

    Secrets, from the environment only:
      APPLIANCE_DB_PASSWORD     database password; else read from SecretsDir\appliance-db-password
      APPLIANCE_ADMIN_PASSWORD  operator password; else the one in
                                SecretsDir\appliance-operator-password, else a new one is
                                generated into that file (readable by SYSTEM and Administrators)

.PARAMETER InstallRecord
    install.json written by Install-ApplianceSoftware.ps1
    (default C:\Program Files\ReplicationAppliance\install.json).
.PARAMETER SecretsDir
    Folder of the stored passwords (default C:\ProgramData\ReplicationAppliance\secrets).

.OUTPUTS
    Sets $Ansible.Changed when run by ansible.windows.win_powershell; otherwise writes an
    object with `changed` and `initialised` (the data folder, or empty).
#>
[CmdletBinding()]
param(
    [string]$InstallRecord = 'C:\Program Files\ReplicationAppliance\install.json',
    [string]$SecretsDir = 'C:\ProgramData\ReplicationAppliance\secrets'
)
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'

function Complete-Run([bool]$Changed, [string]$Initialised) {
    $ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
    if ($ansibleVar) {
        $ansibleVar.Value.Changed = $Changed
        $ansibleVar.Value.Result = @{ initialised = $Initialised }
    } else {
        [pscustomobject]@{ changed = $Changed; initialised = $Initialised }
    }
}

function Read-Secret([string]$EnvName, [string]$FileName, [bool]$Generate) {
    $fromEnv = [Environment]::GetEnvironmentVariable($EnvName)
    if ($fromEnv) { return $fromEnv }
    $file = Join-Path $SecretsDir $FileName
    if (Test-Path $file) { return (Get-Content -Raw -Path $file).Trim() }
    if (-not $Generate) { return '' }
    if (-not (Test-Path $SecretsDir)) { throw "$SecretsDir does not exist: Install-MySql.ps1 creates it, readable by SYSTEM and Administrators only" }
    $alphabet = 'ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789'
    $bytes = New-Object byte[] 24
    [Security.Cryptography.RandomNumberGenerator]::Create().GetBytes($bytes)
    $secret = -join ($bytes | ForEach-Object { $alphabet[$_ % $alphabet.Length] })
    Set-Content -Path $file -Value $secret -NoNewline -Encoding ASCII
    return $secret
}

# Windows PowerShell turns a native command's stderr into a terminating error under 'Stop'.
function Invoke-ApplianceInit([string]$Exe, [string[]]$Arguments) {
    $ErrorActionPreference = 'Continue'
    & $Exe @Arguments 2>&1 | Out-Null
    return $LASTEXITCODE
}

if (-not (Test-Path $InstallRecord)) { Complete-Run $false ''; return }
$record = Get-Content -Raw -Path $InstallRecord | ConvertFrom-Json
$pending = $record.PSObject.Properties['initialise_at_first_boot'] -and $record.initialise_at_first_boot
if (-not $pending) { Complete-Run $false ''; return }

$dataDir = [string]$record.data_dir
if (-not (Test-Path (Join-Path $dataDir 'config.json'))) {
    $dbPassword = Read-Secret 'APPLIANCE_DB_PASSWORD' 'appliance-db-password' $false
    if (-not $dbPassword -and ([string]$record.db_url) -like 'mysql*') {
        throw "no database password: set APPLIANCE_DB_PASSWORD or keep $SecretsDir\appliance-db-password"
    }
    $env:APPLIANCE_DB_PASSWORD = $dbPassword
    $env:APPLIANCE_ADMIN_PASSWORD = Read-Secret 'APPLIANCE_ADMIN_PASSWORD' 'appliance-operator-password' $true
    try {
        $code = Invoke-ApplianceInit ([string]$record.appliance_exe) @('init', '--data-dir', $dataDir, '--db', [string]$record.db_url,
            '--hostname', $env:COMPUTERNAME, '--control-port', [string]$record.control_port, '--data-port', [string]$record.data_port,
            '--cloud', [string]$record.cloud)
    } finally {
        Remove-Item -Path @('Env:\APPLIANCE_DB_PASSWORD', 'Env:\APPLIANCE_ADMIN_PASSWORD') -ErrorAction SilentlyContinue
    }
    if ($code -ne 0) { throw "appliance init in $dataDir failed (exit code $code)" }
}

$serviceXml = [string]$record.service_config
if (Test-Path $serviceXml) {
    $text = Get-Content -Raw -Path $serviceXml
    Set-Content -Path $serviceXml -Value ($text -replace '<startmode>Manual</startmode>', '<startmode>Automatic</startmode>') -Encoding UTF8 -NoNewline
}
Set-Service -Name ([string]$record.service) -StartupType Automatic
Start-Service -Name ([string]$record.service)
$record.initialise_at_first_boot = $false
Set-Content -Path $InstallRecord -Value ($record | ConvertTo-Json) -Encoding UTF8 -NoNewline
Complete-Run $true $dataDir
