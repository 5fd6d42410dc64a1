"""The asyncio layer: listeners, upstream dialing, per-protocol sessions and the relay."""
