"""ACME (RFC 8555) in the master: account, challenges (HTTP-01 answered by the workers,
TLS-ALPN-01, DNS-01), issuance, renewal, storage with a lock. See docs/tls-acme.md.

Modules: ``service`` (the master's glue), ``manager`` (scheduling), ``client`` (the
``acme`` library; run by ``issuer``, a child process per issuance, so that the master
never imports it), ``challenges`` (pending challenges, TLS-ALPN-01 certificates),
``http01`` (the responder filter the workers run), ``dns01`` (RFC 2136, exec, webhook),
``storage`` (directory or etcd, with the renewal lock), ``errors`` (:class:`AcmeError`).
"""
