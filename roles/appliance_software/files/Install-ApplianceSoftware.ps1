<#
.SYNOPSIS
    Installs or upgrades the replication appliance software and runs it as a Windows service.

.DESCRIPTION
    1. Checks first, changing nothing when a check fails: no IIS "Default Web Site", and no
       other program listening on ControlPort or DataPort.
    2. Python PythonVersion in PythonDir (installed quietly from PythonInstaller when missing).
    3. A virtual environment in InstallDir\venv with replication-appliance==ApplianceVersion
       from WheelDir only (--no-index: no network). An installed newer version is refused
       unless AllowDowngrade; an older one is upgraded in place (service stopped first).
    4. DataDir is made readable by SYSTEM (the service) and Administrators only, nothing
       inherited: it holds the master key and the CA's private key (on every run, so an
       install made by an older version is tightened too).
       First install (DataDir has no config.json): `appliance init --data-dir DataDir
       --db DatabaseUrl --hostname Hostname --control-port ControlPort --data-port DataPort
       --cloud Cloud` (CA, certificates, master key, passphrase, database schema). After an
       upgrade: `appliance db upgrade --data-dir DataDir` (the migrations the new version
       brings); data, configuration and certificates in DataDir are kept.
    5. The service ServiceName (WinSW wrapper in InstallDir\service) running
       `appliance serve --data-dir DataDir --bind Bind --control-port ControlPort --data-port DataPort`:
       the configuration server and the process server, automatic start at boot, restart on
       failure (10 s, 10 s, 60 s; counter reset after a day), after DependsOn (MySQL).
    6. InstallDir\install.json records version, ports, paths and the settings
       Initialize-ApplianceIdentity.ps1 needs.

    With -DeferInitialisation (an image build), step 4 is left to the deployed machine's first
    boot: the service is registered with manual start and not started, and install.json says
    initialise_at_first_boot, so every appliance made from the image gets its own CA,
    certificates (with its deploy-time name and address), master key and passphrase.

    Secrets, from the environment only, passed on to `appliance init` the same way (never on
    a command line):
      APPLIANCE_DB_PASSWORD     the database password; when unset it is read from
                                SecretsDir\appliance-db-password (written by Install-MySql.ps1)
      APPLIANCE_ADMIN_PASSWORD  the operator password `appliance init` sets (at least 12
                                characters); needed on the first install only

.PARAMETER ApplianceVersion
    Version of the replication-appliance wheel to install (e.g. 1.0.0).
.PARAMETER WheelDir
    Folder with the appliance wheel and every dependency wheel for Windows x64.
.PARAMETER PythonVersion
    Python version to use (e.g. 3.11.9).
.PARAMETER PythonDir
    Where Python is (or is installed to), e.g. C:\Program Files\Python311.
.PARAMETER PythonInstaller
    python-<version>-amd64.exe used when PythonDir has no python.exe of PythonVersion.
.PARAMETER ServiceWrapper
    WinSW-x64.exe (WinSW 2.x) that hosts the service.
.PARAMETER InstallDir
    Program folder (default C:\Program Files\ReplicationAppliance).
.PARAMETER DataDir
    Appliance data folder, on the cache disk (default P:\ReplicationAppliance).
.PARAMETER ServiceName
    Windows service name (default ReplicationAppliance).
.PARAMETER Bind
    Address the servers listen on (default 0.0.0.0).
.PARAMETER ControlPort
    Configuration server port (default 443).
.PARAMETER DataPort
    Process server data port (default 9443).
.PARAMETER Hostname
    Name put in the server certificates (default: the computer name).
