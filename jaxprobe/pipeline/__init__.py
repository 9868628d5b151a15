"""The Pipeline and its programs: site names and selection, on-device reductions, the jitted capture
and sampling programs, image input. `jaxprobe.load` (pipeline.load) builds one from a checkpoint."""
