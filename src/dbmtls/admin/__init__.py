"""The admin HTTP server and Prometheus metrics."""