.PARAMETER DatabaseUrl
    SQLAlchemy URL without password (default mysql+pymysql://appliance@127.0.0.1:3306/appliance).
.PARAMETER DependsOn
    Service started before the appliance (default MySQL); empty for none.
.PARAMETER Cloud
    Azure cloud the appliance replicates to: public or government (default public).
.PARAMETER SecretsDir
    Folder of the stored database password (default C:\ProgramData\ReplicationAppliance\secrets).
.PARAMETER AllowDowngrade
    Install ApplianceVersion even when a newer version is installed.
.PARAMETER DeferInitialisation
    Leave `appliance init` to the first boot of the deployed machine (image builds).

.OUTPUTS
    Sets $Ansible.Changed when run by ansible.windows.win_powershell; otherwise writes an
    object with `changed`, `version`, `previous_version` and `action`
    (unchanged|installed|upgraded|downgraded|reconfigured).
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)][ValidatePattern('^\d+\.\d+\.\d+')][string]$ApplianceVersion,
    [Parameter(Mandatory = $true)][string]$WheelDir,
    [ValidatePattern('^3\.\d+\.\d+$')][string]$PythonVersion = '3.11.9',
    [string]$PythonDir = 'C:\Program Files\Python311',
    [string]$PythonInstaller = '',
    [Parameter(Mandatory = $true)][string]$ServiceWrapper,
    [string]$InstallDir = 'C:\Program Files\ReplicationAppliance',
    [string]$DataDir = 'P:\ReplicationAppliance',
    [ValidatePattern('^[A-Za-z0-9_.-]{1,80}$')][string]$ServiceName = 'ReplicationAppliance',
    [string]$Bind = '0.0.0.0',
    [ValidateRange(1, 65535)][int]$ControlPort = 443,
    [ValidateRange(1, 65535)][int]$DataPort = 9443,
    [string]$Hostname = '',
    [string]$DatabaseUrl = 'mysql+pymysql://appliance@127.0.0.1:3306/appliance',
    [string]$DependsOn = 'MySQL',
    [ValidateSet('public', 'government')][string]$Cloud = 'public',
    [string]$SecretsDir = 'C:\ProgramData\ReplicationAppliance\secrets',
    [bool]$AllowDowngrade = $false,
    [bool]$DeferInitialisation = $false
)
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
if ($ControlPort -eq $DataPort) { throw "the data port must differ from the control port (both are $ControlPort)" }
if ($DatabaseUrl -match '://[^/@]*:[^/@]*@') { throw 'DatabaseUrl must not carry a password: give it in APPLIANCE_DB_PASSWORD' }
if ($Hostname -eq '') { $Hostname = $env:COMPUTERNAME }

$venv = Join-Path $InstallDir 'venv'
$venvPython = Join-Path $venv 'Scripts\python.exe'
$applianceExe = Join-Path $venv 'Scripts\appliance.exe'
$serviceDir = Join-Path $InstallDir 'service'
$serviceExe = Join-Path $serviceDir "$ServiceName.exe"
$serviceXml = Join-Path $serviceDir "$ServiceName.xml"
$changes = @()

# Windows PowerShell turns a native command's stderr into a terminating error under 'Stop';
# the exit code is what tells success here.
function Invoke-Checked([string]$FilePath, [string[]]$Arguments, [string]$What) {
    $ErrorActionPreference = 'Continue'
    & $FilePath @Arguments 2>&1 | Out-Null
    if ($LASTEXITCODE -ne 0) { throw "$What failed (exit code $LASTEXITCODE)" }
}

# SYSTEM and Administrators only, nothing inherited; by SID, which a localised Windows
# resolves too.
function Protect-Folder([string]$Path) {
    & icacls.exe $Path /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' | Out-Null
    if ($LASTEXITCODE -ne 0) { throw "could not restrict access to $Path" }
}

# 1. Checks before any change.
if (Get-Service -Name W3SVC -ErrorAction SilentlyContinue) {
    Import-Module WebAdministration -ErrorAction SilentlyContinue
    if ((Get-Command Get-Website -ErrorAction SilentlyContinue) -and (Get-Website -Name 'Default Web Site' -ErrorAction SilentlyContinue)) {
        throw "the IIS 'Default Web Site' exists: the appliance needs ports $ControlPort and $DataPort for itself; remove it (or the IIS role) first"
    }
}
# The appliance's own listener is a descendant of its service wrapper (WinSW -> appliance.exe
# -> python.exe), so a re-run or an upgrade does not trip over it.
function Test-OwnedByService([int]$ProcessId) {
    $service = Get-CimInstance Win32_Service -Filter "Name='$ServiceName'" -ErrorAction SilentlyContinue
    if (-not $service -or $service.ProcessId -eq 0) { return $false }
    for ($depth = 0; $depth -lt 4 -and $ProcessId -gt 0; $depth++) {
        if ($ProcessId -eq $service.ProcessId) { return $true }
        $process = Get-CimInstance Win32_Process -Filter "ProcessId=$ProcessId" -ErrorAction SilentlyContinue
        if (-not $process) { return $false }
        $ProcessId = [int]$process.ParentProcessId
    }
    return $false
}
foreach ($port in $ControlPort, $DataPort) {
    foreach ($listener in @(Get-NetTCPConnection -State Listen -LocalPort $port -ErrorAction SilentlyContinue)) {
        if (-not (Test-OwnedByService $listener.OwningProcess)) {
            $process = Get-Process -Id $listener.OwningProcess -ErrorAction SilentlyContinue
            $owner = if ($process) { "$($process.ProcessName) (pid $($process.Id))" } else { "pid $($listener.OwningProcess)" }
            throw "port $port is already used by $owner; the appliance needs it"
        }
    }
}

