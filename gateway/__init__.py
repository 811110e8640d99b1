"""ecomm-gateway: an outbound SMTP relay that enforces a university eCommunications policy."""

__version__ = "0.1.0"
