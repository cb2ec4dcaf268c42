"""What an operator sees of a running server: Prometheus metrics (metrics.py) and structured logs with a
request id (logs.py). Nothing here changes what the server does; it only reports it."""
