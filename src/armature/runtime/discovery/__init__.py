"""Discovery backends behind one ``KeyValueStore`` interface (mem, file, etcd)."""
