<#
.SYNOPSIS
  First-boot step 1: make the image bootable on ESXi whatever hypervisor builds it.
.DESCRIPTION
  On VMware: installs VMware Tools (retried: the installer sometimes fails on first try).
  Elsewhere (the local KVM build): the Tools installer refuses to run, so its PVSCSI and
  VMXNET3 drivers are extracted and staged with pnputil, and PVSCSI is set to start at boot,
  so the OS disk is found when the OVA runs on a PVSCSI controller.
  Rendered from images/windows-server-2016/scripts/Install-VMwareDrivers.ps1.j2.
#>
$ErrorActionPreference = 'Stop'
$log = Join-Path $env:SystemRoot 'Temp\appliance-firstboot.log'
function Write-Log([string]$Message) { Add-Content -Path $log -Value ("{0:o} {1}" -f (Get-Date), $Message) }

function Find-OnMedia([string]$RelativePath) {
    # Provisioning media is searched for on every drive, never assumed at a fixed letter.
    foreach ($drive in Get-PSDrive -PSProvider FileSystem) {
        $candidate = Join-Path $drive.Root $RelativePath
        if (Test-Path -LiteralPath $candidate) { return $candidate }
    }
    return $null
}

$isVMware = (Get-CimInstance -ClassName Win32_ComputerSystem).Manufacturer -match 'VMware'
if ($isVMware) {
    $setup = Find-OnMedia 'setup64.exe'
    if (-not $setup) { throw 'VMware Tools media (setup64.exe) not found on any drive' }
    for ($attempt = 1; $attempt -le 3; $attempt++) {
        Write-Log "installing VMware Tools, attempt $attempt"
        $p = Start-Process -FilePath $setup -ArgumentList '/S /v "/qn REBOOT=R ADDLOCAL=ALL"' -Wait -PassThru
        if ($p.ExitCode -in 0, 3010) { Write-Log 'VMware Tools installed'; exit 0 }
        Start-Sleep -Seconds 30
    }
    throw "VMware Tools failed to install after 3 attempts"
}

$iso = Find-OnMedia 'windows.iso'
if (-not $iso) { throw 'The VMware Tools ISO (windows.iso) was not found on any drive' }
$image = Mount-DiskImage -ImagePath $iso -PassThru
$toolsRoot = ($image | Get-Volume).DriveLetter + ':\'
$extract = Join-Path $env:SystemRoot 'Temp\vmware-tools'
Start-Process -FilePath (Join-Path $toolsRoot 'setup64.exe') -ArgumentList "/a /p `"$extract`"" -Wait
foreach ($driver in 'pvscsi', 'vmxnet3') {
    $inf = Get-ChildItem -Path $extract -Recurse -Filter "$driver.inf" | Where-Object FullName -match 'amd64' | Select-Object -First 1
    if (-not $inf) { throw "driver $driver not found in the VMware Tools media" }
    & pnputil.exe /add-driver $inf.FullName /install | Out-Null
    Write-Log "staged driver $driver from $($inf.FullName)"
}
# Boot-start: without it Windows cannot reach its own disk on a PVSCSI controller.
Set-ItemProperty -Path 'HKLM:\SYSTEM\CurrentControlSet\Services\pvscsi' -Name Start -Value 0
Dismount-DiskImage -ImagePath $iso | Out-Null
Write-Log 'PVSCSI and VMXNET3 drivers staged for ESXi'
