"""The agents' side: the query client (fast path, no torch) and the warm query server."""
