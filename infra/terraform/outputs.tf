output "storage_root" {
  description = "the config's storage.root"
  value       = "gs://${google_storage_bucket.jagpt.name}/${var.storage_prefix}"
}

output "service_account_email" {
  description = "the account training runs use (the TPU VM's service account)"
  value       = google_service_account.train.email
}

output "tpu_vm" {
  description = "the TPU VM's name, when create_tpu is set"
  value       = var.create_tpu ? google_tpu_v2_vm.train[0].name : null
}