# 2. Python.
$python = Join-Path $PythonDir 'python.exe'
$havePython = (Test-Path $python) -and (((& $python --version) -join '') -match [regex]::Escape("Python $PythonVersion"))
if (-not $havePython) {
    if (-not (Test-Path $PythonInstaller)) { throw "Python $PythonVersion is not in $PythonDir and the installer '$PythonInstaller' does not exist" }
    $process = Start-Process -FilePath $PythonInstaller -Wait -PassThru -ArgumentList '/quiet', 'InstallAllUsers=1', 'PrependPath=0',
        'Include_test=0', 'Include_launcher=0', 'Shortcuts=0', "TargetDir=`"$PythonDir`""
    if ($process.ExitCode -ne 0) { throw "Python installer $PythonInstaller failed with exit code $($process.ExitCode)" }
    $changes += "python $PythonVersion"
}

# 3. Virtual environment and the wheel.
if (-not (Test-Path $venvPython)) {
    Invoke-Checked $python @('-m', 'venv', $venv) "creating the virtual environment $venv"
    $changes += 'venv'
}
function Get-InstalledVersion {
    $ErrorActionPreference = 'Continue'
    $shown = & $venvPython -m pip show replication-appliance 2>$null
    if ($LASTEXITCODE -ne 0) { return '' }
    return (($shown | Where-Object { $_ -like 'Version:*' }) -replace 'Version:\s*', '').Trim()
}
$previous = Get-InstalledVersion
$action = 'unchanged'
if ($previous -ne $ApplianceVersion) {
    if ($previous -ne '' -and ([version]($previous -replace '[^\d.].*$', '')) -gt ([version]($ApplianceVersion -replace '[^\d.].*$', '')) -and -not $AllowDowngrade) {
        throw "replication-appliance $previous is installed, newer than $ApplianceVersion: refusing to downgrade (set AllowDowngrade to force)"
    }
    if (Get-Service -Name $ServiceName -ErrorAction SilentlyContinue) { Stop-Service -Name $ServiceName }
    Invoke-Checked $venvPython @('-m', 'pip', 'install', '--no-index', '--find-links', $WheelDir, '--upgrade', "replication-appliance==$ApplianceVersion") `
        "installing replication-appliance $ApplianceVersion from $WheelDir"
    $action = if ($previous -eq '') { 'installed' } elseif ([version]($previous -replace '[^\d.].*$', '') -gt [version]($ApplianceVersion -replace '[^\d.].*$', '')) { 'downgraded' } else { 'upgraded' }
    $changes += "replication-appliance $ApplianceVersion"
}

# 4. Initialise the data folder and database (first install) or migrate them (upgrade).
New-Item -ItemType Directory -Force -Path $DataDir | Out-Null
Protect-Folder $DataDir  # before anything is written into it
$deferred = $DeferInitialisation -and -not (Test-Path (Join-Path $DataDir 'config.json'))
if ($deferred) {
    # left to the deployed machine's first boot (Initialize-ApplianceIdentity.ps1)
} elseif (-not (Test-Path (Join-Path $DataDir 'config.json'))) {
    $password = [Environment]::GetEnvironmentVariable('APPLIANCE_DB_PASSWORD')
    $passwordFile = Join-Path $SecretsDir 'appliance-db-password'
    if (-not $password -and (Test-Path $passwordFile)) { $password = (Get-Content -Raw -Path $passwordFile).Trim() }
    if (-not $password -and $DatabaseUrl -like 'mysql*') { throw "no database password: set APPLIANCE_DB_PASSWORD or run Install-MySql.ps1 first (it writes $passwordFile)" }
    if (-not [Environment]::GetEnvironmentVariable('APPLIANCE_ADMIN_PASSWORD')) {
        throw 'no operator password for the first install: set APPLIANCE_ADMIN_PASSWORD (at least 12 characters)'
    }
    $env:APPLIANCE_DB_PASSWORD = $password
    try {
        Invoke-Checked $applianceExe @('init', '--data-dir', $DataDir, '--db', $DatabaseUrl, '--hostname', $Hostname,
            '--control-port', $ControlPort, '--data-port', $DataPort, '--cloud', $Cloud) "appliance init in $DataDir"
    } finally {
        Remove-Item Env:\APPLIANCE_DB_PASSWORD -ErrorAction SilentlyContinue
    }
    $changes += 'init'
} elseif ($action -ne 'unchanged') {
    Invoke-Checked $applianceExe @('db', 'upgrade', '--data-dir', $DataDir) "appliance db upgrade in $DataDir"
    $changes += 'database migrated'
}

