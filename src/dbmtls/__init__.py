"""dbmtls: plaintext on localhost for the app, verified mutual TLS to the database."""

__version__ = "0.1.0"
