"""The ingress service: the only internet-facing process."""
