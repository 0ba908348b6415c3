<#
.SYNOPSIS
    Ensures MySQL by one of the seed's three methods, and the appliance's database and user.

.DESCRIPTION
    Methods, tried in this order (the seed's "MySQL installation" table):
      detected  MySQL is already installed (a service running mysqld.exe): it is used as is.
      offline   a MySQL installer is in OfflineDir (C:\Temp\ASRSetup): it is used, no download.
                Accepted files: mysql-<version>-winx64.msi (server MSI),
                mysql-<version>-winx64.zip (archive), mysql-installer-community-<version>*.msi
                (MySQL Installer, as the seed names it). The wanted version is preferred; any
                other version found there is used as the operator placed it.
      download  DownloadUrl is saved into OfflineDir (SHA-256 checked when given), then
                installed as in the offline case.
    A MySQL this script installs listens on 127.0.0.1:Port only, runs as the Windows service
    ServiceName and gets a generated root password. Then the database DatabaseName and the
    user DatabaseUser (at localhost and 127.0.0.1, all privileges on that database only)
    are created with a generated password. A second run changes nothing.

    Secrets never appear on a command line or in the output:
      MYSQL_ROOT_PASSWORD   (environment) root password of a MySQL installed beforehand;
                            otherwise read from, or generated into, SecretsDir\mysql-root-password
      APPLIANCE_DB_PASSWORD (environment) password for DatabaseUser; otherwise read from, or
                            generated into, SecretsDir\appliance-db-password
    SecretsDir is readable by SYSTEM and Administrators only. SQL goes to mysql.exe on
    standard input, the password in MYSQL_PWD of the child process.

.PARAMETER Version
    MySQL version to install when none is found (e.g. 8.0.40; the seed names 5.7.20).
.PARAMETER OfflineDir
    Folder searched for an installer, and where a download is saved (C:\Temp\ASRSetup).
.PARAMETER DownloadUrl
    Installer URL used when nothing is installed and OfflineDir has no installer.
.PARAMETER DownloadSha256
    Expected SHA-256 (hex) of the download; empty skips the check.
.PARAMETER VcRedistUrl
    Visual C++ runtime installer (MySQL 8 needs it); OfflineDir\vc_redist.x64.exe is used first.
.PARAMETER ServiceName
    Windows service name of a MySQL this script installs (default MySQL).
.PARAMETER Port
    TCP port of MySQL (default 3306).
.PARAMETER DataDir
    Data folder of a MySQL this script installs; my.ini is written beside it.
.PARAMETER DatabaseName
    The appliance's database (default appliance).
.PARAMETER DatabaseUser
    The appliance's database user (default appliance).
.PARAMETER SecretsDir
    Folder for the generated passwords (default C:\ProgramData\ReplicationAppliance\secrets).

.OUTPUTS
    Sets $Ansible.Changed when run by ansible.windows.win_powershell; otherwise writes an
    object with `changed`, `method` (detected|offline|download), `version`, `installer`.
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)][ValidatePattern('^\d+\.\d+\.\d+$')][string]$Version,
    [string]$OfflineDir = 'C:\Temp\ASRSetup',
    [string]$DownloadUrl = '',
    [string]$DownloadSha256 = '',
    [string]$VcRedistUrl = 'https://aka.ms/vs/17/release/vc_redist.x64.exe',
    [string]$ServiceName = 'MySQL',
    [ValidateRange(1, 65535)][int]$Port = 3306,
    [string]$DataDir = 'C:\ProgramData\MySQL\data',
    [ValidatePattern('^[A-Za-z0-9_]{1,64}$')][string]$DatabaseName = 'appliance',
    [ValidatePattern('^[A-Za-z0-9_]{1,32}$')][string]$DatabaseUser = 'appliance',
    [string]$SecretsDir = 'C:\ProgramData\ReplicationAppliance\secrets'
)
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
$changed = $false

function New-Password {
    $alphabet = 'ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789'
    $bytes = New-Object byte[] 32
    [Security.Cryptography.RandomNumberGenerator]::Create().GetBytes($bytes)
    return -join ($bytes | ForEach-Object { $alphabet[$_ % $alphabet.Length] })
}

