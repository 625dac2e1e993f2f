"""mailbroker: OAuth2 (XOAUTH2) email sending for cloud applications.

Domain code only. Adapter modules (``tokens.store``, ``integrations``' secret store,
``smtp.transport``, ``queueing``) are the only ones that touch boto3, sockets or HTTP; the rest
takes its adapters as arguments.
"""

__version__ = "0.1.0"
