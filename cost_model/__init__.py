"""Cost estimates (time, bytes) that the passes' decisions are scored with."""
