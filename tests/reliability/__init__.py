"""Reliability and security tests (issue 8): faults, bad input, load, TLS and tokens, on real processes."""
