"""gRPC plumbing shared by both sides: generated stubs, servers and channels, TLS, tokens and credentials, admission
limits and watchdogs."""
