"""The ACME error type, apart from ``client`` so that importing it costs nothing: the
manager catches it without importing the ``acme`` library (see ``manager``)."""


class AcmeError(Exception):
    """Issuance failed (network, CA refusal, failed validation, timeout); the message
    says which step and why."""
