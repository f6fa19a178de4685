"""What runs and measures the rest: local launch, network-namespace test hosts, certificates, benchmarks."""
