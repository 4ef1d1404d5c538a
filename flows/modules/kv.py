"""`kv-set`, `kv-get`, `kv-append`."""
