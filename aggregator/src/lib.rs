//! Aperture aggregator: ingress, shards, storage writers and the HTTP API
