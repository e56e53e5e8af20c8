"""The soak: thousands of mixed requests against `internvl-serve up` with replicas, and whether memory, file
descriptors, Redis memory and work in flight stay flat (`python -m bench.soak`, `make soak`)."""
