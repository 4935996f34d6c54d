"""Training: config (TOML), losses, feature networks and the resumable two-stage loop."""
