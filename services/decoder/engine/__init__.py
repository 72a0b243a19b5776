"""Scheduling, KV block accounting, sampling and the continuous-batching engine. No Ray, gRPC or Redis."""
