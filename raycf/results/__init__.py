"""The results folder: storage (local or s3://), artefact readers, node caches, manifests and fingerprints."""
