"""Development PKI: a local CA and leaf certificates shaped like Kubernetes TLS Secrets."""

from dbmtls.pki.devca import KeyType, PrivateKey, create_ca, describe, issue, load_ca

__all__ = ["KeyType", "PrivateKey", "create_ca", "describe", "issue", "load_ca"]
