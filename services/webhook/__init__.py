"""The webhook service: applies Stripe events exactly once."""
