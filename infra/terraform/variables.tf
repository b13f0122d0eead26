# Names follow jagpt's own: the config's storage.root is gs://<bucket_name>/<storage_prefix>,
# and tpu_type, zone and spot are the train deployment's parameters (flows/params.py).
# infra/tfvars.py writes a terraform.tfvars.json from a jagpt config and those parameters.

variable "project" {
  type        = string
  description = "Google Cloud project id"
}

variable "region" {
  type        = string
  default     = "us-central2"
  description = "region of the bucket; keep it the TPU zone's region, so training reads the shards without egress"
}

variable "bucket_name" {
  type        = string
  description = "GCS bucket of the storage root (storage.root = gs://<bucket_name>/<storage_prefix>)"
}

variable "storage_prefix" {
  type        = string
  default     = "jagpt"
  description = "folder inside the bucket that is the storage root (no leading or trailing slash)"

  validation {
    condition     = can(regex("^[^/]+(/[^/]+)*$", var.storage_prefix))
    error_message = "storage_prefix is a path without a leading or trailing slash, e.g. jagpt or team/jagpt."
  }
}

variable "service_account_id" {
  type        = string
  default     = "jagpt-train"
  description = "account id of the service account training runs use"
}

variable "launcher_creates_tpus" {
  type        = bool
  default     = false
  description = "also let the service account create and delete TPU VMs (roles/tpu.admin) and attach itself to them (roles/iam.serviceAccountUser on itself): set it when the Prefect worker that runs infra.launcher runs as this account"
}

variable "create_tpu" {
  type        = bool
  default     = false
  description = "create a long-lived TPU VM with Terraform; the launcher creates its own per run, so this is off by default"
}

variable "tpu_name" {
  type        = string
  default     = "jagpt-train"
  description = "name of the TPU VM when create_tpu is set"
}

variable "tpu_type" {
  type        = string
  default     = "v4-8"
  description = "Cloud TPU accelerator type (the train deployment's tpu_type)"
}

variable "zone" {
  type        = string
  default     = "us-central2-b"
  description = "zone of the TPU VM (the train deployment's zone)"
}

variable "spot" {
  type        = bool
  default     = true
  description = "Spot capacity (cheaper, may be preempted); false: on-demand (the train deployment's spot)"
}

variable "tpu_runtime_version" {
  type        = string
  default     = "tpu-ubuntu2204-base"
  description = "TPU VM software version"
}

variable "labels" {
  type        = map(string)
  default     = { app = "jagpt" }
  description = "labels on the bucket and the TPU VM (cost reports can group by them)"
}

variable "image_repository" {
  type        = string
  default     = ""
  description = "Artifact Registry Docker repository (in region) holding the training image (infra/Dockerfile); when set, the service account may pull from that repository only"
}
