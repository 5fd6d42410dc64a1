"""Test support: certificates, free ports, running dbmtls and real servers."""