function Initialize-SecretsDir {
    if (-not (Test-Path $SecretsDir)) {
        New-Item -ItemType Directory -Force -Path $SecretsDir | Out-Null
        # SYSTEM and Administrators only, nothing inherited.
        & icacls.exe $SecretsDir /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' | Out-Null
        if ($LASTEXITCODE -ne 0) { throw "could not restrict access to $SecretsDir" }
    }
}

# Returns the secret from the environment variable, else the stored one, else a new one
# (stored). Never printed.
function Get-Secret([string]$EnvName, [string]$FileName) {
    $fromEnv = [Environment]::GetEnvironmentVariable($EnvName)
    if ($fromEnv) { return $fromEnv }
    Initialize-SecretsDir
    $file = Join-Path $SecretsDir $FileName
    if (Test-Path $file) { return (Get-Content -Raw -Path $file).Trim() }
    $secret = New-Password
    Set-Content -Path $file -Value $secret -NoNewline -Encoding ASCII
    return $secret
}

function ConvertTo-SqlString([string]$Value) {
    return "'" + $Value.Replace('\', '\\').Replace("'", "''") + "'"
}

function Find-MySqlService {
    return Get-CimInstance Win32_Service | Where-Object { $_.PathName -match 'mysqld(\.exe)?' } | Select-Object -First 1
}

function Find-MySqlBin {
    $service = Find-MySqlService
    if ($service -and $service.PathName -match '^"?([^"]*mysqld(\.exe)?)') { return Split-Path $Matches[1] }
    $found = Get-ChildItem -Path "$env:ProgramFiles\MySQL\MySQL Server *\bin\mysqld.exe" -ErrorAction SilentlyContinue |
        Sort-Object FullName -Descending | Select-Object -First 1
    if ($found) { return $found.DirectoryName }
    return $null
}

# Native commands run with 'Continue': under 'Stop' Windows PowerShell turns their stderr
# into a terminating error; the exit code is what tells success.
function Invoke-Native([string]$FilePath, [string[]]$Arguments) {
    $ErrorActionPreference = 'Continue'
    & $FilePath @Arguments 2>&1 | Out-Null
    return $LASTEXITCODE
}

function Invoke-MySql([string]$Bin, [string]$User, [string]$Password, [string]$Sql) {
    $ErrorActionPreference = 'Continue'
    $env:MYSQL_PWD = $Password
    try {
        $arguments = @('--protocol=TCP', '--host=127.0.0.1', "--port=$Port", "--user=$User", '--batch', '--skip-column-names')
        $output = $Sql | & (Join-Path $Bin 'mysql.exe') @arguments 2>&1
        return @{ ok = ($LASTEXITCODE -eq 0); output = ($output | Out-String) }
    } finally {
        Remove-Item Env:\MYSQL_PWD -ErrorAction SilentlyContinue
    }
}

function Save-Download([string]$Url, [string]$Sha256, [string]$Destination) {
    New-Item -ItemType Directory -Force -Path (Split-Path $Destination) | Out-Null
    [Net.ServicePointManager]::SecurityProtocol = [Net.SecurityProtocolType]::Tls12
    $partial = "$Destination.partial"
    Invoke-WebRequest -Uri $Url -OutFile $partial -UseBasicParsing
    if ($Sha256 -ne '') {
        $actual = (Get-FileHash -Algorithm SHA256 -Path $partial).Hash
        if ($actual -ne $Sha256.ToUpperInvariant()) {
            Remove-Item $partial -Force
            throw "the download from $Url has SHA-256 $actual, expected $Sha256"
        }
    }
    Move-Item -Force $partial $Destination
}

function Find-OfflineInstaller {
    $patterns = @("mysql-$Version-winx64.msi", "mysql-$Version-winx64.zip", "mysql-installer-community-$Version*.msi",
        'mysql-*-winx64.msi', 'mysql-*-winx64.zip', 'mysql-installer-community-*.msi')
    foreach ($pattern in $patterns) {
        $file = Get-ChildItem -Path (Join-Path $OfflineDir $pattern) -ErrorAction SilentlyContinue | Sort-Object Name -Descending | Select-Object -First 1
        if ($file) { return $file.FullName }
    }
    return $null
}

function Get-InstallerVersion([string]$Path) {
    if ((Split-Path -Leaf $Path) -match '(\d+\.\d+\.\d+)') { return $Matches[1] }
    return $Version
}

function Install-VcRuntime {
    $runtime = Get-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\VisualStudio\14.0\VC\Runtimes\x64' -Name Installed -ErrorAction SilentlyContinue
    if ($runtime -and $runtime.Installed -eq 1) { return }
    $installer = Join-Path $OfflineDir 'vc_redist.x64.exe'
    if (-not (Test-Path $installer)) { Save-Download $VcRedistUrl '' $installer }
    $process = Start-Process -FilePath $installer -ArgumentList '/install', '/quiet', '/norestart' -Wait -PassThru
    if ($process.ExitCode -notin 0, 1638, 3010) { throw "Visual C++ runtime installer failed with exit code $($process.ExitCode)" }
}

function Install-MySqlBinaries([string]$Installer, [string]$InstallVersion) {
    $series = ($InstallVersion.Split('.')[0..1] -join '.')
    $installDir = "$env:ProgramFiles\MySQL\MySQL Server $series"
    if ([int]$InstallVersion.Split('.')[0] -ge 8) { Install-VcRuntime }
    $leaf = Split-Path -Leaf $Installer
    if ($leaf -like 'mysql-installer-community-*.msi') {
        $process = Start-Process msiexec.exe -ArgumentList '/i', "`"$Installer`"", '/qn', '/norestart' -Wait -PassThru
        if ($process.ExitCode -notin 0, 3010) { throw "MySQL Installer $Installer failed with exit code $($process.ExitCode)" }
        $console = "${env:ProgramFiles(x86)}\MySQL\MySQL Installer for Windows\MySQLInstallerConsole.exe"
        & $console community install "server;$InstallVersion;x64" -silent | Out-Null
        if ($LASTEXITCODE -ne 0) { throw "MySQLInstallerConsole could not install server $InstallVersion (exit code $LASTEXITCODE)" }
    } elseif ($leaf -like '*.zip') {
        $staging = Join-Path $env:TEMP ("mysql-" + [guid]::NewGuid())
        Expand-Archive -Path $Installer -DestinationPath $staging
        $top = Get-ChildItem -Directory $staging | Select-Object -First 1
        New-Item -ItemType Directory -Force -Path (Split-Path $installDir) | Out-Null
        Move-Item -Path $top.FullName -Destination $installDir
        Remove-Item -Recurse -Force $staging
    } else {
        $process = Start-Process msiexec.exe -ArgumentList '/i', "`"$Installer`"", '/qn', '/norestart', "INSTALLDIR=`"$installDir`"" -Wait -PassThru
        if ($process.ExitCode -notin 0, 3010) { throw "MySQL server MSI $Installer failed with exit code $($process.ExitCode)" }
    }
    $bin = Find-MySqlBin
    if (-not $bin) { throw "MySQL was installed from $Installer but mysqld.exe was not found under $env:ProgramFiles\MySQL" }
    return $bin
}

function Register-MySqlService([string]$Bin, [string]$RootPassword) {
    $iniPath = Join-Path (Split-Path $DataDir) 'my.ini'
    $baseDir = (Split-Path $Bin).Replace('\', '/')
    $ini = @(
        '[mysqld]',
        "basedir=$baseDir",
        "datadir=$($DataDir.Replace('\', '/'))",
        "port=$Port",
        'bind-address=127.0.0.1'
    ) -join "`r`n"
    New-Item -ItemType Directory -Force -Path (Split-Path $DataDir) | Out-Null
    Set-Content -Path $iniPath -Value $ini -Encoding ASCII
    $mysqld = Join-Path $Bin 'mysqld.exe'
    if (-not (Test-Path (Join-Path $DataDir 'mysql'))) {
        $code = Invoke-Native $mysqld @("--defaults-file=$iniPath", '--initialize-insecure')
        if ($code -ne 0) { throw "mysqld --initialize-insecure failed for $DataDir (exit code $code)" }
    }
    $code = Invoke-Native $mysqld @('--install', $ServiceName, "--defaults-file=$iniPath")
    if ($code -ne 0) { throw "mysqld --install $ServiceName failed (exit code $code)" }
    Start-Service -Name $ServiceName
    # --initialize-insecure leaves root without a password: set the generated one.
    $set = Invoke-MySql $Bin 'root' '' ("ALTER USER 'root'@'localhost' IDENTIFIED BY " + (ConvertTo-SqlString $RootPassword) + ';')
    if (-not $set.ok) { throw 'could not set the MySQL root password on the new server' }
}

# 1. Detected, offline or download.
$method = 'detected'
$installer = ''
$installedVersion = $Version
$bin = Find-MySqlBin
if (-not (Find-MySqlService)) {
    $installer = Find-OfflineInstaller
    if ($installer) {
        $method = 'offline'
    } else {
        if ($DownloadUrl -eq '') { throw "MySQL is not installed, $OfflineDir has no installer and no DownloadUrl was given" }
        $method = 'download'
        $installer = Join-Path $OfflineDir ([IO.Path]::GetFileName(([uri]$DownloadUrl).AbsolutePath))
        Save-Download $DownloadUrl $DownloadSha256 $installer
    }
    $installedVersion = Get-InstallerVersion $installer
    if (-not $bin) { $bin = Install-MySqlBinaries $installer $installedVersion }
    $rootPassword = Get-Secret 'MYSQL_ROOT_PASSWORD' 'mysql-root-password'
    Register-MySqlService $bin $rootPassword
    $changed = $true
} else {
    $service = Find-MySqlService
    if ($service.State -ne 'Running') { Start-Service -Name $service.Name; $changed = $true }
    $versionText = (& (Join-Path $bin 'mysqld.exe') --version) -join ' '
    if ($versionText -match '(\d+\.\d+\.\d+)') { $installedVersion = $Matches[1] }
}

# 2. The appliance's database and user.
$appPassword = Get-Secret 'APPLIANCE_DB_PASSWORD' 'appliance-db-password'
$probe = Invoke-MySql $bin $DatabaseUser $appPassword "USE ``$DatabaseName``; SELECT 1;"
if (-not $probe.ok) {
    $rootPassword = [Environment]::GetEnvironmentVariable('MYSQL_ROOT_PASSWORD')
    if (-not $rootPassword) {
        $rootFile = Join-Path $SecretsDir 'mysql-root-password'
        if (-not (Test-Path $rootFile)) {
            throw "MySQL was installed beforehand: set MYSQL_ROOT_PASSWORD in the environment so the '$DatabaseName' database and user can be created"
        }
        $rootPassword = (Get-Content -Raw -Path $rootFile).Trim()
    }
    $quoted = ConvertTo-SqlString $appPassword
    $sql = "CREATE DATABASE IF NOT EXISTS ``$DatabaseName`` CHARACTER SET utf8mb4;"
    foreach ($hostName in 'localhost', '127.0.0.1') {
        $sql += "CREATE USER IF NOT EXISTS '$DatabaseUser'@'$hostName' IDENTIFIED BY $quoted;"
        $sql += "ALTER USER '$DatabaseUser'@'$hostName' IDENTIFIED BY $quoted;"
        $sql += "GRANT ALL PRIVILEGES ON ``$DatabaseName``.* TO '$DatabaseUser'@'$hostName';"
    }
    $created = Invoke-MySql $bin 'root' $rootPassword $sql
    if (-not $created.ok) { throw "could not create the '$DatabaseName' database and user as root (check MYSQL_ROOT_PASSWORD)" }
    $changed = $true
}

$result = @{ method = $method; version = $installedVersion; installer = $installer; bin = $bin }
$ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
if ($ansibleVar) {
    $ansibleVar.Value.Changed = $changed
    $ansibleVar.Value.Result = $result
} else {
    [pscustomobject](@{ changed = $changed } + $result)
}
