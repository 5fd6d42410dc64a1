"""Sans-IO wire-protocol handshakes (bytes in, events and bytes out), one module per database protocol."""
