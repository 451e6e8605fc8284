"""A teacher in its own process: the teacher server, its wire format and the trainer's
``RemoteTeacher`` (exact mode: final hidden states over HTTP, the output head local)."""
