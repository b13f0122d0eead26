# The storage root and the service account training runs use, with the least roles they need.

resource "google_storage_bucket" "jagpt" {
  name                        = var.bucket_name
  location                    = upper(var.region)
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false
  labels                      = var.labels

  # Step folders are immutable; a version protects against an accidental overwrite or delete.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      with_state                 = "ARCHIVED"
      days_since_noncurrent_time = 30
    }
    action {
      type = "Delete"
    }
  }
}

resource "google_service_account" "train" {
  account_id   = var.service_account_id
  display_name = "jagpt training runs"
}

# Read and write objects of this bucket only (no bucket admin, nothing in other buckets).
resource "google_storage_bucket_iam_member" "train_objects" {
  bucket = google_storage_bucket.jagpt.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.train.email}"
}

# Write logs (the TPU VM's training logs go to Cloud Logging). There is no narrower scope for this role.
resource "google_project_iam_member" "train_logs" {
  project = var.project
  role    = "roles/logging.logWriter"
  member  = "serviceAccount:${google_service_account.train.email}"
}

# Only for a worker that launches TPU VMs as this account (infra.launcher): create and delete them,
# and attach this account to them. Off by default.
resource "google_project_iam_member" "launcher_tpu_admin" {
  count   = var.launcher_creates_tpus ? 1 : 0
  project = var.project
  role    = "roles/tpu.admin"
  member  = "serviceAccount:${google_service_account.train.email}"
}

resource "google_service_account_iam_member" "launcher_acts_as_train" {
  count              = var.launcher_creates_tpus ? 1 : 0
  service_account_id = google_service_account.train.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.train.email}"
}

# Pull the training image, from its one repository only (when image_repository is set).
resource "google_artifact_registry_repository_iam_member" "train_pulls_image" {
  count      = var.image_repository == "" ? 0 : 1
  project    = var.project
  location   = var.region
  repository = var.image_repository
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.train.email}"
}
