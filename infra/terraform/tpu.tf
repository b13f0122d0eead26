# An optional long-lived TPU VM. Off by default: the launcher creates a VM per run and deletes it
# afterwards. (A TPU VM, not a queued resource: the provider's queued resource has no Spot,
# service account or labels settings.) google-beta carries every TPU VM field, Spot included.

resource "google_tpu_v2_vm" "train" {
  provider = google-beta
  count    = var.create_tpu ? 1 : 0

  name             = var.tpu_name
  project          = var.project
  zone             = var.zone
  accelerator_type = var.tpu_type
  runtime_version  = var.tpu_runtime_version
  description      = "jagpt training (storage root gs://${var.bucket_name}/${var.storage_prefix})"
  labels           = var.labels

  scheduling_config {
    spot = var.spot
  }

  service_account {
    email = google_service_account.train.email
    scope = ["https://www.googleapis.com/auth/cloud-platform"]
  }
}
