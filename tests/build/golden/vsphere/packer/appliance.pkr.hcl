# Rendered by `invoke render` from images/windows-server-2016/appliance.pkr.hcl.j2 and the
# inventory "vsphere"; edit those, not this file.
variable "vm_name" {
  type        = string
  description = "VM and artifact name"
  default     = "replication-appliance"
  validation {
    # Packer 1.6 has no regex functions in validation; the inventory check is the strict one.
    condition     = length(var.vm_name) >= 1 && length(var.vm_name) <= 63 && substr(var.vm_name, 0, 1) != "-"
    error_message = "The vm_name must be 1-63 characters and not start with a dash."
  }
}

variable "appliance_version" {
  type        = string
  description = "Appliance version: names every artifact"
  default     = "1.0.0"
}

variable "cpus" {
  type    = number
  default = 8
  validation {
    condition     = var.cpus >= 8
    error_message = "The appliance needs at least 8 vCPUs."
  }
}

variable "memory_mb" {
  type    = number
  default = 16384
  validation {
    condition     = var.memory_mb >= 16384
    error_message = "The appliance needs at least 16384 MB of memory."
  }
}

variable "os_disk_gb" {
  type    = number
  default = 127
}

variable "cache_disk_gb" {
  type    = number
  default = 600
  validation {
    condition     = var.cache_disk_gb >= 600
    error_message = "The process server cache disk needs at least 600 GB."
  }
}

variable "retention_disk_gb" {
  type    = number
  default = 600
  validation {
    condition     = var.retention_disk_gb >= 600
    error_message = "The retention disk needs at least 600 GB."
  }
}

variable "iso_url" {
  type        = string
  description = "Windows Server 2016 ISO (URL or local path)"
  default     = "https://software-static.download.prss.microsoft.com/pr/download/Windows_Server_2016_Datacenter_EVAL_en-us_14393_refresh.ISO"
}

variable "iso_checksum" {
  type    = string
  default = "sha256:1ce702a578a3cb1ac3d14873980838590f06d5b7101c5daaccbac9d73f1fb50f"
  validation {
    condition     = length(var.iso_checksum) == 71 && substr(var.iso_checksum, 0, 7) == "sha256:"
    error_message = "The iso_checksum must be sha256: followed by 64 hex digits."
  }
}

variable "admin_user" {
  type    = string
  default = "Administrator"
}

variable "admin_password" {
  type        = string
  description = "Local administrator password; from APPLIANCE_ADMIN_PASSWORD, never from a file"
  sensitive   = true
  validation {
    condition     = length(var.admin_password) >= 8
    error_message = "The admin_password must be at least 8 characters."
  }
}

variable "answer_dir" {
  type        = string
  description = "Private folder holding autounattend.xml (it carries the password) and the first-boot scripts"
}

variable "output_directory" {
  type    = string
  default = "output"
}

variable "playbook_file" {
  type    = string
  default = "../../../playbooks/appliance.yml"
}

variable "ansible_vars_file" {
  type    = string
  default = "../ansible/appliance-vars.yml"
}

variable "vcenter_server" {
  type    = string
  default = "vcenter.example.com"
}

variable "vsphere_username" {
  type    = string
  default = "administrator@vsphere.local"
}

variable "vsphere_password" {
  type        = string
  description = "vCenter password; from VSPHERE_PASSWORD, never from a file"
  sensitive   = true
}

variable "vsphere_insecure" {
  type    = bool
  default = false
}

variable "vsphere_datacenter" {
  type    = string
  default = "Datacenter"
}

variable "vsphere_cluster" {
  type    = string
  default = "Cluster"
}

variable "vsphere_datastore" {
  type    = string
  default = "datastore1"
}

variable "vsphere_network" {
  type    = string
  default = "VM Network"
}

variable "vsphere_folder" {
  type    = string
  default = "Templates"
}

variable "iso_datastore_path" {
  type    = string
  default = "[datastore1] iso/Windows_Server_2016_Datacenter_EVAL_en-us_14393_refresh.ISO"
}

variable "tools_iso_datastore_path" {
  type    = string
  default = "[] /vmimages/tools-isoimages/windows.iso"
}

source "vsphere-iso" "appliance" {
  vcenter_server      = var.vcenter_server
  username            = var.vsphere_username
  password            = var.vsphere_password
  insecure_connection = var.vsphere_insecure
  datacenter          = var.vsphere_datacenter
  cluster             = var.vsphere_cluster
  datastore           = var.vsphere_datastore
  folder              = var.vsphere_folder

  vm_name       = "${var.vm_name}-${var.appliance_version}"
  guest_os_type = "windows9Server64Guest"
  firmware      = "bios"
  CPUs          = var.cpus
  RAM           = var.memory_mb

  # PVSCSI: WinPE loads its driver from the floppy ESXi ships (see autounattend.xml).
  disk_controller_type = ["pvscsi"]
  storage {
    disk_size             = var.os_disk_gb * 1024
    disk_thin_provisioned = true
  }
  storage {
    disk_size             = var.cache_disk_gb * 1024
    disk_thin_provisioned = true
  }
  storage {
    disk_size             = var.retention_disk_gb * 1024
    disk_thin_provisioned = true
  }
  network_adapters {
    network      = var.vsphere_network
    network_card = "vmxnet3"
  }

  iso_paths       = [var.iso_datastore_path, var.tools_iso_datastore_path]
  floppy_img_path = "[] /vmimages/floppies/pvscsi-Windows8.flp"
  cd_files        = ["${var.answer_dir}/autounattend.xml", "${var.answer_dir}/Install-VMwareDrivers.ps1", "${var.answer_dir}/Enable-WinRM.ps1", "${var.answer_dir}/Stop-Build.ps1"]
  cd_label        = "PROVISION"
  remove_cdrom    = true

  communicator     = "winrm"
  winrm_username   = var.admin_user
  winrm_password   = var.admin_password
  winrm_timeout    = "6h"
  shutdown_command = "powershell.exe -NoProfile -ExecutionPolicy Bypass -File %SystemRoot%\\Temp\\Stop-Build.ps1"
  shutdown_timeout = "30m"

  export {
    output_directory = var.output_directory
    force            = true
  }
}

build {
  sources = ["source.vsphere-iso.appliance"]

  provisioner "ansible" {
    playbook_file = var.playbook_file
    user          = var.admin_user
    use_proxy     = false
    # Packer appends `-e ansible_password=<WinRM password>` to ansible-playbook's argv (readable
    # in /proc) unless an argument already names ansible_password. An empty one stops it; the
    # vars file, read after it, sets the password from the environment.
    extra_arguments  = ["--extra-vars", "ansible_password=", "--extra-vars", "@${var.ansible_vars_file}"]
    ansible_env_vars = ["ANSIBLE_NOCOLOR=True", "ANSIBLE_HOST_KEY_CHECKING=False"]
  }
}
