"""The leader process: its flags, slots and registrations, the open round, calls to learners, rounds as a whole, the
global model, the servicer, evaluation, checkpoints and the run."""
