"""One module per upgrade style: the asyncio glue between sans-IO machines, the dialer and the relay."""
