<#
.SYNOPSIS
    Prepares the process server cache disk and the retention disk.

.DESCRIPTION
    For each of the two volumes (cache, retention): when a volume with the label already
    exists it is kept as it is (its drive letter is reported). Otherwise the smallest
    uninitialised (RAW) disk of at least the minimum size, other than the boot and system
    disk, is initialised (GPT), given one partition over the whole disk with the drive letter,
    and formatted NTFS with the label. Nothing is changed before every check has passed: no
    suitable disk, or a drive letter held by another volume, is an error that names the cause.

.PARAMETER CacheLabel
    Volume label of the cache volume (default ApplianceCache).
.PARAMETER CacheDriveLetter
    Drive letter of the cache volume (default P).
.PARAMETER CacheMinSizeGB
    Smallest disk accepted for the cache, in GiB (the seed: 600).
.PARAMETER RetentionLabel
    Volume label of the retention volume (default ApplianceRetention).
.PARAMETER RetentionDriveLetter
    Drive letter of the retention volume (default R).
.PARAMETER RetentionMinSizeGB
    Smallest disk accepted for retention, in GiB (the seed: 600).
.PARAMETER AllocationUnitSize
    NTFS allocation unit in bytes (default 65536).

.OUTPUTS
    Sets $Ansible.Changed when run by ansible.windows.win_powershell; otherwise writes an
    object with `changed`, `cache_path` and `retention_path` (e.g. P:\ and R:\).
#>
[CmdletBinding()]
param(
    [string]$CacheLabel = 'ApplianceCache',
    [ValidatePattern('^[D-Zd-z]$')][string]$CacheDriveLetter = 'P',
    [ValidateRange(1, 1048576)][int]$CacheMinSizeGB = 600,
    [string]$RetentionLabel = 'ApplianceRetention',
    [ValidatePattern('^[D-Zd-z]$')][string]$RetentionDriveLetter = 'R',
    [ValidateRange(1, 1048576)][int]$RetentionMinSizeGB = 600,
    [ValidateSet(4096, 8192, 16384, 32768, 65536)][int]$AllocationUnitSize = 65536
)
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'

if ($CacheDriveLetter.ToUpper() -eq $RetentionDriveLetter.ToUpper()) { throw "the cache and retention drive letters must differ (both are $CacheDriveLetter)" }
if ($CacheLabel -eq $RetentionLabel) { throw "the cache and retention labels must differ (both are $CacheLabel)" }

# Bytes in a GiB (a literal, not the 1GB multiplier, so every PowerShell parser reads it).
$GiB = 1073741824
$volumes = @(
    @{ Role = 'cache'; Label = $CacheLabel; Letter = $CacheDriveLetter.ToUpper(); MinBytes = [int64]$CacheMinSizeGB * $GiB },
    @{ Role = 'retention'; Label = $RetentionLabel; Letter = $RetentionDriveLetter.ToUpper(); MinBytes = [int64]$RetentionMinSizeGB * $GiB }
)

# Plan everything first, so that an impossible request changes nothing.
$candidates = @(Get-Disk | Where-Object { $_.PartitionStyle -eq 'RAW' -and -not $_.IsBoot -and -not $_.IsSystem -and -not $_.IsReadOnly } | Sort-Object -Property @('Size', 'Number'))
$plan = @()
$usedDisks = @()
$paths = @{}
foreach ($volume in $volumes) {
    $existing = Get-Volume -FileSystemLabel $volume.Label -ErrorAction SilentlyContinue | Select-Object -First 1
    if ($existing) {
        $paths[$volume.Role] = "$($existing.DriveLetter):\"
        continue
    }
    $holder = Get-Volume -DriveLetter $volume.Letter -ErrorAction SilentlyContinue
    if ($holder) { throw "drive letter $($volume.Letter): is already used by volume '$($holder.FileSystemLabel)'; choose another letter for the $($volume.Role) volume" }
    $disk = $candidates | Where-Object { $_.Size -ge $volume.MinBytes -and ($usedDisks -notcontains $_.Number) } | Select-Object -First 1
    if (-not $disk) {
        throw "no uninitialised disk of at least $([int64]($volume.MinBytes / $GiB)) GiB is free for the $($volume.Role) volume '$($volume.Label)'"
    }
    $plan += [pscustomobject]@{ Volume = $volume; Disk = $disk }
    $usedDisks += $disk.Number
    $paths[$volume.Role] = "$($volume.Letter):\"
}

foreach ($step in $plan) {
    Initialize-Disk -Number $step.Disk.Number -PartitionStyle GPT
    New-Partition -DiskNumber $step.Disk.Number -UseMaximumSize -DriveLetter $step.Volume.Letter | Out-Null
    Format-Volume -DriveLetter $step.Volume.Letter -FileSystem NTFS -NewFileSystemLabel $step.Volume.Label `
        -AllocationUnitSize $AllocationUnitSize -Confirm:$false | Out-Null
}

$result = @{ cache_path = $paths['cache']; retention_path = $paths['retention'] }
$ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
if ($ansibleVar) {
    $ansibleVar.Value.Changed = ($plan.Count -gt 0)
    $ansibleVar.Value.Result = $result
} else {
    [pscustomobject](@{ changed = ($plan.Count -gt 0) } + $result)
}
