"""A curious leader: the attacks it can run on the updates it receives (labels, images), and the learners it
watches, built from the learner's own code path; the command line is federated/tools/curious_leader.py."""
