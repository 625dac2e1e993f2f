"""The local sandbox: loopback stand-ins for the providers' token endpoints, an SMTP server and
AWS (moto server), driven by ``template.yaml``. Used by ``make run``, ``mailbroker local`` and the
integration tests; never shipped in the Lambda layer's hot path."""
