"""The payment service: ticketed events, holds and PaymentIntents."""
