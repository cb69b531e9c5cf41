"""Raft consensus: a sans-I/O core (core, log, quorum, progress) and its asyncio/gRPC shell."""
