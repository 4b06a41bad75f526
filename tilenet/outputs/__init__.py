"""Outputs: the output set on a location, its formats, sinks, instance labels and class regions."""
