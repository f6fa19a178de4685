"""Federated learning over gRPC: a leader that owns a global model and learners that train it on data that stays
with them. The sub-packages are the layers, each importing only from those before it:

common   process set-up and the flag table (no torch in the flag table: --help is instant)
core     the arithmetic, without gRPC: update layout, steps, schedule, aggregation, strategies, local training
privacy  secure aggregation and differential privacy, without gRPC (core's level): masks, shares, noise, DP-SGD
wire     what travels: the payload codec, chunk framing, typed metadata
net      gRPC plumbing: servers, channels, TLS and tokens, admission and watchdogs
leader   the leader's process: registry, rounds, dispatch, global model, servicer, checkpoints, app
learner  the learner's process: session with the leader, servicer, training loop, app
tools    what runs the others: local launch, network-namespace hosts, certificates, benchmarks
"""
