"""What travels between leader and learners: the tensor payload codec, chunk framing without protobuf copies, and
typed metadata records."""
