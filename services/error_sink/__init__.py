"""The error-sink: persists, groups, scrubs and alerts on every error report."""
