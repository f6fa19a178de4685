"""The learner process: its session with the leader, its servicer, and the training loop."""
