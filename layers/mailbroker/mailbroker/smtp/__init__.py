"""SMTP: the transport (``SmtpSession``), its authenticators and the live check."""

from mailbroker.smtp.check import run_check
from mailbroker.smtp.transport import CheckStep, SendResult, SmtpSession
from mailbroker.smtp.xoauth2 import Authenticator, BasicAuth, XOAuth2Auth

__all__ = ["Authenticator", "BasicAuth", "CheckStep", "SendResult", "SmtpSession", "XOAuth2Auth", "run_check"]
