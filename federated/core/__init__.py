"""The arithmetic of federated training, without gRPC or threads: update layout, value checks, optimizer steps,
schedule, aggregation rules, strategies, the learner's local update, partitions."""
