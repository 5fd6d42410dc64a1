"""TLS toward the database: contexts, verification, classified errors, certificate material."""