# 5. The Windows service.
$escape = { param([string]$Text) [Security.SecurityElement]::Escape($Text) }
$arguments = "serve --data-dir `"$DataDir`" --bind $Bind --control-port $ControlPort --data-port $DataPort"
$startMode = if ($deferred) { 'Manual' } else { 'Automatic' }
$depend = if ($DependsOn -ne '') { "  <depend>$(& $escape $DependsOn)</depend>`r`n" } else { '' }
$xml = @"
<service>
  <id>$(& $escape $ServiceName)</id>
  <name>Replication appliance</name>
  <description>Configuration server (HTTPS $ControlPort) and process server (HTTPS $DataPort) of the replication appliance $(& $escape $ApplianceVersion).</description>
  <executable>$(& $escape $applianceExe)</executable>
  <arguments>$(& $escape $arguments)</arguments>
  <workingdirectory>$(& $escape $DataDir)</workingdirectory>
  <startmode>$startMode</startmode>
$depend  <onfailure action="restart" delay="10 sec"/>
  <onfailure action="restart" delay="10 sec"/>
  <onfailure action="restart" delay="60 sec"/>
  <resetfailure>1 day</resetfailure>
  <stoptimeout>30 sec</stoptimeout>
  <logpath>$(& $escape (Join-Path $DataDir 'logs'))</logpath>
  <log mode="roll-by-size">
    <sizeThreshold>10240</sizeThreshold>
    <keepFiles>8</keepFiles>
  </log>
</service>
"@
New-Item -ItemType Directory -Force -Path $serviceDir | Out-Null
$xmlChanged = -not (Test-Path $serviceXml) -or ((Get-Content -Raw -Path $serviceXml) -ne $xml)
$exeChanged = -not (Test-Path $serviceExe) -or ((Get-FileHash $serviceExe).Hash -ne (Get-FileHash $ServiceWrapper).Hash)
$service = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
if ($service -and ($xmlChanged -or $exeChanged) -and $service.Status -ne 'Stopped') { Stop-Service -Name $ServiceName }
if ($exeChanged) { Copy-Item -Force -Path $ServiceWrapper -Destination $serviceExe; $changes += 'service wrapper' }
if ($xmlChanged) { Set-Content -Path $serviceXml -Value $xml -Encoding UTF8 -NoNewline; $changes += 'service configuration' }
if (-not $service) {
    Invoke-Checked $serviceExe @('install') "registering the service $ServiceName"
    $changes += 'service registered'
}
if ($xmlChanged -or -not $service) {
    # Restart on failure also when the wrapper itself dies: 10 s, 10 s, 60 s, reset after a day.
    Invoke-Checked 'sc.exe' @('failure', $ServiceName, 'reset=', '86400', 'actions=', 'restart/10000/restart/10000/restart/60000') "setting restart-on-failure for $ServiceName"
    Invoke-Checked 'sc.exe' @('failureflag', $ServiceName, '1') "setting restart-on-failure for $ServiceName"
    # WinSW applies <startmode> when it registers the service only.
    Set-Service -Name $ServiceName -StartupType $startMode
}
if (-not $deferred -and (Get-Service -Name $ServiceName).Status -ne 'Running') {
    Start-Service -Name $ServiceName
    if ($changes.Count -eq 0) { $changes += 'service started' }
}

# 6. What is installed, for upgrades and the first-boot data port change.
$record = [ordered]@{
    version = $ApplianceVersion; python = $PythonVersion; data_dir = $DataDir; service = $ServiceName
    service_config = $serviceXml; control_port = $ControlPort; data_port = $DataPort; appliance_exe = $applianceExe
    db_url = $DatabaseUrl; cloud = $Cloud; initialise_at_first_boot = $deferred
} | ConvertTo-Json
$recordFile = Join-Path $InstallDir 'install.json'
if (-not (Test-Path $recordFile) -or (Get-Content -Raw -Path $recordFile) -ne $record) {
    Set-Content -Path $recordFile -Value $record -Encoding UTF8 -NoNewline
}
if ($action -eq 'unchanged' -and $changes.Count -gt 0) { $action = 'reconfigured' }

$result = @{ version = $ApplianceVersion; previous_version = $previous; action = $action; changes = $changes }
$ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
if ($ansibleVar) {
    $ansibleVar.Value.Changed = ($changes.Count -gt 0)
    $ansibleVar.Value.Result = $result
} else {
    [pscustomobject](@{ changed = ($changes.Count -gt 0) } + $result)
}
