"""The decoder stage as a Serve deployment: the shim, the wire translation and the metrics."""
